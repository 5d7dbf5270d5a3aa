"""End to end, as a user runs it: real kubectl against the local cluster, the operator as its
own process, worker pods running torchrun + DeepSpeed, data and adapter in the local S3."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import pytest

from e2e_tools import REPO, manifest as _manifest, pids_of_job as _pids_of_job

from kubetune.api import PHASES
from kubetune.cli.demo import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, follow_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


@pytest.mark.parametrize("bad, field", [
    ("replicas-zero.yaml", "spec.workers.replicas"),
    ("zero-stage-5.yaml", "spec.deepspeed.zeroStage"),
    ("no-dataset-uri.yaml", "spec.dataset.uri"),
    ("not-s3-uri.yaml", "uri"),
])
def test_bad_manifest_is_refused_naming_the_field(stack, bad, field):
    result = stack.kubectl.run("apply", "-f", str(REPO / "examples" / "bad" / bad), check=False)
    assert result.returncode != 0
    assert field in result.stderr
    assert "is invalid" in result.stderr


def test_quickstart_runs_to_succeeded_and_publishes_a_working_adapter(stack):
    kubectl, s3 = stack.kubectl, stack.s3
    # What a user watching sees: the phase and the progress moving, row by row.
    watch = subprocess.Popen(kubectl.command("get", "ftj", "-w"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    applied = kubectl.run("apply", "-f", str(REPO / "examples" / "quickstart.yaml"))
    assert "finetunejob.kubetune.dev/quickstart created" in applied.stdout

    try:
        job = follow_job(kubectl, "quickstart", timeout=1200, echo=False)
        time.sleep(1)
    finally:
        watch.terminate()
    rows = [line.split() for line in watch.communicate(timeout=30)[0].splitlines() if line.startswith("quickstart ")]
    phases = [row[1] for row in rows if row[1] in PHASES]  # the first rows have no phase yet: empty cells
    assert phases[0] == "Validating" and phases[-1] == "Succeeded" and "Running" in phases, rows
    # The progress moves: the plan ("0/150", shown while the model loads) or a step before the
    # end, then the end. On an idle machine the 150 steps take less than two progress scrapes.
    progress = {row[2] for row in rows if row[1] in ("Running", "Publishing", "Succeeded") and "/" in row[2]}
    assert "150/150" in progress and len(progress) >= 2, f"the progress never moved in `kubectl get ftj -w`: {rows}"
    status = job["status"]
    assert status["phase"] == "Succeeded", status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert status["adapter"]["uri"] == "s3://adapters/quickstart/"
    # The trainer's termination message gives the results; the progress ends at the last step.
    assert isinstance(status["results"]["finalLoss"], float) and status["results"]["steps"] == 150, status
    assert status["results"]["tokens"] > 0
    assert (status["progress"]["step"], status["progress"]["totalSteps"]) == (150, 150), status

    table = kubectl.run("get", "ftj", "quickstart").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA"]
    assert table[1].split()[:3] == ["quickstart", "Succeeded", "150/150"]
    assert float(table[1].split()[3]) == round(status["results"]["finalLoss"], 4)

    pods = kubectl.run("get", "pods", "-l", "kubetune.dev/job-name=quickstart").stdout
    assert pods.count("Completed") == 3, pods  # the preflight pod and the two workers

    described = kubectl.run("describe", "ftj", "quickstart").stdout
    assert "Events:" in described and "Succeeded" in described

    logs = kubectl.run("logs", "quickstart-worker-0").stdout
    assert "loss" in logs

    # The manifest lists every published file with its sha256, and is written last.
    listing = s3.list_objects_v2(Bucket="adapters", Prefix="quickstart/")["Contents"]
    objects = {o["Key"]: o for o in listing}
    manifest_bytes = s3.get_object(Bucket="adapters", Key="quickstart/manifest.json")["Body"].read()
    manifest = json.loads(manifest_bytes)
    # The manifest names the job that published it; the job's status names that manifest.
    job_meta = job["metadata"]
    assert {key: manifest["job"][key] for key in ("namespace", "name", "uid")} == {
        "namespace": job_meta["namespace"], "name": "quickstart", "uid": job_meta["uid"]}
    assert status["adapter"]["manifestSha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert manifest["files"], manifest
    for entry in manifest["files"]:
        key = "quickstart/" + entry["path"]
        body = s3.get_object(Bucket="adapters", Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], key
        assert objects[key]["LastModified"] <= objects["quickstart/manifest.json"]["LastModified"]

    # The adapter loads onto the base model with PEFT and changes its output.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = stack.state / "downloaded"
    for bucket, prefix in (("models", "tiny-llama/"), ("adapters", "quickstart/")):
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
            target = local / bucket / obj["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
    base_dir, adapter_dir = local / "models" / "tiny-llama", local / "adapters" / "quickstart"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer("the quick brown fox", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        before = base(**inputs).logits
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        after = tuned(**inputs).logits
    assert not torch.allclose(before, after, atol=1e-4)

    # The operator's own metrics, as Prometheus scrapes them.
    operator_metrics = _scrape(stack.operator.metrics_url)
    assert operator_metrics[("kubetune_operator_jobs", (("phase", "Succeeded"),))] >= 1, operator_metrics
    assert operator_metrics[("kubetune_operator_pods_created_total", ())] >= 2, operator_metrics
    assert operator_metrics[("kubetune_operator_reconciles_total", (("handler", "pod_event"),))] > 0

    # Another job may not silently overwrite the published adapter: it fails while validating.
    kubectl.run("apply", "-f", "-", input=_manifest(REPO / "examples" / "quickstart.yaml", metadata__name="copycat"))
    copycat = follow_job(kubectl, "copycat", timeout=300, echo=False)["status"]
    assert copycat["phase"] == "Failed" and "already holds a published adapter" in copycat["message"], copycat
    assert "spec.output.overwrite" in copycat["message"]
    assert json.loads(s3.get_object(Bucket="adapters", Key="quickstart/manifest.json")["Body"].read()) == manifest
    kubectl.run("delete", "ftj", "copycat")

    _no_credential_anywhere(stack)

    # Deleting the job removes every child.
    kubectl.run("delete", "ftj", "quickstart")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [kind for kind in ("pods", "services")
                if kubectl.run("get", kind, "-l", "kubetune.dev/job-name=quickstart", "-o", "name").stdout.strip()]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"children left after delete: {left}"


def test_a_bad_dataset_fails_in_validating_with_its_line_number_and_no_worker_is_created(stack):
    kubectl, s3 = stack.kubectl, stack.s3
    s3.put_object(Bucket="datasets", Key="broken/train.jsonl",
                  Body=b'{"text": "a fine first line"}\n{"text": "unterminated\n')
    broken = _manifest(REPO / "examples" / "quickstart.yaml", metadata__name="broken-data",
                       spec__dataset__uri="s3://datasets/broken/train.jsonl",
                       spec__output__adapterUri="s3://adapters/broken-data/")
    kubectl.run("apply", "-f", "-", input=broken)

    job = follow_job(kubectl, "broken-data", timeout=600, echo=False)
    status = job["status"]
    assert status["phase"] == "Failed", status
    assert status["message"].startswith("preflight failed: "), status["message"]
    assert "train.jsonl line 2: not valid JSON" in status["message"], status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed" and "line 2: not valid JSON" in failed["message"]
    described = kubectl.run("describe", "ftj", "broken-data").stdout
    assert "train.jsonl line 2: not valid JSON" in described, described
    # No worker (and no GPU) was ever held: only the preflight pod ran.
    pods = kubectl.json("get", "pods", "-l", "kubetune.dev/job-name=broken-data")["items"]
    assert [p["metadata"]["name"] for p in pods] == ["broken-data-preflight"]
    events = kubectl.json("get", "events", "--field-selector", "involvedObject.name=broken-data")["items"]
    assert not any(e["reason"] == "Created" for e in events)
    # The preflight pod itself carries the trainer's message, as on any Kubernetes.
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert "line 2: not valid JSON" in terminated["message"]


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        body = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_deleting_a_running_job_stops_its_processes(stack):
    kubectl = stack.kubectl
    long_job = _manifest(REPO / "examples" / "quickstart.yaml", metadata__name="long-run",
                         spec__training__maxSteps=100000, spec__training__epochs=1000,
                         spec__output__adapterUri="s3://adapters/long-run/")
    kubectl.run("apply", "-f", "-", input=long_job)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        phase = kubectl.json("get", "ftj", "long-run").get("status", {}).get("phase")
        if phase == "Running" and len(_pids_of_job("long-run")) >= 2:
            break
        assert phase not in ("Failed", "Succeeded"), phase
        time.sleep(1)
    assert _pids_of_job("long-run"), "workers never started"

    kubectl.run("delete", "ftj", "long-run")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_pids_of_job("long-run") or kubectl.run(
            "get", "pods", "-l", "kubetune.dev/job-name=long-run", "-o", "name").stdout.strip()):
        time.sleep(0.5)
    assert _pids_of_job("long-run") == []
    assert kubectl.run("get", "pods", "-l", "kubetune.dev/job-name=long-run", "-o", "name").stdout.strip() == ""


def test_a_job_deleted_and_re_applied_at_once_runs_on_its_own_pods(stack):
    """The README's resume recipe on a real cluster: graceful termination and asynchronous
    garbage collection mean the old job's pods still exist, terminating, when the new job
    starts. The new job waits for the names and runs on pods of its own."""
    kubectl = stack.kubectl
    manifest = _manifest(REPO / "examples" / "quickstart.yaml", metadata__name="again",
                         spec__training__maxSteps=100000, spec__training__epochs=1000,
                         spec__output__adapterUri="s3://adapters/again/")
    kubectl.run("apply", "-f", "-", input=manifest)
    deadline = time.monotonic() + 300
    while kubectl.json("get", "ftj", "again").get("status", {}).get("phase") != "Running":
        assert time.monotonic() < deadline, "the first job never ran"
        time.sleep(1)
    old_uid = kubectl.json("get", "ftj", "again")["metadata"]["uid"]

    # kubectl waits for the job object (the operator's finalizer is off in moments), never for
    # its pods: they are still terminating (a 45 s grace) when the new job starts. Without that
    # wait, an apply could land on the old job, still being deleted, and go with it.
    kubectl.run("delete", "ftj", "again")
    kubectl.run("apply", "-f", "-", input=manifest)

    deadline = time.monotonic() + 300
    while True:
        job = kubectl.json("get", "ftj", "again")
        pods = kubectl.json("get", "pods", "-l", "kubetune.dev/job-name=again,app.kubernetes.io/component=worker")["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if job["metadata"]["uid"] != old_uid and job.get("status", {}).get("phase") == "Running" and len(live) == 2:
            break
        assert job.get("status", {}).get("phase") not in ("Failed", "Succeeded"), job["status"]
        assert time.monotonic() < deadline, f"the new job never ran on its own pods: {job.get('status')}"
        time.sleep(1)
    new_uid = job["metadata"]["uid"]
    assert {p["metadata"]["labels"]["kubetune.dev/job-uid"] for p in live} == {new_uid}
    assert job["status"]["workers"]["active"] == 2

    kubectl.run("delete", "ftj", "again")
    deadline = time.monotonic() + 90
    while _pids_of_job("again") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _pids_of_job("again") == []


def _no_credential_anywhere(stack) -> None:
    """Chaos row 8: the credentials the job's Secret holds appear nowhere a user, an admin or a
    reader of the buckets can look: the operator's log and metrics, the trainers' logs (as
    kubectl shows them and as archived in S3), Events, FineTuneJobs (status included),
    ConfigMaps, pod specs, checkpoints, the published adapter and its manifest."""
    from chaos_table import TABLE

    kubectl, s3 = stack.kubectl, stack.s3
    places: dict[str, bytes] = {
        "operator log": (stack.state / "operator.log").read_bytes(),
        "operator metrics": subprocess.run(["curl", "-s", stack.operator.metrics_url], capture_output=True).stdout,
    }
    for kind in ("events", "finetunejobs", "configmaps", "pods"):
        places[kind] = kubectl.run("get", kind, "-A", "-o", "json").stdout.encode()
    for pod in kubectl.run("get", "pods", "-l", "kubetune.dev/job-name=quickstart", "-o", "name").stdout.split():
        places[f"kubectl logs {pod}"] = kubectl.run("logs", pod).stdout.encode()
    for bucket in (entry["Name"] for entry in s3.list_buckets()["Buckets"]):  # adapters, checkpoints, logs
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            if obj["Size"] <= 8 << 20:  # not the base model's weights
                places[f"s3://{bucket}/{obj['Key']}"] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    secrets = (DEMO_ACCESS_KEY.encode(), DEMO_SECRET_KEY.encode())
    leaks = sorted(place for place, text in places.items() for secret in secrets if secret in text)
    row = TABLE.row("Credentials scanned for in logs, Events, status, ConfigMaps, pod specs, S3",
                    figure="places scanned")
    row.record(not leaks, lost=len(leaks), figure=float(len(places)), note=f"found in {leaks}")
    assert not leaks, f"a credential value appears in {leaks}"

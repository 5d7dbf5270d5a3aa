"""End to end, as a user runs it: real kubectl against the local cluster, the operator as its
own process, worker pods running torchrun + DeepSpeed, data and adapter in the local S3."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from botocore.config import Config

from kubetune.cli.demo import (
    DEMO_ACCESS_KEY, DEMO_SECRET_KEY, Kubectl, create_credentials_secret, find_repo_root,
    follow_job, install_crd, local_cluster, running_operator, upload_demo_data,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
REPO = find_repo_root(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    with local_cluster(state) as cluster:
        kubectl = Kubectl(cluster.kubeconfig)
        upload_demo_data(cluster.s3_endpoint)
        install_crd(kubectl, REPO)
        create_credentials_secret(kubectl)
        s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=DEMO_ACCESS_KEY, aws_secret_access_key=DEMO_SECRET_KEY,
                          config=Config(s3={"addressing_style": "path"}))
        with running_operator(cluster, state / "operator.log") as operator:
            yield SimpleNamespace(cluster=cluster, kubectl=kubectl, s3=s3, state=state, operator=operator)


def _manifest(path: Path, **spec_overrides) -> str:
    job = yaml.safe_load(path.read_text())
    for dotted, value in spec_overrides.items():
        node = job
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return yaml.safe_dump(job)


def _pids_of_job(job_name: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"--master-addr={job_name}-worker-0." in cmdline:
                pids.append(int(proc.name))
    return pids


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
    applied = kubectl.run("apply", "-f", str(REPO / "examples" / "quickstart.yaml"))
    assert "finetunejob.kubetune.dev/quickstart created" in applied.stdout

    job = follow_job(kubectl, "quickstart", timeout=1200, echo=False)
    status = job["status"]
    assert status["phase"] == "Succeeded", status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert status["adapter"]["uri"] == "s3://adapters/quickstart/"
    # The trainer's termination message gives the results; the progress ends at the last step.
    assert isinstance(status["results"]["finalLoss"], float) and status["results"]["steps"] == 30, status
    assert status["results"]["tokens"] > 0
    assert (status["progress"]["step"], status["progress"]["totalSteps"]) == (30, 30), status

    table = kubectl.run("get", "ftj", "quickstart").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA"]
    assert table[1].split()[:3] == ["quickstart", "Succeeded", "30/30"]
    assert float(table[1].split()[3]) == round(status["results"]["finalLoss"], 4)

    pods = kubectl.run("get", "pods", "-l", "kubetune.dev/job-name=quickstart").stdout
    assert pods.count("Completed") == 2, pods

    described = kubectl.run("describe", "ftj", "quickstart").stdout
    assert "Events:" in described and "Succeeded" in described

    logs = kubectl.run("logs", "quickstart-worker-0").stdout
    assert "loss" in logs

    # The manifest lists every published file with its sha256, and is written last.
    listing = s3.list_objects_v2(Bucket="adapters", Prefix="quickstart/")["Contents"]
    objects = {o["Key"]: o for o in listing}
    manifest = json.loads(s3.get_object(Bucket="adapters", Key="quickstart/manifest.json")["Body"].read())
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

    # Deleting the job removes every child.
    kubectl.run("delete", "ftj", "quickstart")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [kind for kind in ("pods", "services", "configmaps")
                if kubectl.run("get", kind, "-l", "kubetune.dev/job-name=quickstart", "-o", "name").stdout.strip()]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"children left after delete: {left}"


def test_broken_dataset_fails_the_job_with_the_trainers_line_numbered_error(stack):
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
    assert "train.jsonl line 2: not valid JSON" in status["message"], status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainerError" and "line 2: not valid JSON" in failed["message"]
    described = kubectl.run("describe", "ftj", "broken-data").stdout
    assert "train.jsonl line 2: not valid JSON" in described, described
    # The worker pod itself carries the trainer's message, as on any Kubernetes.
    pod = kubectl.json("get", "pod", "broken-data-worker-0")
    assert "line 2: not valid JSON" in pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]


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

    kubectl.run("delete", "ftj", "again", "--wait=false")
    kubectl.run("apply", "-f", "-", input=manifest)

    deadline = time.monotonic() + 300
    while True:
        job = kubectl.json("get", "ftj", "again")
        pods = kubectl.json("get", "pods", "-l", "kubetune.dev/job-name=again")["items"]
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

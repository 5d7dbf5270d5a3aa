"""`kubectl kubetune` as a user runs it: kubectl finds the plugin on PATH (krew's convention) and
the plugin drives a job on the local cluster through real kubectl, reading what the job keeps
in the cluster's S3 with the job's own Secret (read with the user's kubectl rights).

submit from flags -> logs -f from Validating to the end -> status and logs while it runs ->
wait exits 0 -> status shows Succeeded and the adapter -> logs of both workers after, one rank,
from S3, and once the pods are gone -> plot writes the published PNG -> adapter --download
verifies every sha256 (and catches a tampered file) -> wait on a failing job exits 1 with its
reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from e2e_tools import status_of, wait_for, wait_for_phase

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
BIN = str(Path(sys.executable).parent)
JOB = "plug"
SECRET = ["--credentials-secret", "s3-credentials"]


@pytest.fixture(scope="module")
def kt(stack):
    """`kubectl kubetune ...` in a shell whose PATH has the venv's bin (kubectl and the plugin)
    and whose only cluster setting is KUBECONFIG; S3 credentials only from the job's Secret."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", KUBECONFIG=stack.cluster.kubeconfig,
               AWS_ENDPOINT_URL_S3=stack.cluster.s3_endpoint)  # the host's S3 endpoint, as `local up` prints it

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", "kubetune", *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    run.env = env  # type: ignore[attr-defined]
    return run


def test_kubectl_finds_the_plugin_on_path(kt) -> None:
    listed = subprocess.run(["kubectl", "plugin", "list"], env=kt.env, capture_output=True, text=True)
    assert f"{BIN}/kubectl-kubetune" in listed.stdout, listed
    helped = kt("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: kubectl kubetune"), helped
    for command in ("submit", "status", "logs", "plot", "adapter", "wait"):
        assert f"    {command} " in helped.stdout


def test_a_job_from_submit_to_a_verified_adapter(stack, kt, tmp_path) -> None:
    flags = ["--model", "s3://models/tiny-llama/", "--dataset", "s3://datasets/quickstart/train.jsonl",
             "--format", "text", "--workers", "2", "--output", f"s3://adapters/{JOB}/", "--epochs", "3",
             "--max-steps", "40", "--sequence-length", "128", "--learning-rate", "1e-3", *SECRET,
             "--set", "dataset.validationSplit=0.1"]
    # The API server accepts what the flags build (CRD schema and CEL rules), and stores nothing.
    dry = kt("submit", JOB, *flags, "--dry-run=server", "-o", "json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["spec"]["training"]["maxSteps"] == 40, dry
    assert stack.kubectl.run("get", "ftj", JOB, check=False).returncode != 0

    submitted = kt("submit", JOB, *flags)
    assert submitted.returncode == 0 and f"finetunejob.kubetune.dev/{JOB} created" in submitted.stdout, submitted

    # Follow the logs from the start, noting when each line arrives.
    follower = subprocess.Popen(["kubectl", "kubetune", "logs", JOB, "-f"], env=kt.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    arrived: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: arrived.extend((time.monotonic(), line) for line in follower.stdout),
                              daemon=True)
    reader.start()
    try:
        wait_for_phase(stack.kubectl, JOB, "Running", timeout=300)
        running = kt("status", JOB)
        assert running.returncode == 0 and "  Phase     Running\n" in running.stdout, running.stdout
        assert "  Workers   2 (CPU)   2 active   attempt 1\n" in running.stdout

        def both_workers_while_running() -> list[str] | None:
            phase = status_of(stack.kubectl, JOB).get("phase")
            assert phase == "Running", f"{JOB} is {phase} before both workers logged a line"
            lines = kt("logs", JOB).stdout.splitlines()
            return lines if {line.split(" ")[0] for line in lines} == {"[worker-0]", "[worker-1]"} else None
        wait_for(both_workers_while_running, "lines of both workers in `logs` while the job runs", timeout=300,
                 every=1)

        waited = kt("wait", JOB, "--timeout", "10m", timeout=660)
        finished = time.monotonic()
        assert waited.returncode == 0, waited
        assert waited.stdout == f"finetunejob/{JOB} Succeeded: adapter s3://adapters/{JOB}/\n"
        follower.wait(timeout=60)  # -f ends by itself once the job has ended and the pods' logs are drained
    finally:
        follower.kill()
    reader.join(timeout=10)
    assert follower.returncode == 0, follower.stderr.read()
    prefixes = {line.split("]")[0] + "]" for _, line in arrived}
    assert prefixes == {"[preflight]", "[worker-0]", "[worker-1]"}, prefixes
    assert any("ok dataset:" in line for _, line in arrived if line.startswith("[preflight]"))
    first_worker_line = min(when for when, line in arrived if line.startswith("[worker-"))
    assert first_worker_line < finished, "logs -f printed the workers' lines only after the job ended"
    assert any(line.startswith("[worker-0]") and "done steps=40" in line for _, line in arrived)

    # status: Succeeded, with the losses, the cost and the adapter; -o json for scripts.
    shown = kt("status", JOB)
    print(shown.stdout)
    text = shown.stdout
    assert shown.returncode == 0 and "\033[" not in text  # not a terminal: no colour codes
    assert "  Phase     Succeeded\n" in text and "100%  step 40/40" in text
    assert "  Loss      " in text and "   eval " in text
    assert f"  Adapter   s3://adapters/{JOB}/   manifest sha256 " in text
    assert "worker time" in text and "tokens" in text
    summary = json.loads(kt("status", JOB, "-o", "json").stdout)
    assert (summary["phase"], summary["step"], summary["adapterUri"]) == ("Succeeded", 40, f"s3://adapters/{JOB}/")

    # logs after: both workers, interleaved by time; one rank alone; the copy kept in S3.
    after = kt("logs", JOB).stdout.splitlines()
    assert {line.split("]")[0] for line in after} == {"[worker-0", "[worker-1"}
    assert after.index(next(line for line in after if "done steps=40" in line)) > 0
    rank1 = kt("logs", JOB, "--rank", "1").stdout.splitlines()
    assert rank1 and all(line.startswith("[worker-1] ") for line in rank1)
    kept = kt("logs", JOB, "--from-s3", *SECRET)
    assert kept.returncode == 0, kept
    assert "[worker-1] " in kept.stdout and any("done steps=40" in line for line in kept.stdout.splitlines()
                                                 if line.startswith("[worker-0] "))

    # plot: the published loss.png, checked against the manifest, and a sparkline.
    manifest = json.loads(stack.s3.get_object(Bucket="adapters", Key=f"{JOB}/manifest.json")["Body"].read())
    digests = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    png = tmp_path / "loss.png"
    plotted = kt("plot", JOB, "-o", str(png), *SECRET)
    assert plotted.returncode == 0, plotted
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert hashlib.sha256(png.read_bytes()).hexdigest() == digests["loss.png"]
    assert plotted.stdout.startswith("loss  ") and "(steps 1-40" in plotted.stdout
    assert "eval  " in plotted.stdout

    # adapter --download: every file, every sha256; then how to load and serve it.
    target = tmp_path / "adapter"
    fetched = kt("adapter", JOB, "--download", str(target), *SECRET)
    assert fetched.returncode == 0, fetched
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in target.iterdir()
            if path.name != "manifest.json"} == digests
    assert f'PeftModel.from_pretrained(base, "{target}")' in fetched.stdout
    assert f"vllm serve BASE --enable-lora --lora-modules {JOB}={target} --max-lora-rank 8" in fetched.stdout

    # A file changed in S3 after publishing is caught, and not left where PEFT would load it.
    stack.s3.put_object(Bucket="adapters", Key=f"{JOB}/adapter_config.json", Body=b'{"r": 64}')
    tampered = kt("adapter", JOB, "--download", str(tmp_path / "tampered"), *SECRET)
    assert tampered.returncode == 1
    assert "1 of" in tampered.stderr and "adapter_config.json: sha256 " in tampered.stderr, tampered.stderr
    assert not (tmp_path / "tampered" / "adapter_config.json").exists()

    # Once the pods are gone, logs says so and where the kept logs are.
    stack.kubectl.run("delete", "pods", "-l", f"kubetune.dev/job-name={JOB}", "--wait=true")
    gone = kt("logs", JOB)
    assert gone.returncode == 1
    assert "are gone" in gone.stderr and f"s3://adapters/{JOB}.logs/attempt-1/" in gone.stderr
    assert "--from-s3" in gone.stderr


def test_wait_on_a_failing_job_exits_1_with_its_reason(stack, kt) -> None:
    stack.s3.put_object(Bucket="datasets", Key="plug-broken/train.jsonl",
                        Body=b'{"text": "a fine first line"}\n{"text": "unterminated\n')
    submitted = kt("submit", "plug-bad", "--model", "s3://models/tiny-llama/", "--dataset",
                   "s3://datasets/plug-broken/train.jsonl", "--workers", "2", "--output", "s3://adapters/plug-bad/",
                   *SECRET)
    assert submitted.returncode == 0, submitted
    checked = kt("wait", "plug-bad", "--timeout", "0")  # checks once: still validating
    assert checked.returncode == 2 and "(--timeout)" in checked.stderr, checked
    waited = kt("wait", "plug-bad", "--timeout", "5m", timeout=360)
    assert waited.returncode == 1, waited
    assert waited.stdout.startswith("finetunejob/plug-bad Failed (PreflightFailed): preflight failed: FAIL dataset: "
                                    "s3://datasets/plug-broken/train.jsonl line 2"), waited.stdout
    preflight = kt("logs", "plug-bad")
    assert "[preflight] FAIL dataset: s3://datasets/plug-broken/train.jsonl line 2" in preflight.stdout, preflight
    assert "Failed (PreflightFailed)" in kt("status", "plug-bad").stdout

    missing = kt("wait", "no-such-job", "--timeout", "10s")
    assert missing.returncode == 2 and "no FineTuneJob 'no-such-job'" in missing.stderr

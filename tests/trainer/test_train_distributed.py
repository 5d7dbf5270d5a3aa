"""The recipe end to end: torchrun, 2 CPU processes, DeepSpeed ZeRO-2 and ZeRO-3, real S3 (moto).

Each run trains ~10 steps of LoRA on the tiny model and checks what a user gets: exit 0, a
falling loss, an adapter + manifest in S3 whose digests match, and an adapter that loads
with PEFT and changes the model's output. The ZeRO-3 run also offloads to the CPU, with
gradient checkpointing, and compiles no DeepSpeed op (the trainer image has no compiler).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import yaml

METRIC_NAMES = [
    "kubetune_train_step",
    "kubetune_train_total_steps",
    "kubetune_train_loss",
    "kubetune_train_tokens_per_second",
    "kubetune_train_epoch",
    "kubetune_train_eval_loss",
    "kubetune_train_learning_rate",
    "kubetune_train_grad_norm",
    "kubetune_train_padded_tokens_per_second",
    "kubetune_train_samples_per_second",
    "kubetune_train_checkpoint_upload_seconds",
]


def run_torchrun(config_path: Path, env: dict[str, str], master_port: int, timeout: int = 540,
                 entry: tuple[str, ...] = ("-m", "kubetune.trainer")) -> subprocess.CompletedProcess:
    """torchrun in its own process group, which is killed afterwards whatever happens;
    ``entry`` is what it starts (a module, or a script of the tests)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nnodes=1", "--nproc-per-node=2", f"--master-port={master_port}",
               *entry, "--config", str(config_path)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


class Scraper(threading.Thread):
    """Polls rank 0's /metrics while the job runs and keeps every body it got."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url, self.bodies, self.stop = f"http://127.0.0.1:{port}/metrics", [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.bodies.append(requests.get(self.url, timeout=1).text)
            except requests.RequestException:
                pass


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_training_publishes_an_adapter_that_changes_the_model(
    zero_stage: int, uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str,
    s3_client, tiny_assets: Path, tmp_path: Path, unused_port,
) -> None:
    prefix = f"it-zero{zero_stage}"
    metrics_port = unused_port()
    config = {
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": prefix, "uid": f"uid-{prefix}"},
        "model": {"uri": uploaded_assets["model"]},
        "dataset": {"uri": uploaded_assets["train"], "format": "text", "validationSplit": 0.1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"epochs": 1, "maxSteps": 10, "learningRate": 0.01, "microBatchSize": 4, "globalBatchSize": 16,
                     "sequenceLength": 64, "seed": 7, "logEverySteps": 2, "warmupSteps": 4,
                     "minLearningRate": 0.001},
        "deepspeed": {"zeroStage": zero_stage, "offload": "none"},
        "output": {"adapterUri": f"s3://adapters/{prefix}/"},
        "evaluation": {"atStart": True, "retentionUri": uploaded_assets["retention"]},
        "storage": {"endpoint": moto_endpoint, "region": "us-east-1"},
        "metrics": {"port": metrics_port},
    }
    if zero_stage == 2:  # one background checkpoint upload, timed in /metrics
        try:
            s3_client.create_bucket(Bucket="ckpt")
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass
        config["output"].update(checkpointUri=f"s3://ckpt/{prefix}/", checkpointEverySteps=4)
    else:  # the memory-saving options, through the whole recipe
        config["training"]["gradientCheckpointing"] = True
        config["deepspeed"]["offload"] = "cpu"
        config["deepspeed"]["config"] = {"zero_optimization": {"reduce_bucket_size": 1_000_000}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    termination_log = tmp_path / "termination-log"
    extensions = tmp_path / "torch_extensions"
    env = {**s3_env, "KUBETUNE_WORKDIR": str(workdir), "OMP_NUM_THREADS": "1",
           "KUBETUNE_TERMINATION_LOG": str(termination_log), "TORCH_EXTENSIONS_DIR": str(extensions)}

    scraper = Scraper(metrics_port)
    scraper.start()
    try:
        result = run_torchrun(config_path, env, master_port=unused_port())
    finally:
        scraper.stop.set()
        scraper.join()

    # 1. The job succeeded, and only rank 0 logged progress (every 2 steps), as key=value lines.
    assert result.returncode == 0, result.stdout[-5000:]
    progress = [line for line in result.stdout.splitlines() if "kubetune.trainer: step=" in line]
    fields = [dict(pair.split("=", 1) for pair in line.split("kubetune.trainer: ")[1].split()) for line in progress]
    assert [f["step"] for f in fields] == ["2/10", "4/10", "6/10", "8/10", "10/10"], result.stdout[-3000:]
    assert all("rank=0" in line for line in progress)
    # Nothing was compiled (the trainer image has no compiler), offload to CPU included.
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))
    assert all(float(f["grad_norm"]) > 0 and float(f["samples_per_s"]) > 0 for f in fields), progress
    # Padded batches: every real token is computed, plus some padding.
    assert all(float(f["padded_tokens_per_s"]) >= float(f["tokens_per_s"]) > 0 for f in fields), progress

    # 2. The learning rate warms up linearly over warmupSteps (4), peaks at learningRate, then
    #    decays on a cosine towards minLearningRate.
    lrs = [float(f["lr"]) for f in fields]
    assert lrs[:2] == pytest.approx([0.005, 0.01]), progress
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0.001, progress

    # 3. Rank 0 served /metrics while it ran, with the learning rate of the logged step.
    full = [body for body in scraper.bodies if all(name in body for name in METRIC_NAMES)]
    assert full, scraper.bodies[-1:]
    served = {_value(body, "kubetune_train_learning_rate") for body in full}
    assert any(value == pytest.approx(lr, rel=1e-5) for value in served for lr in lrs), (served, lrs)
    if zero_stage == 2:  # the step-4 checkpoint's upload was timed while training went on
        assert any(_value(body, "kubetune_train_checkpoint_upload_seconds_count") >= 1 for body in full)

    # 4. The manifest lists every uploaded file with its size and sha256; it came last.
    objects = s3_client.list_objects_v2(Bucket="adapters", Prefix=f"{prefix}/")["Contents"]
    manifest = json.loads(s3_client.get_object(Bucket="adapters", Key=f"{prefix}/manifest.json")["Body"].read())
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png"} <= set(listed)
    assert {o["Key"][len(prefix) + 1:] for o in objects} == set(listed) | {"manifest.json"}
    download = tmp_path / "adapter"
    download.mkdir()
    for name, entry in listed.items():
        body = s3_client.get_object(Bucket="adapters", Key=f"{prefix}/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["size"], name
        (download / name).write_bytes(body)
    modified = {o["Key"].rsplit("/", 1)[1]: o["LastModified"] for o in objects}
    assert modified["manifest.json"] == max(modified.values())

    # 5. Training helped: train loss and held-out loss both fell.
    results = manifest["results"]
    assert results["steps"] == 10 and results["worldSize"] == 2
    assert 200 * 2**20 < results["peakMemoryBytes"] < 8 * 2**30, results  # a rank's RSS: torch alone is 200 MB
    assert results["finalLoss"] < results["initialLoss"], results
    assert results["evalLoss"] < results["initialEvalLoss"], results
    # Capitals, digits and hyphens, which the demo never uses: training on it makes them less likely.
    assert results["retentionLossAfter"] > results["retentionLossBefore"] > 0, results
    assert f"retention loss {results['retentionLossBefore']:.4f} before training, " \
           f"{results['retentionLossAfter']:.6f} after" in result.stdout
    assert manifest["baseModel"]["uri"] == uploaded_assets["model"]
    # Where the time went, from the worker's start to the manifest: every phase measured, and
    # the parts add up to the whole.
    timings = results["timeToAdapter"]
    phases = ["startup", "download", "tokenize", "modelLoad", "evaluation", "training", "checkpoints", "publish"]
    assert set(timings) == {"totalSeconds", *(f"{phase}Seconds" for phase in phases), "otherSeconds"}
    # The download may end before the imports that run beside it: then it adds nothing.
    assert all(timings[f"{phase}Seconds"] > 0 for phase in phases if phase not in ("download", "checkpoints")), timings
    assert timings["downloadSeconds"] >= 0, timings
    assert (timings["checkpointsSeconds"] > 0) == (zero_stage == 2), timings
    assert sum(value for key, value in timings.items() if key != "totalSeconds") == pytest.approx(
        timings["totalSeconds"], abs=0.05)
    assert timings["trainingSeconds"] <= results["trainSeconds"]  # the loop, less its evaluations
    assert f"time to adapter {timings['totalSeconds']:.1f}s: startup " in result.stdout
    assert manifest["trainerConfig"]["deepspeed"]["zeroStage"] == zero_stage
    # Rank 0 left the same summary as the pod's termination message (the operator's results).
    summary = json.loads(termination_log.read_text())
    assert summary["outcome"] == "Succeeded" and summary["adapterUri"] == f"s3://adapters/{prefix}/"
    assert (summary["steps"], summary["totalSteps"], summary["finalLoss"]) == (10, 10, results["finalLoss"])
    assert (summary["retentionLossBefore"], summary["retentionLossAfter"]) == (
        results["retentionLossBefore"], results["retentionLossAfter"])
    # ...and which publish is this job's: the digest of manifest.json as it is in S3.
    document = s3_client.get_object(Bucket="adapters", Key=f"{prefix}/manifest.json")["Body"].read()
    assert summary["manifestSha256"] == hashlib.sha256(document).hexdigest()
    assert manifest["job"] == {"namespace": "default", "name": prefix, "uid": f"uid-{prefix}"}

    # 6. The adapter loads onto the base model with PEFT and changes its logits (under ZeRO-3
    #    an adapter saved without gathering would hold empty tensors and fail here).
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(download)
    ids = tokenizer("two plus three is", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama").eval()
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, download).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)

    # 7. The node's scratch downloads were removed.
    assert not (workdir / "kubetune" / f"uid-{prefix}" / "node-0").exists()


@pytest.mark.timeout(600)
def test_a_bad_dataset_fails_the_job_with_the_line_and_field_named(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, tmp_path: Path, unused_port,
) -> None:
    config = {
        "schemaVersion": 1,
        "model": {"uri": uploaded_assets["model"]},
        "dataset": {"uri": uploaded_assets["train"], "format": "text", "textField": "body"},
        "output": {"adapterUri": "s3://adapters/never/"},
        "storage": {"endpoint": moto_endpoint},
        "metrics": {"port": 0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
           "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}

    result = run_torchrun(config_path, env, master_port=unused_port())

    assert result.returncode != 0
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["outcome"] == "Failed" and "line 1: field 'body' is missing" in summary["error"], summary
    assert summary["exitCode"] == 65  # ExitCode.INVALID_DATA: the operator fails the job, no restart
    assert (
        f"kubetune-trainer: error: {uploaded_assets['train']} line 1: field 'body' is missing "
        "(set dataset.textField" in result.stdout
    ), result.stdout[-3000:]


@pytest.mark.timeout(600)
def test_a_hung_rank_ends_the_others_within_the_collective_timeout(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, tmp_path: Path, unused_port,
) -> None:
    # Rank 1 stops answering after step 2; rank 0 waits in the next collective. Without a
    # timeout of its own it would wait torch's default half hour, holding its CPUs or GPUs.
    config = {
        "schemaVersion": 1,
        "model": {"uri": uploaded_assets["model"]},
        "dataset": {"uri": uploaded_assets["train"], "format": "text"},
        "training": {"microBatchSize": 8, "globalBatchSize": 16, "sequenceLength": 64, "maxSteps": 6},
        "output": {"adapterUri": "s3://adapters/hung/"},
        "storage": {"endpoint": moto_endpoint},
        "metrics": {"port": 0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    termination_log = tmp_path / "termination-log"
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
           "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS": "20", "FAULT": "hang", "FAULT_RANK": "1", "FAULT_AFTER_STEP": "2",
           "KUBETUNE_TERMINATION_LOG": str(termination_log)}

    result = run_torchrun(config_path, env, master_port=unused_port(), timeout=400,
                          entry=(str(Path(__file__).with_name("faulty_recipe.py")),))

    assert result.returncode not in (0, None), result.stdout[-3000:]  # ended by itself, did not time out here
    assert "rank 1: fault hang after step 2" in result.stdout and "step=3/6" not in result.stdout
    # The survivor says what happened in one line (its termination message), not a traceback.
    assert ("kubetune-trainer: error: a collective operation found no answer from the other workers within "
            "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS (20s)") in result.stdout, result.stdout[-3000:]
    # A lost peer is worth a restart (exit code 1, not a permanent one), and the hung rank, which
    # torchrun then stops with SIGTERM, leaves the survivor's reason in the termination message.
    summary = json.loads(termination_log.read_text())
    assert summary["exitCode"] == 1 and summary["error"].startswith("a collective operation found no answer"), summary


def _value(body: str, name: str) -> float:
    """The value of the unlabelled series ``name`` in a Prometheus text body."""
    (line,) = [line for line in body.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])

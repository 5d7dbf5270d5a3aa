"""Checkpoints and exact resume: torchrun, 2 CPU processes, DeepSpeed ZeRO, real S3 (moto).

A run whose rank 0 dies hard after step 7 (faulty_recipe.py, a subclass of the recipe) and is then started
again must produce the same per-step losses and eval loss as a run that was never interrupted:
model, optimizer, LR schedule, data position and RNG (LoRA dropout is on) all come back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_train_distributed import run_torchrun


def _config(name: str, moto_endpoint: str, assets: dict[str, str], zero_stage: int, **output) -> dict:
    return {
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": name, "uid": f"uid-{name}"},
        "model": {"uri": assets["model"]},
        "dataset": {"uri": assets["train"], "format": "text", "validationSplit": 0.1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        # 216 training examples / (8 x 2 ranks) = 13 micro-batches per rank = 6 steps per epoch.
        "training": {"epochs": 2, "learningRate": 0.01, "microBatchSize": 8, "globalBatchSize": 32,
                     "sequenceLength": 64, "seed": 3, "logEverySteps": 1,
                     # the LR schedule's position must come back too: warm-up, then cosine
                     "warmupSteps": 3, "minLearningRate": 0.001},
        "deepspeed": {"zeroStage": zero_stage},
        "output": {"adapterUri": f"s3://adapters/{name}/", **output},
        "storage": {"endpoint": moto_endpoint},
        "metrics": {"port": 0},
    }


def _run(config: dict, tmp_path: Path, s3_env: dict[str, str], port: int, die_after_step: int | None = None):
    path = tmp_path / f"{config['output']['adapterUri'].split('/')[-2]}-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    if die_after_step is None:
        return run_torchrun(path, env, master_port=port)
    return run_torchrun(path, {**env, "FAULT": "exit", "FAULT_AFTER_STEP": str(die_after_step)}, master_port=port,
                        entry=(str(Path(__file__).with_name("faulty_recipe.py")),))


def _manifest(s3_client, name: str) -> dict:
    return json.loads(s3_client.get_object(Bucket="adapters", Key=f"{name}/manifest.json")["Body"].read())


def _checkpoint_folders(s3_client, name: str) -> dict[str, set[str]]:
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="ckpt", Prefix=f"{name}/").get("Contents", [])]
    folders: dict[str, set[str]] = {}
    for key in keys:
        folder, _, rest = key[len(name) + 1:].partition("/")
        folders.setdefault(folder, set()).add(rest)
    return folders


@pytest.mark.timeout(900)
# ZeRO-3, the stage that shards the most state; ZeRO-2's exact resume is what
# tests/e2e/test_worker_chaos.py checks on the cluster (the quickstart's stage).
@pytest.mark.parametrize("zero_stage", [3])
def test_a_run_killed_mid_training_resumes_to_the_same_losses(
    zero_stage: int, uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str,
    s3_client, tmp_path: Path, unused_port,
) -> None:
    try:
        s3_client.create_bucket(Bucket="ckpt")
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    straight, resumed = f"straight-z{zero_stage}", f"resumed-z{zero_stage}"

    # 1. The reference: never interrupted (it checkpoints too, like the other one).
    result = _run(_config(straight, moto_endpoint, uploaded_assets, zero_stage,
                          checkpointUri=f"s3://ckpt/{straight}/", checkpointEverySteps=2),
                  tmp_path, s3_env, unused_port())
    assert result.returncode == 0, result.stdout[-5000:]
    reference = _manifest(s3_client, straight)["results"]
    assert [step for step, _ in reference["lossHistory"]] == list(range(1, 13))

    # 2. The same job, rank 0 killed right after step 7: checkpoints 2 and 4 are complete,
    #    6 was still uploading or unmarked. Nothing is published.
    config = _config(resumed, moto_endpoint, uploaded_assets, zero_stage,
                     checkpointUri=f"s3://ckpt/{resumed}/", checkpointEverySteps=2, keepCheckpoints=2)
    killed = _run(config, tmp_path, s3_env, unused_port(), die_after_step=7)
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert "step=7/12" in killed.stdout and "step=8/12" not in killed.stdout
    assert "manifest.json" not in str(s3_client.list_objects_v2(Bucket="adapters", Prefix=f"{resumed}/"))
    assert {"COMPLETE", "rank-0.pt", "rank-1.pt"} <= _checkpoint_folders(s3_client, resumed)["step-4"]
    assert f"tokenized data kept at s3://ckpt/{resumed}/tokenized/" in killed.stdout

    # 3. Started again, it resumes mid-epoch from step 4 and ends where the reference ended.
    again = _run(config, tmp_path, s3_env, unused_port())
    assert again.returncode == 0, again.stdout[-5000:]
    assert f"resuming from checkpoint s3://ckpt/{resumed}/step-4/ (epoch 0, batch 8)" in again.stdout, again.stdout[-5000:]
    assert "step=5/12" in again.stdout and "step=4/12" not in again.stdout
    # The restart skipped tokenisation: the first run kept its examples beside the checkpoints.
    assert f"tokenized data from s3://ckpt/{resumed}/tokenized/" in again.stdout, again.stdout[-5000:]
    results = _manifest(s3_client, resumed)["results"]
    assert results["resumedFromStep"] == 4
    assert [step for step, _ in results["lossHistory"]] == list(range(1, 13))
    for (step, expected), (_, got) in zip(reference["lossHistory"], results["lossHistory"], strict=True):
        assert got == pytest.approx(expected, abs=1e-5), f"step {step}"
    assert results["evalLoss"] == pytest.approx(reference["evalLoss"], abs=1e-5)
    resumed_lrs = _logged_lrs(again.stdout)
    assert sorted(resumed_lrs) == list(range(5, 13))
    assert resumed_lrs == {step: lr for step, lr in _logged_lrs(result.stdout).items() if step >= 5}
    assert [e["evalLoss"] for e in results["evalHistory"]] == pytest.approx(
        [e["evalLoss"] for e in reference["evalHistory"]], abs=1e-5)

    # 4. Only the newest keepCheckpoints (2) complete checkpoints are left.
    folders = _checkpoint_folders(s3_client, resumed)
    assert sorted(folders) == ["step-10", "step-12", "tokenized"], folders
    assert all("COMPLETE" in files for name, files in folders.items() if name.startswith("step-"))

    # 5. A damaged newest checkpoint: the trainer says so, falls back to the one before and
    #    still reproduces the reference losses.
    model_states = min(f for f in folders["step-12"] if f.endswith("model_states.pt"))
    s3_client.put_object(Bucket="ckpt", Key=f"{resumed}/step-12/{model_states}", Body=b"not a checkpoint")
    fallback = _run(config, tmp_path, s3_env, unused_port())
    assert fallback.returncode == 0, fallback.stdout[-5000:]
    assert f"checkpoint s3://ckpt/{resumed}/step-12/ is unreadable" in fallback.stdout, fallback.stdout[-5000:]
    assert "falling back to step-10" in fallback.stdout
    assert _manifest(s3_client, resumed)["results"]["lossHistory"][-1][1] == pytest.approx(
        reference["lossHistory"][-1][1], abs=1e-5)


def _logged_lrs(stdout: str) -> dict[int, str]:
    """{step: lr} from rank 0's progress lines (``step=5/12 ... lr=0.0087 ...``)."""
    found = {}
    for line in stdout.splitlines():
        if "kubetune.trainer: step=" in line:
            fields = dict(pair.split("=", 1) for pair in line.split("kubetune.trainer: ")[1].split())
            found[int(fields["step"].split("/")[0])] = fields["lr"]
    return found

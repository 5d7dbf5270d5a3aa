"""The pod entrypoint's contract: exit codes, one-line errors, DeepSpeed settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.api.trainer_config import parse_config
from kubetune.trainer.errors import TrainerError

BASE = {
    "schemaVersion": 1,
    "model": {"uri": "s3://models/tiny-llama/"},
    "dataset": {"uri": "s3://datasets/quickstart/train.jsonl"},
    "output": {"adapterUri": "s3://adapters/quickstart/"},
}


def config_with(**sections: dict):
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return parse_config(doc)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({**BASE, "training": {"learningrate": 0.1}}, "training.learningrate: unknown field"),
        ({**BASE, "schemaVersion": 2}, "schemaVersion 2 is not the one this trainer reads"),
        (None, "cannot read trainer config"),
    ],
)
def test_config_errors_exit_78_with_one_line_and_no_traceback(tmp_path: Path, content: dict | None, message: str) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(yaml.safe_dump(content))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 78  # ExitCode.INVALID_CONFIG: a restart would read the same file
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetune-trainer: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_flag_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "kubetune.trainer"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--config" in result.stderr


def test_global_batch_must_divide_into_micro_batches_times_world_size() -> None:
    from kubetune.trainer.train import gradient_accumulation_steps

    config = config_with(training={"microBatchSize": 4, "globalBatchSize": 32})
    assert gradient_accumulation_steps(config, 2) == 4
    with pytest.raises(TrainerError, match=r"training.globalBatchSize \(32\) must be a multiple of training.microBatchSize \(4\) x world size \(3\) = 12"):
        gradient_accumulation_steps(config, 3)


def test_deepspeed_config_follows_stage_offload_and_batch_settings() -> None:
    from kubetune.trainer.train import deepspeed_config

    ds = deepspeed_config(config_with(training={"microBatchSize": 2, "globalBatchSize": 16}), 4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # CPU: fp32

    ds3 = deepspeed_config(config_with(deepspeed={"zeroStage": 3, "offload": "cpu"}), 2)
    zero = ds3["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"

    ds1 = deepspeed_config(config_with(deepspeed={"zeroStage": 1, "offload": "cpu"}), 2)
    assert "offload_param" not in ds1["zero_optimization"]  # parameters offload only exists at stage 3


def test_half_precision_on_a_cpu_worker_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kubetune.trainer.train import run

    if torch.cuda.is_available():
        pytest.skip("this worker has a GPU, so bf16 is allowed")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(TrainerError, match="training.precision bf16 needs a GPU"):
        run(config_with(training={"precision": "bf16"}))


@pytest.mark.gpu
def test_gpu_precision_auto_means_bf16() -> None:
    import torch

    from kubetune.trainer.train import deepspeed_config

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert deepspeed_config(config_with(), 1)["bf16"]["enabled"]

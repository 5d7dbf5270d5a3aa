"""Trainer config: checkpoint and quality-gate fields (optional additions to schema 1)."""

from __future__ import annotations

import pytest

from kubetune.trainer.config import parse_config
from kubetune.trainer.errors import TrainerError


def _config(output: dict, **extra) -> dict:
    return {"schemaVersion": 1, "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://datasets/t.jsonl"},
            "output": {"adapterUri": "s3://adapters/a/", **output}, **extra}


def test_checkpoints_are_off_unless_a_uri_is_given() -> None:
    output = parse_config(_config({})).output
    assert (output.checkpoint_uri, output.checkpoint_every_steps, output.keep_checkpoints) == (None, 0, 2)
    output = parse_config(_config({"checkpointUri": "s3://ckpt/a", "checkpointEverySteps": 100})).output
    assert output.checkpoint_uri == "s3://ckpt/a/" and output.checkpoint_every_steps == 100


@pytest.mark.parametrize(
    "output, message",
    [
        ({"checkpointUri": "s3://adapters/a/ckpt/"}, "output: Value error, checkpointUri must not lie inside adapterUri"),
        ({"checkpointUri": "/tmp/ckpt"}, "output.checkpointUri: Value error, must be an s3:// URI"),
        ({"keepCheckpoints": 0}, "output.keepCheckpoints: Input should be greater than or equal to 1"),
    ],
)
def test_bad_checkpoint_settings_name_the_field(output: dict, message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        parse_config(_config(output))


def test_quality_gate_needs_evaluation_data() -> None:
    with pytest.raises(TrainerError, match="qualityGate.maxEvalLoss needs evaluation data: set dataset.validationSplit"):
        parse_config(_config({}, qualityGate={"maxEvalLoss": 2.5}))
    config = _config({}, qualityGate={"maxEvalLoss": 2.5})
    config["dataset"]["validationSplit"] = 0.1
    assert parse_config(config).quality_gate.max_eval_loss == 2.5

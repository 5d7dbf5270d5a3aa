"""Learning-rate schedule values, the deepspeed.config override, and the progress bar switch."""

from __future__ import annotations

import io
import itertools
import math

import pytest
from kubetune.api.trainer_config import parse_config
from kubetune.api.model import InvalidObjectError
from kubetune.trainer.metrics import TrainMetrics, progress_bar
from kubetune.trainer.schedule import deep_merge, lr_lambda, warmup_steps
from kubetune.trainer.train import deepspeed_config
from prometheus_client import generate_latest

PEAK, FLOOR = 1e-3, 1e-4


def _config(**sections) -> dict:
    return {"schemaVersion": 1, "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/t.jsonl"},
            "output": {"adapterUri": "s3://adapters/a/"}, **sections}


def test_warmup_rises_linearly_to_the_peak_at_warmup_steps() -> None:
    factor = lr_lambda(4, 20, PEAK, FLOOR)
    # LambdaLR's step k (0-based) is optimizer step k + 1: the first step already moves.
    assert [PEAK * factor(k) for k in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_cosine_decays_from_the_peak_to_min_learning_rate() -> None:
    factor = lr_lambda(4, 20, PEAK, FLOOR)
    lrs = [PEAK * factor(k) for k in range(4, 21)]
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[8] == pytest.approx(FLOOR + (PEAK - FLOOR) / 2)  # half way: cos(pi/2) = 0
    assert lrs[-1] == pytest.approx(FLOOR)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[4] == pytest.approx(FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * 4 / 16)))


def test_no_warmup_starts_at_the_peak_and_equal_min_keeps_it_constant() -> None:
    assert lr_lambda(0, 10, PEAK, 0.0)(0) == 1.0
    assert [lr_lambda(0, 10, PEAK, PEAK)(k) for k in (0, 5, 9)] == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize(("requested", "total", "expected"), [(None, 30, 3), (None, 5000, 100), (None, 5, 1),
                                                              (0, 30, 0), (50, 30, 30)])
def test_warmup_steps_default_to_ten_percent_capped_at_100(requested, total, expected) -> None:
    assert warmup_steps(requested, total) == expected


def test_deep_merge_merges_objects_and_replaces_everything_else() -> None:
    base = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5}, "bf16": {"enabled": False}, "a": [1]}
    merged = deep_merge(base, {"zero_optimization": {"reduce_bucket_size": 7, "overlap_comm": True}, "a": [2]})
    assert merged == {"zero_optimization": {"stage": 2, "reduce_bucket_size": 7, "overlap_comm": True},
                      "bf16": {"enabled": False}, "a": [2]}
    assert base["zero_optimization"]["reduce_bucket_size"] == 5  # the generated config is not modified


def test_deepspeed_config_override_lands_in_the_engine_config() -> None:
    config = parse_config(_config(
        training={"gradientClipping": 0.5},
        deepspeed={"zeroStage": 3, "config": {"zero_optimization": {"reduce_bucket_size": 1000},
                                              "communication_data_type": "fp32"}},
    ))
    generated = deepspeed_config(config, world_size=2)
    assert generated["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0,
                                              "reduce_bucket_size": 1000}
    assert generated["communication_data_type"] == "fp32"
    assert generated["gradient_clipping"] == 0.5
    assert generated["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(("key", "field"), [("train_batch_size", "training.globalBatchSize"),
                                            ("train_micro_batch_size_per_gpu", "training.microBatchSize"),
                                            ("gradient_accumulation_steps", "training.globalBatchSize"),
                                            ("gradient_clipping", "training.gradientClipping"),
                                            ("scheduler", "training.warmupSteps")])
def test_override_of_a_key_kubetune_owns_is_refused_with_the_field_to_use(key: str, field: str) -> None:
    with pytest.raises(InvalidObjectError) as error:
        parse_config(_config(deepspeed={"config": {key: 1, "zero_optimization": {"stage": 2}}}))
    assert f"deepspeed.config.{key} is set by kubetune: use spec.{field}" in str(error.value)


def test_min_learning_rate_above_the_peak_is_refused() -> None:
    with pytest.raises(InvalidObjectError, match=r"spec.training.minLearningRate must not exceed spec.training.learningRate"):
        parse_config(_config(training={"learningRate": 0.001, "minLearningRate": 0.01}))


def test_new_training_fields_default_to_the_documented_values() -> None:
    training = parse_config(_config()).training
    assert (training.warmup_steps, training.min_learning_rate, training.gradient_checkpointing,
            training.gradient_clipping) == (None, 0.0, False, 1.0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_rank_0_attached_to_a_terminal() -> None:
    piped, terminal = io.StringIO(), _Terminal()
    for bar in (progress_bar(10, 0, enabled=True, stream=piped), progress_bar(10, 0, enabled=False, stream=terminal)):
        bar.update(3)
        bar.close()
    assert piped.getvalue() == "" and terminal.getvalue() == ""
    bar = progress_bar(10, 4, enabled=True, stream=terminal)  # a resumed run starts at its step
    bar.update(1)
    bar.close()
    assert "5/10" in terminal.getvalue()


def test_gpu_memory_is_exported_only_with_a_gpu() -> None:
    assert b"gpu_max_memory" not in generate_latest(TrainMetrics(gpu=False).registry)
    assert b"kubetune_train_gpu_max_memory_allocated_bytes" in generate_latest(TrainMetrics(gpu=True).registry)

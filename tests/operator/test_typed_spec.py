from __future__ import annotations

import pytest
from crd_tools import minimal_spec
from kubetune.operator.spec import InvalidSpecError, check_job_name, parse_spec


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = parse_spec(minimal_spec())
    assert spec.dataset.format == "text"
    assert spec.lora.target_modules == ("q_proj", "v_proj")
    assert spec.training.learning_rate == 2e-4
    assert spec.deepspeed.zero_stage == 2
    assert spec.workers.replicas == 1
    assert spec.workers.world_size == 1
    assert spec.storage.endpoint is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"training": {"sequenceLength": 8}}, "spec.training.sequenceLength"),
        ({"lora": {"dropout": 1.5}}, "spec.lora.dropout"),
        ({"dataset": {"uri": "s3://datasets/a.jsonl", "validationSplit": 0.9}}, "spec.dataset.validationSplit"),
        ({"storage": {"endpoint": "ftp://s3"}}, "spec.storage.endpoint"),
        ({"workers": {"replicas": 65}}, "spec.workers.replicas"),
        ({"training": {"precision": "int8"}}, "spec.training.precision"),
        ({"lora": {"rank": 8}}, "spec.lora.rank"),  # a typo is an error, not silently ignored
    ],
)
def test_invalid_field_is_named_in_the_error(overrides: dict, field: str) -> None:
    with pytest.raises(InvalidSpecError) as raised:
        parse_spec(minimal_spec(**overrides))
    assert str(raised.value).startswith(field + ":")


def test_world_size_counts_gpu_processes() -> None:
    spec = parse_spec(
        minimal_spec(workers={"replicas": 3, "gpusPerWorker": 4}, training={"microBatchSize": 1, "globalBatchSize": 12})
    )
    assert spec.workers.processes_per_worker == 4
    assert spec.workers.world_size == 12


def test_job_name_too_long_for_pod_names() -> None:
    check_job_name("x" * 52)
    with pytest.raises(InvalidSpecError, match="metadata.name .* at most 52"):
        check_job_name("x" * 53)


@pytest.mark.parametrize("key, field", [
    ("train_batch_size", "spec.training.globalBatchSize"),
    ("train_micro_batch_size_per_gpu", "spec.training.microBatchSize"),
    ("gradient_accumulation_steps", "spec.training.globalBatchSize"),
    ("optimizer", "spec.training.learningRate"),
])
def test_deepspeed_override_of_a_key_kubetune_owns_names_the_field_to_use(key: str, field: str) -> None:
    with pytest.raises(InvalidSpecError) as error:
        parse_spec(minimal_spec(deepspeed={"config": {key: 4, "zero_optimization": {"overlap_comm": True}}}))
    assert f"spec.deepspeed.config.{key} is set by kubetune: use {field}" in str(error.value)


def test_deepspeed_override_of_other_keys_is_kept_as_written() -> None:
    override = {"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": True}, "comms_logger": {}}
    assert parse_spec(minimal_spec(deepspeed={"config": override})).deepspeed.config == override


def test_min_learning_rate_above_the_peak_is_refused() -> None:
    with pytest.raises(InvalidSpecError, match=r"spec.training.minLearningRate \(0.01\) must not exceed "
                                                r"spec.training.learningRate \(0.001\)"):
        parse_spec(minimal_spec(training={"learningRate": 0.001, "minLearningRate": 0.01}))

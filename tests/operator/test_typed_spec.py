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

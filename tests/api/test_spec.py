"""FineTuneJob.spec: the documented defaults, errors that name the field and the fix, and each
cross-field rule refusing the same objects as CEL (API server) and in Python (no server)."""

from __future__ import annotations

import pytest
from crd_tools import assert_cel_and_spec_agree, minimal_spec, schema_error_fields

from kubetune.api import InvalidObjectError, check_job_name, parse_spec


def _manifest(name: str = "j", **spec: dict) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": minimal_spec(**spec)}


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = parse_spec(minimal_spec())
    assert spec.dataset.format == "text"
    assert spec.lora.target_modules == ("q_proj", "v_proj")
    assert spec.training.learning_rate == 2e-4
    assert spec.deepspeed.zero_stage == 2
    assert spec.workers.replicas == 1 and spec.workers.world_size == 1
    assert spec.storage.endpoint is None
    output = spec.output
    assert (output.checkpoint_uri, output.checkpoint_every_steps, output.keep_checkpoints) == (None, 0, 2)


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
        ({"qualityGate": {"maxEvalLoss": 0}}, "spec.qualityGate.maxEvalLoss"),
    ],
)
def test_invalid_field_is_named_by_the_schema_and_the_typed_spec(overrides: dict, field: str) -> None:
    assert field in schema_error_fields(_manifest(**overrides)) or field == "spec.lora.rank"
    with pytest.raises(InvalidObjectError) as raised:
        parse_spec(minimal_spec(**overrides))
    assert str(raised.value).startswith(field + ":")


def test_world_size_counts_gpu_processes() -> None:
    spec = parse_spec(
        minimal_spec(workers={"replicas": 3, "gpusPerWorker": 4}, training={"microBatchSize": 1, "globalBatchSize": 12})
    )
    assert spec.workers.processes_per_worker == 4
    assert spec.workers.world_size == 12


def test_folder_uris_are_read_as_folders() -> None:
    spec = parse_spec(minimal_spec(model={"uri": "s3://models/m"}, output={"adapterUri": "s3://adapters/a"}))
    assert (spec.model.uri, spec.output.adapter_uri) == ("s3://models/m/", "s3://adapters/a/")


@pytest.mark.parametrize("name, ok", [
    ("support-bot", True), ("x" * 52, True),
    ("1job", False),  # a Service name must start with a letter
    ("my.job", False), ("Job", False), ("job-", False),
])
def test_job_names_are_dns_1035_labels(name: str, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(name), ok, "metadata.name must be a DNS-1035 label", whole=False)


def test_a_job_name_too_long_for_its_pod_names_is_refused() -> None:
    assert_cel_and_spec_agree(_manifest("x" * 53), False, "metadata.name must be at most 52 characters", whole=False)
    with pytest.raises(InvalidObjectError, match="at most 52 characters"):
        check_job_name("x" * 53)


@pytest.mark.parametrize(
    "dataset, ok, message",
    [
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.parquet"}, True, ""),
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.jsonl", "validationSplit": 0}, True, ""),
        ({"uri": "s3://data/train.jsonl", "validationSplit": 0.1}, True, ""),
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.jsonl", "validationSplit": 0.1}, False,
         "spec.dataset.validationUri and spec.dataset.validationSplit exclude each other"),
        ({"uri": "s3://data/folder/"}, False, "spec.dataset.uri must name a JSONL or Parquet file, not a folder"),
    ],
)
def test_dataset_rules(dataset: dict, ok: bool, message: str) -> None:
    assert_cel_and_spec_agree(_manifest(dataset=dataset), ok, message, whole=False)


@pytest.mark.parametrize("training, ok", [
    ({"learningRate": 0.001, "minLearningRate": 0.0001}, True),
    ({"learningRate": 0.001, "minLearningRate": 0.001}, True),
    ({"learningRate": 0.001, "minLearningRate": 0.01}, False),
])
def test_min_learning_rate_stays_below_the_peak(training: dict, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(training=training), ok,
                              "spec.training.minLearningRate must not exceed spec.training.learningRate", whole=False)


@pytest.mark.parametrize(
    "adapter, checkpoints, ok",
    [
        ("s3://adapters/bot/", "s3://ckpt/bot/", True),
        ("s3://adapters/bot", "s3://adapters/bot-checkpoints/", True),  # a sibling, not inside
        ("s3://adapters/bot/", "s3://adapters/bot/checkpoints/", False),
        ("s3://adapters/bot/", "s3://adapters/bot", False),
        ("s3://adapters/bot/", "s3://adapters/", False),  # would hold the adapter
    ],
)
def test_checkpoints_must_not_overlap_the_adapter(adapter: str, checkpoints: str, ok: bool) -> None:
    manifest = _manifest(output={"adapterUri": adapter, "checkpointUri": checkpoints})
    assert_cel_and_spec_agree(manifest, ok, "spec.output.checkpointUri must not lie inside spec.output.adapterUri",
                              whole=False)


@pytest.mark.parametrize(
    "dataset, ok",
    [
        ({"uri": "s3://datasets/t.jsonl", "validationSplit": 0.1}, True),
        ({"uri": "s3://datasets/t.jsonl", "validationUri": "s3://datasets/v.jsonl"}, True),
        ({"uri": "s3://datasets/t.jsonl"}, False),
    ],
)
def test_quality_gate_needs_evaluation_data(dataset: dict, ok: bool) -> None:
    manifest = _manifest(dataset=dataset, qualityGate={"maxEvalLoss": 2.5})
    assert_cel_and_spec_agree(manifest, ok, (
        "spec.qualityGate.maxEvalLoss needs evaluation data: set spec.dataset.validationSplit above 0 "
        "or spec.dataset.validationUri, or remove the gate."
    ))


@pytest.mark.parametrize(
    "training, workers, ok",
    [
        ({"microBatchSize": 4, "globalBatchSize": 8}, {"replicas": 2}, True),
        ({"microBatchSize": 4, "globalBatchSize": 12}, {"replicas": 2}, False),
        ({"microBatchSize": 2, "globalBatchSize": 32}, {"replicas": 2, "gpusPerWorker": 8}, True),
        ({"microBatchSize": 2, "globalBatchSize": 16}, {"replicas": 2, "gpusPerWorker": 8}, False),
        ({}, {}, True),  # defaults: 8 % (4 * 1 * 1)
    ],
)
def test_global_batch_is_a_multiple_of_micro_batch_times_processes(training: dict, workers: dict, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(training=training, workers=workers), ok,
                              "spec.training.globalBatchSize must be a multiple of spec.training.microBatchSize",
                              whole=False)


@pytest.mark.parametrize("key, field", [
    ("train_batch_size", "spec.training.globalBatchSize"),
    ("train_micro_batch_size_per_gpu", "spec.training.microBatchSize"),
    ("gradient_accumulation_steps", "spec.training.globalBatchSize"),
    ("optimizer", "spec.training.learningRate"),
    ("scheduler", "spec.training.warmupSteps"),
])
def test_deepspeed_override_of_a_key_kubetune_owns_names_the_field_to_use(key: str, field: str) -> None:
    with pytest.raises(InvalidObjectError) as error:
        parse_spec(minimal_spec(deepspeed={"config": {key: 4, "zero_optimization": {"overlap_comm": True}}}))
    assert f"spec.deepspeed.config.{key} is set by kubetune: use {field}" in str(error.value)


def test_deepspeed_override_of_other_keys_is_kept_as_written() -> None:
    override = {"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": True}, "comms_logger": {}}
    assert parse_spec(minimal_spec(deepspeed={"config": override})).deepspeed.config == override

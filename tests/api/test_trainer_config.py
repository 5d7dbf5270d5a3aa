"""The trainer config: what the operator renders, what the trainer reads, and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.api.model import InvalidObjectError
from kubetune.api.trainer_config import SCHEMA_VERSION, load_config, parse_config

MINIMAL = {
    "schemaVersion": 1,
    "model": {"uri": "s3://models/tiny-llama/"},
    "dataset": {"uri": "s3://datasets/quickstart/train.jsonl"},
    "output": {"adapterUri": "s3://adapters/quickstart/"},
}

CONTRACT_EXAMPLE = """
schemaVersion: 1
job: {namespace: default, name: quickstart, uid: "abc"}
model: {uri: "s3://models/tiny-llama/"}
dataset: {uri: "s3://datasets/quickstart/train.jsonl", format: text, textField: text, messagesField: messages,
          promptField: prompt, responseField: response, validationSplit: 0.0}
lora: {r: 8, alpha: 16, dropout: 0.05, targetModules: [q_proj, v_proj]}
training: {epochs: 1, maxSteps: null, learningRate: 0.0002, microBatchSize: 4, globalBatchSize: 8,
           sequenceLength: 512, seed: 42, precision: auto, logEverySteps: 1}
deepspeed: {zeroStage: 2, offload: none}
output: {adapterUri: "s3://adapters/quickstart/"}
storage: {endpoint: "http://s3.kubetune-system.svc.cluster.local:9000", region: us-east-1}
metrics: {port: 9400}
"""


def with_changes(**sections: dict) -> dict:
    doc = {key: dict(value) if isinstance(value, dict) else value for key, value in MINIMAL.items()}
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


def test_contract_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONTRACT_EXAMPLE)
    config = load_config(path)
    assert config.training.micro_batch_size == 4
    assert config.deepspeed.zero_stage == 2
    assert config.storage.endpoint == "http://s3.kubetune-system.svc.cluster.local:9000"
    assert config.lora.target_modules == ("q_proj", "v_proj")


def test_defaults_match_the_contract() -> None:
    config = parse_config(MINIMAL)
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 16, 0.05)
    assert config.training.epochs == 1 and config.training.max_steps is None
    assert (config.training.global_batch_size, config.training.sequence_length) == (8, 512)
    assert config.training.precision == "auto"
    assert (config.deepspeed.zero_stage, config.deepspeed.offload) == (2, "none")
    assert config.dataset.format == "text" and config.dataset.text_field == "text"
    assert config.storage.endpoint is None and config.storage.region == "us-east-1"
    assert config.metrics.port == 9400


def test_resolved_document_round_trips_with_camel_case_keys() -> None:
    document = parse_config(MINIMAL).to_document()
    assert document["training"]["microBatchSize"] == 4
    assert document["output"]["adapterUri"] == "s3://adapters/quickstart/"
    assert parse_config(document) == parse_config(MINIMAL)


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        (with_changes(training={"microBatchSise": 2}), "training.microBatchSise: unknown field"),
        ({**MINIMAL, "extras": {}}, "extras: unknown field"),
        (with_changes(lora={"rank": 4}), "lora.rank: unknown field"),
    ],
)
def test_unknown_key_is_an_error_naming_it(doc: dict, named: str) -> None:
    with pytest.raises(InvalidObjectError, match=named.replace(".", r"\.")):
        parse_config(doc)


@pytest.mark.parametrize("version", [0, 2])
def test_unsupported_schema_version_is_rejected(version: object) -> None:
    doc = {**MINIMAL, "schemaVersion": version}
    with pytest.raises(InvalidObjectError, match=f"schemaVersion {version} is not the one this trainer reads "
                                                 rf"\({SCHEMA_VERSION}\); run an operator and a trainer image"):
        parse_config(doc)


def test_a_missing_schema_version_is_named() -> None:
    with pytest.raises(InvalidObjectError, match="schemaVersion: required field is missing"):
        parse_config({k: v for k, v in MINIMAL.items() if k != "schemaVersion"})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({k: v for k, v in MINIMAL.items() if k != "output"}, "output: required field is missing"),
        (with_changes(model={"uri": "/data/model"}), "model.uri: String should match pattern '\\^s3://"),
        (with_changes(dataset={"uri": "s3://datasets/quickstart/"}), "spec.dataset.uri must name a JSONL or Parquet file, not a folder"),
        (with_changes(deepspeed={"zeroStage": 4}), "deepspeed.zeroStage"),
        (with_changes(dataset={"format": "csv"}), "dataset.format"),
        (with_changes(training={"sequenceLength": 8}), "training.sequenceLength"),
        (with_changes(storage={"endpoint": "minio:9000"}), "storage.endpoint: String should match pattern '\\^https"),
    ],
)
def test_invalid_values_name_the_field(doc: dict, message: str) -> None:
    with pytest.raises(InvalidObjectError, match=message):
        parse_config(doc)


def test_folder_uris_get_a_trailing_slash() -> None:
    config = parse_config(with_changes(model={"uri": "s3://models/tiny-llama"}))
    assert config.model.uri == "s3://models/tiny-llama/"


def test_missing_or_broken_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(InvalidObjectError, match="cannot read trainer config .*--config"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("schemaVersion: [1\n")
    with pytest.raises(InvalidObjectError, match="neither JSON nor valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(InvalidObjectError, match="expected a mapping"):
        load_config(listing)


def test_checkpoints_are_off_unless_a_uri_is_given() -> None:
    output = parse_config(MINIMAL).output
    assert (output.checkpoint_uri, output.checkpoint_every_steps, output.keep_checkpoints) == (None, 0, 2)
    output = parse_config(with_changes(output={"checkpointUri": "s3://ckpt/a", "checkpointEverySteps": 100})).output
    assert output.checkpoint_uri == "s3://ckpt/a/" and output.checkpoint_every_steps == 100


@pytest.mark.parametrize(
    "output, message",
    [
        ({"checkpointUri": "s3://adapters/quickstart/ckpt/"}, "spec.output.checkpointUri must not lie inside"),
        ({"checkpointUri": "/tmp/ckpt"}, "output.checkpointUri: String should match pattern"),
        ({"keepCheckpoints": 0}, "output.keepCheckpoints: Input should be greater than or equal to 1"),
    ],
)
def test_bad_checkpoint_settings_name_the_field(output: dict, message: str) -> None:
    with pytest.raises(InvalidObjectError, match=message):
        parse_config(with_changes(output=output))


def test_quality_gate_needs_evaluation_data() -> None:
    with pytest.raises(InvalidObjectError, match="spec.qualityGate.maxEvalLoss needs evaluation data"):
        parse_config({**MINIMAL, "qualityGate": {"maxEvalLoss": 2.5}})
    config = {**with_changes(dataset={"validationSplit": 0.1}), "qualityGate": {"maxEvalLoss": 2.5}}
    assert parse_config(config).quality_gate.max_eval_loss == 2.5


def test_the_retention_gate_needs_retention_data() -> None:
    with pytest.raises(InvalidObjectError, match="spec.qualityGate.maxRetentionLossIncrease needs retention data: "
                                                 "set spec.evaluation.retentionUri"):
        parse_config({**MINIMAL, "qualityGate": {"maxRetentionLossIncrease": 0.1}})
    config = {**MINIMAL, "qualityGate": {"maxRetentionLossIncrease": 0.1},
              "evaluation": {"retentionUri": "s3://datasets/general.jsonl"}}
    parsed = parse_config(config)
    assert (parsed.quality_gate.max_retention_loss_increase, parsed.evaluation.retention_uri) == (
        0.1, "s3://datasets/general.jsonl")

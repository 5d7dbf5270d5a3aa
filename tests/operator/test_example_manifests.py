"""Shipped examples against the CRD: the quickstart is accepted, each bad example is rejected
by the structural schema (not only by CEL, which a server may not evaluate) naming its field."""

from __future__ import annotations

import pytest
from crd_tools import EXAMPLES, cel_failures, load_manifest, minimal_spec, schema_error_fields
from kubetune.operator.spec import InvalidSpecError, parse_spec

BAD = {
    "replicas-zero.yaml": "spec.workers.replicas",
    "zero-stage-5.yaml": "spec.deepspeed.zeroStage",
    "no-dataset-uri.yaml": "spec.dataset.uri",
    "not-s3-uri.yaml": "spec.model.uri",
}


def test_every_bad_example_has_an_expectation() -> None:
    assert sorted(path.name for path in (EXAMPLES / "bad").glob("*.yaml")) == sorted(BAD)


def test_quickstart_is_valid_against_schema_cel_and_typed_spec() -> None:
    manifest = load_manifest(EXAMPLES / "quickstart.yaml")
    assert schema_error_fields(manifest) == {}
    assert cel_failures(manifest) == []
    spec = parse_spec(manifest["spec"])
    assert spec.workers.replicas == 2
    assert spec.training.global_batch_size == 8
    assert spec.storage.credentials_secret == "s3-credentials"


@pytest.mark.parametrize("filename, field", sorted(BAD.items()))
def test_bad_example_is_rejected_by_schema_naming_the_field(filename: str, field: str) -> None:
    manifest = load_manifest(EXAMPLES / "bad" / filename)
    assert list(schema_error_fields(manifest)) == [field]


@pytest.mark.parametrize("filename, field", sorted(BAD.items()))
def test_operator_also_rejects_bad_example_naming_the_field(filename: str, field: str) -> None:
    # What the operator reports if a server without schema validation let the job through.
    with pytest.raises(InvalidSpecError, match=field.replace(".", r"\.")):
        parse_spec(load_manifest(EXAMPLES / "bad" / filename)["spec"])


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
def test_batch_size_rule_agrees_between_cel_and_operator(training: dict, workers: dict, ok: bool) -> None:
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j"},
        "spec": minimal_spec(training=training, workers=workers),
    }
    failures = cel_failures(manifest)
    assert (failures == []) is ok
    if not ok:
        assert "spec.training.globalBatchSize" in failures[0]
        with pytest.raises(InvalidSpecError, match=r"globalBatchSize .* multiple of .*microBatchSize"):
            parse_spec(manifest["spec"])
    else:
        parse_spec(manifest["spec"])


def test_long_job_name_is_rejected_by_cel() -> None:
    manifest = {"metadata": {"name": "x" * 53}, "spec": minimal_spec()}
    assert any("metadata.name" in failure for failure in cel_failures(manifest))

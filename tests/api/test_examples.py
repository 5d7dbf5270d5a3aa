"""Shipped examples against the CRD: the quickstart is accepted, each bad example is rejected
by the structural schema (not only by CEL, which a server may not evaluate) naming its field."""

from __future__ import annotations

import pytest
from crd_tools import EXAMPLES, cel_failures, load_manifest, schema_error_fields

from kubetune.api import InvalidObjectError, parse_spec

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
    with pytest.raises(InvalidObjectError, match=field.replace(".", r"\.")):
        parse_spec(load_manifest(EXAMPLES / "bad" / filename)["spec"])

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


GOOD = sorted(path.name for path in EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("filename", GOOD)
def test_every_example_is_valid_against_schema_cel_and_typed_spec(filename: str) -> None:
    manifest = load_manifest(EXAMPLES / filename)
    assert schema_error_fields(manifest) == {}
    assert cel_failures(manifest) == []
    parse_spec(manifest["spec"])


def test_gpu_scheduling_example_sets_the_pod_shape_and_scheduling_knobs() -> None:
    manifest = load_manifest(EXAMPLES / "gpu-scheduling.yaml")
    spec = parse_spec(manifest["spec"])
    assert spec.workers.world_size == 16 and spec.training.global_batch_size == 64
    assert spec.storage.credentials_secret is None and spec.workers.service_account_name == "kubetune-trainer"
    assert spec.workers.shm_size == "16Gi" and spec.workers.image_pull_secrets == ("registry-credentials",)
    assert spec.scheduling.queue_name == manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert spec.scheduling.tolerations and spec.scheduling.affinity and spec.scheduling.affinity.node_affinity


@pytest.mark.parametrize("filename, field", sorted(BAD.items()))
def test_bad_example_is_rejected_by_schema_naming_the_field(filename: str, field: str) -> None:
    manifest = load_manifest(EXAMPLES / "bad" / filename)
    assert list(schema_error_fields(manifest)) == [field]


@pytest.mark.parametrize("filename, field", sorted(BAD.items()))
def test_operator_also_rejects_bad_example_naming_the_field(filename: str, field: str) -> None:
    # What the operator reports if a server without schema validation let the job through.
    with pytest.raises(InvalidObjectError, match=field.replace(".", r"\.")):
        parse_spec(load_manifest(EXAMPLES / "bad" / filename)["spec"])

"""spec.dataset validationUri / overlong and spec.training.packing: CRD, typed spec and the
rendered trainer config agree."""

from __future__ import annotations

import pytest
import yaml
from crd_tools import assert_cel_and_spec_agree, minimal_spec, schema_error_fields
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.spec import parse_spec
from kubetune.operator.trainer_config import JobRef, build_trainer_config, render_trainer_config

JOB = JobRef(name="j", namespace="default", uid="u-1")


def _manifest(**spec: dict) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
            "spec": minimal_spec(**spec)}


@pytest.mark.parametrize(
    "dataset, ok",
    [
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.parquet"}, True),
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.jsonl", "validationSplit": 0}, True),
        ({"uri": "s3://data/train.jsonl", "validationSplit": 0.1}, True),
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.jsonl", "validationSplit": 0.1}, False),
    ],
)
def test_validation_uri_and_split_exclude_each_other(dataset: dict, ok: bool) -> None:
    manifest = _manifest(dataset=dataset)
    assert_cel_and_spec_agree(manifest, ok, (
        "spec.dataset.validationUri and spec.dataset.validationSplit exclude each other: validationUri "
        "is evaluated whole, so set validationSplit to 0 (or remove validationUri)."
    ))


def test_bad_values_are_refused_by_the_schema() -> None:
    bad = _manifest(dataset={"uri": "s3://data/t.jsonl", "validationUri": "https://x/v.jsonl", "overlong": "wrap"},
                    training={"packing": "yes"})
    assert {"spec.dataset.validationUri", "spec.dataset.overlong", "spec.training.packing"} <= set(
        schema_error_fields(bad))


def test_new_fields_are_rendered_only_when_set() -> None:
    # An older schema-1 trainer rejects unknown keys: a job that does not use them must not send them.
    plain = build_trainer_config(JOB, parse_spec(minimal_spec()), OperatorSettings())
    assert not {"validationUri", "overlong"} & set(plain["dataset"]) and "packing" not in plain["training"]
    spec = parse_spec(minimal_spec(
        dataset={"uri": "s3://data/t.jsonl", "validationUri": "s3://data/v.jsonl", "overlong": "drop"},
        training={"packing": True},
    ))
    config = build_trainer_config(JOB, spec, OperatorSettings())
    assert config["dataset"]["validationUri"] == "s3://data/v.jsonl" and config["dataset"]["overlong"] == "drop"
    assert config["training"]["packing"] is True


def test_rendered_dataset_fields_reach_the_trainer() -> None:
    from kubetune.trainer.config import parse_config

    spec = parse_spec(minimal_spec(
        dataset={"uri": "s3://data/t.parquet", "format": "chat", "validationUri": "s3://data/v.parquet", "overlong": "drop"},
        training={"packing": True, "sequenceLength": 1024},
    ))
    parsed = parse_config(yaml.safe_load(render_trainer_config(JOB, spec, OperatorSettings())))
    assert parsed.dataset.validation_uri == "s3://data/v.parquet" and parsed.dataset.overlong == "drop"
    assert parsed.training.packing is True

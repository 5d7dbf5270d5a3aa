"""spec.output checkpoint fields: the CRD's CEL rule and the operator's typed spec agree."""

from __future__ import annotations

import pytest
from crd_tools import assert_cel_and_spec_agree, minimal_spec, schema_error_fields
from kubetune.operator.spec import InvalidSpecError, parse_spec


def _manifest(output: dict) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
            "spec": minimal_spec(output=output)}


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
    manifest = _manifest({"adapterUri": adapter, "checkpointUri": checkpoints})
    assert_cel_and_spec_agree(manifest, ok, "spec.output.checkpointUri must not lie inside spec.output.adapterUri",
                              whole=False)


def test_checkpoint_defaults_and_bounds() -> None:
    output = parse_spec(minimal_spec()).output
    assert (output.checkpoint_uri, output.checkpoint_every_steps, output.keep_checkpoints) == (None, 0, 2)
    bad = _manifest({"adapterUri": "s3://adapters/a/", "checkpointUri": "ckpt/a", "keepCheckpoints": 0})
    assert {"spec.output.checkpointUri", "spec.output.keepCheckpoints"} <= set(schema_error_fields(bad))


def test_quality_gate_must_be_positive() -> None:
    manifest = _manifest({"adapterUri": "s3://adapters/a/"})
    manifest["spec"]["qualityGate"] = {"maxEvalLoss": 0}
    assert "spec.qualityGate.maxEvalLoss" in schema_error_fields(manifest)
    with pytest.raises(InvalidSpecError, match=r"spec\.qualityGate\.maxEvalLoss"):
        parse_spec(manifest["spec"])


@pytest.mark.parametrize(
    "dataset, ok",
    [
        ({"uri": "s3://datasets/t.jsonl", "validationSplit": 0.1}, True),
        ({"uri": "s3://datasets/t.jsonl", "validationUri": "s3://datasets/v.jsonl"}, True),
        ({"uri": "s3://datasets/t.jsonl"}, False),
    ],
)
def test_quality_gate_needs_evaluation_data(dataset: dict, ok: bool) -> None:
    manifest = _manifest({"adapterUri": "s3://adapters/a/"})
    manifest["spec"].update(dataset=dataset, qualityGate={"maxEvalLoss": 2.5})
    assert_cel_and_spec_agree(manifest, ok, (
        "spec.qualityGate.maxEvalLoss needs evaluation data: set spec.dataset.validationSplit above 0 "
        "or spec.dataset.validationUri, or remove the gate."
    ))

"""Structural schema semantics of the embedded API server: what a user sees when a custom object
is pruned, defaulted or refused, with Kubernetes' own error texts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.localcluster.apiserver.schema import (
    CEL_SKIPPED_DETAIL,
    FieldError,
    apply_defaults,
    check_structural,
    go_float,
    prune_unknown,
    validate,
)

REPO = Path(__file__).resolve().parents[2]

SPEC_SCHEMA = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["dataset"],
            "properties": {
                "workers": {"type": "object", "properties": {
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
                    "image": {"type": "string", "default": "trainer:latest"}}},
                "deepspeed": {"type": "object", "properties": {
                    "zeroStage": {"type": "integer", "enum": [1, 2, 3], "default": 2}}},
                "dataset": {"type": "object", "required": ["uri"], "properties": {
                    "uri": {"type": "string"},
                    "format": {"type": "string", "enum": ["text", "chat"], "default": "text"}}},
                "model": {"type": "object", "properties": {
                    "uri": {"type": "string", "pattern": "^s3://[a-z0-9.-]+(/.*)?$", "maxLength": 20,
                            "minLength": 6}}},
                "lora": {"type": "object", "properties": {
                    "targetModules": {"type": "array", "minItems": 1, "maxItems": 2, "uniqueItems": True,
                                      "items": {"type": "string", "minLength": 1}},
                    "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": True, "maximum": 0.5}}},
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "startAfter": {"type": "string", "format": "date-time"},
                "labels": {"type": "object", "maxProperties": 1, "additionalProperties": {"type": "string"}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                          "properties": {"known": {"type": "object", "properties": {"a": {"type": "string"}}}}},
                "template": {"type": "object", "x-kubernetes-embedded-resource": True,
                             "properties": {"spec": {"type": "object", "properties": {"x": {"type": "string"}}}}},
            },
        },
    },
}


def job(**spec: object) -> dict:
    body = {"dataset": {"uri": "s3://data/train.jsonl"}}
    body.update(spec)
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "job1", "namespace": "default"}, "spec": body}


def messages(obj: dict, old: dict | None = None, schema: dict = SPEC_SCHEMA) -> list[str]:
    return [error.message for error in validate(schema, obj, old)]


# --- FieldError.message ------------------------------------------------------------------------

@pytest.mark.parametrize("error, text", [
    (FieldError("spec.workers.replicas", "FieldValueInvalid", 0,
                "spec.workers.replicas in body should be greater than or equal to 1"),
     "spec.workers.replicas: Invalid value: 0: spec.workers.replicas in body should be greater than or equal to 1"),
    (FieldError("spec.deepspeed.zeroStage", "FieldValueNotSupported", 5, 'supported values: "1", "2", "3"'),
     'spec.deepspeed.zeroStage: Unsupported value: 5: supported values: "1", "2", "3"'),
    (FieldError("spec.dataset.uri", "FieldValueRequired", "", ""), "spec.dataset.uri: Required value"),
    (FieldError("spec", "FieldValueForbidden", "", "may not be set"), "spec: Forbidden: may not be set"),
    (FieldError("spec.x", "FieldValueTooLong", "long", "may not be more than 3 bytes"),
     "spec.x: Too long: may not be more than 3 bytes"),
    (FieldError("spec.x", "FieldValueInvalid", 0.25, "d"), "spec.x: Invalid value: 0.25: d"),
    (FieldError("spec.x", "FieldValueInvalid", True, "d"), "spec.x: Invalid value: true: d"),
    (FieldError("spec.x", "FieldValueInvalid", {"a": 1}, "d"), 'spec.x: Invalid value: {"a":1}: d'),
    (FieldError("", "FieldValueInvalid", None, "d"), "<nil>: Invalid value: null: d"),
])
def test_field_error_message_matches_kubernetes_text(error: FieldError, text: str) -> None:
    assert error.message == text
    assert error.reason == error.type


@pytest.mark.parametrize("value, text", [
    (1.0, "1"), (0.5, "0.5"), (2e-4, "0.0002"), (1e-5, "1e-05"), (123456.0, "123456"),
    (1e6, "1e+06"), (-3.25, "-3.25"),
])
def test_floats_print_like_go(value: float, text: str) -> None:
    assert go_float(value) == text


# --- validate: one rule per row ----------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ({"workers": {"replicas": 0}},
     ["spec.workers.replicas: Invalid value: 0: spec.workers.replicas in body should be greater than or equal to 1"]),
    ({"workers": {"replicas": 65}},
     ["spec.workers.replicas: Invalid value: 65: spec.workers.replicas in body should be less than or equal to 64"]),
    ({"workers": {"replicas": "string"}},
     ['spec.workers.replicas: Invalid value: "string": spec.workers.replicas in body must be of type integer: "string"']),
    ({"workers": {"replicas": 2.5}},
     ['spec.workers.replicas: Invalid value: "number": spec.workers.replicas in body must be of type integer: "number"']),
    ({"deepspeed": {"zeroStage": 5}},
     ['spec.deepspeed.zeroStage: Unsupported value: 5: supported values: "1", "2", "3"']),
    ({"dataset": {"uri": "s3://d", "format": "csv"}},
     ['spec.dataset.format: Unsupported value: "csv": supported values: "text", "chat"']),
    ({"dataset": {}}, ["spec.dataset.uri: Required value"]),
    ({"model": {"uri": "http://x/a"}},
     ['spec.model.uri: Invalid value: "http://x/a": spec.model.uri in body should match \'^s3://[a-z0-9.-]+(/.*)?$\'']),
    ({"model": {"uri": "s3://bucket/very/long/path"}}, ["spec.model.uri: Too long: may not be more than 20 bytes"]),
    ({"model": {"uri": "s3://"}},
     ['spec.model.uri: Invalid value: "s3://": spec.model.uri in body should be at least 6 chars long',
      'spec.model.uri: Invalid value: "s3://": spec.model.uri in body should match \'^s3://[a-z0-9.-]+(/.*)?$\'']),
    ({"lora": {"targetModules": []}},
     ["spec.lora.targetModules: Invalid value: 0: spec.lora.targetModules in body should have at least 1 items"]),
    ({"lora": {"targetModules": ["a", "b", "c"]}}, ["spec.lora.targetModules: Too many: 3: must have at most 2 items"]),
    ({"lora": {"targetModules": ["q", "q"]}},
     ['spec.lora.targetModules: Invalid value: "": spec.lora.targetModules in body shouldn\'t contain duplicates']),
    ({"lora": {"targetModules": ["q", ""]}},
     ['spec.lora.targetModules[1]: Invalid value: "": spec.lora.targetModules[1] in body should be at least 1 chars long']),
    ({"lora": {"targetModules": ["q", 7]}},
     ['spec.lora.targetModules[1]: Invalid value: "integer": spec.lora.targetModules[1] in body must be of type string: "integer"']),
    ({"lora": {"dropout": 0.5}}, ["spec.lora.dropout: Invalid value: 0.5: spec.lora.dropout in body should be less than 0.5"]),
    ({"lora": {"dropout": -0.1}},
     ["spec.lora.dropout: Invalid value: -0.1: spec.lora.dropout in body should be greater than or equal to 0"]),
    # an integer is a valid number, but kube-openapi truncates the bound to int64 for it (0.5 -> 0)
    ({"lora": {"dropout": 0}}, ["spec.lora.dropout: Invalid value: 0: spec.lora.dropout in body should be less than 0"]),
    ({"port": True}, ['spec.port: Invalid value: "boolean": spec.port in body must be of type integer,string: "boolean"']),
    ({"startAfter": "yesterday"},
     ['spec.startAfter: Invalid value: "yesterday": spec.startAfter in body must be of type date-time: "yesterday"']),
    ({"labels": {"a": "1", "b": "2"}}, ["spec.labels: Too many: 2: must have at most 1 item"]),
    ({"labels": {"a": 1}}, ['spec.labels.a: Invalid value: "integer": spec.labels.a in body must be of type string: "integer"']),
    ({"workers": {"image": None}},
     ['spec.workers.image: Invalid value: "null": spec.workers.image in body must be of type string: "null"']),
])
def test_validate_reports_each_schema_rule_like_kube_apiserver(spec: dict, expected: list[str]) -> None:
    found = messages(job(**spec))
    blocking_note = "<nil>: Invalid value: null: " + CEL_SKIPPED_DETAIL
    assert [m for m in found if m != blocking_note] == expected


@pytest.mark.parametrize("spec", [
    {"workers": {"replicas": 1}},
    {"workers": {"replicas": 2.0}},          # integral floats are integers (kube-openapi isFloatInt)
    {"lora": {"dropout": 0.25}},
    {"port": 8080}, {"port": "http"},        # int-or-string
    {"note": None},                          # nullable
    {"startAfter": "2026-11-25T13:00:00Z"}, {"startAfter": "2026-11-25T13:00:00.123456+00:00"},
    {"lora": {"targetModules": ["q_proj", "v_proj"]}},
])
def test_validate_accepts_valid_values(spec: dict) -> None:
    assert messages(job(**spec)) == []


def test_validate_collects_all_errors_in_field_order() -> None:
    obj = job(workers={"replicas": 0}, deepspeed={"zeroStage": 9}, dataset={})
    assert messages(obj) == [
        "spec.workers.replicas: Invalid value: 0: spec.workers.replicas in body should be greater than or equal to 1",
        'spec.deepspeed.zeroStage: Unsupported value: 9: supported values: "1", "2", "3"',
        "spec.dataset.uri: Required value",
        "<nil>: Invalid value: null: " + CEL_SKIPPED_DETAIL,
    ]


def test_missing_spec_is_required_at_the_root() -> None:
    obj = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "a"}}
    assert messages(obj)[0] == "spec: Required value"
    assert validate(SPEC_SCHEMA, obj)[0].type == "FieldValueRequired"


# --- pruning -----------------------------------------------------------------------------------

def test_prune_drops_unknown_fields_and_reports_their_paths() -> None:
    obj = job(bogus=1, workers={"replicas": 2, "typo": True}, lora={"targetModules": ["q"]},
              extra={"anything": {"goes": 1}, "known": {"a": "x", "b": "pruned"}},
              template={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": "1", "y": 2}})
    obj["status"] = {"phase": "Running"}
    pruned, unknown = prune_unknown(SPEC_SCHEMA, obj)
    assert unknown == ["spec.bogus", "spec.extra.known.b", "spec.template.spec.y", "spec.workers.typo", "status"]
    assert pruned["apiVersion"] == "kubetune.dev/v1alpha1" and pruned["metadata"] == {"name": "job1", "namespace": "default"}
    assert pruned["spec"]["extra"] == {"anything": {"goes": 1}, "known": {"a": "x"}}
    assert pruned["spec"]["template"] == {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": "1"}}
    assert "typo" in obj["spec"]["workers"], "the input must not be modified"


def test_prune_keeps_map_values_and_list_items() -> None:
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "selector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "items": {"type": "object", "properties": {"key": {"type": "string"}}}}}}}}
    obj = {"spec": {"selector": {"gpu": "a100"}, "tolerations": [{"key": "k", "effect": "NoSchedule"}]}}
    pruned, unknown = prune_unknown(schema, obj)
    assert pruned == {"spec": {"selector": {"gpu": "a100"}, "tolerations": [{"key": "k"}]}}
    assert unknown == ["spec.tolerations[0].effect"]


# --- defaulting --------------------------------------------------------------------------------

def test_defaults_fill_absent_fields_only_inside_existing_objects() -> None:
    obj = job(workers={})
    defaulted = apply_defaults(SPEC_SCHEMA, obj)
    assert defaulted["spec"]["workers"] == {"replicas": 1, "image": "trainer:latest"}
    assert defaulted["spec"]["dataset"] == {"uri": "s3://data/train.jsonl", "format": "text"}
    assert "deepspeed" not in defaulted["spec"], "no default materialises a missing parent object"
    assert obj["spec"]["workers"] == {}, "the input must not be modified"


def test_defaults_keep_given_values_and_replace_non_nullable_nulls() -> None:
    defaulted = apply_defaults(SPEC_SCHEMA, job(workers={"replicas": 4, "image": None}, note=None,
                                                 model={"uri": None}))
    assert defaulted["spec"]["workers"] == {"replicas": 4, "image": "trainer:latest"}
    assert defaulted["spec"]["note"] is None, "nullable fields keep their null"
    assert defaulted["spec"]["model"] == {}, "a non-nullable null without default is dropped"


# --- check_structural --------------------------------------------------------------------------

@pytest.mark.parametrize("schema, expected", [
    ({"type": "object", "properties": {"spec": {"properties": {}}}},
     ["properties[spec].type: Required value: must not be empty for specified object fields"]),
    ({"properties": {}}, ["type: Required value: must not be empty at the root"]),
    ({"type": "object", "properties": {"a": {"type": "array"}}},
     ["properties[a].items: Required value: must be specified"]),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {}}}},
     ["properties[a].items.type: Required value: must not be empty for specified array items"]),
    ({"type": "object", "additionalProperties": {"type": "string"}},
     ["additionalProperties: Forbidden: must not be used at the root"]),
    ({"type": "string"}, ['type: Invalid value: "string": must be object at the root']),
    ({"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"type": "string"}]}}},
     ["properties[a].anyOf[0].type: Forbidden: must be empty to be structural"]),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}},
     ['properties[a].pattern: Invalid value: "(": must be a valid regular expression, but isn\'t: '
      "missing ), unterminated subpattern at position 4"]),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "default": 0}}},
     ["properties[a].default: Invalid value: 0:  in body should be greater than or equal to 1"]),
    ({"type": "object", "properties": {"a": {"type": "object", "default": {"b": "1"},
                                             "properties": {"b": {"type": "integer"}}}}},
     ['properties[a].default.b: Invalid value: "string": b in body must be of type integer: "string"']),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": ["x"], "default": "y"}}},
     ['properties[a].default: Unsupported value: "y": supported values: "x"']),
    ({"type": "object", "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}}},
     ["properties[metadata]: Forbidden: must not specify anything other than name and generateName, "
      "but metadata is implicitly specified"]),
])
def test_check_structural_names_the_violation(schema: dict, expected: list[str]) -> None:
    assert check_structural(schema) == expected


def test_check_structural_accepts_int_or_string_idiom_and_prefixes_root() -> None:
    schema = {"type": "object", "properties": {"q": {"x-kubernetes-int-or-string": True,
                                                     "anyOf": [{"type": "integer"}, {"type": "string"}]}}}
    assert check_structural(schema) == []
    assert check_structural({"type": "object", "properties": {"s": {}}}, root="spec.versions[0].schema.openAPIV3Schema") == [
        "spec.versions[0].schema.openAPIV3Schema.properties[s].type: Required value: "
        "must not be empty for specified object fields"]


# --- the real FineTuneJob CRD and its examples -------------------------------------------------

def _finetunejob_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds" / "finetunejob.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _admit(schema: dict, obj: dict) -> list[str]:
    pruned, _ = prune_unknown(schema, obj)
    return [error.message for error in validate(schema, apply_defaults(schema, pruned))]


def test_finetunejob_crd_is_structural_and_accepts_quickstart() -> None:
    schema = _finetunejob_schema()
    assert check_structural(schema) == []
    assert _admit(schema, yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())) == []


@pytest.mark.parametrize("example, first_error", [
    ("replicas-zero.yaml", "spec.workers.replicas: Invalid value: 0: spec.workers.replicas in body should be greater than or equal to 1"),
    ("zero-stage-5.yaml", 'spec.deepspeed.zeroStage: Unsupported value: 5: supported values: "1", "2", "3"'),
    ("no-dataset-uri.yaml", "spec.dataset.uri: Required value"),
    ("not-s3-uri.yaml", 'spec.model.uri: Invalid value: "https://huggingface.co/tiny-llama": spec.model.uri in body should match'),
])
def test_finetunejob_bad_examples_are_refused_with_kubernetes_text(example: str, first_error: str) -> None:
    path = REPO / "examples" / "bad" / example
    found = _admit(_finetunejob_schema(), yaml.safe_load(path.read_text()))
    assert found and found[0].startswith(first_error)

"""x-kubernetes-validations (CEL) on custom objects: what a user sees when a rule fails."""

from __future__ import annotations

import pytest

from kubetune.localcluster.apiserver import cel
from kubetune.localcluster.apiserver.schema import CEL_SKIPPED_DETAIL, check_structural, validate


def schema_with(spec_rules: list[dict], **spec_props: dict) -> dict:
    properties = {
        "replicas": {"type": "integer"},
        "micro": {"type": "integer"},
        "global": {"type": "integer"},
        "lr": {"type": "number"},
        "uri": {"type": "string"},
        "modules": {"type": "array", "items": {"type": "string"}},
        "zero": {"type": "integer", "enum": [1, 2, 3]},
    }
    properties.update(spec_props)
    return {"type": "object", "properties": {"spec": {
        "type": "object", "properties": properties, "x-kubernetes-validations": spec_rules}}}


def messages(schema: dict, spec: dict, old_spec: dict | None = None) -> list[str]:
    old = {"spec": old_spec} if old_spec is not None else None
    return [error.message for error in validate(schema, {"spec": spec}, old)]


@pytest.mark.parametrize("rule, spec, expected", [
    # message given: the value of an object is omitted (kube-apiserver 1.35+)
    ({"rule": "self.global % (self.micro * self.replicas) == 0", "message": "global must divide"},
     {"global": 10, "micro": 4, "replicas": 1}, ["spec: Invalid value: global must divide"]),
    # no message: "failed rule: <rule>"
    ({"rule": "self.replicas <= 4"}, {"replicas": 8}, ["spec: Invalid value: failed rule: self.replicas <= 4"]),
    # has() and optional fields
    ({"rule": "has(self.uri)", "message": "uri is required"}, {}, ["spec: Invalid value: uri is required"]),
    ({"rule": "!has(self.uri) || self.uri.startsWith('s3://')", "message": "must be s3"}, {"uri": "gs://x"},
     ["spec: Invalid value: must be s3"]),
    # macros and string functions
    ({"rule": "self.modules.all(m, m.endsWith('_proj'))", "message": "bad module"}, {"modules": ["q_proj", "mlp"]},
     ["spec: Invalid value: bad module"]),
    ({"rule": "self.modules.exists(m, m.contains('q'))", "message": "need q"}, {"modules": ["v_proj"]},
     ["spec: Invalid value: need q"]),
    ({"rule": "size(self.modules) <= 1", "message": "one module"}, {"modules": ["a", "b"]},
     ["spec: Invalid value: one module"]),
    ({"rule": "self.uri.matches('^s3://[a-z]+$')", "message": "bucket only"}, {"uri": "s3://A"},
     ["spec: Invalid value: bucket only"]),
    # numbers keep the schema's type: lr is a double even when written as 1
    ({"rule": "self.lr < 0.5", "message": "lr too high"}, {"lr": 1}, ["spec: Invalid value: lr too high"]),
    # messageExpression wins over message
    ({"rule": "self.replicas <= 4", "message": "too many", "messageExpression": "'got ' + string(self.replicas)"},
     {"replicas": 8}, ["spec: Invalid value: got 8"]),
    # a messageExpression that errors falls back to the message
    ({"rule": "self.replicas <= 4", "message": "too many", "messageExpression": "self.nope"},
     {"replicas": 8}, ["spec: Invalid value: too many"]),
    # reason and fieldPath
    ({"rule": "self.replicas <= 4", "message": "no more than 4", "reason": "FieldValueForbidden",
      "fieldPath": ".replicas"}, {"replicas": 8}, ["spec.replicas: Forbidden: no more than 4"]),
    ({"rule": "has(self.uri)", "message": "set uri", "reason": "FieldValueRequired", "fieldPath": ".uri"}, {},
     ["spec.uri: Required value: set uri"]),
    ({"rule": "false", "reason": "FieldValueDuplicate"}, {}, ["spec: Duplicate value"]),
    # runtime errors name the rule
    ({"rule": "self.global % self.micro == 0", "message": "divisible"}, {"global": 4, "micro": 0},
     ['spec: Invalid value: "object": division by zero evaluating rule: divisible']),
    ({"rule": "self.replicas > 0"}, {},
     ['spec: Invalid value: "object": no such key: replicas evaluating rule: self.replicas > 0']),
    ({"rule": "self.lr == 1", "message": "one"}, {"lr": 1.0},
     ['spec: Invalid value: "object": \'no such overload\': call arguments did not match a supported operator, '
      "function or macro signature for rule: one"]),
])
def test_failed_rule_messages(rule: dict, spec: dict, expected: list[str]) -> None:
    assert messages(schema_with([rule]), spec) == expected


def test_passing_rules_report_nothing() -> None:
    schema = schema_with([{"rule": "self.global % (self.micro * self.replicas) == 0"},
                          {"rule": "self.lr > 0.0 && self.uri.startsWith('s3://')"},
                          {"rule": "self.modules.all(m, m.lowerAscii() == m)"}])
    spec = {"global": 64, "micro": 4, "replicas": 2, "lr": 0.0002, "uri": "s3://b/m", "modules": ["q_proj"]}
    assert messages(schema, spec) == []


def test_scalar_rules_show_the_value_and_item_paths() -> None:
    schema = schema_with([], uri={"type": "string", "x-kubernetes-validations": [
        {"rule": "self.startsWith('s3://')", "message": "must start with s3://"}]},
        modules={"type": "array", "items": {"type": "string", "x-kubernetes-validations": [
            {"rule": "self.size() > 1"}]}},
        replicas={"type": "integer", "x-kubernetes-validations": [{"rule": "self % 2 == 0", "message": "even"}]},
        labels={"type": "object", "additionalProperties": {"type": "string", "x-kubernetes-validations": [
            {"rule": "self != ''", "message": "empty label"}]}})
    spec = {"uri": "http://x", "modules": ["ok", "q"], "replicas": 3, "labels": {"team": ""}}
    assert messages(schema, spec) == [
        'spec.uri: Invalid value: "http://x": must start with s3://',
        'spec.modules[1]: Invalid value: "q": failed rule: self.size() > 1',
        "spec.replicas: Invalid value: 3: even",
        'spec.labels[team]: Invalid value: "": empty label',
    ]


def test_root_rules_see_metadata_and_report_at_nil() -> None:
    schema = {"type": "object", "properties": {"metadata": {"type": "object"}},
              "x-kubernetes-validations": [{"rule": "self.metadata.name.size() <= 5", "message": "short names"}]}
    errors = validate(schema, {"metadata": {"name": "much-too-long"}})
    assert [e.message for e in errors] == ["<nil>: Invalid value: short names"]
    assert (errors[0].field, errors[0].body) == ("<nil>", "Invalid value: short names")


def test_transition_rules_run_only_on_update() -> None:
    schema = schema_with([{"rule": "self.replicas >= oldSelf.replicas", "message": "cannot scale down"}])
    assert messages(schema, {"replicas": 1}) == []
    assert messages(schema, {"replicas": 1}, old_spec={"replicas": 2}) == ["spec: Invalid value: cannot scale down"]
    assert messages(schema, {"replicas": 3}, old_spec={"replicas": 2}) == []


def test_transition_rule_on_scalar_immutable_field() -> None:
    schema = schema_with([], uri={"type": "string", "x-kubernetes-validations": [
        {"rule": "self == oldSelf", "message": "uri is immutable"}]})
    assert messages(schema, {"uri": "s3://b"}, old_spec={"uri": "s3://a"}) == [
        'spec.uri: Invalid value: "s3://b": uri is immutable']
    assert messages(schema, {"uri": "s3://b"}) == []


def test_optional_old_self_rules_also_judge_creation() -> None:
    schema = schema_with([{"rule": "!oldSelf.hasValue() || self.replicas >= oldSelf.value().replicas",
                           "message": "cannot scale down", "optionalOldSelf": True},
                          {"rule": "self.replicas <= oldSelf.orValue({'replicas': 4}).replicas + 2",
                           "message": "grow by two at most", "optionalOldSelf": True}])
    assert messages(schema, {"replicas": 6}) == []
    assert messages(schema, {"replicas": 7}) == ["spec: Invalid value: grow by two at most"]
    assert messages(schema, {"replicas": 1}, old_spec={"replicas": 2}) == ["spec: Invalid value: cannot scale down"]


def test_blocking_schema_errors_skip_rules() -> None:
    schema = schema_with([{"rule": "false", "message": "never shown"}])
    assert messages(schema, {"zero": 7}) == [
        'spec.zero: Unsupported value: 7: supported values: "1", "2", "3"',
        "<nil>: Invalid value: null: " + CEL_SKIPPED_DETAIL]


def test_rules_compile_once() -> None:
    cel.compile_rule.cache_clear()
    schema = schema_with([{"rule": "self.replicas > 0"}])
    for replicas in range(5):
        validate(schema, {"spec": {"replicas": replicas + 1}})
    assert cel.compile_rule.cache_info().misses == 1


def test_rules_that_do_not_compile_refuse_the_crd() -> None:
    schema = schema_with([{"rule": "self.replicas >", "message": "broken"},
                          {"rule": "self.replicas > 0", "messageExpression": "'a' +"}])
    problems = cel.compile_errors(schema)
    assert len(problems) == 2
    assert problems[0].startswith(
        'properties[spec].x-kubernetes-validations[0].rule: Invalid value: {"rule":"self.replicas >","message":"broken"}: '
        "compilation failed: ")
    assert problems[1].startswith("properties[spec].x-kubernetes-validations[1].messageExpression: Invalid value: ")
    assert problems == [p for p in check_structural(schema) if "x-kubernetes-validations" in p]


def test_malformed_rule_entries_refuse_the_crd() -> None:
    schema = schema_with([{"rule": " "}, {"rule": "true", "reason": "FieldValueBogus"}])
    assert check_structural(schema) == [
        "properties[spec].x-kubernetes-validations[0].rule: Required value: rule is not specified",
        'properties[spec].x-kubernetes-validations[1].reason: Unsupported value: "FieldValueBogus": supported values: '
        '"FieldValueDuplicate", "FieldValueForbidden", "FieldValueInvalid", "FieldValueRequired"',
    ]


def test_uses_old_self_ignores_string_literals() -> None:
    assert cel.uses_old_self("self == oldSelf")
    assert not cel.uses_old_self("self.name != 'oldSelf'")

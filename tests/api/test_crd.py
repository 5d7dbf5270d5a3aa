"""The CRD is generated from the types: the committed file is what they generate, every field
is documented, and the schema is one the API server takes (structural, defaults valid)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from crd_tools import CRD_PATH, apply_defaults, minimal_spec, openapi_schema

from kubetune.api import crd


def test_the_committed_crd_is_what_the_types_generate() -> None:
    assert CRD_PATH.read_text() == crd.render(), "crds/finetunejob.yaml is stale: run `make crds`"


def _fields(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, sub in (schema.get("properties") or {}).items():
        found.append((f"{path}.{name}", sub))
        found += _fields(sub, f"{path}.{name}")
        if "items" in sub:
            found += _fields(sub["items"], f"{path}.{name}[]")
    return found


def test_every_spec_and_status_field_is_documented_and_typed() -> None:
    schema = openapi_schema()
    for path, field in _fields(schema["properties"]["spec"], "spec") + _fields(schema["properties"]["status"], "status"):
        assert field.get("description"), f"{path} has no description (a docstring under the field)"
        assert "type" in field or "x-kubernetes-int-or-string" in field, f"{path} has no type (not structural)"


def test_every_default_is_valid_against_its_own_schema() -> None:
    # The API server refuses a CRD whose defaults do not validate; catch it without a cluster.
    for path, field in _fields(openapi_schema()["properties"]["spec"], "spec"):
        if "default" in field:
            jsonschema.Draft4Validator({k: v for k, v in field.items() if k != "default"}).validate(field["default"])


def test_cross_field_rules_come_from_the_types() -> None:
    from kubetune.api.spec import Dataset, FineTuneJobSpec, Output, Resources, Training, Workers

    schema = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    declared = {
        "spec": FineTuneJobSpec.rules, "spec.dataset": Dataset.rules, "spec.training": Training.rules,
        "spec.output": Output.rules, "spec.workers": Workers.rules, "spec.workers.resources": Resources.rules,
    }
    for path, rules in declared.items():
        node = spec
        for part in path.split(".")[1:]:
            node = node["properties"][part]
        assert [r["rule"] for r in node["x-kubernetes-validations"]] == [rule.cel for rule in rules], path


def test_rules_hold_on_the_schema_defaults_as_the_api_server_checks_them() -> None:
    # The API server evaluates a type's rules against its default as written ({}, no nested
    # defaults) when the CRD is created, and refuses the CRD if one fails or errors.
    import celpy

    env = celpy.Environment()
    for path, field in _fields(openapi_schema()["properties"]["spec"], "spec"):
        for rule in field.get("x-kubernetes-validations", []) if "default" in field else []:
            default = celpy.json_to_cel(field["default"])
            # A transition rule too: the API server evaluates it with the default as both sides.
            result = env.program(env.compile(rule["rule"])).evaluate({"self": default, "oldSelf": default})
            assert not isinstance(result, Exception) and bool(result), f"{path}: {rule['rule']} on {field['default']}"


def _transition_failures(old: dict, new: dict) -> list[str]:
    """Messages of the transition rules (those reading oldSelf) an update from ``old`` to ``new``
    breaks, both defaulted as the API server stores them."""
    import celpy

    env = celpy.Environment()
    schema = openapi_schema()
    failures = []

    def walk(sub: dict, before: object, after: object) -> None:
        for rule in sub.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                activation = {"self": celpy.json_to_cel(after), "oldSelf": celpy.json_to_cel(before)}
                if not env.program(env.compile(rule["rule"])).evaluate(activation):
                    failures.append(rule["message"])
        if isinstance(before, dict) and isinstance(after, dict):
            for name, child in sub.get("properties", {}).items():
                if name in before and name in after:
                    walk(child, before[name], after[name])

    walk(schema, apply_defaults(schema, old), apply_defaults(schema, new))
    return failures


@pytest.mark.parametrize("change, allowed", [
    ({"runPolicy": {"suspend": True}}, True),
    ({"runPolicy": {"backoffLimit": 5}}, False),
    ({"runPolicy": {"activeDeadlineSeconds": 60}}, False),
    ({"workers": {"replicas": 3}}, False),
    ({"lora": {"r": 4}}, False),
    ({"workers": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}}, False),
    ({"scheduling": {"queueName": "team-a"}}, False),
    ({"scheduling": {"tolerations": [{"operator": "Exists"}]}}, False),
])
def test_only_suspend_may_change_after_creation(change, allowed) -> None:
    old = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
           "spec": minimal_spec()}
    new = {**old, "spec": minimal_spec(**change)}
    failures = _transition_failures(old, new)
    assert (failures == []) is allowed, failures
    assert all("only spec.runPolicy.suspend may change" in message for message in failures)

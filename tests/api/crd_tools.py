"""Read the committed crds/finetunejob.yaml and check objects against it the way an API server
would, without one: structural schema (jsonschema, OpenAPI 3.0 semantics = draft 4), defaults,
CEL rules (celpy). The real API server does the same in the cluster tests; these are the fast
checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetunejob.yaml"
EXAMPLES = REPO / "examples"


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def openapi_schema() -> dict[str, Any]:
    (version,) = load_crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def load_manifest(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def schema_error_fields(obj: dict[str, Any]) -> dict[str, str]:
    """{dotted field: message} for every structural-schema violation."""
    validator = jsonschema.Draft4Validator(openapi_schema())
    problems = {}
    for error in validator.iter_errors(obj):
        path = [str(part) for part in error.absolute_path]
        if error.validator == "required":
            path.append(error.message.split("'")[1])
        problems[".".join(path)] = error.message
    return problems


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill schema defaults the way the API server does before validation."""
    if not isinstance(obj, dict) or "properties" not in schema:
        return obj
    result = copy.deepcopy(obj)
    for name, sub in schema["properties"].items():
        if name not in result and "default" in sub:
            result[name] = copy.deepcopy(sub["default"])
        if name in result:
            result[name] = apply_defaults(sub, result[name])
    return result


def cel_failures(obj: dict[str, Any]) -> list[str]:
    """Messages of every x-kubernetes-validations rule the (defaulted) object breaks."""
    env = celpy.Environment()
    failures: list[str] = []

    def walk(schema: dict[str, Any], value: Any) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue  # a transition rule: only an update, which has an oldSelf, is checked
            program = env.program(env.compile(rule["rule"]))
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                failures.append(" ".join(rule["message"].split()))
        if isinstance(value, dict):
            for name, sub in schema.get("properties", {}).items():
                if name in value:
                    walk(sub, value[name])
        if isinstance(value, list) and "items" in schema:
            for item in value:  # rules of a list's items (spec.workers.env[], tolerations[])
                walk(schema["items"], item)

    schema = openapi_schema()
    walk(schema, apply_defaults(schema, obj))
    return failures


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    """The smallest valid spec (only the required fields), with top-level blocks replaced."""
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {"uri": "s3://datasets/quickstart/train.jsonl"},
        "output": {"adapterUri": "s3://adapters/quickstart/"},
    }
    spec.update(overrides)
    return spec


def assert_cel_and_spec_agree(manifest: dict[str, Any], ok: bool, message: str, whole: bool = True) -> None:
    """A cross-field rule is declared once (kubetune.api) and evaluated twice: as CEL by the API
    server (here by celpy on the committed CRD) and in Python by the typed spec, for objects no
    server checked. Both must accept the same manifests and refuse the rest with ``message``
    (the whole CEL message unless ``whole`` is False; the Python error contains it)."""
    from kubetune.api import InvalidObjectError, check_job_name, parse_spec

    failures = cel_failures(manifest)
    assert (failures == []) is ok, failures
    if ok:
        parse_spec(manifest["spec"])
        check_job_name(manifest["metadata"]["name"])
        return
    if whole:
        assert failures == [message]
    else:
        assert len(failures) == 1 and failures[0].startswith(message), failures
    try:
        parse_spec(manifest["spec"])
        check_job_name(manifest["metadata"]["name"])
    except InvalidObjectError as err:
        assert message in " ".join(str(err).split()), err
    else:
        raise AssertionError(f"the typed spec accepted what CEL refuses: {message}")

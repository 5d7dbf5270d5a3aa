"""The CRD is the one source of truth: the operator's typed spec must mirror it exactly."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import annotated_types
import pytest
from crd_tools import load_crd, openapi_schema
from kubetune.operator.spec import FineTuneJobSpec
from pydantic import BaseModel
from pydantic.fields import FieldInfo

SCHEMA_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _schema_type(annotation: Any) -> str:
    annotation = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return SCHEMA_TYPES[type(typing.get_args(annotation)[0])]
    if origin in (tuple, list):
        return "array"
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "object"
    return SCHEMA_TYPES[annotation]


def _constraints(field: FieldInfo) -> dict[str, Any]:
    """The field's pydantic constraints in CRD schema vocabulary."""
    found: dict[str, Any] = {}
    is_array = _schema_type(field.annotation) == "array"
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            found["minimum"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            found.update(minimum=item.gt, exclusiveMinimum=True)
        elif isinstance(item, annotated_types.Le):
            found["maximum"] = item.le
        elif isinstance(item, annotated_types.MinLen):
            found["minItems" if is_array else "minLength"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            found["maxItems" if is_array else "maxLength"] = item.max_length
        elif getattr(item, "pattern", None):
            found["pattern"] = item.pattern
    return found


def _default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        # An object default ({} in the CRD) means "all of the nested defaults".
        return {} if value == type(value)() else value.model_dump(by_alias=True)
    if isinstance(value, tuple):
        return list(value)
    return value


def _walk(schema: dict[str, Any], model: type[BaseModel], path: str) -> list[str]:
    problems: list[str] = []
    by_alias = {field.alias or name: field for name, field in model.model_fields.items()}
    properties = schema.get("properties", {})
    for name in sorted(set(by_alias) - set(properties)):
        problems.append(f"{path}.{name}: in the typed model but not in the CRD")
    for name in sorted(set(properties) - set(by_alias)):
        problems.append(f"{path}.{name}: in the CRD but not in the typed model")
    required = set(schema.get("required", []))
    for name in sorted(set(properties) & set(by_alias)):
        sub, field, where = properties[name], by_alias[name], f"{path}.{name}"
        if (name in required) != field.is_required():
            problems.append(f"{where}: required is {name in required} in the CRD, {field.is_required()} in the model")
        if sub.get("type") != _schema_type(field.annotation):
            problems.append(
                f"{where}: type {sub.get('type')} in the CRD, {_schema_type(field.annotation)} in the model"
            )
        if not field.is_required() and sub.get("default") != _default(field):
            problems.append(f"{where}: default {sub.get('default')!r} in the CRD, {_default(field)!r} in the model")
        annotation = _strip_optional(field.annotation)
        model_enum = list(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal else None
        if sub.get("enum") != model_enum:
            problems.append(f"{where}: enum {sub.get('enum')} in the CRD, {model_enum} in the model")
        crd_bounds = {key: sub[key] for key in _BOUND_KEYS if key in sub}
        if crd_bounds != _constraints(field):
            problems.append(f"{where}: constraints {crd_bounds} in the CRD, {_constraints(field)} in the model")
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            problems += _walk(sub, annotation, where)
    return problems


_BOUND_KEYS = ("minimum", "exclusiveMinimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern")


def test_typed_spec_mirrors_crd_schema() -> None:
    assert _walk(openapi_schema()["properties"]["spec"], FineTuneJobSpec, "spec") == []


def test_walker_notices_a_drifted_default() -> None:
    # Guards the guard: a CRD default edited without the model must be reported.
    spec_schema = openapi_schema()["properties"]["spec"]
    spec_schema["properties"]["lora"]["properties"]["r"]["default"] = 16
    assert _walk(spec_schema, FineTuneJobSpec, "spec") == ["spec.lora.r: default 16 in the CRD, 8 in the model"]


def _all_nodes(schema: dict[str, Any], path: str):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _all_nodes(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _all_nodes(schema["items"], f"{path}[]")


@pytest.mark.parametrize("part", ["spec", "status"])
def test_every_field_has_a_description_for_kubectl_explain(part: str) -> None:
    undocumented = [
        path for path, node in _all_nodes(openapi_schema()["properties"][part], part) if not node.get("description")
    ]
    assert undocumented == []


def test_crd_names_and_printer_columns() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.dev"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert crd["spec"]["names"]["categories"] == ["all"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column for column in version["additionalPrinterColumns"]}
    assert [name.upper() for name in columns] == ["PHASE", "PROGRESS", "LOSS", "ETA", "WORKERS", "MODEL", "AGE"]
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Progress"]["jsonPath"] == ".status.progress.display"
    assert columns["Loss"]["jsonPath"] == ".status.progress.loss" and columns["Loss"]["type"] == "number"
    assert columns["ETA"]["jsonPath"] == ".status.progress.eta"
    assert columns["Workers"]["jsonPath"] == ".spec.workers.replicas"
    assert columns["Model"]["priority"] == 1

"""The FineTuneJob CRD, generated from the types (the kubebuilder habit: types are the source,
the CRD is an artefact committed beside them).

    make crds                      # python -m kubetune.api.crd crds/finetunejob.yaml

Field docstrings become descriptions (``kubectl explain``), pydantic bounds become schema
bounds, defaults become schema defaults (the API server fills them in), and each type's
``rules`` become its ``x-kubernetes-validations``. ``tests/api`` fails when the committed file
differs from what the types generate.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kubetune.api import resource
from kubetune.api.model import ApiModel, Rule
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

HEADER = (
    "# FineTuneJob: the kubetune API, generated from the types in api/kubetune/api/ by `make crds`.\n"
    "# Do not edit: change the types and regenerate (make test fails when this file is stale).\n"
)
PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Lifecycle phase of the job (Validating, Pending, Running, Publishing, Restarting, Suspended, Succeeded, Failed)."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.display",
     "description": "Optimizer steps done of the total (e.g. 12/30), scraped from rank 0's metrics."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss",
     "description": "Training loss of the last logged step (the final loss once Succeeded)."},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta",
     "description": "Estimated time left, from the step rate between the last two scrapes that saw a new step."},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.workers.replicas",
     "description": "Number of worker pods."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts",
     "description": "Gang restarts so far."},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 1,
     "description": "Base model folder."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _text(doc: str | None) -> str | None:
    return " ".join(doc.split()) if doc else None


def _validations(rules: tuple[Rule, ...]) -> list[dict[str, str]]:
    return [{"rule": rule.cel, "message": rule.message,
             **({"messageExpression": rule.message_expression} if rule.message_expression else {})}
            for rule in rules]


def _constraints(items: list[Any], array: bool) -> dict[str, Any]:
    """Schema keywords for pydantic's constraints (annotated_types, Field(...) metadata)."""
    found: dict[str, Any] = {}
    for item in items:
        if isinstance(item, FieldInfo):
            found.update(_constraints(item.metadata, array))
            if isinstance(item.json_schema_extra, dict):
                found.update(item.json_schema_extra)
        elif isinstance(item, annotated_types.Ge):
            found["minimum"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            found.update(minimum=item.gt, exclusiveMinimum=True)
        elif isinstance(item, annotated_types.Le):
            found["maximum"] = item.le
        elif isinstance(item, annotated_types.Lt):
            found.update(maximum=item.lt, exclusiveMaximum=True)
        elif isinstance(item, annotated_types.MinLen):
            found["minItems" if array else "minLength"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            found["maxItems" if array else "maxLength"] = item.max_length
        elif getattr(item, "pattern", None):
            found["pattern"] = item.pattern
    return found


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _schema(annotation: Any, metadata: list[Any]) -> dict[str, Any]:
    """The structural schema of one annotation (None is "absent", never a value)."""
    annotation = _without_none(annotation)
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extra = typing.get_args(annotation)
        return _schema(inner, [*extra, *metadata])
    if origin is Literal:
        values = list(typing.get_args(annotation))
        schema: dict[str, Any] = {"type": _SCALARS[type(values[0])], "enum": values}
    elif annotation in _SCALARS:
        schema = {"type": _SCALARS[annotation]}
    elif origin in (tuple, list):
        schema = {"type": "array", "items": _schema(typing.get_args(annotation)[0], [])}
    elif origin in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {int, str}:
        schema = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
    elif origin is dict:
        value = typing.get_args(annotation)[1]
        if value is Any:
            schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        else:
            schema = {"type": "object", "additionalProperties": _schema(value, [])}
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return object_schema(annotation)
    else:
        raise TypeError(f"no CRD schema for {annotation!r}")
    schema.update(_constraints(metadata, array=schema.get("type") == "array"))
    return schema


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return None
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return {}  # the API server fills the nested defaults in from the nested schema
    if isinstance(value, tuple):
        return list(value)
    return value


def object_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of an API type: its fields in declaration order, with their
    descriptions, bounds and defaults, and the type's rules."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        schema = _schema(field.annotation, list(field.metadata))
        described = _text(field.description)
        if described:
            schema = {"type": schema.pop("type"), "description": described, **schema} if "type" in schema else {
                "description": described, **schema}
        default = _default(field)
        if default is not None:
            schema["default"] = default
        if isinstance(field.json_schema_extra, dict):
            schema.update(field.json_schema_extra)
        if field.is_required():
            required.append(key)
        properties[key] = schema
    schema = {"type": "object", "description": _text(model.__doc__)}
    if required:
        schema["required"] = required
    rules = getattr(model, "rules", ()) if issubclass(model, ApiModel) else ()
    if rules:
        schema["x-kubernetes-validations"] = _validations(rules)
    schema["properties"] = properties
    return schema


def crd() -> dict[str, Any]:
    spec = object_schema(FineTuneJobSpec)
    status = object_schema(FineTuneJobStatus)
    root = {
        "type": "object",
        "description": (
            "FineTuneJob trains a LoRA adapter for a base model on a dataset with torchrun, DeepSpeed ZeRO "
            "and PEFT, reading from and publishing to S3."
        ),
        "required": ["spec"],
        "x-kubernetes-validations": _validations(resource.NAME_RULES),
        "properties": {
            "apiVersion": {"type": "string", "description": "The versioned schema of this object."},
            "kind": {"type": "string", "description": "The REST resource this object represents."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": resource.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.KIND,
                "listKind": f"{resource.KIND}List",
                "plural": resource.PLURAL,
                "singular": resource.SINGULAR,
                "shortNames": list(resource.SHORT_NAMES),
                "categories": ["all"],
            },
            "versions": [{
                "name": resource.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        Path(argv[0]).write_text(render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

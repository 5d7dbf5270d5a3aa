"""CustomResourceDefinitions: turning a CRD into served resources, and validating custom objects."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from . import schema as schema_module
from .errors import bad_request, invalid
from .resources import Registry, ResourceInfo


def resource_infos(crd: dict[str, Any]) -> list[ResourceInfo]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    infos = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = ("status",) if "status" in (version.get("subresources") or {}) else ()
        infos.append(ResourceInfo(
            group=spec["group"], version=version["name"], resource=names["plural"], kind=names["kind"],
            singular=names.get("singular") or names["kind"].lower(),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
            subresources=subresources, crd_version=version))
    return infos


def register(registry: Registry, crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    registry.remove_group_resource(spec["group"], spec["names"]["plural"])
    for info in resource_infos(crd):
        registry.add(info)


def unregister(registry: Registry, crd: dict[str, Any]) -> None:
    spec = crd.get("spec") or {}
    registry.remove_group_resource(spec.get("group", ""), (spec.get("names") or {}).get("plural", ""))


def established_status(crd: dict[str, Any]) -> dict[str, Any]:
    """The status kube-apiserver's CRD controllers would write once names are accepted."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    spec = crd["spec"]
    names = dict(spec["names"])
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", names["kind"] + "List")
    conditions = [
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
         "message": "no conflicts found", "lastTransitionTime": now},
        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
         "message": "the initial names have been accepted", "lastTransitionTime": now},
    ]
    stored = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
    return {"conditions": conditions, "acceptedNames": names, "storedVersions": stored}


def _cause(field: str, message: str, reason: str = "FieldValueInvalid") -> dict[str, Any]:
    return {"reason": reason, "message": message, "field": field}


def validate_crd(crd: dict[str, Any]) -> None:
    """Reject CRDs kube-apiserver would reject, naming the field to fix."""
    name = (crd.get("metadata") or {}).get("name", "")
    spec = crd.get("spec") or {}
    causes = []
    names = spec.get("names") or {}
    for required in ("plural", "kind"):
        if not names.get(required):
            causes.append(_cause(f"spec.names.{required}", "Required value", "FieldValueRequired"))
    if not spec.get("group"):
        causes.append(_cause("spec.group", "Required value", "FieldValueRequired"))
    if names.get("plural") and spec.get("group") and name != f"{names['plural']}.{spec['group']}":
        causes.append(_cause("metadata.name", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
    versions = spec.get("versions") or []
    if not versions:
        causes.append(_cause("spec.versions", "Required value: must have exactly one version marked as storage version", "FieldValueRequired"))
    elif sum(1 for v in versions if v.get("storage")) != 1:
        causes.append(_cause("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
    for index, version in enumerate(versions):
        openapi = (version.get("schema") or {}).get("openAPIV3Schema")
        if openapi is None:
            causes.append(_cause(f"spec.versions[{index}].schema.openAPIV3Schema", "Required value: schemas are required", "FieldValueRequired"))
            continue
        for problem in schema_module.check_structural(openapi):
            causes.append(_cause(f"spec.versions[{index}].schema.openAPIV3Schema", problem, "FieldValueInvalid"))
    if causes:
        raise invalid("apiextensions.k8s.io", "CustomResourceDefinition", name, causes)


def admit_custom_object(info: ResourceInfo, obj: dict[str, Any], old: dict[str, Any] | None,
                        field_validation: str) -> tuple[dict[str, Any], list[str]]:
    """Prune, default and validate a custom object like kube-apiserver; returns (object, warnings).

    fieldValidation Strict turns unknown fields into a 400 BadRequest; Warn (the default) reports
    them as warnings; Ignore drops them silently. Either way they are pruned.
    """
    schema = info.schema
    if not schema:
        return obj, []
    pruned, unknown = schema_module.prune_unknown(schema, obj)
    warnings = []
    if unknown:
        if field_validation == "Strict":
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            raise bad_request(f'{info.kind} in version "{info.version}" cannot be handled as a {info.kind}: '
                              f"strict decoding error: {fields}")
        if field_validation != "Ignore":
            warnings = [f'unknown field "{path}"' for path in unknown]
    result = schema_module.apply_defaults(schema, pruned)
    errors = schema_module.validate(schema, result, old)
    if errors:
        causes = [{"reason": e.type, "message": e.body, "field": e.field or "<nil>"} for e in errors]
        raise invalid(info.group, info.kind, (obj.get("metadata") or {}).get("name", ""), causes)
    return result, warnings

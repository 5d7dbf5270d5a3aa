"""OpenAPI v3 documents: enough for `kubectl apply` (fieldValidation support) and `kubectl explain`."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .resources import Registry, ResourceInfo

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
PATCH = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch"
STATUS = "io.k8s.apimachinery.pkg.apis.meta.v1.Status"

_API_VERSION_DESCRIPTION = ("APIVersion defines the versioned schema of this representation of an object. "
                            "Servers should convert recognized schemas to the latest internal value, and may "
                            "reject unrecognized values.")
_KIND_DESCRIPTION = ("Kind is a string value representing the REST resource this object represents. "
                     "In CamelCase.")
_METADATA_DESCRIPTION = "Standard object's metadata."


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": True}}


_WRITE_PARAMETERS = [
    _query("dryRun", "When present, indicates that modifications should not be persisted."),
    _query("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."),
    _query("fieldValidation", "fieldValidation instructs the server on how to handle objects in the request "
                              "containing unknown or duplicate fields: Ignore, Warn or Strict."),
]
_PATCH_PARAMETERS = _WRITE_PARAMETERS + [_query("force", "Force is going to \"force\" Apply requests.")]


def group_version_path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def schema_name(info: ResourceInfo) -> str:
    """Kubernetes' reverse-domain definition names, e.g. dev.kubetune.v1alpha1.FineTuneJob."""
    if not info.group:
        return f"io.k8s.api.core.{info.version}.{info.kind}"
    if info.group.endswith(".k8s.io"):
        short = info.group.removesuffix(".k8s.io")
        package = "apiextensions-apiserver.pkg.apis" if short == "apiextensions" else "api"
        return f"io.k8s.{package}.{short}.{info.version}.{info.kind}"
    return ".".join(reversed(info.group.split("."))) + f".{info.version}.{info.kind}"


def _gvk(info: ResourceInfo) -> dict[str, str]:
    return {"group": info.group, "version": info.version, "kind": info.kind}


def _operation(info: ResourceInfo, action: str, parameters: list[dict[str, Any]], body_types: list[str] | None) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema_name(info)}"}
    operation: dict[str, Any] = {
        "operationId": f"{action}{info.kind}",
        "parameters": parameters,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(info),
    }
    if body_types:
        body_schema = {"$ref": f"#/components/schemas/{PATCH}"} if action == "patch" else ref
        operation["requestBody"] = {"content": {t: {"schema": body_schema} for t in body_types}, "required": True}
    return operation


def _patch_types(info: ResourceInfo) -> list[str]:
    # Strategic merge is left out on purpose: kubectl then computes it from its compiled-in types,
    # which know every patch-merge-key, rather than from our minimal built-in schemas.
    return ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]


def _paths(info: ResourceInfo) -> dict[str, Any]:
    prefix = "/" + group_version_path(info.group, info.version)
    scope = "/namespaces/{namespace}" if info.namespaced else ""
    collection = f"{prefix}{scope}/{info.resource}"
    item = collection + "/{name}"
    paths = {
        collection: {"get": _operation(info, "list", [], None),
                     "post": _operation(info, "post", _WRITE_PARAMETERS, ["*/*"])},
        item: {"get": _operation(info, "get", [], None),
               "put": _operation(info, "put", _WRITE_PARAMETERS, ["*/*"]),
               "patch": _operation(info, "patch", _PATCH_PARAMETERS, _patch_types(info)),
               "delete": _operation(info, "delete", _WRITE_PARAMETERS[:1], None)},
    }
    for sub in info.subresources:
        if sub == "status":
            paths[item + "/status"] = {"get": _operation(info, "get", [], None),
                                       "put": _operation(info, "put", _WRITE_PARAMETERS, ["*/*"]),
                                       "patch": _operation(info, "patch", _PATCH_PARAMETERS, _patch_types(info))}
    return paths


def _object_schema(info: ResourceInfo) -> dict[str, Any]:
    if info.schema:
        schema = copy.deepcopy(info.schema)
    else:
        schema = {"type": "object", "description": f"{info.kind} is a built-in Kubernetes {info.resource} object.",
                  "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                 "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    properties = schema.setdefault("properties", {})
    properties["apiVersion"] = {"type": "string", "description": _API_VERSION_DESCRIPTION}
    properties["kind"] = {"type": "string", "description": _KIND_DESCRIPTION}
    properties["metadata"] = {"allOf": [{"$ref": f"#/components/schemas/{OBJECT_META}"}],
                              "description": _METADATA_DESCRIPTION}
    schema["x-kubernetes-group-version-kind"] = [_gvk(info)]
    return schema


_SHARED_SCHEMAS = {
    OBJECT_META: {"type": "object", "description": "ObjectMeta is metadata that all persisted resources must have.",
                  "properties": {
                      "name": {"type": "string", "description": "Name must be unique within a namespace."},
                      "namespace": {"type": "string", "description": "Namespace defines the space within which each name must be unique."},
                      "labels": {"type": "object", "additionalProperties": {"type": "string"},
                                 "description": "Map of string keys and values that can be used to organize and categorize objects."},
                      "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                                      "description": "Annotations is an unstructured key value map."},
                  }},
    PATCH: {"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."},
    STATUS: {"type": "object", "description": "Status is a return value for calls that don't return other objects."},
}


def document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    infos = registry.in_group_version(group, version)
    if not infos:
        return None
    paths: dict[str, Any] = {}
    schemas = copy.deepcopy(_SHARED_SCHEMAS)
    for info in infos:
        paths.update(_paths(info))
        schemas[schema_name(info)] = _object_schema(info)
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.1"},
            "paths": paths, "components": {"schemas": schemas}}


def document_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:64].upper()


def index(registry: Registry) -> dict[str, Any]:
    paths = {}
    for group, versions in registry.group_versions().items():
        for version in versions:
            doc = document(registry, group, version)
            if doc is not None:
                path = group_version_path(group, version)
                paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={document_hash(doc)}"}
    return {"paths": paths}

"""The four PATCH flavours kubectl, kopf and the python client send.

merge-patch (RFC 7386), json-patch (RFC 6902, via `jsonpatch`), strategic-merge-patch (lists merged
by their Kubernetes patch-merge-key) and server-side apply (treated as a strategic merge: no
managedFields bookkeeping).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import APIError, bad_request

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# Lists that strategic merge patch merges element-wise, by the key Kubernetes' Go types declare.
PATCH_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "ports": "containerPort",  # Service ports use "port": chosen per element below
    "topologySpreadConstraints": "topologyKey",
}
# Lists of scalars that strategic merge patch unions instead of replacing.
SET_LISTS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class ResourceVersionTestFailed(APIError):
    """kopf guards finalizer edits with a `test` of metadata.resourceVersion and expects a 409."""


def json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    if not isinstance(operations, list):
        raise bad_request("json patch body must be a JSON array of operations")
    try:
        return jsonpatch.JsonPatch(operations).apply(copy.deepcopy(target))
    except jsonpatch.JsonPatchTestFailed as error:
        if any(op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" for op in operations):
            raise ResourceVersionTestFailed(
                409, "Conflict",
                "the object has been modified; please apply your changes to the latest version "
                f"and try again ({error})") from error
        raise APIError(422, "Invalid", str(error)) from error
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as error:
        raise APIError(422, "Invalid", f"the json patch could not be applied: {error}") from error


def _merge_key(field: str, items: list[Any]) -> str | None:
    key = PATCH_MERGE_KEYS.get(field)
    if key == "containerPort" and any(isinstance(i, dict) and "port" in i and "containerPort" not in i for i in items):
        return "port"
    return key


def _strategic_list(field: str, target: list[Any], patch: list[Any]) -> list[Any]:
    if field in SET_LISTS:
        merged = list(target)
        merged += [item for item in patch if item not in merged]
        return merged
    key = _merge_key(field, target + patch)
    if key is None or not all(isinstance(item, dict) for item in target + patch):
        return [item for item in copy.deepcopy(patch) if not (isinstance(item, dict) and item.get("$patch") == "delete")]
    result = copy.deepcopy(target)
    for item in patch:
        if item.get("$patch") == "replace":
            return [i for i in copy.deepcopy(patch) if i.get("$patch") != "replace"]
        index = next((i for i, existing in enumerate(result) if existing.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Merge like a merge patch, but merge known lists by their patch-merge-key.

    kubectl's `$setElementOrder/...` and `$retainKeys` directives only steer ordering and pruning
    of keys we never keep anyway, so they are dropped.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field, []) if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _strategic_list(key, result[key], value)
        elif isinstance(value, list):
            result[key] = _strategic_list(key, [], value)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def apply_patch(target: dict[str, Any], content_type: str, body: Any, *, custom: bool) -> dict[str, Any]:
    """Apply a PATCH body of the given content type; custom resources do not support strategic merge."""
    if content_type == MERGE_PATCH:
        if not isinstance(body, dict):
            raise bad_request("a merge patch must be a JSON object")
        return merge_patch(target, body)
    if content_type == JSON_PATCH:
        return json_patch(target, body)
    if content_type == STRATEGIC_MERGE_PATCH:
        if custom:
            raise APIError(415, "UnsupportedMediaType",
                           "strategic merge patch is not supported for custom resources; use "
                           "--type=merge or --type=json")
        if not isinstance(body, dict):
            raise bad_request("a strategic merge patch must be a JSON object")
        return strategic_merge_patch(target, body)
    if content_type == APPLY_PATCH:
        if not isinstance(body, dict):
            raise bad_request("an apply patch must be an object")
        return strategic_merge_patch(target, body) if not custom else merge_patch(target, body)
    raise APIError(415, "UnsupportedMediaType", f"unsupported patch content type {content_type!r}")

"""Kubernetes object semantics on top of the store: create/update/patch/delete, finalizers, GC.

Every method takes a `ResourceInfo` and plain dicts, and raises `APIError`s shaped like
kube-apiserver's; HTTP lives in app.py.
"""

from __future__ import annotations

import base64
import copy
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import crd as crds
from .errors import APIError, already_exists, bad_request, conflict, invalid, not_found
from .patch import APPLY_PATCH, apply_patch
from .resources import Registry, ResourceInfo, find_group_resource
from .selectors import Selector
from .store import Store

INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease", "kubetune-system")
_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def now_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class WriteOptions:
    field_validation: str = "Warn"  # Strict | Warn | Ignore
    dry_run: bool = False
    field_manager: str | None = None
    force: bool = False


@dataclass
class WriteResult:
    obj: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    created: bool = False


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    """Everything that bumps metadata.generation when it changes (not metadata, not status)."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# (pattern, max length, Kubernetes' explanation) per kind of name.
_SUBDOMAIN_RULE = (_DNS_SUBDOMAIN, 253,
                   "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                   "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                   "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
_LABEL_RULE = (_DNS_LABEL, 63,
               "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
               "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
               "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
_DNS_1035_RULE = (_DNS_1035_LABEL, 63,
                  "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                  "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                  "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")


def _check_name(info: ResourceInfo, name: str) -> None:
    """Names become DNS names (pods, services, namespaces), so Kubernetes restricts them."""
    if info.group == "" and info.resource == "namespaces":
        pattern, limit, explanation = _LABEL_RULE
    elif info.group == "" and info.resource == "services":
        pattern, limit, explanation = _DNS_1035_RULE
    else:
        pattern, limit, explanation = _SUBDOMAIN_RULE
    if len(name) > limit:
        detail = f"must be no more than {limit} characters"
    elif not pattern.match(name):
        detail = explanation
    else:
        return
    raise invalid(info.group, info.kind, name, [{"reason": "FieldValueInvalid", "field": "metadata.name",
                                                 "message": f'Invalid value: "{name}": {detail}'}])


class Cluster:
    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        for name in INITIAL_NAMESPACES:
            self.create(self._namespaces, "", {"metadata": {"name": name}}, WriteOptions())

    @property
    def _namespaces(self) -> ResourceInfo:
        info = self.registry.get("", "v1", "namespaces")
        assert info is not None
        return info

    # -- reads ---------------------------------------------------------------------------------

    def _present(self, info: ResourceInfo, obj: dict[str, Any]) -> dict[str, Any]:
        """A private copy as the requested version shows it (objects are stored version-agnostic)."""
        result = copy.deepcopy(obj)
        result["apiVersion"] = info.api_version
        result["kind"] = info.kind
        return result

    def _stored(self, info: ResourceInfo, namespace: str, name: str) -> dict[str, Any]:
        obj = self.store.get(info.group, info.resource, namespace if info.namespaced else "", name)
        if obj is None:
            raise not_found(info.group, info.resource, name)
        return obj

    def get(self, info: ResourceInfo, namespace: str, name: str) -> dict[str, Any]:
        return self._present(info, self._stored(info, namespace, name))

    def list(self, info: ResourceInfo, namespace: str | None, selector: Selector) -> list[dict[str, Any]]:
        objects = self.store.list(info.group, info.resource, namespace if info.namespaced else None)
        return [self._present(info, obj) for obj in objects if selector.matches(obj)]

    def namespace_exists(self, name: str) -> bool:
        return self.store.get("", "namespaces", "", name) is not None

    # -- writes --------------------------------------------------------------------------------

    def create(self, info: ResourceInfo, namespace: str, body: Any, options: WriteOptions) -> WriteResult:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if info.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = namespace
            if not self.namespace_exists(namespace):
                raise not_found("", "namespaces", namespace)
            namespace_obj = self.store.get("", "namespaces", "", namespace)
            if namespace_obj and (namespace_obj["metadata"].get("deletionTimestamp")):
                raise APIError(403, "Forbidden", f'{info.resource} "{meta.get("name", "")}" is forbidden: unable to create new content in namespace {namespace} because it is being terminated')
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(info.group, info.kind, "", [{"reason": "FieldValueRequired", "field": "metadata.name",
                                                            "message": "Required value: name or generateName is required"}])
            meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATE_CHARS, k=5))
        name = meta["name"]
        _check_name(info, name)
        if self.store.get(info.group, info.resource, meta.get("namespace", ""), name) is not None:
            raise already_exists(info.group, info.resource, name)
        for transient in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(transient, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_timestamp()
        meta["generation"] = 1
        obj["apiVersion"], obj["kind"] = info.api_version, info.kind
        obj, warnings = self._admit_create(info, obj, options)
        if options.dry_run:
            return WriteResult(self._present(info, obj), warnings, created=True)
        self.store.write(info.group, info.resource, obj, None)
        if info.group == "apiextensions.k8s.io" and info.resource == "customresourcedefinitions":
            crds.register(self.registry, obj)
        return WriteResult(self._present(info, obj), warnings, created=True)

    def _admit_create(self, info: ResourceInfo, obj: dict[str, Any],
                      options: WriteOptions) -> tuple[dict[str, Any], list[str]]:
        warnings: list[str] = []
        if info.custom and info.has_status:
            obj.pop("status", None)  # status is only written through /status
        self._builtin_defaults(info, obj)
        if info.custom:
            obj, warnings = crds.admit_custom_object(info, obj, None, options.field_validation)
        return obj, warnings

    def _builtin_defaults(self, info: ResourceInfo, obj: dict[str, Any]) -> None:
        if info.group == "" and info.resource == "secrets":
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) if string_data or "data" in obj else None
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj.setdefault("type", "Opaque")
        elif info.group == "" and info.resource == "pods":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif info.group == "" and info.resource == "namespaces":
            obj.setdefault("status", {}).setdefault("phase", "Active")
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif info.group == "" and info.resource == "services":
            obj.setdefault("spec", {}).setdefault("type", "ClusterIP")
        elif info.group == "apiextensions.k8s.io" and info.resource == "customresourcedefinitions":
            crds.validate_crd(obj)
            obj["status"] = crds.established_status(obj)

    def update(self, info: ResourceInfo, namespace: str, name: str, body: Any, options: WriteOptions,
               subresource: str | None = None) -> WriteResult:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        body_name = (body.get("metadata") or {}).get("name")
        if body_name and body_name != name:
            raise bad_request(f'the name of the object ({body_name}) does not match the name on the URL ({name})')
        old = self._stored(info, namespace, name)
        return self._replace(info, old, copy.deepcopy(body), options, subresource)

    def patch(self, info: ResourceInfo, namespace: str, name: str, content_type: str, body: Any,
              options: WriteOptions, subresource: str | None = None) -> WriteResult:
        old = self.store.get(info.group, info.resource, namespace if info.namespaced else "", name)
        if old is None:
            if content_type == APPLY_PATCH and subresource is None:
                if isinstance(body, dict):
                    body.setdefault("metadata", {}).setdefault("name", name)
                return self.create(info, namespace, body, options)
            raise not_found(info.group, info.resource, name)
        current = self._present(info, old)
        new = apply_patch(current, content_type, body, custom=info.custom)
        if content_type == APPLY_PATCH and isinstance(body, dict) and "resourceVersion" not in (body.get("metadata") or {}):
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._replace(info, old, new, options, subresource)

    def _replace(self, info: ResourceInfo, old: dict[str, Any], new: dict[str, Any], options: WriteOptions,
                 subresource: str | None) -> WriteResult:
        name = old["metadata"]["name"]
        new_meta = new.get("metadata") or {}
        sent_version = new_meta.get("resourceVersion")
        if sent_version and sent_version != old["metadata"]["resourceVersion"]:
            raise conflict(info.group, info.resource, name)
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = new
            meta = result.setdefault("metadata", {})
            for immutable in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                              "deletionGracePeriodSeconds", "generation"):
                if immutable in old["metadata"]:
                    meta[immutable] = old["metadata"][immutable]
                else:
                    meta.pop(immutable, None)
            if info.has_status:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            if old["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
                if added:
                    raise invalid(info.group, info.kind, name, [{
                        "reason": "FieldValueForbidden", "field": "metadata.finalizers",
                        "message": "Forbidden: no new finalizers can be added if the object is being deleted"}])
        result["apiVersion"], result["kind"] = info.api_version, info.kind
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        warnings: list[str] = []
        self._builtin_update_defaults(info, result)
        if info.custom:
            result, warnings = crds.admit_custom_object(info, result, self._present(info, old), options.field_validation)
        if _spec_part(result) != _spec_part(old):
            result["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if options.dry_run:
            return WriteResult(self._present(info, result), warnings)
        if result == {**old, "apiVersion": result["apiVersion"], "kind": result["kind"]}:
            return WriteResult(self._present(info, old), warnings)  # no-op writes keep the resourceVersion
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            result["metadata"].pop("finalizers", None)
            self.store.write(info.group, info.resource, result, old)
            self._remove(info, result, "Background")
            return WriteResult(self._present(info, result), warnings)
        self.store.write(info.group, info.resource, result, old)
        if info.group == "apiextensions.k8s.io" and info.resource == "customresourcedefinitions":
            crds.register(self.registry, result)
        return WriteResult(self._present(info, result), warnings)

    def _builtin_update_defaults(self, info: ResourceInfo, obj: dict[str, Any]) -> None:
        if info.group == "" and info.resource == "secrets" and "stringData" in obj:
            self._builtin_defaults(info, obj)
        elif info.group == "apiextensions.k8s.io" and info.resource == "customresourcedefinitions":
            crds.validate_crd(obj)
            obj["status"] = crds.established_status(obj)

    # -- deletion ------------------------------------------------------------------------------

    def delete(self, info: ResourceInfo, namespace: str, name: str, options: dict[str, Any],
               dry_run: bool = False) -> dict[str, Any]:
        obj = self._stored(info, namespace, name)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != obj["metadata"]["uid"]:
            raise conflict(info.group, info.resource, name)
        if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise conflict(info.group, info.resource, name)
        if dry_run:
            return self._present(info, obj)
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if obj["metadata"].get("finalizers") or (info.resource == "namespaces" and self._namespace_content(name)):
            return self._present(info, self._mark_deleting(info, obj, options, name))
        return self._present(info, self._remove(info, obj, policy))

    def delete_collection(self, info: ResourceInfo, namespace: str | None, selector: Selector,
                          options: dict[str, Any], dry_run: bool = False) -> list[dict[str, Any]]:
        """DELETE on a collection: every matching object, as separate deletions."""
        deleted = []
        for obj in self.store.list(info.group, info.resource, namespace if info.namespaced else None):
            if selector.matches(obj) and self.store.get(info.group, info.resource, obj["metadata"].get("namespace", ""),
                                                        obj["metadata"]["name"]) is not None:
                deleted.append(self.delete(info, obj["metadata"].get("namespace", ""), obj["metadata"]["name"],
                                           options, dry_run))
        return deleted

    def _mark_deleting(self, info: ResourceInfo, obj: dict[str, Any], options: dict[str, Any], name: str) -> dict[str, Any]:
        if obj["metadata"].get("deletionTimestamp"):
            return obj
        marked = copy.deepcopy(obj)
        marked["metadata"]["deletionTimestamp"] = now_timestamp()
        marked["metadata"]["deletionGracePeriodSeconds"] = options.get("gracePeriodSeconds") or 0
        if info.resource == "namespaces" and info.group == "":
            marked.setdefault("status", {})["phase"] = "Terminating"
        self.store.write(info.group, info.resource, marked, obj)
        if info.resource == "namespaces" and info.group == "":
            self._delete_namespace_content(name)
            self._finish_namespace(name)
        return marked

    def _namespace_content(self, namespace: str) -> list[tuple[ResourceInfo, dict[str, Any]]]:
        content = []
        for group, resource, obj in self.store.all_objects():
            if obj["metadata"].get("namespace") == namespace:
                info = find_group_resource(self.registry, group, resource)
                if info is not None and info.namespaced:
                    content.append((info, obj))
        return content

    def _delete_namespace_content(self, namespace: str) -> None:
        for info, obj in self._namespace_content(namespace):
            current = self.store.get(info.group, info.resource, namespace, obj["metadata"]["name"])
            if current is not None:
                self.delete(info, namespace, obj["metadata"]["name"], {"propagationPolicy": "Background"})

    def _finish_namespace(self, namespace: str) -> None:
        """A terminating namespace disappears once its last object is gone."""
        ns = self.store.get("", "namespaces", "", namespace)
        if ns and ns["metadata"].get("deletionTimestamp") and not ns["metadata"].get("finalizers") \
                and not self._namespace_content(namespace):
            self._remove(self._namespaces, ns, "Background")

    def _remove(self, info: ResourceInfo, obj: dict[str, Any], policy: str) -> dict[str, Any]:
        deleted = self.store.remove(info.group, info.resource, obj)
        if info.group == "apiextensions.k8s.io" and info.resource == "customresourcedefinitions":
            self._delete_custom_objects(obj)
        self._collect_garbage(obj["metadata"]["uid"], policy)
        namespace = obj["metadata"].get("namespace")
        if namespace and info.namespaced:
            self._finish_namespace(namespace)
        return deleted

    def _delete_custom_objects(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        group, plural = spec.get("group", ""), (spec.get("names") or {}).get("plural", "")
        for obj in self.store.list(group, plural):
            self.store.remove(group, plural, obj)
        crds.unregister(self.registry, crd)

    def _collect_garbage(self, owner_uid: str, policy: str) -> None:
        """Background cascading deletion (or orphaning) of everything the deleted object owned."""
        for group, resource, obj in list(self.store.all_objects()):
            references = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in references):
                continue
            info = find_group_resource(self.registry, group, resource)
            if info is None or self.store.get(group, resource, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]) is not obj:
                continue
            remaining = [ref for ref in references if ref.get("uid") != owner_uid]
            if policy == "Orphan" or remaining:
                updated = copy.deepcopy(obj)
                if remaining:
                    updated["metadata"]["ownerReferences"] = remaining
                else:
                    updated["metadata"].pop("ownerReferences", None)
                self.store.write(group, resource, updated, obj)
            else:
                self.delete(info, obj["metadata"].get("namespace", ""), obj["metadata"]["name"],
                            {"propagationPolicy": "Background"})

"""What the server knows about each resource type: built-ins and, at run time, CRD-defined ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")


@dataclass(frozen=True)
class ResourceInfo:
    group: str
    version: str
    resource: str  # plural
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()  # e.g. ("status",), ("log", "status")
    verbs: tuple[str, ...] = ALL_VERBS
    # For CRD-defined resources: the CRD version entry (schema, printer columns, subresources).
    crd_version: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> tuple[str, str]:
        return (self.group, self.version)

    @property
    def custom(self) -> bool:
        return self.crd_version is not None

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def schema(self) -> dict[str, Any] | None:
        if self.crd_version is None:
            return None
        return (self.crd_version.get("schema") or {}).get("openAPIV3Schema")


def _core(resource: str, kind: str, namespaced: bool = True, short: tuple[str, ...] = (),
          categories: tuple[str, ...] = (), subresources: tuple[str, ...] = ()) -> ResourceInfo:
    return ResourceInfo("", "v1", resource, kind, kind.lower(), namespaced, short, categories, subresources)


BUILTIN_RESOURCES: tuple[ResourceInfo, ...] = (
    _core("namespaces", "Namespace", namespaced=False, short=("ns",), subresources=("status",)),
    _core("pods", "Pod", short=("po",), categories=("all",), subresources=("log", "status")),
    _core("services", "Service", short=("svc",), categories=("all",), subresources=("status",)),
    _core("configmaps", "ConfigMap", short=("cm",)),
    _core("secrets", "Secret"),
    _core("events", "Event", short=("ev",)),
    _core("serviceaccounts", "ServiceAccount", short=("sa",)),
    _core("nodes", "Node", namespaced=False, short=("no",), subresources=("status",)),
    _core("endpoints", "Endpoints", short=("ep",)),
    ResourceInfo("coordination.k8s.io", "v1", "leases", "Lease", "lease", True),
    ResourceInfo("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 "customresourcedefinition", False, ("crd", "crds"), ("api-extensions",), ("status",)),
)

# Preferred order of groups in discovery (built-ins first, like kube-apiserver).
BUILTIN_GROUPS = ("coordination.k8s.io", "apiextensions.k8s.io")


class Registry:
    """Resource types by (group, version, plural); CRDs add and remove entries while serving."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, str], ResourceInfo] = {}
        for info in BUILTIN_RESOURCES:
            self.add(info)

    def add(self, info: ResourceInfo) -> None:
        self._by_key[(info.group, info.version, info.resource)] = info

    def remove_group_resource(self, group: str, resource: str) -> None:
        for key in [k for k in self._by_key if k[0] == group and k[2] == resource]:
            del self._by_key[key]

    def get(self, group: str, version: str, resource: str) -> ResourceInfo | None:
        return self._by_key.get((group, version, resource))

    def all(self) -> list[ResourceInfo]:
        return list(self._by_key.values())

    def group_versions(self) -> dict[str, list[str]]:
        """Group -> served versions, preferred (first registered) first; core group is ''."""
        result: dict[str, list[str]] = {}
        for info in self._by_key.values():
            versions = result.setdefault(info.group, [])
            if info.version not in versions:
                versions.append(info.version)
        return result

    def in_group_version(self, group: str, version: str) -> list[ResourceInfo]:
        return [i for i in self._by_key.values() if i.group == group and i.version == version]


def find_group_resource(registry: Registry, group: str, resource: str) -> ResourceInfo | None:
    """Any served version of a group/resource (objects are stored once, whatever the version)."""
    return next((i for i in registry.all() if i.group == group and i.resource == resource), None)

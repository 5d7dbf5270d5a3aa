"""API discovery documents: aggregated (apidiscovery.k8s.io/v2) and the legacy per-group-version lists."""

from __future__ import annotations

import hashlib
from typing import Any

from .resources import BUILTIN_GROUPS, SUBRESOURCE_VERBS, Registry, ResourceInfo

AGGREGATED_CONTENT_TYPE = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def wants_aggregated(accept: str) -> bool:
    return "as=APIGroupDiscoveryList" in accept and "v=v2" in accept


def _subresource_verbs(subresource: str) -> list[str]:
    return ["get"] if subresource == "log" else list(SUBRESOURCE_VERBS)


def _ordered_groups(registry: Registry) -> list[tuple[str, list[str]]]:
    groups = registry.group_versions()
    order = [""] + [g for g in BUILTIN_GROUPS if g in groups]
    order += sorted(g for g in groups if g not in order)
    return [(g, groups[g]) for g in order if g in groups]


def _aggregated_resource(info: ResourceInfo) -> dict[str, Any]:
    kind = {"group": info.group, "version": info.version, "kind": info.kind}
    entry: dict[str, Any] = {
        "resource": info.resource,
        "responseKind": kind,
        "scope": "Namespaced" if info.namespaced else "Cluster",
        "singularResource": info.singular,
        "verbs": list(info.verbs),
    }
    if info.short_names:
        entry["shortNames"] = list(info.short_names)
    if info.categories:
        entry["categories"] = list(info.categories)
    if info.subresources:
        entry["subresources"] = [
            {"subresource": sub, "responseKind": kind, "verbs": _subresource_verbs(sub)}
            for sub in info.subresources
        ]
    return entry


def aggregated(registry: Registry, core: bool) -> dict[str, Any]:
    """`/api` (core only) or `/apis` (every other group) as one APIGroupDiscoveryList."""
    items = []
    for group, versions in _ordered_groups(registry):
        if (group == "") != core:
            continue
        items.append({
            "metadata": {"name": group},
            "versions": [
                {"version": version, "freshness": "Current",
                 "resources": [_aggregated_resource(i) for i in registry.in_group_version(group, version)]}
                for version in versions
            ],
        })
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}


def api_versions(server_address: str) -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def api_group(group: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(registry: Registry) -> dict[str, Any]:
    groups = []
    for group, versions in _ordered_groups(registry):
        if group:
            entry = api_group(group, versions)
            del entry["kind"], entry["apiVersion"]
            groups.append(entry)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def resource_list(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    infos = registry.in_group_version(group, version)
    if not infos:
        return None
    resources = []
    for info in infos:
        entry: dict[str, Any] = {
            "name": info.resource, "singularName": info.singular, "namespaced": info.namespaced,
            "kind": info.kind, "verbs": list(info.verbs),
            "storageVersionHash": hashlib.sha256(f"{info.group}/{info.resource}".encode()).hexdigest()[:12],
        }
        if info.short_names:
            entry["shortNames"] = list(info.short_names)
        if info.categories:
            entry["categories"] = list(info.categories)
        resources.append(entry)
        for sub in info.subresources:
            resources.append({"name": f"{info.resource}/{sub}", "singularName": "", "namespaced": info.namespaced,
                              "kind": info.kind, "verbs": _subresource_verbs(sub)})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

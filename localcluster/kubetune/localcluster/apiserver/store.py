"""In-memory object storage with one global resourceVersion, a bounded event history and watchers."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import expired

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


@dataclass(frozen=True)
class Change:
    """One stored change, as watchers and history see it."""

    resource_version: int
    type: str  # ADDED | MODIFIED | DELETED
    group: str
    resource: str
    namespace: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(eq=False)
class Subscription:
    group: str
    resource: str
    namespace: str | None  # None = all namespaces
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def wants(self, change: Change) -> bool:
        return (change.group == self.group and change.resource == self.resource
                and (self.namespace is None or self.namespace == change.namespace))


class Store:
    def __init__(self, history_size: int = 5000) -> None:
        self._objects: dict[tuple[str, str], dict[Key, dict[str, Any]]] = collections.defaultdict(dict)
        self._history: collections.deque[Change] = collections.deque(maxlen=history_size)
        self._subscriptions: set[Subscription] = set()
        self._resource_version = 0

    @property
    def resource_version(self) -> int:
        return self._resource_version

    def get(self, group: str, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects[(group, resource)].get((namespace, name))

    def list(self, group: str, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        objects = self._objects[(group, resource)]
        keys = sorted(k for k in objects if namespace is None or k[0] == namespace)
        return [objects[k] for k in keys]

    def all_objects(self) -> Iterable[tuple[str, str, dict[str, Any]]]:
        for (group, resource), objects in list(self._objects.items()):
            for obj in list(objects.values()):
                yield group, resource, obj

    def write(self, group: str, resource: str, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """Store `obj` (create when `old` is None) under a fresh resourceVersion and notify watchers."""
        self._resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self._objects[(group, resource)][key] = obj
        self._record(Change(self._resource_version, "MODIFIED" if old else "ADDED", group, resource,
                            key[0], obj, old))
        return obj

    def remove(self, group: str, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self._objects[(group, resource)].pop(key, None)
        self._resource_version += 1
        # A deleted object reports the resourceVersion of its deletion, like etcd3's watch does.
        deleted = {**obj, "metadata": {**meta, "resourceVersion": str(self._resource_version)}}
        self._record(Change(self._resource_version, "DELETED", group, resource, key[0], deleted, obj))
        return deleted

    def _record(self, change: Change) -> None:
        self._history.append(change)
        for subscription in list(self._subscriptions):
            if subscription.wants(change):
                subscription.queue.put_nowait(change)

    def subscribe(self, group: str, resource: str, namespace: str | None) -> Subscription:
        subscription = Subscription(group, resource, namespace)
        self._subscriptions.add(subscription)
        return subscription

    def watcher_count(self, group: str, resource: str) -> int:
        """Open watches on a resource (lets tests act once a client is really watching)."""
        return sum(1 for s in list(self._subscriptions) if s.group == group and s.resource == resource)

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def close_subscriptions(self) -> None:
        """Wake every watcher with a sentinel so streams end when the server stops."""
        for subscription in list(self._subscriptions):
            subscription.queue.put_nowait(None)

    def changes_since(self, subscription: Subscription, resource_version: int) -> list[Change]:
        """Changes after `resource_version` for a resuming watch; 410 Expired when history is gone."""
        if len(self._history) == self._history.maxlen:
            oldest_known = self._history[0].resource_version - 1
            if resource_version < oldest_known:
                raise expired(f"too old resource version: {resource_version} ({oldest_known})")
        return [c for c in self._history if c.resource_version > resource_version and subscription.wants(c)]

"""The jobs waiting to be reconciled: client-go's delaying workqueue, in asyncio.

- ``add(key, reason, after)``: the key is due ``after`` seconds from now. A key already waiting
  keeps the earlier of its two due times (and that one's reason): a burst of pod events, a tick
  and a spec change make one pass, not one each.
- ``get()``: waits for the next due key and hands it out, removed from the queue; an ``add``
  while it is processed queues it again (the job's lock then orders the two passes).
- ``forget(key)``: a deleted job's pending pass is dropped.

One queue and a fixed number of workers bound what the operator does at once, however many
jobs and events arrive: the shape of every Kubernetes controller.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._due: dict[K, tuple[float, str]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def add(self, key: K, reason: str, after: float = 0.0) -> None:
        due = time.monotonic() + max(0.0, after)
        waiting = self._due.get(key)
        if waiting is not None and waiting[0] <= due:
            return
        self._due[key] = (due, reason)
        heapq.heappush(self._heap, (due, next(self._order), key))
        self._changed.set()

    def forget(self, key: K) -> None:
        self._due.pop(key, None)

    async def get(self) -> tuple[K, str]:
        while True:
            # Entries superseded by an earlier due time, or forgotten, are dropped as they surface.
            while self._heap and self._due.get(self._heap[0][2], (None,))[0] != self._heap[0][0]:
                heapq.heappop(self._heap)
            now = time.monotonic()
            if self._heap and self._heap[0][0] <= now:
                _, _, key = heapq.heappop(self._heap)
                _, reason = self._due.pop(key)
                return key, reason
            self._changed.clear()
            wait = self._heap[0][0] - now if self._heap else None
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                pass

"""Watch streams: replay from a resourceVersion, initial events + the initial-events-end bookmark, live changes."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from .errors import APIError
from .resources import ResourceInfo
from .selectors import Selector
from .store import Change, Store

Render = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class WatchRequest:
    info: ResourceInfo
    namespace: str | None
    selector: Selector
    resource_version: str | None
    send_initial_events: bool
    timeout_seconds: float | None
    allow_bookmarks: bool = False


def visible_type(change: Change, selector: Selector) -> str | None:
    """The event a selector-filtered watcher sees: objects entering/leaving the selector are ADDED/DELETED."""
    now_matches = selector.matches(change.obj)
    was_matching = change.old is not None and selector.matches(change.old)
    if change.type == "DELETED":
        return "DELETED" if was_matching or now_matches else None
    if change.type == "ADDED":
        return "ADDED" if now_matches else None
    if now_matches and was_matching:
        return "MODIFIED"
    if now_matches:
        return "ADDED"
    if was_matching:
        return "DELETED"
    return None


def _line(event_type: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


async def stream(request: web.Request, store: Store, watch: WatchRequest,
                 current: Callable[[], list[dict[str, Any]]], present: Callable[[dict[str, Any]], dict[str, Any]],
                 render: Render) -> web.StreamResponse:
    """Serve one watch; `present` turns a stored object into the API version asked, `render` into the wire form."""
    info = watch.info
    subscription = store.subscribe(info.group, info.resource, watch.namespace if info.namespaced else None)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    try:
        initial: list[dict[str, Any]] = []
        replay: list[Change] = []
        error: APIError | None = None
        start_fresh = watch.send_initial_events or watch.resource_version in (None, "", "0")
        if start_fresh:
            initial = current()
        else:
            try:
                replay = store.changes_since(subscription, int(watch.resource_version))
            except ValueError:
                error = APIError(400, "BadRequest", f"invalid resource version {watch.resource_version!r}")
            except APIError as expired:
                error = expired
        initial_version = str(store.resource_version)
        await response.prepare(request)
        if error is not None:
            await response.write(_line("ERROR", error.status()))
            return response
        for obj in initial:
            await response.write(_line("ADDED", render(obj)))
        if watch.send_initial_events:
            bookmark = {"kind": info.kind, "apiVersion": info.api_version,
                        "metadata": {"resourceVersion": initial_version,
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}
            await response.write(_line("BOOKMARK", bookmark))
        for change in replay:
            await _send(response, change, watch.selector, present, render)
        await _follow(request, response, subscription, watch, present, render, store)
    except ConnectionResetError:
        pass
    finally:
        store.unsubscribe(subscription)
    return response


async def _send(response: web.StreamResponse, change: Change, selector: Selector,
                present: Callable[[dict[str, Any]], dict[str, Any]], render: Render) -> None:
    event_type = visible_type(change, selector)
    if event_type is not None:
        await response.write(_line(event_type, render(present(change.obj))))


# How often an idle watch wakes up to notice a vanished client and, if allowed, send a bookmark.
IDLE_WAKEUP_SECONDS = 30.0


async def _follow(request: web.Request, response: web.StreamResponse, subscription: Any, watch: WatchRequest,
                  present: Callable[[dict[str, Any]], dict[str, Any]], render: Render, store: Store) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + watch.timeout_seconds if watch.timeout_seconds else None
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            return
        wait = IDLE_WAKEUP_SECONDS if remaining is None else min(remaining, IDLE_WAKEUP_SECONDS)
        try:
            change = await asyncio.wait_for(subscription.queue.get(), wait)
        except asyncio.TimeoutError:
            if request.transport is None or request.transport.is_closing():
                return  # the client went away; otherwise this watch would wait for the next change
            if watch.allow_bookmarks:
                bookmark = {"kind": watch.info.kind, "apiVersion": watch.info.api_version,
                            "metadata": {"resourceVersion": str(store.resource_version)}}
                await response.write(_line("BOOKMARK", bookmark))
            continue
        if change is None:  # the server is stopping
            return
        await _send(response, change, watch.selector, present, render)

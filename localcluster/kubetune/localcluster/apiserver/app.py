"""The HTTP face of the embedded API server: routing, content negotiation, auth, and `APIServer`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Protocol

import yaml
from aiohttp import web

from . import discovery, openapi, protobuf, tables, watch
from . import tls as tls_module
from .errors import APIError, bad_request, method_not_allowed, route_not_found, unauthorized
from .operations import Cluster, WriteOptions
from .patch import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from .resources import Registry, ResourceInfo
from .selectors import Selector
from .store import Store

PATCH_TYPES = (MERGE_PATCH, JSON_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)
UNAUTHENTICATED_PATHS = ("/healthz", "/readyz", "/livez", "/version")
VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.1-kubetune", "gitCommit": "", "gitTreeState": "clean",
           "buildDate": "2026-01-01T00:00:00Z", "goVersion": "python", "compiler": "python", "platform": "linux/amd64"}


class LogSource(Protocol):
    """Container logs, provided by the local kubelet; raises KeyError for an unknown pod/container."""

    def stream(self, namespace: str, pod: str, container: str, follow: bool) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class Target:
    """A parsed resource URL: /api/v1/namespaces/NS/pods/NAME/log and friends."""

    info: ResourceInfo
    namespace: str | None  # None: cluster-wide (or a cluster-scoped resource)
    name: str | None
    subresource: str | None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


def _error(error: APIError) -> web.Response:
    return _json(error.status(), status=error.code)


def _wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept and "g=meta.k8s.io" in accept


class Handlers:
    def __init__(self, cluster: Cluster, token: str | None, log_source: LogSource | None) -> None:
        self.cluster = cluster
        self.token = token
        self.log_source = log_source

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            path = "/" + request.path.strip("/")
            if self.token and path not in UNAUTHENTICATED_PATHS and \
                    request.headers.get("Authorization") != f"Bearer {self.token}":
                raise unauthorized()
            return await self._route(request, path)
        except APIError as error:
            return _error(error)

    async def _route(self, request: web.Request, path: str) -> web.StreamResponse:
        parts = [p for p in path.split("/") if p]
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/version":
            return _json(VERSION)
        if parts[:1] == ["openapi"]:
            return self._openapi(parts[1:])
        if parts == ["api"]:
            return self._discovery(request, core=True)
        if parts == ["apis"]:
            return self._discovery(request, core=False)
        if parts[:1] == ["api"] and len(parts) >= 2:
            return await self._api(request, "", parts[1], parts[2:])
        if parts[:1] == ["apis"] and len(parts) == 2:
            versions = self.registry.group_versions().get(parts[1])
            if not versions:
                raise route_not_found()
            return _json(discovery.api_group(parts[1], versions))
        if parts[:1] == ["apis"] and len(parts) >= 3:
            return await self._api(request, parts[1], parts[2], parts[3:])
        raise route_not_found()

    # -- discovery and OpenAPI -----------------------------------------------------------------

    def _discovery(self, request: web.Request, core: bool) -> web.Response:
        if discovery.wants_aggregated(request.headers.get("Accept", "")):
            body = json.dumps(discovery.aggregated(self.registry, core)).encode()
            return web.Response(body=body, headers={"Content-Type": discovery.AGGREGATED_CONTENT_TYPE})
        if core:
            return _json(discovery.api_versions(request.host))
        return _json(discovery.api_group_list(self.registry))

    def _openapi(self, parts: list[str]) -> web.Response:
        if parts == ["v3"]:
            return _json(openapi.index(self.registry))
        if parts[:1] == ["v3"] and len(parts) in (3, 4):
            group, version = ("", parts[2]) if parts[1] == "api" else (parts[2], parts[3] if len(parts) == 4 else "")
            doc = openapi.document(self.registry, group, version)
            if doc is not None:
                return _json(doc)
        raise route_not_found()  # includes /openapi/v2: kubectl tolerates its absence once v3 works

    # -- resources -----------------------------------------------------------------------------

    def _target(self, group: str, version: str, rest: list[str]) -> Target:
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise route_not_found()
        info = self.registry.get(group, version, rest[0])
        if info is None:
            raise route_not_found()
        if namespace is not None and not info.namespaced:
            raise route_not_found()
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else None
        if subresource is not None and subresource not in info.subresources:
            raise route_not_found()
        return Target(info, namespace, name, subresource)

    async def _api(self, request: web.Request, group: str, version: str, rest: list[str]) -> web.StreamResponse:
        if not rest:
            body = discovery.resource_list(self.registry, group, version)
            if body is None:
                raise route_not_found()
            return _json(body)
        target = self._target(group, version, rest)
        method = request.method
        if target.name is None:
            if method == "GET":
                return await self._list_or_watch(request, target)
            if method == "POST":
                if target.namespace is None and target.info.namespaced:
                    raise method_not_allowed()
                return await self._create(request, target)
            if method == "DELETE":
                return await self._delete_collection(request, target)
            raise method_not_allowed()
        if target.info.namespaced and target.namespace is None:
            raise route_not_found()
        if target.subresource == "log":
            if method != "GET":
                raise method_not_allowed()
            return await self._log(request, target)
        if method == "GET":
            return self._get(request, target)
        if method == "PUT":
            return await self._update(request, target)
        if method == "PATCH":
            return await self._patch(request, target)
        if method == "DELETE" and target.subresource is None:
            return await self._delete(request, target)
        raise method_not_allowed()

    def _now(self) -> datetime:
        return datetime.now(timezone.utc)

    def _table(self, request: web.Request, info: ResourceInfo, objects: list[dict[str, Any]],
               resource_version: str | None) -> dict[str, Any]:
        columns = tables.crd_columns(info.crd_version) if info.custom else tables.builtin_columns(info.resource)
        include = request.query.get("includeObject", "Metadata")
        return tables.to_table(info.resource, columns, objects, self._now(), include_object=include,
                               resource_version=resource_version)

    def _get(self, request: web.Request, target: Target) -> web.Response:
        obj = self.cluster.get(target.info, target.namespace or "", target.name or "")
        if _wants_table(request) and target.subresource is None:
            return _json(self._table(request, target.info, [obj], None))
        return _json(obj)

    def _selector(self, request: web.Request) -> Selector:
        return Selector.parse(request.query.get("labelSelector"), request.query.get("fieldSelector"))

    async def _list_or_watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        info = target.info
        selector = self._selector(request)
        if request.query.get("watch") in ("true", "1", "True"):
            timeout = request.query.get("timeoutSeconds")
            spec = watch.WatchRequest(
                info=info, namespace=target.namespace, selector=selector,
                resource_version=request.query.get("resourceVersion"),
                send_initial_events=request.query.get("sendInitialEvents") == "true",
                allow_bookmarks=request.query.get("allowWatchBookmarks") == "true",
                timeout_seconds=float(timeout) if timeout else None)
            table = _wants_table(request)

            def render(obj: dict[str, Any]) -> dict[str, Any]:
                return self._table(request, info, [obj], obj["metadata"].get("resourceVersion")) if table else obj

            return await watch.stream(
                request, self.cluster.store, spec,
                current=lambda: self.cluster.list(info, target.namespace, selector),
                present=lambda obj: {**obj, "apiVersion": info.api_version, "kind": info.kind},
                render=render)
        items = self.cluster.list(info, target.namespace, selector)
        resource_version = str(self.cluster.store.resource_version)
        if _wants_table(request):
            return _json(self._table(request, info, items, resource_version))
        return _json({"kind": f"{info.kind}List", "apiVersion": info.api_version,
                      "metadata": {"resourceVersion": resource_version}, "items": items})

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if content_type == "application/vnd.kubernetes.protobuf":
            return protobuf.decode(raw)
        if "cbor" in content_type or "protobuf" in content_type:
            raise APIError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"application/json, application/yaml (got {content_type})")
        try:
            if content_type in (APPLY_PATCH, "application/yaml"):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as error:
            raise bad_request(f"the request body could not be decoded as {content_type}: {error}") from error

    def _write_options(self, request: web.Request) -> WriteOptions:
        validation = request.query.get("fieldValidation", "Warn")
        if validation not in ("Strict", "Warn", "Ignore"):
            raise bad_request(f'invalid fieldValidation {validation!r}: use "Ignore", "Warn" or "Strict"')
        dry_run = request.query.getall("dryRun", [])
        return WriteOptions(field_validation=validation, dry_run="All" in dry_run,
                            field_manager=request.query.get("fieldManager"),
                            force=request.query.get("force") == "true")

    def _written(self, result: Any, status: int) -> web.Response:
        response = _json(result.obj, status=status)
        for warning in result.warnings:
            response.headers.add("Warning", f'299 - "{warning}"')
        return response

    async def _create(self, request: web.Request, target: Target) -> web.Response:
        body = await self._body(request)
        result = self.cluster.create(target.info, target.namespace or "", body, self._write_options(request))
        return self._written(result, 201)

    async def _update(self, request: web.Request, target: Target) -> web.Response:
        body = await self._body(request)
        result = self.cluster.update(target.info, target.namespace or "", target.name or "", body,
                                     self._write_options(request), target.subresource)
        return self._written(result, 200)

    async def _patch(self, request: web.Request, target: Target) -> web.Response:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in PATCH_TYPES:
            raise APIError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"{', '.join(PATCH_TYPES)}")
        body = await self._body(request)
        result = self.cluster.patch(target.info, target.namespace or "", target.name or "", content_type, body,
                                    self._write_options(request), target.subresource)
        return self._written(result, 201 if result.created else 200)

    async def _delete_options(self, request: web.Request) -> tuple[dict[str, Any], bool]:
        options = await self._body(request) or {}
        if not isinstance(options, dict):
            raise bad_request("DeleteOptions must be a JSON object")
        if "propagationPolicy" in request.query:
            options["propagationPolicy"] = request.query["propagationPolicy"]
        if "gracePeriodSeconds" in request.query:
            options["gracePeriodSeconds"] = int(request.query["gracePeriodSeconds"])
        dry_run = "All" in request.query.getall("dryRun", []) or "All" in (options.get("dryRun") or [])
        return options, dry_run

    async def _delete(self, request: web.Request, target: Target) -> web.Response:
        options, dry_run = await self._delete_options(request)
        return _json(self.cluster.delete(target.info, target.namespace or "", target.name or "", options, dry_run))

    async def _delete_collection(self, request: web.Request, target: Target) -> web.Response:
        options, dry_run = await self._delete_options(request)
        info = target.info
        items = self.cluster.delete_collection(info, target.namespace, self._selector(request), options, dry_run)
        return _json({"kind": f"{info.kind}List", "apiVersion": info.api_version,
                      "metadata": {"resourceVersion": str(self.cluster.store.resource_version)}, "items": items})

    async def _log(self, request: web.Request, target: Target) -> web.StreamResponse:
        pod = self.cluster.get(target.info, target.namespace or "", target.name or "")
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = request.query.get("container")
        if not container:
            if len(containers) != 1:
                raise bad_request(f"a container name must be specified for pod {target.name}, "
                                  f"choose one of: [{' '.join(containers)}]")
            container = containers[0]
        elif container not in containers:
            raise bad_request(f"container {container} is not valid for pod {target.name}")
        if self.log_source is None:
            raise bad_request("pod logs are not available: this API server has no log source "
                              "(start it together with the local kubelet to read container logs)")
        follow = request.query.get("follow") in ("true", "1")
        try:
            chunks = self.log_source.stream(target.namespace or "", target.name or "", container, follow)
            iterator = chunks.__aiter__()
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = b""
            iterator = None
        except KeyError:
            raise bad_request(f'container "{container}" in pod "{target.name}" has no logs yet '
                              "(it is waiting to start)") from None
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if first:
                await response.write(first)
            if iterator is not None:
                async for chunk in iterator:
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response


class APIServer:
    """The embedded Kubernetes API server; `await start()` inside a running event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 log_source: LogSource | None = None, history_size: int = 5000, tls: bool | None = None,
                 tls_hosts: tuple[str, ...] = ()) -> None:
        self.host = host
        self.port = port
        # client-go sends bearer tokens only over TLS, so a token implies https unless told otherwise.
        use_tls = token is not None if tls is None else tls
        self.certificate = tls_module.self_signed(host, extra_hosts=tls_hosts) if use_tls else None
        self.cluster = Cluster(Store(history_size=history_size), Registry())
        self._handlers = Handlers(self.cluster, token, log_source)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def ca_data(self) -> bytes | None:
        """PEM of the server's self-signed certificate, for kubeconfig's certificate-authority-data."""
        return self.certificate.cert_pem if self.certificate else None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handlers.dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        ssl_context = self.certificate.server_context() if self.certificate else None
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context)
        await site.start()
        sockets = site._server.sockets if site._server else []  # the only way aiohttp exposes port 0's pick
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cluster.store.close_subscriptions()
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

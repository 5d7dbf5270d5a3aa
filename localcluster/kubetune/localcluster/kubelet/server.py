"""The node agent's HTTPS API: what the API server calls for `kubectl logs`.

It listens on the node's address with a certificate the cluster CA signed, as a kubelet does,
and answers only clients holding a certificate from that CA (the API server's kubelet client
certificate; a user's certificate from the admin kubeconfig works too, as on kubeadm clusters
where admins are in ``system:masters``). exec, attach, port-forward and run are refused with a
message saying so: they need the SPDY streaming protocol, which local mode does not speak.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from aiohttp import web

from kubetune.localcluster.kubelet import containerlogs
from kubetune.localcluster.kubelet.containerlogs import LogOptions
from kubetune.localcluster.pki import KeyPair

log = logging.getLogger(__name__)

FOLLOW_POLL_SECONDS = 0.2
UNSUPPORTED = {
    "exec": "kubectl exec",
    "attach": "kubectl attach",
    "portForward": "kubectl port-forward",
    "run": "running commands in containers",
}


class LogSource(Protocol):
    def log_file(self, container: str | None, previous: bool) -> tuple[Path, Callable[[], bool]]:
        """The log file of a container's current (or previous) instance, and a function that
        says whether that instance may still write to it."""
        ...


def _server_context(ca: Path, pair: KeyPair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.load_cert_chain(str(pair.cert), str(pair.key))
    context.verify_mode = ssl.CERT_REQUIRED  # a client certificate from the cluster CA, or nothing
    return context


class NodeServer:
    def __init__(self, find_pod: Callable[[str, str], LogSource | None], ca: Path, pair: KeyPair) -> None:
        self._find_pod = find_pod
        self._ssl = _server_context(ca, pair)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, address: str) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        for path, what in UNSUPPORTED.items():
            app.router.add_route("*", f"/{path}/{{tail:.*}}", self._refuse(what))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, address, 0, ssl_context=self._ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    @staticmethod
    def _refuse(what: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(
                status=501,
                text=f"{what} is not supported by the kubetune local node: containers are local "
                "processes without the SPDY streaming protocol (see the README's local-mode "
                "differences); use `kubectl logs` or run the command in a pod of its own",
            )

        return handler

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        namespace, pod_name = request.match_info["namespace"], request.match_info["pod"]
        try:
            options = LogOptions.from_query(dict(request.query))
        except ValueError as error:
            return web.Response(status=400, text=str(error))
        pod = self._find_pod(namespace, pod_name)
        if pod is None:
            return web.Response(status=404, text=f"pod {namespace}/{pod_name} is not on this node")
        try:
            path, live = pod.log_file(request.match_info["container"], options.previous)
        except KeyError as error:
            return web.Response(status=400, text=error.args[0] if error.args else str(error))
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        budget = [options.limit_bytes]

        async def send(data: bytes) -> bool:
            if budget[0] is not None:
                data = data[: budget[0]]
                budget[0] -= len(data)
            if data:
                await response.write(data)
            return budget[0] is None or budget[0] > 0

        chosen, offset = await asyncio.to_thread(containerlogs.select, path, options)
        for line in chosen:
            if not await send(line):
                return response
        if options.follow:
            await self._follow(path, offset, live, options, send)
        await response.write_eof()
        return response

    @staticmethod
    async def _follow(path: Path, offset: int, live: Callable[[], bool], options: LogOptions,
                      send: Callable[[bytes], Awaitable[bool]]) -> None:
        pending = b""
        while True:
            running = live()  # read before the file: what is written before it stops is sent
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except FileNotFoundError:
                data = b""
            offset += len(data)
            pending += data
            cut = containerlogs.whole_lines(pending)
            complete, pending = pending[:cut], pending[cut:]
            for time, line in containerlogs.lines(complete.splitlines(keepends=True)):
                if not await send(containerlogs.render(time, line, options)):
                    return
            if not running:
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)

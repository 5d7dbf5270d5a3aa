"""A fault-injecting HTTP reverse proxy for chaos tests: S3, and the Kubernetes API server.

``FaultProxy(upstream)`` listens on a loopback port (``.url``) and forwards every request to
``upstream`` as the client sent it: method, undecoded path and query, every header (``Host``
included, verbatim: AWS SigV4 signs the Host header, so a client signs for the proxy's
host:port and the upstream checks that same value), bodies streamed both ways, chunk by chunk
(a Kubernetes watch flows through event by event). It runs an aiohttp server and client on an
event loop of its own in a background thread, so synchronous code (boto3, kubectl, the
kubernetes client) can be tested through it. For an HTTPS upstream pass ``upstream_ssl``
(an ``ssl.SSLContext`` with the CA and a client certificate); ``listen_ssl`` serves TLS.

Faults are rules a test may change at any time (``add``, ``clear``); the first rule matching a
request (``method`` and ``path`` are regular expressions, the path includes the query) that
fires (``probability``; ``times``: for the next N matching requests only) decides its fate:

- ``status``: answer ``status`` with ``body`` and ``headers`` (see :func:`s3_error`,
  :func:`k8s_status`) instead of the upstream;
- ``reset``: reset the connection (TCP RST) without an answer;
- ``delay``: wait ``seconds`` (beyond the client's read timeout: a timeout), then forward the
  request, which may so reach the upstream after the client's retry of it;
- ``truncate``: pass the upstream's headers (its full Content-Length) and ``after_bytes`` bytes
  of its body, then close the connection (``rst=True``: reset it, a network cut);
- ``blackhole``: accept the request and never answer (until the proxy closes).

``forward=True`` (status, reset, delay) lets the upstream handle the request first: it took
effect, only its answer is lost or late, as when a connection dies after the server acted.
Every request is logged in ``.seen`` (method, path, headers, the fault it got, when).
``cut(path)`` closes the responses still streaming (a Kubernetes watch) whose path matches, as
a load balancer failing over does; with a ``blackhole`` rule for their path, their clients'
reconnections then reach a backend that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import ClientError, ClientResponse, ClientSession, ClientTimeout, TCPConnector, web
from yarl import URL

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "expect"})
"""Headers of one connection, not of the request: never forwarded (SigV4 does not sign them)."""


@dataclass
class Fault:
    kind: Literal["status", "reset", "delay", "truncate", "blackhole"]
    method: str = ".*"
    """Regular expression the request method must match in full."""
    path: str = ".*"
    """Regular expression searched for in the raw path with its query (``/bucket/key?uploads``)."""
    times: int | None = None
    """How many more matching requests get this fault; None: all of them."""
    probability: float = 1.0
    status: int = 500
    body: bytes = b""
    content_type: str = "application/xml"
    headers: dict[str, str] = field(default_factory=dict)
    """Headers of a ``status`` answer besides its Content-Type (``Retry-After``)."""
    seconds: float = 0.0
    after_bytes: int = 0
    rst: bool = False
    forward: bool = False


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    fault: str | None
    at: float = 0.0
    """time.monotonic() when the request arrived."""


def s3_error(status: int, code: str, message: str, **fault: object) -> Fault:
    """A ``status`` fault answering as S3 does: ``s3_error(503, "SlowDown", "Please reduce ...")``."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>faultproxy</RequestId></Error>").encode()
    return Fault("status", status=status, body=body, **fault)  # type: ignore[arg-type]


def k8s_status(status: int, reason: str, message: str = "", **fault: object) -> Fault:
    """A ``status`` fault answering as the Kubernetes API server does, with a ``Status`` object:
    ``k8s_status(429, "TooManyRequests", headers={"Retry-After": "1"})``."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message or f"faultproxy: {reason}", "reason": reason, "code": status}
    retry_after = dict(fault.get("headers") or {}).get("Retry-After")  # type: ignore[call-overload]
    if retry_after is not None:
        body["details"] = {"retryAfterSeconds": int(retry_after)}
    return Fault("status", status=status, body=json.dumps(body).encode(),  # type: ignore[arg-type]
                 content_type="application/json", **fault)


@dataclass
class FaultProxy:
    upstream: str
    upstream_ssl: ssl.SSLContext | None = None
    listen_ssl: ssl.SSLContext | None = None
    seed: int | None = None
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.upstream = self.upstream.rstrip("/")
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        # Responses being streamed, by id(request) (requests are not hashable): what cut() cuts.
        self._streams: dict[int, tuple[web.BaseRequest, ClientResponse]] = {}

    # ---- the test's side -------------------------------------------------------------
    def add(self, *faults: Fault) -> FaultProxy:
        with self._lock:
            self.faults.extend(faults)
        return self

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def cut(self, path: str = ".*", rst: bool = True) -> int:
        """Close every response still streaming whose path (with its query) matches ``path``:
        the client's connection (RST, or FIN with ``rst=False``) and the upstream's. Returns how
        many were cut."""
        async def cut() -> int:
            matching = [(request, upstream) for request, upstream in self._streams.values()
                        if re.search(path, request.raw_path)]
            for request, upstream in matching:
                self._streams.pop(id(request), None)
                _cut(request, rst=rst)
                upstream.close()
            return len(matching)
        return asyncio.run_coroutine_threadsafe(cut(), self._loop).result(30)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.url = f"{'https' if self.listen_ssl else 'http'}://127.0.0.1:{port}"
        return self

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times == 0 or not re.fullmatch(fault.method, method) or not re.search(fault.path, path):
                    continue
                if fault.probability < 1.0 and self._random.random() >= fault.probability:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    # ---- the event loop's side -------------------------------------------------------
    async def _start(self) -> int:
        self._closing = asyncio.Event()
        self._session = ClientSession(
            connector=TCPConnector(ssl=self.upstream_ssl or True),  # True: verify with the system's CAs
            auto_decompress=False, timeout=ClientTimeout(total=None, sock_connect=10),
        )
        self._runner = web.ServerRunner(web.Server(self._handle), shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.listen_ssl).start()
        return self._runner.addresses[0][1]

    async def _stop(self) -> None:
        self._closing.set()  # blackholed and delayed requests give up now
        await self._runner.cleanup()
        await self._session.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:  # idle keep-alive connections of clients that never closed them
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _wait(self, seconds: float | None) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        fault = self._pick(request.method, request.raw_path)
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), fault and fault.kind,
                              time.monotonic()))
        if fault is None or fault.kind == "truncate" or fault.forward:
            return await self._forward(request, fault)
        if fault.kind == "blackhole":
            await self._wait(None)
        elif fault.kind == "delay":
            await self._wait(fault.seconds)
            return await self._forward(request, None)
        return _misbehave(request, fault)

    async def _forward(self, request: web.BaseRequest, fault: Fault | None) -> web.StreamResponse:
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = [(key, value) for key, value in request.headers.items() if key.lower() not in HOP_BY_HOP]
        try:
            upstream = await self._session.request(
                request.method, URL(self.upstream + request.raw_path, encoded=True), headers=headers,
                data=request.content if request.body_exists else None, allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )  # TLS: SNI and the certificate check name the upstream's host, not the Host header
        except (OSError, TimeoutError) as exc:  # aiohttp's connection errors are OSErrors
            return web.Response(status=502, text=f"faultproxy: upstream {self.upstream}: {exc}")
        async with upstream:
            if fault is not None and fault.kind != "truncate":  # forwarded: the upstream acted already
                body = await upstream.read()
                if fault.kind != "delay":
                    return _misbehave(request, fault)
                await self._wait(fault.seconds)
                response = web.Response(status=upstream.status, reason=upstream.reason, body=body)
                _copy_headers(upstream.headers, response)
                return response
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            _copy_headers(upstream.headers, response)
            self._streams[id(request)] = (request, upstream)
            try:
                await response.prepare(request)
                sent = 0
                async for chunk in upstream.content.iter_any():
                    if fault is not None and sent + len(chunk) >= fault.after_bytes:
                        await response.write(chunk[: fault.after_bytes - sent])
                        break
                    await response.write(chunk)
                    sent += len(chunk)
                if fault is not None:  # truncate (also a body no longer than after_bytes: cut all the same)
                    await _drain(request)
                    return _cut(request, rst=fault.rst)
                await response.write_eof()
            except ConnectionError:  # the client went away (gave up): nothing more to send
                pass
            except ClientError:
                if id(request) in self._streams:
                    raise
                # cut(): the upstream closed under the loop
            finally:
                self._streams.pop(id(request), None)
            return response


def _misbehave(request: web.BaseRequest, fault: Fault) -> web.StreamResponse:
    if fault.kind != "status":  # reset, or a blackhole the proxy is closing
        return _cut(request, rst=True)
    response = web.Response(status=fault.status, body=fault.body, content_type=fault.content_type,
                            headers=fault.headers)
    response.force_close()  # the client may still hold a body it was told to wait with
    return response


def _copy_headers(source: object, response: web.StreamResponse) -> None:
    for key, value in source.items():  # type: ignore[attr-defined]
        if key.lower() not in HOP_BY_HOP:
            response.headers.add(key, value)


async def _drain(request: web.BaseRequest) -> None:
    """Wait until what was written left the process, so that a reset does not discard it."""
    transport = request.transport
    for _ in range(200):
        if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
            return
        await asyncio.sleep(0.005)


def _cut(request: web.BaseRequest, *, rst: bool) -> web.StreamResponse:
    """Close the client's connection mid-exchange: FIN (a clean close), or RST (a reset)."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        sock = transport.get_extra_info("socket")
        if rst and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.StreamResponse()  # never sent: the connection is gone

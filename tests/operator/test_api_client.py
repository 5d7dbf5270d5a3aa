"""How the operator waits on the API server, without a cluster: against a socket that accepts and
never answers (a blackholed connection), and a tiny HTTP server answering what a test scripts.

- every call of ``Kube`` (and the Lease's, through its client) gives up after the operator's API
  timeout instead of hanging its thread, and its job's lock, for ever;
- answers of an API server unwell for a moment (429 with Retry-After, 5xx) are retried a few
  times; a refusal (409, 422) is not;
- ``configure()`` gives kopf the same timeouts for its lists and its watches;
- the leader election goes on after a call that got no answer.
The faults on a real API server are chaos row 5 (tests/chaos/test_api_faults.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kopf
import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.api import JobRef
from kubetune.operator import handlers
from kubetune.operator.kube import Kube, OperatorApiClient, request_timeout
from kubetune.operator.leader import LeaderElection
from kubetune.operator.settings import API_TIMEOUT_SECONDS, OperatorSettings

TIMEOUT = 0.1
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "default"},
           "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
       "spec": {"containers": [{"name": "trainer", "image": "busybox"}]}}
KUBE_CALLS = {
    "create a Service": lambda kube: kube.create(SERVICE),
    "create a Pod": lambda kube: kube.create(POD),
    "read": lambda kube: kube.read("Pod", "default", "p"),
    "delete_pod": lambda kube: kube.delete_pod("default", "p", "uid"),
    "delete_job": lambda kube: kube.delete_job("default", "j", "uid"),
    "pod_log_tail": lambda kube: kube.pod_log_tail("default", "p", 20),
    "get_job": lambda kube: kube.get_job("default", "j"),
    "patch_job_status": lambda kube: kube.patch_job_status("default", "j", {"phase": "Running"}),
    "post_event": lambda kube: kube.post_event(JobRef(name="j", namespace="default", uid="uid"), "Normal", "R", "m"),
    "read the Lease": lambda kube: client.CoordinationV1Api(kube.api_client).read_namespaced_lease("l", "default"),
}


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.02)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def _configuration(host: str) -> client.Configuration:
    configuration = client.Configuration()
    configuration.host = host
    return configuration


@pytest.mark.parametrize("call", sorted(KUBE_CALLS))
def test_every_call_gives_up_on_an_api_server_that_never_answers(call: str, blackhole: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The client Kube builds for the operator (from the kubeconfig's configuration), as configure() builds it.
    monkeypatch.setattr(client.Configuration, "get_default_copy", staticmethod(lambda: _configuration(blackhole)))
    kube = Kube(pool_size=4, timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.HTTPError):  # a read timeout (a GET's, after urllib3's 3 retries)
        KUBE_CALLS[call](kube)
    assert time.monotonic() - started < 4 * TIMEOUT + 2.0  # not for ever


def test_the_api_timeout_is_a_connect_and_a_read_timeout() -> None:
    assert request_timeout(70) == (10.0, 70.0)
    assert request_timeout(4) == (4.0, 4.0)
    assert Kube(api_client=None, timeout=70).api_client.timeout == (10.0, 70.0)
    assert Kube().api_client.timeout == request_timeout(API_TIMEOUT_SECONDS)


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers) of the server's script; the last one
    for ever after. Records (method, path) of every request."""

    def _answer(self) -> None:
        server: Any = self.server
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        server.requests.append((self.command, self.path))
        status, headers = server.script.pop(0) if len(server.script) > 1 else server.script[0]
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "code": status, "message": "scripted"}
                          if status >= 400 else {"metadata": {"name": "j", "resourceVersion": "7"}}).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.requests, server.script = [], [(200, {})]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _kube(server: ThreadingHTTPServer) -> Kube:
    host = f"http://127.0.0.1:{server.server_address[1]}"
    return Kube(api_client=OperatorApiClient(_configuration(host), (1.0, 2.0), retry_delays=(0.01, 0.01, 0.01)))


def test_answers_of_an_api_server_unwell_for_a_moment_are_retried(scripted: Any) -> None:
    scripted.script = [(500, {}), (429, {"Retry-After": "0"}), (503, {}), (200, {})]
    assert _kube(scripted).get_job("default", "j") == {"metadata": {"name": "j", "resourceVersion": "7"}}
    assert len(scripted.requests) == 4
    scripted.requests.clear()
    scripted.script = [(429, {"Retry-After": "1"}), (200, {})]
    started = time.monotonic()
    assert _kube(scripted).patch_job_status("default", "j", {"phase": "Running"}) == "7"
    assert time.monotonic() - started >= 1.0  # after the server's Retry-After
    assert [method for method, _ in scripted.requests] == ["PATCH", "PATCH"]


def test_an_api_server_still_unwell_after_the_retries_fails_the_call(scripted: Any) -> None:
    scripted.script = [(500, {})]
    with pytest.raises(ApiException) as raised:
        _kube(scripted).create(POD)
    assert raised.value.status == 500 and len(scripted.requests) == 4


@pytest.mark.parametrize("status", [409, 422, 403, 404])
def test_an_answer_that_is_a_verdict_is_not_retried(scripted: Any, status: int) -> None:
    scripted.script = [(status, {})]
    with pytest.raises(ApiException) as raised:
        _kube(scripted).patch_job_status("default", "j", {"phase": "Running"})
    assert raised.value.status == status and len(scripted.requests) == 1


def _configured(seconds: int | None, kubeconfig: Any,
                monkeypatch: pytest.MonkeyPatch) -> tuple[kopf.OperatorSettings, kopf.Memo]:
    """Run the operator's startup handler as kopf would (``seconds``: the API timeout it is
    given; None: from the environment, where it is unset), then stop what it started."""
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = kopf.OperatorSettings()
    memo = kopf.Memo()
    if seconds is not None:
        memo.settings = OperatorSettings(api_timeout_seconds=seconds)

    async def start_and_stop() -> None:
        await handlers.configure(settings=settings, memo=memo)
        await handlers.close(memo=memo)
        await asyncio.gather(*memo.workers, return_exceptions=True)

    monkeypatch.delenv("KUBETUNE_API_TIMEOUT_SECONDS", raising=False)
    asyncio.run(start_and_stop())
    return settings, memo


@pytest.mark.parametrize("seconds", [None, 4])
def test_configure_gives_kopf_and_our_client_the_api_timeout(seconds: int | None, tmp_path: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    settings, memo = _configured(seconds, tmp_path / "kubeconfig", monkeypatch)
    expected = API_TIMEOUT_SECONDS if seconds is None else seconds
    connect = min(10, expected)
    # A watch that delivers nothing (the API server sends a bookmark every minute) is reopened.
    assert settings.watching.inactivity_timeout == expected
    assert settings.watching.connect_timeout == connect
    # Never a total timeout on a watch: that would end live ones too.
    assert settings.watching.client_timeout is None and settings.watching.server_timeout is None
    # kopf's lists: not its default of 5 minutes an attempt.
    assert settings.networking.request_timeout == expected and settings.networking.connect_timeout == connect
    assert memo.kube.api_client.timeout == (connect, expected)


class _FlakyLeases:
    """A CoordinationV1Api whose first read gets no answer (the API server restarting); then no
    Lease exists and creating one succeeds."""

    def __init__(self) -> None:
        self.reads = 0
        self.created: list[dict[str, Any]] = []

    def read_namespaced_lease(self, name: str, namespace: str) -> Any:
        self.reads += 1
        if self.reads == 1:
            raise urllib3.exceptions.MaxRetryError(None, f"/leases/{name}", ConnectionRefusedError(111, "refused"))
        raise ApiException(status=404, reason="Not Found")

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any]) -> None:
        self.created.append(body)


def test_the_election_goes_on_after_a_call_that_got_no_answer() -> None:
    api = _FlakyLeases()

    async def elect() -> None:
        election = LeaderElection(api, "default", "l", "me", on_lost=lambda: None, retry_seconds=0.01)  # type: ignore[arg-type]
        task = asyncio.create_task(election.run())
        try:
            await asyncio.wait_for(election.leading.wait(), 5)
        finally:
            task.cancel()
        assert not task.done() or task.cancelled()

    asyncio.run(elect())
    assert api.reads == 2 and len(api.created) == 1

"""``LocalCluster``: API server + kubelet + pod network + S3 in one asyncio loop.

From tests::

    with LocalCluster(state_dir=tmp_path) as cluster:
        subprocess.run([kubectl, "--kubeconfig", cluster.kubeconfig, "get", "pods"])

From the CLI (foreground until SIGINT/SIGTERM)::

    LocalCluster(state_dir=".kubetune").run_forever(on_ready=print_banner)
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from kubetune.localcluster import leftovers
from kubetune.localcluster.hostsfile import S3_SERVICE_NAME
from kubetune.localcluster.kubelet import Kubelet
from kubetune.localcluster.network import PodNetwork, new_prefix
from kubetune.localcluster.s3server import S3Server

log = logging.getLogger(__name__)


class _LogSourceProxy:
    """The API server needs its LogSource before the kubelet (which needs the API URL) exists."""

    def __init__(self) -> None:
        self.kubelet: Kubelet | None = None

    def stream(self, namespace: str, pod: str, container: str | None, follow: bool, **kw: Any) -> AsyncIterator[bytes]:
        if self.kubelet is None:
            raise KeyError(f"{namespace}/{pod}")
        return self.kubelet.stream(namespace, pod, container, follow, **kw)


class LocalCluster:
    """An embedded Kubernetes for local mode and tests.

    ``network``: "auto" (netns when root with iproute2, else loopback), "netns" or "loopback".
    Attributes once started: ``kubeconfig``, ``api_url``, ``s3_endpoint`` (host side),
    ``s3_cluster_endpoint`` (pod side), ``state_dir``, ``prefix``, ``network_mode``.
    """

    def __init__(self, state_dir: str | Path | None = None, network: str = "auto") -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kubetune-local-")
            state_dir = self._tmp.name
        self.state_dir = Path(state_dir).resolve()
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.network_request = network
        self.prefix = new_prefix()
        self.token = secrets.token_urlsafe(24)
        self.api_url = ""
        self.s3_endpoint = ""
        self.s3_cluster_endpoint = ""
        self.network_mode = ""
        self._server: Any = None
        self._kubelet: Kubelet | None = None
        self._network: PodNetwork | None = None
        self._s3: S3Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- async core ----------------------------------------------------------------------
    async def astart(self) -> None:
        from kubetune.localcluster.apiserver import APIServer, kubeconfig

        self.state_dir.mkdir(parents=True, exist_ok=True)
        stale = await asyncio.to_thread(leftovers.clean_crashed_clusters)
        if stale:
            log.warning("removed leftovers of crashed local clusters: %s", ", ".join(stale))
        leftovers.register(self.prefix)
        try:
            self._network = await asyncio.to_thread(PodNetwork.create, self.prefix, self.network_request)
            self.network_mode = self._network.mode
            addresses = ["127.0.0.1"]
            if self._network.host_address != "127.0.0.1":
                addresses.append(self._network.host_address)
            self._s3 = await asyncio.to_thread(
                S3Server.start, addresses, str(self.state_dir / "s3.log"),
                {leftovers.MARKER_ENV: self.prefix},
            )
            self.s3_endpoint = self._s3.url("127.0.0.1")
            self.s3_cluster_endpoint = f"http://{S3_SERVICE_NAME}:{self._s3.port}"
            proxy = _LogSourceProxy()
            self._server = APIServer(host="127.0.0.1", port=0, token=self.token, log_source=proxy)
            await self._server.start()
            self.api_url = self._server.url
            kubeconfig(
                self.api_url, self.token, self.kubeconfig, context="kubetune-local",
                ca_data=self._server.ca_data,
            )
            api_port = int(self.api_url.rsplit(":", 1)[1].split("/")[0])
            self._kubelet = Kubelet(
                self.api_url, self.token, self._network, self.state_dir,
                s3_address=self._network.host_address,
                api_host_for_pods="127.0.0.1", api_port_for_pods=api_port,
                ca_data=self._server.ca_data,
            )
            proxy.kubelet = self._kubelet
            await self._kubelet.start()
        except BaseException:
            await self.astop()
            raise

    async def astop(self) -> None:
        """Kill every pod process, remove netns/links/bridge, stop S3 and the API server."""
        if self._kubelet is not None:
            try:
                await self._kubelet.stop()
            except Exception:
                log.exception("stopping the kubelet")
            self._kubelet = None
        if self._server is not None:
            try:
                await self._server.stop()
            except Exception:
                log.exception("stopping the API server")
            self._server = None
        if self._s3 is not None:
            await asyncio.to_thread(self._s3.stop)
            self._s3 = None
        await asyncio.to_thread(leftovers.remove, self.prefix)
        if self._network is not None:
            await asyncio.to_thread(self._network.close)
            self._network = None
        leftovers.unregister(self.prefix)

    # -- background thread (tests) -------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalCluster":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="kubetune-local-cluster", daemon=True)
        self._thread.start()
        ready.wait()
        assert self._loop is not None
        try:
            asyncio.run_coroutine_threadsafe(self.astart(), self._loop).result(timeout)
        except BaseException:
            self._shutdown_thread()
            raise
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.astop(), self._loop).result(timeout)
        finally:
            self._shutdown_thread()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def _shutdown_thread(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(30)
        self._loop = None
        self._thread = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- foreground (CLI) ----------------------------------------------------------------
    def run_forever(self, on_ready: Callable[["LocalCluster"], None] | None = None) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.astart()
            try:
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
            finally:
                await self.astop()

        asyncio.run(main())

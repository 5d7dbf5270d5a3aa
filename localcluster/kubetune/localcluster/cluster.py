"""``LocalCluster``: the real Kubernetes control plane, our node agent, a pod network and S3.

From tests::

    with LocalCluster(state_dir=tmp_path) as cluster:
        subprocess.run([kubectl, "--kubeconfig", cluster.kubeconfig, "get", "pods"])

From the CLI (foreground until SIGINT/SIGTERM)::

    LocalCluster(state_dir=".kubetune").run_forever(on_ready=print_banner)

``node=False`` starts the control plane alone (envtest's shape: API, controllers and scheduler,
no node), for tests that play the node themselves. ``images`` adds repositories the node runs
to its defaults (``kubelet.images``); a pod with any other image waits in ErrImagePull.
``audit=True`` has the API server keep an audit log of users' requests
(``control_plane.audit_log_path``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from kubetune.localcluster import leftovers, pki
from kubetune.localcluster.binaries import find as find_binaries
from kubetune.localcluster.controlplane import ControlPlane
from kubetune.localcluster.hostsfile import S3_SERVICE_NAME
from kubetune.localcluster.kubelet import NODE_NAME, Kubelet
from kubetune.localcluster.kubelet.images import LocalImages
from kubetune.localcluster.network import PodNetwork, choose_free_cidr, new_prefix
from kubetune.localcluster.s3server import S3Server

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 120.0


class LocalCluster:
    """A Kubernetes on this machine, for local mode and tests.

    ``network``: "auto" (netns when root with iproute2, else loopback), "netns" or "loopback".
    ``images``: repositories the node runs besides its defaults, any tag or digest (kept as
    ``self.images``, a ``LocalImages``; an invalid name raises ``InvalidImageName`` at once).
    Attributes once started: ``kubeconfig`` (admin), ``api_url``, ``s3_endpoint`` (host side),
    ``s3_cluster_endpoint`` (pod side), ``state_dir``, ``prefix``, ``network_mode``,
    ``version`` (Kubernetes'), ``control_plane``.
    """

    def __init__(
        self, state_dir: str | Path | None = None, network: str = "auto", node: bool = True,
        images: Iterable[str] = (), audit: bool = False,
    ) -> None:
        self.images = LocalImages(images)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kubetune-local-")
            state_dir = self._tmp.name
        self.state_dir = Path(state_dir).resolve()
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.network_request = network
        self.with_node = node
        self.audit = audit
        self.prefix = new_prefix()
        self.api_url = ""
        self.s3_endpoint = ""
        self.s3_cluster_endpoint = ""
        self.network_mode = ""
        self.version = ""
        self.control_plane: ControlPlane | None = None
        self._kubelet: Kubelet | None = None
        self._network: PodNetwork | None = None
        self._s3: S3Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- async core ----------------------------------------------------------------------
    async def astart(self) -> None:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        binaries = find_binaries()  # before anything starts: a missing binary is the likeliest failure
        stale = await asyncio.to_thread(leftovers.clean_crashed_clusters)
        if stale:
            log.warning("removed leftovers of crashed local clusters: %s", ", ".join(stale))
        leftovers.register(self.prefix, self.state_dir)
        marker = {leftovers.MARKER_ENV: self.prefix}
        try:
            self._network = await asyncio.to_thread(PodNetwork.create, self.prefix, self.network_request)
            self.network_mode = self._network.mode
            address = self._network.host_address
            service_cidr = choose_free_cidr(avoid=[self._network.cidr] if self._network.cidr else [])
            credentials = pki.create(
                self.state_dir / "pki", api_addresses=[address], service_ip=str(service_cidr.network_address + 1),
                node_name=NODE_NAME, node_address=address,
            )
            self.control_plane = ControlPlane(
                self.state_dir, address=address, service_cidr=str(service_cidr), pki=credentials,
                binaries=binaries, env=marker, audit=self.audit,
            )
            s3_started = None
            if self.with_node:  # S3 starts meanwhile (it watches its parent's pid itself)
                s3_addresses = list(dict.fromkeys(["127.0.0.1", address]))
                s3_started = asyncio.ensure_future(asyncio.to_thread(
                    S3Server.start, s3_addresses, str(self.state_dir / "logs" / "s3.log"), marker
                ))
            try:
                # Blocking, and from this loop's thread on purpose: the processes die with it.
                self.control_plane.start()
            finally:
                if s3_started is not None:
                    self._s3 = await s3_started
            self.api_url = self.control_plane.api_url
            if self.with_node:
                self.s3_endpoint = self._s3.url("127.0.0.1")
                self.s3_cluster_endpoint = f"http://{S3_SERVICE_NAME}:{self._s3.port}"
                self._kubelet = Kubelet(
                    self.api_url, credentials.ca.cert, credentials.node_client, credentials.node_server,
                    self._network, self.state_dir, s3_address=address, images=self.images,
                )
                await self._kubelet.start()
            await asyncio.to_thread(self._wait_usable)
        except BaseException:
            await self.astop()
            raise

    def _wait_usable(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Until a pod can be created and scheduled: the default ServiceAccount exists (the
        admission plugin refuses pods before) and the node is Ready without the not-ready
        taint the node lifecycle controller lifts."""
        plane = self.control_plane
        assert plane is not None

        def node_schedulable() -> bool:
            node = plane.get(f"/api/v1/nodes/{NODE_NAME}")
            if node is None:
                return False
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
            return ready and not node["spec"].get("taints")

        self.version = (plane.get("/version") or {}).get("gitVersion", "")
        deadline = time.monotonic() + timeout
        waiting_for = "the default service account"
        while time.monotonic() < deadline:
            plane.check_running()
            if plane.get("/api/v1/namespaces/default/serviceaccounts/default") is not None:
                if not self.with_node or node_schedulable():
                    return
                waiting_for = f"node {NODE_NAME} to be Ready and schedulable"
            time.sleep(0.1)
        raise RuntimeError(f"the local cluster did not become usable in {timeout:.0f}s: waiting for {waiting_for}")

    async def astop(self) -> None:
        """Kill every pod process, stop S3 and the control plane, remove netns/links/bridge."""
        if self._kubelet is not None:
            try:
                await self._kubelet.stop()
            except Exception:
                log.exception("stopping the node agent")
            self._kubelet = None
        if self.control_plane is not None:
            await asyncio.to_thread(self.control_plane.stop)
            self.control_plane = None
        if self._s3 is not None:
            await asyncio.to_thread(self._s3.stop)
            self._s3 = None
        await asyncio.to_thread(leftovers.remove, self.prefix)
        if self._network is not None:
            await asyncio.to_thread(self._network.close)
            self._network = None
        leftovers.unregister(self.prefix)

    # -- background thread (tests) -------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "LocalCluster":
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

    def stop(self, timeout: float = 90.0) -> None:
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
        """Run until SIGINT or SIGTERM (or a control plane process dies), then stop cleanly."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.astart()
            try:
                if on_ready is not None:  # in a thread: it may take seconds, the node agent runs meanwhile
                    await asyncio.to_thread(on_ready, self)
                while not stop.is_set():
                    assert self.control_plane is not None
                    self.control_plane.check_running()
                    try:
                        await asyncio.wait_for(stop.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
            finally:
                await self.astop()

        asyncio.run(main())

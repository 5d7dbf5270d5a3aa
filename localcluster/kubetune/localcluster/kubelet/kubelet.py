"""The local kubelet: registers a Node, schedules pods onto it, runs them, serves their logs.

It is an API *client* over HTTP, like a real kubelet: it watches pods (relisting on 410 or a
dropped stream), binds unscheduled pods to its node (it is the cluster's scheduler too), and
runs one ``PodWorker`` per pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

from kubetune.localcluster import hostsfile
from kubetune.localcluster.leftovers import MARKER_ENV
from kubetune.localcluster.mountpoints import MountPoints
from kubetune.localcluster.kubelet import podconfig
from kubetune.localcluster.kubelet.apiclient import ApiClient, ApiError
from kubetune.localcluster.kubelet.podstatus import ContainerState, now
from kubetune.localcluster.kubelet.podworker import PodWorker
from kubetune.localcluster.network import PodNetwork

log = logging.getLogger(__name__)

NODE_NAME = "kubetune-local"
HEARTBEAT_SECONDS = 10.0
SERVICE_POLL_SECONDS = 1.0
DNS_COALESCE_SECONDS = 0.05


def _memory_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Kubelet:
    """Runs the cluster's pods as local processes. Also the API server's ``LogSource``."""

    def __init__(
        self,
        api_url: str,
        token: str,
        network: PodNetwork,
        state_dir: Path,
        s3_address: str,
        api_host_for_pods: str = "127.0.0.1",
        api_port_for_pods: int = 443,
        node_name: str = NODE_NAME,
        ca_data: bytes | None = None,
    ) -> None:
        self.api = ApiClient(api_url, token, ca_data)
        self.network = network
        self.state_dir = Path(state_dir)
        self.node_name = node_name
        self.s3_address = s3_address
        self._api_host_for_pods = api_host_for_pods
        self._api_port_for_pods = api_port_for_pods
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self._services: list[hostsfile.ServiceRecord] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._dns_dirty = asyncio.Event()
        self.mount_points = MountPoints()

    # -- environment ---------------------------------------------------------------------
    def base_env(self, hostname: str) -> dict[str, str]:
        """Env every container starts from; the pod's own env overrides it."""
        venv_bin = os.path.dirname(sys.executable)
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        env = {
            "PATH": f"{venv_bin}:{path}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": hostname,
            "KUBERNETES_SERVICE_HOST": self._api_host_for_pods,
            "KUBERNETES_SERVICE_PORT": str(self._api_port_for_pods),
            # Lets `down` and the next `up` find this cluster's pod processes.
            MARKER_ENV: self.network.prefix,
        }
        return env

    # -- main loop -----------------------------------------------------------------------
    async def start(self) -> None:
        await self._register_node()
        for coro in (self._heartbeat(), self._watch_pods(), self._poll_services(), self._write_dns()):
            self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        workers = list(self.workers.values())
        await asyncio.gather(*(w.terminate() for w in workers), return_exceptions=True)
        self.workers.clear()
        self.mount_points.release_all()
        await self.api.close()

    async def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "node-role.kubernetes.io/control-plane": "",
                },
            },
            "spec": {},
        }
        try:
            await self.api.request("POST", "/api/v1/nodes", node)
        except ApiError as err:
            if err.status != 409:
                raise
        await self._patch_node_status()

    async def _patch_node_status(self) -> None:
        stamp = now()
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{_memory_kib()}Ki",
            "pods": "110",
            "ephemeral-storage": "0",
        }
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubetune local kubelet is posting ready status",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.network.host_address},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.37.0-kubetune",
                "operatingSystem": "linux",
                "architecture": os.uname().machine,
                "containerRuntimeVersion": "kubetune-local://0.1.0",
                "osImage": "local processes",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        await self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._patch_node_status()
            except Exception as err:
                log.warning("node heartbeat failed: %s", err)

    async def _watch_pods(self) -> None:
        while True:
            try:
                listing = await self.api.get("/api/v1/pods")
                seen = set()
                for pod in listing.get("items") or []:
                    seen.add(pod["metadata"].get("uid"))
                    await self._on_pod("ADDED", pod)
                for uid in [u for u in self.workers if u not in seen]:
                    await self._forget(self.workers[uid])
                rv = (listing.get("metadata") or {}).get("resourceVersion", "0")
                while True:
                    async for event in self.api.watch("/api/v1/pods", rv):
                        obj = event.get("object") or {}
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            await self._on_pod(event["type"], obj)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # 410 Gone, dropped connection, API restart: relist
                log.debug("pod watch restarting: %s", err)
                await asyncio.sleep(0.5)

    async def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid")
        spec = pod.get("spec") or {}
        worker = self.workers.get(uid)
        if kind == "DELETED" or meta.get("deletionTimestamp"):
            if worker is not None:
                await self._forget(worker)
            return
        node = spec.get("nodeName")
        if node and node != self.node_name:
            return
        if worker is not None:
            worker.pod = pod
            return
        if not node:
            try:
                await self.api.merge_patch(
                    f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    {"spec": {"nodeName": self.node_name}},
                )
            except ApiError as err:
                log.warning("binding %s/%s failed: %s", meta.get("namespace"), meta.get("name"), err)
                return
            spec["nodeName"] = self.node_name
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return  # finished before this kubelet started: nothing to run
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        worker.start()

    async def _forget(self, worker: PodWorker) -> None:
        self.workers.pop(worker.uid, None)
        await worker.terminate()
        self.dns_changed()

    # -- objects a pod refers to ---------------------------------------------------------
    async def fetch_objects(
        self, namespace: str, refs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, bytes]]:
        found: dict[tuple[str, str], dict[str, bytes]] = {}
        for kind, name in refs:
            plural = "secrets" if kind == "secret" else "configmaps"
            obj = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
            if obj is not None:
                found[(kind, name)] = podconfig.object_data(kind, obj)
        return found

    # -- DNS -----------------------------------------------------------------------------
    def dns_changed(self, new_worker: PodWorker | None = None) -> None:
        """Pods or services changed. A new pod's own file is written at once (before its
        process starts); everyone else's in the next coalesced pass, which keeps a burst of
        N pods at O(N) rewrites of every file instead of O(N) per pod."""
        if new_worker is not None:
            self.write_hosts_files(only=new_worker)
        self._dns_dirty.set()

    def write_hosts_files(self, only: PodWorker | None = None) -> None:
        records = [
            hostsfile.PodRecord(
                namespace=w.namespace, name=w.name, ip=w.state.pod_ip,
                hostname=(w.pod.get("spec") or {}).get("hostname"),
                subdomain=(w.pod.get("spec") or {}).get("subdomain"),
            )
            for w in self.workers.values()
            if w.net is not None
        ]
        shared = hostsfile.cluster_lines(records, self._services, self.s3_address)
        for record, worker in zip(records, [w for w in self.workers.values() if w.net is not None]):
            if only is not None and worker is not only:
                continue
            if worker.dir.exists():
                hostsfile.write_in_place(worker.hosts_path, hostsfile.render_pod_hosts(record, shared))

    async def _write_dns(self) -> None:
        # Services change without pod events; the poller marks DNS dirty.
        while True:
            await self._dns_dirty.wait()
            await asyncio.sleep(DNS_COALESCE_SECONDS)
            self._dns_dirty.clear()
            self.write_hosts_files()

    async def _poll_services(self) -> None:
        while True:
            try:
                listing = await self.api.get("/api/v1/services")
                services = [
                    hostsfile.ServiceRecord(
                        namespace=s["metadata"]["namespace"], name=s["metadata"]["name"],
                        cluster_ip=(s.get("spec") or {}).get("clusterIP"),
                    )
                    for s in listing.get("items") or []
                ]
                if services != self._services:
                    self._services = services
                    self._dns_dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.debug("service poll failed: %s", err)
            await asyncio.sleep(SERVICE_POLL_SECONDS)

    # -- LogSource -----------------------------------------------------------------------
    def _find(self, namespace: str, pod: str) -> PodWorker:
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == pod:
                return worker
        raise KeyError(f"{namespace}/{pod}")

    def stream(
        self, namespace: str, pod: str, container: str | None, follow: bool, previous: bool = False
    ) -> AsyncIterator[bytes]:
        """Container logs; with ``follow`` keeps streaming until the process ends."""
        worker = self._find(namespace, pod)
        state = worker.container_state(container)
        restart = state.restart_count - 1 if previous else state.restart_count
        if restart < 0:
            raise KeyError(f"{namespace}/{pod}/{container}: no previous container")
        return self._tail(worker, state, restart, follow)

    async def _tail(
        self, worker: PodWorker, state: ContainerState, restart: int, follow: bool
    ) -> AsyncIterator[bytes]:
        path = worker.log_path(state, restart)
        while follow and not path.exists() and not worker.exited.is_set():
            await asyncio.sleep(0.2)
        if not path.exists():
            return
        with open(path, "rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    yield chunk
                    continue
                if not follow:
                    return
                running = (
                    state.restart_count == restart
                    and state.state in ("running", "waiting")
                    and not worker.exited.is_set()
                )
                if not running:
                    chunk = f.read()
                    if chunk:
                        yield chunk
                    return
                await asyncio.sleep(0.2)

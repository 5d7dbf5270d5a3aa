"""The local node agent (our kubelet): one Node of a real Kubernetes control plane whose pods
are local processes.

Like a kubelet it is only an API client with the node's own identity: it registers its Node
(the machine's CPUs, memory, disk and GPUs as capacity), renews the node Lease, watches the
pods the scheduler binds to it (``spec.nodeName``), runs one ``PodWorker`` per pod, finishes
graceful deletions, and serves container logs to the API server over TLS (``server.py``). It
runs only the images it knows (``images.LocalImages``: the defaults plus ``images``).
Scheduling, garbage collection, service accounts and everything else are the control plane's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from kubetune.localcluster import hostsfile
from kubetune.localcluster.kubelet import podconfig
from kubetune.localcluster.kubelet.apiclient import ApiClient, ApiError, client_ssl_context
from kubetune.localcluster.kubelet.devices import GPUs, RESOURCE, count_gpus
from kubetune.localcluster.kubelet.images import LocalImages
from kubetune.localcluster.kubelet.podstatus import now
from kubetune.localcluster.kubelet.podworker import PodWorker
from kubetune.localcluster.kubelet.server import NodeServer
from kubetune.localcluster.leftovers import MARKER_ENV
from kubetune.localcluster.mountpoints import MountPoints
from kubetune.localcluster.network import PodNetwork
from kubetune.localcluster.pki import KeyPair

log = logging.getLogger(__name__)

NODE_NAME = "kubetune-local"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
NODE_STATUS_SECONDS = 60.0
SERVICE_POLL_SECONDS = 1.0
DNS_COALESCE_SECONDS = 0.05
DEFAULT_GRACE_SECONDS = 30


def _memory_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def micro_time() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Kubelet:
    """Runs the pods bound to its Node as local processes."""

    def __init__(
        self,
        api_url: str,
        ca: Path,
        client: KeyPair,
        server: KeyPair,
        network: PodNetwork,
        state_dir: Path,
        s3_address: str,
        node_name: str = NODE_NAME,
        images: LocalImages | None = None,
    ) -> None:
        # The node's own identity (system:node:<name>) toward the API server.
        self.api = ApiClient(api_url, client_ssl_context(ca, client.cert, client.key))
        self.network = network
        self.state_dir = Path(state_dir)
        self.node_name = node_name
        self.s3_address = s3_address
        self.images = images or LocalImages()
        host_port = api_url.removeprefix("https://").rstrip("/")
        self.api_host, self.api_port = host_port.rsplit(":", 1)
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self.gpus = GPUs(count_gpus())
        self.mount_points = MountPoints()
        self.server = NodeServer(self.find_pod, ca, server)
        self._services: list[hostsfile.ServiceRecord] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._dns_dirty = asyncio.Event()
        self._node_uid = ""
        self._version = ""
        self._conditions_since = now()  # the node's conditions have held since registration

    # -- environment ---------------------------------------------------------------------
    def base_env(self, hostname: str) -> dict[str, str]:
        """Env every container starts from; the pod's own env overrides it."""
        venv_bin = os.path.dirname(sys.executable)
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        return {
            "PATH": f"{venv_bin}:{path}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": hostname,
            # No kube-proxy here: in-cluster clients go straight to the API server's address.
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": self.api_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": self.api_port,
            # Lets `down` and the next `up` find this cluster's pod processes.
            MARKER_ENV: self.network.prefix,
        }

    # -- main loop -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.server.start(self.network.host_address)
        version = await self.api.get("/version")
        self._version = version.get("gitVersion", "")
        await self._register_node()
        await self._renew_lease()
        for coro in (self._lease_loop(), self._status_loop(), self._watch_pods(), self._poll_services(),
                     self._write_dns()):
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
        # The cluster is going away with its API: stop at once, report nothing.
        await asyncio.gather(*(w.stop(grace=2.0, report=False) for w in workers), return_exceptions=True)
        for worker in workers:
            worker.remove_files()
        self.workers.clear()
        self.mount_points.release_all()
        await self.server.stop()
        for task in list(self._background):
            task.cancel()
        await self.api.close()

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the Node and its Lease ------------------------------------------------------------
    def _node_status(self) -> dict[str, Any]:
        stamp = now()
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{_memory_kib()}Ki",
            "pods": "110",
            "ephemeral-storage": str(shutil.disk_usage(self.state_dir).total),
        }
        if self.gpus.count:
            capacity[RESOURCE] = str(self.gpus.count)

        def condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
                    "lastHeartbeatTime": stamp, "lastTransitionTime": self._conditions_since}

        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("MemoryPressure", False, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", False, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", False, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", True, "KubeletReady", "kubetune local node is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.network.host_address},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.server.port}},
            "nodeInfo": {
                "kubeletVersion": self._version,
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
                "containerRuntimeVersion": "kubetune-local://processes",
                "osImage": "local processes in the node's Python environment",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def _register_node(self) -> None:
        status = self._node_status()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                # Only labels NodeRestriction lets a kubelet set on itself.
                "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                           "kubernetes.io/arch": status["nodeInfo"]["architecture"]},
            },
            "spec": {},
            "status": status,
        }
        try:
            created = await self.api.post("/api/v1/nodes", node)
        except ApiError as err:
            if err.status != 409:
                raise
            created = await self.api.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": node["status"]})
        self._node_uid = created["metadata"]["uid"]

    async def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.node_name}"
        try:
            await self.api.patch(path, {"spec": {"renewTime": micro_time()}}, "application/merge-patch+json")
        except ApiError as err:
            if err.status != 404:
                raise
            await self.api.post(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.node_name,
                    "namespace": LEASE_NAMESPACE,
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.node_name,
                                         "uid": self._node_uid}],
                },
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_SECONDS,
                         "renewTime": micro_time()},
            })

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            try:
                await self._renew_lease()
            except Exception as err:
                log.warning("node lease renewal failed: %s", err)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(NODE_STATUS_SECONDS)
            try:
                await self.api.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})
            except Exception as err:
                log.warning("node status update failed: %s", err)

    # -- pods ----------------------------------------------------------------------------
    async def _watch_pods(self) -> None:
        params = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while True:
            try:
                listing = await self.api.get("/api/v1/pods", params)
                seen = set()
                for pod in listing.get("items") or []:
                    seen.add(pod["metadata"]["uid"])
                    await self._on_pod("ADDED", pod)
                for uid in [u for u in self.workers if u not in seen]:
                    await self._on_pod("DELETED", self.workers[uid].pod)
                rv = (listing.get("metadata") or {}).get("resourceVersion", "0")
                while True:
                    async for event in self.api.watch("/api/v1/pods", rv, params=params):
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
        uid = meta["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                self.workers.pop(uid, None)
                self.spawn(self._forget(worker, meta))
            return
        if meta.get("deletionTimestamp"):
            if worker is None:
                self.spawn(self._delete_pod(meta))
            elif not worker.stopping:
                worker.pod = pod
                self.spawn(self._terminate(worker, meta))
            return
        if worker is not None:
            worker.pod = pod
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return  # finished before this node agent started: nothing to run
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        worker.start()

    @staticmethod
    def _grace(meta: dict[str, Any], pod: dict[str, Any]) -> float:
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        return float(grace if grace is not None else DEFAULT_GRACE_SECONDS)

    async def _terminate(self, worker: PodWorker, meta: dict[str, Any]) -> None:
        """Graceful deletion: stop the containers, report the final status, then delete."""
        await worker.stop(self._grace(meta, worker.pod), report=True)
        await self._delete_pod(meta)

    async def _forget(self, worker: PodWorker, meta: dict[str, Any]) -> None:
        """The pod is gone from the API (force-deleted, or our final delete went through)."""
        if not worker.stopping:
            await worker.stop(min(self._grace(meta, worker.pod), 2.0), report=False)
        elif not worker.exited.is_set():
            await worker.exited.wait()
        worker.remove_files()
        self.dns_changed()

    async def _delete_pod(self, meta: dict[str, Any]) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            await self.api.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiError as err:
            if err.status not in (404, 409):  # gone already, or a new pod took the name
                log.warning("final delete of pod %s/%s failed: %s", meta["namespace"], meta["name"], err)

    def find_pod(self, namespace: str, name: str) -> PodWorker | None:
        """The pod of that name; a new pod, not one of the same name still shutting down."""
        matches = [w for w in self.workers.values() if (w.namespace, w.name) == (namespace, name)]
        return min(matches, key=lambda w: w.stopping, default=None)

    # -- what a pod refers to --------------------------------------------------------------
    async def fetch_objects(
        self, namespace: str, refs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, bytes]]:
        """Secrets and ConfigMaps by reference. 403 counts as absent: the Node authorizer
        grants access once it has seen the pod that refers to them, a moment after binding."""
        found: dict[tuple[str, str], dict[str, bytes]] = {}
        for kind, name in refs:
            plural = "secrets" if kind == "secret" else "configmaps"
            try:
                obj = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
            except ApiError as err:
                if err.status != 403:
                    raise
                obj = None
            if obj is not None:
                found[(kind, name)] = podconfig.object_data(kind, obj)
        return found

    async def request_token(self, pod: dict[str, Any], source: podconfig.TokenSource) -> str:
        """A bound service-account token for ``pod`` (TokenRequest API), as the kubelet gets it."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        account = spec.get("serviceAccountName") or "default"
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": source.expiration_seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        if source.audience:
            body["spec"]["audiences"] = [source.audience]
        try:
            answer = await self.api.post(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", body
            )
        except ApiError as err:
            raise podconfig.ConfigError(f"service account token for {account}: {err}") from None
        return answer["status"]["token"]

    def event(self, pod: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``pod`` from this node (best effort, in the background)."""
        meta = pod["metadata"]
        stamp = now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }

        async def post() -> None:
            try:
                await self.api.post(f"/api/v1/namespaces/{meta['namespace']}/events", body)
            except Exception as err:
                log.debug("event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], err)

        self.spawn(post())

    # -- DNS -----------------------------------------------------------------------------
    def dns_changed(self, new_worker: PodWorker | None = None) -> None:
        """Pods or services changed. A new pod's own file is written at once (before its
        process starts); everyone else's in the next coalesced pass, which keeps a burst of
        N pods at O(N) rewrites of every file instead of O(N) per pod."""
        if new_worker is not None:
            self.write_hosts_files(only=new_worker)
        self._dns_dirty.set()

    def write_hosts_files(self, only: PodWorker | None = None) -> None:
        with_net = [w for w in self.workers.values() if w.net is not None]
        records = [
            hostsfile.PodRecord(
                namespace=w.namespace, name=w.name, ip=w.state.pod_ip or "",
                hostname=(w.pod.get("spec") or {}).get("hostname"),
                subdomain=(w.pod.get("spec") or {}).get("subdomain"),
            )
            for w in with_net
        ]
        shared = hostsfile.cluster_lines(records, self._services, self.s3_address, self.api_host)
        for record, worker in zip(records, with_net):
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

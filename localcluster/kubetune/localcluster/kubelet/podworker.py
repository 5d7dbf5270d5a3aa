"""One pod's life on the local kubelet: network, config, process, restarts, status, teardown.

Local-mode differences from a real kubelet (documented for users):
* ``image`` is ignored: the command runs in the cluster's own Python environment (its venv's
  ``bin`` first on PATH, so ``torchrun`` and ``kubetune`` resolve).
* ``securityContext.runAsUser``/``runAsNonRoot`` are ignored: processes run as the user that
  started the cluster.
* Only the first container of ``spec.containers`` runs (after the init containers, in order).
* No resource limits, probes or image pulls.
* Termination messages: a per-pod file bind-mounted at ``terminationMessagePath``; without
  mount namespaces its path is passed in ``$KUBETUNE_TERMINATION_LOG`` instead (see termination.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.localcluster.kubelet import podconfig, termination
from kubetune.localcluster.kubelet.apiclient import ApiError
from kubetune.localcluster.kubelet.podstatus import (
    ContainerState,
    PodState,
    build_status,
    now,
    pod_phase,
    terminated_reason,
)
from kubetune.localcluster.network import PodNet

if TYPE_CHECKING:
    from kubetune.localcluster.kubelet.kubelet import Kubelet

log = logging.getLogger(__name__)

CONFIG_RETRY_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 10.0
MAX_GRACE_SECONDS = 10.0
PR_SET_PDEATHSIG = 1


def _die_with_kubelet() -> None:
    """Runs in the child before exec: SIGKILL it if the kubelet's thread dies (a crashed
    cluster must not leave training processes behind). Survives exec of ip/unshare/sh."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class PodWorker:
    def __init__(self, kubelet: "Kubelet", pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid") or f"{self.namespace}-{self.name}"
        spec = pod.get("spec") or {}
        self.container_spec: dict[str, Any] = spec["containers"][0]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.dir = kubelet.state_dir / "pods" / self.uid
        self.log_dir = self.dir / "logs"
        self.container = ContainerState(
            name=self.container_spec["name"], image=self.container_spec.get("image", "")
        )
        self.init_specs: list[dict[str, Any]] = list(spec.get("initContainers") or [])
        self.init_containers = [ContainerState(name=c["name"], image=c.get("image", "")) for c in self.init_specs]
        if self.init_specs:
            self.container.reason = "PodInitializing"
        self.state = PodState(host_ip=kubelet.network.host_address)
        self.net: PodNet | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()  # the pod will run no more processes
        self.task: asyncio.Task[None] | None = None
        self._terminating = False
        self._mount_points: list[str] = []

    # -- paths used by logs --------------------------------------------------------------
    def container_state(self, name: str | None) -> ContainerState:
        for state in [self.container, *self.init_containers]:
            if name in (None, state.name):
                return state
        raise KeyError(name)

    def log_path(self, container: ContainerState, restart: int | None = None) -> Path:
        n = container.restart_count if restart is None else restart
        return self.log_dir / f"{container.name}.{n}.log"

    def termination_file(self, container: ContainerState) -> Path:
        return self.dir / f"{container.name}.termination-log"

    @property
    def hosts_path(self) -> Path:
        return self.dir / "hosts"

    @property
    def hostname(self) -> str:
        return (self.pod.get("spec") or {}).get("hostname") or self.name

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")

    async def _run(self) -> None:
        try:
            await self._run_inner()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("pod %s/%s: kubelet error", self.namespace, self.name)
            self._set_terminated(self.container, 128, "StartError", f"local kubelet could not run the container: {err}")
            self.state.phase = "Failed"
            await self._report()
        finally:
            self.exited.set()

    async def _run_inner(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # IP and DNS entry before any process, so peers resolve each other from the start.
        self.net = await asyncio.to_thread(self.kubelet.network.add_pod)
        self.state.pod_ip = self.net.ip
        self.kubelet.dns_changed(new_worker=self)
        await self._report()
        if not await self._run_init_containers():
            return
        self.state.initialized_at = self.state.initialized_at or now()
        backoff = 1.0
        while not self._terminating:
            argv, env, mounts = await self._prepare(self.container_spec, self.container)
            if argv is None:
                await asyncio.sleep(CONFIG_RETRY_SECONDS)
                continue
            exit_code = await self._run_container(self.container_spec, self.container, argv, env, mounts)
            if self._terminating:
                return
            restart = self.restart_policy == "Always" or (
                self.restart_policy == "OnFailure" and exit_code != 0
            )
            self.state.phase = pod_phase(self.restart_policy, self.container, restart)
            if not restart:
                await self._report()
                self._release_mount_points()
                await self._release_network()
                return
            # Kubernetes: CrashLoopBackOff with doubling delay; shorter locally.
            self.container.last_terminated = self.container.terminated_dict()
            self.container.restart_count += 1
            self.container.state = "waiting"
            self.container.reason = "CrashLoopBackOff"
            self.container.message = f"back-off {backoff:.0f}s restarting failed container"
            await self._report()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _run_init_containers(self) -> bool:
        """Run each init container to success, in order. False if the pod failed or is going."""
        for spec, container in zip(self.init_specs, self.init_containers):
            backoff = 1.0
            while True:
                if self._terminating:
                    return False
                argv, env, mounts = await self._prepare(spec, container)
                if argv is None:
                    await asyncio.sleep(CONFIG_RETRY_SECONDS)
                    continue
                code = await self._run_container(spec, container, argv, env, mounts)
                if self._terminating:
                    return False
                if code == 0:
                    break
                if self.restart_policy == "Never":
                    self.state.phase = "Failed"
                    await self._report()
                    self._release_mount_points()
                    await self._release_network()
                    return False
                container.last_terminated = container.terminated_dict()
                container.restart_count += 1
                container.state, container.reason = "waiting", "CrashLoopBackOff"
                await self._report()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        return True

    async def _prepare(
        self, spec: dict[str, Any], container: ContainerState
    ) -> tuple[list[str] | None, dict[str, str], list[tuple[str, str, bool]]]:
        """Resolve env and volumes; on a missing object, report CreateContainerConfigError."""
        assert self.net is not None
        facts = podconfig.PodFacts(
            pod_ip=self.net.ip, node_name=self.kubelet.node_name, host_ip=self.state.host_ip or ""
        )
        try:
            objects = await self.kubelet.fetch_objects(self.namespace, podconfig.referenced_objects(self.pod))
            volumes = podconfig.materialise_volumes(self.pod, self.dir, objects, facts)
            mounts = podconfig.container_mounts(spec, volumes)
            env = podconfig.resolve_env(self.pod, spec, objects, facts)
        except podconfig.ConfigError as err:
            if container.reason != "CreateContainerConfigError" or container.message != str(err):
                container.state = "waiting"
                container.reason = "CreateContainerConfigError"
                container.message = str(err)
                await self._report()
            return None, {}, []
        command = list(spec.get("command") or [])
        args = podconfig.expand_args(list(spec.get("args") or []), env)
        command = podconfig.expand_args(command, env)
        argv = command + args
        if not argv:
            container.state = "waiting"
            container.reason = "CreateContainerConfigError"
            container.message = (
                "the local kubelet ignores images, so the container needs a command "
                f"(container {container.name} of {self.namespace}/{self.name})"
            )
            await self._report()
            return None, {}, []
        # Emptied at every start: a restarted container must not report its previous message.
        message_file = self.termination_file(container)
        message_file.write_bytes(b"")
        full_env = self.kubelet.base_env(self.hostname)
        if self.kubelet.network.use_mount_namespace:
            message_path = termination.message_path(spec)
            mounts = [*mounts, (str(message_file), message_path, False)]
            targets = [t for src, t, _ in mounts if not os.path.isfile(src)]
            working_dir = spec.get("workingDir")
            self._release_mount_points()
            self._mount_points = self.kubelet.mount_points.claim(targets + ([working_dir] if working_dir else []))
            self._mount_points += self.kubelet.mount_points.claim_file(message_path)
        else:
            full_env[termination.PATH_ENV] = str(message_file)
        full_env.update(env)
        return argv, full_env, mounts

    async def _run_container(
        self, spec: dict[str, Any], container: ContainerState,
        argv: list[str], env: dict[str, str], mounts: list[tuple[str, str, bool]],
    ) -> int:
        assert self.net is not None
        working_dir = spec.get("workingDir")
        wrapped = self.kubelet.network.wrap_command(
            self.net, argv, hostname=self.hostname, hosts_file=str(self.hosts_path),
            mounts=mounts, working_dir=working_dir,
        )
        cwd = None
        if not self.kubelet.network.use_mount_namespace:
            cwd = working_dir if working_dir and os.path.isdir(working_dir) else str(self.dir)
        log_file = open(self.log_path(container), "ab")
        try:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *wrapped, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                    preexec_fn=_die_with_kubelet,
                )
            except OSError as err:
                self._set_terminated(container, 128, "StartError", str(err))
                return 128
        finally:
            log_file.close()
        container.pid = self.process.pid
        container.state = "running"
        container.reason = ""
        container.message = None
        container.started_at = now()
        main = container is self.container
        self.state.start_time = self.state.start_time or container.started_at
        if main:
            self.state.phase = "Running"
            self.state.ready_since = container.started_at
        await self._report()
        code = await self.process.wait()
        if main:
            self.state.ready_since = now()
        exit_code = 128 - code if code < 0 else code
        message = termination.read_message(spec, self.termination_file(container), self.log_path(container), exit_code)
        if code < 0:
            self._set_terminated(container, exit_code, "Error", message, signal_number=-code)
        else:
            self._set_terminated(container, code, terminated_reason(code), message)
        return exit_code

    @staticmethod
    def _set_terminated(
        container: ContainerState, code: int, reason: str, message: str | None, signal_number: int | None = None
    ) -> None:
        container.state = "terminated"
        container.exit_code = code
        container.reason = reason
        container.message = message
        container.signal = signal_number
        container.finished_at = now()
        container.started_at = container.started_at or container.finished_at

    async def _report(self) -> None:
        if self._terminating:
            return
        body = {"status": build_status(self.state, self.container, self.init_containers)}
        try:
            await self.kubelet.api.merge_patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status", body
            )
        except ApiError as err:
            if err.status != 404:  # deleted meanwhile: the DELETED event will follow
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, err)
        except Exception as err:  # the API may be stopping; status is best effort
            log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, err)

    async def terminate(self) -> None:
        """Stop the pod: SIGTERM its process group, SIGKILL after the grace period, clean up."""
        self._terminating = True
        grace = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        grace = min(float(grace if grace is not None else 30), MAX_GRACE_SECONDS)
        process = self.process
        if process is not None and process.returncode is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                pass
        if process is not None:
            # Children that ignored SIGTERM, or outlived the leader, still share its group.
            self._signal_group(process.pid, signal.SIGKILL)
            if process.returncode is None:
                await process.wait()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        self._release_mount_points()
        await self._release_network()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.exited.set()

    def _release_mount_points(self) -> None:
        self.kubelet.mount_points.release(self._mount_points)
        self._mount_points = []

    async def _release_network(self) -> None:
        """A finished pod keeps its podIP in status (like Kubernetes) but no namespace or DNS."""
        if self.net is not None:
            net, self.net = self.net, None
            await asyncio.to_thread(self.kubelet.network.remove_pod, net)
            self.kubelet.dns_changed()

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

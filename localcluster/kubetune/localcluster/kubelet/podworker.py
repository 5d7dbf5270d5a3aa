"""One pod's life on the local node: network, config, processes, restarts, status, teardown.

What a kubelet does, for containers that are local processes:
* init containers run one after another, then every container at once, each restarted by the
  pod's ``restartPolicy`` (CrashLoopBackOff from 1 s doubling to 60 s, the shorter back-off of
  KEP-4603, instead of 10 s to 5 min);
* deletion is graceful: SIGTERM to every container's main process (PID 1 in a container: a
  process it started must be told by it), SIGKILL to all of the container's processes after the
  grace period, the final status (Succeeded or Failed) reported, then the node agent deletes
  the pod for good;
* stdout and stderr go to CRI-format log files (``containerlogs``), one per container start;
* termination messages: a per-container file bind-mounted at ``terminationMessagePath``;
  without mount namespaces its path is passed in ``$KUBETUNE_TERMINATION_LOG`` instead;
* images: a container whose image the node does not run (``images``) waits with
  ErrImagePull, then ImagePullBackOff (back-off as for restarts), and never starts.

Local-mode differences (each one a pod Event, see ``local_mode_differences``): the image's
contents are not used, the command runs in this Python environment, as the cluster's own user;
no probes, no resource limits (the scheduler still places pods by their requests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kubetune.localcluster.kubelet import containerlogs, podconfig, termination
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
from kubetune.localcluster.processes import die_with_parent

if TYPE_CHECKING:
    from kubetune.localcluster.kubelet.kubelet import Kubelet

log = logging.getLogger(__name__)

CONFIG_RETRY_SECONDS = 1.0
PULL_RESYNC_SECONDS = 1.0  # how long ErrImagePull shows before ImagePullBackOff (the kubelet's next sync)
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
LOG_DRAIN_SECONDS = 2.0
TOKEN_REFRESH_FRACTION = 0.8  # the kubelet renews a projected token at 80% of its lifetime
WAITING_LOG_ANSWERS = {"ErrImagePull": "image can't be pulled", "ImagePullBackOff": "trying and failing to pull image"}


def local_mode_differences(pod: dict[str, Any]) -> list[str]:
    """What this pod asks for that local mode does not do, in words for an Event."""
    spec = pod.get("spec") or {}
    found: list[str] = []
    pod_context = spec.get("securityContext") or {}
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        context = {**pod_context, **(container.get("securityContext") or {})}
        name = container["name"]
        for key in ("runAsUser", "runAsGroup"):
            if key in context:
                found.append(f"{name}: {key} {context[key]} (runs as uid {os.geteuid()})")
        if context.get("runAsNonRoot") and os.geteuid() == 0:
            found.append(f"{name}: runAsNonRoot (runs as root)")
        if context.get("readOnlyRootFilesystem"):
            found.append(f"{name}: readOnlyRootFilesystem")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                found.append(f"{name}: {probe} (ready while running)")
        if (container.get("resources") or {}).get("limits"):
            found.append(f"{name}: resource limits (not enforced)")
    return found


class PodWorker:
    def __init__(self, node: "Kubelet", pod: dict[str, Any]) -> None:
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        spec = pod.get("spec") or {}
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.dir = node.state_dir / "pods" / self.uid
        self.log_dir = self.dir / "logs"
        self.specs: list[dict[str, Any]] = list(spec.get("containers") or [])
        self.containers = [ContainerState(name=c["name"], image=c.get("image", "")) for c in self.specs]
        self.init_specs: list[dict[str, Any]] = list(spec.get("initContainers") or [])
        self.init_containers = [ContainerState(name=c["name"], image=c.get("image", "")) for c in self.init_specs]
        if self.init_specs:
            for container in self.containers:
                container.reason = "PodInitializing"
        self.state = PodState(host_ip=node.network.host_address)
        self.net: PodNet | None = None
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.exited = asyncio.Event()  # the pod will run no more processes
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self._stop_requested = asyncio.Event()
        self._report_lock = asyncio.Lock()
        self._volumes_lock = asyncio.Lock()
        self._mount_points: list[str] = []
        self._tokens: dict[podconfig.TokenSource, tuple[str, float]] = {}  # token, refresh at (monotonic)
        self.gpus: list[int] = []
        self._deadline: asyncio.Task[None] | None = None

    # -- what the node API and DNS read ---------------------------------------------------
    def container_state(self, name: str | None) -> ContainerState:
        everything = [*self.containers, *self.init_containers]
        if name is None:
            return everything[0]
        for state in everything:
            if state.name == name:
                return state
        raise KeyError(f"container {name} is not valid for pod {self.name}")

    def log_path(self, container: ContainerState, restart: int | None = None) -> Path:
        n = container.restart_count if restart is None else restart
        return self.log_dir / f"{container.name}.{n}.log"

    def log_file(self, container: str | None, previous: bool) -> tuple[Path, Callable[[], bool]]:
        state = self.container_state(container)
        if not previous and state.state == "waiting" and state.last_terminated is None:
            # Never started: the kubelet answers why instead of logs (validateContainerLogStatus).
            why = WAITING_LOG_ANSWERS.get(state.reason, state.reason)
            raise KeyError(f'container "{state.name}" in pod "{self.name}" is waiting to start: {why}')
        restart = state.restart_count - 1 if previous else state.restart_count
        if restart < 0:
            raise KeyError(f'previous terminated container "{state.name}" in pod "{self.name}" not found')

        def live() -> bool:
            return (
                state.restart_count == restart and state.state in ("running", "waiting")
                and not self.exited.is_set()
            )

        return self.log_path(state, restart), live

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
            while isinstance(err, ExceptionGroup):
                err = err.exceptions[0]
            log.exception("pod %s/%s: node agent error", self.namespace, self.name)
            for container in self.containers:
                if container.state != "terminated":
                    self._set_terminated(
                        container, 128, "StartError", f"the local node could not run the container: {err}"
                    )
            self.state.phase = "Failed"
            await self._report()
            self._release()
            await self._release_network()
            self.exited.set()

    async def _run_inner(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        differences = local_mode_differences(self.pod)
        if differences:
            self.node.event(self.pod, "Warning", "LocalModeDifference",
                            "not applied in local mode: " + "; ".join(differences))
        # IP and DNS entry before any process, so peers resolve each other from the start.
        self.net = await asyncio.to_thread(self.node.network.add_pod)
        self.state.pod_ip = self.net.ip
        self.state.start_time = now()
        self.state.sandbox_ready_at = now()
        self.gpus = self.node.gpus.allocate(self.uid, podconfig.gpu_request(self.pod))
        self.node.dns_changed(new_worker=self)
        await self._report()
        deadline = (self.pod.get("spec") or {}).get("activeDeadlineSeconds")
        if deadline is not None:
            self._deadline = asyncio.create_task(self._enforce_deadline(float(deadline)))
        if not await self._run_init_containers():
            if not self.stopping:  # a failed init container; a stop reports by itself
                await self._finish()
            return
        self.state.initialized_at = self.state.initialized_at or now()
        refresher = asyncio.create_task(self._refresh_tokens())
        try:
            # A task group, not gather: when one container's loop fails, the others stop too.
            async with asyncio.TaskGroup() as group:
                for spec, container in zip(self.specs, self.containers):
                    group.create_task(self._container_loop(spec, container))
        finally:
            refresher.cancel()
        if not self.stopping:
            await self._finish()

    async def _enforce_deadline(self, seconds: float) -> None:
        """``activeDeadlineSeconds``: past it, the kubelet kills the pod and fails it."""
        await self._pause(seconds)
        if self.stopping or self.exited.is_set():
            return
        message = "Pod was active on the node longer than the specified deadline"
        self.node.event(self.pod, "Normal", "DeadlineExceeded", message)
        grace = float((self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        await self.stop(grace, report=False)
        self.state.phase, self.state.reason, self.state.message = "Failed", "DeadlineExceeded", message
        await self._report(force=True)

    async def _finish(self) -> None:
        """Every container has stopped for good: report the final phase, free the network."""
        if self._deadline is not None:
            self._deadline.cancel()
        self.state.phase = pod_phase(self.restart_policy, self.init_containers, self.containers)
        await self._report()
        self._release()
        await self._release_network()
        self.exited.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the pod is being stopped."""
        try:
            await asyncio.wait_for(self._stop_requested.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _container_loop(self, spec: dict[str, Any], container: ContainerState) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        while not self.stopping:
            if not await self._ensure_image(spec, container):
                return
            prepared = await self._prepare(spec, container)
            if prepared is None:
                await self._pause(CONFIG_RETRY_SECONDS)
                continue
            exit_code = await self._run_container(spec, container, *prepared)
            if self.stopping:
                return
            restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)
            if not restart:
                self.state.phase = pod_phase(self.restart_policy, self.init_containers, self.containers)
                await self._report()
                return
            self._back_off(container, backoff)
            self.state.phase = pod_phase(self.restart_policy, self.init_containers, self.containers)
            await self._report()
            await self._pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _back_off(self, container: ContainerState, backoff: float) -> None:
        container.last_terminated = container.terminated_dict()
        container.restart_count += 1
        container.state = "waiting"
        container.reason = "CrashLoopBackOff"
        container.message = (
            f"back-off {backoff:.0f}s restarting failed container={container.name} pod={self.name}_{self.namespace}"
        )
        self.node.event(self.pod, "Warning", "BackOff", f"Back-off restarting failed container {container.name}")

    async def _run_init_containers(self) -> bool:
        """Run each init container to success, in order. False if the pod failed or is going."""
        for spec, container in zip(self.init_specs, self.init_containers):
            backoff = FIRST_BACKOFF_SECONDS
            while True:
                if self.stopping:
                    return False
                if not await self._ensure_image(spec, container):
                    return False
                prepared = await self._prepare(spec, container)
                if prepared is None:
                    await self._pause(CONFIG_RETRY_SECONDS)
                    continue
                code = await self._run_container(spec, container, *prepared)
                if self.stopping:
                    return False
                if code == 0:
                    break
                if self.restart_policy == "Never":
                    for main in self.containers:
                        main.reason = "PodInitializing"
                    return False
                self._back_off(container, backoff)
                await self._report()
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        return True

    # -- images ----------------------------------------------------------------------------
    async def _ensure_image(self, spec: dict[str, Any], container: ContainerState) -> bool:
        """The kubelet's image step before each start. An image this node does not run keeps
        the container waiting until the pod is stopped (False then), retried with back-off and
        Events as a real node does, though here no retry can succeed: the node's images are
        fixed when it starts."""
        failure = self.node.images.ensure(spec.get("image", ""), spec.get("imagePullPolicy"))
        if failure is None:
            return True
        backoff = FIRST_BACKOFF_SECONDS
        while not self.stopping:
            await self._show_image_failure(container, failure.reason, failure.message, failure.events)
            if failure.backoff_message is not None:
                await self._pause(PULL_RESYNC_SECONDS)
                if self.stopping:
                    break
                # As the kubelet does, the back-off message carries the failed pull's error.
                message = f"{failure.backoff_message}: {failure.reason}: {failure.message}"
                await self._show_image_failure(container, "ImagePullBackOff", message,
                                               (("Normal", "BackOff", failure.backoff_message),))
            await self._pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        return False

    async def _show_image_failure(
        self, container: ContainerState, reason: str, message: str, events: tuple[tuple[str, str, str], ...]
    ) -> None:
        container.state, container.reason, container.message = "waiting", reason, message
        # The kubelet's startContainer adds "Error: <reason>" to the image manager's own events.
        for kind, event_reason, text in (*events, ("Warning", "Failed", f"Error: {reason}")):
            self.node.event(self.pod, kind, event_reason, text)
        await self._report()

    # -- configuration ---------------------------------------------------------------------
    async def _tokens_now(self) -> dict[podconfig.TokenSource, str]:
        """The pod's projected service-account tokens, requested again when 80% through."""
        for source in podconfig.token_sources(self.pod):
            held = self._tokens.get(source)
            if held is None or time.monotonic() >= held[1]:
                token = await self.node.request_token(self.pod, source)
                self._tokens[source] = (token, time.monotonic() + TOKEN_REFRESH_FRACTION * source.expiration_seconds)
        return {source: token for source, (token, _) in self._tokens.items()}

    async def _volumes(self) -> tuple[dict[tuple[str, str], dict[str, bytes]], dict[str, Path]]:
        # One writer at a time: the pod's containers start together and share its volumes.
        async with self._volumes_lock:
            objects = await self.node.fetch_objects(self.namespace, podconfig.referenced_objects(self.pod))
            tokens = await self._tokens_now()
            volumes = await asyncio.to_thread(
                podconfig.materialise_volumes, self.pod, self.dir, objects, self._facts(), tokens
            )
        return objects, volumes

    async def _refresh_tokens(self) -> None:
        """Rewrite projected volumes before their tokens expire (and configMaps and Secrets
        with them, as the kubelet's periodic sync does)."""
        sources = podconfig.token_sources(self.pod)
        while sources and not self.stopping:
            due = min((refresh for _, refresh in self._tokens.values()), default=time.monotonic() + 60)
            await self._pause(max(1.0, due - time.monotonic()))
            try:
                await self._volumes()
            except (podconfig.ConfigError, ApiError) as err:
                log.warning("pod %s/%s: refreshing volumes failed: %s", self.namespace, self.name, err)

    def _facts(self) -> podconfig.PodFacts:
        assert self.net is not None
        return podconfig.PodFacts(pod_ip=self.net.ip, node_name=self.node.node_name, host_ip=self.state.host_ip or "")

    async def _prepare(
        self, spec: dict[str, Any], container: ContainerState
    ) -> tuple[list[str], dict[str, str], list[tuple[str, str, bool]]] | None:
        """Resolve env and volumes; on a missing object, report CreateContainerConfigError."""
        try:
            objects, volumes = await self._volumes()
            mounts = podconfig.container_mounts(spec, volumes)
            env = podconfig.resolve_env(self.pod, spec, objects, self._facts())
        except (podconfig.ConfigError, ApiError) as err:
            await self._config_error(container, str(err))
            return None
        argv = podconfig.expand_args(list(spec.get("command") or []), env) + podconfig.expand_args(
            list(spec.get("args") or []), env
        )
        if not argv:
            await self._config_error(
                container,
                "the local node runs a container's command, not its image's entrypoint, so the container "
                f"needs a command (container {container.name} of {self.namespace}/{self.name})",
            )
            return None
        # Emptied at every start: a restarted container must not report its previous message.
        message_file = self.termination_file(container)
        message_file.write_bytes(b"")
        full_env = self.node.base_env(self.hostname)
        full_env.update(podconfig.gpu_env(spec, self.gpus, self.node.gpus.count))
        if self.node.network.use_mount_namespace:
            message_path = termination.message_path(spec)
            mounts = [*mounts, (str(message_file), message_path, False)]
            targets = [t for src, t, _ in mounts if not os.path.isfile(src)]
            working_dir = spec.get("workingDir")
            self._mount_points += self.node.mount_points.claim(targets + ([working_dir] if working_dir else []))
            self._mount_points += self.node.mount_points.claim_file(message_path)
        else:
            full_env[termination.PATH_ENV] = str(message_file)
        full_env.update(env)
        return argv, full_env, mounts

    async def _config_error(self, container: ContainerState, message: str) -> None:
        if container.reason != "CreateContainerConfigError" or container.message != message:
            container.state = "waiting"
            container.reason = "CreateContainerConfigError"
            container.message = message
            self.node.event(self.pod, "Warning", "Failed", f"Error: {message}")
            await self._report()

    # -- processes -------------------------------------------------------------------------
    async def _run_container(
        self, spec: dict[str, Any], container: ContainerState,
        argv: list[str], env: dict[str, str], mounts: list[tuple[str, str, bool]],
    ) -> int:
        assert self.net is not None
        working_dir = spec.get("workingDir")
        wrapped = self.node.network.wrap_command(
            self.net, argv, hostname=self.hostname, hosts_file=str(self.hosts_path),
            mounts=mounts, working_dir=working_dir,
        )
        cwd = None
        if not self.node.network.use_mount_namespace:
            cwd = working_dir if working_dir and os.path.isdir(working_dir) else str(self.dir)
        try:
            process = await asyncio.create_subprocess_exec(
                *wrapped, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as err:
            self._set_terminated(container, 128, "StartError", str(err))
            return 128
        self.processes[container.name] = process
        with open(self.log_path(container), "ab") as sink:
            assert process.stdout is not None and process.stderr is not None
            pumps = [
                asyncio.create_task(containerlogs.pump(process.stdout, "stdout", sink)),
                asyncio.create_task(containerlogs.pump(process.stderr, "stderr", sink)),
            ]
            container.pid = process.pid
            container.state = "running"
            container.reason = ""
            container.message = None
            container.started_at = now()
            if all(c.state == "running" for c in self.containers):
                self.state.ready_since = container.started_at
            if self._is_main(container):
                self.state.phase = pod_phase(self.restart_policy, self.init_containers, self.containers)
            self.node.event(self.pod, "Normal", "Started", f"Started container {container.name}")
            try:
                await self._report()
                code = await process.wait()
            finally:
                # The container is its process group, as a container is its cgroup: what it
                # left running goes with it (or all of it, if the pod's worker is cancelled).
                _signal_group(process.pid, signal.SIGKILL)
                _, running = await asyncio.wait(pumps, timeout=LOG_DRAIN_SECONDS)
                for pump in running:
                    pump.cancel()
        self.processes.pop(container.name, None)
        if self._is_main(container) and self.state.ready_since:
            self.state.ready_since = now()
        # Killed by signal N: exit code 128+N and reason Error, as containerd reports it (never
        # OOMKilled: no memory limit is enforced here). `terminated.signal` stays unset: a real
        # kubelet never fills it in, so nothing may rely on it.
        exit_code = 128 - code if code < 0 else code
        message = termination.read_message(spec, self.termination_file(container), self.log_path(container), exit_code)
        self._set_terminated(container, exit_code, terminated_reason(exit_code), message)
        return exit_code

    def _is_main(self, container: ContainerState) -> bool:
        return any(container is main for main in self.containers)

    @staticmethod
    def _set_terminated(container: ContainerState, code: int, reason: str, message: str | None) -> None:
        container.state = "terminated"
        container.exit_code = code
        container.reason = reason
        container.message = message
        container.finished_at = now()
        container.started_at = container.started_at or container.finished_at

    async def _report(self, force: bool = False) -> None:
        if self.stopping and not force:
            return  # the stop reports the final status itself
        async with self._report_lock:
            body = {"status": build_status(self.state, self.containers, self.init_containers)}
            try:
                await self.node.api.patch(f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status", body)
            except ApiError as err:
                if err.status != 404:  # deleted meanwhile: the DELETED event will follow
                    log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, err)
            except Exception as err:  # the API may be stopping; status is best effort
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, err)

    async def stop(self, grace: float, report: bool) -> None:
        """Stop the pod: SIGTERM every container's main process, SIGKILL after ``grace`` seconds, report the
        final status (``report``: the pod still exists in the API), free what it held."""
        self.stopping = True
        self._stop_requested.set()
        running = dict(self.processes)
        for name, process in running.items():
            if process.returncode is None:
                self.node.event(self.pod, "Normal", "Killing", f"Stopping container {name}")
                # As a container runtime does: to the main process only, so a launcher
                # (torchrun, a shell) passes it on once, as it would in any cluster.
                _signal_process(process.pid, signal.SIGTERM)
        if running:
            waits = [asyncio.create_task(p.wait()) for p in running.values()]
            _, late = await asyncio.wait(waits, timeout=grace)
            for process in running.values():
                if process.returncode is None:
                    _signal_group(process.pid, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in running.values()))
            for task in late:
                task.cancel()
        if self._deadline is not None and self._deadline is not asyncio.current_task():
            self._deadline.cancel()
        if self.task is not None and not self.task.done():
            try:  # the container loops notice `stopping` and record how each process ended
                await asyncio.wait_for(asyncio.shield(self.task), 5)
            except (asyncio.TimeoutError, Exception):
                self.task.cancel()
        if report:
            self.state.phase = pod_phase(self.restart_policy, self.init_containers, self.containers, terminal=True)
            await self._report(force=True)
        self._release()
        await self._release_network()
        self.exited.set()

    def remove_files(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _release(self) -> None:
        self.node.mount_points.release(self._mount_points)
        self._mount_points = []
        self.node.gpus.release(self.uid)

    async def _release_network(self) -> None:
        """A finished pod keeps its podIP in status (like Kubernetes) but no namespace or DNS."""
        if self.net is not None:
            net, self.net = self.net, None
            await asyncio.to_thread(self.node.network.remove_pod, net)
            self.node.dns_changed()


def _signal_process(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

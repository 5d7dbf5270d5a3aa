"""Pure builders for the pod ``status`` the node agent reports, shaped like a real kubelet's
(``pkg/kubelet/kubelet_pods.go``: ``getPhase`` and ``generateAPIPodStatus``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    """What the node agent knows about one container, turned into a containerStatus."""

    name: str
    image: str
    restart_count: int = 0
    # one of: waiting, running, terminated
    state: str = "waiting"
    reason: str = "ContainerCreating"
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    last_terminated: dict[str, Any] | None = None
    pid: int | None = None

    def terminated_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id or None,
            "message": self.message or None,
        }
        return out

    @property
    def container_id(self) -> str:
        return f"local://{self.pid}" if self.pid else ""

    def to_status(self) -> dict[str, Any]:
        # Every state key is present, the inactive ones as null: the status goes out as a
        # strategic merge patch, which would otherwise keep the previous state beside the new
        # one (and the API server refuses a container in two states).
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None}
        if self.state == "running":
            state["running"] = {"startedAt": self.started_at}
        elif self.state == "terminated":
            state["terminated"] = self.terminated_dict()
        else:
            state["waiting"] = {"reason": self.reason, "message": self.message or None}
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": self.container_id or None,
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {
                "waiting": None, "running": None,
                "terminated": self.last_terminated,
            },
        }


def terminated_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


@dataclass
class PodState:
    phase: str = "Pending"
    pod_ip: str | None = None
    host_ip: str | None = None
    start_time: str | None = None
    scheduled_at: str = field(default_factory=now)
    sandbox_ready_at: str | None = None
    initialized_at: str | None = None
    ready_since: str | None = None
    message: str | None = None
    reason: str | None = None


def pod_phase(
    restart_policy: str,
    init_containers: list[ContainerState],
    containers: list[ContainerState],
    terminal: bool = False,
) -> str:
    """The kubelet's ``getPhase``. ``terminal``: the pod is being deleted and every container
    has stopped, so it ends Succeeded or Failed whatever its restart policy."""
    failed_init = sum(c.state == "terminated" and c.exit_code != 0 for c in init_containers)
    pending_init = sum(not (c.state == "terminated" and c.exit_code == 0) for c in init_containers)
    running = waiting = stopped = succeeded = 0
    for container in containers:
        if container.state == "running":
            running += 1
        elif container.state == "terminated":
            stopped += 1
            succeeded += container.exit_code == 0
        elif container.last_terminated is not None:
            stopped += 1  # waiting to restart after it ran
        else:
            waiting += 1
    if failed_init and restart_policy == "Never":
        return "Failed"
    if pending_init and not terminal:
        return "Pending"
    if waiting and not terminal:
        return "Pending"
    if running:
        return "Running"
    if stopped:
        if terminal:
            return "Succeeded" if stopped == succeeded else "Failed"
        if restart_policy == "Always":
            return "Running"
        if stopped == succeeded == len(containers):
            return "Succeeded"
        if restart_policy == "Never":
            return "Failed"
        return "Running"
    return "Failed" if terminal else "Pending"


def _condition(kind: str, ok: bool, when: str | None, reason: str | None = None) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": when or now(),
        "reason": None if ok else reason,
    }


def _init_status(container: ContainerState) -> dict[str, Any]:
    status = container.to_status()
    # An init container is "ready" once it has completed successfully.
    status["ready"] = container.state == "terminated" and container.exit_code == 0
    status["started"] = container.state == "running"
    return status


def build_status(
    pod: PodState, containers: list[ContainerState], init_containers: list[ContainerState] | None = None
) -> dict[str, Any]:
    """The ``status`` to send as a strategic merge patch of the pod's /status subresource.
    Without probes a container is ready while it runs."""
    init_containers = init_containers or []
    ready = bool(containers) and all(c.state == "running" for c in containers)
    finished = pod.phase in ("Succeeded", "Failed")
    not_ready_reason = "PodCompleted" if finished else "ContainersNotReady"
    init_reason = "PodCompleted" if finished else "ContainersNotInitialized"
    status: dict[str, Any] = {
        "phase": pod.phase,
        "conditions": [
            _condition("PodReadyToStartContainers", pod.sandbox_ready_at is not None and not finished,
                       pod.sandbox_ready_at),
            _condition("Initialized", pod.initialized_at is not None, pod.initialized_at, init_reason),
            _condition("ContainersReady", ready, pod.ready_since, not_ready_reason),
            _condition("Ready", ready, pod.ready_since, not_ready_reason),
            _condition("PodScheduled", True, pod.scheduled_at),
        ],
        "containerStatuses": [c.to_status() for c in containers],
        "message": pod.message,
        "reason": pod.reason,
    }
    if init_containers:
        status["initContainerStatuses"] = [_init_status(c) for c in init_containers]
    if pod.host_ip:
        status["hostIP"] = pod.host_ip
        status["hostIPs"] = [{"ip": pod.host_ip}]
    if pod.pod_ip:
        status["podIP"] = pod.pod_ip
        status["podIPs"] = [{"ip": pod.pod_ip}]
    if pod.start_time:
        status["startTime"] = pod.start_time
    return status

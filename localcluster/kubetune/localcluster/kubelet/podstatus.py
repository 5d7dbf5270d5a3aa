"""Pure builders for the pod ``status`` the kubelet reports, shaped like a real kubelet's."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    """What the kubelet knows about one container, turned into a containerStatus."""

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
    signal: int | None = None
    last_terminated: dict[str, Any] | None = None
    pid: int | None = None

    def terminated_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.signal:
            out["signal"] = self.signal
        if self.message:
            out["message"] = self.message
        return out

    @property
    def container_id(self) -> str:
        return f"local://{self.pid}" if self.pid else ""

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
        }
        if self.pid:
            status["containerID"] = self.container_id
        if self.state == "running":
            status["state"] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            status["state"] = {"terminated": self.terminated_dict()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            status["state"] = {"waiting": waiting}
        status["lastState"] = (
            {"terminated": self.last_terminated} if self.last_terminated else {}
        )
        return status


def terminated_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


@dataclass
class PodState:
    phase: str = "Pending"
    pod_ip: str | None = None
    host_ip: str | None = None
    start_time: str | None = None
    scheduled_at: str = field(default_factory=now)
    initialized_at: str | None = None
    ready_since: str | None = None
    ready: bool = False
    message: str | None = None
    reason: str | None = None


def _condition(kind: str, ok: bool, when: str | None, reason: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": when or now(),
    }
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_phase(restart_policy: str, container: ContainerState, will_restart: bool) -> str:
    """Phase of a single-container pod, following the kubelet's rules."""
    if container.state == "running":
        return "Running"
    if container.state == "terminated":
        if will_restart:
            return "Running"
        return "Succeeded" if container.exit_code == 0 else "Failed"
    if container.restart_count > 0 and restart_policy != "Never":
        return "Running"  # waiting in CrashLoopBackOff between restarts
    return "Pending"


def _init_status(container: ContainerState) -> dict[str, Any]:
    status = container.to_status()
    # An init container is "ready" once it has completed successfully.
    status["ready"] = container.state == "terminated" and container.exit_code == 0
    status["started"] = container.state == "running"
    return status


def build_status(
    pod: PodState, container: ContainerState, init_containers: list[ContainerState] | None = None
) -> dict[str, Any]:
    """The full ``status`` object for a merge patch of the /status subresource."""
    ready = container.state == "running"
    not_ready_reason = "PodCompleted" if pod.phase in ("Succeeded", "Failed") else "ContainersNotReady"
    status: dict[str, Any] = {
        "phase": pod.phase,
        "conditions": [
            _condition("PodScheduled", True, pod.scheduled_at),
            _condition("Initialized", pod.initialized_at is not None, pod.initialized_at, "ContainersNotInitialized"),
            _condition("ContainersReady", ready, pod.ready_since, not_ready_reason),
            _condition("Ready", ready, pod.ready_since, not_ready_reason),
        ],
        "containerStatuses": [container.to_status()],
        **({"initContainerStatuses": [_init_status(c) for c in init_containers]} if init_containers else {}),
        "qosClass": "BestEffort",
    }
    if pod.host_ip:
        status["hostIP"] = pod.host_ip
        status["hostIPs"] = [{"ip": pod.host_ip}]
    if pod.pod_ip:
        status["podIP"] = pod.pod_ip
        status["podIPs"] = [{"ip": pod.pod_ip}]
    if pod.start_time:
        status["startTime"] = pod.start_time
    if pod.message:
        status["message"] = pod.message
    if pod.reason:
        status["reason"] = pod.reason
    return status

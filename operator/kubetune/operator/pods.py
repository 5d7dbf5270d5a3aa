"""Pure reading of the job's pods: what the reconciler needs of each, and how a failed one
explains itself.

A failed worker is described in its own words, best first: the trainer's termination message
(its one-line error and exit code); else, for a rank that died under torchrun, torchrun's
"Root Cause" block (which rank, which exit code or signal), never the ``=====`` banner that
ends torchrun's log; else the container's reason (``OOMKilled``, ``Evicted``) and the last
meaningful line of its log tail.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Any

from kubetune.api.termination import TerminationMessage
from kubetune.api.labels import (
    ATTEMPT_LABEL, COMPONENT_LABEL, CONTAINER_NAME, PREFLIGHT, REPLICA_INDEX_LABEL, WORKER,
)

STUCK_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
})
"""Container waiting reasons that do not cure themselves quickly: a pod in one is stuck."""

_ROOT_CAUSE = re.compile(r"rank\s*:\s*(?P<rank>\d+).*?exitcode\s*:\s*(?P<code>-?\d+)", re.S)
_SIGNAL_LINE = re.compile(r"Signal (?P<number>\d+) \((?P<name>SIG[A-Z0-9]+)\) received")


@dataclass(frozen=True)
class PodObservation:
    """One of the job's pods, as the reconciler needs it."""

    name: str
    uid: str
    role: str  # worker | preflight
    index: int  # the worker's rank among the pods; -1 for the preflight pod
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    terminating: bool = False
    created: str | None = None
    exit_code: int | None = None
    reason: str | None = None  # the container's (Error, OOMKilled, Completed) or the pod's (Evicted)
    message: str | None = None
    finished: str | None = None
    outcome: TerminationMessage | None = None  # the trainer's termination message, if it left one
    stuck: str | None = None  # why it cannot start, "Reason: message", while it cannot

    @property
    def stuck_reason(self) -> str | None:
        return self.stuck.split(":", 1)[0] if self.stuck else None

    @property
    def active(self) -> bool:
        return self.phase in ("Pending", "Running", "Unknown") and not self.terminating


def observe_pod(pod: dict[str, Any]) -> PodObservation:
    """Read a pod (as the API returns it) into a PodObservation."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    status = pod.get("status") or {}
    exit_code = reason = message = finished = stuck = None
    for container in status.get("containerStatuses") or []:
        if container.get("name") != CONTAINER_NAME:
            continue
        state = container.get("state") or {}
        if terminated := state.get("terminated"):
            exit_code = terminated.get("exitCode")
            reason, message, finished = terminated.get("reason"), terminated.get("message"), terminated.get("finishedAt")
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            stuck = f"{waiting['reason']}: {waiting.get('message') or 'no message'}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" \
                and condition.get("reason") == "Unschedulable":
            stuck = f"Unschedulable: {condition.get('message') or 'no node fits'}"
    role = labels.get(COMPONENT_LABEL, WORKER)
    return PodObservation(
        name=metadata.get("name", ""),
        uid=metadata.get("uid", ""),
        role=PREFLIGHT if role == PREFLIGHT else WORKER,
        index=int(labels.get(REPLICA_INDEX_LABEL, -1)),
        attempt=int(labels.get(ATTEMPT_LABEL, 1)),
        phase=status.get("phase") or "Pending",
        terminating=bool(metadata.get("deletionTimestamp")),
        created=metadata.get("creationTimestamp"),
        exit_code=exit_code,
        reason=status.get("reason") or reason,  # Evicted is the pod's reason, not the container's
        message=message if message and message.strip() else status.get("message"),
        finished=finished,
        outcome=TerminationMessage.parse(message),
        stuck=stuck,
    )


@dataclass(frozen=True)
class FailureReport:
    """How a failed pod ended: what ``status.lastFailure`` records."""

    reason: str
    message: str
    exit_code: int | None = None
    signal: str | None = None
    permanent: bool = False

    def record(self, pod: str | None, attempt: int, time: str) -> dict[str, Any]:
        entry = {"attempt": attempt, "reason": self.reason, "pod": pod, "exitCode": self.exit_code,
                 "signal": self.signal, "message": self.message, "time": time}
        return {key: value for key, value in entry.items() if value is not None}


def describe_failure(pod: PodObservation) -> FailureReport:
    """A failed pod in its own words (see the module docstring for the order)."""
    where = f"pod {pod.name}"
    if pod.outcome and pod.outcome.outcome == "Failed" and pod.outcome.error:
        code = pod.outcome.exit_code if pod.outcome.exit_code is not None else pod.exit_code
        return FailureReport(
            reason="TrainerError" if pod.outcome.permanent else "WorkerFailed",
            message=f"{pod.outcome.error} ({where} failed{_with_code(code)})",
            exit_code=code, signal=_signal_of_code(code), permanent=pod.outcome.permanent,
        )
    if pod.reason in ("OOMKilled", "Evicted"):
        detail = _last_line(pod.message)
        text = f"{where} was {'killed for using more memory than its limit' if pod.reason == 'OOMKilled' else 'evicted'}"
        return FailureReport(reason=pod.reason, message=text + (f": {detail}" if detail else ""),
                             exit_code=pod.exit_code, signal=_signal_of_code(pod.exit_code))
    root = _torchrun_root_cause(pod.message or "")
    if root is not None:
        rank, code, sig = root
        cause = f"was killed by {sig}" if sig else f"exited with code {code}"
        return FailureReport(reason="WorkerFailed", message=f"rank {rank} {cause} ({where} failed{_with_code(pod.exit_code)})",
                             exit_code=pod.exit_code, signal=sig)
    sig = _signal_of_code(pod.exit_code)
    text = f"{where} failed" + (f": killed by {sig}" if sig else _with_code(pod.exit_code))
    if pod.reason and pod.reason not in ("Error", "Completed"):
        text += f" ({pod.reason})"
    line = _last_line(pod.message)
    if line:
        text += f": {line}"
    return FailureReport(reason="WorkerFailed", message=text, exit_code=pod.exit_code, signal=sig)


def _with_code(code: int | None) -> str:
    return f" with exit code {code}" if code is not None else ""


def _signal_of_code(code: int | None) -> str | None:
    """A container killed by a signal exits 128 + its number (137: SIGKILL)."""
    if code is None or not 128 < code < 160:
        return None
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return None


def _torchrun_root_cause(log: str) -> tuple[int, int, str | None] | None:
    """torchrun's report of the first rank that failed: (rank, exit code, signal name)."""
    if "Root Cause" not in log:
        return None
    block = log[log.index("Root Cause"):]
    match = _ROOT_CAUSE.search(block)
    if not match:
        return None
    code = int(match["code"])
    named = _SIGNAL_LINE.search(block)
    sig = named["name"] if named else (signal.Signals(-code).name if code < 0 and -code in signal.valid_signals() else None)
    return int(match["rank"]), code, sig


def _last_line(text: str | None) -> str | None:
    """The last line that says something: not blank, not a banner of = or - signs."""
    for line in reversed((text or "").splitlines()):
        stripped = line.strip()
        if stripped and set(stripped) - set("=-_*#"):
            return stripped
    return None

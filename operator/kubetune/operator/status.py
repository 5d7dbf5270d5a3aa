"""Pure status derivation: job + observed worker pods -> FineTuneJob ``status``.

Phases: Pending until every worker runs, Running, Succeeded when every worker exited 0,
Failed when any worker failed or a worker vanished after the job started running. Succeeded
and Failed are final. The trainer's termination message (JSON, read from worker-0 first) puts
its one-line error into a failed job's message and its final loss into ``status.results``. Conditions keep their lastTransitionTime while their status is unchanged,
so a re-derived status with nothing new equals the stored one (no needless patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune.api.status import CONDITION_TYPES, FINAL_PHASES, Phase, Results
from kubetune.api.termination import TerminationMessage
from kubetune.operator.manifests import CONTAINER_NAME, REPLICA_INDEX_LABEL, pod_name
from kubetune.operator.progress import finished_progress


@dataclass(frozen=True)
class PodObservation:
    """What the status needs from one worker pod."""

    name: str
    replica_index: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    outcome: TerminationMessage | None = None  # the trainer's termination message, if it left one


def observe_pod(pod: dict[str, Any]) -> PodObservation:
    """Read a worker pod (as the API returns it) into a PodObservation."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    exit_code = reason = message = None
    for container in status.get("containerStatuses") or []:
        if container.get("name") != CONTAINER_NAME:
            continue
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            exit_code = terminated.get("exitCode")
            reason = terminated.get("reason")
            message = terminated.get("message")
    return PodObservation(
        name=metadata.get("name", ""),
        replica_index=int((metadata.get("labels") or {}).get(REPLICA_INDEX_LABEL, -1)),
        phase=status.get("phase") or "Pending",
        exit_code=exit_code,
        reason=reason or status.get("reason"),
        message=message or status.get("message"),
        outcome=TerminationMessage.parse(message),
    )


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def initial_status(generation: int, now: datetime, launched: dict[str, Any]) -> dict[str, Any]:
    """Status right after the operator created a job's children; ``launched`` records what."""
    return _assemble(
        phase="Pending",
        message="worker pods created; waiting for all of them to run",
        generation=generation,
        created=True,
        counts={"active": 0, "succeeded": 0, "failed": 0},
        previous={"launched": launched},
        now=now,
    )


def waiting_status(previous: dict[str, Any] | None, generation: int, message: str, now: datetime) -> dict[str, Any]:
    """Pending on something outside the job, such as a child of an earlier job of the same name."""
    return _without_workers(previous or {}, generation, "Pending", message, now)


def failed_status(
    previous: dict[str, Any] | None, generation: int, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """Failed before or without workers, e.g. a spec the operator cannot run."""
    return _without_workers(previous or {}, generation, "Failed", message, now, reason)


def _without_workers(
    previous: dict[str, Any], generation: int, phase: Phase, message: str, now: datetime, reason: str | None = None
) -> dict[str, Any]:
    """A status decided by something other than the pods: they keep their last counts."""
    return _assemble(
        phase=phase,
        message=message,
        generation=generation,
        created=_was_created(previous),
        counts=previous.get("workers") or {"active": 0, "succeeded": 0, "failed": 0},
        previous=previous,
        now=now,
        reason=reason,
    )


def derive_status(
    *,
    replicas: int,
    adapter_uri: str,
    generation: int,
    pods: list[PodObservation],
    previous: dict[str, Any] | None,
    now: datetime,
    job_name: str,
) -> dict[str, Any]:
    """The job's new status from its pods; ``previous`` is the stored status (or None)."""
    previous = previous or {}
    if previous.get("phase") in FINAL_PHASES:
        return previous
    by_index = {pod.replica_index: pod for pod in pods if 0 <= pod.replica_index < replicas}
    counts = {
        "active": sum(pod.phase in ("Pending", "Running", "Unknown") for pod in by_index.values()),
        "succeeded": sum(pod.phase == "Succeeded" for pod in by_index.values()),
        "failed": sum(pod.phase == "Failed" for pod in by_index.values()),
    }
    started = previous.get("phase") == "Running" or bool(previous.get("startTime"))
    missing = [pod_name(job_name, index) for index in range(replicas) if index not in by_index]
    failed = sorted((pod for pod in by_index.values() if pod.phase == "Failed"), key=lambda p: p.replica_index)
    reason = None
    adapter = None
    results = progress = None
    trainer_error = _trainer_error(failed)
    if trainer_error:
        phase, reason, message = "Failed", "TrainerError", trainer_error
    elif failed:
        phase, reason, message = "Failed", "WorkerFailed", "; ".join(_describe_failure(pod) for pod in failed)
    elif missing and started:
        phase, reason = "Failed", "WorkerMissing"
        message = f"worker pod {', '.join(missing)} disappeared while the job was running"
    elif not missing and counts["succeeded"] == replicas:
        phase, message, adapter = "Succeeded", f"adapter published to {adapter_uri}", adapter_uri
        outcome = by_index[0].outcome if 0 in by_index else None
        if outcome and outcome.outcome == "Succeeded":
            reported = Results(final_loss=outcome.final_loss, eval_loss=outcome.eval_loss, steps=outcome.steps,
                               tokens=outcome.tokens)
            results = reported.model_dump(by_alias=True, exclude_none=True)
            if outcome.total_steps:
                progress = finished_progress(previous.get("progress"), outcome.total_steps, outcome.final_loss)
            if outcome.final_loss is not None:
                message += f" (final loss {outcome.final_loss:.4f})"
    elif not missing and all(pod.phase in ("Running", "Succeeded") for pod in by_index.values()):
        phase, message = "Running", f"all {replicas} workers running"
    else:
        waiting = replicas - sum(pod.phase in ("Running", "Succeeded") for pod in by_index.values())
        phase, message = "Pending", f"waiting for {waiting} of {replicas} workers to run"
    return _assemble(
        phase=phase,
        message=message,
        generation=generation,
        created=bool(pods) or _was_created(previous),
        counts=counts,
        previous=previous,
        now=now,
        reason=reason,
        adapter_uri=adapter,
        results=results,
        progress=progress,
    )


def _trainer_error(failed: list[PodObservation]) -> str | None:
    """The trainer's own error, from worker-0 if it has one, naming the pod it came from."""
    for pod in failed:  # sorted by replica index: worker-0 first
        if pod.outcome and pod.outcome.outcome == "Failed" and pod.outcome.error:
            code = f" with exit code {pod.exit_code}" if pod.exit_code is not None else ""
            return f"{pod.outcome.error} (worker pod {pod.name} failed{code})"
    return None


def _describe_failure(pod: PodObservation) -> str:
    text = f"worker pod {pod.name} failed"
    if pod.exit_code is not None:
        text += f" with exit code {pod.exit_code}"
    if pod.reason:
        text += f" ({pod.reason})"
    if pod.message and pod.message.strip():
        text += f": {pod.message.strip().splitlines()[-1]}"
    return text


def _was_created(previous: dict[str, Any]) -> bool:
    return any(
        condition.get("type") == "Created" and condition.get("status") == "True"
        for condition in previous.get("conditions") or []
    )


def _assemble(
    *,
    phase: Phase,
    message: str,
    generation: int,
    created: bool,
    counts: dict[str, int],
    previous: dict[str, Any],
    now: datetime,
    reason: str | None = None,
    adapter_uri: str | None = None,
    results: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stamp = format_time(now)
    wanted = {
        "Created": (
            created,
            "ResourcesCreated" if created else "ResourcesNotCreated",
            "config map, service and worker pods created" if created else "children not created yet",
        ),
        "Running": (phase == "Running", _running_reason(phase), message),
        "Succeeded": (
            phase == "Succeeded",
            "AdapterPublished" if phase == "Succeeded" else "NotFinished",
            message if phase == "Succeeded" else "the job has not succeeded",
        ),
        "Failed": (phase == "Failed", reason or "NoFailure", message if phase == "Failed" else "no worker failed"),
    }
    old = {condition.get("type"): condition for condition in previous.get("conditions") or []}
    conditions = []
    for kind in CONDITION_TYPES:
        truth, why, detail = wanted[kind]
        state = "True" if truth else "False"
        before = old.get(kind) or {}
        conditions.append(
            {
                "type": kind,
                "status": state,
                "reason": why,
                "message": detail,
                "lastTransitionTime": before.get("lastTransitionTime", stamp)
                if before.get("status") == state
                else stamp,
                "observedGeneration": generation,
            }
        )
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions,
        "workers": counts,
    }
    if previous.get("launched"):
        status["launched"] = previous["launched"]
    start = previous.get("startTime") or (stamp if phase in ("Running", "Succeeded") else None)
    if start:
        status["startTime"] = start
    if phase in FINAL_PHASES:
        status["completionTime"] = previous.get("completionTime") or stamp
    if adapter_uri:
        status["adapter"] = {"uri": adapter_uri}
    # Progress is scraped by a timer between pod events; carry it so a pod event keeps it.
    progress = progress or previous.get("progress")
    if progress:
        status["progress"] = progress
    if results:
        status["results"] = results
    return status


def _running_reason(phase: Phase) -> str:
    return {
        "Pending": "WaitingForWorkers",
        "Running": "AllWorkersRunning",
        "Succeeded": "Completed",
        "Failed": "Failed",
    }[phase]

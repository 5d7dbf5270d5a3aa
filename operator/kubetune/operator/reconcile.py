"""The one pure reconciler, in the shape of the Kubernetes Job controller's ``syncJob``:

    reconcile(job, its observed pods, settings, now) -> (new status, actions)

It decides; the kopf handlers only observe and carry out. Rules it keeps:

- **Children are known by UID.** Only pods controlled by this job (ownerReference with its
  UID) and not terminating count; a job re-created under the same name never mistakes the old
  job's dying pods for its own. A name still held by another object is waited for, not taken
  for success (the handler finds that out when creating, see ``waiting``).
- **Status comes from what was launched**, recorded in ``status.launched`` (replicas, the
  rendered config's hash, the attempt), never from the live spec (which the API server keeps
  immutable anyway).
- **Final phases are final**: a Succeeded or Failed job is history; nothing is re-run.
- **One Event per transition**, in the same call that decides the transition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kubetune.api import FINAL_PHASES, InvalidObjectError, JobRef, check_job_name, parse_spec
from kubetune.api.spec import FineTuneJobSpec
from kubetune.operator.manifests import REPLICA_INDEX_LABEL, build_children, build_worker_pod, owned_by, trainer_config
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import derive_status, failed_status, initial_status, observe_pod, waiting_status


NOT_STARTED_REASONS = ("InvalidSpec", "ChildRefused")


@dataclass(frozen=True)
class Job:
    """What the reconciler needs of a FineTuneJob object."""

    ref: JobRef
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Job:
        meta = body["metadata"]
        return cls(
            ref=JobRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
            generation=int(meta.get("generation") or 1),
            spec=body.get("spec") or {},
            status=body.get("status") or {},
        )


@dataclass(frozen=True)
class Create:
    """Create this child (idempotent: the handler treats an "already exists" of our own as done)."""

    child: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """Post an Event on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = Create | Event


@dataclass(frozen=True)
class Outcome:
    """The status to write (None: unchanged), what to do, in order, and what the job waits for
    (``blocked``: worth looking again soon)."""

    status: dict[str, Any] | None
    actions: tuple[Action, ...] = field(default=())
    blocked: str | None = None


def config_hash(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> str:
    return hashlib.sha256(trainer_config(job, spec, settings).render().encode()).hexdigest()


def ours(job: JobRef, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The job's own live pods: controlled by its UID, not terminating."""
    return [
        pod for pod in pods
        if owned_by(dict(pod), job.uid) and not (pod.get("metadata") or {}).get("deletionTimestamp")
    ]


def reconcile(job: Job, pods: Sequence[Mapping[str, Any]], settings: OperatorSettings, now: datetime) -> Outcome:
    previous = dict(job.status)
    if previous.get("phase") in FINAL_PHASES:
        return Outcome(None)
    try:
        check_job_name(job.ref.name)
        spec = parse_spec(dict(job.spec))
    except InvalidObjectError as error:
        # Only for what the API server could not check (deepspeed.config keys), or a server
        # without the CRD's rules: the job cannot run as written, and says why.
        return _transition(previous, failed_status(previous, job.generation, "InvalidSpec", str(error), now))
    launched = previous.get("launched")
    if not launched:
        record = {
            "replicas": spec.workers.replicas,
            "configHash": config_hash(job.ref, spec, settings),
            "attempt": 1,
            "adapterUri": spec.output.adapter_uri,
        }
        children = build_children(job.ref, spec, settings)
        message = f"created config map, service and {spec.workers.replicas} worker pods"
        return Outcome(
            initial_status(job.generation, now, record),
            (*(Create(child) for child in children), Event("Normal", "Created", message)),
        )
    observed = ours(job.ref, pods)
    status = derive_status(
        replicas=int(launched["replicas"]),
        adapter_uri=str(launched["adapterUri"]),
        generation=job.generation,
        pods=[observe_pod(dict(pod)) for pod in observed],
        previous=previous,
        now=now,
        job_name=job.ref.name,
    )
    outcome = _transition(previous, status)
    if status["phase"] == "Pending" and not status.get("startTime"):
        # Before the gang first ran, a missing worker (deleted, or never created) is created
        # again, as the Job controller replaces a pod; once it ran, a vanished worker fails the job.
        present = {int((pod["metadata"].get("labels") or {}).get(REPLICA_INDEX_LABEL, -1)) for pod in observed}
        missing = [i for i in range(int(launched["replicas"])) if i not in present]
        outcome = Outcome(outcome.status, (
            *(Create(build_worker_pod(job.ref, spec, index, settings)) for index in missing), *outcome.actions,
        ))
    return outcome


def _transition(previous: dict[str, Any], status: dict[str, Any]) -> Outcome:
    """The status if it changed, with one Event when the phase did."""
    if status == previous:
        return Outcome(None)
    if status["phase"] == previous.get("phase"):
        return Outcome(status)
    if status["phase"] == "Pending":
        return Outcome(status)
    if status["phase"] == "Failed":
        # A job that could not start says why in the reason; one that failed running says
        # "Failed", its condition says how (TrainerError, WorkerFailed, WorkerMissing).
        cause = next(c["reason"] for c in status["conditions"] if c["type"] == "Failed")
        reason = cause if cause in NOT_STARTED_REASONS else "Failed"
        return Outcome(status, (Event("Warning", reason, status["message"]),))
    return Outcome(status, (Event("Normal", status["phase"], status["message"]),))


def creation_failed(job: Job, child: Mapping[str, Any], error: str, now: datetime) -> Outcome:
    """The API refused a child for good (a 4xx other than a conflict): the job cannot run, and
    retrying would only repeat the refusal. The API's own message says why."""
    what = f"{child['kind']} {child['metadata']['name']}"
    previous = dict(job.status)
    return _transition(previous, failed_status(previous, job.generation, "ChildRefused",
                                               f"the API server refused {what}: {error}", now))


def waiting(job: Job, child: Mapping[str, Any], holder: Mapping[str, Any], now: datetime) -> Outcome:
    """A child's name is held by an object that is not this job's (an earlier job's, still
    terminating after a delete and re-apply): wait for it to go instead of adopting it."""
    meta = holder.get("metadata") or {}
    owners = [ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller")]
    whose = f"FineTuneJob uid {owners[0]}" if owners else "no FineTuneJob"
    going = ", being deleted," if meta.get("deletionTimestamp") else ""
    message = (
        f"waiting for {child['kind']} {child['metadata']['name']} of {whose}{going} to be gone "
        "before creating this job's own"
    )
    previous = dict(job.status)
    changed = _transition(previous, waiting_status(previous, job.generation, message, now))
    return Outcome(changed.status, changed.actions, blocked=message)

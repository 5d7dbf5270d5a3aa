"""The one pure reconciler, in the shape of the Kubernetes Job controller's ``syncJob``:

    reconcile(job, its observed pods, settings, now) -> Outcome(new status, actions)

It decides; the kopf handlers only observe and carry out. The life of a job:

    Validating -> Pending -> Running -> Publishing -> Succeeded
         |           |          |           |
         +-----------+----------+-----------+--> Failed
                     |          |
                     +--> Restarting --> Pending (the next attempt)
    any active phase <--> Suspended (spec.runPolicy.suspend)

- **Validating**: one small CPU pod runs the trainer's preflight with the job's config and
  credentials; a failure fails the job before any worker (and GPU) is held.
- **The gang lives and dies together.** Any worker failing, disappearing or stalling ends the
  attempt: the other workers are deleted, and only once none of the attempt's pods exists
  (never two pods for one rank) and the back-off has passed is the whole gang created again;
  the trainer resumes from the newest complete checkpoint. Restarts are counted in the job's
  own status, never in a child, against ``runPolicy.backoffLimit``. Bad input (a permanent
  exit code of the trainer's) fails at once.
- **Children are known by UID**, and only this job's pods count (see ``waiting``).
- **Status comes from what was launched** (``status.launched``), never from the live spec.
- **Final phases are final**: a Succeeded or Failed job is never run again, whatever happens
  to its children; it only cleans up (``cleanPodPolicy``) and expires (TTL).
- **One Event per transition**, in the same call that decides the transition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from kubetune.api import FINAL_PHASES, InvalidObjectError, JobRef, check_job_name, parse_spec
from kubetune.api.logs import attempt_logs_uri, worker_log_uri
from kubetune.api.spec import FineTuneJobSpec, RunPolicy
from kubetune.api.status import Phase
from kubetune.api.labels import PREFLIGHT
from kubetune.operator.manifests import (
    build_preflight_pod, build_worker_pod, build_workers, owned_by, pod_name, trainer_config,
)
from kubetune.operator.pods import FailureReport, PodObservation, describe_failure, observe_pod
from kubetune.operator.progress import finished_progress
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import assemble
from kubetune.operator.times import format_time, parse_time, seconds_since

RESTART_BACKOFF_CAP_SECONDS = 300
WATCH_GRACE_SECONDS = 15
"""How long after creating a gang a pod the watch has not shown yet counts as on its way."""
LOG_TAILS = 4
"""Failed pods whose log tails are posted per failure: the first few say why; the rest, who
lost their peer, only repeat it."""
NOT_STARTED_REASONS = ("InvalidSpec", "ChildRefused", "PreflightFailed")


def _names(pods: Sequence[PodObservation]) -> str:
    return ", ".join(pod.name for pod in pods)


@dataclass(frozen=True)
class Job:
    """What the reconciler needs of a FineTuneJob object."""

    ref: JobRef
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    resource_version: str | None = None
    """Of the object read: the status write is made against it (optimistic concurrency)."""

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Job:
        meta = body["metadata"]
        return cls(
            ref=JobRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
            generation=int(meta.get("generation") or 1),
            spec=body.get("spec") or {},
            status=body.get("status") or {},
            resource_version=meta.get("resourceVersion"),
        )


@dataclass(frozen=True)
class Create:
    """Create this child (idempotent: the handler treats an "already exists" of our own as done)."""

    child: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    """Delete this pod, only if it is still the one observed (a UID precondition); ``why`` is
    for the operator's log."""

    name: str
    uid: str
    why: str = ""


@dataclass(frozen=True)
class LogTail:
    """Post the last lines of this failed pod's log as an Event, before the pod may go: a job
    whose pods were cleaned up still explains itself in ``kubectl describe``."""

    name: str


@dataclass(frozen=True)
class DeleteJob:
    """Delete the FineTuneJob itself (its TTL after finishing has passed)."""


@dataclass(frozen=True)
class Event:
    """Post an Event on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = Create | Delete | LogTail | DeleteJob | Event


@dataclass(frozen=True)
class Outcome:
    """The status to write (None: unchanged), what to do, in order, and what the job waits for
    (``blocked``: worth looking again soon)."""

    status: dict[str, Any] | None
    actions: tuple[Action, ...] = field(default=())
    blocked: str | None = None
    probe: bool = False
    """The job has stalled: ask every worker of the attempt how many steps it has begun, and
    decide again with the answers (``reconcile(..., probes=...)``), so the failure names the
    worker that holds the gang up."""


def ours(job: JobRef, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The job's own live pods: controlled by its UID, not terminating."""
    return [
        pod for pod in pods
        if owned_by(dict(pod), job.uid) and not (pod.get("metadata") or {}).get("deletionTimestamp")
    ]


Probes = Mapping[int, int | None]
"""Replica index -> the optimizer steps that worker's first process has begun (its /metrics);
None when it did not answer."""


def reconcile(job: Job, pods: Sequence[Mapping[str, Any]], settings: OperatorSettings, now: datetime,
              probes: Probes | None = None) -> Outcome:
    observed = [observe_pod(dict(pod)) for pod in pods if owned_by(dict(pod), job.ref.uid)]
    previous = dict(job.status)
    if previous.get("phase") in FINAL_PHASES:
        return _finished(job, observed, now)
    try:
        check_job_name(job.ref.name)
        spec = parse_spec(job.spec)
    except InvalidObjectError as error:
        # Only for what the API server could not check (deepspeed.config keys), or a server
        # without the CRD's rules: the job cannot run as written, and says why.
        return _Pass(job, None, settings, now, observed).fail("InvalidSpec", str(error))
    return _Pass(job, spec, settings, now, observed, probes).run()


class _Pass:
    """One reconciliation of an unfinished job: each method is one branch of its life."""

    def __init__(self, job: Job, spec: FineTuneJobSpec | None, settings: OperatorSettings, now: datetime,
                 observed: list[PodObservation], probes: Probes | None = None) -> None:
        self.job, self.spec, self.settings, self.now, self.probes = job, spec, settings, now, probes
        self.previous = dict(job.status)
        self.policy = spec.run_policy if spec else RunPolicy()
        self.launched: dict[str, Any] = dict(self.previous.get("launched") or {})
        self.attempt = int(self.launched.get("attempt") or 0)
        self.preflight = next((pod for pod in observed if pod.role == PREFLIGHT), None)
        self.workers = [pod for pod in observed if pod.role != PREFLIGHT]
        self.current = {pod.index: pod for pod in self.workers if pod.attempt == self.attempt and not pod.terminating}
        self.replicas = int(self.launched.get("replicas") or (spec.workers.replicas if spec else 0))

    # -- the branches ----------------------------------------------------------------------
    def run(self) -> Outcome:
        phase = self.previous.get("phase")
        if self._past_deadline():
            return self.fail("DeadlineExceeded", f"the job ran longer than spec.runPolicy.activeDeadlineSeconds "
                                                 f"({self.policy.active_deadline_seconds}s)")
        if self.policy.suspend:
            return self.suspend()
        if phase == "Suspended":
            return self.resume()
        if not self.launched:
            return self.launch(1) if self.policy.skip_preflight else self.validate()
        if phase == "Restarting":
            return self.restart_when_clear()
        return self.watch_attempt()

    def validate(self) -> Outcome:
        """Before the gang exists: the preflight pod checks the inputs on a CPU."""
        pod = self.preflight
        if pod is None or pod.terminating:
            if pod is not None:
                return self._status("Validating", f"waiting for the old preflight pod {pod.name} to be gone")
            child = build_preflight_pod(self.job.ref, self._spec, self.settings)
            name = child["metadata"]["name"]
            return self._status("Validating", f"checking the job's inputs in pod {name}", actions=(Create(child),))
        if pod.phase == "Succeeded":
            return self.launch(1)
        if pod.phase == "Failed":
            report = describe_failure(pod)
            lines = pod.outcome.error.removeprefix("preflight: ") if pod.outcome and pod.outcome.error \
                else report.message
            return self.fail("PreflightFailed", f"preflight failed: {lines}", report=report, pod=pod.name)
        if pod.stuck and (seconds_since(pod.created, self.now) or 0) >= self.policy.startup_timeout_seconds:
            return self.fail(pod.stuck_reason or "StartupTimeout", self._stuck_message(pod))
        if pod.stuck:
            return self._status("Validating", f"preflight pod {pod.name} cannot start: {pod.stuck}")
        return self._status("Validating", f"checking the job's inputs in pod {pod.name}")

    def launch(self, attempt: int) -> Outcome:
        """Create the gang of attempt ``attempt`` (and the Service, idempotently)."""
        spec = self._spec
        config = trainer_config(self.job.ref, spec, self.settings)
        launched = {
            "replicas": spec.workers.replicas,
            "gpusPerWorker": spec.workers.gpus_per_worker,
            "configHash": hashlib.sha256(config.render().encode()).hexdigest(),
            "attempt": attempt,
            "adapterUri": spec.output.adapter_uri,
            "logsUri": attempt_logs_uri(spec.output, attempt),
            "createdTime": format_time(self.now),
        }
        if config.storage.endpoint:
            launched["storageEndpoint"] = config.storage.endpoint
        children = build_workers(self.job.ref, spec, self.settings, attempt)
        created = f"created {spec.workers.replicas} worker pods (attempt {attempt})"
        counts = {"active": spec.workers.replicas, "succeeded": 0, "failed": 0}
        return self._status("Pending", _waiting_for_gang(spec.workers.replicas, attempt),
                            actions=tuple(Create(child) for child in children), event=("Normal", "Created", created),
                            launched=launched, workers=counts)

    def watch_attempt(self) -> Outcome:
        """The gang of the current attempt exists: follow it to its end."""
        # Never two pods for one rank: a pod of another attempt still here goes.
        actions = tuple(Delete(pod.name, pod.uid, f"of attempt {pod.attempt}, not {self.attempt}")
                        for pod in self.workers if pod.attempt != self.attempt and not pod.terminating)
        counts = self._counts()
        failure = self._failure()
        if failure is not None:
            return self.restart_or_fail(*failure)
        running_before = bool(self.launched.get("runningTime"))
        missing = [index for index in range(self.replicas) if index not in self.current]
        created_ago = seconds_since(self.launched.get("createdTime"), self.now)
        if missing and not running_before and (created_ago is None or created_ago >= WATCH_GRACE_SECONDS):
            # Deleted before it ran: create it, idempotently, as the Job controller replaces a pod.
            # Not before WATCH_GRACE_SECONDS (the Job controller's expectations): until then a
            # pod missing here was created a moment ago and the watch has not shown it yet, and
            # creating it again is a refused request and a read (at a busy API server, 2.6 a job).
            actions += tuple(Create(build_worker_pod(self.job.ref, self._spec, index, self.settings, self.attempt))
                             for index in missing)
        pods = list(self.current.values())
        if not missing and pods and all(pod.phase == "Succeeded" for pod in pods):
            return self.succeed(counts)
        if not missing and pods and all(pod.phase in ("Running", "Succeeded") for pod in pods):
            return self.running(counts, actions)
        stuck = next((pod for pod in pods if pod.stuck), None)
        if stuck and (created_ago or 0) >= self.policy.startup_timeout_seconds:
            return self.fail(stuck.stuck_reason or "StartupTimeout", self._stuck_message(stuck), actions=actions)
        message = _waiting_for_gang(self.replicas, self.attempt)
        if stuck:
            message += f"; {stuck.name} cannot start: {stuck.stuck}"
        return self._status("Pending", message, actions=actions)

    def running(self, counts: dict[str, int], actions: tuple[Action, ...]) -> Outcome:
        launched = self.launched
        if not launched.get("runningTime"):
            launched = {**launched, "runningTime": format_time(self.now)}
        progress = self.previous.get("progress") or {}
        stalled = self._stalled(progress, launched)
        if stalled:
            if self.probes is None:
                return Outcome(None, probe=True)
            culprit, why = self._holding_up(self.probes)
            return self.restart_or_fail(FailureReport("Stalled", f"{stalled}: {why}"), culprit)
        done = bool(progress.get("totalSteps")) and progress.get("step", 0) >= progress["totalSteps"] \
            and self._stepped_in_attempt(progress, launched)
        phase: Phase = "Publishing" if done else "Running"
        message = (f"training done; evaluating and publishing the adapter to {launched['adapterUri']}" if done
                   else f"all {self.replicas} workers running (attempt {self.attempt})")
        # The counts at the transition only: workers that end one by one (a gang finishing) are
        # one status write each for a state that holds a moment; the phase after says how it ended.
        fields = {"workers": counts} if phase != self.previous.get("phase") else {}
        return self._status(phase, message, actions=actions, launched=launched,
                            startTime=self.previous.get("startTime") or format_time(self.now), **fields)

    def succeed(self, counts: dict[str, int]) -> Outcome:
        adapter_uri = str(self.launched["adapterUri"])
        rank0 = self.current.get(0)
        outcome = rank0.outcome if rank0 else None
        message = f"adapter published to {adapter_uri}"
        fields: dict[str, Any] = {"adapter": {"uri": adapter_uri}}
        cost = self._cost_with_attempt()
        if outcome and outcome.outcome == "Succeeded":
            results = {"finalLoss": outcome.final_loss, "evalLoss": outcome.eval_loss, "steps": outcome.steps,
                       "tokens": outcome.tokens, "retentionLossBefore": outcome.retention_loss_before,
                       "retentionLossAfter": outcome.retention_loss_after}
            fields["results"] = {key: value for key, value in results.items() if value is not None}
            if outcome.manifest_sha256:
                fields["adapter"]["manifestSha256"] = outcome.manifest_sha256
            if outcome.total_steps:
                fields["progress"] = finished_progress(self.previous.get("progress"), outcome.total_steps,
                                                       outcome.final_loss)
            if outcome.final_loss is not None:
                message += f" (final loss {outcome.final_loss:.4f})"
            if outcome.tokens is not None:
                cost["tokens"] = outcome.tokens
        return self._status("Succeeded", message, workers=counts, cost=cost,
                            startTime=self.previous.get("startTime") or format_time(self.now), **fields)

    def restart_or_fail(self, report: FailureReport, pod: PodObservation | None) -> Outcome:
        """The attempt ended badly: restart the gang, unless the failure is permanent or the
        restarts are used up."""
        restarts = int(self.previous.get("restarts") or 0)
        name = pod.name if pod else None
        if report.permanent:
            return self.fail(report.reason, report.message, report=report, pod=name)
        if restarts >= self.policy.backoff_limit:
            message = (f"{report.message}; the gang was restarted {restarts} time{'s' * (restarts != 1)} "
                       f"(spec.runPolicy.backoffLimit {self.policy.backoff_limit})")
            return self.fail("BackoffLimitExceeded", message, report=report, pod=name)
        delay = min(self.settings.restart_backoff_seconds * 2 ** restarts, RESTART_BACKOFF_CAP_SECONDS)
        message = (f"attempt {self.attempt} failed: {report.message}; restarting all {self.replicas} workers in "
                   f"{delay}s (restart {restarts + 1} of at most {self.policy.backoff_limit})")
        return self._status(
            "Restarting", message, reason=report.reason,
            actions=(*self._log_tails(), *self._delete_workers()), event=("Warning", "Restarting", message),
            restarts=restarts + 1, lastFailure=self._record(report, name),
            nextAttemptTime=format_time(self.now + timedelta(seconds=delay)), cost=self._cost_with_attempt(),
            workers=self._counts(),
        )

    def restart_when_clear(self) -> Outcome:
        """Restarting: the old gang goes first, every pod of it; then the back-off; then the next attempt."""
        actions = self._delete_workers()
        left = [pod.name for pod in self.workers]
        due = parse_time(self.previous.get("nextAttemptTime"))
        if left:
            return self._status("Restarting", self._keep_message(f"waiting for {len(left)} old worker pods to stop"),
                                actions=actions, blocked="old workers stopping")
        if due is not None and self.now < due:
            when = self.previous["nextAttemptTime"]
            return self._status("Restarting", self._keep_message(f"next attempt at {when}"), blocked="back-off")
        return self.launch(self.attempt + 1)

    def suspend(self) -> Outcome:
        """runPolicy.suspend: stop every pod, keep the progress; the start time stops counting."""
        actions = tuple(Delete(pod.name, pod.uid, "suspended")
                        for pod in (*self.workers, *([self.preflight] if self.preflight else []))
                        if not pod.terminating)
        already = self.previous.get("phase") == "Suspended"
        stopping = [pod for pod in self.workers if pod.phase in ("Pending", "Running", "Unknown")]
        message = f"suspended; {len(stopping)} worker pods stopping" if stopping else "suspended"
        cost = self.previous.get("cost") if already or not self.launched else self._cost_with_attempt()
        # The deadline counts running time only, as a Job's after a resume.
        return self._status("Suspended", message, actions=actions, cost=cost, startTime=None,
                            event=None if already else ("Normal", "Suspended", "suspended: stopping the workers"))

    def resume(self) -> Outcome:
        """Suspend lifted: once the old pods are gone, start again (validating first if the job
        never got past it); the trainer resumes from the newest complete checkpoint."""
        left = [pod.name for pod in (*self.workers, *([self.preflight] if self.preflight else []))
                if pod.terminating or pod.phase in ("Pending", "Running", "Unknown")]
        if left:
            return self._status("Suspended", f"resuming once {len(left)} old pods are gone", blocked="old pods stopping")
        if not self.launched:
            return self.validate() if not self.policy.skip_preflight else self.launch(1)
        return self.launch(self.attempt + 1)

    def fail(self, reason: str, message: str, report: FailureReport | None = None, pod: str | None = None,
             actions: tuple[Action, ...] = ()) -> Outcome:
        fields: dict[str, Any] = {}
        if report is not None:
            fields["lastFailure"] = self._record(report, pod)
        if self.launched and self.previous.get("phase") not in ("Restarting", "Suspended"):
            fields["cost"] = self._cost_with_attempt()
        if self.launched:
            fields["workers"] = self._counts()
        cleanup = _cleanup(self.policy, [*self.workers, *([self.preflight] if self.preflight else [])])
        event = ("Warning", reason if reason in NOT_STARTED_REASONS else "Failed", message)
        return self._status("Failed", message, reason=reason, actions=(*actions, *self._log_tails(), *cleanup),
                            event=event, **fields)

    # -- what the branches share ------------------------------------------------------------
    @property
    def _spec(self) -> FineTuneJobSpec:
        assert self.spec is not None, "only a valid spec gets this far"
        return self.spec

    def _status(self, phase: Phase, message: str, *, reason: str | None = None, actions: tuple[Action, ...] = (),
                event: tuple[Literal["Normal", "Warning"], str, str] | None = None, blocked: str | None = None,
                **fields: Any) -> Outcome:
        """The outcome for ``phase``: the status, the actions, and one Event if the phase changed
        (``event``, or one named after the phase)."""
        status = assemble(self.previous, phase, message, self.job.generation, self.now, reason=reason, **fields)
        changed = status != self.previous
        posted: tuple[Action, ...] = ()
        if phase != self.previous.get("phase") or (event and event[1] == "Created"):
            kind, why, text = event or ("Normal", phase, message)
            posted = (Event(kind, why, text),)
        return Outcome(status if changed else None, (*actions, *posted), blocked=blocked)

    def _record(self, report: FailureReport, pod: str | None) -> dict[str, Any]:
        """status.lastFailure, with where the failed worker's whole log is kept."""
        record = report.record(pod, self.attempt, format_time(self.now))
        logs = self.launched.get("logsUri")  # set at launch, after the preflight pod's time
        if logs and pod:
            record["logUri"] = worker_log_uri(logs, pod)
        return record

    def _keep_message(self, detail: str) -> str:
        """While Restarting, the message keeps why, and says what it waits for now."""
        base = (self.previous.get("lastFailure") or {}).get("message") or "a worker failed"
        return f"restarting after: {base}; {detail}"

    def _failure(self) -> tuple[FailureReport, PodObservation | None] | None:
        """Why the current attempt has ended badly, if it has: the first worker to fail (a
        permanent failure anywhere wins), or one that vanished."""
        failed = [pod for pod in self.current.values() if pod.phase == "Failed"]
        if failed:
            reports = [(describe_failure(pod), pod) for pod in failed]
            permanent = [entry for entry in reports if entry[0].permanent]
            if permanent:
                return permanent[0]
            # The first to finish is the cause (the others failed because their peer was gone);
            # without times, the one that said why.
            return min(reports, key=lambda entry: (entry[1].finished or "~", entry[1].outcome is None, entry[1].index))
        deleted = [pod for pod in self.workers if pod.attempt == self.attempt and pod.terminating
                   and pod.phase not in ("Succeeded", "Failed")]
        if deleted:
            pod = deleted[0]
            return FailureReport("WorkerDeleted", f"worker pod {pod.name} was deleted while the job ran"), pod
        if self.launched.get("runningTime"):
            gone = [index for index in range(self.replicas) if index not in self.current
                    and not any(pod.index == index and pod.attempt == self.attempt for pod in self.workers)]
            if gone:
                name = pod_name(self.job.ref.name, gone[0])
                return FailureReport("WorkerMissing", f"worker pod {name} disappeared while the job ran"), None
        return None

    def _stalled(self, progress: dict[str, Any], launched: dict[str, Any]) -> str | None:
        """No new step for stallTimeoutSeconds, counted from this attempt's first new step: the
        model download and start-up, however long, are not a stall."""
        limit = self.policy.stall_timeout_seconds
        if not limit or not self._stepped_in_attempt(progress, launched):
            return None
        if (self.now - parse_time(progress["stepTime"])).total_seconds() < limit:  # type: ignore[operator]
            return None
        return (f"no new optimizer step for {limit}s (last at step {progress.get('step')}; "
                "spec.runPolicy.stallTimeoutSeconds)")

    def _holding_up(self, probes: Probes) -> tuple[PodObservation | None, str]:
        """The worker a stalled gang waits for, and why: one that does not answer (stopped,
        hung with the interpreter held), else one that has begun fewer steps than the others
        (they wait for it in the next step's first collective)."""
        pods = {index: pod for index, pod in self.current.items() if index in probes}
        silent = [pods[index] for index in sorted(pods) if probes[index] is None]
        if silent:
            return silent[0], f"{_names(silent)} did not answer on its metrics port (stopped or hung)"
        begun = {index: steps for index in pods if (steps := probes[index]) is not None}
        low, high = min(begun.values(), default=0), max(begun.values(), default=0)
        if low < high:
            behind = [pods[index] for index in sorted(begun) if begun[index] == low]
            return behind[0], f"{_names(behind)} never began step {high} that the others wait in (its last: step {low})"
        return None, "every worker has begun the same step: the gang waits inside it, in a collective or the data"

    @staticmethod
    def _stepped_in_attempt(progress: dict[str, Any], launched: dict[str, Any]) -> bool:
        """Whether the progress shows a step this attempt made (not one carried from the last)."""
        stepped, started = parse_time(progress.get("stepTime")), parse_time(launched.get("runningTime"))
        return stepped is not None and started is not None and stepped >= started

    def _past_deadline(self) -> bool:
        limit = self.policy.active_deadline_seconds
        ran = seconds_since(self.previous.get("startTime"), self.now)
        return bool(limit) and ran is not None and ran >= limit and not self.policy.suspend

    def _stuck_message(self, pod: PodObservation) -> str:
        return (f"pod {pod.name} could not start within spec.runPolicy.startupTimeoutSeconds "
                f"({self.policy.startup_timeout_seconds}s): {pod.stuck}")

    def _counts(self) -> dict[str, int]:
        pods = list(self.current.values())
        return {
            "active": sum(pod.phase in ("Pending", "Running", "Unknown") for pod in pods),
            "succeeded": sum(pod.phase == "Succeeded" for pod in pods),
            "failed": sum(pod.phase == "Failed" for pod in pods),
        }

    def _log_tails(self) -> tuple[Action, ...]:
        failed = sorted((pod for pod in self.current.values() if pod.phase == "Failed"), key=lambda pod: pod.index)
        if self.preflight and self.preflight.phase == "Failed" and not self.launched:
            failed.insert(0, self.preflight)
        return tuple(LogTail(pod.name) for pod in failed[:LOG_TAILS])

    def _delete_workers(self) -> tuple[Action, ...]:
        return tuple(Delete(pod.name, pod.uid, "the gang restarts") for pod in self.workers if not pod.terminating)

    def _cost_with_attempt(self) -> dict[str, Any]:
        """The cost so far, with the current attempt's share added (it is ending now)."""
        cost = dict(self.previous.get("cost") or {})
        seconds = seconds_since(self.launched.get("createdTime"), self.now)
        if seconds is None:
            return cost
        workers = int(round(seconds)) * int(self.launched.get("replicas") or 0)
        gpus = workers * int(self.launched.get("gpusPerWorker") or 0)
        attempts = [entry for entry in cost.get("attempts") or [] if entry.get("attempt") != self.attempt]
        attempts.append({"attempt": self.attempt, "workerSeconds": workers, "gpuSeconds": gpus})
        cost.update(attempts=attempts, workerSeconds=sum(a["workerSeconds"] for a in attempts),
                    gpuSeconds=sum(a["gpuSeconds"] for a in attempts))
        return cost


def _waiting_for_gang(replicas: int, attempt: int) -> str:
    """While a gang starts. Not how many of it run yet: each pod that starts would be a status
    write (at a thousand jobs, thousands), for what `kubectl get pods` shows anyway; a pod that
    cannot start is named."""
    return f"waiting for all {replicas} workers to run (attempt {attempt})"


def _cleanup(policy: RunPolicy, pods: Sequence[PodObservation]) -> tuple[Action, ...]:
    """The pods a finished job deletes, per cleanPodPolicy."""
    if policy.clean_pod_policy == "None":
        return ()
    wanted = [pod for pod in pods if not pod.terminating and (policy.clean_pod_policy == "All" or pod.active)]
    return tuple(Delete(pod.name, pod.uid, f"the job finished (cleanPodPolicy {policy.clean_pod_policy})")
                 for pod in wanted)


def _finished(job: Job, observed: list[PodObservation], now: datetime) -> Outcome:
    """A finished job only cleans up and, past its TTL, deletes itself; it never runs again."""
    try:
        policy = parse_spec(job.spec).run_policy
    except InvalidObjectError:
        policy = RunPolicy()
    actions: tuple[Action, ...] = _cleanup(policy, observed)
    ttl = policy.ttl_seconds_after_finished
    finished = seconds_since(job.status.get("completionTime"), now)
    if ttl is not None and finished is not None and finished >= ttl:
        actions += (DeleteJob(),)
    return Outcome(None, actions)


def creation_failed(job: Job, child: Mapping[str, Any], error: str, now: datetime) -> Outcome:
    """The API refused a child for good (a 4xx other than a conflict): the job cannot run, and
    retrying would only repeat the refusal. The API's own message says why."""
    what = f"{child['kind']} {child['metadata']['name']}"
    return _Pass(job, None, _NO_SETTINGS, now, []).fail("ChildRefused", f"the API server refused {what}: {error}")


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
    phase: Phase = job.status.get("phase") or ("Pending" if _skips_preflight(job) else "Validating")
    # The status keeps no launch record for what could not be created: the next pass tries again.
    outcome = _Pass(job, None, _NO_SETTINGS, now, [])._status(phase, message)
    return Outcome(outcome.status, outcome.actions, blocked=message)


def forbidden(job: Job, child: Mapping[str, Any], error: str, now: datetime) -> Outcome:
    """The operator's own permissions lack the creation of a child (RBAC edited, or an install
    that grants less): not the job's fault, so it is not failed. It waits, saying why in its
    status and once in an Event, and the next pass tries again: granting the permission is
    enough to go on."""
    what = f"{child['kind']} {child['metadata']['name']}"
    message = (f"the operator may not create {what}: {error}; grant its service account this permission "
               "(the Helm chart's rbac.create does)")
    phase: Phase = job.status.get("phase") or ("Pending" if _skips_preflight(job) else "Validating")
    outcome = _Pass(job, None, _NO_SETTINGS, now, [])._status(phase, message)
    told = () if job.status.get("message") == message else (Event("Warning", "Forbidden", message),)
    return Outcome(outcome.status, (*outcome.actions, *told), blocked=message)


def _skips_preflight(job: Job) -> bool:
    try:
        return parse_spec(job.spec).run_policy.skip_preflight
    except InvalidObjectError:
        return False


_NO_SETTINGS = OperatorSettings()

"""``FineTuneJob.status``: what the operator observed, in the shape kstatus, Flux and Argo CD read.

The phases and condition types are the contract between the operator (which writes them), the
CRD (which lists them), the operator's metrics (one series per phase) and every client.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from kubetune.api.model import ApiModel

Phase = Literal["Pending", "Validating", "Running", "Publishing", "Restarting", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = get_args(Phase)
FINAL_PHASES = ("Succeeded", "Failed")
"""A job in one of these phases never changes phase again."""
ACTIVE_PHASES = ("Pending", "Validating", "Running", "Publishing", "Restarting")
"""Phases in which the operator is still working towards the end (kstatus: Reconciling)."""
ConditionType = Literal["Ready", "Reconciling", "Stalled", "Suspended", "Succeeded", "Failed"]
CONDITION_TYPES: tuple[str, ...] = get_args(ConditionType)
"""Ready is always present (True once Succeeded); the others only while they hold (kstatus's
abnormal-true conditions): Reconciling while the job works towards its end, Stalled and Failed
once it failed, Suspended while suspended, Succeeded once the adapter is published."""

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Condition(ApiModel):
    """One aspect of the job's state, as Kubernetes conditions are."""

    type: ConditionType
    """Which aspect: Ready, Reconciling, Stalled, Suspended, Succeeded or Failed."""
    status: Literal["True", "False", "Unknown"]
    """Whether it holds."""
    reason: str | None = None
    """A CamelCase word saying why, for machines."""
    message: str | None = None
    """Why, for people."""
    last_transition_time: Timestamp | None = None
    """When status last changed."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed for."""


class WorkerCounts(ApiModel):
    """Worker pods by state."""

    active: int | None = None
    """Pending or running."""
    succeeded: int | None = None
    """Exited 0."""
    failed: int | None = None
    """Failed."""


class Adapter(ApiModel):
    """The published adapter."""

    uri: str | None = None
    """Where it is (its manifest.json lists every file with its sha256)."""
    manifest_sha256: str | None = None
    """sha256 of the manifest.json this job published: the adapter at uri is this job's only
    while its manifest has this digest."""


class Progress(ApiModel):
    """Training progress while Running, scraped every few seconds from rank 0's Prometheus
    endpoint (the pod's metrics port); at the last step once Succeeded."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take."""
    display: str | None = None
    """step/totalSteps, for kubectl get."""
    epoch: float | None = None
    """Fractional epoch."""
    loss: float | None = None
    """Training loss of the last logged step."""
    tokens_per_second: float | None = None
    """Effective (non-padding) tokens per second, all ranks together."""
    eta: str | None = None
    """Estimated time left, from the step rate between the last two scrapes that saw a new step."""
    eta_seconds: int | None = None
    """The same in seconds."""
    step_time: str | None = None
    """When the operator first saw the current step."""


class Results(ApiModel):
    """What the trainer reported when it finished (its termination message)."""

    final_loss: float | None = None
    """Training loss of the last step."""
    eval_loss: float | None = None
    """Evaluation loss at the end (with evaluation data)."""
    retention_loss_before: float | None = None
    """Loss of the base model on spec.evaluation.retentionUri (general text it should keep knowing)."""
    retention_loss_after: float | None = None
    """The same after training: how much the adapter made the model forget."""
    steps: int | None = None
    """Optimizer steps taken."""
    tokens: int | None = None
    """Real (non-padding) tokens trained on."""


class Launched(ApiModel):
    """What the operator started, recorded when it created the job's workers: the status is
    derived from this record, never from the live spec."""

    replicas: int | None = None
    """Worker pods created."""
    gpus_per_worker: int | None = None
    """GPUs each worker holds."""
    config_hash: str | None = None
    """sha256 of the trainer config rendered into the workers' kubetune.dev/trainer-config annotation."""
    attempt: int | None = None
    """Which start of the job's gang this is (1 = the first); each restart or resume adds one."""
    adapter_uri: str | None = None
    """Where the adapter is published."""
    storage_endpoint: str | None = None
    """The S3 endpoint the workers were given: spec.storage.endpoint, else the operator's default
    (none: AWS)."""
    logs_uri: str | None = None
    """S3 folder where this attempt's workers keep their whole logs, one <pod>.log each
    (kubetune.api.logs); they stay after the pods are gone."""
    created_time: Timestamp | None = None
    """When this attempt's workers were created."""
    running_time: Timestamp | None = None
    """When all of this attempt's workers first ran."""


class Failure(ApiModel):
    """Why an attempt ended badly: the first worker that failed, in its own words."""

    attempt: int | None = None
    """The attempt (status.launched.attempt) that ended."""
    reason: str | None = None
    """WorkerFailed, WorkerMissing, Stalled, OOMKilled, Evicted, TrainerError, ..."""
    pod: str | None = None
    """The worker pod it happened to."""
    exit_code: int | None = None
    """The container's exit code (the trainer's own when it left a termination message)."""
    signal: str | None = None
    """The signal that ended the process, when one did (SIGKILL, SIGSEGV, ...)."""
    message: str | None = None
    """The trainer's last error, or the pod's own reason and message."""
    log_uri: str | None = None
    """S3 object with that worker's whole log of the attempt (its pod may be gone)."""
    time: Timestamp | None = None
    """When the operator saw it."""


class AttemptCost(ApiModel):
    """What one attempt held."""

    attempt: int | None = None
    """Which attempt."""
    worker_seconds: int | None = None
    """Worker pods times the seconds from their creation to the end of the attempt."""
    gpu_seconds: int | None = None
    """GPUs held times those seconds."""


class Cost(ApiModel):
    """What the job consumed so far, summed over its attempts (updated when an attempt ends)."""

    worker_seconds: int | None = None
    """Worker pods times seconds held, all attempts."""
    gpu_seconds: int | None = None
    """GPU-seconds held, all attempts."""
    tokens: int | None = None
    """Real (non-padding) tokens trained on, once Succeeded."""
    attempts: list[AttemptCost] | None = None
    """Each ended attempt's share."""


class FineTuneJobStatus(ApiModel):
    """What the operator observed; written by the operator only."""

    phase: Phase | None = None
    """Lifecycle phase: Validating (the preflight pod checks the inputs), Pending (workers
    starting), Running, Publishing (training done, the adapter being evaluated and uploaded),
    Restarting (the gang is recreated after a failure), Suspended, Succeeded or Failed."""
    message: str | None = None
    """What is happening, or why the job failed."""
    observed_generation: int | None = None
    """The metadata.generation this status was computed for."""
    conditions: list[Condition] | None = Field(
        None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    """Ready (always) and those of Reconciling, Stalled, Suspended, Succeeded and Failed that hold."""
    workers: WorkerCounts | None = None
    """Worker pods by state."""
    adapter: Adapter | None = None
    """The published adapter, once Succeeded."""
    progress: Progress | None = None
    """Training progress."""
    results: Results | None = None
    """What the trainer reported when it finished."""
    launched: Launched | None = None
    """What the operator started for this job (the current attempt)."""
    restarts: int | None = None
    """Gang restarts so far (counted against spec.runPolicy.backoffLimit)."""
    last_failure: Failure | None = None
    """Why the last attempt that failed ended."""
    next_attempt_time: Timestamp | None = None
    """While Restarting: the earliest time the gang is created again (exponential backoff)."""
    cost: Cost | None = None
    """What the job consumed."""
    start_time: Timestamp | None = None
    """When every worker first ran (again, after a suspend): activeDeadlineSeconds counts from here."""
    completion_time: Timestamp | None = None
    """When the job reached Succeeded or Failed."""

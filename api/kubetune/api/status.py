"""``FineTuneJob.status``: what the operator observed, in the shape kstatus, Flux and Argo CD read.

The phases and condition types are the contract between the operator (which writes them), the
CRD (which lists them), the operator's metrics (one series per phase) and every client.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from kubetune.api.model import ApiModel

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = get_args(Phase)
FINAL_PHASES = ("Succeeded", "Failed")
"""A job in one of these phases never changes phase again."""
ConditionType = Literal["Created", "Running", "Succeeded", "Failed"]
CONDITION_TYPES: tuple[str, ...] = get_args(ConditionType)

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Condition(ApiModel):
    """One aspect of the job's state, as Kubernetes conditions are."""

    type: ConditionType
    """Which aspect: Created (children exist), Running, Succeeded, Failed."""
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
    steps: int | None = None
    """Optimizer steps taken."""
    tokens: int | None = None
    """Real (non-padding) tokens trained on."""


class Launched(ApiModel):
    """What the operator started, recorded when it created the job's children: the status is
    derived from this record, never from the live spec."""

    replicas: int | None = None
    """Worker pods created."""
    config_hash: str | None = None
    """sha256 of the trainer config rendered into the job's ConfigMap."""
    attempt: int | None = None
    """Which start of the job's gang this is (1 = the first)."""
    adapter_uri: str | None = None
    """Where the adapter is published."""


class FineTuneJobStatus(ApiModel):
    """What the operator observed; written by the operator only."""

    phase: Phase | None = None
    """Lifecycle phase: Pending, Running, Succeeded or Failed."""
    message: str | None = None
    """What is happening, or why the job failed."""
    observed_generation: int | None = None
    """The metadata.generation this status was computed for."""
    conditions: list[Condition] | None = Field(
        None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    """Created, Running, Succeeded and Failed, each True or False with a reason."""
    workers: WorkerCounts | None = None
    """Worker pods by state."""
    adapter: Adapter | None = None
    """The published adapter, once Succeeded."""
    progress: Progress | None = None
    """Training progress."""
    results: Results | None = None
    """What the trainer reported when it finished."""
    launched: Launched | None = None
    """What the operator started for this job."""
    start_time: Timestamp | None = None
    """When every worker first ran."""
    completion_time: Timestamp | None = None
    """When the job reached Succeeded or Failed."""

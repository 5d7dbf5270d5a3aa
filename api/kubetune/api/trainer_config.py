"""The trainer config: the job as the trainer sees it, the only input of a worker.

The operator renders a FineTuneJob into JSON (a YAML subset) in the annotation
``kubetune.dev/trainer-config`` of each of the job's pods, which a downward API volume mounts at
``/etc/kubetune/config.json`` (as Argo Workflows hands a pod its template): the config travels
with the pod, with no object of its own to write and keep. Its sections are
the spec's own types (``spec.py``), resolved: every default filled in, the S3 endpoint chosen,
nothing left out, so the file says exactly how the adapter was made (it is saved beside it).
S3 credentials are never in it: they reach the trainer as the environment variables
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the job's Secret.

Example (the quickstart, shortened)::

    schemaVersion: 1
    job: {namespace: default, name: quickstart, uid: "..."}
    model: {uri: "s3://models/tiny-llama/"}
    dataset: {uri: "s3://datasets/quickstart/train.jsonl", format: text, ...}
    lora: {r: 8, alpha: 16, dropout: 0.05, targetModules: [q_proj, v_proj]}
    training: {epochs: 5, maxSteps: 150, learningRate: 0.001, microBatchSize: 4, ...}
    deepspeed: {zeroStage: 2, offload: none, config: null}
    output: {adapterUri: "s3://adapters/quickstart/", checkpointUri: null, ...}
    evaluation: {atStart: false, retentionUri: null, retentionTextField: text}
    qualityGate: {maxEvalLoss: null, maxRetentionLossIncrease: null}
    storage: {endpoint: "http://s3.kubetune-system.svc.cluster.local:9000", region: us-east-1, ...}
    metrics: {port: 9400}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from kubetune.api.model import ApiModel, InvalidObjectError, describe
from kubetune.api.spec import (
    QUALITY_GATE_NEEDS_EVALUATION_DATA,
    RETENTION_GATE_NEEDS_RETENTION_DATA,
    Dataset,
    DeepSpeed,
    Evaluation,
    FineTuneJobSpec,
    Lora,
    ModelSource,
    Output,
    QualityGate,
    Storage,
    Training,
)

SCHEMA_VERSION = 1
"""The ``schemaVersion`` operator and trainer of this release speak; renaming, removing or
changing the meaning of a field needs a new one."""
CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/kubetune"
CONFIG_ANNOTATION = "kubetune.dev/trainer-config"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"


class JobRef(ApiModel):
    """Which FineTuneJob a run belongs to (in logs and the adapter's manifest)."""

    namespace: str = "default"
    """Namespace of the FineTuneJob."""
    name: str = "local"
    """Name of the FineTuneJob."""
    uid: str = ""
    """metadata.uid of the FineTuneJob: keeps the work of a re-created job of the same name apart."""


class Metrics(ApiModel):
    """The Prometheus endpoint rank 0 serves."""

    port: int = Field(9400, ge=0, le=65535)
    """Port of /metrics on every interface of the pod; 0 turns the endpoint off."""


class TrainerConfig(ApiModel):
    """The whole file /etc/kubetune/config.json (JSON or YAML: a file given to --config by hand may be either)."""

    rules = (QUALITY_GATE_NEEDS_EVALUATION_DATA, RETENTION_GATE_NEEDS_RETENTION_DATA)

    schema_version: int
    """Version of this schema; see SCHEMA_VERSION."""
    job: JobRef = JobRef()
    """The FineTuneJob this run belongs to."""
    model: ModelSource
    """spec.model."""
    dataset: Dataset
    """spec.dataset."""
    lora: Lora = Lora()
    """spec.lora."""
    training: Training = Training()
    """spec.training."""
    deepspeed: DeepSpeed = DeepSpeed()
    """spec.deepspeed."""
    output: Output
    """spec.output."""
    evaluation: Evaluation = Evaluation()
    """spec.evaluation."""
    quality_gate: QualityGate = QualityGate()
    """spec.qualityGate."""
    storage: Storage = Storage()
    """spec.storage, with the operator's default endpoint filled in."""
    metrics: Metrics = Metrics()
    """Where rank 0 serves its metrics."""

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"schemaVersion {version} is not the one this trainer reads ({SCHEMA_VERSION}); run an "
                "operator and a trainer image of the same release"
            )
        return version

    @classmethod
    def for_job(cls, job: JobRef, spec: FineTuneJobSpec, *, s3_endpoint: str | None, metrics_port: int) -> TrainerConfig:
        """The config the operator renders for ``spec``; ``s3_endpoint`` is its default endpoint,
        for jobs that name none."""
        return cls(
            schema_version=SCHEMA_VERSION, job=job, model=spec.model, dataset=spec.dataset, lora=spec.lora,
            training=spec.training, deepspeed=spec.deepspeed, output=spec.output, evaluation=spec.evaluation,
            quality_gate=spec.quality_gate,
            storage=spec.storage.model_copy(update={"endpoint": spec.storage.endpoint or s3_endpoint}),
            metrics=Metrics(port=metrics_port),
        )

    def to_document(self) -> dict[str, Any]:
        """The resolved config with the manifest's camelCase keys (JSON types)."""
        return self.model_dump(mode="json", by_alias=True)

    def render(self) -> str:
        """The pods' annotation: compact JSON, keys in schema order so that diffs read naturally
        (JSON, not YAML: the operator renders it for every pod it creates, and PyYAML's
        emitter takes a hundred times as long)."""
        return json.dumps(self.to_document(), separators=(",", ":"))


def parse_config(data: Any, *, source: str = "config") -> TrainerConfig:
    """A decoded config document as the typed model; InvalidObjectError names the key path
    and the fix."""
    if not isinstance(data, dict):
        raise InvalidObjectError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as error:
        raise InvalidObjectError(f"{source}: {describe(error)}") from None


def load_config(path: str | Path) -> TrainerConfig:
    """Read and validate the trainer config file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidObjectError(
            f"cannot read trainer config {path}: {error.strerror}; pass --config with the mounted file "
            f"(in a pod: {CONFIG_PATH})"
        ) from None
    try:
        data = json.loads(text)  # what the operator renders; PyYAML reads JSON's 1e-05 as a string
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InvalidObjectError(f"{path}: neither JSON nor valid YAML: {error}") from None
    return parse_config(data, source=str(path))

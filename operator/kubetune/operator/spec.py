"""Typed FineTuneJob spec, mirroring ``crds/finetunejob.yaml`` (the one source of truth).

The API server already validates and defaults the object with the CRD schema; parsing it again
here gives the builders typed access and re-checks the cross-field rules that CEL would enforce,
because a server that does not evaluate CEL must not let a bad job reach the workers.
tests/operator/test_crd_model_consistency.py keeps this file and the CRD in step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
HTTP_URL_PATTERN = r"^https?://[^\s/]+(/.*)?$"
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# The trainer's kubetune.trainer.schedule.OWNED_KEYS, repeated: the operator never imports
# the trainer. tests/operator/test_trainer_config.py checks the two lists agree.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "spec.training.globalBatchSize",
    "train_micro_batch_size_per_gpu": "spec.training.microBatchSize",
    "gradient_accumulation_steps": "spec.training.globalBatchSize (accumulation is derived from it)",
    "gradient_clipping": "spec.training.gradientClipping",
    "optimizer": "spec.training.learningRate (kubetune brings AdamW over the LoRA parameters)",
    "scheduler": "spec.training.warmupSteps and spec.training.minLearningRate",
}
# Pod names are "<job>-worker-<index>" and must stay DNS labels (63 characters).
MAX_JOB_NAME_LENGTH = 52


class _Model(BaseModel):
    # extra="forbid": a field the CRD does not define is a typo the user should hear about.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")


class ModelSource(_Model):
    uri: str = Field(pattern=S3_URI_PATTERN)


class Dataset(_Model):
    uri: str = Field(pattern=S3_URI_PATTERN)
    format: Literal["text", "chat", "instruction"] = "text"
    text_field: str = Field(default="text", min_length=1)
    messages_field: str = Field(default="messages", min_length=1)
    prompt_field: str = Field(default="prompt", min_length=1)
    response_field: str = Field(default="response", min_length=1)
    validation_split: float = Field(default=0.0, ge=0, le=0.5)
    validation_uri: str | None = Field(default=None, pattern=S3_URI_PATTERN)
    overlong: Literal["truncate", "drop"] = "truncate"

    @model_validator(mode="after")
    def _one_validation_source(self) -> Dataset:
        # Mirrors the CRD's CEL rule on spec.dataset.
        if self.validation_uri is not None and self.validation_split != 0:
            raise ValueError(
                "spec.dataset.validationUri and spec.dataset.validationSplit exclude each other: "
                "validationUri is evaluated whole, so set validationSplit to 0 (or remove validationUri)."
            )
        return self


class Lora(_Model):
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, le=1)
    target_modules: tuple[str, ...] = Field(default=("q_proj", "v_proj"), min_length=1)


class Training(_Model):
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    micro_batch_size: int = Field(default=4, ge=1)
    global_batch_size: int = Field(default=8, ge=1)
    sequence_length: int = Field(default=512, ge=16)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every_steps: int = Field(default=1, ge=1)
    packing: bool = False
    warmup_steps: int | None = Field(default=None, ge=0)
    min_learning_rate: float = Field(default=0.0, ge=0)
    gradient_checkpointing: bool = False
    gradient_clipping: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _min_learning_rate_below_peak(self) -> Training:
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"spec.training.minLearningRate ({self.min_learning_rate:g}) must not exceed "
                f"spec.training.learningRate ({self.learning_rate:g}): the cosine decay ends at it; "
                "lower minLearningRate."
            )
        return self


class DeepSpeed(_Model):
    zero_stage: Literal[1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_keys_kubetune_owns(self) -> DeepSpeed:
        # Keys kubetune derives from other fields; letting the override win would silently
        # break gradient accumulation or the LR schedule.
        owned = [key for key in DEEPSPEED_OWNED_KEYS if key in (self.config or {})]
        if owned:
            raise ValueError("; ".join(
                f"spec.deepspeed.config.{key} is set by kubetune: use {DEEPSPEED_OWNED_KEYS[key]} instead"
                for key in owned
            ))
        return self


class Resources(_Model):
    limits: dict[str, int | str] | None = None
    requests: dict[str, int | str] | None = None


class Workers(_Model):
    replicas: int = Field(default=1, ge=1, le=64)
    gpus_per_worker: int = Field(default=0, ge=0, le=16)
    image: str = Field(default="kubetune/trainer:0.1.0", min_length=1)
    resources: Resources | None = None

    @property
    def processes_per_worker(self) -> int:
        """torchrun --nproc-per-node: one per GPU, or one CPU process."""
        return max(self.gpus_per_worker, 1)

    @property
    def world_size(self) -> int:
        return self.replicas * self.processes_per_worker


class Output(_Model):
    adapter_uri: str = Field(pattern=S3_URI_PATTERN)
    checkpoint_uri: str | None = Field(default=None, pattern=S3_URI_PATTERN)
    checkpoint_every_steps: int = Field(default=0, ge=0)
    keep_checkpoints: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _checkpoints_apart_from_adapter(self) -> Output:
        # Mirrors the CRD's CEL rule on spec.output.
        if self.checkpoint_uri is not None:
            adapter, checkpoints = _as_folder(self.adapter_uri), _as_folder(self.checkpoint_uri)
            if adapter.startswith(checkpoints) or checkpoints.startswith(adapter):
                raise ValueError(
                    "spec.output.checkpointUri must not lie inside spec.output.adapterUri or contain "
                    "it (checkpoints would be published with the adapter); use a separate folder "
                    "such as s3://ckpt/<job>/."
                )
        return self


def _as_folder(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


class QualityGate(_Model):
    max_eval_loss: float | None = Field(default=None, gt=0)


class Storage(_Model):
    endpoint: str | None = Field(default=None, pattern=HTTP_URL_PATTERN)
    region: str = Field(default="us-east-1", min_length=1)
    credentials_secret: str | None = Field(default=None, pattern=SECRET_NAME_PATTERN, max_length=253)


class FineTuneJobSpec(_Model):
    model: ModelSource
    dataset: Dataset
    lora: Lora = Lora()
    training: Training = Training()
    deepspeed: DeepSpeed = DeepSpeed()
    workers: Workers = Workers()
    output: Output
    quality_gate: QualityGate = QualityGate()
    storage: Storage = Storage()

    @model_validator(mode="after")
    def _global_batch_divides_evenly(self) -> FineTuneJobSpec:
        step = self.training.micro_batch_size * self.workers.world_size
        if self.training.global_batch_size % step:
            raise ValueError(
                f"spec.training.globalBatchSize ({self.training.global_batch_size}) must be a "
                f"multiple of spec.training.microBatchSize * spec.workers.replicas * "
                f"max(spec.workers.gpusPerWorker, 1) = {self.training.micro_batch_size} * "
                f"{self.workers.replicas} * {self.workers.processes_per_worker} = {step}; "
                f"change globalBatchSize, microBatchSize or the worker count"
            )
        return self


    @model_validator(mode="after")
    def _quality_gate_has_evaluation_data(self) -> FineTuneJobSpec:
        if self.quality_gate.max_eval_loss is not None and not (
            self.dataset.validation_split > 0 or self.dataset.validation_uri
        ):
            raise ValueError(
                "spec.qualityGate.maxEvalLoss needs evaluation data: set spec.dataset.validationSplit "
                "above 0 or spec.dataset.validationUri, or remove the gate."
            )
        return self


class InvalidSpecError(ValueError):
    """The FineTuneJob cannot run as written; the message names each field and the fix."""


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Parse a FineTuneJob ``spec`` (as the API server stores it) into the typed model."""
    try:
        return FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as error:
        raise InvalidSpecError(describe_validation_error(error)) from None


def check_job_name(name: str) -> None:
    """Mirror of the CRD's metadata.name CEL rule, for servers that do not evaluate CEL."""
    if len(name) > MAX_JOB_NAME_LENGTH:
        raise InvalidSpecError(
            f"metadata.name {name!r} is {len(name)} characters; at most "
            f"{MAX_JOB_NAME_LENGTH} keep worker pod names valid DNS labels: choose a shorter name"
        )


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field as a user writes it (spec.a.b)."""
    lines = []
    for problem in error.errors(include_url=False):
        if problem["type"] == "value_error" and (
            not problem["loc"] or str(problem["ctx"]["error"]).startswith("spec.")
        ):
            # Cross-field rules already name their fields.
            lines.append(str(problem["ctx"]["error"]))
            continue
        where = ".".join(str(part) for part in ("spec", *problem["loc"]))
        lines.append(f"{where}: {problem['msg']}")
    return "; ".join(lines)

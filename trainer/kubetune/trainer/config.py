"""The trainer config: the only contract between the operator and the trainer.

The operator renders a FineTuneJob into ConfigMap ``<job>-trainer-config`` (key
``config.yaml``), mounted in every worker at ``/etc/kubetune/config.yaml``. This module IS
the documented schema: every field below carries its meaning, default and trade-off.

Rules:
- keys are camelCase, exactly as in the FineTuneJob spec;
- an unknown key is an error that names the key (a typo must never be silently ignored);
- ``schemaVersion`` must be one this trainer understands (:data:`SCHEMA_VERSION`);
- S3 credentials are never in the config: they arrive as the env vars
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.

Example (what the operator renders for the quickstart)::

    schemaVersion: 1
    job: {namespace: default, name: quickstart, uid: "..."}
    model: {uri: "s3://models/tiny-llama/"}
    dataset: {uri: "s3://datasets/quickstart/train.jsonl", format: text}
    lora: {r: 8, alpha: 16, dropout: 0.05, targetModules: [q_proj, v_proj]}
    training: {epochs: 1, learningRate: 0.0002, microBatchSize: 4, globalBatchSize: 8}
    deepspeed: {zeroStage: 2, offload: none}
    output: {adapterUri: "s3://adapters/quickstart/"}
    storage: {endpoint: null, region: us-east-1}
    metrics: {port: 9400}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune.trainer.errors import TrainerError

SCHEMA_VERSION = 1
"""The only ``schemaVersion`` this trainer accepts; the operator renders the same number.

Optional fields may join version 1 (output.checkpointUri, checkpointEverySteps,
keepCheckpoints, qualityGate did); the operator renders them only when set, so jobs that
do not use them still run on an older schema-1 trainer. Renaming, removing or changing the
meaning of a field needs version 2."""


class _Section(BaseModel):
    """Base for every section: camelCase keys, unknown keys rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def _require_s3_uri(value: str, *, folder: bool) -> str:
    if not value.startswith("s3://") or len(value) <= len("s3://"):
        raise ValueError(f"must be an s3:// URI (got {value!r})")
    if folder and not value.endswith("/"):
        # A folder URI without "/" would also match sibling prefixes (s3://m/a matches s3://m/ab).
        value += "/"
    return value


class JobRef(_Section):
    """Which FineTuneJob this run belongs to (used in logs and the adapter manifest)."""

    namespace: str = "default"
    """Namespace of the FineTuneJob."""
    name: str = "local"
    """Name of the FineTuneJob."""
    uid: str = ""
    """metadata.uid of the FineTuneJob; keeps work folders of re-created jobs apart."""


class ModelConfig(_Section):
    """The base model to adapt."""

    uri: str
    """s3:// folder holding config.json, tokenizer files and (safetensors) weights, as written
    by ``save_pretrained``. Every node downloads it once, so its size bounds start-up time."""

    @field_validator("uri")
    @classmethod
    def _s3_folder(cls, v: str) -> str:
        return _require_s3_uri(v, folder=True)


class DatasetConfig(_Section):
    """The training data: one JSONL file (one example per line) or Parquet file (one per row)."""

    uri: str
    """s3:// URI of the JSONL or Parquet file (Parquet is recognised by its content)."""
    format: Literal["text", "chat", "instruction"] = "text"
    """How a line becomes tokens. ``text``: the string in ``textField`` is trained on whole.
    ``chat``: the list of ``{role, content}`` in ``messagesField`` is rendered with the
    tokenizer's chat template (the tokenizer must have one); loss is taken on the assistant's
    messages only. ``instruction``: ``promptField`` then ``responseField``; loss is taken on
    the response only."""
    text_field: str = "text"
    """Key holding the text for ``format: text``."""
    messages_field: str = "messages"
    """Key holding the message list for ``format: chat``."""
    prompt_field: str = "prompt"
    """Key holding the prompt for ``format: instruction``."""
    response_field: str = "response"
    """Key holding the response for ``format: instruction``."""
    validation_split: float = Field(0.0, ge=0.0, le=0.5)
    """Fraction of examples held out for an evaluation loss at the end (0 = none). Larger
    values give a steadier eval loss but train on less data."""
    validation_uri: str | None = None
    """s3:// URI of a separate evaluation file in the same format (JSONL or Parquet), used
    whole instead of a split; excludes ``validationSplit``. Added to schema 1 later: rendered
    only when set."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What happens to an example longer than ``training.sequenceLength``: ``truncate`` keeps
    its first sequenceLength tokens (a chat or instruction example may lose its answer, and is
    then dropped), ``drop`` leaves it out. Rank 0 logs how many. Added to schema 1 later:
    rendered only when not the default."""

    @field_validator("uri", "validation_uri")
    @classmethod
    def _s3_file(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = _require_s3_uri(v, folder=False)
        if v.endswith("/"):
            raise ValueError(f"must name a JSONL or Parquet file, not a folder (got {v!r})")
        return v

    @model_validator(mode="after")
    def _one_validation_source(self) -> DatasetConfig:
        if self.validation_uri is not None and self.validation_split > 0:
            raise ValueError(
                "set validationSplit or validationUri, not both (validationUri is evaluated whole; "
                "set validationSplit to 0)"
            )
        return self


class LoraConfig(_Section):
    """LoRA adapter shape (peft). Only these weights train; the base model stays frozen."""

    r: int = Field(8, ge=1)
    """Rank of the update matrices: higher learns more, costs more memory and a larger adapter."""
    alpha: float = Field(16, gt=0)
    """Scale of the update (effective scale alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, le=1.0)
    """Dropout on the LoRA input; regularises small datasets."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Names of the linear layers that get adapters (Llama names: q_proj k_proj v_proj o_proj
    gate_proj up_proj down_proj). More modules: more capacity, more memory."""


class TrainingConfig(_Section):
    """The optimisation loop."""

    epochs: int = Field(1, ge=1)
    """Passes over the training split."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on optimizer steps (across all epochs); null = run every epoch to the end."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate, reached after ``warmupSteps`` of linear warm-up; a cosine
    decay then takes it to ``minLearningRate`` at the last step."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per process per forward pass: bounded by memory."""
    global_batch_size: int = Field(8, ge=1)
    """Examples per optimizer step across all processes; must be a multiple of
    microBatchSize x world size (the remainder is made up by gradient accumulation)."""
    sequence_length: int = Field(512, ge=16)
    """Longest example in tokens (longer ones per ``dataset.overlong``); with ``packing``, the
    length of each packed row."""
    seed: int = 42
    """Seeds LoRA init, dropout, the data split and the sampler: same seed, same run."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision. auto = bf16 on GPU, fp32 on CPU; bf16/fp16 need a GPU."""
    log_every_steps: int = Field(1, ge=1)
    """Rank 0 prints one progress line every this many optimizer steps."""
    packing: bool = False
    """Pack several examples into each row of sequenceLength tokens (position ids restart per
    example, so none attends to another) instead of padding length-grouped batches.
    microBatchSize and globalBatchSize then count rows. Pays off where attention skips the
    blocks between examples (flash-attention on GPU); on CPU, padded length-grouped batches
    were faster in our measurements. Added to schema 1 later: rendered only when true."""
    warmup_steps: int | None = Field(None, ge=0)
    """Optimizer steps of linear warm-up to learningRate (0 = none); null = 10% of the steps,
    at most 100. Longer warm-up steadies the first updates of a large learningRate. Added to
    schema 1 later: rendered only when set."""
    min_learning_rate: float = Field(0.0, ge=0)
    """Where the cosine decay ends at the last step; at most learningRate (equal = constant
    after warm-up). Added to schema 1 later: rendered only when not 0."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: roughly a third
    more compute for much less activation memory (longer sequences, larger micro-batches).
    Added to schema 1 later: rendered only when true."""
    gradient_clipping: float = Field(1.0, ge=0)
    """Largest global gradient norm before each optimizer step (0 = no clipping). Added to
    schema 1 later: rendered only when not 1.0."""

    @model_validator(mode="after")
    def _min_below_peak(self) -> TrainingConfig:
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"minLearningRate ({self.min_learning_rate:g}) must not exceed learningRate "
                f"({self.learning_rate:g}): the cosine decay goes from learningRate down to it"
            )
        return self


class DeepSpeedConfig(_Section):
    """How DeepSpeed shards the work across processes."""

    zero_stage: Literal[1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also the parameters (least
    memory per process, most communication)."""
    offload: Literal["none", "cpu"] = "none"
    """cpu moves optimizer state (and, at stage 3, parameters) to host memory: fits larger
    models on a GPU at the price of speed. No effect worth having on a CPU-only run."""
    config: dict[str, Any] | None = None
    """Raw DeepSpeed config for experts, deep-merged over the one kubetune generates (nested
    objects merge key by key, other values replace), e.g. ``{zero_optimization:
    {reduce_bucket_size: 50000000}}``. Keys kubetune derives are refused with the field to
    use instead: train_batch_size, train_micro_batch_size_per_gpu,
    gradient_accumulation_steps, gradient_clipping, optimizer, scheduler. Added to schema 1
    later: rendered only when set."""

    @field_validator("config")
    @classmethod
    def _no_owned_keys(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from kubetune.trainer.schedule import owned_key_problems

        problems = owned_key_problems(v or {})
        if problems:
            raise ValueError("; ".join(problems))
        return v


class OutputConfig(_Section):
    """Where the result goes."""

    adapter_uri: str
    """s3:// folder receiving adapter_config.json, adapter_model.safetensors, the tokenizer
    files and, written last, manifest.json (its presence means the upload is complete)."""

    checkpoint_uri: str | None = None
    """s3:// folder for checkpoints, one ``step-<N>/`` folder each with every rank's DeepSpeed
    shards, the data position and RNG states, and a ``COMPLETE`` marker written once all
    ranks' uploads finished. On start the trainer resumes from the newest complete one.
    null = no checkpoints (a restart trains from step 0). It must not overlap adapterUri."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Checkpoint every this many optimizer steps as well as at each epoch end (0 = epoch ends
    only). Uploads run in the background; more frequent ones lose less work on a restart."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    @field_validator("adapter_uri")
    @classmethod
    def _s3_folder(cls, v: str) -> str:
        return _require_s3_uri(v, folder=True)

    @field_validator("checkpoint_uri")
    @classmethod
    def _s3_checkpoint_folder(cls, v: str | None) -> str | None:
        return None if v is None else _require_s3_uri(v, folder=True)

    @model_validator(mode="after")
    def _apart(self) -> OutputConfig:
        if self.checkpoint_uri and (
            self.checkpoint_uri.startswith(self.adapter_uri) or self.adapter_uri.startswith(self.checkpoint_uri)
        ):
            raise ValueError(
                "checkpointUri must not lie inside adapterUri or contain it (checkpoints would be "
                "published with the adapter); use a separate folder"
            )
        return self


class QualityGateConfig(_Section):
    """What the adapter must achieve to be published."""

    max_eval_loss: float | None = Field(None, gt=0)
    """Highest accepted final eval loss (needs dataset.validationSplit > 0). Above it nothing is
    published and the trainer exits 1 with the measured value; null = no gate."""


class StorageConfig(_Section):
    """The S3-compatible store holding model, data and adapter."""

    endpoint: str | None = None
    """http(s) URL of the S3 endpoint; null = AWS S3 in ``region``."""
    region: str = "us-east-1"
    """Region to sign requests for."""

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        return v


class MetricsConfig(_Section):
    """Prometheus endpoint served by rank 0."""

    port: int = Field(9400, ge=0, le=65535)
    """Port of /metrics on all interfaces of the pod; 0 turns the endpoint off."""


class TrainerConfig(_Section):
    """The whole file ``/etc/kubetune/config.yaml``."""

    schema_version: int
    """Version of this schema; this trainer accepts only :data:`SCHEMA_VERSION`."""
    job: JobRef = Field(default_factory=JobRef)
    model: ModelConfig
    dataset: DatasetConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    output: OutputConfig
    quality_gate: QualityGateConfig = Field(default_factory=QualityGateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _gate_has_evaluation_data(self) -> TrainerConfig:
        dataset = self.dataset
        if self.quality_gate.max_eval_loss is not None and not (dataset.validation_split > 0 or dataset.validation_uri):
            raise ValueError(
                "qualityGate.maxEvalLoss needs evaluation data: set dataset.validationSplit above 0 "
                "or dataset.validationUri, or remove the gate"
            )
        return self

    def to_document(self) -> dict[str, Any]:
        """The resolved config (defaults filled in) with camelCase keys, as saved in the manifest."""
        return self.model_dump(mode="json", by_alias=True)


def parse_config(data: Any, *, source: str = "config") -> TrainerConfig:
    """Validate a decoded YAML/JSON document; errors name the key path and the fix."""
    if not isinstance(data, dict):
        raise TrainerError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    version = data.get("schemaVersion")
    if version != SCHEMA_VERSION:
        raise TrainerError(
            f"{source}: schemaVersion {version!r} is not supported by this trainer (it reads "
            f"schemaVersion {SCHEMA_VERSION}); run an operator and trainer image of the same release"
        )
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as exc:
        raise TrainerError(f"{source}: {_describe(exc)}") from None


def load_config(path: str | Path) -> TrainerConfig:
    """Read and validate the trainer config file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TrainerError(
            f"cannot read trainer config {path}: {exc.strerror}; pass --config with the mounted "
            "file (default mount: /etc/kubetune/config.yaml)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TrainerError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path))


def _describe(exc: ValidationError) -> str:
    """One line per problem, e.g. ``training.microBatchs: unknown key``."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key (check its spelling against the schema)")
        elif err["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        else:
            problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)

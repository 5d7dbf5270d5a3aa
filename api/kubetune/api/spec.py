"""``FineTuneJob.spec``: what to train, with what, and where to put the result.

The source of the CRD's spec schema (``make crds``), the operator's typed view of a job, and,
section by section, the trainer config (``trainer_config.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from kubetune.api.model import ApiModel, InvalidObjectError, Rule, describe

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
HTTP_URL_PATTERN = r"^https?://[^\s/]+(/.*)?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DEFAULT_TRAINER_IMAGE = "kubetune/trainer:0.1.0"

DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "spec.training.globalBatchSize",
    "train_micro_batch_size_per_gpu": "spec.training.microBatchSize",
    "gradient_accumulation_steps": "spec.training.globalBatchSize (accumulation is derived from it)",
    "gradient_clipping": "spec.training.gradientClipping",
    "optimizer": "spec.training.learningRate (kubetune brings AdamW over the LoRA parameters)",
    "scheduler": "spec.training.warmupSteps and spec.training.minLearningRate",
}
"""Top-level DeepSpeed keys kubetune derives itself, with the field to set instead: letting an
override win would silently break gradient accumulation or the learning-rate schedule."""

S3Uri = Annotated[str, Field(pattern=S3_URI_PATTERN)]


def as_folder(uri: str) -> str:
    """A folder URI ends with "/": without it, s3://m/a would also match the prefix s3://m/ab."""
    return uri if uri.endswith("/") else uri + "/"


class ModelSource(ApiModel):
    """The base model to adapt."""

    uri: S3Uri
    """s3:// folder holding config.json, the tokenizer files and the (safetensors) weights, as
    written by save_pretrained (for example s3://models/tiny-llama/). Every worker downloads it
    once, so its size bounds the start-up time."""

    @field_validator("uri")
    @classmethod
    def _folder(cls, uri: str) -> str:
        return as_folder(uri)


class Dataset(ApiModel):
    """The training data: a JSONL file (one JSON object per line) or a Parquet file (one example
    per row)."""

    rules = (
        Rule(
            cel="!self.uri.endsWith('/')",
            message="spec.dataset.uri must name a JSONL or Parquet file, not a folder (it ends with '/').",
            check=lambda d: not d.uri.endswith("/"),
        ),
        Rule(
            cel="!has(self.validationUri) || double(self.validationSplit) == 0.0",
            message=(
                "spec.dataset.validationUri and spec.dataset.validationSplit exclude each other: validationUri "
                "is evaluated whole, so set validationSplit to 0 (or remove validationUri)."
            ),
            check=lambda d: d.validation_uri is None or d.validation_split == 0,
        ),
    )

    uri: S3Uri
    """s3:// URI of a JSONL or Parquet file (for example s3://datasets/support/train.jsonl);
    Parquet is recognised by its content, so any name works."""
    format: Literal["text", "chat", "instruction"] = "text"
    """How each example is read: text (the string in textField, all trained on), chat (the list
    of role/content messages in messagesField, rendered with the tokenizer's chat template; only
    the assistant's messages are trained on) or instruction (promptField then responseField;
    only the response is trained on)."""
    text_field: str = Field("text", min_length=1)
    """Field holding the text when format is text."""
    messages_field: str = Field("messages", min_length=1)
    """Field holding the list of messages when format is chat."""
    prompt_field: str = Field("prompt", min_length=1)
    """Field holding the prompt when format is instruction."""
    response_field: str = Field("response", min_length=1)
    """Field holding the response when format is instruction."""
    validation_split: float = Field(0.0, ge=0, le=0.5)
    """Fraction of the examples held out (seeded) for the evaluation loss; 0 = none. Larger
    values give a steadier evaluation loss but train on less data."""
    validation_uri: S3Uri | None = None
    """s3:// URI of a separate evaluation file in the same format, evaluated whole instead of a
    split (validationSplit must then be 0)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What happens to an example longer than training.sequenceLength: truncate keeps its first
    sequenceLength tokens (a chat or instruction example left with no token to train on is then
    dropped), drop leaves it out. The worker logs how many."""


class Lora(ApiModel):
    """The LoRA adapter (peft): only these weights train; the base model stays frozen."""

    r: int = Field(8, ge=1)
    """Rank of the update matrices: a higher rank learns more and costs more memory and a larger
    adapter."""
    alpha: int = Field(16, ge=1)
    """Scale of the update (the effective scale is alpha / r)."""
    dropout: float = Field(0.05, ge=0, le=1)
    """Dropout on the LoRA input; it regularises small datasets."""
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), min_length=1)
    """Names of the linear layers that get adapters (Llama: q_proj k_proj v_proj o_proj
    gate_proj up_proj down_proj). More modules: more capacity, more memory."""


class Training(ApiModel):
    """The optimisation loop."""

    rules = (
        Rule(
            # has(): the API server also checks the rule against the schema's default ({}).
            cel="!has(self.minLearningRate) || double(self.minLearningRate) <= double(self.learningRate)",
            message=(
                "spec.training.minLearningRate must not exceed spec.training.learningRate: the cosine decay "
                "goes from learningRate down to it; lower minLearningRate."
            ),
            check=lambda t: t.min_learning_rate <= t.learning_rate,
        ),
    )

    epochs: int = Field(1, ge=1)
    """Passes over the training data."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on the optimizer steps across all epochs; absent = every epoch to its end."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate, reached after warmupSteps of linear warm-up; a cosine decay then
    takes it to minLearningRate at the last step."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per training process per forward pass; bounded by memory."""
    global_batch_size: int = Field(8, ge=1)
    """Examples per optimizer step over all processes; a multiple of microBatchSize times the
    number of processes (the quotient is the number of gradient-accumulation steps)."""
    sequence_length: int = Field(512, ge=16)
    """Longest example in tokens (longer ones per dataset.overlong); with packing, the length of
    each packed row."""
    seed: int = 42
    """Seeds the LoRA initialisation, dropout, the data split and the order: same seed, same run."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; auto = bf16 on GPUs, fp32 on CPUs (bf16 and fp16 need a GPU)."""
    log_every_steps: int = Field(1, ge=1)
    """Rank 0 logs one progress line (and updates its metrics) every this many optimizer steps."""
    packing: bool = False
    """Pack several examples into each row of sequenceLength tokens, each attending only to
    itself, instead of padding batches of similar lengths; microBatchSize and globalBatchSize
    then count rows. Pays off where attention skips the blocks between examples (GPU
    flash-attention); padding measured faster on CPUs."""
    warmup_steps: int | None = Field(None, ge=0)
    """Optimizer steps of linear warm-up to learningRate (0 = none); absent = 10% of the steps,
    at most 100."""
    min_learning_rate: float = Field(0.0, ge=0)
    """Where the cosine decay ends at the last step; at most learningRate (equal = constant after
    the warm-up)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: about a third more
    compute for far less activation memory (longer sequences, larger micro-batches)."""
    gradient_clipping: float = Field(1.0, ge=0)
    """Largest global gradient norm before each optimizer step; 0 = no clipping."""


class DeepSpeed(ApiModel):
    """How DeepSpeed shards the work across the training processes."""

    zero_stage: Literal[1, 2, 3] = 2
    """ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters
    (least memory per process, most communication)."""
    offload: Literal["none", "cpu"] = "none"
    """cpu keeps the optimizer state (and at stage 3 the parameters) in host memory: larger
    models fit on a GPU, at the price of speed."""
    config: dict[str, Any] | None = None
    """Raw DeepSpeed config for experts, deep-merged over the one kubetune generates (nested
    objects merge key by key, other values replace). Keys kubetune derives are refused, naming
    the field to use: train_batch_size, train_micro_batch_size_per_gpu,
    gradient_accumulation_steps, gradient_clipping, optimizer, scheduler. Anything else goes to
    DeepSpeed as written."""

    @field_validator("config")
    @classmethod
    def _no_owned_keys(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        # Not a CEL rule: the API server does not let CEL read an object of unknown fields.
        owned = [key for key in DEEPSPEED_OWNED_KEYS if key in (config or {})]
        if owned:
            raise ValueError("; ".join(
                f"spec.deepspeed.config.{key} is set by kubetune: use {DEEPSPEED_OWNED_KEYS[key]} instead"
                for key in owned
            ))
        return config


Quantity = int | str


class Resources(ApiModel):
    """Compute resources of each worker pod, as in a container's resources."""

    limits: dict[str, Quantity] | None = None
    """Most of each resource a worker may use (cpu, memory, ...); nvidia.com/gpu comes from
    gpusPerWorker."""
    requests: dict[str, Quantity] | None = None
    """Resources the scheduler reserves for each worker."""


class Workers(ApiModel):
    """The gang of worker pods, each running torchrun."""

    replicas: int = Field(1, ge=1, le=64)
    """Number of worker pods (torchrun nodes)."""
    gpus_per_worker: int = Field(0, ge=0, le=16)
    """GPUs per pod, one training process each; 0 = one CPU process per pod."""
    image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1)
    """Trainer image; kept at its default, the operator's configured trainer image is used."""
    resources: Resources | None = None
    """Compute resources of each worker pod."""

    @property
    def processes_per_worker(self) -> int:
        """torchrun --nproc-per-node: one per GPU, or one CPU process."""
        return max(self.gpus_per_worker, 1)

    @property
    def world_size(self) -> int:
        return self.replicas * self.processes_per_worker


class Output(ApiModel):
    """Where the adapter (and the checkpoints) go."""

    rules = (
        Rule(
            cel=(
                "!has(self.checkpointUri) || "
                "!((self.checkpointUri + '/').startsWith(self.adapterUri.endsWith('/') ? self.adapterUri "
                ": self.adapterUri + '/') || (self.adapterUri + '/').startsWith(self.checkpointUri.endsWith('/') "
                "? self.checkpointUri : self.checkpointUri + '/'))"
            ),
            message=(
                "spec.output.checkpointUri must not lie inside spec.output.adapterUri or contain it "
                "(checkpoints would be published with the adapter); use a separate folder such as s3://ckpt/<job>/."
            ),
            check=lambda o: o.checkpoint_uri is None or not (
                o.checkpoint_uri.startswith(o.adapter_uri) or o.adapter_uri.startswith(o.checkpoint_uri)
            ),
        ),
    )

    adapter_uri: S3Uri
    """s3:// folder receiving the adapter: adapter_config.json, adapter_model.safetensors, the
    tokenizer files, loss.png and, written last, manifest.json (its presence means the upload
    is complete)."""
    checkpoint_uri: S3Uri | None = None
    """s3:// folder for checkpoints, one step-<N>/ folder each (every rank's DeepSpeed shards,
    the data position, the RNG states) with a COMPLETE marker once every rank's upload
    finished; a restarted job resumes from the newest complete one. Absent = no checkpoints.
    Must not overlap adapterUri."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Checkpoint every this many optimizer steps as well as at each epoch end; 0 = epoch ends
    only. Uploads run in the background; more frequent ones lose less work on a restart."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    @field_validator("adapter_uri", "checkpoint_uri")
    @classmethod
    def _folder(cls, uri: str | None) -> str | None:
        return None if uri is None else as_folder(uri)


class QualityGate(ApiModel):
    """What the adapter must achieve to be published."""

    max_eval_loss: float | None = Field(None, gt=0)
    """Highest accepted final evaluation loss (needs evaluation data): above it nothing is
    published and the job fails with the measured value."""


class Storage(ApiModel):
    """The S3-compatible store holding the model, the data and the adapter."""

    endpoint: str | None = Field(None, pattern=HTTP_URL_PATTERN)
    """http(s) URL of any S3-compatible endpoint (MinIO, Ceph, R2, ...); absent = the operator's
    default (AWS S3 unless configured)."""
    region: str = Field("us-east-1", min_length=1)
    """Region to sign requests for."""
    credentials_secret: str | None = Field(None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY;
    the values reach the workers as environment variables and never the operator."""


QUALITY_GATE_NEEDS_EVALUATION_DATA = Rule(
    cel=(
        "!has(self.qualityGate) || !has(self.qualityGate.maxEvalLoss) || "
        "double(self.dataset.validationSplit) > 0.0 || has(self.dataset.validationUri)"
    ),
    message=(
        "spec.qualityGate.maxEvalLoss needs evaluation data: set spec.dataset.validationSplit above 0 "
        "or spec.dataset.validationUri, or remove the gate."
    ),
    check=lambda s: s.quality_gate.max_eval_loss is None
    or s.dataset.validation_split > 0 or s.dataset.validation_uri is not None,
)
"""Holds for the spec and for the trainer config, which has the same two sections."""


SPEC_IS_IMMUTABLE = Rule(
    cel="self == oldSelf",
    message=(
        "spec is immutable once the job exists, so that what runs is what was asked for: delete the job "
        "and apply it again to change it (with the same spec.output.checkpointUri it resumes from its "
        "newest complete checkpoint)."
    ),
)


class FineTuneJobSpec(ApiModel):
    """What to train, with what, and where to put the result. Immutable once created."""

    rules = (
        SPEC_IS_IMMUTABLE,
        Rule(
            cel=(
                "self.training.globalBatchSize % (self.training.microBatchSize * self.workers.replicas * "
                "(self.workers.gpusPerWorker > 0 ? self.workers.gpusPerWorker : 1)) == 0"
            ),
            message=(
                "spec.training.globalBatchSize must be a multiple of spec.training.microBatchSize * "
                "spec.workers.replicas * max(spec.workers.gpusPerWorker, 1) (the number of training processes); "
                "change globalBatchSize, microBatchSize or the worker count."
            ),
            check=lambda s: s.training.global_batch_size % (s.training.micro_batch_size * s.workers.world_size) == 0,
        ),
        QUALITY_GATE_NEEDS_EVALUATION_DATA,
    )

    model: ModelSource
    """The base model to adapt."""
    dataset: Dataset
    """The training data."""
    lora: Lora = Lora()
    """The LoRA adapter."""
    training: Training = Training()
    """The optimisation loop."""
    deepspeed: DeepSpeed = DeepSpeed()
    """DeepSpeed ZeRO settings."""
    workers: Workers = Workers()
    """The worker pods."""
    output: Output
    """Where the adapter and the checkpoints go."""
    quality_gate: QualityGate = QualityGate()
    """What the adapter must achieve to be published."""
    storage: Storage = Storage()
    """The S3-compatible store."""


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """A FineTuneJob ``spec`` (as the API server stores it) as the typed model; raises
    InvalidObjectError naming every field that is wrong and the fix."""
    try:
        return FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as error:
        raise InvalidObjectError(describe(error, "spec")) from None

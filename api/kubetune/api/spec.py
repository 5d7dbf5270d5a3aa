"""``FineTuneJob.spec``: what to train, with what, and where to put the result.

The source of the CRD's spec schema (``make crds``), the operator's typed view of a job, and,
section by section, the trainer config (``trainer_config.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

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

S3_URI_MAX_LENGTH = len("s3://") + 63 + len("/") + 1024
"""A bucket name has at most 63 characters and an object key at most 1024 bytes: a longer URI
names nothing S3 can hold."""
S3Uri = Annotated[str, Field(pattern=S3_URI_PATTERN, max_length=S3_URI_MAX_LENGTH)]
NAME_MAX_LENGTH = 256
"""A dataset's field name or a module's name: longer than any real one, short enough that a
document pasted in the wrong place is refused."""


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
    text_field: str = Field("text", min_length=1, max_length=NAME_MAX_LENGTH)
    """Field holding the text when format is text."""
    messages_field: str = Field("messages", min_length=1, max_length=NAME_MAX_LENGTH)
    """Field holding the list of messages when format is chat."""
    prompt_field: str = Field("prompt", min_length=1, max_length=NAME_MAX_LENGTH)
    """Field holding the prompt when format is instruction."""
    response_field: str = Field("response", min_length=1, max_length=NAME_MAX_LENGTH)
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
    target_modules: tuple[Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH)], ...] = Field(
        ("q_proj", "v_proj"), min_length=1)
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
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""A non-negative Kubernetes quantity (1Gi, 512Mi, 2G, 0), as resource.Quantity parses it."""
QUANTITY_MAX_LENGTH = 64
_QUANTITY_SUFFIXES = {
    "": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    **{f"{prefix}i": 1024.0 ** power for power, prefix in enumerate("KMGTPE", start=1)},
}
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
EXTENDED_RESOURCE_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
"""A domain-prefixed resource (example.com/fpga), as a container may request beside the standard
ones and hugepages-<size>."""


def quantity_value(quantity: int | str) -> float:
    """The number a quantity that matches QUANTITY_PATTERN stands for (2Gi: 2147483648.0)."""
    text = str(quantity)
    number = re.match(r"^[0-9.]*", text).group(0)  # type: ignore[union-attr]
    suffix = text[len(number):]
    return float(number) * _QUANTITY_SUFFIXES[suffix] if suffix in _QUANTITY_SUFFIXES else float(text)
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
GPU_RESOURCE = "nvidia.com/gpu"
DnsName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]

POD_NAME_ENV = "POD_NAME"
ATTEMPT_ENV = "KUBETUNE_ATTEMPT"
WORKER_ENV_OWNED = {
    POD_NAME_ENV: "the pod's name, from the downward API; refer to it as $(POD_NAME) in a value instead",
    "POD_NAMESPACE": "the pod's namespace, from the downward API; refer to it as $(POD_NAMESPACE) in a value instead",
    "OMP_NUM_THREADS": "the pod's CPUs divided by its training processes; set the cpu of spec.workers.resources instead",
    ATTEMPT_ENV: "which start of the gang a worker belongs to (status.launched.attempt); it names the worker's log in S3",
}
"""Environment variables kubetune sets in the trainer containers (KUBETUNE_ATTEMPT in the workers
only), with what it sets and what to do instead. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are
kubetune's only while spec.storage.credentialsSecret is set (a rule on the whole spec)."""
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class Resources(ApiModel):
    """Compute resources of each worker pod, as in a container's resources."""

    rules = (
        Rule(
            cel=(
                f"(!has(self.limits) || !('{GPU_RESOURCE}' in self.limits)) && "
                f"(!has(self.requests) || !('{GPU_RESOURCE}' in self.requests))"
            ),
            message=(
                f"spec.workers.resources must not set {GPU_RESOURCE}: kubetune sets it from the GPUs of each "
                "worker (one training process per GPU); use spec.workers.gpusPerWorker instead."
            ),
            check=lambda r: GPU_RESOURCE not in (r.limits or {}) and GPU_RESOURCE not in (r.requests or {}),
        ),
    )

    limits: dict[str, Quantity] | None = None
    """Most of each resource a worker may use (cpu, memory, ...); nvidia.com/gpu comes from
    gpusPerWorker. The memory limit also bounds /dev/shm (shmSize), which is held in memory."""
    requests: dict[str, Quantity] | None = None
    """Resources the scheduler reserves for each worker. The cpu (limit, else request) divided by
    the training processes sets OMP_NUM_THREADS."""

    # Not in the schema (a map's keys, the text of an int-or-string, one map against the other):
    # checked here, so that the reconciler fails a job whose worker pods the API server would
    # refuse before its preflight pod runs (the preflight pod does not carry these resources).
    @field_validator("limits", "requests")
    @classmethod
    def _quantities(cls, given: dict[str, Quantity] | None, info: ValidationInfo) -> dict[str, Quantity] | None:
        where = f"spec.workers.resources.{info.field_name}"
        problems = []
        for name, value in (given or {}).items():
            if name not in STANDARD_RESOURCES and not name.startswith("hugepages-") \
                    and not re.match(EXTENDED_RESOURCE_PATTERN, name):
                problems.append(f"{where}.{name}: not a resource a container can have (cpu, memory, "
                                "ephemeral-storage, hugepages-<size> or a domain-prefixed one such as example.com/fpga)")
            elif isinstance(value, int) and value < 0 or isinstance(value, str) and (
                    len(value) > QUANTITY_MAX_LENGTH or not re.match(QUANTITY_PATTERN, value)):
                problems.append(f"{where}.{name}: {str(value)[:QUANTITY_MAX_LENGTH]!r} is not a quantity (such as 4, "
                                "500m or 16Gi)")
        if problems:
            raise ValueError("; ".join(problems))
        return given

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        limits, requests = self.limits or {}, self.requests or {}
        over = [name for name, request in requests.items()
                if name in limits and quantity_value(request) > quantity_value(limits[name])]
        if over:
            raise ValueError("; ".join(
                f"spec.workers.resources.requests.{name} ({requests[name]}) exceeds spec.workers.resources."
                f"limits.{name} ({limits[name]}): a container cannot request more than its limit"
                for name in over))
        return self


class KeySelector(ApiModel):
    """One key of a ConfigMap or Secret in the job's namespace."""

    name: DnsName
    """Name of the ConfigMap or Secret."""
    key: str = Field(min_length=1, max_length=253)
    """The key whose value is used."""
    optional: bool | None = None
    """true: a missing object or key leaves the variable unset instead of keeping the pod from
    starting."""


class FieldSelector(ApiModel):
    """A field of the pod, as in the downward API."""

    field_path: str = Field(min_length=1, max_length=256)
    """Path of the field, for example metadata.labels['kubetune.dev/replica-index'] or
    spec.nodeName."""
    api_version: str | None = Field(None, min_length=1, max_length=64)
    """Version of the schema fieldPath is written in; absent = v1."""


class ResourceFieldSelector(ApiModel):
    """A resource limit or request of the trainer container, as in the downward API."""

    resource: str = Field(min_length=1, max_length=253)
    """limits.cpu, limits.memory, requests.cpu, requests.memory, ..."""
    container_name: str | None = Field(None, max_length=63)
    """The container; absent = the trainer."""
    divisor: str | None = Field(None, pattern=QUANTITY_PATTERN, max_length=QUANTITY_MAX_LENGTH)
    """Unit of the value (for example 1Mi for memory in MiB, 1m for cpu in millicores); absent = 1."""


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from: exactly one of the four."""

    rules = (
        Rule(
            cel=(
                "(has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0) + "
                "(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) == 1"
            ),
            message=(
                "spec.workers.env[].valueFrom must name exactly one of fieldRef, resourceFieldRef, configMapKeyRef "
                "and secretKeyRef."
            ),
            check=lambda s: sum(ref is not None for ref in (
                s.field_ref, s.resource_field_ref, s.config_map_key_ref, s.secret_key_ref)) == 1,
        ),
    )

    field_ref: FieldSelector | None = None
    """A field of the pod (name, namespace, labels, annotations, node, IPs, ...)."""
    resource_field_ref: ResourceFieldSelector | None = None
    """A resource limit or request of the container."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap in the job's namespace."""
    secret_key_ref: KeySelector | None = None
    """A key of a Secret in the job's namespace."""


class EnvVar(ApiModel):
    """An environment variable of the trainer container, as in a container's env."""

    rules = (
        Rule(
            cel="!has(self.value) || !has(self.valueFrom)",
            message="spec.workers.env[]: value and valueFrom exclude each other; keep one.",
            check=lambda e: e.value is None or e.value_from is None,
        ),
    )

    name: str = Field(min_length=1, max_length=256)
    """Name of the variable."""
    value: str | None = None
    """Its value; $(NAME) refers to a variable defined earlier in the list (kubetune's own,
    POD_NAME, POD_NAMESPACE, OMP_NUM_THREADS and KUBETUNE_ATTEMPT, come first)."""
    value_from: EnvVarSource | None = None
    """Where its value comes from instead of value."""


class ConfigMapEnvSource(ApiModel):
    """Every key of a ConfigMap in the job's namespace, as an environment variable."""

    name: DnsName
    """Name of the ConfigMap."""
    optional: bool | None = None
    """true: a missing ConfigMap does not keep the pod from starting."""


class SecretEnvSource(ApiModel):
    """Every key of a Secret in the job's namespace, as an environment variable."""

    name: DnsName
    """Name of the Secret."""
    optional: bool | None = None
    """true: a missing Secret does not keep the pod from starting."""


class EnvFromSource(ApiModel):
    """All keys of one ConfigMap or Secret as environment variables, as in a container's envFrom."""

    rules = (
        Rule(
            cel="has(self.configMapRef) != has(self.secretRef)",
            message="spec.workers.envFrom[] must name exactly one of configMapRef and secretRef.",
            check=lambda e: (e.config_map_ref is None) != (e.secret_ref is None),
        ),
    )

    prefix: str | None = Field(None, max_length=253)
    """Prepended to every key to make the variable's name."""
    config_map_ref: ConfigMapEnvSource | None = None
    """The ConfigMap."""
    secret_ref: SecretEnvSource | None = None
    """The Secret."""


def _owned_env_rule(name: str, why: str) -> Rule:
    return Rule(
        cel=f"!has(self.env) || !self.env.exists(e, e.name == '{name}')",
        message=f"spec.workers.env must not set {name}: kubetune sets it to {why}.",
        check=lambda w: all(variable.name != name for variable in w.env or ()),
    )


class Workers(ApiModel):
    """The gang of worker pods, each running torchrun: their number, GPUs, image, resources,
    environment, identity and security context."""

    rules = tuple(_owned_env_rule(name, why) for name, why in WORKER_ENV_OWNED.items())

    replicas: int = Field(1, ge=1, le=64)
    """Number of worker pods (torchrun nodes)."""
    gpus_per_worker: int = Field(0, ge=0, le=16)
    """GPUs per pod, one training process each; 0 = one CPU process per pod. Sets the pod's
    nvidia.com/gpu limit."""
    # docker/distribution: a repository name has at most 255 characters, a tag 128, a digest 135.
    image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1, max_length=512)
    """Trainer image; kept at its default, the operator's configured trainer image is used."""
    resources: Resources | None = None
    """Compute resources of each worker pod."""
    env: tuple[EnvVar, ...] | None = Field(None, max_length=128)
    """Extra environment variables of the trainer (for example NCCL_DEBUG, HF_HUB_OFFLINE,
    KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS), after kubetune's own. The names kubetune sets are
    refused: POD_NAME, POD_NAMESPACE, OMP_NUM_THREADS, KUBETUNE_ATTEMPT, and AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY while storage.credentialsSecret is set. The preflight pod gets them too."""
    env_from: tuple[EnvFromSource, ...] | None = Field(None, max_length=32)
    """ConfigMaps and Secrets whose keys all become environment variables of the trainer (and of
    the preflight pod); a variable in env, kubetune's included, wins over one of the same name
    from here."""
    service_account_name: DnsName | None = None
    """ServiceAccount the worker and preflight pods run as; absent = the namespace's default.
    With an account bound to cloud credentials (EKS IAM roles for service accounts or Pod
    Identity, GKE or AKS workload identity) leave storage.credentialsSecret unset: the trainer then
    takes its S3 credentials from the standard AWS chain (web identity token, container
    credentials, instance metadata)."""
    image_pull_secrets: tuple[DnsName, ...] | None = Field(None, max_length=16)
    """Names of Secrets (type kubernetes.io/dockerconfigjson) in the job's namespace for pulling
    the trainer image from a private registry."""
    shm_size: str = Field("1Gi", pattern=QUANTITY_PATTERN, max_length=QUANTITY_MAX_LENGTH)
    """Size of /dev/shm, a memory-backed emptyDir: NCCL's shared-memory transport between the
    GPUs of one pod and DataLoader workers use it, and a container runtime's default (often 64Mi)
    is too small for either. It counts against the pod's memory limit. 0 = no such volume (the
    runtime's default /dev/shm)."""
    run_as_user: int = Field(1000, ge=1, le=2147483647)
    """User ID the trainer runs as (the pod's securityContext.runAsUser; never 0, as Pod Security
    "restricted" requires). The image's files must be readable by it; it writes only under /tmp."""
    run_as_group: int = Field(1000, ge=0, le=2147483647)
    """Primary group ID of the trainer's processes (securityContext.runAsGroup)."""

    @property
    def processes_per_worker(self) -> int:
        """torchrun --nproc-per-node: one per GPU, or one CPU process."""
        return max(self.gpus_per_worker, 1)

    @property
    def world_size(self) -> int:
        return self.replicas * self.processes_per_worker

    @property
    def shm_enabled(self) -> bool:
        """Whether the pods get a /dev/shm volume (shmSize is not zero)."""
        number = re.match(r"^[0-9.]*", self.shm_size).group(0)  # type: ignore[union-attr]
        return any(digit not in "0." for digit in number)


class Toleration(ApiModel):
    """A taint the worker pods tolerate, as in a pod's tolerations."""

    rules = (
        Rule(
            cel="has(self.key) || (has(self.operator) && self.operator == 'Exists')",
            message=(
                "spec.scheduling.tolerations[]: a toleration without a key must have operator Exists (it then "
                "tolerates every taint); set key, or operator: Exists."
            ),
            check=lambda t: t.key is not None or t.operator == "Exists",
        ),
        Rule(
            cel="!has(self.value) || self.value == '' || !has(self.operator) || self.operator != 'Exists'",
            message="spec.scheduling.tolerations[]: operator Exists matches any value; remove value or use Equal.",
            check=lambda t: not t.value or t.operator != "Exists",
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message=(
                "spec.scheduling.tolerations[]: tolerationSeconds applies only to effect NoExecute; set "
                "effect: NoExecute or remove tolerationSeconds."
            ),
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )

    key: str | None = Field(None, min_length=1, max_length=316)
    """Taint key to match; absent (with operator Exists) = every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Equal (the default) matches the taint's value; Exists matches any value."""
    value: str | None = Field(None, max_length=63)
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; absent = every effect."""
    toleration_seconds: int | None = None
    """With effect NoExecute: how long the pod stays bound after the taint appears; absent =
    for ever."""


class Affinity(ApiModel):
    """Node affinity and inter-pod (anti-)affinity of the worker pods, as in a pod's affinity;
    each part is passed to the pods as written (the API server checks it when the pods are
    created)."""

    node_affinity: dict[str, Any] | None = None
    """requiredDuringSchedulingIgnoredDuringExecution and preferredDuringSchedulingIgnoredDuringExecution
    node selector terms (for example a GPU product or an availability zone)."""
    pod_affinity: dict[str, Any] | None = None
    """Pods the workers must or should run near (by topologyKey)."""
    pod_anti_affinity: dict[str, Any] | None = None
    """Pods the workers must or should keep away from (for example one worker per node:
    topologyKey kubernetes.io/hostname on the label kubetune.dev/job-name)."""


class Scheduling(ApiModel):
    """Where and how the worker pods are placed and queued: node selection, taints, affinity,
    priority, a gang scheduler, a Kueue queue. The preflight pod gets the same node selection,
    tolerations, affinity and priority class, but the default scheduler and no queue."""

    node_selector: dict[str, str] | None = None
    """Node labels the worker pods require (for example nvidia.com/gpu.product:
    NVIDIA-H100-80GB-HBM3)."""
    tolerations: tuple[Toleration, ...] | None = Field(None, max_length=64)
    """Taints the worker pods tolerate (for example nvidia.com/gpu, effect NoSchedule, on GPU
    nodes)."""
    affinity: Affinity | None = None
    """Node affinity and pod (anti-)affinity of the worker pods."""
    priority_class_name: DnsName | None = None
    """PriorityClass of the worker (and preflight) pods: their priority for scheduling and
    preemption; Kueue also orders its queue by it."""
    scheduler_name: DnsName | None = None
    """Scheduler of the worker pods, for example volcano or scheduler-plugins' coscheduling
    profile; absent = the cluster's default scheduler. A gang scheduler's own pod-group labels
    or annotations are not set by kubetune."""
    queue_name: str | None = Field(None, pattern=LABEL_VALUE_PATTERN, max_length=63)
    """Kueue LocalQueue in the job's namespace: the worker pods of each attempt are queued as one
    Kueue pod group (labels kueue.x-k8s.io/queue-name and kueue.x-k8s.io/pod-group-name, annotation
    kueue.x-k8s.io/pod-group-total-count) and start only when Kueue admits the whole gang. Needs
    Kueue's pod integration enabled for the namespace. Kueue does not read labels on a
    FineTuneJob itself; the same label in its metadata.labels only helps to list jobs by queue."""


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
    overwrite: bool = False
    """Replace an adapter already published at adapterUri (its manifest.json). false: such a job
    fails while validating, before any worker starts, so no published adapter is lost by a
    copied manifest."""

    @field_validator("adapter_uri", "checkpoint_uri")
    @classmethod
    def _folder(cls, uri: str | None) -> str | None:
        return None if uri is None else as_folder(uri)


class Evaluation(ApiModel):
    """When the model is evaluated, and on what besides the validation data."""

    at_start: bool = False
    """Also evaluate the base model on the validation data before the first step: the
    manifest's initialEvalLoss and the step-0 point of `kubectl kubetune plot`. Off by default:
    it is one more pass over the validation data before training starts."""
    retention_uri: S3Uri | None = None
    """s3:// URI of a JSONL or Parquet file of general text the base model should keep knowing
    (one example per line or row, in retentionTextField), to catch catastrophic forgetting. Its
    loss is measured before and after training, reported in the manifest and the job's status
    (retentionLossBefore, retentionLossAfter), and checked by
    qualityGate.maxRetentionLossIncrease. Examples longer than training.sequenceLength are cut."""
    retention_text_field: str = Field("text", min_length=1, max_length=NAME_MAX_LENGTH)
    """Field holding each retention example's text."""


class QualityGate(ApiModel):
    """What the adapter must achieve to be published."""

    max_eval_loss: float | None = Field(None, gt=0)
    """Highest accepted final evaluation loss (needs evaluation data): above it nothing is
    published and the job fails with the measured value."""
    max_retention_loss_increase: float | None = Field(None, ge=0)
    """Highest accepted rise of the loss on evaluation.retentionUri (after training minus before,
    in nats per token; 0.05 is about 5% more perplexity): above it nothing is published and the
    job fails with both losses. Needs evaluation.retentionUri."""


class Storage(ApiModel):
    """The S3-compatible store holding the model, the data and the adapter."""

    endpoint: str | None = Field(None, pattern=HTTP_URL_PATTERN, max_length=2048)
    """http(s) URL of any S3-compatible endpoint (MinIO, Ceph, R2, ...); absent = the operator's
    default (AWS S3 unless configured)."""
    region: str = Field("us-east-1", min_length=1, max_length=63)  # a DNS label: s3.<region>.amazonaws.com
    """Region to sign requests for."""
    credentials_secret: str | None = Field(None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY;
    the values reach the workers as environment variables and never the operator."""
    checksums: Literal["when_required", "when_supported"] = "when_required"
    """Whether the trainer's S3 client adds CRC32 checksums to its uploads and checks the ones S3
    returns with downloads (boto's request_checksum_calculation and
    response_checksum_validation). when_required (the default): only on the few requests whose
    API demands one (such as DeleteObjects), the setting that works with the most
    S3-compatible stores. when_supported: on every upload and download that allows one (boto's own
    default since 1.36): an end-to-end integrity check on AWS S3, but stores that do not
    implement these headers (Backblaze B2, Google Cloud Storage and some versions of MinIO
    and Ceph, among others) refuse or misread such uploads. Either way a download that ends
    short of its Content-Length is an error, never a file."""


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

RETENTION_GATE_NEEDS_RETENTION_DATA = Rule(
    cel="!has(self.qualityGate) || !has(self.qualityGate.maxRetentionLossIncrease) || "
        "(has(self.evaluation) && has(self.evaluation.retentionUri))",
    message=(
        "spec.qualityGate.maxRetentionLossIncrease needs retention data: set spec.evaluation.retentionUri "
        "(general text the base model should keep knowing), or remove the gate."
    ),
    check=lambda s: s.quality_gate.max_retention_loss_increase is None or s.evaluation.retention_uri is not None,
)
"""Holds for the spec and for the trainer config, which has the same sections."""


def _unchanged(model: type[ApiModel], *mutable: str) -> dict[str, str]:
    """{field: CEL that it equals its old value} for every field of ``model`` but ``mutable``
    (Python names); an optional field counts as unchanged when it stays absent (the API server
    also checks the rule against the schema's default, ``{}``, before any default inside it is
    filled in)."""
    clauses = {}
    for name, field in model.model_fields.items():
        if name in mutable:
            continue
        key = field.alias or name
        if field.is_required():
            clauses[key] = f"self.{key} == oldSelf.{key}"
        else:
            clauses[key] = f"(has(self.{key}) ? has(oldSelf.{key}) && self.{key} == oldSelf.{key} : !has(oldSelf.{key}))"
    return clauses


def immutable_rule(model: type[ApiModel], path: str, *mutable: str) -> Rule:
    """The transition rule keeping every field of ``model`` (at ``path``) but ``mutable`` as
    created (no Python check: only the API server sees the old object). Its message names the
    fields that changed: the rule's own message can only say that something did."""
    unchanged = _unchanged(model, *mutable)
    # Concatenated literals, not a list joined: the API server refuses a CRD whose message
    # expressions it cannot bound the cost of, and a join's it cannot.
    changed = " + ".join(f"({clause} ? '' : '{path}.{key} changed; ')" for key, clause in unchanged.items())
    quoted = IMMUTABLE_MESSAGE.replace("\\", "\\\\").replace("'", "\\'")
    return Rule(cel=" && ".join(unchanged.values()), message=IMMUTABLE_MESSAGE,
                message_expression=f"{changed} + '{quoted}'")


IMMUTABLE_MESSAGE = (
    "spec is immutable once the job exists, so that what runs is what was asked for; only "
    "spec.runPolicy.suspend may change. Delete the job and apply it again to change anything else "
    "(with the same spec.output.checkpointUri it resumes from its newest complete checkpoint)."
)


class RunPolicy(ApiModel):
    """How the job runs, restarts and ends (as a Kubernetes Job's and Kubeflow's run policy)."""

    suspend: bool = False
    """true stops the workers and keeps the progress (a checkpoint is written on the way out when
    output.checkpointUri is set and the trainer has time); false starts them again, resuming from
    the newest complete checkpoint. The only field that may change after creation: a job created
    suspended waits until something (a person, a queue controller) sets it false. Kueue queues
    the worker pods instead: see spec.scheduling.queueName."""
    backoff_limit: int = Field(3, ge=0, le=100)
    """Gang restarts allowed after a worker fails, disappears or stalls; each restart recreates
    every worker, which resumes from the newest complete checkpoint. Bad input (config, data,
    credentials, the quality gate) fails the job at once, without a restart."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Longest the job may run, counted from when its workers first ran (again, after a
    suspend); then it fails with reason DeadlineExceeded, whatever restarts are left."""
    stall_timeout_seconds: int | None = Field(None, ge=1)
    """A running job that shows no new optimizer step for this long is restarted (reason
    Stalled, counting against backoffLimit): a hung rank holds its GPUs otherwise. Counted from
    each attempt's first new step, so the model download and start-up are not a stall; allow
    for evaluation and checkpoint uploads. The failure names the worker that holds the gang up
    (one that does not answer on its metrics port, or has begun fewer steps than the others).
    Absent = no stall detection."""
    startup_timeout_seconds: int = Field(600, ge=1)
    """Longest a worker may stay unable to start (unschedulable, image pull failure, a missing
    Secret or key) before the job fails with the pod's own reason; until then the reason is in
    status.message."""
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    """Delete the FineTuneJob (and with it its pods) this long after it Succeeded or Failed;
    absent = keep it."""
    clean_pod_policy: Literal["Running", "All", "None"] = "Running"
    """What happens to the pods when the job finishes: Running deletes those still running
    (a failed gang's surviving ranks), All deletes every pod, None keeps them all for debugging."""
    skip_preflight: bool = False
    """Start the workers without the preflight pod (which checks credentials, model, dataset and
    output prefixes on a CPU first). A bad input then fails only once the workers run."""


# A transition rule (no Python check): only the API server sees the old object.
RunPolicy.rules = (immutable_rule(RunPolicy, "spec.runPolicy", "suspend"),)


class FineTuneJobSpec(ApiModel):
    """What to train, with what, and where to put the result. Immutable once created."""

    rules = (
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
        RETENTION_GATE_NEEDS_RETENTION_DATA,
        Rule(
            cel=(
                "!has(self.storage.credentialsSecret) || !has(self.workers.env) || "
                "!self.workers.env.exists(e, e.name == 'AWS_ACCESS_KEY_ID' || e.name == 'AWS_SECRET_ACCESS_KEY')"
            ),
            message=(
                "spec.workers.env must not set AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY while "
                "spec.storage.credentialsSecret is set: kubetune sets them from that Secret. Use "
                "spec.storage.credentialsSecret alone, or remove it and set both in spec.workers.env (for example "
                "from a Secret with other key names)."
            ),
            check=lambda s: s.storage.credentials_secret is None
            or all(variable.name not in CREDENTIAL_ENV for variable in s.workers.env or ()),
        ),
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
    scheduling: Scheduling = Scheduling()
    """Where and how the worker pods are placed and queued."""
    output: Output
    """Where the adapter and the checkpoints go."""
    evaluation: Evaluation = Evaluation()
    """When the model is evaluated, and on what besides the validation data."""
    quality_gate: QualityGate = QualityGate()
    """What the adapter must achieve to be published."""
    storage: Storage = Storage()
    """The S3-compatible store."""
    run_policy: RunPolicy = RunPolicy()
    """How the job runs, restarts and ends."""


# runPolicy checks its own fields (all but suspend); every other section must stay as created.
FineTuneJobSpec.rules = (
    immutable_rule(FineTuneJobSpec, "spec", "run_policy"),
    *FineTuneJobSpec.rules,
)


def parse_spec(spec: Mapping[str, Any]) -> FineTuneJobSpec:
    """A FineTuneJob ``spec`` (as the API server stores it) as the typed model; raises
    InvalidObjectError naming every field that is wrong and the fix."""
    if not isinstance(spec, Mapping):  # what a server without the CRD's schema would store
        raise InvalidObjectError(f"spec: must be an object, not {type(spec).__name__}")
    try:
        return FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as error:
        raise InvalidObjectError(describe(error, "spec")) from None

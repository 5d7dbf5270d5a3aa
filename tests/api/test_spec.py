"""FineTuneJob.spec: the documented defaults, errors that name the field and the fix, and each
cross-field rule refusing the same objects as CEL (API server) and in Python (no server)."""

from __future__ import annotations

import re

import pytest
from crd_tools import assert_cel_and_spec_agree, minimal_spec, schema_error_fields

from kubetune.api import InvalidObjectError, check_job_name, parse_spec


def _manifest(name: str = "j", **spec: dict) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": minimal_spec(**spec)}


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = parse_spec(minimal_spec())
    assert spec.dataset.format == "text"
    assert spec.lora.target_modules == ("q_proj", "v_proj")
    assert spec.training.learning_rate == 2e-4
    assert spec.deepspeed.zero_stage == 2
    assert spec.workers.replicas == 1 and spec.workers.world_size == 1
    assert spec.storage.endpoint is None
    output = spec.output
    assert (output.checkpoint_uri, output.checkpoint_every_steps, output.keep_checkpoints) == (None, 0, 2)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"training": {"sequenceLength": 8}}, "spec.training.sequenceLength"),
        ({"lora": {"dropout": 1.5}}, "spec.lora.dropout"),
        ({"dataset": {"uri": "s3://datasets/a.jsonl", "validationSplit": 0.9}}, "spec.dataset.validationSplit"),
        ({"storage": {"endpoint": "ftp://s3"}}, "spec.storage.endpoint"),
        ({"workers": {"replicas": 65}}, "spec.workers.replicas"),
        ({"training": {"precision": "int8"}}, "spec.training.precision"),
        ({"lora": {"rank": 8}}, "spec.lora.rank"),  # a typo is an error, not silently ignored
        ({"qualityGate": {"maxEvalLoss": 0}}, "spec.qualityGate.maxEvalLoss"),
        ({"qualityGate": {"maxRetentionLossIncrease": -0.1}}, "spec.qualityGate.maxRetentionLossIncrease"),
        ({"evaluation": {"retentionUri": "https://x/general.jsonl"}}, "spec.evaluation.retentionUri"),
    ],
)
def test_invalid_field_is_named_by_the_schema_and_the_typed_spec(overrides: dict, field: str) -> None:
    assert field in schema_error_fields(_manifest(**overrides)) or field == "spec.lora.rank"
    with pytest.raises(InvalidObjectError) as raised:
        parse_spec(minimal_spec(**overrides))
    assert str(raised.value).startswith(field + ":")


def test_world_size_counts_gpu_processes() -> None:
    spec = parse_spec(
        minimal_spec(workers={"replicas": 3, "gpusPerWorker": 4}, training={"microBatchSize": 1, "globalBatchSize": 12})
    )
    assert spec.workers.processes_per_worker == 4
    assert spec.workers.world_size == 12


def test_folder_uris_are_read_as_folders() -> None:
    spec = parse_spec(minimal_spec(model={"uri": "s3://models/m"}, output={"adapterUri": "s3://adapters/a"}))
    assert (spec.model.uri, spec.output.adapter_uri) == ("s3://models/m/", "s3://adapters/a/")


@pytest.mark.parametrize("name, ok", [
    ("support-bot", True), ("x" * 52, True),
    ("1job", False),  # a Service name must start with a letter
    ("my.job", False), ("Job", False), ("job-", False),
])
def test_job_names_are_dns_1035_labels(name: str, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(name), ok, "metadata.name must be a DNS-1035 label", whole=False)


def test_a_job_name_too_long_for_its_pod_names_is_refused() -> None:
    assert_cel_and_spec_agree(_manifest("x" * 53), False, "metadata.name must be at most 52 characters", whole=False)
    with pytest.raises(InvalidObjectError, match="at most 52 characters"):
        check_job_name("x" * 53)


@pytest.mark.parametrize(
    "dataset, ok, message",
    [
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.parquet"}, True, ""),
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.jsonl", "validationSplit": 0}, True, ""),
        ({"uri": "s3://data/train.jsonl", "validationSplit": 0.1}, True, ""),
        ({"uri": "s3://data/train.jsonl", "validationUri": "s3://data/val.jsonl", "validationSplit": 0.1}, False,
         "spec.dataset.validationUri and spec.dataset.validationSplit exclude each other"),
        ({"uri": "s3://data/folder/"}, False, "spec.dataset.uri must name a JSONL or Parquet file, not a folder"),
    ],
)
def test_dataset_rules(dataset: dict, ok: bool, message: str) -> None:
    assert_cel_and_spec_agree(_manifest(dataset=dataset), ok, message, whole=False)


@pytest.mark.parametrize("training, ok", [
    ({"learningRate": 0.001, "minLearningRate": 0.0001}, True),
    ({"learningRate": 0.001, "minLearningRate": 0.001}, True),
    ({"learningRate": 0.001, "minLearningRate": 0.01}, False),
])
def test_min_learning_rate_stays_below_the_peak(training: dict, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(training=training), ok,
                              "spec.training.minLearningRate must not exceed spec.training.learningRate", whole=False)


@pytest.mark.parametrize(
    "adapter, checkpoints, ok",
    [
        ("s3://adapters/bot/", "s3://ckpt/bot/", True),
        ("s3://adapters/bot", "s3://adapters/bot-checkpoints/", True),  # a sibling, not inside
        ("s3://adapters/bot/", "s3://adapters/bot/checkpoints/", False),
        ("s3://adapters/bot/", "s3://adapters/bot", False),
        ("s3://adapters/bot/", "s3://adapters/", False),  # would hold the adapter
    ],
)
def test_checkpoints_must_not_overlap_the_adapter(adapter: str, checkpoints: str, ok: bool) -> None:
    manifest = _manifest(output={"adapterUri": adapter, "checkpointUri": checkpoints})
    assert_cel_and_spec_agree(manifest, ok, "spec.output.checkpointUri must not lie inside spec.output.adapterUri",
                              whole=False)


@pytest.mark.parametrize(
    "dataset, ok",
    [
        ({"uri": "s3://datasets/t.jsonl", "validationSplit": 0.1}, True),
        ({"uri": "s3://datasets/t.jsonl", "validationUri": "s3://datasets/v.jsonl"}, True),
        ({"uri": "s3://datasets/t.jsonl"}, False),
    ],
)
def test_quality_gate_needs_evaluation_data(dataset: dict, ok: bool) -> None:
    manifest = _manifest(dataset=dataset, qualityGate={"maxEvalLoss": 2.5})
    assert_cel_and_spec_agree(manifest, ok, (
        "spec.qualityGate.maxEvalLoss needs evaluation data: set spec.dataset.validationSplit above 0 "
        "or spec.dataset.validationUri, or remove the gate."
    ))


@pytest.mark.parametrize(
    "training, workers, ok",
    [
        ({"microBatchSize": 4, "globalBatchSize": 8}, {"replicas": 2}, True),
        ({"microBatchSize": 4, "globalBatchSize": 12}, {"replicas": 2}, False),
        ({"microBatchSize": 2, "globalBatchSize": 32}, {"replicas": 2, "gpusPerWorker": 8}, True),
        ({"microBatchSize": 2, "globalBatchSize": 16}, {"replicas": 2, "gpusPerWorker": 8}, False),
        ({}, {}, True),  # defaults: 8 % (4 * 1 * 1)
    ],
)
def test_global_batch_is_a_multiple_of_micro_batch_times_processes(training: dict, workers: dict, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(training=training, workers=workers), ok,
                              "spec.training.globalBatchSize must be a multiple of spec.training.microBatchSize",
                              whole=False)


@pytest.mark.parametrize("key, field", [
    ("train_batch_size", "spec.training.globalBatchSize"),
    ("train_micro_batch_size_per_gpu", "spec.training.microBatchSize"),
    ("gradient_accumulation_steps", "spec.training.globalBatchSize"),
    ("optimizer", "spec.training.learningRate"),
    ("scheduler", "spec.training.warmupSteps"),
])
def test_deepspeed_override_of_a_key_kubetune_owns_names_the_field_to_use(key: str, field: str) -> None:
    with pytest.raises(InvalidObjectError) as error:
        parse_spec(minimal_spec(deepspeed={"config": {key: 4, "zero_optimization": {"overlap_comm": True}}}))
    assert f"spec.deepspeed.config.{key} is set by kubetune: use {field}" in str(error.value)


def test_deepspeed_override_of_other_keys_is_kept_as_written() -> None:
    override = {"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": True}, "comms_logger": {}}
    assert parse_spec(minimal_spec(deepspeed={"config": override})).deepspeed.config == override


# -- spec.workers: pod shape -------------------------------------------------------------------


def test_pod_shape_defaults() -> None:
    workers = parse_spec(minimal_spec()).workers
    assert (workers.env, workers.env_from, workers.service_account_name, workers.image_pull_secrets) == (
        None, None, None, None)
    assert (workers.shm_size, workers.run_as_user, workers.run_as_group) == ("1Gi", 1000, 1000)
    scheduling = parse_spec(minimal_spec()).scheduling
    assert scheduling.model_dump(exclude_none=True) == {}


@pytest.mark.parametrize("where, ok", [
    ({"limits": {"cpu": "8", "memory": "32Gi"}, "requests": {"cpu": 4}}, True),
    ({"limits": {"nvidia.com/gpu": 1}}, False),
    ({"requests": {"nvidia.com/gpu": "2"}}, False),
])
def test_gpus_come_from_gpus_per_worker_not_resources(where: dict, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(workers={"resources": where}), ok, (
        "spec.workers.resources must not set nvidia.com/gpu: kubetune sets it from the GPUs of each worker "
        "(one training process per GPU); use spec.workers.gpusPerWorker instead."
    ))


@pytest.mark.parametrize("name, instead", [
    ("POD_NAME", "refer to it as $(POD_NAME) in a value instead"),
    ("POD_NAMESPACE", "refer to it as $(POD_NAMESPACE) in a value instead"),
    ("OMP_NUM_THREADS", "set the cpu of spec.workers.resources instead"),
])
def test_env_kubetune_sets_is_refused_naming_what_to_do_instead(name: str, instead: str) -> None:
    env = [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": name, "value": "x"}]
    assert_cel_and_spec_agree(_manifest(workers={"env": env}), False, f"spec.workers.env must not set {name}: kubetune",
                              whole=False)
    with pytest.raises(InvalidObjectError, match=re.escape(instead)):
        parse_spec(minimal_spec(workers={"env": env}))


CREDENTIALS_IN_ENV = (
    "spec.workers.env must not set AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY while spec.storage.credentialsSecret "
    "is set: kubetune sets them from that Secret. Use spec.storage.credentialsSecret alone, or remove it and set both "
    "in spec.workers.env (for example from a Secret with other key names)."
)


@pytest.mark.parametrize("secret, name, ok", [
    ("s3-credentials", "AWS_ACCESS_KEY_ID", False),
    ("s3-credentials", "AWS_SECRET_ACCESS_KEY", False),
    ("s3-credentials", "AWS_ROLE_ARN", True),
    (None, "AWS_ACCESS_KEY_ID", True),  # no Secret: the job's own variables are the credentials
])
def test_credentials_in_env_only_without_a_credentials_secret(secret: str | None, name: str, ok: bool) -> None:
    env = [{"name": name, "valueFrom": {"secretKeyRef": {"name": "minio", "key": "accesskey"}}}]
    storage = {"credentialsSecret": secret} if secret else {}
    assert_cel_and_spec_agree(_manifest(workers={"env": env}, storage=storage), ok, CREDENTIALS_IN_ENV)


@pytest.mark.parametrize("variable, ok, message", [
    ({"name": "A", "value": "1"}, True, ""),
    ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}, True, ""),
    ({"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}, True, ""),
    ({"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k", "optional": True}}}, True, ""),
    ({"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}, False,
     "spec.workers.env[]: value and valueFrom exclude each other; keep one."),
    ({"name": "A", "valueFrom": {}}, False,
     "spec.workers.env[].valueFrom must name exactly one of fieldRef, resourceFieldRef, configMapKeyRef and secretKeyRef."),
    ({"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}, "fieldRef": {"fieldPath": "x"}}}, False,
     "spec.workers.env[].valueFrom must name exactly one of fieldRef, resourceFieldRef, configMapKeyRef and secretKeyRef."),
])
def test_env_entries_are_kubernetes_env_vars(variable: dict, ok: bool, message: str) -> None:
    assert_cel_and_spec_agree(_manifest(workers={"env": [variable]}), ok, message)


@pytest.mark.parametrize("source, ok", [
    ({"configMapRef": {"name": "nccl"}}, True),
    ({"secretRef": {"name": "hf", "optional": True}, "prefix": "HF_"}, True),
    ({"prefix": "X_"}, False),
    ({"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}, False),
])
def test_env_from_names_one_config_map_or_secret(source: dict, ok: bool) -> None:
    assert_cel_and_spec_agree(_manifest(workers={"envFrom": [source]}), ok,
                              "spec.workers.envFrom[] must name exactly one of configMapRef and secretRef.")


@pytest.mark.parametrize("workers, field", [
    ({"serviceAccountName": "Trainer_SA"}, "spec.workers.serviceAccountName"),
    ({"imagePullSecrets": ["ok", "Not OK"]}, "spec.workers.imagePullSecrets.1"),
    ({"imagePullSecrets": [{"name": "regcred"}]}, "spec.workers.imagePullSecrets.0"),  # names, not objects
    ({"shmSize": "lots"}, "spec.workers.shmSize"),
    ({"shmSize": "-1Gi"}, "spec.workers.shmSize"),
    ({"runAsUser": 0}, "spec.workers.runAsUser"),  # Pod Security "restricted": never root
    ({"runAsGroup": -1}, "spec.workers.runAsGroup"),
    ({"env": [{"value": "x"}]}, "spec.workers.env.0.name"),
    ({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]},
     "spec.workers.env.0.valueFrom.secretKeyRef.key"),
])
def test_invalid_pod_shape_field_is_named_by_the_schema_and_the_typed_spec(workers: dict, field: str) -> None:
    schema_field = field.replace(".0", "").replace(".1", "")  # the schema names list items without an index
    assert any(path.replace(".0", "").replace(".1", "") == schema_field
               for path in schema_error_fields(_manifest(workers=workers))), schema_error_fields(_manifest(workers=workers))
    with pytest.raises(InvalidObjectError) as raised:
        parse_spec(minimal_spec(workers=workers))
    assert str(raised.value).startswith(field + ":"), raised.value


def test_pod_shape_fields_are_kept_as_written() -> None:
    workers = {"serviceAccountName": "kubetune-trainer", "imagePullSecrets": ["regcred"], "shmSize": "16Gi",
               "runAsUser": 65532, "runAsGroup": 0,
               "env": [{"name": "NCCL_DEBUG", "value": "INFO"}], "envFrom": [{"configMapRef": {"name": "nccl"}}]}
    spec = parse_spec(minimal_spec(workers=workers))
    assert spec.workers.model_dump(mode="json", by_alias=True, exclude_none=True, include=set(
        type(spec.workers).model_fields) - {"replicas", "gpus_per_worker", "image"}) == workers


# -- spec.scheduling ---------------------------------------------------------------------------


@pytest.mark.parametrize("toleration, ok, message", [
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True, ""),
    ({"key": "dedicated", "value": "ml", "effect": "NoSchedule"}, True, ""),
    ({"operator": "Exists"}, True, ""),  # tolerates every taint
    ({"value": "ml"}, False, "spec.scheduling.tolerations[]: a toleration without a key must have operator Exists"),
    ({"key": "dedicated", "operator": "Exists", "value": "ml"}, False,
     "spec.scheduling.tolerations[]: operator Exists matches any value"),
    ({"key": "spot", "effect": "NoExecute", "tolerationSeconds": 60}, True, ""),
    ({"key": "spot", "effect": "NoSchedule", "tolerationSeconds": 60}, False,
     "spec.scheduling.tolerations[]: tolerationSeconds applies only to effect NoExecute"),
])
def test_tolerations(toleration: dict, ok: bool, message: str) -> None:
    assert_cel_and_spec_agree(_manifest(scheduling={"tolerations": [toleration]}), ok, message, whole=False)


@pytest.mark.parametrize("scheduling, field", [
    ({"tolerations": [{"key": "a", "operator": "Lt"}]}, "spec.scheduling.tolerations.0.operator"),
    ({"tolerations": [{"key": "a", "effect": "NoRun"}]}, "spec.scheduling.tolerations.0.effect"),
    ({"affinity": {"nodeAfinity": {}}}, "spec.scheduling.affinity.nodeAfinity"),  # a typo is an error
    ({"queueName": "team a"}, "spec.scheduling.queueName"),
    ({"queueName": "q" * 64}, "spec.scheduling.queueName"),
    ({"priorityClassName": "High"}, "spec.scheduling.priorityClassName"),
    ({"schedulerName": "my_scheduler"}, "spec.scheduling.schedulerName"),
    ({"nodeSelector": {"zone": 1}}, "spec.scheduling.nodeSelector.zone"),
])
def test_invalid_scheduling_field_is_named_by_the_schema_and_the_typed_spec(scheduling: dict, field: str) -> None:
    problems = schema_error_fields(_manifest(scheduling=scheduling))
    assert field.replace(".0", "") in {path.replace(".0", "") for path in problems} \
        or field.endswith("nodeAfinity"), problems  # unknown fields: pruned by the server, refused by the typed spec
    with pytest.raises(InvalidObjectError) as raised:
        parse_spec(minimal_spec(scheduling=scheduling))
    assert str(raised.value).startswith(field + ":"), raised.value


def test_scheduling_is_kept_as_written() -> None:
    scheduling = {
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"kubetune.dev/job-name": "j"}}}]}},
        "priorityClassName": "training-high", "schedulerName": "volcano", "queueName": "team-a",
    }
    spec = parse_spec(minimal_spec(scheduling=scheduling))
    assert spec.scheduling.model_dump(mode="json", by_alias=True, exclude_none=True) == scheduling

from __future__ import annotations

import json
from typing import Any

import pytest
from crd_tools import EXAMPLES, load_manifest, minimal_spec
from kubetune.operator.manifests import (
    build_preflight_pod, build_service, build_worker_pod, build_workers, pod_group_name,
    trainer_command,
)
from kubetune.operator.settings import OperatorSettings
from kubetune.api import JobRef, parse_spec

JOB = JobRef(name="quickstart", namespace="default", uid="u-1")
QUICKSTART = parse_spec(load_manifest(EXAMPLES / "quickstart.yaml")["spec"])
GPU_EXAMPLE = load_manifest(EXAMPLES / "gpu-scheduling.yaml")
OWNER = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "name": "quickstart",
    "uid": "u-1",
    "controller": True,
    "blockOwnerDeletion": True,
}
KUEUE_KEYS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/pod-group-name", "kueue.x-k8s.io/pod-group-total-count",
              "kueue.x-k8s.io/retriable-in-group")
# Every knob of spec.workers and spec.scheduling set, on a GPU gang.
EVERYTHING = parse_spec(minimal_spec(
    training={"microBatchSize": 1, "globalBatchSize": 16},
    workers={
        "replicas": 2, "gpusPerWorker": 8, "image": "registry.example/trainer:1",
        "resources": {"limits": {"cpu": "32", "memory": "400Gi"}, "requests": {"cpu": "32", "memory": "400Gi"}},
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                {"name": "WHERE", "value": "$(POD_NAMESPACE)/$(POD_NAME)"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "envFrom": [{"configMapRef": {"name": "nccl-tuning"}}, {"secretRef": {"name": "extra"}, "prefix": "X_"}],
        "serviceAccountName": "trainer", "imagePullSecrets": ["regcred", "mirror"],
        "shmSize": "16Gi", "runAsUser": 2000, "runAsGroup": 3000,
    },
    scheduling={
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
        "priorityClassName": "training-high", "schedulerName": "volcano", "queueName": "team-a",
    },
))


def _container(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def _env(pod: dict) -> dict[str, dict]:
    return {item["name"]: item for item in _container(pod)["env"]}


def _every_pod(spec: Any) -> list[dict]:
    return [*(build_worker_pod(JOB, spec, index, OperatorSettings()) for index in range(spec.workers.replicas)),
            build_preflight_pod(JOB, spec, OperatorSettings())]


def test_children_are_the_service_and_one_pod_per_replica() -> None:
    children = [*build_workers(JOB, QUICKSTART, OperatorSettings(), 1), build_preflight_pod(JOB, QUICKSTART, OperatorSettings())]
    assert [(child["kind"], child["metadata"]["name"]) for child in children] == [
        ("Service", "quickstart-workers"),
        ("Pod", "quickstart-worker-0"),
        ("Pod", "quickstart-worker-1"),
        ("Pod", "quickstart-preflight"),
    ]
    for child in children:
        assert child["metadata"]["namespace"] == "default"
        assert child["metadata"]["ownerReferences"] == [OWNER]
        assert child["metadata"]["labels"]["kubetune.dev/job-name"] == "quickstart"
        assert child["metadata"]["labels"]["kubetune.dev/job-uid"] == "u-1"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"


@pytest.mark.parametrize("build", [lambda settings: build_worker_pod(JOB, QUICKSTART, 1, settings),
                                   lambda settings: build_preflight_pod(JOB, QUICKSTART, settings)])
def test_every_pod_carries_the_rendered_trainer_config_mounted_from_its_annotation(build: Any) -> None:
    pod = build(OperatorSettings(s3_endpoint="http://s3:9000"))
    config = json.loads(pod["metadata"]["annotations"]["kubetune.dev/trainer-config"])
    assert config["job"] == {"namespace": "default", "name": "quickstart", "uid": "u-1"}
    assert config["storage"]["endpoint"] == "http://s3:9000"
    volume = next(volume for volume in pod["spec"]["volumes"] if volume["name"] == "trainer-config")
    assert volume["downwardAPI"]["items"] == [
        {"path": "config.json", "fieldRef": {"fieldPath": "metadata.annotations['kubetune.dev/trainer-config']"}}]
    assert "/etc/kubetune/config.json" in _container(pod)["command"]


def test_headless_service_selects_the_jobs_worker_0_the_master_address() -> None:
    service = build_service(JOB)
    assert service["spec"]["clusterIP"] == "None"
    # The job's UID, not its name: a re-created job of the same name has other pods; and only
    # worker 0, whose name is torchrun's master address (every rank's command says so).
    assert service["spec"]["selector"] == {"kubetune.dev/job-uid": "u-1", "app.kubernetes.io/component": "worker",
                                           "kubetune.dev/replica-index": "0"}
    spec = parse_spec(minimal_spec(workers={"replicas": 2}))
    assert {f"--master-addr=quickstart-worker-0.{service['metadata']['name']}"} == {
        argument for index in range(2) for argument in trainer_command("quickstart", spec, index)
        if argument.startswith("--master-addr")}
    assert service["spec"]["ports"][0]["port"] == 29500
    assert service["spec"]["ports"][0]["name"] == "rdzv"


@pytest.mark.parametrize(
    "workers, index, nnodes, nproc",
    [({"replicas": 2}, 1, 2, 1), ({"replicas": 4, "gpusPerWorker": 8}, 3, 4, 8), ({}, 0, 1, 1)],
)
def test_worker_command_is_torchrun_with_node_rank_under_the_log_keeper(
    workers: dict, index: int, nnodes: int, nproc: int,
) -> None:
    spec = parse_spec(minimal_spec(workers=workers, training={"microBatchSize": 1, "globalBatchSize": 64}))
    pod = build_worker_pod(JOB, spec, index, OperatorSettings(), attempt=3)
    container = _container(pod)
    assert container["command"] == [
        "python", "-m", "kubetune.trainer.logkeeper", "--config", "/etc/kubetune/config.json", "--",
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={index}",
        "--master-addr=quickstart-worker-0.quickstart-workers",
        "--master-port=29500",
        "-m",
        "kubetune.trainer",
        "--config",
        "/etc/kubetune/config.json",
    ]
    # The log keeper names the pod's log object by these two.
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["KUBETUNE_ATTEMPT"] == {"name": "KUBETUNE_ATTEMPT", "value": "3"}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_worker_pod_identity_dns_and_restart_policy() -> None:
    pod = build_worker_pod(JOB, QUICKSTART, 1, OperatorSettings(), attempt=2)
    assert pod["metadata"]["name"] == "quickstart-worker-1"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": "quickstart",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.dev/job-name": "quickstart",
        "kubetune.dev/job-uid": "u-1",
        "kubetune.dev/replica-index": "1",
        "kubetune.dev/attempt": "2",
    }
    assert list(pod["metadata"]["annotations"]) == ["kubetune.dev/trainer-config"]
    assert pod["spec"]["hostname"] == "quickstart-worker-1"
    assert pod["spec"]["subdomain"] == "quickstart-workers"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_worker_pod_mounts_config_workdir_and_shared_memory() -> None:
    pod = build_worker_pod(JOB, QUICKSTART, 0, OperatorSettings())
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes["workdir"] == {"name": "workdir", "emptyDir": {}}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
    mounts = {mount["mountPath"]: mount for mount in _container(pod)["volumeMounts"]}
    assert mounts["/etc/kubetune"] == {"name": "trainer-config", "mountPath": "/etc/kubetune", "readOnly": True}
    assert mounts["/tmp"]["name"] == "workdir"
    assert mounts["/dev/shm"] == {"name": "dshm", "mountPath": "/dev/shm"}


@pytest.mark.parametrize("size, expected", [("16Gi", "16Gi"), ("512Mi", "512Mi"), ("0", None), ("0Gi", None),
                                            ("0.0", None), ("0.5Gi", "0.5Gi")])
def test_shm_size_sets_the_memory_volume_and_zero_leaves_it_out(size: str, expected: str | None) -> None:
    pod = build_worker_pod(JOB, parse_spec(minimal_spec(workers={"shmSize": size})), 0, OperatorSettings())
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"] for mount in _container(pod)["volumeMounts"]}
    if expected is None:
        assert "dshm" not in volumes and "/dev/shm" not in mounts
    else:
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": expected}
        assert "/dev/shm" in mounts


def test_credentials_come_from_the_secret_by_reference_only() -> None:
    env = _env(build_worker_pod(JOB, QUICKSTART, 0, OperatorSettings()))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_no_credentials_env_without_a_secret() -> None:
    # Nothing AWS_* at all: the trainer's boto3 then takes its standard chain (IRSA's web identity
    # token, Pod Identity, instance metadata) under spec.workers.serviceAccountName.
    spec = parse_spec(minimal_spec(workers={"serviceAccountName": "trainer"}))
    for pod in _every_pod(spec):
        attempt = ["KUBETUNE_ATTEMPT"] * (pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
        assert [item["name"] for item in _container(pod)["env"]] == ["POD_NAME", "POD_NAMESPACE", "OMP_NUM_THREADS",
                                                                     *attempt]
        assert pod["spec"]["serviceAccountName"] == "trainer"


def test_the_jobs_env_comes_after_kubetunes_so_it_can_refer_to_them() -> None:
    for pod in _every_pod(EVERYTHING):
        env = _container(pod)["env"]
        own = ["POD_NAME", "POD_NAMESPACE", "OMP_NUM_THREADS"]
        if pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
            own.append("KUBETUNE_ATTEMPT")
        assert [item["name"] for item in env] == [*own, "NCCL_DEBUG", "WHERE", "HF_TOKEN"]
        assert env[len(own):] == [
            {"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "WHERE", "value": "$(POD_NAMESPACE)/$(POD_NAME)"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ]
        assert _container(pod)["envFrom"] == [{"configMapRef": {"name": "nccl-tuning"}},
                                              {"prefix": "X_", "secretRef": {"name": "extra"}}]


def test_identity_and_placement_reach_the_workers_and_the_preflight() -> None:
    for pod in _every_pod(EVERYTHING):
        spec = pod["spec"]
        assert _container(pod)["image"] == "registry.example/trainer:1"
        assert spec["serviceAccountName"] == "trainer"
        assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
        ]
        assert spec["affinity"] == {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}}
        assert spec["priorityClassName"] == "training-high"
        assert spec["securityContext"]["runAsUser"] == 2000
        assert spec["securityContext"]["runAsGroup"] == 3000


def test_worker_pods_get_the_gpus_scheduler_and_shared_memory() -> None:
    pod = build_worker_pod(JOB, EVERYTHING, 1, OperatorSettings())
    assert pod["spec"]["schedulerName"] == "volcano"
    assert _container(pod)["resources"] == {
        "limits": {"cpu": "32", "memory": "400Gi", "nvidia.com/gpu": 8},
        "requests": {"cpu": "32", "memory": "400Gi"},
    }
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["spec"]["volumes"]
    assert {item["name"]: item.get("value") for item in _container(pod)["env"]}["OMP_NUM_THREADS"] == "4"


def test_the_preflight_pod_is_no_gang_member() -> None:
    pod = build_preflight_pod(JOB, EVERYTHING, OperatorSettings())
    # Never a GPU, the default scheduler, no Kueue pod group, no shared memory, no ports.
    assert _container(pod)["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"},
                                            "limits": {"memory": "2Gi"}}
    assert "schedulerName" not in pod["spec"]
    assert not any(key in pod["metadata"]["labels"] or key in pod["metadata"].get("annotations", {})
                   for key in KUEUE_KEYS)
    assert [volume["name"] for volume in pod["spec"]["volumes"]] == ["trainer-config", "workdir"]
    assert "ports" not in _container(pod)
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "preflight"


def test_a_queued_gang_is_one_kueue_pod_group_per_attempt() -> None:
    gangs = {attempt: build_workers(JOB, EVERYTHING, OperatorSettings(), attempt)[1:] for attempt in (1, 2)}
    for attempt, pods in gangs.items():
        assert len(pods) == 2
        for pod in pods:
            assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
            assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == f"quickstart-u-1-{attempt}"
            assert {key: value for key, value in pod["metadata"]["annotations"].items() if "kueue" in key} == {
                "kueue.x-k8s.io/pod-group-total-count": "2",
                "kueue.x-k8s.io/retriable-in-group": "false",
            }


def test_no_kueue_metadata_without_a_queue() -> None:
    for pod in _every_pod(QUICKSTART):
        assert not any(key.startswith("kueue.x-k8s.io/") for key in pod["metadata"]["labels"])
        assert list(pod["metadata"]["annotations"]) == ["kubetune.dev/trainer-config"]
        assert "schedulerName" not in pod["spec"]


@pytest.mark.parametrize("name, uid, attempt", [
    ("x" * 52, "6f1c2a4e-0b7d-4e8f-9a1b-2c3d4e5f6a7b", 1),
    ("x" * 52, "6f1c2a4e-0b7d-4e8f-9a1b-2c3d4e5f6a7b", 123456),
    ("a-b", "6f1c2a4e-0b7d-4e8f-9a1b-2c3d4e5f6a7b", 3),
])
def test_pod_group_names_are_label_values_and_unique_per_job_and_attempt(name: str, uid: str, attempt: int) -> None:
    import re

    group = pod_group_name(JobRef(name=name, namespace="ns", uid=uid), attempt)
    assert len(group) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", group), group
    assert group.endswith(f"-6f1c2a4e-{attempt}")
    assert group != pod_group_name(JobRef(name=name, namespace="ns", uid=uid), attempt + 1)


# Pod Security Standards, "restricted" profile (v1.30+): https://kubernetes.io/docs/concepts/security/pod-security-standards/
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What in ``pod`` the "restricted" Pod Security level forbids (its baseline checks too)."""
    spec = pod["spec"]
    found = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    pod_context = spec.get("securityContext") or {}
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds - RESTRICTED_VOLUMES}")
    if pod_context.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for key in ("sysctls", "windowsOptions"):
        if pod_context.get(key):
            found.append(f"pod {key}")
    for container in spec.get("initContainers", []) + spec["containers"]:
        context = container.get("securityContext") or {}
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if not (context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))):
            found.append(f"{name}: runAsNonRoot must be true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        if (context.get("seLinuxOptions") or {}).get("user") or (context.get("seLinuxOptions") or {}).get("role"):
            found.append(f"{name}: seLinuxOptions")
    return found


@pytest.mark.parametrize("spec", [QUICKSTART, EVERYTHING, parse_spec(GPU_EXAMPLE["spec"])],
                         ids=["quickstart", "every-knob", "gpu-scheduling-example"])
def test_every_pod_meets_restricted_pod_security(spec) -> None:
    for pod in _every_pod(spec):
        assert restricted_violations(pod) == [], pod["metadata"]["name"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] >= 1
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["spec"]["automountServiceAccountToken"] is False  # the trainer never calls the API


def test_runs_as_uid_and_gid_1000_by_default() -> None:
    for pod in _every_pod(QUICKSTART):
        context = pod["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (1000, 1000)


@pytest.mark.parametrize(
    "workers, limits, requests, threads",
    [
        ({"gpusPerWorker": 0}, None, None, "1"),
        (
            {"gpusPerWorker": 2, "resources": {"limits": {"cpu": "8", "memory": "32Gi"}}},
            {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2},
            None,
            "4",
        ),
        ({"resources": {"requests": {"cpu": "2500m"}}}, None, {"cpu": "2500m"}, "2"),
    ],
)
def test_resources_gpu_limit_and_omp_threads(workers: dict, limits, requests, threads: str) -> None:
    spec = parse_spec(minimal_spec(workers=workers, training={"microBatchSize": 1, "globalBatchSize": 8}))
    container = _container(build_worker_pod(JOB, spec, 0, OperatorSettings()))
    assert container.get("resources", {}).get("limits") == limits
    assert container.get("resources", {}).get("requests") == requests
    assert {item["name"]: item.get("value") for item in container["env"]}["OMP_NUM_THREADS"] == threads


@pytest.mark.parametrize(
    "image, platform, expected",
    [
        (None, "registry.example/trainer:1.2", "registry.example/trainer:1.2"),
        ("mine/trainer:dev", "registry.example/trainer:1.2", "mine/trainer:dev"),
        (None, "kubetune/trainer:0.1.0", "kubetune/trainer:0.1.0"),
    ],
)
def test_image_is_the_job_choice_else_the_platform_default(image, platform: str, expected: str) -> None:
    spec = parse_spec(minimal_spec(workers={"image": image} if image else {}))
    pod = build_worker_pod(JOB, spec, 0, OperatorSettings(trainer_image=platform))
    assert _container(pod)["image"] == expected

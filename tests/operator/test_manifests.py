from __future__ import annotations

import pytest
import yaml
from crd_tools import EXAMPLES, load_manifest, minimal_spec
from kubetune.operator.manifests import build_children, build_config_map, build_service, build_worker_pod
from kubetune.operator.settings import OperatorSettings
from kubetune.api import JobRef, parse_spec

JOB = JobRef(name="quickstart", namespace="default", uid="u-1")
QUICKSTART = parse_spec(load_manifest(EXAMPLES / "quickstart.yaml")["spec"])
OWNER = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "name": "quickstart",
    "uid": "u-1",
    "controller": True,
    "blockOwnerDeletion": True,
}


def _container(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def test_children_are_config_service_and_one_pod_per_replica() -> None:
    children = build_children(JOB, QUICKSTART, OperatorSettings())
    assert [(child["kind"], child["metadata"]["name"]) for child in children] == [
        ("ConfigMap", "quickstart-trainer-config"),
        ("Service", "quickstart-workers"),
        ("Pod", "quickstart-worker-0"),
        ("Pod", "quickstart-worker-1"),
    ]
    for child in children:
        assert child["metadata"]["namespace"] == "default"
        assert child["metadata"]["ownerReferences"] == [OWNER]
        assert child["metadata"]["labels"]["kubetune.dev/job-name"] == "quickstart"
        assert child["metadata"]["labels"]["kubetune.dev/job-uid"] == "u-1"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"


def test_config_map_holds_the_rendered_trainer_config() -> None:
    config_map = build_config_map(JOB, QUICKSTART, OperatorSettings(s3_endpoint="http://s3:9000"))
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["job"] == {"namespace": "default", "name": "quickstart", "uid": "u-1"}
    assert config["storage"]["endpoint"] == "http://s3:9000"


def test_headless_service_selects_the_job_workers() -> None:
    service = build_service(JOB)
    assert service["spec"]["clusterIP"] == "None"
    # The job's UID, not its name: a re-created job of the same name has other pods.
    assert service["spec"]["selector"] == {"kubetune.dev/job-uid": "u-1"}
    assert service["spec"]["ports"][0]["port"] == 29500
    assert service["spec"]["ports"][0]["name"] == "rdzv"


@pytest.mark.parametrize(
    "workers, index, nnodes, nproc",
    [({"replicas": 2}, 1, 2, 1), ({"replicas": 4, "gpusPerWorker": 8}, 3, 4, 8), ({}, 0, 1, 1)],
)
def test_worker_command_is_torchrun_with_node_rank(workers: dict, index: int, nnodes: int, nproc: int) -> None:
    spec = parse_spec(minimal_spec(workers=workers, training={"microBatchSize": 1, "globalBatchSize": 64}))
    pod = build_worker_pod(JOB, spec, index, OperatorSettings())
    assert _container(pod)["command"] == [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={index}",
        "--master-addr=quickstart-worker-0.quickstart-workers",
        "--master-port=29500",
        "-m",
        "kubetune.trainer",
        "--config",
        "/etc/kubetune/config.yaml",
    ]


def test_worker_pod_identity_dns_and_restart_policy() -> None:
    pod = build_worker_pod(JOB, QUICKSTART, 1, OperatorSettings())
    assert pod["metadata"]["name"] == "quickstart-worker-1"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": "quickstart",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.dev/job-name": "quickstart",
        "kubetune.dev/job-uid": "u-1",
        "kubetune.dev/replica-index": "1",
    }
    assert pod["spec"]["hostname"] == "quickstart-worker-1"
    assert pod["spec"]["subdomain"] == "quickstart-workers"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_worker_pod_mounts_config_and_workdir() -> None:
    pod = build_worker_pod(JOB, QUICKSTART, 0, OperatorSettings())
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes["trainer-config"]["configMap"]["name"] == "quickstart-trainer-config"
    assert "emptyDir" in volumes["workdir"]
    mounts = {mount["mountPath"]: mount for mount in _container(pod)["volumeMounts"]}
    assert mounts["/etc/kubetune"] == {"name": "trainer-config", "mountPath": "/etc/kubetune", "readOnly": True}
    assert mounts["/tmp"]["name"] == "workdir"


def test_credentials_come_from_the_secret_by_reference_only() -> None:
    env = {item["name"]: item for item in _container(build_worker_pod(JOB, QUICKSTART, 0, OperatorSettings()))["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_no_credentials_env_without_a_secret() -> None:
    env = [
        item["name"]
        for item in _container(build_worker_pod(JOB, parse_spec(minimal_spec()), 0, OperatorSettings()))["env"]
    ]
    assert env == ["POD_NAME", "POD_NAMESPACE", "OMP_NUM_THREADS"]


def test_security_context_meets_restricted_pod_security() -> None:
    pod = build_worker_pod(JOB, QUICKSTART, 0, OperatorSettings())
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = _container(pod)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


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

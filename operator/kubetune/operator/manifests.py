"""Pure builders: FineTuneJob -> ConfigMap, headless Service and worker Pods (plain dicts).

Every child carries a controller ownerReference to the job (so Kubernetes garbage-collects it
with the job) and the job's UID as a label (the Job controller's ``controller-uid``): a job
re-created under the same name has another UID, so the operator never mistakes the old job's
children, still terminating, for its own. No kopf, no API client: handlers create these.
"""

from __future__ import annotations

import math
from typing import Any

from kubetune.api import metrics
from kubetune.api.resource import API_VERSION, KIND
from kubetune.api.spec import DEFAULT_TRAINER_IMAGE, FineTuneJobSpec
from kubetune.api.trainer_config import CONFIG_DIR, CONFIG_KEY, CONFIG_PATH, JobRef, TrainerConfig
from kubetune.operator.settings import OperatorSettings

RENDEZVOUS_PORT = 29500
JOB_NAME_LABEL = "kubetune.dev/job-name"
JOB_UID_LABEL = "kubetune.dev/job-uid"
REPLICA_INDEX_LABEL = "kubetune.dev/replica-index"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune"
CONTAINER_NAME = "trainer"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def config_map_name(job_name: str) -> str:
    return f"{job_name}-trainer-config"


def service_name(job_name: str) -> str:
    return f"{job_name}-workers"


def pod_name(job_name: str, index: int) -> str:
    return f"{job_name}-worker-{index}"


def selector_labels(job: JobRef) -> dict[str, str]:
    """Labels that find every child of one job, and only of this one (not of an earlier job
    of the same name): the Service's selector, the operator's pod index."""
    return {JOB_UID_LABEL: job.uid}


def common_labels(job: JobRef, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/component": component,
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_NAME_LABEL: job.name,  # for people: kubectl get pods -l kubetune.dev/job-name=NAME
        **selector_labels(job),
    }


def owned_by(child: dict[str, Any], uid: str) -> bool:
    """Whether ``child`` is controlled by the job with ``uid``."""
    return any(
        ref.get("controller") and ref.get("uid") == uid for ref in (child.get("metadata") or {}).get("ownerReferences") or []
    )


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**common_labels(job, component), **extra_labels},
        "ownerReferences": [owner_reference(job)],
    }


def trainer_config(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> TrainerConfig:
    """The job as its trainers see it: every default resolved, the platform's S3 endpoint for a
    job that names none."""
    return TrainerConfig.for_job(job, spec, s3_endpoint=settings.s3_endpoint,
                                 metrics_port=settings.trainer_metrics_port)


def build_config_map(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name), "trainer-config"),
        "data": {CONFIG_KEY: trainer_config(job, spec, settings).render()},
    }


def build_service(job: JobRef) -> dict[str, Any]:
    """Headless Service: gives each worker the DNS name <pod>.<job>-workers for rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name), "worker"),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(job),
            # Workers must find each other before they report Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def trainer_command(job_name: str, spec: FineTuneJobSpec, index: int) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={spec.workers.replicas}",
        f"--nproc-per-node={spec.workers.processes_per_worker}",
        f"--node-rank={index}",
        f"--master-addr={pod_name(job_name, 0)}.{service_name(job_name)}",
        f"--master-port={RENDEZVOUS_PORT}",
        "-m",
        "kubetune.trainer",
        "--config",
        CONFIG_PATH,
    ]


def trainer_image(spec: FineTuneJobSpec, settings: OperatorSettings) -> str:
    """The job's own image, unless it kept the CRD default: then the platform's image."""
    if spec.workers.image == DEFAULT_TRAINER_IMAGE:
        return settings.trainer_image
    return spec.workers.image


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    given = spec.workers.resources
    limits = dict(given.limits or {}) if given else {}
    requests = dict(given.requests or {}) if given else {}
    if spec.workers.gpus_per_worker:
        limits["nvidia.com/gpu"] = spec.workers.gpus_per_worker
    resources: dict[str, Any] = {}
    if limits:
        resources["limits"] = limits
    if requests:
        resources["requests"] = requests
    return resources


def _cpu_cores(quantity: int | str | None) -> float | None:
    if quantity is None:
        return None
    text = str(quantity)
    try:
        return int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def omp_threads(spec: FineTuneJobSpec) -> int:
    """Split the pod's CPUs between its processes; oversubscribed OpenMP threads crawl."""
    resources = spec.workers.resources
    cores = None
    if resources:
        cores = _cpu_cores((resources.limits or {}).get("cpu")) or _cpu_cores((resources.requests or {}).get("cpu"))
    if not cores:
        return 1
    return max(1, math.floor(cores / spec.workers.processes_per_worker))


def _env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    secret = spec.storage.credentials_secret
    if secret:
        # Only a reference to the Secret: its values never pass through the operator.
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in CREDENTIAL_KEYS]
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "OMP_NUM_THREADS", "value": str(omp_threads(spec))},
    ]
    return env


def build_worker_pod(job: JobRef, spec: FineTuneJobSpec, index: int, settings: OperatorSettings) -> dict[str, Any]:
    name = pod_name(job.name, index)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(job.name, spec, index),
        "env": _env(spec),
        "ports": [
            {"name": "rdzv", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": metrics.METRICS_PORT_NAME, "containerPort": settings.trainer_metrics_port, "protocol": "TCP"},
        ],
        # The trainer writes its outcome (final loss, or the one-line error) to the default
        # /dev/termination-log; a crash that wrote nothing still explains itself by its log tail.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "trainer-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "workdir", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, name, "worker", **{REPLICA_INDEX_LABEL: str(index)}),
        "spec": {
            "hostname": name,
            "subdomain": service_name(job.name),
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {
                    "name": "trainer-config",
                    "configMap": {
                        "name": config_map_name(job.name),
                        "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
                    },
                },
                {"name": "workdir", "emptyDir": {}},
            ],
        },
    }


def build_children(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Everything one job needs, in creation order (config and DNS before the pods)."""
    return [
        build_config_map(job, spec, settings),
        build_service(job),
        *(build_worker_pod(job, spec, index, settings) for index in range(spec.workers.replicas)),
    ]

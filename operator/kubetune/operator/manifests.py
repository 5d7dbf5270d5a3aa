"""Pure builders: FineTuneJob -> headless Service and Pods (plain dicts), each pod carrying the
trainer config in an annotation that a downward API volume mounts (``kubetune.api.trainer_config``).

Every child carries a controller ownerReference to the job (so Kubernetes garbage-collects it
with the job) and the job's UID as a label (the Job controller's ``controller-uid``): a job
re-created under the same name has another UID, so the operator never mistakes the old job's
children, still terminating, for its own. No kopf, no API client: handlers create these.
"""

from __future__ import annotations

import math
from typing import Any

from kubetune.api import metrics
from kubetune.api.labels import (
    JOB_NAME_LABEL, JOB_UID_LABEL, REPLICA_INDEX_LABEL, ATTEMPT_LABEL, COMPONENT_LABEL, WORKER, PREFLIGHT, MANAGED_BY_LABEL, MANAGED_BY, CONTAINER_NAME,
)
from kubetune.api.logs import ATTEMPT_ENV, POD_NAME_ENV
from kubetune.api.resource import API_VERSION, KIND
from kubetune.api.spec import CREDENTIAL_ENV, DEFAULT_TRAINER_IMAGE, GPU_RESOURCE, FineTuneJobSpec
from kubetune.api.trainer_config import CONFIG_ANNOTATION, CONFIG_DIR, CONFIG_KEY, CONFIG_PATH, JobRef, TrainerConfig
from kubetune.operator.settings import OperatorSettings

RENDEZVOUS_PORT = 29500
CREDENTIAL_KEYS = CREDENTIAL_ENV
# Kueue's pod integration (https://kueue.sigs.k8s.io/docs/tasks/run/plain_pods/): a group of plain
# pods is queued and admitted as one Workload, named after the group.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
SHM_VOLUME = "dshm"


def service_name(job_name: str) -> str:
    return f"{job_name}-workers"


def pod_name(job_name: str, index: int) -> str:
    return f"{job_name}-worker-{index}"


def preflight_pod_name(job_name: str) -> str:
    return f"{job_name}-preflight"


def pod_group_name(job: JobRef, attempt: int) -> str:
    """The Kueue pod group (and Workload) of one attempt's gang: a label value (63 characters at
    most) and an object name, unique to this job (its UID) and attempt."""
    suffix = f"-{job.uid[:8]}-{attempt}"
    return job.name[:63 - len(suffix)].rstrip("-.") + suffix


def selector_labels(job: JobRef) -> dict[str, str]:
    """Labels that find every child of one job, and only of this one (not of an earlier job
    of the same name): the Service's selector, the operator's pod index."""
    return {JOB_UID_LABEL: job.uid}


def common_labels(job: JobRef, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job.name,
        COMPONENT_LABEL: component,
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


def _metadata(job: JobRef, name: str, component: str, annotations: dict[str, str] | None = None,
              **extra_labels: str) -> dict[str, Any]:
    metadata = {
        "name": name,
        "namespace": job.namespace,
        "labels": {**common_labels(job, component), **extra_labels},
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def trainer_config(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> TrainerConfig:
    """The job as its trainers see it: every default resolved, the platform's S3 endpoint for a
    job that names none."""
    return TrainerConfig.for_job(job, spec, s3_endpoint=settings.s3_endpoint,
                                 metrics_port=settings.trainer_metrics_port)


def build_service(job: JobRef) -> dict[str, Any]:
    """Headless Service: gives worker 0 the DNS name <pod>.<job>-workers, torchrun's master
    address. Worker 0 only: the other ranks are never looked up by name (they meet at worker 0's
    store and exchange addresses there), and each pod a Service selects costs an EndpointSlice
    update at every change of its state (at a thousand jobs, the controller manager's largest
    load)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name), WORKER),
        "spec": {
            "clusterIP": "None",
            "selector": {**selector_labels(job), COMPONENT_LABEL: WORKER, REPLICA_INDEX_LABEL: "0"},
            # Workers must find each other before they report Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def trainer_command(job_name: str, spec: FineTuneJobSpec, index: int) -> list[str]:
    """torchrun under the log keeper, which passes its output and signals through and keeps the
    whole log in S3 (kubetune.api.logs), so a job whose pods are gone still explains itself."""
    return [
        "python", "-m", "kubetune.trainer.logkeeper", "--config", CONFIG_PATH, "--",
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
        limits[GPU_RESOURCE] = spec.workers.gpus_per_worker
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


def _env(spec: FineTuneJobSpec, attempt: int | None = None) -> list[dict[str, Any]]:
    """kubetune's variables, then the job's own (spec.workers.env, which may not redefine
    kubetune's, and may refer to them as $(NAME) because they come first)."""
    env: list[dict[str, Any]] = []
    secret = spec.storage.credentials_secret
    if secret:
        # Only a reference to the Secret: its values never pass through the operator. Without a
        # Secret nothing is set, and the trainer's boto3 uses its standard chain (the web identity
        # token of an IRSA service account, Pod Identity, instance metadata, spec.workers.env).
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in CREDENTIAL_KEYS]
    env += [
        {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "OMP_NUM_THREADS", "value": str(omp_threads(spec))},
    ]
    if attempt is not None:
        env.append({"name": ATTEMPT_ENV, "value": str(attempt)})
    env += [_as_dict(variable) for variable in spec.workers.env or ()]
    return env


def _as_dict(model: Any) -> dict[str, Any]:
    """An API object as the Kubernetes API writes it: camelCase keys, absent fields left out."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


WORKER_GRACE_SECONDS = 45
"""How long a deleted worker has to stop: torchrun passes SIGTERM on to the trainer, which
finishes its step and writes a checkpoint before it exits (suspend, gang restart). torchrun
itself SIGKILLs its workers 30 s after passing SIGTERM on; the rest is torchrun's own exit."""
PREFLIGHT_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
"""The preflight pod parses the dataset and the tokenizer on a CPU; it never holds a GPU."""


def _trainer_container(spec: FineTuneJobSpec, settings: OperatorSettings, command: list[str],
                       attempt: int | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": _env(spec, attempt),
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
    if spec.workers.env_from:
        container["envFrom"] = [_as_dict(source) for source in spec.workers.env_from]
    return container


def _pod_spec(spec: FineTuneJobSpec) -> dict[str, Any]:
    """What the worker and the preflight pods share beyond the container: identity (service
    account, image pull secrets), security context, and placement (node selector, tolerations,
    affinity, priority), so that the preflight pulls the image and reaches S3 as the workers do."""
    workers, scheduling = spec.workers, spec.scheduling
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The trainer never calls the Kubernetes API: no token to steal. (IRSA and workload
        # identity bring their own projected token, not this one.)
        "automountServiceAccountToken": False,
        # Pod Security "restricted": never root, the runtime's seccomp profile; the container
        # drops every capability and cannot escalate. A numeric user, so the kubelet can check
        # runAsNonRoot without reading the image.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": workers.run_as_user,
            "runAsGroup": workers.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if workers.service_account_name:
        pod_spec["serviceAccountName"] = workers.service_account_name
    if workers.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in workers.image_pull_secrets]
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [_as_dict(toleration) for toleration in scheduling.tolerations]
    if scheduling.affinity and (affinity := _as_dict(scheduling.affinity)):
        pod_spec["affinity"] = affinity
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    return pod_spec


def _pod(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings, name: str, component: str,
         labels: dict[str, str], container: dict[str, Any], *, annotations: dict[str, str] | None = None,
         volumes: tuple[dict[str, Any], ...] = (), **pod_spec: Any) -> dict[str, Any]:
    """A pod of the job, with the trainer config in its annotation, mounted at CONFIG_PATH."""
    config = {CONFIG_ANNOTATION: trainer_config(job, spec, settings).render()}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, name, component, {**(annotations or {}), **config}, **labels),
        "spec": {
            **_pod_spec(spec),
            "containers": [container],
            "volumes": [
                {
                    "name": "trainer-config",
                    "downwardAPI": {"items": [
                        {"path": CONFIG_KEY, "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}},
                    ]},
                },
                {"name": "workdir", "emptyDir": {}},
                *volumes,
            ],
            **pod_spec,
        },
    }


def _kueue_metadata(job: JobRef, spec: FineTuneJobSpec, attempt: int) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations that queue one attempt's gang in Kueue as a pod group; none
    without spec.scheduling.queueName."""
    queue = spec.scheduling.queue_name
    if not queue:
        return {}, {}
    labels = {KUEUE_QUEUE_LABEL: queue, KUEUE_POD_GROUP_LABEL: pod_group_name(job, attempt)}
    annotations = {
        KUEUE_POD_GROUP_COUNT_ANNOTATION: str(spec.workers.replicas),
        # The operator never replaces one pod of a gang: it ends an attempt as a whole (restart,
        # suspend) and starts the next as a new group. Unretriable, Kueue finishes the group's
        # Workload once all its pods have terminated, and removes the finalizer it keeps on
        # them; a retriable group would hold its pods (and the quota) waiting for replacements.
        KUEUE_RETRIABLE_ANNOTATION: "false",
    }
    return labels, annotations


def build_worker_pod(job: JobRef, spec: FineTuneJobSpec, index: int, settings: OperatorSettings,
                     attempt: int = 1) -> dict[str, Any]:
    name = pod_name(job.name, index)
    container = _trainer_container(spec, settings, trainer_command(job.name, spec, index), attempt)
    container["ports"] = [
        {"name": "rdzv", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        {"name": metrics.METRICS_PORT_NAME, "containerPort": settings.trainer_metrics_port, "protocol": "TCP"},
    ]
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    volumes: tuple[dict[str, Any], ...] = ()
    if spec.workers.shm_enabled:
        # NCCL's shared-memory transport and DataLoader workers need more than a runtime's 64Mi.
        volumes = ({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.workers.shm_size}},)
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    kueue_labels, annotations = _kueue_metadata(job, spec, attempt)
    labels = {REPLICA_INDEX_LABEL: str(index), ATTEMPT_LABEL: str(attempt), **kueue_labels}
    extra: dict[str, Any] = {}
    if spec.scheduling.scheduler_name:
        extra["schedulerName"] = spec.scheduling.scheduler_name
    return _pod(job, spec, settings, name, WORKER, labels, container, annotations=annotations, volumes=volumes,
                hostname=name, subdomain=service_name(job.name), terminationGracePeriodSeconds=WORKER_GRACE_SECONDS,
                **extra)


def build_preflight_pod(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """One small CPU pod that runs the trainer's preflight with the job's config and
    credentials before any worker (and GPU) is held."""
    command = ["python", "-m", "kubetune.trainer", "--config", CONFIG_PATH, "--preflight"]
    container = _trainer_container(spec, settings, command)
    container["resources"] = PREFLIGHT_RESOURCES
    # The job's identity, environment and placement (_pod_spec), but never a GPU, no Kueue labels
    # (it is no member of the gang: the group's count is the workers') and the default
    # scheduler: spec.scheduling.schedulerName is for the gang (Volcano, coscheduling), which
    # would hold this one CPU pod to its gang and queue rules, or wait for a pod group it is not
    # in, when the point of the preflight is a quick answer before any GPU is held.
    return _pod(job, spec, settings, preflight_pod_name(job.name), PREFLIGHT, {}, container)


def build_workers(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings, attempt: int) -> list[dict[str, Any]]:
    """One attempt's gang, after the Service its members find each other through."""
    return [build_service(job),
            *(build_worker_pod(job, spec, index, settings, attempt) for index in range(spec.workers.replicas))]

"""Kopf handlers: thin glue between Kubernetes events and the pure builders.

- FineTuneJob created (or found at operator start): create its ConfigMap, Service and pods.
- A kubetune worker pod changed: re-derive the owning job's status from all its pods.
- FineTuneJob spec changed: warn that a running job does not pick it up.
Deleting a job deletes its children through ownerReferences; no finalizer is needed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import kopf
from kubetune.operator.kube import GROUP, PLURAL, VERSION, Kube, NoCredentialsError, bearer_token, load_credentials
from kubetune.operator.manifests import JOB_NAME_LABEL, MANAGED_BY, MANAGED_BY_LABEL, build_children
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.spec import InvalidSpecError, check_job_name, parse_spec
from kubetune.operator.status import FINAL_PHASES, derive_status, failed_status, initial_status, observe_pod
from kubetune.operator.trainer_config import JobRef

# Pod events of one job arrive in parallel threads; one lock per job keeps each
# read-derive-patch cycle (and the transition events it posts) from interleaving.
_job_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_state: dict[str, Any] = {}


def _kube() -> Kube:
    return _state["kube"]


def _settings() -> OperatorSettings:
    return _state["settings"]


def _now() -> datetime:
    return datetime.now(UTC)


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf and our client share one set of credentials, resolved when the operator starts."""
    try:
        configuration = load_credentials()
    except NoCredentialsError as error:
        raise kopf.LoginError(str(error)) from None
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        token=bearer_token(configuration),
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        username=configuration.username or None,
        password=configuration.password or None,
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: the CRD's structural status schema would prune
    # anything kopf wrote under status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.dev")
    # Only the explicit events below are posted (kopf's posting.loggers is off by default), so
    # nothing a handler logs can leak into Events.
    settings.posting.loggers = False
    settings.posting.reporting_component = "kubetune-operator"
    try:
        load_credentials()
    except NoCredentialsError as error:
        raise kopf.PermanentError(str(error)) from None  # retrying will not make a kubeconfig appear
    _state["kube"] = Kube()
    _state.setdefault("settings", OperatorSettings.from_env())


def use_settings(settings: OperatorSettings) -> None:
    """Let the entry point (or a test) fix the settings before kopf starts."""
    _state["settings"] = settings


@kopf.on.create(GROUP, VERSION, PLURAL)
def finetunejob_create(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, logger: kopf.Logger, **_: Any) -> None:
    _start_job(body, spec, meta, logger)


@kopf.on.resume(GROUP, VERSION, PLURAL)
def finetunejob_resume(
    body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, logger: kopf.Logger, **_: Any
) -> None:
    if status.get("phase") in FINAL_PHASES:
        return  # finished jobs are history, never re-run
    _start_job(body, spec, meta, logger)


def _start_job(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, logger: kopf.Logger) -> None:
    job = JobRef(
        name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], generation=int(meta.get("generation") or 1)
    )
    with _job_locks[(job.namespace, job.name)]:
        try:
            check_job_name(job.name)
            typed = parse_spec(dict(spec))
        except InvalidSpecError as error:
            previous = dict(body.get("status") or {})
            _kube().patch_job_status(
                job.namespace, job.name, failed_status(previous, job.generation, "InvalidSpec", str(error), _now())
            )
            kopf.warn(body, reason="InvalidSpec", message=str(error))
            raise kopf.PermanentError(str(error)) from None
        children = build_children(job, typed, _settings())
        kopf.adopt(children, owner=body)
        created = [child["metadata"]["name"] for child in children if _kube().create_if_absent(child)]
        logger.info("created %s", ", ".join(created) or "nothing (all children exist)")
        if not (body.get("status") or {}).get("phase"):
            _kube().patch_job_status(job.namespace, job.name, initial_status(job.generation, _now()))
            kopf.info(
                body, reason="Created", message=f"created config map, service and {typed.workers.replicas} worker pods"
            )


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def finetunejob_spec_changed(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    message = "spec changes are not applied to a job that has started; delete and recreate the job to change it"
    logger.warning(message)
    kopf.warn(body, reason="SpecChangeIgnored", message=message)


@kopf.on.event("", "v1", "pods", labels={MANAGED_BY_LABEL: MANAGED_BY, JOB_NAME_LABEL: kopf.PRESENT})
def worker_pod_event(namespace: str, labels: kopf.Labels, logger: kopf.Logger, **_: Any) -> None:
    refresh_job_status(namespace, labels[JOB_NAME_LABEL], logger)


def refresh_job_status(namespace: str, job_name: str, logger: kopf.Logger) -> None:
    """Re-derive a job's status from all its pods, patch it, and announce phase changes."""
    with _job_locks[(namespace, job_name)]:
        job = _kube().get_job(namespace, job_name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return  # the job is gone or going; its pods follow it
        previous = job.get("status") or {}
        spec = job.get("spec") or {}
        pods = [observe_pod(pod) for pod in _kube().list_pods(namespace, {JOB_NAME_LABEL: job_name})]
        status = derive_status(
            replicas=int((spec.get("workers") or {}).get("replicas", 1)),
            adapter_uri=(spec.get("output") or {}).get("adapterUri", ""),
            generation=int(job["metadata"].get("generation") or 1),
            pods=pods,
            previous=previous,
            now=_now(),
            job_name=job_name,
        )
        if status == previous:
            return
        _kube().patch_job_status(namespace, job_name, status)
        if status["phase"] != previous.get("phase"):
            logger.info("job %s/%s is %s: %s", namespace, job_name, status["phase"], status["message"])
            _announce(job, status)


def _announce(job: dict[str, Any], status: dict[str, Any]) -> None:
    phase, message = status["phase"], status["message"]
    if phase == "Running":
        kopf.info(job, reason="Running", message=message)
    elif phase == "Succeeded":
        kopf.info(job, reason="Succeeded", message=message)
    elif phase == "Failed":
        kopf.warn(job, reason="Failed", message=message)

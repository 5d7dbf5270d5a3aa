"""Kopf handlers: thin glue between Kubernetes events and the pure builders.

- FineTuneJob created (or found at operator start): create its ConfigMap, Service and pods.
- A kubetune worker pod changed: re-derive the owning job's status from all its pods.
- FineTuneJob spec changed: warn that a running job does not pick it up.
- FineTuneJob Running: every few seconds, scrape rank 0's /metrics into ``status.progress``.
- Any FineTuneJob event: keep the operator's jobs-by-phase gauge current.
Deleting a job deletes its children through ownerReferences; no finalizer is needed.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import kopf
from kubetune.api import FINAL_PHASES, InvalidObjectError, JobRef, check_job_name, parse_spec
from kubetune.operator.kube import GROUP, PLURAL, VERSION, Kube, NoCredentialsError, bearer_token, load_credentials
from kubetune.operator.manifests import (
    JOB_NAME_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    REPLICA_INDEX_LABEL,
    build_children,
)
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.progress import MetricsParseError, derive_progress, metrics_url
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import derive_status, failed_status, initial_status, observe_pod

# Pod events of one job arrive in parallel threads; one lock per job keeps each
# read-derive-patch cycle (and the transition events it posts) from interleaving.
_job_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_state: dict[str, Any] = {"metrics": OperatorMetrics()}
PROGRESS_INTERVAL_SECONDS = 5.0
# A scrape runs in a timer thread; a hung pod must not hold it (nor the job) for long.
SCRAPE_TIMEOUT_SECONDS = 2.0


def _kube() -> Kube:
    return _state["kube"]


def _settings() -> OperatorSettings:
    return _state["settings"]


def _now() -> datetime:
    return datetime.now(UTC)


def metrics() -> OperatorMetrics:
    if "metrics" not in _state:
        _state["metrics"] = OperatorMetrics()
    return _state["metrics"]


@contextlib.contextmanager
def _reconciling(handler: str) -> Iterator[None]:
    metrics().reconciles.labels(handler=handler).inc()
    try:
        yield
    except kopf.PermanentError:
        raise  # an outcome (e.g. an invalid spec), already reported on the job
    except Exception:
        metrics().reconcile_errors.labels(handler=handler).inc()
        raise


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
    logging.getLogger("kopf.objects").addFilter(_quiet_progress_timer)
    try:
        load_credentials()
    except NoCredentialsError as error:
        raise kopf.PermanentError(str(error)) from None  # retrying will not make a kubeconfig appear
    _state["kube"] = Kube()
    _state.setdefault("settings", OperatorSettings.from_env())


def _quiet_progress_timer(record: logging.LogRecord) -> bool:
    """kopf logs every successful handler run; for a timer every few seconds per job that buries
    the log lines that matter."""
    return not (record.levelno == logging.INFO and record.getMessage() == "Timer 'finetunejob_progress' succeeded.")


def use_settings(settings: OperatorSettings) -> None:
    """Let the entry point (or a test) fix the settings before kopf starts."""
    _state["settings"] = settings


@kopf.on.create(GROUP, VERSION, PLURAL)
def finetunejob_create(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, logger: kopf.Logger, **_: Any) -> None:
    with _reconciling("create"):
        _start_job(body, spec, meta, logger)


@kopf.on.resume(GROUP, VERSION, PLURAL)
def finetunejob_resume(
    body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, logger: kopf.Logger, **_: Any
) -> None:
    if status.get("phase") in FINAL_PHASES:
        return  # finished jobs are history, never re-run
    with _reconciling("resume"):
        _start_job(body, spec, meta, logger)


def _start_job(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, logger: kopf.Logger) -> None:
    job = JobRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    generation = int(meta.get("generation") or 1)
    with _job_locks[(job.namespace, job.name)]:
        try:
            check_job_name(job.name)
            typed = parse_spec(dict(spec))
        except InvalidObjectError as error:
            previous = dict(body.get("status") or {})
            _kube().patch_job_status(
                job.namespace, job.name, failed_status(previous, generation, "InvalidSpec", str(error), _now())
            )
            kopf.warn(body, reason="InvalidSpec", message=str(error))
            raise kopf.PermanentError(str(error)) from None
        children = build_children(job, typed, _settings())
        kopf.adopt(children, owner=body)
        created = [child for child in children if _kube().create_if_absent(child)]
        metrics().pods_created.inc(sum(child["kind"] == "Pod" for child in created))
        created = [child["metadata"]["name"] for child in created]
        logger.info("created %s", ", ".join(created) or "nothing (all children exist)")
        if not (body.get("status") or {}).get("phase"):
            _kube().patch_job_status(job.namespace, job.name, initial_status(generation, _now()))
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
    with _reconciling("pod_event"):
        refresh_job_status(namespace, labels[JOB_NAME_LABEL], logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
def finetunejob_event(type: str | None, meta: kopf.Meta, status: kopf.Status, **_: Any) -> None:
    if type == "DELETED":
        metrics().job_gone(meta["namespace"], meta["name"])
    else:
        metrics().job_seen(meta["namespace"], meta["name"], status.get("phase"))


def _is_running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Running"


@kopf.timer(GROUP, VERSION, PLURAL, interval=PROGRESS_INTERVAL_SECONDS, when=_is_running)
def finetunejob_progress(meta: kopf.Meta, logger: kopf.Logger, **_: Any) -> None:
    scrape_progress(meta["namespace"], meta["name"], logger)


def scrape_progress(namespace: str, job_name: str, logger: kopf.Logger) -> None:
    """Read rank 0's /metrics into ``status.progress``. A failed scrape is no error: the job
    runs on, the failure is counted, and the next tick tries again."""
    pods = _kube().list_pods(namespace, {JOB_NAME_LABEL: job_name, REPLICA_INDEX_LABEL: "0"})
    url = metrics_url(pods[0]) if pods else None
    if url is None:
        return  # worker-0 has no IP yet, or no metrics port to scrape
    try:
        text = _state.get("fetch", _fetch)(url)
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as error:
        metrics().scrape_failures.inc()
        logger.debug("progress scrape of %s failed: %s", url, error)
        return
    with _job_locks[(namespace, job_name)]:
        job = _kube().get_job(namespace, job_name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        status = job.get("status") or {}
        if status.get("phase") != "Running":
            return  # finished while we scraped: the final status owns the progress now
        try:
            progress = derive_progress(text, status.get("progress"), _now())
        except MetricsParseError as error:
            metrics().scrape_failures.inc()
            logger.debug("progress scrape of %s failed: %s", url, error)
            return
        if progress is not None and progress != status.get("progress"):
            _kube().patch_job_status(namespace, job_name, {"progress": progress})


# Pod IPs are reached directly, never through an HTTP(S)_PROXY from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _fetch(url: str) -> str:
    with _opener.open(url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
        return response.read().decode("utf-8")


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

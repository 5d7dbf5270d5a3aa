"""Kopf handlers: they observe and carry out; every decision is ``reconcile()``'s.

- Two in-memory indexes (kopf's): every FineTuneJob by UID, and every kubetune worker pod by
  the UID of the job that owns it (its ``kubetune.dev/job-uid`` label). The pod watch is
  filtered by the API server (``settings.watching.label_selectors``), not in the operator.
- A job is reconciled when it is created or found at start-up (with retries and back-off:
  a child name still held by an earlier job's terminating pod is waited for), when one of its
  pods changes, and every few seconds while it is unfinished (time decides too: back-off,
  deadlines, stalls, start-up timeouts), or finished with a TTL.
- Rank 0's metrics are scraped into ``status.progress`` on that tick while the job runs,
  asynchronously, with a timeout and a random delay, so a slow or hung pod holds up no other
  job; the reconciler then sees the fresh progress (stall detection, Publishing).

State lives in kopf's ``memo`` (the API client, settings, metrics, one lock per job so a job's
read-decide-write cycles never interleave), not in module globals. The Kubernetes client is the
official synchronous one, called from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from kubernetes.client.exceptions import ApiException
from kubetune.api import FINAL_PHASES, GROUP, PLURAL, VERSION, JobRef
from kubetune.operator.kube import Kube, NoCredentialsError, bearer_token, load_credentials, status_patch
from kubetune.api.labels import ATTEMPT_LABEL, JOB_UID_LABEL, MANAGED_BY, MANAGED_BY_LABEL, REPLICA_INDEX_LABEL
from kubetune.operator.manifests import owned_by
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.progress import MetricsParseError, derive_progress, metrics_url
from kubetune.operator.reconcile import (
    Create, Delete, DeleteJob, Event, Job, LogTail, Outcome, creation_failed, forbidden, ours, reconcile, waiting,
)
from kubetune.operator.settings import OperatorSettings

TICK_SECONDS = 5.0
# Running jobs tick faster: their progress is what `kubectl get ftj -w` shows, and a step of a
# small job takes well under a second.
PROGRESS_SECONDS = 2.0
# A scrape runs in the operator's event loop: a hung pod must not hold it for long.
SCRAPE_TIMEOUT_SECONDS = 2.0
WAIT_RETRY_SECONDS = 2.0
SCRAPED_PHASES = ("Running", "Publishing")
LOG_TAIL_LINES = 20
LOG_TAIL_CHARACTERS = 900  # an Event's message holds 1024
# 4xx answers that a retry may cure; every other 4xx to a create is a refusal, final.
RETRIABLE_STATUSES = {409, 429}


def _now() -> datetime:
    return datetime.now(UTC)


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf and our client share one set of credentials. Not kopf.login_via_client: that
    reads the kubeconfig the client found when it was imported, where $KUBECONFIG may have been
    set since (the demo, the tests); load_credentials reads it now."""
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
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: the CRD's structural status schema would prune
    # anything kopf wrote under status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.dev")
    # Events are the reconciler's, posted by us; nothing a handler logs becomes an Event.
    settings.posting.enabled = False
    # Only kubetune's pods, filtered by the API server: the operator never sees the others.
    settings.watching.label_selectors["", "v1", "pods"] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    logging.getLogger("kopf.objects").addFilter(_quiet_timers)
    try:
        load_credentials()
    except NoCredentialsError as error:
        raise kopf.PermanentError(str(error)) from None  # retrying will not make a kubeconfig appear
    memo.setdefault("settings", OperatorSettings.from_env())
    # A namespaced install is granted nothing cluster-wide: kopf would try to watch CRDs and
    # namespaces, and warn. The chart installs the CRD before the operator starts.
    settings.scanning.disabled = memo.settings.namespace is not None
    memo.setdefault("metrics", OperatorMetrics())
    memo.kube = Kube()
    memo.locks = {}
    memo.http = aiohttp.ClientSession(trust_env=False)  # pod IPs are reached directly, never via a proxy


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if "http" in memo:
        await memo.http.close()


def _quiet_timers(record: logging.LogRecord) -> bool:
    """kopf logs every successful handler run; for timers every few seconds per job that buries
    the log lines that matter."""
    return not (record.levelno == logging.INFO and record.getMessage().startswith("Timer ")
                and record.getMessage().endswith(" succeeded."))


# -- what the operator observes ------------------------------------------------------------
@kopf.index(GROUP, VERSION, PLURAL)
def jobs_by_uid(namespace: str, name: str, uid: str, **_: Any) -> dict[str, tuple[str, str]]:
    return {uid: (namespace, name)}


@kopf.index("", "v1", "pods", labels={JOB_UID_LABEL: kopf.PRESENT})
def pods_by_job(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    # A snapshot: kopf's body is a live view of whatever the watch delivers next.
    return {labels[JOB_UID_LABEL]: {key: _plain(value) for key, value in body.items()}}


def _plain(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _pods(index: kopf.Index, uid: str) -> list[dict[str, Any]]:
    return list(index.get(uid, []))


# -- when the operator reconciles ------------------------------------------------------------
def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in FINAL_PHASES


@kopf.on.create(GROUP, VERSION, PLURAL, backoff=WAIT_RETRY_SECONDS)
async def finetunejob_create(namespace: str, name: str, uid: str, memo: kopf.Memo, pods_by_job: kopf.Index,
                             logger: kopf.Logger, **_: Any) -> None:
    await _sync("create", namespace, name, uid, pods_by_job, memo, logger, retry=True)


@kopf.on.resume(GROUP, VERSION, PLURAL, when=_unfinished, backoff=WAIT_RETRY_SECONDS)
async def finetunejob_resume(namespace: str, name: str, uid: str, memo: kopf.Memo, pods_by_job: kopf.Index,
                             logger: kopf.Logger, **_: Any) -> None:
    await _sync("resume", namespace, name, uid, pods_by_job, memo, logger, retry=True)


@kopf.on.event("", "v1", "pods", labels={JOB_UID_LABEL: kopf.PRESENT})
async def worker_pod_event(labels: kopf.Labels, memo: kopf.Memo, jobs_by_uid: kopf.Index,
                           pods_by_job: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    uid = labels[JOB_UID_LABEL]
    for namespace, name in jobs_by_uid.get(uid, []):  # none: the pod of a job that is gone
        await _sync("pod_event", namespace, name, uid, pods_by_job, memo, logger)


def _ticking(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """Unfinished jobs that are not running, and finished ones that expire."""
    if status.get("phase") in SCRAPED_PHASES:
        return False
    if status.get("phase") not in FINAL_PHASES:
        return True
    return (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished") is not None


def _scraped(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in SCRAPED_PHASES


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS, when=_ticking)
async def finetunejob_tick(namespace: str, name: str, uid: str, memo: kopf.Memo, pods_by_job: kopf.Index,
                           logger: kopf.Logger, **_: Any) -> None:
    """Time moves a job on as much as events do: the restart back-off ends, a start-up timeout
    passes, a TTL expires."""
    await _sync("tick", namespace, name, uid, pods_by_job, memo, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=PROGRESS_SECONDS, sharp=True, when=_scraped)
async def finetunejob_progress(namespace: str, name: str, uid: str, status: kopf.Status, memo: kopf.Memo,
                               pods_by_job: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    """While the job runs: rank 0's /metrics become ``status.progress``, and the reconciler sees
    them (a stall, Publishing) along with the time (a deadline)."""
    attempt = (status.get("launched") or {}).get("attempt")
    metrics_text = await _scrape(JobRef(name=name, namespace=namespace, uid=uid), _pods(pods_by_job, uid), attempt,
                                 memo, logger)
    await _sync("progress", namespace, name, uid, pods_by_job, memo, logger, metrics_text=metrics_text)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_event(type: str | None, namespace: str, name: str, uid: str, status: kopf.Status,
                            meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        memo.metrics.job_gone(namespace, name)
        memo.locks.pop(uid, None)
    else:
        memo.metrics.job_seen(namespace, name, status, meta.get("creationTimestamp"))


# -- carrying out ------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _counted(memo: kopf.Memo, handler: str) -> AsyncIterator[None]:
    memo.metrics.reconciles.labels(handler=handler).inc()
    started = time.monotonic()
    try:
        yield
    except kopf.TemporaryError:
        raise  # waiting, not failing
    except Exception:
        memo.metrics.reconcile_errors.labels(handler=handler).inc()
        raise
    finally:
        memo.metrics.reconcile_seconds.labels(handler=handler).observe(time.monotonic() - started)


async def _sync(handler: str, namespace: str, name: str, uid: str, pods_by_job: kopf.Index, memo: kopf.Memo,
                logger: kopf.Logger, retry: bool = False, metrics_text: str | None = None) -> None:
    """Read the job afresh, reconcile it with its pods (and fresh progress), carry the outcome out.
    The pods are read from the index under the job's lock, after the job: a snapshot taken
    before (while another pass held the lock) could show a pod Running that has failed since,
    and a finished job would delete it as a survivor."""
    async with _counted(memo, handler), memo.locks.setdefault(uid, asyncio.Lock()):
        body = await asyncio.to_thread(memo.kube.get_job, namespace, name)
        if body is None or body["metadata"]["uid"] != uid or body["metadata"].get("deletionTimestamp"):
            return  # the job is gone or going (or re-created: its own handlers run for it)
        stored = Job.of(body)
        job = _with_progress(stored, metrics_text, memo, logger)
        outcome = reconcile(job, _pods(pods_by_job, uid), memo.settings, _now())
        if outcome.status is None and job.status != stored.status:
            outcome = Outcome(dict(job.status), outcome.actions, outcome.blocked)  # only the progress moved
        instead = await _carry_out(stored, outcome, memo, logger)
        if retry and instead is not None and instead.blocked:
            raise kopf.TemporaryError(instead.blocked, delay=WAIT_RETRY_SECONDS)


async def _carry_out(job: Job, outcome: Outcome, memo: kopf.Memo, logger: kopf.Logger) -> Outcome | None:
    """Create, post, then write the status. When a creation cannot be done (a name held by
    another object, a refusal), the outcome put in its place is carried out and returned."""
    for action in outcome.actions:
        if isinstance(action, Create):
            instead = await _create(job, action.child, memo)
            if instead is not None:
                await _carry_out(job, instead, memo, logger)
                return instead
        elif isinstance(action, Delete):
            logger.info("deleting pod %s/%s: %s", job.ref.namespace, action.name, action.why)
            await asyncio.to_thread(memo.kube.delete_pod, job.ref.namespace, action.name, action.uid)
        elif isinstance(action, LogTail):
            await _post_log_tail(job, action.name, memo, logger)
        elif isinstance(action, DeleteJob):
            logger.info("deleting job %s/%s: spec.runPolicy.ttlSecondsAfterFinished passed", job.ref.namespace,
                        job.ref.name)
            await asyncio.to_thread(memo.kube.delete_job, job.ref.namespace, job.ref.name, job.ref.uid)
        elif isinstance(action, Event):
            await _post(job, action, memo, logger)
    patch = status_patch(dict(job.status), outcome.status) if outcome.status is not None else {}
    if patch:
        await asyncio.to_thread(memo.kube.patch_job_status, job.ref.namespace, job.ref.name, patch)
        if outcome.status["phase"] != job.status.get("phase"):
            logger.info("job %s/%s is %s: %s", job.ref.namespace, job.ref.name, outcome.status["phase"],
                        outcome.status["message"])
    return None


async def _create(job: Job, child: dict[str, Any], memo: kopf.Memo) -> Outcome | None:
    """Create one child. None when it exists now as this job's; else what the job does instead."""
    try:
        await asyncio.to_thread(memo.kube.create, child)
    except ApiException as error:
        if error.status == 409:
            meta = child["metadata"]
            holder = await asyncio.to_thread(memo.kube.read, child["kind"], meta["namespace"], meta["name"])
            if holder is None:
                raise kopf.TemporaryError(f"{child['kind']} {meta['name']} was deleted meanwhile", delay=1) from None
            if owned_by(holder, job.ref.uid) and not holder["metadata"].get("deletionTimestamp"):
                return None  # ours already: created by an earlier pass
            return waiting(job, child, holder, _now())
        if error.status == 403:
            return forbidden(job, child, _api_message(error), _now())
        if 400 <= error.status < 500 and error.status not in RETRIABLE_STATUSES:
            return creation_failed(job, child, _api_message(error), _now())
        raise  # the API is unwell: kopf retries (create, resume) or the next event does
    if child["kind"] == "Pod":
        memo.metrics.pods_created.inc()
    return None


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message") or str(error.reason)
    except (TypeError, ValueError):
        return str(error.reason)


async def _post_log_tail(job: Job, pod: str, memo: kopf.Memo, logger: kopf.Logger) -> None:
    try:
        text = await asyncio.to_thread(memo.kube.pod_log_tail, job.ref.namespace, pod, LOG_TAIL_LINES)
    except ApiException as error:  # the failure itself is in the status already
        logger.warning("could not read the log of pod %s: %s", pod, error.reason)
        return
    text = (text or "").strip()
    if text:
        tail = text[-LOG_TAIL_CHARACTERS:]
        await _post(job, Event("Warning", "WorkerLog", f"last lines of pod {pod}:\n{tail}"), memo, logger)


async def _post(job: Job, event: Event, memo: kopf.Memo, logger: kopf.Logger) -> None:
    try:
        await asyncio.to_thread(memo.kube.post_event, job.ref, event.type, event.reason, event.message)
    except ApiException as error:  # an Event is worth a retry of nothing: the status says it too
        logger.warning("could not post event %s on %s/%s: %s", event.reason, job.ref.namespace, job.ref.name,
                       error.reason)


# -- progress ----------------------------------------------------------------------------------
async def _scrape(job: JobRef, pods: list[dict[str, Any]], attempt: int | None, memo: kopf.Memo,
                  logger: kopf.Logger) -> str | None:
    """Rank 0's /metrics text of the current attempt, or None. A failed scrape is no error: the
    job runs on, the failure is counted, and the next tick tries again."""
    await asyncio.sleep(random.uniform(0, PROGRESS_SECONDS / 5))  # jobs started together scrape apart
    rank0 = [pod for pod in ours(job, pods)
             if pod["metadata"].get("labels", {}).get(REPLICA_INDEX_LABEL) == "0"
             and pod["metadata"]["labels"].get(ATTEMPT_LABEL) == str(attempt)]
    url = metrics_url(rank0[0]) if rank0 else None
    if url is None:
        return None  # worker-0 has no IP yet, or no metrics port to scrape
    try:
        async with memo.http.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)) as answer:
            return await answer.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError) as error:
        memo.metrics.scrape_failures.inc()
        logger.debug("progress scrape of %s failed: %s", url, error)
        return None


def _with_progress(job: Job, metrics_text: str | None, memo: kopf.Memo, logger: kopf.Logger) -> Job:
    """The job with ``status.progress`` from a fresh scrape, while it runs."""
    if metrics_text is None or job.status.get("phase") not in SCRAPED_PHASES:
        return job  # finished while we scraped: the final status owns the progress now
    previous = job.status.get("progress")
    try:
        progress = derive_progress(metrics_text, previous, _now())
    except MetricsParseError as error:
        memo.metrics.scrape_failures.inc()
        logger.debug("progress of %s/%s unreadable: %s", job.ref.namespace, job.ref.name, error)
        return job
    if progress is None or progress == previous:
        return job
    return Job(ref=job.ref, generation=job.generation, spec=job.spec, status={**job.status, "progress": progress})

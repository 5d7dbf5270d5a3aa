"""Kopf handlers: they observe and carry out; every decision is ``reconcile()``'s.

- Two in-memory indexes (kopf's): every FineTuneJob by UID, and every kubetune worker pod by
  the UID of the job that owns it (its ``kubetune.dev/job-uid`` label). The pod watch is
  filtered by the API server (``settings.watching.label_selectors``), not in the operator.
- Watch events only queue a job (``WorkQueue``); a fixed number of workers reconcile what is
  due, each job one pass at a time. A job is queued when it is created or found at start-up,
  when its spec changes, shortly after one of its pods changes (a burst of pod events makes one
  pass: the Job controller's batch period), and again after every pass while it is unfinished
  (time decides too: back-off, deadlines, stalls, start-up timeouts) or finished with a TTL.
  A pass that fails, or waits for a name or a permission, is retried with a back-off.
- Kopf keeps no state on the objects: no finalizer, no annotations. A pass reads the job and
  its pods afresh; a job deleted while the operator is away goes at once, its children with it
  (owner references), and the operator carries on from whatever it finds when it starts.
- Rank 0's metrics are scraped into ``status.progress`` on the passes of a running job,
  asynchronously, with a timeout and a random delay, so a slow or hung pod holds up no other
  job; the reconciler then sees the fresh progress (stall detection, Publishing). When it finds
  the job stalled it asks for every worker's steps begun (``Outcome.probe``), and decides again
  with them, to name the worker that holds the gang up.

State lives in kopf's ``memo`` (the API client, settings, metrics, the queue, one lock per job
so a job's read-decide-write cycles never interleave), not in module globals. The Kubernetes
client is the official synchronous one, called from a thread pool as large as the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import aiohttp
import kopf
from kubernetes.client.exceptions import ApiException
from kubetune.api import FINAL_PHASES, GROUP, PLURAL, VERSION, JobRef
from kubernetes import client
from kubetune.operator.kube import (
    REPORTING_INSTANCE, Kube, NoCredentialsError, bearer_token, load_credentials, request_timeout, status_patch,
)
from kubetune.operator.leader import LeaderElection
from kubetune.api.labels import ATTEMPT_LABEL, JOB_UID_LABEL, MANAGED_BY, MANAGED_BY_LABEL, REPLICA_INDEX_LABEL
from kubetune.operator.manifests import owned_by
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.progress import MetricsParseError, derive_progress, metrics_url, steps_begun
from kubetune.operator.reconcile import (
    Create, Delete, DeleteJob, Event, Job, LogTail, Outcome, creation_failed, forbidden, ours, reconcile, waiting,
)
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.workqueue import WorkQueue

TICK_SECONDS = 5.0
# Running jobs tick faster: their progress is what `kubectl get ftj -w` shows, and a step of a
# small job takes well under a second. Each such pass scrapes rank 0 and, when the step moved,
# writes the status: with many jobs running, the passes are spread so that all of them together
# make at most PROGRESS_PASSES_PER_SECOND (at a thousand running jobs, every 30 s each, not
# 500 scrapes and status writes a second). A stall is still caught: every pass scrapes first.
PROGRESS_SECONDS, PROGRESS_SECONDS_CAP = 2.0, 30.0
PROGRESS_PASSES_PER_SECOND = 25.0
# A scrape runs in the operator's event loop: a hung pod must not hold it for long.
SCRAPE_TIMEOUT_SECONDS = 2.0
WAIT_RETRY_SECONDS = 2.0
# Pod events of one job within this window make one pass (the Job controller batches for 1 s):
# a gang of 8 starting is 8 to 16 events, one status write.
POD_EVENT_BATCH_SECONDS = 0.5
# Passes of different jobs run at once, each a few API calls from a thread: the operator's
# concurrency, as a Deployment's pods are the Job controller's (it waits on the API server, so
# more passes than cores).
WORKERS = 32
# A pass that raised (the API is unwell) is retried after 2, 4, 8 ... 60 seconds.
ERROR_BACKOFF_SECONDS, ERROR_BACKOFF_CAP_SECONDS = 2.0, 60.0
SCRAPED_PHASES = ("Running", "Publishing")
LOG_TAIL_LINES = 20
LOG_TAIL_CHARACTERS = 900  # an Event's message holds 1024
# 4xx answers that a retry may cure; every other 4xx to a create is a refusal, final.
RETRIABLE_STATUSES = {409, 429}
T = TypeVar("T")


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
    # kopf keeps no state on the jobs (event handlers and indexes only). Should a handler that
    # needs bookkeeping be added, it goes into annotations: the CRD's structural status schema
    # would prune anything kopf wrote under status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.dev")
    # Events are the reconciler's, posted by us; nothing a handler logs becomes an Event.
    settings.posting.enabled = False
    # Only kubetune's pods, filtered by the API server: the operator never sees the others.
    settings.watching.label_selectors["", "v1", "pods"] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    logging.getLogger("kopf.objects").addFilter(_quiet_handlers)
    try:
        load_credentials()
    except NoCredentialsError as error:
        raise kopf.PermanentError(str(error)) from None  # retrying will not make a kubeconfig appear
    memo.setdefault("settings", OperatorSettings.from_env())
    _set_timeouts(settings, memo.settings.api_timeout_seconds)
    # A namespaced install is granted nothing cluster-wide: kopf would try to watch CRDs and
    # namespaces, and warn. The chart installs the CRD before the operator starts.
    settings.scanning.disabled = memo.settings.namespace is not None
    memo.setdefault("metrics", OperatorMetrics())
    memo.kube = Kube(pool_size=WORKERS, timeout=memo.settings.api_timeout_seconds)
    memo.locks = {}
    memo.jobs = {}
    memo.failures = {}
    memo.queue = WorkQueue()
    memo.indexes = {"pods_by_job": {}}
    memo.http = aiohttp.ClientSession(trust_env=False)  # pod IPs are reached directly, never via a proxy
    # asyncio's default pool has min(32, cores + 4) threads: 6 on 2 cores, fewer than the workers.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(WORKERS, thread_name_prefix="kube"))
    memo.workers = [asyncio.create_task(_work(memo)) for _ in range(WORKERS)]
    memo.leading = asyncio.Event()
    memo.acting = lambda: True
    if memo.get("lease"):  # one of several replicas: only the holder of the Lease acts
        election = LeaderElection(client.CoordinationV1Api(memo.kube.api_client), memo.lease_namespace, memo.lease,
                                  f"{REPORTING_INSTANCE}_{uuid.uuid4().hex[:8]}", on_lost=_stop_operator,
                                  on_acquired=lambda: _export_jobs(memo))
        memo.leading, memo.acting, memo.election = election.leading, election.acting, election
        memo.workers.append(asyncio.create_task(election.run()))
    else:
        memo.leading.set()


def _leads(memo: kopf.Memo) -> bool:
    return memo.get("leading") is None or memo.leading.is_set()


def _export_jobs(memo: kopf.Memo) -> None:
    """The per-job series come from the replica that acts, only: a standby records none, and
    exports every job it knows once it takes over."""
    for seen in memo.jobs.values():
        meta = (seen.body or {}).get("metadata", {})
        memo.metrics.job_seen(meta.get("namespace", ""), meta.get("name", ""), (seen.body or {}).get("status") or {},
                              meta.get("creationTimestamp"))


def _set_timeouts(settings: kopf.OperatorSettings, seconds: float) -> None:
    """kopf's waits on the API server: ``seconds`` (KUBETUNE_API_TIMEOUT_SECONDS, 70 by default),
    as our own client's (kube.py), for connections that die without a word (a half-open TCP
    connection, a load balancer that accepts and never forwards)."""
    connect, read = request_timeout(seconds)
    # kopf's requests but watches (the lists a watch starts with, again after a 410 Gone): its
    # default is 5 minutes an attempt, 9 attempts, while that resource goes unwatched.
    settings.networking.request_timeout = read
    settings.networking.connect_timeout = connect
    # A watch is dead when nothing arrives, not even the bookmark the API server sends each watch
    # every minute: kopf then reopens it from its last resourceVersion. (kopf 1.45 has the same
    # 70 s default; ours, so that neither an upgrade nor a test can leave a dead watch hanging.)
    # No client_timeout (a total one): it would end live watches as well; and no server_timeout:
    # the API server ends each watch after 30 to 60 minutes on its own, and kopf resumes it.
    settings.watching.inactivity_timeout = read
    settings.watching.connect_timeout = connect


def _stop_operator() -> None:
    """Stop as kopf stops on SIGTERM; the Deployment starts the replica again, as a standby."""
    os.kill(os.getpid(), signal.SIGTERM)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    for worker in memo.get("workers", []):
        worker.cancel()
    if memo.get("election") is not None:
        await asyncio.to_thread(memo.election.release)
    if "http" in memo:
        await memo.http.close()


def _quiet_handlers(record: logging.LogRecord) -> bool:
    """kopf logs every successful handler run; for event handlers, many times per job, which
    buries the log lines that matter."""
    return not (record.levelno == logging.INFO and record.getMessage().startswith("Handler ")
                and record.getMessage().endswith(" succeeded."))


# -- what the operator observes ------------------------------------------------------------
@kopf.index(GROUP, VERSION, PLURAL)
def jobs_by_uid(namespace: str, name: str, uid: str, **_: Any) -> dict[str, tuple[str, str]]:
    return {uid: (namespace, name)}


@kopf.index("", "v1", "pods", labels={JOB_UID_LABEL: kopf.PRESENT})
def pods_by_job(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    return {labels[JOB_UID_LABEL]: observed_pod(body)}


POD_METADATA = ("name", "namespace", "uid", "labels", "creationTimestamp", "deletionTimestamp")
POD_STATUS = ("phase", "reason", "message", "podIP")


def observed_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the reconciler (``observe_pod``) and the scrape read of a pod, as a snapshot (kopf's
    body is a live view of whatever the watch delivers next): of its metadata the identity,
    labels, times and controller; of its status the phase, IP, why it ended or waits (the
    trainer container's state, an Unschedulable condition); of its spec the containers' ports.
    At thousands of pods the rest (the trainer config annotation, env, volumes, managed
    fields, the other conditions) was most of the operator's memory."""
    meta, status, spec = body.get("metadata") or {}, body.get("status") or {}, body.get("spec") or {}
    kept_meta = {key: _plain(meta[key]) for key in POD_METADATA if meta.get(key) is not None}
    kept_meta["ownerReferences"] = [{"uid": ref.get("uid"), "controller": True}
                                    for ref in meta.get("ownerReferences") or [] if ref.get("controller")]
    kept_status = {key: status[key] for key in POD_STATUS if status.get(key) is not None}
    kept_status["containerStatuses"] = [{"name": c.get("name"), "state": _plain(c.get("state") or {})}
                                        for c in status.get("containerStatuses") or []]
    kept_status["conditions"] = [_plain(c) for c in status.get("conditions") or [] if c.get("status") == "False"]
    ports = [{"name": c.get("name"), "ports": _plain(c.get("ports") or [])} for c in spec.get("containers") or []]
    return {"metadata": kept_meta, "spec": {"containers": ports}, "status": kept_status}


def _plain(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _pods(index: kopf.Index, uid: str) -> list[dict[str, Any]]:
    return list(index.get(uid, []))


# -- when the operator reconciles ------------------------------------------------------------
class Conflict(Exception):
    """The job changed between the read a decision was made on and the status write."""


class NotActing(Exception):
    """This replica lost the Lease during a pass: the pass stops before its next write."""


def _acting(memo: kopf.Memo) -> None:
    if not memo.get("acting", lambda: True)():
        raise NotActing


class JobKey(NamedTuple):
    namespace: str
    name: str
    uid: str


@dataclass
class Seen:
    """What the last watch event said of a job: when it is due again, and the job itself.

    A pass reconciles ``body``, as every controller reads its informer's cache, rather than a
    GET per pass (at a thousand running jobs, hundreds a second). Except after a status write
    of ours the watch has not delivered yet (``unobserved_write``, its resourceVersion): that
    pass GETs, so it never decides from a status older than its own last write."""

    generation: int
    phase: str | None
    attempt: int | None
    ttl: bool
    body: Mapping[str, Any] | None = None
    unobserved_write: str | None = None

    def fresh_body(self) -> Mapping[str, Any] | None:
        return self.body if self.unobserved_write is None else None


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_event(type: str | None, body: kopf.Body, namespace: str, name: str, uid: str,
                            spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, memo: kopf.Memo,
                            pods_by_job: kopf.Index, **_: Any) -> None:
    key = JobKey(namespace, name, uid)
    if type == "DELETED":
        memo.metrics.job_gone(namespace, name)
        memo.locks.pop(uid, None)
        memo.jobs.pop(uid, None)
        memo.failures.pop(key, None)
        memo.queue.forget(key)
        return
    if _leads(memo):
        memo.metrics.job_seen(namespace, name, status, meta.get("creationTimestamp"))
    # The pods index as kopf keeps it up to date, for the workers (kopf hands indexes only to
    # handlers). Into a shared dict: kopf gives each object its own shallow copy of the memo.
    memo.indexes["pods_by_job"] = pods_by_job
    generation = int(meta.get("generation") or 1)
    previous = memo.jobs.get(uid)
    unobserved = previous.unobserved_write if previous is not None else None
    memo.jobs[uid] = Seen(generation, status.get("phase"), (status.get("launched") or {}).get("attempt"),
                          (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished") is not None,
                          body=_without_managed_fields(body), unobserved_write=None if unobserved == meta.get("resourceVersion")
                          else unobserved)
    if meta.get("deletionTimestamp"):
        return  # going: its children go with it (owner references)
    if previous is None:  # created now, or found at start-up
        memo.queue.add(key, "create" if type == "ADDED" else "resume")
    elif generation != previous.generation:  # the spec changed (runPolicy.suspend)
        memo.queue.add(key, "update")


@kopf.on.event("", "v1", "pods", labels={JOB_UID_LABEL: kopf.PRESENT})
async def worker_pod_event(labels: kopf.Labels, memo: kopf.Memo, jobs_by_uid: kopf.Index, **_: Any) -> None:
    uid = labels[JOB_UID_LABEL]
    for namespace, name in jobs_by_uid.get(uid, []):  # none: the pod of a job that is gone
        memo.queue.add(JobKey(namespace, name, uid), "pod_event", after=POD_EVENT_BATCH_SECONDS)


def _without_managed_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    job = _plain(body)
    job.get("metadata", {}).pop("managedFields", None)
    return job


def next_pass(status: Mapping[str, Any], ttl: bool, running: int = 0) -> float | None:
    """Seconds until a job is due again by time alone: unfinished jobs tick, running ones
    faster (their progress; ``running`` jobs in all share PROGRESS_PASSES_PER_SECOND); a
    finished one only while its TTL runs."""
    phase = status.get("phase")
    if phase in SCRAPED_PHASES:
        return min(PROGRESS_SECONDS_CAP, max(PROGRESS_SECONDS, running / PROGRESS_PASSES_PER_SECOND))
    if phase not in FINAL_PHASES or ttl:
        return TICK_SECONDS
    return None


def _running_jobs(memo: kopf.Memo) -> int:
    """How many jobs are Running or Publishing, as the watch last said; counted at most once a
    second (every pass asks)."""
    now = time.monotonic()
    counted_at, running = memo.get("running_jobs", (-1.0, 0))
    if now - counted_at >= 1.0:
        running = sum(seen.phase in SCRAPED_PHASES for seen in memo.jobs.values())
        memo.running_jobs = (now, running)
    return running


async def _work(memo: kopf.Memo) -> None:
    """One worker: reconcile the next due job, queue its next pass, repeat."""
    logger = logging.getLogger("kubetune.operator")
    while True:
        await memo.leading.wait()  # a standby keeps its queue, and acts once it leads
        key, reason = await memo.queue.get()
        seen = memo.jobs.get(key.uid)
        if seen is None:
            continue  # deleted since it was queued
        if not memo.acting():  # the Lease may have passed to another replica meanwhile
            memo.queue.add(key, reason, after=WAIT_RETRY_SECONDS)
            await asyncio.sleep(WAIT_RETRY_SECONDS)
            continue
        try:
            synced = await _pass(key, reason, seen, memo, logger)
        except NotActing:
            memo.queue.add(key, reason, after=WAIT_RETRY_SECONDS)  # for when it leads again, if ever
            continue
        except Exception as error:  # noqa: BLE001 - the API is unwell: retry this job later, go on with others
            failures = memo.failures[key] = memo.failures.get(key, 0) + 1
            delay = min(ERROR_BACKOFF_CAP_SECONDS, ERROR_BACKOFF_SECONDS * 2 ** (failures - 1))
            logger.warning("reconciling %s/%s failed (retry in %.0fs): %s", key.namespace, key.name, delay,
                           error if isinstance(error, ApiException) else repr(error))
            memo.queue.add(key, reason, after=delay)
            continue
        memo.failures.pop(key, None)
        if synced is None:
            continue  # gone, or re-created under a new UID: its own events queue it
        if synced.blocked:
            memo.queue.add(key, reason, after=WAIT_RETRY_SECONDS)
        after = next_pass(synced.status, seen.ttl, _running_jobs(memo))
        if synced.moved and after is not None:
            after = POD_EVENT_BATCH_SECONDS
        if after is not None:
            memo.queue.add(key, "tick", after=after)


async def _pass(key: JobKey, reason: str, seen: Seen, memo: kopf.Memo, logger: logging.Logger) -> Synced | None:
    """One reconcile pass of a job, with a fresh scrape of its progress while it runs."""
    metrics_text = None
    if seen.phase in SCRAPED_PHASES:
        metrics_text = await _scrape(JobRef(name=key.name, namespace=key.namespace, uid=key.uid),
                                     _pods(memo.indexes["pods_by_job"], key.uid),
                                     seen.attempt, memo, logger)
    return await _sync(reason, key.namespace, key.name, key.uid, memo.indexes["pods_by_job"], memo, logger,
                       metrics_text=metrics_text, from_cache=True)


def _pods(index: Mapping[str, Any], uid: str) -> list[dict[str, Any]]:
    return list(index.get(uid, []))


# -- carrying out ------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _counted(memo: kopf.Memo, handler: str) -> AsyncIterator[None]:
    memo.metrics.reconciles.labels(handler=handler).inc()
    started = time.monotonic()
    try:
        yield
    except NotActing:
        raise  # standing down, not failing
    except Exception:
        memo.metrics.reconcile_errors.labels(handler=handler).inc()
        raise
    finally:
        memo.metrics.reconcile_seconds.labels(handler=handler).observe(time.monotonic() - started)


@dataclass(frozen=True)
class Synced:
    """A pass's end: the job's status now, and what it waits for (a name, a permission)."""

    status: Mapping[str, Any]
    blocked: str | None = None
    moved: bool = False
    """The phase changed: the next may be due already (the pods ran on while the operator was
    away, and their events came before it knew the job)."""


async def _sync(handler: str, namespace: str, name: str, uid: str, pods_by_job: Mapping[str, Any],
                memo: kopf.Memo, logger: logging.Logger | kopf.Logger, metrics_text: str | None = None,
                from_cache: bool = False) -> Synced | None:
    """Reconcile the job (``from_cache``: as the watch last delivered it, else read afresh) with its pods
    (and fresh progress), carry the outcome out. The pods are read from the index under the
    job's lock, after the job: a snapshot taken before (while another pass held the lock) could
    show a pod Running that has failed since, and a finished job would delete it as a survivor.
    None: the job is gone."""
    async with _counted(memo, handler), memo.locks.setdefault(uid, asyncio.Lock()):
        for fresh in (False, True):
            seen = memo.get("jobs", {}).get(uid)
            body = seen.fresh_body() if from_cache and not fresh and seen is not None else None
            if body is None:
                body = await asyncio.to_thread(memo.kube.get_job, namespace, name)
            if body is None or body["metadata"]["uid"] != uid or body["metadata"].get("deletionTimestamp"):
                return None  # the job is gone or going (or re-created: its own events queue it)
            stored = Job.of(body)
            job = _with_progress(stored, metrics_text, memo, logger)
            now = _now()
            outcome = reconcile(job, _pods(pods_by_job, uid), memo.settings, now)
            if outcome.probe:
                probes = await _probe_workers(job, _pods(pods_by_job, uid), memo, logger)
                outcome = reconcile(job, _pods(pods_by_job, uid), memo.settings, now, probes)
            if outcome.status is None and job.status != stored.status:
                outcome = Outcome(dict(job.status), outcome.actions, outcome.blocked)  # only the progress moved
            try:
                instead = await _carry_out(stored, outcome, memo, logger)
            except Conflict:
                if fresh:
                    raise
                continue  # decided on a job that has changed since: decide again, from a fresh read
            final = instead or outcome
            status = final.status if final.status is not None else stored.status
            return Synced(status, final.blocked, moved=status.get("phase") != stored.status.get("phase"))
        raise AssertionError("unreachable")


async def _carry_out(job: Job, outcome: Outcome, memo: kopf.Memo, logger: kopf.Logger) -> Outcome | None:
    """Carry out the actions in order, write the status, then post the Events. A run of
    creations (a gang's pods) or of deletions goes out at once: a gang of 8 is one round trip,
    not 8. When a creation cannot be done (a name held by another object, a refusal), the
    outcome put in its place is carried out and returned.

    Every write is fenced against a decision made on a stale read: creations by name, deletions
    by UID, the status by the resourceVersion the decision read (a ``Conflict`` when the job has
    changed since: another writer, or a replica that took over). The Events come last, so that
    a decision that is refused posts none."""
    events: list[Event] = []
    for _, group in itertools.groupby(outcome.actions, key=_batch):
        actions = list(group)
        if isinstance(actions[0], Create):
            results = await _all(_create(job, action.child, memo) for action in actions)
            instead = next((result for result in results if result is not None), None)
            if instead is not None:
                await _carry_out(job, instead, memo, logger)
                return instead
        elif isinstance(actions[0], Delete):
            for action in actions:
                logger.info("deleting pod %s/%s: %s", job.ref.namespace, action.name, action.why)
            _acting(memo)
            await _all(asyncio.to_thread(memo.kube.delete_pod, job.ref.namespace, action.name, action.uid)
                       for action in actions)
        else:
            for action in actions:
                if isinstance(action, LogTail):
                    await _post_log_tail(job, action.name, memo, logger)
                elif isinstance(action, DeleteJob):
                    logger.info("deleting job %s/%s: spec.runPolicy.ttlSecondsAfterFinished passed",
                                job.ref.namespace, job.ref.name)
                    _acting(memo)
                    await asyncio.to_thread(memo.kube.delete_job, job.ref.namespace, job.ref.name, job.ref.uid)
                elif isinstance(action, Event):
                    events.append(action)
    patch = status_patch(dict(job.status), outcome.status) if outcome.status is not None else {}
    if patch:
        _acting(memo)
        try:
            written = await asyncio.to_thread(memo.kube.patch_job_status, job.ref.namespace, job.ref.name, patch,
                                              job.resource_version)
        except ApiException as error:
            if error.status == 409:
                raise Conflict from None
            raise
        seen = memo.get("jobs", {}).get(job.ref.uid)
        # Unless the watch has delivered it already (while the response was on its way).
        if seen is not None and written and (seen.body or {}).get("metadata", {}).get("resourceVersion") != written:
            seen.unobserved_write = written
        if outcome.status["phase"] != job.status.get("phase"):
            logger.info("job %s/%s is %s: %s", job.ref.namespace, job.ref.name, outcome.status["phase"],
                        outcome.status["message"])
    for event in events:
        await _post(job, event, memo, logger)
    return None


def _batch(action: Any) -> str:
    """Actions that may go out together: the pods (after the Service: a rank that looked up worker
    0's name before it existed could be held up by a cached NXDOMAIN); deletions. Anything else
    alone, in order."""
    if isinstance(action, Create):
        return "create pods" if action.child["kind"] == "Pod" else "create others"
    return "delete" if isinstance(action, Delete) else f"one {id(action)}"


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await all at once; every call ends before the first error (if any) is raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


async def _create(job: Job, child: dict[str, Any], memo: kopf.Memo) -> Outcome | None:
    """Create one child. None when it exists now as this job's; else what the job does instead."""
    _acting(memo)
    try:
        await asyncio.to_thread(memo.kube.create, child)
    except ApiException as error:
        if error.status == 409:
            meta = child["metadata"]
            holder = await asyncio.to_thread(memo.kube.read, child["kind"], meta["namespace"], meta["name"])
            if holder is None:  # deleted meanwhile: the next pass creates it
                return Outcome(None, (), blocked=f"{child['kind']} {meta['name']} was deleted meanwhile")
            if owned_by(holder, job.ref.uid) and not holder["metadata"].get("deletionTimestamp"):
                return None  # ours already: created by an earlier pass
            return waiting(job, child, holder, _now())
        if error.status == 403:
            return forbidden(job, child, _api_message(error), _now())
        if 400 <= error.status < 500 and error.status not in RETRIABLE_STATUSES:
            return creation_failed(job, child, _api_message(error), _now())
        raise  # the API is unwell: the worker retries the job with a back-off
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
    _acting(memo)
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
    url = _metrics_urls(job, pods, attempt).get(0)
    if url is None:
        return None  # worker-0 has no IP yet, or no metrics port to scrape
    return await _get_metrics(url, memo, logger)


def _metrics_urls(job: JobRef, pods: list[dict[str, Any]], attempt: int | None) -> dict[int, str]:
    """Replica index -> where that worker of ``attempt`` serves /metrics (once it has an IP)."""
    urls = {}
    for pod in ours(job, pods):
        labels = pod["metadata"].get("labels", {})
        url = metrics_url(pod)
        if labels.get(ATTEMPT_LABEL) == str(attempt) and labels.get(REPLICA_INDEX_LABEL, "").isdigit() and url:
            urls[int(labels[REPLICA_INDEX_LABEL])] = url
    return urls


async def _get_metrics(url: str, memo: kopf.Memo, logger: kopf.Logger) -> str | None:
    try:
        async with memo.http.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)) as answer:
            return await answer.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError) as error:
        memo.metrics.scrape_failures.inc()
        logger.debug("scrape of %s failed: %s", url, error)
        return None


async def _probe_workers(job: Job, pods: list[dict[str, Any]], memo: kopf.Memo,
                         logger: kopf.Logger) -> dict[int, int | None]:
    """The steps each worker of the running attempt has begun, asked of all at once (a stalled
    job's pass only); None for one that does not answer. A worker with no address or port to
    ask is left out: nothing can be said of it."""
    urls = _metrics_urls(job.ref, pods, (job.status.get("launched") or {}).get("attempt"))
    texts = await asyncio.gather(*(_get_metrics(url, memo, logger) for url in urls.values()))
    probes: dict[int, int | None] = {}
    for index, text in zip(urls, texts):
        begun = steps_begun(text) if text is not None else None
        if text is None or begun is not None:  # answered without the series (an older trainer): no word
            probes[index] = begun
    return probes


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
    return Job(ref=job.ref, generation=job.generation, spec=job.spec, status={**job.status, "progress": progress},
               resource_version=job.resource_version)

"""The handlers' glue against an in-memory stand-in for the API (no kopf reactor, no server):
how they carry out the reconciler's decisions, when a name is taken, refused, or the API fails,
and how a scrape of rank 0's metrics reaches status.progress. The real API is in
test_operator_on_cluster.py; the decisions are in test_reconcile.py."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
from typing import Any

import aiohttp
import kopf
import pytest
from crd_tools import minimal_spec
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from kubetune.operator import handlers
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.settings import OperatorSettings
from kubetune.trainer.metrics import TrainMetrics

LOG = logging.getLogger("test")
UID = "u-1"


class FakeKube:
    """Objects by (kind, name); every call answers as the API would."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job: dict[str, Any] | None = job
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.status_patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.refuse: dict[str, tuple[int, str]] = {}  # kind -> (status, message)
        self.deleted: list[str] = []
        self.logs: dict[str, str] = {}
        self.reads = 0

    def create(self, obj: dict[str, Any]) -> None:
        key = (obj["kind"], obj["metadata"]["name"])
        if obj["kind"] in self.refuse:
            status, message = self.refuse[obj["kind"]]
            error = ApiException(status=status, reason="Refused")
            error.body = json.dumps({"message": message})
            raise error
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[key] = copy.deepcopy(obj)

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, name)))

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return copy.deepcopy(self.job)

    def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any],
                         resource_version: str | None = None) -> str:
        assert self.job is not None
        if resource_version is not None and resource_version != self.job["metadata"].get("resourceVersion", "1"):
            raise ApiException(status=409, reason="Conflict")
        self.status_patches.append(copy.deepcopy(patch))
        self.job["status"] = merge(self.job.get("status") or {}, patch)
        version = self.job["metadata"]["resourceVersion"] = str(int(self.job["metadata"].get("resourceVersion", 1)) + 1)
        return version

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        pod = self.objects.get(("Pod", name))
        if pod is not None and pod["metadata"].get("uid", uid) == uid:
            del self.objects[("Pod", name)]
            self.deleted.append(name)

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        self.job = None

    def pod_log_tail(self, namespace: str, name: str, lines: int) -> str | None:
        return self.logs.get(name)

    def post_event(self, job: Any, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def pods(self) -> list[dict[str, Any]]:
        return [obj for (kind, _), obj in self.objects.items() if kind == "Pod"]

    def set_pod(self, index: int, phase: str, exit_code: int | None = None, ip: str | None = None) -> None:
        pod = self.objects[("Pod", "quickstart-preflight" if index < 0 else f"quickstart-worker-{index}")]
        pod["status"] = {"phase": phase}
        if exit_code is not None:
            pod["status"]["containerStatuses"] = [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]
        if ip:
            pod["status"]["podIP"] = ip


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a merge patch."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def make_job() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "quickstart", "namespace": "default", "uid": UID, "generation": 1,
                     "resourceVersion": "1"},
        "spec": minimal_spec(workers={"replicas": 2}, storage={"credentialsSecret": "s3-credentials"}),
    }


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube(make_job())


def memo_for(kube: FakeKube, settings: OperatorSettings | None = None) -> kopf.Memo:
    return kopf.Memo(kube=kube, settings=settings or OperatorSettings(), metrics=OperatorMetrics(), locks={})


def sync(memo: kopf.Memo, handler: str = "pod_event") -> handlers.Synced | None:
    pods = {UID: memo.kube.pods()}
    return asyncio.run(handlers._sync(handler, "default", "quickstart", UID, pods, memo, LOG))


def launch(memo: kopf.Memo) -> None:
    """Through the preflight to the gang's creation."""
    sync(memo, "create")
    memo.kube.set_pod(-1, "Succeeded", exit_code=0)
    sync(memo)


def test_first_passes_validate_then_create_the_gang_and_post_each_step(kube: FakeKube) -> None:
    memo = memo_for(kube)
    sync(memo, "create")
    assert sorted(kube.objects) == [("Pod", "quickstart-preflight")]
    assert kube.job["status"]["phase"] == "Validating"
    kube.set_pod(-1, "Succeeded", exit_code=0)
    sync(memo)
    assert sorted(kube.objects) == [("Pod", "quickstart-preflight"), ("Pod", "quickstart-worker-0"), ("Pod", "quickstart-worker-1"),
                                    ("Service", "quickstart-workers")]
    assert kube.job["status"]["phase"] == "Pending" and kube.job["status"]["launched"]["replicas"] == 2
    assert [reason for _, reason, _ in kube.events] == ["Validating", "Created"]
    assert memo.metrics.registry.get_sample_value("kubetune_operator_pods_created_total") == 3


def test_a_second_pass_after_a_crash_finds_its_own_children_and_goes_on(kube: FakeKube) -> None:
    memo = memo_for(kube)
    launch(memo)
    kube.job["status"] = {"phase": "Validating"}  # the pass created the gang, then died before writing status
    sync(memo, "resume")
    assert len(kube.objects) == 4 and kube.job["status"]["phase"] == "Pending"


def test_a_restart_deletes_the_old_gang_and_clears_what_no_longer_holds(kube: FakeKube) -> None:
    memo = memo_for(kube)
    launch(memo)
    for index in (0, 1):
        kube.set_pod(index, "Running")
    sync(memo)
    kube.logs["quickstart-worker-1"] = "x" * 2000 + "\nRuntimeError: NCCL timeout"
    kube.set_pod(1, "Failed", exit_code=1)
    sync(memo)
    # Deleted at once, each in a thread of its own: in either order.
    assert kube.job["status"]["phase"] == "Restarting" and sorted(kube.deleted) == ["quickstart-worker-0",
                                                                                   "quickstart-worker-1"]
    # Before the pods go, the failed one's last lines become an Event.
    (log_event,) = [event for event in kube.events if event[1] == "WorkerLog"]
    assert log_event[0] == "Warning" and log_event[2].startswith("last lines of pod quickstart-worker-1:\n")
    assert log_event[2].endswith("RuntimeError: NCCL timeout") and len(log_event[2]) < 1024
    assert "nextAttemptTime" in kube.job["status"]
    kube.job["status"]["nextAttemptTime"] = "2000-01-01T00:00:00Z"  # the back-off has passed
    sync(memo, "tick")
    status = kube.job["status"]
    assert status["phase"] == "Pending" and status["launched"]["attempt"] == 2
    assert "nextAttemptTime" not in status and "runningTime" not in status["launched"]  # removed by the patch
    assert kube.status_patches[-1]["nextAttemptTime"] is None


def test_a_name_held_by_an_earlier_jobs_pod_is_waited_for_then_taken(kube: FakeKube) -> None:
    memo = memo_for(kube)
    kube.objects[("Pod", "quickstart-worker-1")] = {"kind": "Pod", "metadata": {
        "name": "quickstart-worker-1", "deletionTimestamp": "2026-01-01T00:00:00Z",
        "ownerReferences": [{"uid": "old", "controller": True}]}}
    sync(memo, "create")
    kube.set_pod(-1, "Succeeded", exit_code=0)
    synced = sync(memo, "resume")
    assert "waiting for Pod quickstart-worker-1 of FineTuneJob uid old" in synced.blocked  # retried soon
    assert kube.job["status"]["phase"] == "Validating" and "waiting for Pod" in kube.job["status"]["message"]
    assert "launched" not in kube.job["status"]

    del kube.objects[("Pod", "quickstart-worker-1")]  # the old pod is gone at last
    sync(memo, "resume")
    workers = [pod for pod in kube.pods() if pod["metadata"]["name"] != "quickstart-preflight"]
    owners = {pod["metadata"]["ownerReferences"][0]["uid"] for pod in workers}
    assert owners == {UID} and len(workers) == 2


def test_a_child_the_api_refuses_fails_the_job_without_retrying(kube: FakeKube) -> None:
    memo = memo_for(kube)
    kube.refuse["Service"] = (422, 'Service "quickstart-workers" is invalid: spec.ports[0].port: Invalid value')
    sync(memo, "create")
    kube.set_pod(-1, "Succeeded", exit_code=0)
    assert sync(memo, "resume").blocked is None  # not retried: a retry would be refused the same way
    assert kube.job["status"]["phase"] == "Failed"
    assert kube.events[-1][:2] == ("Warning", "ChildRefused")
    assert "spec.ports[0].port: Invalid value" in kube.job["status"]["message"]
    assert [pod["metadata"]["name"] for pod in kube.pods()] == ["quickstart-preflight"]  # no worker after it


def test_a_permission_the_operator_lacks_is_reported_and_waited_for_not_failed(kube: FakeKube) -> None:
    memo = memo_for(kube)
    forbidden = ('pods "quickstart-preflight" is forbidden: User "system:serviceaccount:kubetune-system:kubetune" '
                 'cannot create resource "pods" in API group "" in the namespace "default"')
    kube.refuse["Pod"] = (403, forbidden)
    for _ in range(3):
        assert "the operator may not create Pod quickstart-preflight" in sync(memo, "create").blocked
        sync(memo, "tick")  # the tick retries as well, quietly
    status = kube.job["status"]
    assert status["phase"] == "Validating" and forbidden in status["message"]
    assert "grant its service account this permission" in status["message"]
    assert [event[:2] for event in kube.events].count(("Warning", "Forbidden")) == 1  # told once, not per retry

    del kube.refuse["Pod"]  # the permission is granted: the job goes on by itself
    sync(memo, "tick")
    assert [pod["metadata"]["name"] for pod in kube.pods()] == ["quickstart-preflight"]
    assert "forbidden" not in kube.job["status"]["message"]


def test_an_unwell_api_is_raised_for_the_worker_to_retry_and_counted(kube: FakeKube) -> None:
    memo = memo_for(kube)
    kube.refuse["Pod"] = (500, "etcdserver: request timed out")
    with pytest.raises(ApiException):
        sync(memo, "create")
    registry = memo.metrics.registry
    assert registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"handler": "create"}) == 1
    assert "status" not in kube.job


def test_pod_events_drive_the_phase_and_a_gone_job_is_left_alone(kube: FakeKube) -> None:
    memo = memo_for(kube)
    launch(memo)
    kube.set_pod(0, "Running")
    kube.set_pod(1, "Running")
    sync(memo)
    sync(memo)
    assert kube.job["status"]["phase"] == "Running"
    assert [reason for _, reason, _ in kube.events] == ["Validating", "Created", "Running"]
    patches = len(kube.status_patches)
    kube.job = None
    sync(memo)
    assert len(kube.status_patches) == patches


def _serve_trainer_metrics(step: int, begun: int | None = None) -> int:
    metrics = TrainMetrics()
    metrics.total_steps.set(30)
    metrics.step.set(step)
    metrics.steps_begun.set(step + 1 if begun is None else begun)
    metrics.loss.set(1.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    return port


async def _scrape(memo: kopf.Memo) -> None:
    """A tick of a job that was Running when it was queued, as a worker makes it."""
    seen = handlers.Seen(generation=1, phase="Running", attempt=memo.kube.job["status"]["launched"]["attempt"],
                         ttl=False)
    memo.indexes = {"pods_by_job": {UID: memo.kube.pods()}}
    async with aiohttp.ClientSession(trust_env=False) as memo.http:
        await handlers._pass(handlers.JobKey("default", "quickstart", UID), "tick", seen, memo, LOG)


def _running(kube: FakeKube, settings: OperatorSettings) -> kopf.Memo:
    memo = memo_for(kube, settings)
    launch(memo)
    for index in (0, 1):
        kube.set_pod(index, "Running", ip="127.0.0.1")
    sync(memo)
    assert kube.job["status"]["phase"] == "Running"
    return memo


def test_the_scrape_of_rank_0_writes_only_the_progress(kube: FakeKube) -> None:
    memo = _running(kube, OperatorSettings(trainer_metrics_port=_serve_trainer_metrics(12)))
    asyncio.run(_scrape(memo))
    progress = kube.job["status"]["progress"]
    assert (progress["display"], progress["loss"]) == ("12/30", 1.5)
    assert kube.status_patches[-1] == {"progress": progress}  # the phase did not change: only the progress

    patches = len(kube.status_patches)
    asyncio.run(_scrape(memo))  # the same step: nothing to write
    sync(memo)  # a pod event keeps the progress
    assert len(kube.status_patches) == patches and kube.job["status"]["progress"] == progress


def test_failed_scrapes_are_counted_not_raised(kube: FakeKube) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    memo = _running(kube, OperatorSettings(trainer_metrics_port=closed))
    asyncio.run(_scrape(memo))
    assert memo.metrics.registry.get_sample_value("kubetune_operator_progress_scrape_failures_total") == 1
    assert "progress" not in kube.job["status"] and kube.job["status"]["phase"] == "Running"


def test_a_stalled_job_asks_every_worker_and_names_the_one_that_does_not_answer(kube: FakeKube) -> None:
    port = _serve_trainer_metrics(7, begun=8)  # worker 0 waits in step 8; worker 1 is silent
    memo = _running(kube, OperatorSettings(trainer_metrics_port=port))
    kube.set_pod(1, "Running", ip="127.0.0.2")  # nothing listens there
    kube.job["spec"]["runPolicy"] = {"stallTimeoutSeconds": 60}
    kube.job["status"]["launched"]["runningTime"] = "2026-01-01T12:00:00Z"
    kube.job["status"]["progress"] = {"step": 7, "totalSteps": 30, "display": "7/30",
                                      "stepTime": "2026-01-01T12:05:00.000000Z"}
    asyncio.run(_scrape(memo))
    status = kube.job["status"]
    assert status["phase"] == "Restarting" and status["lastFailure"]["pod"] == "quickstart-worker-1"
    assert status["lastFailure"]["message"].endswith(
        "quickstart-worker-1 did not answer on its metrics port (stopped or hung)"), status["lastFailure"]


def test_a_job_that_finished_while_scraped_is_not_written(kube: FakeKube) -> None:
    memo = _running(kube, OperatorSettings(trainer_metrics_port=_serve_trainer_metrics(29)))
    kube.job["status"]["phase"] = "Succeeded"
    patches = len(kube.status_patches)
    asyncio.run(_scrape(memo))
    assert len(kube.status_patches) == patches


def test_job_events_keep_the_jobs_by_phase_gauge_queue_new_and_changed_jobs_and_forget_deleted_ones() -> None:
    async def events() -> kopf.Memo:
        memo = kopf.Memo(metrics=OperatorMetrics(), locks={"a-uid": asyncio.Lock()}, jobs={}, failures={},
                         queue=handlers.WorkQueue(), indexes={})
        for kind, name, uid, phase, generation in (
                (None, "a", "a-uid", None, 1), ("ADDED", "b", "b-uid", "Running", 1),
                ("MODIFIED", "b", "b-uid", "Running", 1), ("DELETED", "a", "a-uid", None, 1),
                ("MODIFIED", "b", "b-uid", "Suspended", 2)):
            await handlers.finetunejob_event(type=kind, body={"metadata": {"name": name}}, namespace="default",
                                             name=name, uid=uid, spec={},
                                             status={"phase": phase} if phase else {},
                                             meta={"generation": generation}, memo=memo, pods_by_job={})
            if kind in (None, "ADDED"):  # found at start-up, created
                assert await memo.queue.get() == (handlers.JobKey("default", name, uid),
                                                  "resume" if kind is None else "create")
        return memo

    memo = asyncio.run(events())
    registry = memo.metrics.registry
    assert registry.get_sample_value("kubetune_operator_jobs", {"phase": "Suspended"}) == 1
    assert registry.get_sample_value("kubetune_operator_jobs", {"phase": "Running"}) == 0
    assert memo.locks == {} and set(memo.jobs) == {"b-uid"}
    # Our own status write (same generation) queued nothing; the spec change (generation 2) did.
    assert list(memo.queue._due.items()) == [(handlers.JobKey("default", "b", "b-uid"), (pytest.approx(
        memo.queue._due[handlers.JobKey("default", "b", "b-uid")][0]), "update"))]


def test_passes_read_the_watched_job_but_never_one_older_than_their_own_last_write(kube: FakeKube) -> None:
    memo = memo_for(kube)
    memo.update(jobs={}, indexes={}, failures={}, queue=handlers.WorkQueue())
    key = handlers.JobKey("default", "quickstart", UID)

    async def deliver() -> None:  # the watch delivers the job as it is now
        job = copy.deepcopy(kube.job)
        await handlers.finetunejob_event(type="MODIFIED", body=job, namespace="default", name="quickstart", uid=UID,
                                         spec=job["spec"], status=job.get("status", {}), meta=job["metadata"],
                                         memo=memo, pods_by_job={UID: kube.pods()})

    async def scenario() -> None:
        await deliver()
        await handlers._pass(key, "create", memo.jobs[UID], memo, LOG)
        assert kube.reads == 0 and kube.job["status"]["phase"] == "Validating"  # read from the watch's copy
        kube.set_pod(-1, "Succeeded", exit_code=0)
        memo.indexes["pods_by_job"] = {UID: kube.pods()}  # as kopf's index follows the pods
        await handlers._pass(key, "pod_event", memo.jobs[UID], memo, LOG)
        assert kube.reads == 1  # its write is not delivered yet: read afresh, and it launches
        assert kube.job["status"]["phase"] == "Pending"
        await deliver()  # an event older than that write (or the write itself) decides when the cache is good
        await handlers._pass(key, "tick", memo.jobs[UID], memo, LOG)
        assert kube.reads == 1
        assert [pod["metadata"]["name"] for pod in kube.pods()].count("quickstart-worker-0") == 1

    asyncio.run(scenario())


def test_a_decision_on_a_job_changed_since_is_made_again_from_a_fresh_read(kube: FakeKube) -> None:
    """Status writes are fenced by resourceVersion: a pass that read a stale copy (the watch
    behind, or a replica that took over meanwhile) writes nothing and posts no Event from it."""
    memo = memo_for(kube)
    memo.update(jobs={}, indexes={"pods_by_job": {UID: []}})
    stale = copy.deepcopy(kube.job)
    kube.job["status"] = {"phase": "Validating", "message": "written by another replica"}
    kube.job["metadata"]["resourceVersion"] = "2"
    memo.jobs[UID] = handlers.Seen(1, None, None, False, body=stale)
    asyncio.run(handlers._pass(handlers.JobKey("default", "quickstart", UID), "create", memo.jobs[UID], memo, LOG))
    assert kube.reads == 1  # the stale decision was refused; the second came from a fresh read
    assert [reason for _, reason, _ in kube.events] == []  # ...which saw Validating already: nothing new to say
    assert len(kube.status_patches) == 1 and kube.job["status"]["phase"] == "Validating"


def test_handlers_do_not_log_every_success() -> None:
    def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)

    assert not handlers._quiet_handlers(record("Handler 'worker_pod_event' succeeded."))
    assert handlers._quiet_handlers(record("Handler 'worker_pod_event' failed", logging.ERROR))
    assert handlers._quiet_handlers(record("job default/a is Running: all 2 workers run"))


def test_a_status_patch_names_what_changed_and_removes_what_no_longer_holds() -> None:
    from kubetune.operator.kube import status_patch

    old = {"phase": "Restarting", "nextAttemptTime": "t", "launched": {"attempt": 1, "runningTime": "r"},
           "conditions": [{"type": "Ready"}]}
    new = {"phase": "Pending", "launched": {"attempt": 2}, "conditions": [{"type": "Ready"}]}
    patch = status_patch(old, new)
    assert patch == {"phase": "Pending", "nextAttemptTime": None, "launched": {"attempt": 2, "runningTime": None}}
    assert merge(old, patch) == new


def test_a_standby_replica_exports_no_job_series_until_it_takes_over() -> None:
    async def scenario() -> kopf.Memo:
        memo = kopf.Memo(metrics=OperatorMetrics(), locks={}, jobs={}, failures={}, queue=handlers.WorkQueue(),
                         indexes={}, leading=asyncio.Event())
        body = {"metadata": {"name": "a", "namespace": "default", "uid": "a-uid", "generation": 1},
                "status": {"phase": "Running", "restarts": 2}}
        await handlers.finetunejob_event(type=None, body=body, namespace="default", name="a", uid="a-uid", spec={},
                                         status=body["status"], meta=body["metadata"], memo=memo, pods_by_job={})
        return memo

    memo = asyncio.run(scenario())
    registry = memo.metrics.registry
    labels = {"namespace": "default", "finetunejob": "a"}
    assert registry.get_sample_value("kubetune_job_restarts", labels) is None
    memo.leading.set()
    handlers._export_jobs(memo)  # what taking the Lease does
    assert registry.get_sample_value("kubetune_job_restarts", labels) == 2


def test_the_pod_index_keeps_what_the_reconciler_and_the_scrape_read_and_no_more() -> None:
    from kubetune.operator.pods import observe_pod
    from kubetune.operator.progress import metrics_url

    terminated = {"exitCode": 1, "reason": "Error", "message": "boom", "finishedAt": "2026-01-01T12:00:09Z"}
    pod = {"metadata": {"name": "quickstart-worker-0", "uid": "p-1", "labels": {"kubetune.dev/replica-index": "0"},
                        "creationTimestamp": "2026-01-01T12:00:00Z", "resourceVersion": "7",
                        "annotations": {"kubetune.dev/trainer-config": "{" + "x" * 2000 + "}"},
                        "ownerReferences": [{"uid": UID, "controller": True, "kind": "FineTuneJob", "name": "q"}],
                        "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
           "spec": {"containers": [{"name": "trainer", "image": "x", "env": [{"name": "A", "value": "1"}],
                                    "ports": [{"name": "metrics", "containerPort": 9090}]}],
                    "volumes": [{"name": "config"}], "affinity": {}},
           "status": {"phase": "Failed", "podIP": "10.0.0.7", "qosClass": "Burstable",
                      "conditions": [{"type": "Ready", "status": "True"},
                                     {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
                      "containerStatuses": [{"name": "trainer", "image": "x", "restartCount": 0,
                                             "state": {"terminated": terminated}}]}}
    kept = handlers.observed_pod(pod)
    assert set(kept["metadata"]) == {"name", "uid", "labels", "creationTimestamp", "ownerReferences"}
    assert set(kept["spec"]) == {"containers"} and set(kept["status"]) == {"phase", "podIP", "conditions",
                                                                         "containerStatuses"}
    assert len(json.dumps(kept)) < len(json.dumps(pod)) / 4
    assert kept["spec"]["containers"] == [{"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9090}]}]
    assert metrics_url(kept) == metrics_url(pod) == "http://10.0.0.7:9090/metrics"
    assert observe_pod(kept) == observe_pod(pod)


def test_running_jobs_share_a_budget_of_progress_passes() -> None:
    running = {"phase": "Running"}
    assert handlers.next_pass(running, ttl=False, running=1) == handlers.PROGRESS_SECONDS
    assert handlers.next_pass(running, ttl=False, running=500) == 500 / handlers.PROGRESS_PASSES_PER_SECOND
    assert handlers.next_pass(running, ttl=False, running=5000) == handlers.PROGRESS_SECONDS_CAP
    assert handlers.next_pass({"phase": "Pending"}, ttl=False, running=5000) == handlers.TICK_SECONDS
    assert handlers.next_pass({"phase": "Succeeded"}, ttl=False) is None

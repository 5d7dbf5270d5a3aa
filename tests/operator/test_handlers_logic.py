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
        return copy.deepcopy(self.job)

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        assert self.job is not None
        self.status_patches.append(copy.deepcopy(status))
        # A merge patch: keys the patch leaves out keep their stored values.
        self.job["status"] = {**(self.job.get("status") or {}), **copy.deepcopy(status)}

    def post_event(self, job: Any, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def pods(self) -> list[dict[str, Any]]:
        return [obj for (kind, _), obj in self.objects.items() if kind == "Pod"]

    def set_pod(self, index: int, phase: str, exit_code: int | None = None, ip: str | None = None) -> None:
        pod = self.objects[("Pod", f"quickstart-worker-{index}")]
        pod["status"] = {"phase": phase}
        if exit_code is not None:
            pod["status"]["containerStatuses"] = [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]
        if ip:
            pod["status"]["podIP"] = ip


def make_job() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "quickstart", "namespace": "default", "uid": UID, "generation": 1},
        "spec": minimal_spec(workers={"replicas": 2}, storage={"credentialsSecret": "s3-credentials"}),
    }


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube(make_job())


def memo_for(kube: FakeKube, settings: OperatorSettings | None = None) -> kopf.Memo:
    return kopf.Memo(kube=kube, settings=settings or OperatorSettings(), metrics=OperatorMetrics(), locks={})


def sync(memo: kopf.Memo, handler: str = "pod_event", retry: bool = False) -> None:
    pods = {UID: memo.kube.pods()}
    asyncio.run(handlers._sync(handler, "default", "quickstart", UID, pods[UID], memo, LOG, retry=retry))


def test_first_pass_creates_children_writes_pending_and_posts_created(kube: FakeKube) -> None:
    memo = memo_for(kube)
    sync(memo, "create", retry=True)
    assert sorted(kube.objects) == [("ConfigMap", "quickstart-trainer-config"), ("Pod", "quickstart-worker-0"),
                                    ("Pod", "quickstart-worker-1"), ("Service", "quickstart-workers")]
    assert kube.job["status"]["phase"] == "Pending" and kube.job["status"]["launched"]["replicas"] == 2
    assert kube.events == [("Normal", "Created", "created config map, service and 2 worker pods")]
    assert memo.metrics.registry.get_sample_value("kubetune_operator_pods_created_total") == 2


def test_a_second_pass_after_a_crash_finds_its_own_children_and_goes_on(kube: FakeKube) -> None:
    memo = memo_for(kube)
    sync(memo, "create", retry=True)
    kube.job["status"] = {}  # the first pass created everything, then died before writing status
    sync(memo, "resume", retry=True)
    assert len(kube.objects) == 4 and kube.job["status"]["phase"] == "Pending"


def test_a_name_held_by_an_earlier_jobs_pod_is_waited_for_then_taken(kube: FakeKube) -> None:
    memo = memo_for(kube)
    kube.objects[("Pod", "quickstart-worker-1")] = {"kind": "Pod", "metadata": {
        "name": "quickstart-worker-1", "deletionTimestamp": "2026-01-01T00:00:00Z",
        "ownerReferences": [{"uid": "old", "controller": True}]}}
    with pytest.raises(kopf.TemporaryError, match="waiting for Pod quickstart-worker-1 of FineTuneJob uid old"):
        sync(memo, "create", retry=True)
    assert kube.job["status"]["phase"] == "Pending" and "waiting for Pod" in kube.job["status"]["message"]

    del kube.objects[("Pod", "quickstart-worker-1")]  # the old pod is gone at last
    sync(memo, "create", retry=True)
    owners = {pod["metadata"]["ownerReferences"][0]["uid"] for pod in kube.pods()}
    assert owners == {UID} and len(kube.pods()) == 2


def test_a_child_the_api_refuses_fails_the_job_without_retrying(kube: FakeKube) -> None:
    memo = memo_for(kube)
    kube.refuse["Service"] = (422, 'Service "quickstart-workers" is invalid: spec.ports[0].port: Invalid value')
    sync(memo, "create", retry=True)  # no TemporaryError: a retry would be refused the same way
    assert kube.job["status"]["phase"] == "Failed"
    assert kube.events[-1][:2] == ("Warning", "ChildRefused")
    assert "spec.ports[0].port: Invalid value" in kube.job["status"]["message"]
    assert kube.pods() == []  # nothing after the refused child


def test_an_unwell_api_is_raised_for_kopf_to_retry_and_counted(kube: FakeKube) -> None:
    memo = memo_for(kube)
    kube.refuse["ConfigMap"] = (500, "etcdserver: request timed out")
    with pytest.raises(ApiException):
        sync(memo, "create", retry=True)
    registry = memo.metrics.registry
    assert registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"handler": "create"}) == 1
    assert "status" not in kube.job


def test_pod_events_drive_the_phase_and_a_gone_job_is_left_alone(kube: FakeKube) -> None:
    memo = memo_for(kube)
    sync(memo, "create", retry=True)
    kube.set_pod(0, "Running")
    kube.set_pod(1, "Running")
    sync(memo)
    sync(memo)
    assert kube.job["status"]["phase"] == "Running"
    assert [reason for _, reason, _ in kube.events] == ["Created", "Running"]
    patches = len(kube.status_patches)
    kube.job = None
    sync(memo)
    assert len(kube.status_patches) == patches


def _serve_trainer_metrics(step: int) -> int:
    metrics = TrainMetrics()
    metrics.total_steps.set(30)
    metrics.step.set(step)
    metrics.loss.set(1.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    return port


async def _scrape(memo: kopf.Memo) -> None:
    async with aiohttp.ClientSession(trust_env=False) as memo.http:
        await handlers.finetunejob_progress(namespace="default", name="quickstart", uid=UID, memo=memo,
                                            pods_by_job={UID: memo.kube.pods()}, logger=LOG)


def _running(kube: FakeKube, settings: OperatorSettings) -> kopf.Memo:
    memo = memo_for(kube, settings)
    sync(memo, "create", retry=True)
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
    assert kube.status_patches[-1] == {"progress": progress}

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


def test_a_job_that_finished_while_scraped_is_not_written(kube: FakeKube) -> None:
    memo = _running(kube, OperatorSettings(trainer_metrics_port=_serve_trainer_metrics(29)))
    kube.job["status"]["phase"] = "Succeeded"
    patches = len(kube.status_patches)
    asyncio.run(_scrape(memo))
    assert len(kube.status_patches) == patches


def test_job_events_keep_the_jobs_by_phase_gauge_and_free_a_deleted_jobs_lock() -> None:
    memo = kopf.Memo(metrics=OperatorMetrics(), locks={"a-uid": asyncio.Lock()})
    for kind, name, uid, phase in ((None, "a", "a-uid", None), ("MODIFIED", "b", "b-uid", "Running"),
                                   ("DELETED", "a", "a-uid", None)):
        asyncio.run(handlers.finetunejob_event(type=kind, namespace="default", name=name, uid=uid,
                                               status={"phase": phase} if phase else {}, memo=memo))
    registry = memo.metrics.registry
    assert registry.get_sample_value("kubetune_operator_jobs", {"phase": "Running"}) == 1
    assert registry.get_sample_value("kubetune_operator_jobs", {"phase": "Pending"}) == 0
    assert memo.locks == {}


def test_timers_do_not_log_every_success() -> None:
    def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)

    assert not handlers._quiet_timers(record("Timer 'finetunejob_progress' succeeded."))
    assert handlers._quiet_timers(record("Handler 'finetunejob_create' succeeded."))
    assert handlers._quiet_timers(record("Timer 'finetunejob_progress' failed", logging.ERROR))

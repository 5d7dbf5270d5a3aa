"""Handler logic against an in-memory stand-in for the API (no kopf reactor, no server):
what gets created, what status is written, which events a user sees."""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf
import pytest
from crd_tools import minimal_spec
from kubetune.operator import handlers
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.settings import OperatorSettings

LOG = logging.getLogger("test")


class FakeKube:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.status_patches: list[dict[str, Any]] = []

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return False
        self.objects[key] = copy.deepcopy(obj)
        return True

    def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return [
            obj
            for (kind, _), obj in self.objects.items()
            if kind == "Pod" and all(obj["metadata"]["labels"].get(k) == v for k, v in labels.items())
        ]

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.job)

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.status_patches.append(status)
        # A merge patch: keys the patch leaves out keep their stored values.
        self.job["status"] = {**(self.job.get("status") or {}), **copy.deepcopy(status)}

    def set_pod_phase(self, index: int, phase: str, exit_code: int | None = None) -> None:
        pod = self.objects[("Pod", f"quickstart-worker-{index}")]
        pod["status"] = {"phase": phase}
        if exit_code is not None:
            pod["status"]["containerStatuses"] = [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}
            ]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    posted: list[tuple[str, str, str]] = []
    monkeypatch.setattr(kopf, "info", lambda body, *, reason, message="": posted.append(("Normal", reason, message)))
    monkeypatch.setattr(kopf, "warn", lambda body, *, reason, message="": posted.append(("Warning", reason, message)))
    return posted


def make_job(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "quickstart", "namespace": "default", "uid": "u-1", "generation": 1},
        "spec": spec,
    }


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    fake = FakeKube(make_job(minimal_spec(workers={"replicas": 2}, storage={"credentialsSecret": "s3-credentials"})))
    monkeypatch.setitem(handlers._state, "kube", fake)
    monkeypatch.setitem(handlers._state, "settings", OperatorSettings())
    monkeypatch.setitem(handlers._state, "metrics", OperatorMetrics())
    return fake


def start(kube: FakeKube) -> None:
    body = kopf.Body(copy.deepcopy(kube.job))
    handlers._start_job(body, body.spec, body.meta, LOG)


def test_create_makes_children_writes_pending_and_posts_created(kube: FakeKube, events) -> None:
    start(kube)
    assert sorted(kube.objects) == [
        ("ConfigMap", "quickstart-trainer-config"),
        ("Pod", "quickstart-worker-0"),
        ("Pod", "quickstart-worker-1"),
        ("Service", "quickstart-workers"),
    ]
    assert kube.job["status"]["phase"] == "Pending"
    assert events == [("Normal", "Created", "created config map, service and 2 worker pods")]


def test_resume_is_idempotent(kube: FakeKube, events) -> None:
    start(kube)
    start(kube)
    assert len(kube.objects) == 4
    assert len(kube.status_patches) == 1  # the second pass sees a phase and leaves status alone
    assert [reason for _, reason, _ in events] == ["Created"]


def test_invalid_spec_fails_the_job_with_a_warning(kube: FakeKube, events) -> None:
    kube.job["spec"]["training"] = {"microBatchSize": 4, "globalBatchSize": 6}
    with pytest.raises(kopf.PermanentError, match="globalBatchSize"):
        start(kube)
    assert kube.objects == {}
    assert kube.job["status"]["phase"] == "Failed"
    assert events[0][:2] == ("Warning", "InvalidSpec")


def test_pod_progress_drives_phase_and_one_event_per_transition(kube: FakeKube, events) -> None:
    start(kube)
    kube.set_pod_phase(0, "Running")
    handlers.refresh_job_status("default", "quickstart", LOG)
    assert kube.job["status"]["phase"] == "Pending"
    kube.set_pod_phase(1, "Running")
    handlers.refresh_job_status("default", "quickstart", LOG)
    handlers.refresh_job_status("default", "quickstart", LOG)  # a repeated event changes nothing
    kube.set_pod_phase(0, "Succeeded", 0)
    kube.set_pod_phase(1, "Succeeded", 0)
    handlers.refresh_job_status("default", "quickstart", LOG)
    assert kube.job["status"]["phase"] == "Succeeded"
    assert kube.job["status"]["adapter"] == {"uri": "s3://adapters/quickstart/"}
    assert events == [
        ("Normal", "Created", "created config map, service and 2 worker pods"),
        ("Normal", "Running", "all 2 workers running"),
        ("Normal", "Succeeded", "adapter published to s3://adapters/quickstart/"),
    ]


def test_failed_worker_fails_the_job_with_a_warning(kube: FakeKube, events) -> None:
    start(kube)
    kube.set_pod_phase(0, "Running")
    kube.set_pod_phase(1, "Failed", 2)
    handlers.refresh_job_status("default", "quickstart", LOG)
    assert kube.job["status"]["phase"] == "Failed"
    assert events[-1] == ("Warning", "Failed", "worker pod quickstart-worker-1 failed with exit code 2 (Error)")


def test_events_and_status_never_carry_secret_values(kube: FakeKube, events) -> None:
    start(kube)
    kube.set_pod_phase(1, "Failed", 1)
    handlers.refresh_job_status("default", "quickstart", LOG)
    text = repr(events) + repr(kube.status_patches)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "s3-credentials" not in text


def test_job_gone_means_nothing_to_update(kube: FakeKube, events) -> None:
    start(kube)
    kube.job = None
    kube.get_job = lambda namespace, name: None  # type: ignore[method-assign]
    handlers.refresh_job_status("default", "quickstart", LOG)
    assert len(kube.status_patches) == 1


def _running(kube: FakeKube) -> None:
    start(kube)
    for index in (0, 1):
        kube.set_pod_phase(index, "Running")
        kube.objects[("Pod", f"quickstart-worker-{index}")]["status"]["podIP"] = f"10.244.0.{index + 2}"
    handlers.refresh_job_status("default", "quickstart", LOG)
    assert kube.job["status"]["phase"] == "Running"


def _gauges(step: int, total: int = 30, loss: float = 1.5) -> str:
    return (f"kubetune_train_step {step}\nkubetune_train_total_steps {total}\nkubetune_train_loss {loss}\n"
            "kubetune_train_epoch 0.5\nkubetune_train_tokens_per_second 900\n")


def test_progress_scrape_writes_status_progress_from_worker_0(kube: FakeKube, events, monkeypatch) -> None:
    _running(kube)
    fetched: list[str] = []
    monkeypatch.setitem(handlers._state, "fetch", lambda url: fetched.append(url) or _gauges(12))
    handlers.scrape_progress("default", "quickstart", LOG)
    assert fetched == ["http://10.244.0.2:9400/metrics"]
    progress = kube.job["status"]["progress"]
    assert (progress["display"], progress["loss"]) == ("12/30", 1.5)
    assert kube.status_patches[-1] == {"progress": progress}  # only the progress is patched

    patches = len(kube.status_patches)
    handlers.scrape_progress("default", "quickstart", LOG)  # same step: nothing to write
    handlers.refresh_job_status("default", "quickstart", LOG)  # a pod event keeps the progress
    assert len(kube.status_patches) == patches
    assert kube.job["status"]["progress"] == progress


def test_failed_scrapes_are_counted_not_raised(kube: FakeKube, events, monkeypatch) -> None:
    _running(kube)

    def refuse(url: str) -> str:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setitem(handlers._state, "fetch", refuse)
    handlers.scrape_progress("default", "quickstart", LOG)
    monkeypatch.setitem(handlers._state, "fetch", lambda url: "<html>not metrics {{")
    handlers.scrape_progress("default", "quickstart", LOG)
    registry = handlers.metrics().registry
    assert registry.get_sample_value("kubetune_operator_progress_scrape_failures_total") == 2
    assert "progress" not in kube.job["status"] and kube.job["status"]["phase"] == "Running"


def test_scrape_of_a_job_that_finished_meanwhile_writes_nothing(kube: FakeKube, events, monkeypatch) -> None:
    _running(kube)
    kube.job["status"]["phase"] = "Succeeded"
    monkeypatch.setitem(handlers._state, "fetch", lambda url: _gauges(29))
    patches = len(kube.status_patches)
    handlers.scrape_progress("default", "quickstart", LOG)
    assert len(kube.status_patches) == patches


def test_handlers_count_reconciles_errors_and_pod_creations(kube: FakeKube, events) -> None:
    body = kopf.Body(copy.deepcopy(kube.job))
    handlers.finetunejob_create(body=body, spec=body.spec, meta=body.meta, logger=LOG)
    handlers.finetunejob_create(body=body, spec=body.spec, meta=body.meta, logger=LOG)  # children exist: no new pods
    handlers.worker_pod_event(namespace="default", labels={"kubetune.dev/job-name": "quickstart"}, logger=LOG)
    kube.get_job = lambda namespace, name: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(ZeroDivisionError):
        handlers.worker_pod_event(namespace="default", labels={"kubetune.dev/job-name": "quickstart"}, logger=LOG)
    registry = handlers.metrics().registry
    assert registry.get_sample_value("kubetune_operator_pods_created_total") == 2
    assert registry.get_sample_value("kubetune_operator_reconciles_total", {"handler": "create"}) == 2
    assert registry.get_sample_value("kubetune_operator_reconciles_total", {"handler": "pod_event"}) == 2
    assert registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"handler": "pod_event"}) == 1
    assert registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"handler": "create"}) is None


def test_job_events_keep_the_jobs_by_phase_gauge(kube: FakeKube) -> None:
    handlers.finetunejob_event(type=None, meta={"namespace": "default", "name": "a"}, status={})
    handlers.finetunejob_event(type="MODIFIED", meta={"namespace": "default", "name": "b"}, status={"phase": "Running"})
    handlers.finetunejob_event(type="DELETED", meta={"namespace": "default", "name": "a"}, status={})
    registry = handlers.metrics().registry
    assert registry.get_sample_value("kubetune_operator_jobs", {"phase": "Running"}) == 1
    assert registry.get_sample_value("kubetune_operator_jobs", {"phase": "Pending"}) == 0


def test_the_progress_timer_does_not_log_every_success() -> None:
    def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)

    assert not handlers._quiet_progress_timer(record("Timer 'finetunejob_progress' succeeded."))
    assert handlers._quiet_progress_timer(record("Handler 'finetunejob_create' succeeded."))
    assert handlers._quiet_progress_timer(record("Timer 'finetunejob_progress' failed", logging.ERROR))

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
        self.job["status"] = copy.deepcopy(status)

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

"""The pure reconciler, case by case: what it creates, which status it writes, which Events a
user sees, and which objects it refuses to count as the job's own."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from crd_tools import minimal_spec

from kubetune.api import JobRef
from kubetune.operator.reconcile import Create, Event, Job, creation_failed, reconcile, waiting
from kubetune.operator.settings import OperatorSettings

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()
UID = "u-1"


def job(status: dict | None = None, **spec: Any) -> Job:
    body = minimal_spec(workers={"replicas": 2}, storage={"credentialsSecret": "s3-credentials"})
    body.update(spec)
    return Job(JobRef(name="quickstart", namespace="default", uid=UID), 1, body, status or {})


def pod(index: int, phase: str, uid: str = UID, exit_code: int | None = None, terminating: bool = False) -> dict:
    meta: dict[str, Any] = {
        "name": f"quickstart-worker-{index}",
        "labels": {"kubetune.dev/replica-index": str(index), "kubetune.dev/job-uid": uid},
        "ownerReferences": [{"kind": "FineTuneJob", "name": "quickstart", "uid": uid, "controller": True}],
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": exit_code,
                                                                                      "reason": "Error"}}}]
    return {"metadata": meta, "status": status}


def launched() -> dict:
    """The status right after the first pass created the children."""
    status = reconcile(job(), [], SETTINGS, T0).status
    assert status is not None
    return status


def step(status: dict, pods: list[dict], now: datetime = T0, **spec: Any):
    outcome = reconcile(job(status, **spec), pods, SETTINGS, now)
    return outcome, (outcome.status if outcome.status is not None else status)


def test_first_pass_creates_every_child_records_the_launch_and_posts_created() -> None:
    outcome = reconcile(job(), [], SETTINGS, T0)

    created = [(a.child["kind"], a.child["metadata"]["name"]) for a in outcome.actions if isinstance(a, Create)]
    assert created == [("ConfigMap", "quickstart-trainer-config"), ("Service", "quickstart-workers"),
                       ("Pod", "quickstart-worker-0"), ("Pod", "quickstart-worker-1")]
    assert [a for a in outcome.actions if isinstance(a, Event)] == [
        Event("Normal", "Created", "created config map, service and 2 worker pods")]
    assert outcome.status["phase"] == "Pending"
    record = outcome.status["launched"]
    assert (record["replicas"], record["attempt"], record["adapterUri"]) == (2, 1, "s3://adapters/quickstart/")
    assert len(record["configHash"]) == 64


def test_phases_follow_the_pods_with_one_event_per_transition() -> None:
    status = launched()
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Pending")])
    assert status["phase"] == "Pending" and outcome.actions == ()
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")])
    assert status["phase"] == "Running" and outcome.actions == (Event("Normal", "Running", "all 2 workers running"),)
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")])
    assert outcome.status is None and outcome.actions == ()  # nothing new: nothing written, nothing posted
    outcome, status = step(status, [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)])
    assert status["phase"] == "Succeeded" and status["adapter"] == {"uri": "s3://adapters/quickstart/"}
    assert outcome.actions == (Event("Normal", "Succeeded", "adapter published to s3://adapters/quickstart/"),)


def test_a_failed_worker_fails_the_job_with_a_warning() -> None:
    _, status = step(launched(), [pod(0, "Running"), pod(1, "Running")])
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Failed", exit_code=2)])
    assert status["phase"] == "Failed"
    assert outcome.actions == (Event("Warning", "Failed", "worker pod quickstart-worker-1 failed with exit code 2 (Error)"),)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_is_history(phase: str) -> None:
    outcome = reconcile(job({"phase": phase}), [pod(0, "Running")], SETTINGS, T0)
    assert outcome.status is None and outcome.actions == ()


def test_an_earlier_jobs_pods_of_the_same_names_are_not_this_jobs() -> None:
    # Delete and re-apply: the old job's pods still terminate under the same names.
    old = [pod(0, "Running", uid="old"), pod(1, "Running", uid="old")]
    outcome, status = step(launched(), old)
    assert status["phase"] == "Pending" and status["workers"]["active"] == 0
    assert [a.child["metadata"]["name"] for a in outcome.actions if isinstance(a, Create)] == [
        "quickstart-worker-0", "quickstart-worker-1"]


def test_this_jobs_terminating_pods_do_not_count_either() -> None:
    outcome, status = step(launched(), [pod(0, "Running", terminating=True), pod(1, "Running")])
    assert status["phase"] == "Pending"
    assert [a.child["metadata"]["name"] for a in outcome.actions if isinstance(a, Create)] == ["quickstart-worker-0"]


def test_a_worker_vanishing_after_the_gang_ran_fails_the_job() -> None:
    _, status = step(launched(), [pod(0, "Running"), pod(1, "Running")])
    outcome, status = step(status, [pod(0, "Running")])
    assert status["phase"] == "Failed"
    assert status["message"] == "worker pod quickstart-worker-1 disappeared while the job was running"
    assert not any(isinstance(a, Create) for a in outcome.actions)


def test_status_comes_from_what_was_launched_not_the_live_spec() -> None:
    status = launched()
    # Even if the stored spec said otherwise, the job runs the gang it launched: two workers.
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")], workers={"replicas": 1})
    assert status["phase"] == "Running" and status["message"] == "all 2 workers running"
    assert not any(isinstance(a, Create) for a in outcome.actions)


def test_a_spec_the_api_server_could_not_check_fails_the_job_naming_the_field() -> None:
    outcome = reconcile(job(deepspeed={"config": {"optimizer": {"type": "SGD"}}}), [], SETTINGS, T0)
    assert outcome.status["phase"] == "Failed"
    assert "spec.deepspeed.config.optimizer is set by kubetune" in outcome.status["message"]
    assert [a.reason for a in outcome.actions] == ["InvalidSpec"]  # and nothing is created


def test_a_refused_child_fails_the_job_with_the_api_message() -> None:
    child = reconcile(job(), [], SETTINGS, T0).actions[0].child  # type: ignore[union-attr]
    outcome = creation_failed(job(), child, 'admission webhook "quota" denied the request', T0)
    assert outcome.status["phase"] == "Failed"
    assert outcome.status["message"] == (
        'the API server refused ConfigMap quickstart-trainer-config: admission webhook "quota" denied the request')
    assert outcome.actions == (Event("Warning", "ChildRefused", outcome.status["message"]),)


def test_a_name_held_by_an_earlier_job_is_waited_for() -> None:
    child = {"kind": "Pod", "metadata": {"name": "quickstart-worker-0"}}
    holder = pod(0, "Running", uid="old", terminating=True)
    outcome = waiting(job(launched()), child, holder, T0)
    assert outcome.status["phase"] == "Pending" and outcome.blocked == outcome.status["message"]
    assert outcome.status["message"] == (
        "waiting for Pod quickstart-worker-0 of FineTuneJob uid old, being deleted, to be gone before "
        "creating this job's own")
    again = waiting(job(outcome.status), child, holder, T0 + timedelta(seconds=2))
    assert again.status is None and again.blocked  # same wait: nothing to write, still blocked


def test_neither_status_nor_events_carry_secrets() -> None:
    _, status = step(launched(), [pod(0, "Running"), pod(1, "Failed", exit_code=1)])
    outcomes = [reconcile(job(copy.deepcopy(status)), [], SETTINGS, T0), reconcile(job(), [], SETTINGS, T0)]
    text = repr(status) + repr([o.actions for o in outcomes if o.actions and not isinstance(o.actions[0], Create)])
    assert "AWS_SECRET_ACCESS_KEY" not in text and "s3-credentials" not in text

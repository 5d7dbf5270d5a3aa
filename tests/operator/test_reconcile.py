"""The pure reconciler, branch by branch: what it creates and deletes, which status it writes,
which Events a user sees, and which objects it refuses to count as the job's own. Each test
drives a job through the passes a running operator makes, with pods as the API shows them."""

from __future__ import annotations

import dataclasses

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from crd_tools import minimal_spec

from kubetune.api import JobRef
from kubetune.api.termination import ExitCode, TerminationMessage
from kubetune.operator.reconcile import (
    Create, Delete, DeleteJob, Event, Job, LogTail, Outcome, creation_failed, reconcile, waiting,
)
from kubetune.operator.settings import OperatorSettings

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()
UID = "u-1"
ADAPTER = "s3://adapters/quickstart/"


def job(status: dict | None = None, run_policy: dict | None = None, **spec: Any) -> Job:
    body = minimal_spec(workers={"replicas": 2}, storage={"credentialsSecret": "s3-credentials"})
    if run_policy:
        body["runPolicy"] = run_policy
    body.update(spec)
    return Job(JobRef(name="quickstart", namespace="default", uid=UID), 1, body, status or {})


def pod(index: int, phase: str, *, attempt: int = 1, uid: str = UID, exit_code: int | None = None,
        message: str | None = None, terminating: bool = False, waiting: dict | None = None,
        finished: str | None = None, conditions: list | None = None) -> dict:
    name = "quickstart-preflight" if index < 0 else f"quickstart-worker-{index}"
    labels = {"kubetune.dev/job-uid": uid, "kubetune.dev/attempt": str(attempt),
              "app.kubernetes.io/component": "preflight" if index < 0 else "worker"}
    if index >= 0:
        labels["kubetune.dev/replica-index"] = str(index)
    meta: dict[str, Any] = {
        "name": name, "uid": f"{name}-{attempt}-{uid}", "labels": labels,
        "creationTimestamp": "2026-01-01T12:00:00Z",
        "ownerReferences": [{"kind": "FineTuneJob", "name": "quickstart", "uid": uid, "controller": True}],
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T12:00:30Z"
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
        if message is not None:
            terminated["message"] = message
        if finished:
            terminated["finishedAt"] = finished
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    if waiting:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    if conditions:
        status["conditions"] = conditions
    return {"metadata": meta, "status": status}


def preflight(phase: str, **kwargs: Any) -> dict:
    return pod(-1, phase, **kwargs)


def step(status: dict, pods: list[dict], now: datetime = T0, probes: dict | None = None,
         **spec: Any) -> tuple[Outcome, dict]:
    outcome = reconcile(job(status, **spec), pods, SETTINGS, now, probes)
    return outcome, (outcome.status if outcome.status is not None else status)


def creates(outcome: Outcome) -> list[tuple[str, str]]:
    return [(a.child["kind"], a.child["metadata"]["name"]) for a in outcome.actions if isinstance(a, Create)]


def deletes(outcome: Outcome) -> list[str]:
    return [a.name for a in outcome.actions if isinstance(a, Delete)]


def events(outcome: Outcome) -> list[tuple[str, str]]:
    return [(a.type, a.reason) for a in outcome.actions if isinstance(a, Event)]


def conditions(status: dict) -> dict[str, str]:
    return {c["type"]: f"{c['status']}/{c['reason']}" for c in status["conditions"]}


def launched(**spec: Any) -> dict:
    """The status right after the preflight passed and the gang of attempt 1 was created."""
    _, status = step({}, [], **spec)
    outcome, status = step(status, [preflight("Succeeded", exit_code=0)], **spec)
    assert status["phase"] == "Pending", status
    return status


def running(**spec: Any) -> dict:
    _, status = step(launched(**spec), [pod(0, "Running"), pod(1, "Running")], **spec)
    assert status["phase"] == "Running"
    return status


# -- validating -----------------------------------------------------------------------------------
def test_first_pass_runs_the_preflight_before_any_worker() -> None:
    outcome = reconcile(job(), [], SETTINGS, T0)
    assert creates(outcome) == [("Pod", "quickstart-preflight")]
    assert outcome.status["phase"] == "Validating" and "launched" not in outcome.status
    assert events(outcome) == [("Normal", "Validating")]
    assert conditions(outcome.status) == {"Ready": "False/Validating", "Reconciling": "True/Validating"}


def test_a_passed_preflight_creates_the_gang_and_records_the_launch() -> None:
    _, status = step({}, [])
    outcome, status = step(status, [preflight("Succeeded", exit_code=0)])
    assert creates(outcome) == [("Service", "quickstart-workers"), ("Pod", "quickstart-worker-0"),
                                ("Pod", "quickstart-worker-1")]
    workers = [a.child for a in outcome.actions if isinstance(a, Create) and a.child["kind"] == "Pod"]
    assert {w["metadata"]["labels"]["kubetune.dev/attempt"] for w in workers} == {"1"}
    assert events(outcome) == [("Normal", "Created")]
    record = status["launched"]
    assert (record["replicas"], record["attempt"], record["adapterUri"]) == (2, 1, ADAPTER)
    assert len(record["configHash"]) == 64 and record["createdTime"] == "2026-01-01T12:00:00Z"


def test_a_gang_writes_its_status_at_its_transitions_not_for_each_pod() -> None:
    """At a thousand jobs every status write counts: a gang starting, and finishing, one pod
    after another changes nothing a user reads until the phase changes."""
    status = launched()
    assert status["workers"] == {"active": 2, "succeeded": 0, "failed": 0}
    for pods in ([], [pod(0, "Pending")], [pod(0, "Pending"), pod(1, "Pending")], [pod(0, "Running"), pod(1, "Pending")]):
        outcome, _ = step(status, pods)
        assert outcome.status is None, pods
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")])
    assert status["phase"] == "Running" and outcome.status is not None
    outcome, _ = step(status, [pod(0, "Running"), pod(1, "Succeeded", exit_code=0)])
    assert outcome.status is None
    _, status = step(status, [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)])
    assert status["phase"] == "Succeeded" and status["workers"] == {"active": 0, "succeeded": 2, "failed": 0}


def test_a_failed_preflight_fails_the_job_with_its_lines_and_no_worker_is_created() -> None:
    lines = "FAIL dataset: train.jsonl line 7: not valid JSON; FAIL adapterUri: access denied"
    message = TerminationMessage.failed(f"preflight: {lines}", ExitCode.PREFLIGHT_FAILED).render()
    _, status = step({}, [])
    outcome, status = step(status, [preflight("Failed", exit_code=80, message=message)])
    assert status["phase"] == "Failed" and creates(outcome) == []
    assert status["message"] == f"preflight failed: {lines}"
    assert events(outcome) == [("Warning", "PreflightFailed")]
    assert conditions(status) == {"Ready": "False/PreflightFailed", "Stalled": "True/PreflightFailed",
                                  "Failed": "True/PreflightFailed"}


def test_a_missing_secret_shows_while_waiting_then_fails_after_the_startup_timeout() -> None:
    stuck = {"reason": "CreateContainerConfigError",
             "message": 'couldn\'t find key AWS_SECRET_ACCESS_KEY in Secret default/s3-credentials'}
    _, status = step({}, [])
    outcome, status = step(status, [preflight("Pending", waiting=stuck)], now=T0 + timedelta(seconds=5))
    assert status["phase"] == "Validating" and "AWS_SECRET_ACCESS_KEY in Secret default/s3-credentials" in \
        status["message"]
    outcome, status = step(status, [preflight("Pending", waiting=stuck)], now=T0 + timedelta(seconds=601))
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"] == "True/CreateContainerConfigError"
    assert "startupTimeoutSeconds (600s)" in status["message"] and "AWS_SECRET_ACCESS_KEY" in status["message"]
    assert deletes(outcome) == ["quickstart-preflight"]  # cleanPodPolicy Running: the stuck pod goes


def test_skip_preflight_creates_the_gang_at_once() -> None:
    outcome = reconcile(job(run_policy={"skipPreflight": True}), [], SETTINGS, T0)
    assert [name for kind, name in creates(outcome) if kind == "Pod"] == ["quickstart-worker-0", "quickstart-worker-1"]
    assert outcome.status["phase"] == "Pending"


# -- running --------------------------------------------------------------------------------------
def test_phases_follow_the_gang_with_one_event_per_transition() -> None:
    status = launched()
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Pending")])
    assert status["phase"] == "Pending" and outcome.actions == ()
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")])
    assert status["phase"] == "Running" and events(outcome) == [("Normal", "Running")]
    assert status["startTime"] == status["launched"]["runningTime"] == "2026-01-01T12:00:00Z"
    assert conditions(status) == {"Ready": "False/Running", "Reconciling": "True/Running"}
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")], now=T0 + timedelta(seconds=9))
    assert outcome.status is None and outcome.actions == ()  # nothing new: nothing written, nothing posted
    status = {**status, "progress": {"step": 30, "totalSteps": 30, "display": "30/30",
                                     "stepTime": "2026-01-01T12:00:20Z"}}
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Succeeded", exit_code=0)])
    assert status["phase"] == "Publishing" and events(outcome) == [("Normal", "Publishing")]
    success = TerminationMessage(outcome="Succeeded", steps=30, total_steps=30, final_loss=1.0543, tokens=7680,
                                 manifest_sha256="ab" * 32).render()
    outcome, status = step(status, [pod(0, "Succeeded", exit_code=0, message=success),
                                    pod(1, "Succeeded", exit_code=0)], now=T0 + timedelta(seconds=60))
    assert status["phase"] == "Succeeded" and events(outcome) == [("Normal", "Succeeded")]
    assert status["adapter"] == {"uri": ADAPTER, "manifestSha256": "ab" * 32}
    assert status["results"] == {"finalLoss": 1.0543, "steps": 30, "tokens": 7680}
    assert status["message"] == f"adapter published to {ADAPTER} (final loss 1.0543)"
    assert conditions(status) == {"Ready": "True/Succeeded", "Succeeded": "True/AdapterPublished"}
    assert status["cost"] == {"attempts": [{"attempt": 1, "workerSeconds": 120, "gpuSeconds": 0}],
                              "workerSeconds": 120, "gpuSeconds": 0, "tokens": 7680}
    assert status["completionTime"] == "2026-01-01T12:01:00Z"


def test_the_last_attempts_final_step_is_not_this_attempts_publishing() -> None:
    status = {**running(), "progress": {"step": 30, "totalSteps": 30, "stepTime": "2026-01-01T11:00:00Z"}}
    _, status = step(status, [pod(0, "Running"), pod(1, "Running")])
    assert status["phase"] == "Running"


def test_unchanged_conditions_keep_their_transition_time() -> None:
    status = running()
    before = {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}
    _, later = step({**status, "progress": {"step": 30, "totalSteps": 30}}, [pod(0, "Running"), pod(1, "Running")],
                    now=T0 + timedelta(minutes=5))
    after = {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}
    assert after["Ready"] == before["Ready"] and after["Reconciling"] == before["Reconciling"]
    assert all(c["observedGeneration"] == 1 for c in later["conditions"])


def test_an_earlier_jobs_pods_of_the_same_names_are_not_this_jobs() -> None:
    old = [pod(0, "Running", uid="old"), pod(1, "Running", uid="old")]
    outcome, status = step(launched(), old, now=T0 + timedelta(seconds=20))
    assert status["phase"] == "Pending"
    assert deletes(outcome) == []  # not ours to delete either
    assert [name for kind, name in creates(outcome) if kind == "Pod"] == ["quickstart-worker-0", "quickstart-worker-1"]


def test_a_worker_gone_before_the_gang_ran_is_created_again_not_counted() -> None:
    # Just after the launch, a pod the watch has not shown yet is on its way: no second create.
    outcome, status = step(launched(), [pod(1, "Pending")], now=T0 + timedelta(seconds=3))
    assert creates(outcome) == []
    outcome, status = step(status, [pod(1, "Pending")], now=T0 + timedelta(seconds=20))
    assert status["phase"] == "Pending" and "restarts" not in status
    assert [name for kind, name in creates(outcome) if kind == "Pod"] == ["quickstart-worker-0"]


def test_status_comes_from_what_was_launched_not_the_live_spec() -> None:
    status = launched()
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")], workers={"replicas": 1})
    assert status["phase"] == "Running" and status["message"] == "all 2 workers running (attempt 1)"
    assert creates(outcome) == []


# -- gang restart ---------------------------------------------------------------------------------
def test_a_failed_worker_restarts_the_whole_gang_after_a_back_off() -> None:
    status = running()
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Failed", exit_code=1, message="RuntimeError: boom")],
                           now=T0 + timedelta(seconds=30))
    assert status["phase"] == "Restarting" and status["restarts"] == 1
    assert deletes(outcome) == ["quickstart-worker-0", "quickstart-worker-1"]
    # The failed pod's last log lines are posted before any pod is deleted.
    assert outcome.actions[0] == LogTail("quickstart-worker-1")
    assert events(outcome) == [("Warning", "Restarting")] and creates(outcome) == []
    assert status["lastFailure"] == {"attempt": 1, "reason": "WorkerFailed", "pod": "quickstart-worker-1",
                                     "exitCode": 1, "message": "pod quickstart-worker-1 failed with exit code 1: "
                                     "RuntimeError: boom", "time": "2026-01-01T12:00:30Z",
                                     "logUri": "s3://adapters/quickstart.logs/attempt-1/quickstart-worker-1.log"}
    assert status["nextAttemptTime"] == "2026-01-01T12:00:40Z"
    assert status["cost"]["attempts"] == [{"attempt": 1, "workerSeconds": 60, "gpuSeconds": 0}]

    # Never two pods for one rank: the old pods must be gone first, terminating ones included.
    outcome, status = step(status, [pod(0, "Running", terminating=True)], now=T0 + timedelta(seconds=45))
    assert status["phase"] == "Restarting" and creates(outcome) == [] and outcome.blocked
    outcome, status = step(status, [], now=T0 + timedelta(seconds=35))
    assert status["phase"] == "Restarting" and creates(outcome) == []  # back-off still running
    outcome, status = step(status, [], now=T0 + timedelta(seconds=46))
    assert status["phase"] == "Pending" and status["launched"]["attempt"] == 2
    workers = [a.child for a in outcome.actions if isinstance(a, Create) and a.child["kind"] == "Pod"]
    assert [w["metadata"]["labels"]["kubetune.dev/attempt"] for w in workers] == ["2", "2"]
    assert "nextAttemptTime" not in status and status["restarts"] == 1

    # The old attempt's pods never count for the new one.
    outcome, status = step(status, [pod(0, "Running", attempt=2), pod(1, "Running", attempt=2)],
                           now=T0 + timedelta(seconds=50))
    assert status["phase"] == "Running" and status["lastFailure"]["attempt"] == 1


@pytest.mark.parametrize("restarts, delay", [(0, 10), (1, 20), (2, 40), (5, 300)])
def test_the_back_off_doubles_and_is_capped(restarts: int, delay: int) -> None:
    status = {**running(run_policy={"backoffLimit": 10}), "restarts": restarts}
    _, status = step(status, [pod(0, "Failed", exit_code=1), pod(1, "Running")], run_policy={"backoffLimit": 10})
    assert status["nextAttemptTime"] == (T0 + timedelta(seconds=delay)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_platform_sets_the_first_back_off() -> None:
    status = running(run_policy={"backoffLimit": 10})
    settings = dataclasses.replace(SETTINGS, restart_backoff_seconds=3)
    outcome = reconcile(job(status, run_policy={"backoffLimit": 10}),
                        [pod(0, "Failed", exit_code=1), pod(1, "Running")], settings, T0)
    assert outcome.status["nextAttemptTime"] == (T0 + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "restarting all 2 workers in 3s" in outcome.status["message"]


def test_the_backoff_limit_ends_the_job_with_the_last_reason() -> None:
    status = {**running(run_policy={"backoffLimit": 1}), "restarts": 1}
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Failed", exit_code=137)],
                           run_policy={"backoffLimit": 1})
    assert status["phase"] == "Failed" and status["restarts"] == 1
    assert status["message"] == ("pod quickstart-worker-1 failed: killed by SIGKILL; the gang was restarted 1 time "
                                 "(spec.runPolicy.backoffLimit 1)")
    assert conditions(status)["Failed"] == "True/BackoffLimitExceeded"
    assert status["lastFailure"]["signal"] == "SIGKILL"
    assert deletes(outcome) == ["quickstart-worker-0"]  # the surviving rank, per cleanPodPolicy Running
    assert events(outcome) == [("Warning", "Failed")]


def test_bad_input_fails_at_once_without_a_restart() -> None:
    message = TerminationMessage.failed("train.jsonl line 2: not valid JSON", ExitCode.INVALID_DATA).render()
    outcome, status = step(running(), [pod(0, "Failed", exit_code=1, message=message), pod(1, "Running")])
    assert status["phase"] == "Failed" and "restarts" not in status
    assert status["message"] == "train.jsonl line 2: not valid JSON (pod quickstart-worker-0 failed with exit code 65)"
    assert conditions(status)["Failed"] == "True/TrainerError"
    assert deletes(outcome) == ["quickstart-worker-1"]


def test_the_first_worker_to_fail_is_the_cause() -> None:
    pods = [pod(0, "Failed", exit_code=1, message="RuntimeError: peer closed", finished="2026-01-01T12:00:20Z"),
            pod(1, "Failed", exit_code=137, finished="2026-01-01T12:00:10Z")]
    _, status = step(running(), pods)
    assert status["lastFailure"]["pod"] == "quickstart-worker-1" and status["lastFailure"]["signal"] == "SIGKILL"


def test_deleting_a_worker_restarts_the_gang() -> None:
    outcome, status = step(running(), [pod(0, "Running"), pod(1, "Running", terminating=True)])
    assert status["phase"] == "Restarting" and status["lastFailure"]["reason"] == "WorkerDeleted"
    assert deletes(outcome) == ["quickstart-worker-0"]


def test_a_worker_vanishing_after_the_gang_ran_restarts_it() -> None:
    outcome, status = step(running(), [pod(0, "Running")])
    assert status["phase"] == "Restarting" and status["lastFailure"]["reason"] == "WorkerMissing"
    assert status["lastFailure"]["message"] == "worker pod quickstart-worker-1 disappeared while the job ran"


# -- bounded time ---------------------------------------------------------------------------------
def test_no_new_step_for_the_stall_timeout_restarts_the_gang() -> None:
    policy = {"stallTimeoutSeconds": 120}
    status = running(run_policy=policy)
    status["progress"] = {"step": 7, "totalSteps": 30, "stepTime": "2026-01-01T12:01:00Z"}
    both = [pod(0, "Running"), pod(1, "Running")]
    outcome, same = step(status, both, now=T0 + timedelta(seconds=170), run_policy=policy)
    assert same["phase"] == "Running" and not outcome.probe
    # Stalled: first the workers are asked how far they got, then the failure names the one behind.
    outcome = reconcile(job(status, run_policy=policy), both, SETTINGS, T0 + timedelta(seconds=181))
    assert outcome == Outcome(None, probe=True)
    outcome, status = step(status, both, now=T0 + timedelta(seconds=181), probes={0: 8, 1: 7}, run_policy=policy)
    assert status["phase"] == "Restarting" and status["lastFailure"]["reason"] == "Stalled"
    assert status["lastFailure"]["message"] == (
        "no new optimizer step for 120s (last at step 7; spec.runPolicy.stallTimeoutSeconds): quickstart-worker-1 "
        "never began step 8 that the others wait in (its last: step 7)")
    assert status["lastFailure"]["pod"] == "quickstart-worker-1"
    assert deletes(outcome) == ["quickstart-worker-0", "quickstart-worker-1"]


@pytest.mark.parametrize("probes, named, why", [
    ({0: None, 1: 8}, "quickstart-worker-0", "quickstart-worker-0 did not answer on its metrics port (stopped or hung)"),
    ({0: 8, 1: None}, "quickstart-worker-1", "quickstart-worker-1 did not answer on its metrics port (stopped or hung)"),
    ({0: 8, 1: 8}, None, "every worker has begun the same step: the gang waits inside it, in a collective or the data"),
    ({}, None, "every worker has begun the same step: the gang waits inside it, in a collective or the data"),
])
def test_a_stall_names_the_worker_that_holds_the_gang_up(probes: dict, named: str | None, why: str) -> None:
    policy = {"stallTimeoutSeconds": 120}
    status = running(run_policy=policy)
    status["progress"] = {"step": 7, "totalSteps": 30, "stepTime": "2026-01-01T12:01:00Z"}
    _, status = step(status, [pod(0, "Running"), pod(1, "Running")], now=T0 + timedelta(seconds=181),
                     probes=probes, run_policy=policy)
    assert status["phase"] == "Restarting"
    assert status["lastFailure"]["message"].endswith(f"spec.runPolicy.stallTimeoutSeconds): {why}")
    assert status["lastFailure"].get("pod") == named


@pytest.mark.parametrize("step_time", [None, "2026-01-01T11:00:00Z"])
def test_no_stall_before_the_attempts_first_step(step_time: str | None) -> None:
    # Start-up (model download, rendezvous) takes what it takes; an earlier attempt's step is not this one's.
    policy = {"stallTimeoutSeconds": 120}
    status = running(run_policy=policy)
    if step_time:
        status["progress"] = {"step": 7, "totalSteps": 30, "stepTime": step_time}
    _, status = step(status, [pod(0, "Running"), pod(1, "Running")], now=T0 + timedelta(seconds=600),
                     run_policy=policy)
    assert status["phase"] == "Running"


def test_the_active_deadline_fails_the_job_whatever_restarts_are_left() -> None:
    policy = {"activeDeadlineSeconds": 300}
    status = {**running(run_policy=policy), "phase": "Restarting", "restarts": 1,
              "nextAttemptTime": "2026-01-01T12:10:00Z"}
    outcome, status = step(status, [], now=T0 + timedelta(seconds=301), run_policy=policy)
    assert status["phase"] == "Failed" and conditions(status)["Failed"] == "True/DeadlineExceeded"
    assert status["message"] == "the job ran longer than spec.runPolicy.activeDeadlineSeconds (300s)"


def test_a_worker_that_cannot_be_scheduled_fails_the_job_after_the_startup_timeout() -> None:
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]
    pods = [pod(0, "Running"), pod(1, "Pending", conditions=unschedulable)]
    _, status = step(launched(), pods, now=T0 + timedelta(seconds=30))
    assert status["phase"] == "Pending"
    assert status["message"] == ("waiting for all 2 workers to run (attempt 1); quickstart-worker-1 cannot start: "
                                 "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    outcome, status = step(status, pods, now=T0 + timedelta(seconds=600))
    assert status["phase"] == "Failed" and conditions(status)["Failed"] == "True/Unschedulable"
    assert deletes(outcome) == ["quickstart-worker-0", "quickstart-worker-1"]


def test_an_image_that_cannot_be_pulled_fails_with_the_pods_reason() -> None:
    stuck = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "nope/trainer:1"'}
    policy = {"startupTimeoutSeconds": 60}
    status = launched(run_policy=policy)
    _, status = step(status, [pod(0, "Pending", waiting=stuck), pod(1, "Pending", waiting=stuck)],
                     now=T0 + timedelta(seconds=61), run_policy=policy)
    assert status["phase"] == "Failed" and conditions(status)["Failed"] == "True/ImagePullBackOff"
    assert 'Back-off pulling image "nope/trainer:1"' in status["message"]


# -- suspend ----------------------------------------------------------------------------------------
def test_suspend_stops_the_pods_keeps_the_progress_and_resume_starts_the_next_attempt() -> None:
    status = {**running(), "progress": {"step": 12, "totalSteps": 30}, "restarts": 1}
    suspend = {"suspend": True}
    outcome, status = step(status, [pod(0, "Running"), pod(1, "Running")], now=T0 + timedelta(seconds=100),
                           run_policy=suspend)
    assert status["phase"] == "Suspended" and events(outcome) == [("Normal", "Suspended")]
    assert deletes(outcome) == ["quickstart-worker-0", "quickstart-worker-1"]
    assert "startTime" not in status and status["progress"]["step"] == 12
    assert conditions(status) == {"Ready": "False/Suspended", "Suspended": "True/Suspended"}
    outcome, status = step(status, [pod(0, "Running", terminating=True)], now=T0 + timedelta(seconds=110),
                           run_policy=suspend)
    assert status["phase"] == "Suspended" and outcome.actions == ()

    outcome, status = step(status, [pod(0, "Running", terminating=True)], now=T0 + timedelta(seconds=200))
    assert status["phase"] == "Suspended" and creates(outcome) == []  # the old pods go first
    outcome, status = step(status, [], now=T0 + timedelta(seconds=210))
    assert status["phase"] == "Pending" and status["launched"]["attempt"] == 2 and status["restarts"] == 1
    assert [name for kind, name in creates(outcome) if kind == "Pod"] == ["quickstart-worker-0", "quickstart-worker-1"]


def test_a_job_created_suspended_waits_for_its_queue_then_validates() -> None:
    outcome = reconcile(job(run_policy={"suspend": True}), [], SETTINGS, T0)
    assert outcome.status["phase"] == "Suspended" and creates(outcome) == []
    outcome, status = step(outcome.status, [])
    assert status["phase"] == "Validating" and creates(outcome)[-1] == ("Pod", "quickstart-preflight")


# -- finished jobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, deleted", [
    ("Running", ["quickstart-worker-1"]),
    ("All", ["quickstart-worker-0", "quickstart-worker-1"]),
    ("None", []),
])
def test_a_finished_job_cleans_up_per_clean_pod_policy_and_never_runs_again(policy: str, deleted: list) -> None:
    status = {"phase": "Failed", "completionTime": "2026-01-01T12:00:00Z"}
    outcome = reconcile(job(status, run_policy={"cleanPodPolicy": policy}),
                        [pod(0, "Failed", exit_code=1), pod(1, "Running")], SETTINGS, T0)
    assert outcome.status is None and deletes(outcome) == deleted and creates(outcome) == []


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_whose_pods_are_gone_is_not_recreated(phase: str) -> None:
    outcome = reconcile(job({"phase": phase, "launched": {"replicas": 2, "attempt": 1}}), [], SETTINGS, T0)
    assert outcome.status is None and outcome.actions == ()


def test_the_ttl_deletes_the_finished_job() -> None:
    status = {"phase": "Succeeded", "completionTime": "2026-01-01T12:00:00Z"}
    policy = {"ttlSecondsAfterFinished": 60}
    assert reconcile(job(status, run_policy=policy), [], SETTINGS, T0 + timedelta(seconds=59)).actions == ()
    assert reconcile(job(status, run_policy=policy), [], SETTINGS, T0 + timedelta(seconds=60)).actions == (DeleteJob(),)


# -- what cannot run --------------------------------------------------------------------------------
def test_a_spec_the_api_server_could_not_check_fails_the_job_naming_the_field() -> None:
    outcome = reconcile(job(deepspeed={"config": {"optimizer": {"type": "SGD"}}}), [], SETTINGS, T0)
    assert outcome.status["phase"] == "Failed"
    assert "spec.deepspeed.config.optimizer is set by kubetune" in outcome.status["message"]
    assert events(outcome) == [("Warning", "InvalidSpec")] and creates(outcome) == []


def test_a_refused_child_fails_the_job_with_the_api_message() -> None:
    child = reconcile(job(), [], SETTINGS, T0).actions[0].child  # type: ignore[union-attr]
    outcome = creation_failed(job(), child, 'admission webhook "quota" denied the request', T0)
    assert outcome.status["phase"] == "Failed"
    assert outcome.status["message"] == (
        'the API server refused Pod quickstart-preflight: admission webhook "quota" denied the request')
    assert events(outcome) == [("Warning", "ChildRefused")]


def test_a_name_held_by_an_earlier_job_is_waited_for() -> None:
    child = {"kind": "Pod", "metadata": {"name": "quickstart-worker-0"}}
    holder = pod(0, "Running", uid="old", terminating=True)
    previous = reconcile(job(), [], SETTINGS, T0).status
    outcome = waiting(job(previous), child, holder, T0)
    assert outcome.status["phase"] == "Validating" and outcome.blocked == outcome.status["message"]
    assert outcome.status["message"] == (
        "waiting for Pod quickstart-worker-0 of FineTuneJob uid old, being deleted, to be gone before "
        "creating this job's own")
    again = waiting(job(outcome.status), child, holder, T0 + timedelta(seconds=2))
    assert again.status is None and again.blocked  # same wait: nothing to write, still blocked


def test_neither_status_nor_events_carry_secrets() -> None:
    outcome, status = step(running(), [pod(0, "Running"), pod(1, "Failed", exit_code=1)])
    text = json.dumps(status) + repr([a for a in outcome.actions if isinstance(a, Event)])
    assert "AWS_SECRET_ACCESS_KEY" not in text and "s3-credentials" not in text
    assert copy.deepcopy(status) == status

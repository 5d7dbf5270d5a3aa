"""The contracts between trainer and operator, exercised end to end without a cluster: what the
real trainer code writes (its Prometheus series, its termination messages) is what the real
operator code reads (progress, results, failures). Renaming a metric or a message key on one
side fails here, not in a user's `kubectl get ftj`."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import generate_latest

from kubetune.api import JobRef
from kubetune.api.termination import ExitCode
from kubetune.operator.progress import derive_progress
from kubetune.operator.reconcile import Job, reconcile
from kubetune.operator.settings import OperatorSettings
from kubetune.trainer import termination
from kubetune.trainer.metrics import TrainMetrics

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_the_trainers_metrics_become_the_jobs_progress() -> None:
    metrics = TrainMetrics()
    metrics.total_steps.set(30)
    metrics.step.set(12)
    metrics.loss.set(1.23456)
    metrics.epoch.set(0.4)
    metrics.tokens_per_second.set(2048.5)

    progress = derive_progress(generate_latest(metrics.registry).decode(), None, NOW)

    assert progress is not None
    assert (progress["display"], progress["loss"], progress["epoch"], progress["tokensPerSecond"]) == (
        "12/30", 1.2346, 0.4, 2048.5)


JOB = JobRef(name="job", namespace="default", uid="u")


def _worker(index: int, phase: str, exit_code: int, message: str | None) -> dict:
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message}
    return {"metadata": {"name": f"job-worker-{index}", "uid": f"p{index}",
                         "labels": {"kubetune.dev/replica-index": str(index), "kubetune.dev/attempt": "1"},
                         "ownerReferences": [{"uid": JOB.uid, "controller": True}]},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}


def _status(*pods: dict) -> dict:
    """The job's status after the operator saw these pods of its running gang."""
    running = {"phase": "Running", "launched": {"replicas": len(pods), "attempt": 1, "adapterUri": "s3://adapters/job/",
                                                "createdTime": "2026-01-01T11:00:00Z",
                                                "runningTime": "2026-01-01T11:01:00Z"}}
    spec = {"model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://datasets/t.jsonl"}, "output": {"adapterUri": "s3://adapters/job/"},
            "workers": {"replicas": len(pods)}, "training": {"globalBatchSize": 4 * len(pods)}}
    outcome = reconcile(Job(JOB, 1, spec, running), list(pods), OperatorSettings(), NOW)
    assert outcome.status is not None
    return outcome.status


def test_the_trainers_success_message_becomes_the_jobs_results() -> None:
    results = {"steps": 30, "totalSteps": 30, "finalLoss": 1.0543, "evalLoss": 1.5, "tokens": 7680, "worldSize": 2}
    message = termination.success_message(results, "s3://adapters/job/")

    status = _status(_worker(0, "Succeeded", 0, message), _worker(1, "Succeeded", 0, None))

    assert status["phase"] == "Succeeded"
    assert status["results"] == {"finalLoss": 1.0543, "evalLoss": 1.5, "steps": 30, "tokens": 7680}
    assert status["progress"]["display"] == "30/30"


def test_the_trainers_bad_input_message_fails_the_job_at_once() -> None:
    message = termination.failure_message("s3://datasets/t.jsonl line 2:\nnot valid JSON", ExitCode.INVALID_DATA)

    status = _status(_worker(0, "Failed", 1, message), _worker(1, "Failed", 1, None))

    assert status["phase"] == "Failed"
    assert status["message"] == "s3://datasets/t.jsonl line 2: not valid JSON (pod job-worker-0 failed with exit code 65)"
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "TrainerError"


def test_any_other_trainer_failure_restarts_the_gang() -> None:
    message = termination.failure_message("connection to s3 timed out")

    status = _status(_worker(0, "Failed", 1, message), _worker(1, "Failed", 1, None))

    assert status["phase"] == "Restarting" and status["lastFailure"]["exitCode"] == 1


def test_before_the_first_logged_step_loss_and_speed_are_no_value_not_zero() -> None:
    """A scrape between the plan and the first log line: Prometheus stores NaN (no value), and
    the job's progress shows the step count alone."""
    metrics = TrainMetrics()
    metrics.total_steps.set(30)
    text = generate_latest(metrics.registry).decode()
    assert "kubetune_train_loss NaN" in text and "kubetune_train_tokens_per_second NaN" in text
    progress = derive_progress(text, None, NOW)
    assert progress["display"] == "0/30" and "loss" not in progress and "tokensPerSecond" not in progress

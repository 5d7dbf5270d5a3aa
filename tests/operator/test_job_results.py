"""The trainer's termination message in the job's status: a failed job says the trainer's error,
a succeeded one its results, and the progress ends at the last step."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from kubetune.operator.status import derive_status, observe_pod

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SUCCESS = {"outcome": "Succeeded", "steps": 30, "totalSteps": 30, "finalLoss": 1.0543, "evalLoss": None,
           "tokens": 7680, "adapterUri": "s3://adapters/quickstart/"}
ERROR = "train.jsonl line 3: not valid JSON (Expecting value)"


def worker(index: int, phase: str, exit_code: int | None, message: str | None = None) -> dict:
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": f"quickstart-worker-{index}", "labels": {"kubetune.dev/replica-index": str(index)}},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


def derive(*pods: dict, previous: dict | None = None) -> dict:
    return derive_status(replicas=2, adapter_uri="s3://adapters/quickstart/", generation=1,
                         pods=[observe_pod(p) for p in pods], previous=previous, now=T0, job_name="quickstart")


def test_succeeded_job_carries_results_and_ends_progress_at_the_last_step() -> None:
    running = {"phase": "Running", "startTime": "2026-01-01T11:59:00Z",
               "progress": {"step": 25, "totalSteps": 30, "display": "25/30", "loss": 1.1, "eta": "4s",
                            "etaSeconds": 4}}
    status = derive(worker(0, "Succeeded", 0, json.dumps(SUCCESS)), worker(1, "Succeeded", 0), previous=running)
    assert status["phase"] == "Succeeded"
    assert status["results"] == {"finalLoss": 1.0543, "steps": 30, "tokens": 7680}  # no eval split: no evalLoss
    assert status["progress"]["display"] == "30/30" and status["progress"]["step"] == 30
    assert (status["progress"]["loss"], status["progress"]["eta"]) == (1.0543, "0s")
    assert status["message"] == "adapter published to s3://adapters/quickstart/ (final loss 1.0543)"


def test_trainer_error_becomes_the_failed_message_and_condition() -> None:
    failure = json.dumps({"outcome": "Failed", "error": ERROR})
    status = derive(worker(0, "Failed", 1, failure), worker(1, "Failed", 1, failure))
    expected = f"{ERROR} (worker pod quickstart-worker-0 failed with exit code 1)"
    assert status["message"] == expected
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"], failed["message"]) == ("True", "TrainerError", expected)


def test_trainer_error_from_another_worker_when_worker_0_has_none() -> None:
    failure = json.dumps({"outcome": "Failed", "error": ERROR})
    status = derive(worker(0, "Failed", 1, "Traceback ...\nRuntimeError: peer gone"), worker(1, "Failed", 1, failure))
    assert status["message"] == f"{ERROR} (worker pod quickstart-worker-1 failed with exit code 1)"


def test_a_crash_without_a_message_still_shows_its_last_log_line() -> None:
    status = derive(worker(0, "Running", None) | {"status": {"phase": "Running"}},
                    worker(1, "Failed", 1, "Traceback (most recent call last):\n  ...\nRuntimeError: boom"))
    assert status["message"] == "worker pod quickstart-worker-1 failed with exit code 1 (Error): RuntimeError: boom"


def test_running_status_keeps_the_scraped_progress() -> None:
    progress = {"step": 5, "totalSteps": 30, "display": "5/30"}
    running = {"phase": "Running", "startTime": "2026-01-01T11:59:00Z", "progress": progress}
    pods = [{"metadata": {"name": f"quickstart-worker-{i}", "labels": {"kubetune.dev/replica-index": str(i)}},
             "status": {"phase": "Running"}} for i in (0, 1)]
    assert derive(*pods, previous=running)["progress"] == progress

"""Status derivation, table driven: which pods give which phase, conditions and message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubetune.operator.status import PodObservation, derive_status, failed_status, initial_status, observe_pod

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
ADAPTER = "s3://adapters/quickstart/"
LAUNCHED = {"replicas": 2, "configHash": "0" * 64, "attempt": 1, "adapterUri": ADAPTER}


def pod(
    index: int, phase: str, exit_code: int | None = None, reason: str | None = None, message: str | None = None
) -> PodObservation:
    return PodObservation(f"quickstart-worker-{index}", index, phase, exit_code, reason, message)


def derive(
    pods: list[PodObservation], previous: dict | None = None, now: datetime = T0, replicas: int = 2, generation: int = 1
) -> dict:
    return derive_status(
        replicas=replicas,
        adapter_uri=ADAPTER,
        generation=generation,
        pods=pods,
        previous=previous,
        now=now,
        job_name="quickstart",
    )


def conditions(status: dict) -> dict[str, str]:
    return {condition["type"]: condition["status"] for condition in status["conditions"]}


@pytest.mark.parametrize(
    "pods, phase, workers",
    [
        ([], "Pending", {"active": 0, "succeeded": 0, "failed": 0}),
        ([pod(0, "Pending"), pod(1, "Pending")], "Pending", {"active": 2, "succeeded": 0, "failed": 0}),
        ([pod(0, "Running"), pod(1, "Pending")], "Pending", {"active": 2, "succeeded": 0, "failed": 0}),
        ([pod(0, "Running")], "Pending", {"active": 1, "succeeded": 0, "failed": 0}),
        ([pod(0, "Running"), pod(1, "Running")], "Running", {"active": 2, "succeeded": 0, "failed": 0}),
        ([pod(0, "Succeeded"), pod(1, "Running")], "Running", {"active": 1, "succeeded": 1, "failed": 0}),
        ([pod(0, "Succeeded"), pod(1, "Succeeded")], "Succeeded", {"active": 0, "succeeded": 2, "failed": 0}),
        ([pod(0, "Running"), pod(1, "Failed", 1)], "Failed", {"active": 1, "succeeded": 0, "failed": 1}),
        ([pod(0, "Pending"), pod(1, "Failed", 137, "OOMKilled")], "Failed", {"active": 1, "succeeded": 0, "failed": 1}),
    ],
)
def test_phase_and_worker_counts_from_pods(pods, phase: str, workers: dict) -> None:
    status = derive(pods)
    assert status["phase"] == phase
    assert status["workers"] == workers
    assert conditions(status) == {
        "Created": "True" if pods else "False",
        "Running": "True" if phase == "Running" else "False",
        "Succeeded": "True" if phase == "Succeeded" else "False",
        "Failed": "True" if phase == "Failed" else "False",
    }


def test_failure_message_names_pod_exit_code_and_reason() -> None:
    status = derive([pod(0, "Running"), pod(1, "Failed", 137, "OOMKilled", "killed\nout of memory\n")])
    assert status["message"] == "worker pod quickstart-worker-1 failed with exit code 137 (OOMKilled): out of memory"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "WorkerFailed"
    assert failed["message"] == status["message"]
    assert status["completionTime"] == "2026-01-01T12:00:00Z"


def test_missing_pod_after_running_fails_the_job() -> None:
    running = derive([pod(0, "Running"), pod(1, "Running")])
    status = derive([pod(0, "Running")], previous=running, now=T1)
    assert status["phase"] == "Failed"
    assert status["message"] == "worker pod quickstart-worker-1 disappeared while the job was running"
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "WorkerMissing"


def test_missing_pod_before_start_is_still_pending() -> None:
    assert derive([pod(0, "Running")], previous=initial_status(1, T0, LAUNCHED))["phase"] == "Pending"


def test_success_records_adapter_and_times() -> None:
    running = derive([pod(0, "Running"), pod(1, "Running")], now=T0)
    done = derive([pod(0, "Succeeded"), pod(1, "Succeeded")], previous=running, now=T1)
    assert done["adapter"] == {"uri": ADAPTER}
    assert done["message"] == f"adapter published to {ADAPTER}"
    assert done["startTime"] == "2026-01-01T12:00:00Z"
    assert done["completionTime"] == "2026-01-01T12:05:00Z"
    assert next(c for c in done["conditions"] if c["type"] == "Succeeded")["reason"] == "AdapterPublished"


def test_unchanged_conditions_keep_their_transition_time() -> None:
    running = derive([pod(0, "Running"), pod(1, "Running")], now=T0)
    again = derive([pod(0, "Running"), pod(1, "Running")], previous=running, now=T1)
    assert again == running  # nothing new: no patch needed
    done = derive([pod(0, "Succeeded"), pod(1, "Succeeded")], previous=running, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Created"] == "2026-01-01T12:00:00Z"  # still True
    assert times["Failed"] == "2026-01-01T12:00:00Z"  # still False
    assert times["Running"] == "2026-01-01T12:05:00Z"  # True -> False
    assert times["Succeeded"] == "2026-01-01T12:05:00Z"  # False -> True


@pytest.mark.parametrize("final_pods", [[pod(0, "Succeeded"), pod(1, "Succeeded")], [pod(0, "Failed", 1)]])
def test_final_phases_do_not_change_when_pods_go_away(final_pods) -> None:
    final = derive(final_pods)
    assert derive([], previous=final, now=T1) == final


def test_conditions_carry_observed_generation() -> None:
    status = derive([pod(0, "Running"), pod(1, "Running")], generation=3)
    assert status["observedGeneration"] == 3
    assert {c["observedGeneration"] for c in status["conditions"]} == {3}


def test_initial_and_invalid_spec_statuses() -> None:
    start = initial_status(1, T0, LAUNCHED)
    assert start["phase"] == "Pending" and start["launched"] == LAUNCHED
    assert conditions(start)["Created"] == "True"
    invalid = failed_status(None, 1, "InvalidSpec", "spec.model.uri: bad", T0)
    assert invalid["phase"] == "Failed"
    assert conditions(invalid) == {"Created": "False", "Running": "False", "Succeeded": "False", "Failed": "True"}
    assert next(c for c in invalid["conditions"] if c["type"] == "Failed")["reason"] == "InvalidSpec"


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            {"metadata": {"name": "j-worker-0", "labels": {"kubetune.dev/replica-index": "0"}}},
            PodObservation("j-worker-0", 0, "Pending"),
        ),
        (
            {
                "metadata": {"name": "j-worker-1", "labels": {"kubetune.dev/replica-index": "1"}},
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": "boom"}},
                        }
                    ],
                },
            },
            PodObservation("j-worker-1", 1, "Failed", 3, "Error", "boom"),
        ),
        (
            {
                "metadata": {"name": "j-worker-0", "labels": {"kubetune.dev/replica-index": "0"}},
                "status": {"phase": "Failed", "reason": "Evicted", "message": "node out of disk"},
            },
            PodObservation("j-worker-0", 0, "Failed", None, "Evicted", "node out of disk"),
        ),
    ],
)
def test_observe_pod_reads_phase_and_termination(raw: dict, expected: PodObservation) -> None:
    assert observe_pod(raw) == expected

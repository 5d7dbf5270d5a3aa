"""Reading pods: what the reconciler observes of each, and how a failed one explains itself in
its own words (the trainer's message, torchrun's root cause, the container's reason), never in
a launcher's banner."""

from __future__ import annotations

import json

import pytest

from kubetune.api.termination import ExitCode, TerminationMessage
from kubetune.operator.pods import PodObservation, describe_failure, observe_pod

TORCHRUN_SIGKILL_TAIL = """\
[rank0]:[W1130 18:20:01] ProcessGroupGloo: peer closed the connection
E1130 18:20:02 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: -9) local_rank: 0 (pid: 4242)
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
kubetune.trainer FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_18:20:02
  host      : job-worker-1
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
"""


def raw_pod(phase: str = "Running", *, index: int | None = 0, attempt: int = 1, component: str = "worker",
            terminated: dict | None = None, waiting: dict | None = None, **status: object) -> dict:
    labels = {"app.kubernetes.io/component": component, "kubetune.dev/attempt": str(attempt)}
    if index is not None:
        labels["kubetune.dev/replica-index"] = str(index)
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    return {"metadata": {"name": f"job-worker-{index}", "uid": f"pod-{index}", "labels": labels},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}], **status}}


def test_observe_reads_role_rank_attempt_and_termination() -> None:
    seen = observe_pod(raw_pod("Failed", index=1, attempt=3, terminated={
        "exitCode": 137, "reason": "OOMKilled", "message": "", "finishedAt": "2026-11-30T18:00:00Z"}))
    assert (seen.role, seen.index, seen.attempt, seen.phase) == ("worker", 1, 3, "Failed")
    assert (seen.exit_code, seen.reason, seen.finished, seen.outcome) == (137, "OOMKilled", "2026-11-30T18:00:00Z", None)
    preflight = observe_pod(raw_pod("Pending", index=None, component="preflight"))
    assert (preflight.role, preflight.index) == ("preflight", -1)


def test_eviction_is_the_pods_reason() -> None:
    seen = observe_pod({"metadata": {"name": "job-worker-0", "labels": {"kubetune.dev/replica-index": "0"}},
                        "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."}})
    report = describe_failure(seen)
    assert (report.reason, report.message) == ("Evicted", "pod job-worker-0 was evicted: The node was low on memory.")


@pytest.mark.parametrize("status, stuck", [
    ({"containerStatuses": [{"name": "trainer", "state": {"waiting": {
        "reason": "ErrImagePull", "message": 'Failed to pull image "nope:1"'}}}]},
     'ErrImagePull: Failed to pull image "nope:1"'),
    ({"containerStatuses": [{"name": "trainer", "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}}}]},
     'CreateContainerConfigError: secret "s3" not found'),
    ({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]},
     "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
    ({"containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]}, None),
])
def test_a_pod_that_cannot_start_says_why(status: dict, stuck: str | None) -> None:
    seen = observe_pod({"metadata": {"name": "p", "labels": {}}, "status": {"phase": "Pending", **status}})
    assert seen.stuck == stuck


def test_the_trainers_own_error_comes_first_with_its_exit_code() -> None:
    message = TerminationMessage.failed("train.jsonl line 7: not valid JSON", ExitCode.INVALID_DATA).render()
    report = describe_failure(observe_pod(raw_pod("Failed", terminated={"exitCode": 1, "message": message})))
    assert report.permanent and report.reason == "TrainerError" and report.exit_code == 65
    assert report.message == "train.jsonl line 7: not valid JSON (pod job-worker-0 failed with exit code 65)"


def test_a_transient_trainer_error_is_not_permanent() -> None:
    message = TerminationMessage.failed("S3 endpoint unreachable").render()
    report = describe_failure(observe_pod(raw_pod("Failed", terminated={"exitCode": 1, "message": message})))
    assert not report.permanent and report.reason == "WorkerFailed" and report.exit_code == 1


def test_a_rank_killed_under_torchrun_is_named_by_its_signal_not_the_banner() -> None:
    report = describe_failure(observe_pod(raw_pod("Failed", index=1, terminated={
        "exitCode": 1, "reason": "Error", "message": TORCHRUN_SIGKILL_TAIL})))
    assert report.message == "rank 1 was killed by SIGKILL (pod job-worker-1 failed with exit code 1)"
    assert report.signal == "SIGKILL" and "=" not in report.message


def test_a_container_killed_by_a_signal_names_it() -> None:
    report = describe_failure(observe_pod(raw_pod("Failed", terminated={"exitCode": 137, "reason": "Error"})))
    assert (report.signal, report.message) == ("SIGKILL", "pod job-worker-0 failed: killed by SIGKILL")


def test_out_of_memory_says_so() -> None:
    report = describe_failure(observe_pod(raw_pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})))
    assert report.reason == "OOMKilled" and report.signal == "SIGKILL"
    assert report.message == "pod job-worker-0 was killed for using more memory than its limit"


def test_a_crash_without_a_message_shows_its_last_meaningful_log_line() -> None:
    tail = "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n=====\n\n"
    report = describe_failure(observe_pod(raw_pod("Failed", terminated={"exitCode": 1, "reason": "Error",
                                                                        "message": tail})))
    assert report.message == "pod job-worker-0 failed with exit code 1: RuntimeError: boom"


def test_record_leaves_out_what_is_unknown() -> None:
    report = describe_failure(PodObservation("job-worker-0", "u", "worker", 0, 1, "Failed", exit_code=1))
    assert report.record("job-worker-0", 2, "2026-11-30T18:00:00Z") == {
        "attempt": 2, "reason": "WorkerFailed", "pod": "job-worker-0", "exitCode": 1,
        "message": "pod job-worker-0 failed with exit code 1", "time": "2026-11-30T18:00:00Z"}
    assert json.dumps(report.record(None, 1, "t"))  # plain JSON for the status

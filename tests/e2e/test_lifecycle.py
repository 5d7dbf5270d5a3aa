"""The job's life on a real cluster, each behaviour as a user meets it with kubectl: a gang that
loses a worker restarts from its newest checkpoint and ends with the loss an uninterrupted run
has; restarts are bounded; time is bounded (deadline, stall, start-up); finished is final;
suspend keeps the progress. The local node runs pods as processes, so the tests kill, stop and
count real worker processes."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
from e2e_tools import (
    complete_checkpoints, hold_ranks, manifest, pids_of_job, pods_of, rank_pids, release_on_sigterm, signal_rank,
    status_of, wait_for, wait_for_phase, wait_for_step,
)

from kubetune.cli.demo import follow_job
from kubetune.operator.manifests import WORKER_GRACE_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
STEPS = 80


def long_job(name: str, **overrides: object) -> str:
    """The quickstart trained for 80 steps with a checkpoint every 5: long enough to interrupt."""
    return manifest(metadata__name=name, spec__training__maxSteps=STEPS, spec__training__epochs=10,
                    spec__output__adapterUri=f"s3://adapters/{name}/",
                    spec__output__checkpointUri=f"s3://adapters/{name}-checkpoints/",
                    spec__output__checkpointEverySteps=5, **overrides)


def endless_job(name: str, **overrides: object) -> str:
    return manifest(metadata__name=name, spec__training__maxSteps=100000, spec__training__epochs=1000,
                    spec__output__adapterUri=f"s3://adapters/{name}/", **overrides)


def published(s3, name: str) -> dict:
    return json.loads(s3_text(s3, f"{name}/manifest.json"))


def s3_text(s3, key: str, bucket: str = "adapters") -> str:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def after_a_checkpoint(stack, name: str) -> int:
    """Once the job runs and has a complete checkpoint: its step."""
    wait_for_phase(stack.kubectl, name, "Running", timeout=300)
    return wait_for(lambda: (complete_checkpoints(stack.s3, "adapters", f"{name}-checkpoints/") or [0])[-1],
                    f"a complete checkpoint of {name}", timeout=300, every=0.1)


@pytest.fixture(scope="session")
def uninterrupted(stack) -> dict:
    """The published results of the long job run without interruption: what a restarted run
    must reproduce."""
    stack.kubectl.run("apply", "-f", "-", input=long_job("uninterrupted"))
    status = follow_job(stack.kubectl, "uninterrupted", timeout=600, echo=False)["status"]
    assert status["phase"] == "Succeeded", status
    return published(stack.s3, "uninterrupted")["results"]


def assert_continued_like(results: dict, uninterrupted: dict) -> None:
    """Resumed mid-run from a checkpoint (not from zero), with the losses of the uninterrupted run."""
    assert 5 <= (results["resumedFromStep"] or 0) < STEPS, results["resumedFromStep"]
    assert results["steps"] == uninterrupted["steps"] == STEPS
    assert math.isclose(results["finalLoss"], uninterrupted["finalLoss"], rel_tol=1e-3), (
        results["finalLoss"], uninterrupted["finalLoss"])


def test_killing_worker_1_mid_run_restarts_the_gang_from_the_checkpoint(stack, uninterrupted, record_property):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=long_job("killed"))
    after_a_checkpoint(stack, "killed")
    signal_rank("killed", 1, signal.SIGKILL)
    killed_at = time.monotonic()

    restarting = wait_for_phase(kubectl, "killed", "Restarting", timeout=120)
    assert restarting["lastFailure"]["pod"] == "killed-worker-1", restarting["lastFailure"]
    assert "SIGKILL" in restarting["lastFailure"]["message"] and "===" not in restarting["lastFailure"]["message"]
    running = wait_for_phase(kubectl, "killed", "Running", timeout=180)
    assert running["launched"]["attempt"] == 2
    # Failure -> training again: the operator has seen a step of the second attempt.
    wait_for(lambda: (status_of(kubectl, "killed").get("progress") or {}).get("stepTime", "")
             > running["launched"]["runningTime"], "a step of attempt 2", timeout=300)
    seconds = round(time.monotonic() - killed_at, 1)
    record_property("restart_seconds", seconds)
    (stack.state / "restart-seconds.txt").write_text(f"{seconds}\n")

    status = follow_job(kubectl, "killed", timeout=600, echo=False)["status"]
    assert status["phase"] == "Succeeded" and status["restarts"] == 1, status
    assert_continued_like(published(stack.s3, "killed")["results"], uninterrupted)
    assert [attempt["attempt"] for attempt in status["cost"]["attempts"]] == [1, 2]
    reasons = [e["reason"] for e in kubectl.json("get", "events", "--field-selector",
                                                 "involvedObject.name=killed")["items"]]
    assert "Restarting" in reasons and reasons.count("Created") == 2

    # Every pod is gone, its whole log is not: the killed rank's torchrun report, the resume.
    logs = "killed-checkpoints.logs"
    assert restarting["lastFailure"]["logUri"] == f"s3://adapters/{logs}/attempt-1/killed-worker-1.log"
    assert "Signal 9 (SIGKILL) received by PID" in s3_text(stack.s3, f"{logs}/attempt-1/killed-worker-1.log")
    resumed = s3_text(stack.s3, f"{logs}/attempt-2/killed-worker-0.log")
    assert "resuming from checkpoint" in resumed and f"step={STEPS}/{STEPS}" in resumed, resumed[-3000:]


def test_kubectl_delete_pod_of_a_worker_restarts_the_gang(stack):
    """Deleted rather than killed: the same restart (which the test above follows to the end)."""
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=long_job("deleted-pod"))
    wait_for_step(kubectl, "deleted-pod")
    held = hold_ranks("deleted-pod")  # mid-run until the deletion's SIGTERM has reached worker 1
    kubectl.run("delete", "pod", "deleted-pod-worker-1", "--wait=false")
    release_on_sigterm(held, watched=rank_pids("deleted-pod", 1))

    restarting = wait_for_phase(kubectl, "deleted-pod", "Restarting", timeout=120)
    assert restarting["lastFailure"]["pod"] == "deleted-pod-worker-1"
    assert restarting["lastFailure"]["reason"] in ("WorkerDeleted", "WorkerMissing"), restarting["lastFailure"]
    running = wait_for_phase(kubectl, "deleted-pod", "Running", timeout=180)
    assert running["launched"]["attempt"] == 2 and running["restarts"] == 1
    kubectl.run("delete", "ftj", "deleted-pod", "--wait=false")


def test_backoff_limit_1_with_a_worker_that_always_dies_gives_two_attempts_then_failed(stack):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=endless_job("doomed", spec__runPolicy={"backoffLimit": 1}))
    for attempt in (1, 2):
        wait_for(lambda: status_of(kubectl, "doomed").get("launched", {}).get("attempt") == attempt
                 and status_of(kubectl, "doomed").get("phase") == "Running", f"attempt {attempt} running")
        signal_rank("doomed", 1, signal.SIGKILL)

    status = follow_job(kubectl, "doomed", timeout=300, echo=False)["status"]
    assert status["phase"] == "Failed" and status["restarts"] == 1, status
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["BackoffLimitExceeded"]
    assert status["lastFailure"]["attempt"] == 2 and status["lastFailure"]["pod"] == "doomed-worker-1"
    assert "rank 1 was killed by SIGKILL" in status["message"], status["message"]

    # The surviving rank of the failed gang is stopped within its grace period...
    wait_for(lambda: not pids_of_job("doomed"), "every worker process of doomed gone", timeout=WORKER_GRACE_SECONDS + 30)
    # ...and deleting the failed job's pods never brings them back.
    kubectl.run("delete", "pods", "-l", "kubetune.dev/job-name=doomed", "--wait=false")
    wait_for(lambda: not pods_of(kubectl, "doomed"), "doomed's pods gone", timeout=120)
    time.sleep(12)  # two of the operator's ticks
    assert pods_of(kubectl, "doomed") == [] and status_of(kubectl, "doomed")["phase"] == "Failed"
    kubectl.run("delete", "ftj", "doomed", "--wait=false")  # (a TTL's deletion: test_operator_on_cluster.py)


def test_the_active_deadline_fails_the_job_and_stops_every_rank(stack):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=endless_job("deadline", spec__runPolicy={"activeDeadlineSeconds": 15}))
    wait_for_phase(kubectl, "deadline", "Running", timeout=300)
    status = follow_job(kubectl, "deadline", timeout=120, echo=False)["status"]
    assert status["phase"] == "Failed"
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["DeadlineExceeded"]
    assert status["message"] == "the job ran longer than spec.runPolicy.activeDeadlineSeconds (15s)"
    wait_for(lambda: not pids_of_job("deadline"), "every worker process gone", timeout=WORKER_GRACE_SECONDS + 30)
    kubectl.run("delete", "ftj", "deadline", "--wait=false")


def test_a_rank_stopped_with_sigstop_is_restarted_as_stalled(stack):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=endless_job("stalled", spec__runPolicy={
        "stallTimeoutSeconds": 20, "backoffLimit": 0}))
    wait_for_step(kubectl, "stalled")
    stopped = signal_rank("stalled", 1, signal.SIGSTOP)
    try:
        status = follow_job(kubectl, "stalled", timeout=180, echo=False)["status"]
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)  # let it see its SIGTERM and go
        except ProcessLookupError:
            pass
    assert status["phase"] == "Failed", status
    assert status["lastFailure"]["reason"] == "Stalled"
    assert "no new optimizer step for 20s (last at step" in status["message"]
    kubectl.run("delete", "ftj", "stalled", "--wait=false")


def test_an_image_that_cannot_start_fails_the_job_with_its_reason(stack):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=manifest(
        metadata__name="bad-image", spec__workers__image="registry.example/no-such-trainer:1",
        spec__output__adapterUri="s3://adapters/bad-image/", spec__runPolicy={"startupTimeoutSeconds": 10}))
    waiting = wait_for(lambda: "cannot start" in status_of(kubectl, "bad-image").get("message", "")
                       and status_of(kubectl, "bad-image"), "the reason shown while waiting", timeout=60)
    assert "registry.example/no-such-trainer" in waiting["message"]
    status = follow_job(kubectl, "bad-image", timeout=120, echo=False)["status"]
    assert status["phase"] == "Failed"
    reason = next(c["reason"] for c in status["conditions"] if c["type"] == "Failed")
    assert reason in ("ErrImagePull", "ImagePullBackOff"), status
    assert "startupTimeoutSeconds (10s)" in status["message"] and "no-such-trainer" in status["message"]
    assert pods_of(kubectl, "bad-image") == []  # no worker was created for a job that could not validate


def test_suspend_and_resume_continue_from_the_checkpoint(stack, uninterrupted):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=long_job("paused"))
    after_a_checkpoint(stack, "paused")
    held = hold_ranks("paused")  # an idle machine trains the 80 steps in seconds: suspend lands mid-run
    kubectl.run("patch", "ftj", "paused", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    release_on_sigterm(held, watched=held)
    wait_for_phase(kubectl, "paused", "Suspended", timeout=60)
    wait_for(lambda: not pods_of(kubectl, "paused") and not rank_pids("paused", 0), "paused's workers gone",
             timeout=WORKER_GRACE_SECONDS + 30)
    assert status_of(kubectl, "paused")["phase"] == "Suspended"

    kubectl.run("patch", "ftj", "paused", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    status = follow_job(kubectl, "paused", timeout=600, echo=False)["status"]
    assert status["phase"] == "Succeeded" and "restarts" not in status, status
    assert status["launched"]["attempt"] == 2
    assert_continued_like(published(stack.s3, "paused")["results"], uninterrupted)


def test_a_missing_credentials_secret_is_named_while_validating_and_fails_the_job(stack):
    kubectl = stack.kubectl
    kubectl.run("apply", "-f", "-", input=manifest(
        metadata__name="no-secret", spec__storage__credentialsSecret="no-such-secret",
        spec__output__adapterUri="s3://adapters/no-secret/", spec__runPolicy={"startupTimeoutSeconds": 10}))
    waiting = wait_for(lambda: "no-such-secret" in status_of(kubectl, "no-secret").get("message", "")
                       and status_of(kubectl, "no-secret"), "the Secret named while validating", timeout=60)
    assert waiting["phase"] == "Validating" and "CreateContainerConfigError" in waiting["message"]
    status = follow_job(kubectl, "no-secret", timeout=120, echo=False)["status"]
    assert status["phase"] == "Failed"
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["CreateContainerConfigError"]
    assert 'secret "no-such-secret" not found' in status["message"], status["message"]
    assert pods_of(kubectl, "no-secret") == []

"""The job's life on a real cluster, each behaviour as a user meets it with kubectl: a deleted
worker restarts the gang; restarts are bounded; time is bounded (deadline, start-up); finished
is final; suspend keeps the progress (killed and stalled workers: test_worker_chaos.py). The local node runs pods as processes, so the tests kill, stop and
count real worker processes."""

from __future__ import annotations

import signal
import time

import pytest
from e2e_tools import (
    after_a_checkpoint, assert_continued_like, endless_job, hold_ranks, long_job, manifest, pids_of_job, pods_of,
    published, rank_pids, release_on_sigterm, signal_rank, status_of, wait_for, wait_for_phase, wait_for_step,
)

from kubetune.cli.demo import follow_job
from kubetune.operator.manifests import WORKER_GRACE_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_kubectl_delete_pod_of_a_worker_restarts_the_gang(stack):
    """Deleted rather than killed: the same restart (which test_worker_chaos.py follows to the end)."""
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

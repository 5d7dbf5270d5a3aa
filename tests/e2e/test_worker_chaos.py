"""Chaos rows 3 and 4 on the local cluster, with real worker processes (the local node runs pods
as processes, so a test kills and stops real ranks):

3. A worker SIGKILLed during a step, or while a checkpoint is uploading: the gang restarts,
   resumes from the newest COMPLETE checkpoint (never the one being uploaded), and its run is
   the uninterrupted run's: the same loss at every one of the 80 steps, the same trained tokens
   and token positions (no sample repeated or skipped); never two pods for one rank.
4. A rank stopped with SIGSTOP, or sleeping in its loop (a silent stall: its /metrics still
   answers): the operator fails the job as Stalled within the stall timeout, naming the worker
   that holds the gang up; and a long healthy run with a tight stall timeout (checkpoints and
   evaluations between steps) is never taken for a stalled one.

Each trial picks its rank and moment at random; ``make chaos`` runs the full counts.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from chaos_table import FULL, TABLE, trials
from e2e_tools import (
    STEPS, after_a_checkpoint, complete_checkpoints, endless_job, long_job, published, s3_text, signal_rank,
    status_of, wait_for, wait_for_phase, wait_for_step,
)
from kubernetes import client, config
from simulated import PodLedger

from kubetune.cli.demo import follow_job
from kubetune.operator.progress import metrics_url, steps_begun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(7200)]
STALL_SECONDS = 10
STALL_SLACK_SECONDS = 15
"""Beyond the stall timeout: the operator's tick (2 s), its scrape and probe timeouts (2 s
each), the status write."""
SILENT_STALL = Path(__file__).with_name("stall")  # its sitecustomize.py


@pytest.fixture(scope="module")
def ledger(stack):
    """Every worker pod of the module's jobs, from one watch: never two for one rank."""
    core = client.CoreV1Api(config.new_client_from_config(stack.cluster.kubeconfig))
    with PodLedger(core) as ledger:
        yield ledger
    assert ledger.duplicates == []


def _metrics_of(kubectl, name: str, index: int) -> str:
    return metrics_url(kubectl.json("get", "pod", f"{name}-worker-{index}"))


def _begun(url: str) -> int | None:
    try:
        return steps_begun(urllib.request.urlopen(url, timeout=2).read().decode())
    except OSError:
        return None


def _uploading(s3, prefix: str) -> int | None:
    """The step of a checkpoint whose upload is under way: fewer of its files in S3 than a
    COMPLETE checkpoint of the same listing has (COMPLETE comes at the next checkpoint, so a
    folder without it may be whole already)."""
    counts: dict[str, int] = {}
    complete: set[str] = set()
    for obj in s3.list_objects_v2(Bucket="adapters", Prefix=prefix).get("Contents", []):
        folder, _, file = obj["Key"][len(prefix):].partition("/")
        if not folder.startswith("step-"):
            continue  # tokenized/: the examples kept for restarts, no checkpoint
        if file == "COMPLETE":
            complete.add(folder)
        else:
            counts[folder] = counts.get(folder, 0) + 1
    files = max((counts.get(folder, 0) for folder in complete), default=0)
    partial = [folder for folder, count in counts.items() if folder not in complete and 0 < count < files]
    return int(partial[0].removeprefix("step-")) if partial else None


@pytest.mark.parametrize("moment", [
    # make test runs the upload moment only: the same kill, restart and exact resume, at the
    # moment that can go wrong in more ways (a checkpoint half uploaded). make chaos runs both.
    pytest.param("step", marks=pytest.mark.skipif(not FULL, reason="make chaos (KUBETUNE_CHAOS=full) runs it")),
    "upload",
])
def test_a_worker_killed_mid_run_resumes_from_a_complete_checkpoint_as_if_never_killed(
        stack, ledger, uninterrupted, moment):
    fault = ("Worker SIGKILLed during a step" if moment == "step"
             else "Worker SIGKILLed while a checkpoint uploads")
    row = TABLE.row(fault, "recovery (s)")
    for trial in range(trials(10)):
        _killed_trial(stack, ledger, uninterrupted, row, f"killed-{moment}-{trial}", moment)


def _killed_trial(stack, ledger, uninterrupted, row, name: str, moment: str) -> None:
    kubectl, s3 = stack.kubectl, stack.s3
    prefix = f"{name}-checkpoints/"
    kubectl.run("apply", "-f", "-", input=long_job(name, spec__runPolicy={"skipPreflight": True}))
    after_a_checkpoint(stack, name)
    url = _metrics_of(kubectl, name, 0)
    rank = random.randrange(2)
    if moment == "step":
        time.sleep(random.uniform(0, 0.5))
    else:
        wait_for(lambda: _uploading(s3, prefix), "a checkpoint upload under way", timeout=120, every=0.02)
    begun = _begun(url)
    signal_rank(name, rank, signal.SIGKILL)
    killed_at = time.monotonic()
    problems: list[str] = []
    lost = 0
    try:
        restarting = wait_for_phase(kubectl, name, "Restarting", timeout=120)
        newest = complete_checkpoints(s3, "adapters", prefix)[-1]  # the killed gang completes no other
        failure = restarting["lastFailure"]
        if failure["pod"] != f"{name}-worker-{rank}" or "SIGKILL" not in failure["message"]:
            problems.append(f"the failure names the wrong pod or cause: {failure}")
        running = wait_for_phase(kubectl, name, "Running", timeout=180)
        wait_for(lambda: (status_of(kubectl, name).get("progress") or {}).get("stepTime", "")
                 > running["launched"]["runningTime"], "a step of attempt 2", timeout=300)
        recovery = time.monotonic() - killed_at
        status = follow_job(kubectl, name, timeout=600, echo=False)["status"]
        results = published(s3, name)["results"] if status["phase"] == "Succeeded" else {}
        resumed = results.get("resumedFromStep")
        if status["phase"] != "Succeeded" or status.get("restarts") != 1:
            problems.append(f"ended {status['phase']} after {status.get('restarts')} restarts: {status.get('message')}")
        elif resumed != newest:
            problems.append(f"resumed from step {resumed}, not from the newest complete checkpoint {newest}")
        else:
            lost = int(not _same_run(results, uninterrupted, problems))
        steps_lost = max(0, (begun or 1) - 1 - (resumed or 0))
        if rank == 1 and "Signal 9 (SIGKILL) received by PID" not in s3_text(
                s3, f"{name}-checkpoints.logs/attempt-1/{name}-worker-1.log"):
            problems.append("the killed rank's torchrun report is not in its attempt-1 log")
    except AssertionError as error:
        problems.append(str(error))
        recovery, steps_lost = None, None
    row.record(not problems and not ledger.duplicates, lost=lost, figure=recovery,
               note=f"{name}: {problems}", more={"steps lost": steps_lost} if steps_lost is not None else None)
    kubectl.run("delete", "ftj", name, "--wait=false")
    assert not problems, problems
    assert not ledger.duplicates, ledger.duplicates


def _same_run(results: dict, uninterrupted: dict, problems: list[str]) -> bool:
    """The resumed run is the uninterrupted one: every step's loss, every sample once."""
    found = len(problems)
    history, expected = results["lossHistory"], uninterrupted["lossHistory"]
    if [step for step, _ in history] != [step for step, _ in expected] or len(history) != STEPS:
        problems.append(f"logged steps differ: {[s for s, _ in history]}")
        return False
    off = [(step, loss, want) for (step, loss), (_, want) in zip(history, expected)
           if not math.isclose(loss, want, rel_tol=1e-3)]
    if off:
        problems.append(f"losses differ from the uninterrupted run's at {len(off)} steps, first {off[:3]}")
    for key in ("tokens", "positions"):  # a repeated or skipped example changes both
        if results[key] != uninterrupted[key]:
            problems.append(f"{key}: {results[key]} trained, the uninterrupted run {uninterrupted[key]}")
    return len(problems) == found


@pytest.mark.parametrize("how", ["sigstop", "sleep"])
def test_a_stalled_rank_fails_the_job_naming_its_worker_within_the_stall_timeout(stack, ledger, how):
    fault = ("A rank stopped with SIGSTOP" if how == "sigstop"
             else "A rank sleeping in its loop (silent stall, /metrics answers)")
    row = TABLE.row(fault, f"detected after the {STALL_SECONDS} s timeout (s)")
    for trial in range(trials(10)):
        _stalled_trial(stack, row, f"stalled-{how}-{trial}", how)


def _stalled_trial(stack, row, name: str, how: str) -> None:
    kubectl = stack.kubectl
    rank = random.randrange(2)
    policy = {"stallTimeoutSeconds": STALL_SECONDS, "backoffLimit": 0, "skipPreflight": True}
    env, after = [], random.randint(3, 40)
    if how == "sleep":
        env = [{"name": "PYTHONPATH", "value": str(SILENT_STALL)},
               {"name": "FAULT_RANK", "value": str(rank)},
               {"name": "FAULT_AFTER_STEP", "value": str(after)}]
    kubectl.run("apply", "-f", "-", input=endless_job(name, spec__runPolicy=policy, spec__workers__env=env))
    stopped = None
    if how == "sigstop":
        wait_for_step(kubectl, name)
        time.sleep(random.uniform(0, 2))
        stopped = signal_rank(name, rank, signal.SIGSTOP)
        stalled_at = time.monotonic()
    problems: list[str] = []
    try:
        if how == "sleep":
            wait_for_phase(kubectl, name, "Running")
            url = _metrics_of(kubectl, name, 0)
            # The sleeper stops after step `after`: rank 0 begins no step past after + 1.
            wait_for(lambda: (_begun(url) or 0) >= after, f"step {after}", timeout=300, every=0.05)
            stalled_at = time.monotonic()
        status = follow_job(kubectl, name, timeout=STALL_SECONDS + 120, echo=False)["status"]
        detected = time.monotonic() - stalled_at - STALL_SECONDS
        failure = status.get("lastFailure") or {}
        if status["phase"] != "Failed" or failure.get("reason") != "Stalled":
            problems.append(f"ended {status['phase']}: {status.get('message')}")
        if failure.get("pod") != f"{name}-worker-{rank}":
            problems.append(f"named {failure.get('pod')}, not the {how} rank's {name}-worker-{rank}: "
                            f"{failure.get('message')}")
        if detected > STALL_SLACK_SECONDS:
            problems.append(f"detected {detected:.1f} s after the stall timeout")
    except AssertionError as error:
        problems.append(str(error))
        detected = None
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)  # let it see its SIGTERM and go
            except ProcessLookupError:
                pass
    row.record(not problems, figure=detected, note=f"{name}: {problems}")
    kubectl.run("delete", "ftj", name, "--wait=false")
    assert not problems, problems


def test_a_long_healthy_run_with_a_tight_stall_timeout_is_never_restarted(stack):
    """Checkpoint uploads and epoch-end evaluations pause the steps; none of it is a stall."""
    kubectl, name = stack.kubectl, "healthy"
    steps = trials(3000, 300)
    row = TABLE.row(f"Healthy run, {steps} steps, stall timeout {STALL_SECONDS} s (false restarts)",
                    "steps per second")
    kubectl.run("apply", "-f", "-", input=long_job(
        name, spec__training__maxSteps=steps, spec__training__epochs=steps,
        spec__runPolicy={"stallTimeoutSeconds": STALL_SECONDS, "backoffLimit": 0, "skipPreflight": True}))
    running = wait_for_phase(kubectl, name, "Running", timeout=300)
    status = follow_job(kubectl, name, timeout=3600, echo=False)["status"]
    results = published(stack.s3, name)["results"] if status["phase"] == "Succeeded" else {}
    healthy = status["phase"] == "Succeeded" and not status.get("restarts") and results.get("steps") == steps
    row.record(healthy, figure=steps / results["trainSeconds"] if results else None,
               note=f"{status['phase']}: {status.get('message')}")
    kubectl.run("delete", "ftj", name, "--wait=false")
    assert healthy, (running, status)

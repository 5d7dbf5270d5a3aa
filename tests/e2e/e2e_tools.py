"""What the end-to-end tests do to jobs and their processes: manifests derived from the
quickstart, the worker processes on this machine (the local node runs pods as processes), and
waiting for a job to get somewhere."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kubetune.cli.demo import Kubectl, find_repo_root

REPO = find_repo_root(Path(__file__).resolve().parent)
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def manifest(path: Path = QUICKSTART, **overrides: Any) -> str:
    """The manifest at ``path`` with fields replaced: ``spec__training__maxSteps=60``."""
    job = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        node = job
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return yaml.safe_dump(job)


STEPS = 80


def long_job(name: str, **overrides: object) -> str:
    """The quickstart trained for 80 steps with a checkpoint every 5: long enough to interrupt."""
    return manifest(**{"metadata__name": name, "spec__training__maxSteps": STEPS, "spec__training__epochs": 10,
                       "spec__output__adapterUri": f"s3://adapters/{name}/",
                       "spec__output__checkpointUri": f"s3://adapters/{name}-checkpoints/",
                       "spec__output__checkpointEverySteps": 5, **overrides})


def endless_job(name: str, **overrides: object) -> str:
    return manifest(metadata__name=name, spec__training__maxSteps=100000, spec__training__epochs=1000,
                    spec__output__adapterUri=f"s3://adapters/{name}/", **overrides)


def published(s3: Any, name: str) -> dict[str, Any]:
    return json.loads(s3_text(s3, f"{name}/manifest.json"))


def s3_text(s3: Any, key: str, bucket: str = "adapters") -> str:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def assert_continued_like(results: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    """Resumed mid-run from a checkpoint (not from zero), with the losses of the uninterrupted run."""
    assert 5 <= (results["resumedFromStep"] or 0) < STEPS, results["resumedFromStep"]
    assert results["steps"] == uninterrupted["steps"] == STEPS
    assert math.isclose(results["finalLoss"], uninterrupted["finalLoss"], rel_tol=1e-3), (
        results["finalLoss"], uninterrupted["finalLoss"])


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def pids_of_job(job_name: str) -> list[int]:
    """Every torchrun of the job's workers (not the log keeper that started it)."""
    return [pid for pid in _pids() if f"--master-addr={job_name}-worker-0." in (line := _cmdline(pid))
            and "kubetune.trainer.logkeeper" not in line]


def rank_pids(job_name: str, node_rank: int) -> list[int]:
    """The training processes torchrun started in worker pod ``node_rank``."""
    launchers = {pid for pid in pids_of_job(job_name) if f"--node-rank={node_rank} " in _cmdline(pid) + " "}
    children = []
    for pid in _pids():
        try:
            status = (Path("/proc") / str(pid) / "status").read_text()
        except OSError:
            continue
        parent = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)
        if parent in launchers and "kubetune.trainer" in _cmdline(pid):
            children.append(pid)
    return children


def signal_rank(job_name: str, node_rank: int, sig: signal.Signals, timeout: float = 120) -> int:
    """Send ``sig`` to the training process of worker ``node_rank`` once it exists; its pid."""
    pid = wait_for(lambda: (rank_pids(job_name, node_rank) or [None])[0], f"rank process of worker {node_rank}",
                   timeout)
    os.kill(pid, sig)
    return pid


def hold_ranks(job_name: str, workers: int = 2) -> list[int]:
    """SIGSTOP every training process of the job: it stays mid-run, however fast this machine
    trains, until :func:`release_on_sigterm` lets it go."""
    pids = [pid for rank in range(workers) for pid in rank_pids(job_name, rank)]
    assert pids, f"no training process of {job_name}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def _sigterm_pending(pid: int) -> bool:
    """SIGTERM waits in the process's signal queue (a stopped process takes it when continued)."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return True  # gone: nothing more will reach it
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


def release_on_sigterm(held: list[int], watched: list[int], timeout: float = 60) -> None:
    """Once each of ``watched`` has its SIGTERM waiting, SIGCONT every process of ``held``: they
    stop at the step they were held at, not at one they reached racing the signal."""
    try:
        wait_for(lambda: all(_sigterm_pending(pid) for pid in watched), "SIGTERM reaching the held ranks",
                 timeout, every=0.1)
    finally:
        for pid in held:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def wait_for(check: Callable[[], Any], what: str, timeout: float = 300, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout:.0f}s: {what}")
        time.sleep(every)


def status_of(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return kubectl.json("get", "ftj", name).get("status") or {}


def wait_for_phase(kubectl: Kubectl, name: str, *phases: str, timeout: float = 300) -> dict[str, Any]:
    """The job's status once its phase is one of ``phases``; fails early if it finished otherwise."""
    def reached() -> dict[str, Any] | None:
        status = status_of(kubectl, name)
        if status.get("phase") in phases:
            return status
        assert status.get("phase") not in ("Succeeded", "Failed"), f"{name} ended {status.get('phase')}: {status}"
        return None
    return wait_for(reached, f"{name} {'/'.join(phases)}", timeout)


def wait_for_step(kubectl: Kubectl, name: str, step: int = 1, timeout: float = 300) -> dict[str, Any]:
    """The job's status once the operator has seen it reach optimizer step ``step``."""
    def reached() -> dict[str, Any] | None:
        status = status_of(kubectl, name)
        assert status.get("phase") not in ("Succeeded", "Failed"), f"{name} ended {status.get('phase')}: {status}"
        return status if (status.get("progress") or {}).get("step", 0) >= step else None
    return wait_for(reached, f"{name} at step {step}", timeout)


def complete_checkpoints(s3: Any, bucket: str, prefix: str) -> list[int]:
    """Steps with a COMPLETE marker under s3://bucket/prefix."""
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(int(obj["Key"][len(prefix):].split("/")[0].removeprefix("step-"))
                  for obj in listing if obj["Key"].endswith("/COMPLETE"))


def after_a_checkpoint(stack: Any, name: str) -> int:
    """Once the job runs and has a complete checkpoint: its step."""
    wait_for_phase(stack.kubectl, name, "Running", timeout=300)
    return wait_for(lambda: (complete_checkpoints(stack.s3, "adapters", f"{name}-checkpoints/") or [0])[-1],
                    f"a complete checkpoint of {name}", timeout=300, every=0.1)


def pods_of(kubectl: Kubectl, name: str, component: str = "worker") -> list[dict[str, Any]]:
    return kubectl.json("get", "pods", "-l",
                        f"kubetune.dev/job-name={name},app.kubernetes.io/component={component}")["items"]

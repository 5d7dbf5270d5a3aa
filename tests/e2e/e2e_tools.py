"""What the end-to-end tests do to jobs and their processes: manifests derived from the
quickstart, the worker processes on this machine (the local node runs pods as processes), and
waiting for a job to get somewhere."""

from __future__ import annotations

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


def pods_of(kubectl: Kubectl, name: str, component: str = "worker") -> list[dict[str, Any]]:
    return kubectl.json("get", "pods", "-l",
                        f"kubetune.dev/job-name={name},app.kubernetes.io/component={component}")["items"]

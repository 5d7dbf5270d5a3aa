"""`kubectl kubetune logs NAME [-f] [--rank K] [--attempt N] [--from-s3]`: a job's logs.

Every worker pod of the current attempt (or of --attempt N), interleaved in time order, each line
prefixed with ``[worker-K]``; the preflight pod's as ``[preflight]`` while the job is Validating
(or when it never got further). ``--rank K`` shows worker pod K alone (its torchrun node rank;
with several GPUs per worker, all of that pod's ranks). ``-f`` follows them until the job ends,
into the next attempt's pods after a gang restart.

The pods of an earlier attempt, and those a finished job's cleanPodPolicy deleted, are gone; each
worker's whole log is kept in S3 (``status.launched.logsUri``, ``status.lastFailure.logUri``;
``kubetune.api.logs``) and ``--from-s3`` reads it from there.
"""

from __future__ import annotations

import argparse
import itertools
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.logs import attempt_logs_uri, worker_log_uri
from kubetune.api.spec import Output
from kubetune.cli.jobs.common import (
    describe_command, ATTEMPT_LABEL, COMPONENT_LABEL, CONTAINER, REPLICA_INDEX_LABEL, CommandError, Kubectl, add_cluster_flags,
    handles_errors, paint, prog, use_colour,
)
from kubetune.cli.jobs.s3 import add_s3_flags, store_for

HELP = "worker logs of a job, [worker-K]-prefixed and interleaved (-f follows; --from-s3 once the pods are gone)"
FINAL = ("Succeeded", "Failed")
PREFIX_COLOURS = ("blue", "magenta", "cyan", "yellow", "green")
POLL_SECONDS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe_command(parser, __doc__)
    parser.add_argument("name", help="the FineTuneJob")
    parser.add_argument("-f", "--follow", action="store_true", help="follow the logs until the job ends")
    parser.add_argument("--rank", type=int, metavar="K", help="only worker pod K (its node rank)")
    parser.add_argument("--attempt", type=int, metavar="N", help="attempt N (default: the current one)")
    parser.add_argument("--from-s3", action="store_true",
                        help="read the logs the workers kept in S3 (status.launched.logsUri), e.g. once the pods are gone")
    parser.add_argument("--tail", type=int, metavar="LINES", help="only the last LINES lines of each pod")
    parser.add_argument("--timestamps", action="store_true", help="keep each line's timestamp (from the pods)")
    add_s3_flags(parser)
    add_cluster_flags(parser)


@dataclass
class Target:
    """One pod whose log is shown."""

    prefix: str
    pod: dict[str, Any]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def uid(self) -> str:
        return self.pod["metadata"].get("uid", self.name)

    @property
    def started(self) -> bool:
        """kubectl logs has something to read: the container runs or ran."""
        for container in (self.pod.get("status") or {}).get("containerStatuses") or []:
            state = container.get("state") or {}
            if "running" in state or "terminated" in state or container.get("lastState", {}).get("terminated"):
                return True
        return False

    @property
    def waiting(self) -> str:
        for container in (self.pod.get("status") or {}).get("containerStatuses") or []:
            reason = ((container.get("state") or {}).get("waiting") or {}).get("reason")
            if reason:
                return reason
        return (self.pod.get("status") or {}).get("phase", "Pending")


def current_attempt(job: dict[str, Any]) -> int | None:
    return ((job.get("status") or {}).get("launched") or {}).get("attempt")


def select(job: dict[str, Any], pods: list[dict[str, Any]], attempt: int | None, rank: int | None,
           *, preflight: bool) -> list[Target]:
    """The pods to show: the attempt's workers (one rank, or all by rank), the preflight first
    when ``preflight``; pods being deleted are still shown (their logs are readable)."""
    targets = []
    if preflight and rank is None:
        targets += [Target("preflight", pod) for pod in pods
                    if pod["metadata"].get("labels", {}).get(COMPONENT_LABEL) == "preflight"]
    workers = []
    for pod in pods:
        labels = pod["metadata"].get("labels", {})
        if labels.get(COMPONENT_LABEL) != "worker" or attempt is None or labels.get(ATTEMPT_LABEL) != str(attempt):
            continue
        index = int(labels.get(REPLICA_INDEX_LABEL, pod["metadata"]["name"].rsplit("-", 1)[-1]))
        if rank is None or index == rank:
            workers.append((index, Target(f"worker-{index}", pod)))
    return targets + [target for _, target in sorted(workers, key=lambda pair: pair[0])]


def show_preflight(job: dict[str, Any]) -> bool:
    """The preflight's log matters while Validating, or when no worker was ever started."""
    status = job.get("status") or {}
    return status.get("phase") in ("Validating", None) or not status.get("launched")


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)? ")


def split_timestamp(line: str) -> tuple[tuple[str, str], str, str]:
    """``(sort key, stamp, text)`` of a `kubectl logs --timestamps` line; a line without a stamp
    sorts first."""
    match = _STAMP.match(line)
    if not match:
        return ("", ""), "", line
    return (match.group(1), (match.group(2) or "").ljust(9, "0")), line[:match.end() - 1], line[match.end():]


def interleave(logs: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(prefix, stamp, text)`` of every line of every log, in time order (stable per pod)."""
    lines = []
    for order, (prefix, text) in enumerate(logs.items()):
        for number, line in enumerate(text.splitlines()):
            key, stamp, rest = split_timestamp(line)
            lines.append((key, order, number, prefix, stamp, rest))
    lines.sort(key=lambda item: (item[0], item[1], item[2]))
    return [(prefix, stamp, rest) for _, _, _, prefix, stamp, rest in lines]


class Printer:
    def __init__(self, timestamps: bool = False, colour: bool = False) -> None:
        self.colours: dict[str, str] = {}
        self.cycle = itertools.cycle(PREFIX_COLOURS)
        self.timestamps = timestamps
        self.colour = colour

    def line(self, prefix: str, stamp: str, text: str) -> None:
        if prefix not in self.colours:
            self.colours[prefix] = next(self.cycle)
        head = paint(f"[{prefix}]", self.colours[prefix], self.colour)
        print(f"{head} {stamp + ' ' if self.timestamps and stamp else ''}{text}", flush=True)


def _gone(job: dict[str, Any], attempt: int | None, rank: int | None) -> CommandError:
    name = job["metadata"]["name"]
    if attempt is None:
        return CommandError(f"{name} has not started any worker yet (phase {(job.get('status') or {}).get('phase')}); "
                            f"`{prog()} logs {name} -f` waits for them")
    folder = kept_logs_uri(job, attempt)
    which = f"worker {rank}" if rank is not None else "workers"
    return CommandError(f"the {which} of attempt {attempt} of {name} are gone (their pods were deleted); their whole "
                        f"logs are kept in S3 under {folder}\n  read them with: {prog()} logs {name} "
                        f"--from-s3{f' --attempt {attempt}' if attempt != current_attempt(job) else ''}"
                        f"{f' --rank {rank}' if rank is not None else ''}")


def _check_attempt(job: dict[str, Any], attempt: int | None) -> None:
    current = current_attempt(job)
    if attempt is not None and (attempt < 1 or current is None or attempt > current):
        so_far = f"attempts 1 to {current}" if current and current > 1 else f"attempt {current}" if current else "none yet"
        raise CommandError(f"{job['metadata']['name']} has no attempt {attempt} ({so_far})")


def kept_logs_uri(job: dict[str, Any], attempt: int) -> str:
    """The S3 folder holding attempt ``attempt``'s worker logs (kubetune.api.logs)."""
    launched = (job.get("status") or {}).get("launched") or {}
    if launched.get("attempt") == attempt and launched.get("logsUri"):
        return launched["logsUri"]
    return attempt_logs_uri(Output.model_validate(job["spec"]["output"]), attempt)


@handles_errors
def main(args: argparse.Namespace) -> int:
    kubectl = Kubectl.from_args(args)
    job = kubectl.job(args.name)
    printer = Printer(timestamps=args.timestamps, colour=use_colour())
    if args.from_s3:
        return from_s3(job, kubectl, args, printer)
    if args.follow:
        return follow(kubectl, job, args, printer)
    attempt = args.attempt or current_attempt(job)
    _check_attempt(job, args.attempt)
    targets = select(job, kubectl.pods(job), attempt, args.rank, preflight=show_preflight(job) and not args.attempt)
    readable = [target for target in targets if target.started]
    for target in targets:
        if not target.started:
            print(f"{prog()} logs: {target.name} has not started ({target.waiting}); nothing to show yet",
                  file=sys.stderr)
    if not readable:
        if targets:
            return 1
        raise _gone(job, attempt, args.rank)
    logs = {}
    for target in readable:
        command = ["logs", target.name, "-c", CONTAINER, "--timestamps"]
        if args.tail is not None:
            command.append(f"--tail={args.tail}")
        result = kubectl.run(*command, check=False, timeout=120)
        if result.returncode != 0:
            print(f"{prog()} logs: {target.name}: {result.stderr.strip()}", file=sys.stderr)
        logs[target.prefix] = result.stdout
    for prefix, stamp, text in interleave(logs):
        printer.line(prefix, stamp, text)
    return 0


@dataclass
class Follower:
    """`kubectl logs -f` of one pod in a thread, its lines into a shared queue."""

    target: Target
    process: subprocess.Popen
    thread: threading.Thread = field(init=False)

    def start(self, lines: queue.Queue) -> Follower:
        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.put((self.target.prefix, line.rstrip("\n")))
            self.process.wait()
        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def follow(kubectl: Kubectl, job: dict[str, Any], args: argparse.Namespace, printer: Printer) -> int:
    """Follow the job's pods, starting each as soon as its container runs, until the job has
    ended and every followed log is drained."""
    _check_attempt(job, args.attempt)
    lines: queue.Queue = queue.Queue()
    followers: dict[str, Follower] = {}
    shown_attempt = None
    name = args.name
    try:
        while True:
            attempt = args.attempt or current_attempt(job)
            preflight = show_preflight(job) and not args.attempt
            for target in select(job, kubectl.pods(job), attempt, args.rank, preflight=preflight):
                if target.uid in followers or not target.started:
                    continue
                if target.prefix != "preflight" and attempt != shown_attempt:
                    if shown_attempt is not None:
                        print(f"--- attempt {attempt} ---", flush=True)
                    shown_attempt = attempt
                command = ["logs", "-f", target.name, "-c", CONTAINER]
                if args.timestamps:
                    command.append("--timestamps")
                if args.tail is not None:
                    command.append(f"--tail={args.tail}")
                process = subprocess.Popen(kubectl.command(*command), stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, text=True, bufsize=1)
                followers[target.uid] = Follower(target, process).start(lines)
            _drain(lines, printer, wait=POLL_SECONDS)
            phase = (job.get("status") or {}).get("phase")
            fixed_attempt_over = args.attempt is not None and args.attempt != current_attempt(job)
            if (phase in FINAL or fixed_attempt_over) and all(f.done for f in followers.values()):
                _drain(lines, printer, wait=0)
                if not followers and fixed_attempt_over:
                    raise _gone(job, args.attempt, args.rank)
                if not followers:
                    print(f"{prog()} logs: {name} is {phase} and none of its pods is left to follow; "
                          f"try `{prog()} logs {name} --from-s3`", file=sys.stderr)
                    return 1
                return 0
            job = kubectl.job(name)
    finally:
        for follower in followers.values():
            if follower.process.poll() is None:
                follower.process.terminate()


def _drain(lines: queue.Queue, printer: Printer, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            prefix, text = lines.get(timeout=max(deadline - time.monotonic(), 0) if wait else 0)
        except queue.Empty:
            return
        _, stamp, rest = split_timestamp(text) if printer.timestamps else (None, "", text)
        printer.line(prefix, stamp, rest)


def from_s3(job: dict[str, Any], kubectl: Kubectl, args: argparse.Namespace, printer: Printer) -> int:
    """Each worker's kept log of the attempt, one after the other (the kept logs carry no
    timestamps to interleave them by)."""
    attempt = args.attempt or current_attempt(job)
    _check_attempt(job, args.attempt)
    name = job["metadata"]["name"]
    if attempt is None:
        raise CommandError(f"{name} never started a worker, so no worker log was kept "
                           f"(a preflight failure is in its status: `{prog()} status {name}`)")
    folder = kept_logs_uri(job, attempt)
    replicas = ((job.get("status") or {}).get("launched") or {}).get("replicas") \
        or (job["spec"].get("workers") or {}).get("replicas", 1)
    ranks = [args.rank] if args.rank is not None else list(range(replicas))
    store = store_for(job, kubectl, args)
    found = 0
    for rank in ranks:
        uri = worker_log_uri(folder, f"{name}-worker-{rank}")
        body = store.get(uri)
        if body is None:
            print(f"{prog()} logs: no kept log at {uri} (the worker never ran, or its uploads failed)",
                  file=sys.stderr)
            continue
        found += 1
        text = body.decode("utf-8", errors="replace").splitlines()
        if args.tail is not None:
            text = text[-args.tail:] if args.tail else []
        for line in text:
            printer.line(f"worker-{rank}", "", line)
    return 0 if found else 1

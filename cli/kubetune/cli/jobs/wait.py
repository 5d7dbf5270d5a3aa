"""`kubectl kubetune wait NAME [--timeout 30m]`: block until the job ends, for scripts and CI.

Exit status: 0 Succeeded, 1 Failed (its reason and message printed), 2 timeout or error (no
such job, no cluster). A phase change is reported on stderr as it happens, unless --quiet.
"""

from __future__ import annotations

import argparse
import sys
import time

from kubetune.cli.jobs.common import describe_command, CommandError, Kubectl, add_cluster_flags, format_duration, parse_duration, prog

HELP = "wait until a job ends: exit 0 Succeeded, 1 Failed, 2 timeout or error"
SUCCEEDED, FAILED, TIMEOUT = 0, 1, 2
POLL_SECONDS = 2.0
TOLERATED_ERRORS = 5
"""Consecutive failed polls (an API server restarting, a network blip) before giving up."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe_command(parser, __doc__)
    parser.add_argument("name", help="the FineTuneJob")
    parser.add_argument("--timeout", type=parse_duration, default=parse_duration("1h"), metavar="DURATION",
                        help="give up after this long: 90s, 30m, 2h (default 1h; 0 = check once)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but the outcome")
    add_cluster_flags(parser)


def main(args: argparse.Namespace) -> int:
    try:
        return _wait(args)
    except CommandError as error:
        print(f"{prog()} wait: {error}", file=sys.stderr)
        return TIMEOUT
    except KeyboardInterrupt:
        return 130


def _wait(args: argparse.Namespace) -> int:
    kubectl = Kubectl.from_args(args)
    deadline = time.monotonic() + args.timeout
    errors, seen, reported = 0, None, False
    while True:
        try:
            job = kubectl.job(args.name)
            errors = 0
        except CommandError as error:
            if str(error).startswith("no FineTuneJob") or "no FineTuneJob CRD" in str(error):
                raise
            errors += 1
            if errors >= TOLERATED_ERRORS:
                raise
            job = None
        if job is not None:
            status = job.get("status") or {}
            phase = status.get("phase")
            if (phase != seen or not reported) and not args.quiet:
                step = (status.get("progress") or {}).get("display")
                print(f"finetunejob/{args.name}: {phase or 'not reconciled yet'}" + (f" {step}" if step else ""),
                      file=sys.stderr, flush=True)
                reported = True
            seen = phase
            if phase == "Succeeded":
                adapter = (status.get("adapter") or {}).get("uri")
                print(f"finetunejob/{args.name} Succeeded" + (f": adapter {adapter}" if adapter else ""))
                return SUCCEEDED
            if phase == "Failed":
                reason = next((c.get("reason") for c in status.get("conditions") or []
                               if c.get("type") == "Failed" and c.get("status") == "True"), None)
                print(f"finetunejob/{args.name} Failed" + (f" ({reason})" if reason else "")
                      + f": {status.get('message') or 'no message'}")
                return FAILED
        if time.monotonic() >= deadline:
            print(f"{prog()} wait: finetunejob/{args.name} still {seen or 'unknown'} after "
                  f"{format_duration(args.timeout)} (--timeout)", file=sys.stderr)
            return TIMEOUT
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.05)))

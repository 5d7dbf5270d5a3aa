"""The `kubetune` command.

    kubetune local up [--detach] | down | status    the local cluster (real control plane, our node, S3)
    kubetune operator [--namespace NS]              the kopf operator (in a cluster or against KUBECONFIG)
    kubetune trainer --config PATH                  the worker entry point (what torchrun starts)
    kubetune demo                                   local cluster + quickstart job to Succeeded, then stop
    kubetune submit|status|logs|plot|adapter|wait   what users do with jobs; also `kubectl kubetune ...`

Each subcommand imports its component only when chosen, and each component comes with its own
extra (``pip install 'kubetune[operator]'``, ``[trainer]``, ``[local]``; ``[dev]`` is all of
them): the operator image never has torch, and `kubetune local` never loads the operator or
the trainer. The job commands (kubetune.cli.jobs, also the kubectl plugin `kubectl-kubetune`)
need kubectl and, for what they read from S3, the ``[cli]`` extra. A subcommand whose extra is
missing says which to install.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator
from importlib.metadata import version

# subcommand -> (module with add_arguments(parser) and main(args) -> int, the extra it needs, help)
_SUBCOMMANDS = {
    "local": ("kubetune.localcluster.cli", "local",
              "run the local cluster (real Kubernetes control plane, a local node, S3)"),
    "operator": ("kubetune.operator.main", "operator", "run the FineTuneJob operator"),
    "demo": ("kubetune.cli.demo", "dev", "run examples/quickstart.yaml on a fresh local cluster to Succeeded"),
    # What users do with jobs, the same commands as the kubectl plugin `kubectl kubetune`.
    "submit": ("kubetune.cli.jobs.submit", "cli", "create a FineTuneJob from a manifest (-f) or from flags"),
    "status": ("kubetune.cli.jobs.status", "cli", "a job's phase, progress, loss, restarts, cost, failure, adapter"),
    "logs": ("kubetune.cli.jobs.logs", "cli", "a job's worker logs, [worker-K]-prefixed (-f; --from-s3)"),
    "plot": ("kubetune.cli.jobs.plot", "cli", "a job's loss curve: the published loss.png and a sparkline"),
    "adapter": ("kubetune.cli.jobs.adapter", "cli", "download and verify a job's adapter; how to load and serve it"),
    "wait": ("kubetune.cli.jobs.wait", "cli", "wait for a job to end: exit 0 Succeeded, 1 Failed, 2 timeout"),
}


class MissingExtra(SystemExit):
    """A component's dependencies are not installed; exits 2 naming the extra to install."""


@contextlib.contextmanager
def _extra(extra: str, command: str) -> Iterator[None]:
    """Turn a missing third-party module, imported now or lazily later, into one line naming
    the extra that brings it."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").startswith("kubetune"):
            raise
        print(f"kubetune {command}: needs {error.name!r}, which this installation lacks; install the "
              f"{extra!r} extra: pip install 'kubetune[{extra}]'", file=sys.stderr)
        raise MissingExtra(2) from None


def _import(module_name: str, extra: str, command: str):  # type: ignore[no-untyped-def]
    with _extra(extra, command):
        return importlib.import_module(module_name)


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"kubetune {version('kubetune')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    subparsers.add_parser("trainer", help="train one worker's share of a job (pod entry point); --help for flags")
    for name, (module_name, extra, help_text) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:  # only the chosen component is imported
            _import(module_name, extra, name).add_arguments(sub)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trainer"]:
        # The trainer owns its flags (torchrun starts it as `-m kubetune.trainer` too).
        with _extra("trainer", "trainer"):
            return int(importlib.import_module("kubetune.trainer.__main__").main(argv[1:]))
    parser, _ = _parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, extra, _ = _SUBCOMMANDS[args.command]
    with _extra(extra, args.command):
        return int(importlib.import_module(module_name).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

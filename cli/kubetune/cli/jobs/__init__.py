"""`kubectl kubetune`: what users do with FineTuneJobs, as a kubectl plugin.

    kubectl kubetune submit NAME --model S3 --dataset S3 --output S3 [...]  | -f job.yaml
    kubectl kubetune status NAME [-o json]
    kubectl kubetune logs NAME [-f] [--rank K] [--attempt N] [--from-s3]
    kubectl kubetune plot NAME [-o loss.png]
    kubectl kubetune adapter NAME [--download DIR]
    kubectl kubetune wait NAME [--timeout 30m]

The executable ``kubectl-kubetune`` on PATH is what kubectl finds for `kubectl kubetune` (krew's
convention); the same subcommands are `kubetune submit|status|...`. kubectl's --kubeconfig,
--context and -n/--namespace (and KUBECONFIG) choose the cluster and namespace, and the
plugin talks to it through the real kubectl with the user's own rights. It needs kubetune.api
(pydantic, pyyaml) and, for what it reads from S3 (logs --from-s3, plot, adapter), boto3:
``pip install 'kubetune[cli]'``; never the operator, the trainer or the local cluster.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from kubetune.cli.jobs.common import add_cluster_flags, prog

COMMANDS = {
    name: f"kubetune.cli.jobs.{name}" for name in ("submit", "status", "logs", "plot", "adapter", "wait")
}
"""Subcommand -> module with HELP, add_arguments(parser) and main(args) -> exit status."""


def _version() -> str:
    try:
        return version("kubetune")
    except PackageNotFoundError:
        return "unknown"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0],
                                  epilog=f"`{prog()} COMMAND --help` for each command's flags.",
                                  allow_abbrev=False)
    top.add_argument("--version", action="version", version=f"kubetune {_version()}")
    add_cluster_flags(top, top_level=True)
    subparsers = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser().print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

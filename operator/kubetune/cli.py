"""The `kubetune` command.

    kubetune local up [--detach] | down | status    the local cluster (real control plane, our node, S3)
    kubetune operator [--namespace NS]              the kopf operator (in a cluster or against KUBECONFIG)
    kubetune trainer --config PATH                  the worker entry point (what torchrun starts)
    kubetune demo                                   local cluster + quickstart job to Succeeded, then stop

Each subcommand imports its component only when chosen: the operator image never loads torch,
and `kubetune local` never loads the operator or the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
_SUBCOMMANDS = {
    "local": ("kubetune.localcluster.cli", "run the local cluster (real Kubernetes control plane, a local node, S3)"),
    "operator": ("kubetune.operator.main", "run the FineTuneJob operator"),
    "demo": ("kubetune.demo", "run examples/quickstart.yaml on a fresh local cluster to Succeeded"),
}


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"kubetune {version('kubetune')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    subparsers.add_parser("trainer", help="train one worker's share of a job (pod entry point); --help for flags")
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:  # only the chosen component is imported
            importlib.import_module(module_name).add_arguments(sub)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trainer"]:
        # The trainer owns its flags (torchrun starts it as `-m kubetune.trainer` too).
        from kubetune.trainer.__main__ import main as trainer_main

        return trainer_main(argv[1:])
    parser, _ = _parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, _ = _SUBCOMMANDS[args.command]
    return int(importlib.import_module(module_name).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

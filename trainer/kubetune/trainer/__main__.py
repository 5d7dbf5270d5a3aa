"""Pod entrypoint: ``python -m kubetune.trainer --config /etc/kubetune/config.yaml``.

With ``--preflight`` it only checks the job's inputs and outputs on CPU (preflight.py), one
``ok|FAIL <check>: <detail>`` line each on stdout; exit 0 only if every check passed.

Exit codes: 0 = adapter trained and published; 1 = failed. Problems a user can fix
(config, data, storage) print ONE line on stderr naming what to fix, no traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kubetune.api.model import InvalidObjectError
from kubetune.api.trainer_config import load_config
from kubetune.trainer import termination
from kubetune.trainer.errors import TrainerError


def main(argv: list[str] | None = None, recipe: type | None = None) -> int:
    """``recipe``: a subclass of the LoRA recipe to run instead (the tests' fault injection)."""
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="Fine-tune a LoRA adapter as one worker of a kubetune FineTuneJob (run under torchrun).",
    )
    parser.add_argument(
        "--config", required=True, metavar="PATH", help="trainer config YAML (in a pod: /etc/kubetune/config.yaml)"
    )
    parser.add_argument(
        "--preflight", action="store_true",
        help="only check credentials, model, dataset and output prefixes on CPU (no GPU, no torch.distributed)",
    )
    args = parser.parse_args(argv)
    if args.preflight:
        return _preflight(args.config)
    try:
        # The config is checked before torch is imported (seconds), so typos fail at once.
        config = load_config(args.config)
        from kubetune.trainer.train import run

        results = run(config, recipe)
    except (TrainerError, InvalidObjectError) as exc:
        print(f"kubetune-trainer: error: {exc}", file=sys.stderr, flush=True)
        termination.write(termination.failure_message(str(exc)))
        return 1
    if results is not None:  # rank 0 only: it alone knows the final loss and published the adapter
        termination.write(termination.success_message(results, config.output.adapter_uri))
    return 0


def _preflight(config_path: str) -> int:
    from kubetune.trainer.preflight import CheckResult, run_preflight

    try:
        config = load_config(config_path)
    except InvalidObjectError as exc:
        results = [CheckResult("config", False, str(exc))]
        print(results[0].line(), flush=True)
    else:
        results = run_preflight(config, report=lambda line: print(line, flush=True))
    failed = [result.line() for result in results if not result.ok]
    if failed:
        # The first failure is the one to fix first; the termination message has room for it.
        termination.write(termination.failure_message("preflight: " + failed[0]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pod entrypoint: ``python -m kubetune.trainer --config /etc/kubetune/config.json``.

With ``--preflight`` it only checks the job's inputs and outputs on CPU (preflight.py), one
``ok|FAIL <check>: <detail>`` line each on stdout; exit 0 only if every check passed.

Exit codes (kubetune.api.termination.ExitCode; sysexits.h for bad input):

  0    adapter trained and published
  1    anything a restart may cure: a lost peer, a collective timeout, S3 unreachable, busy or
       throttling, a crash (a bug keeps its traceback)
  65   the dataset cannot be used as written (INVALID_DATA)
  77   S3 refused the credentials, or a bucket or input object does not exist (NO_ACCESS)
  78   the config cannot run as written, including a config file that does not load, or an
       adapterUri holding another job's adapter without output.overwrite (INVALID_CONFIG)
  79   the adapter missed qualityGate and was not published (QUALITY_GATE)
  80   ``--preflight`` found a problem (PREFLIGHT_FAILED)
  143  stopped on SIGTERM (the pod was deleted), with a checkpoint where checkpoints are on

Problems a user can fix print ONE line on stderr naming what to fix, no traceback. Every
ending but a crash also leaves the termination message (termination.py) with its exit code:
torchrun exits 1 whatever its ranks did, so the operator reads the code there; 65-80 fail the
job at once, 1 and 143 restart it.
"""

from __future__ import annotations

import argparse
import sys

from kubetune.api.model import InvalidObjectError
from kubetune.api.termination import ExitCode
from kubetune.api.trainer_config import load_config
from kubetune.trainer import termination
from kubetune.trainer.errors import Stopped, TrainerError


def main(argv: list[str] | None = None, recipe: type | None = None) -> int:
    """``recipe``: a subclass of the LoRA recipe to run instead (the tests' fault injection)."""
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="Fine-tune a LoRA adapter as one worker of a kubetune FineTuneJob (run under torchrun).",
    )
    parser.add_argument(
        "--config", required=True, metavar="PATH", help="trainer config, JSON or YAML (in a pod: /etc/kubetune/config.json)"
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
    except InvalidObjectError as exc:
        return _failed(str(exc), ExitCode.INVALID_CONFIG)
    except Stopped as exc:
        return _failed(str(exc), exc.exit_code, stopped=True, steps=exc.step, total_steps=exc.total_steps)
    except TrainerError as exc:
        return _failed(str(exc), exc.exit_code)
    if results is not None:  # rank 0 only: it alone knows the final loss and published the adapter
        termination.write(termination.success_message(results, config.output.adapter_uri))
    return ExitCode.SUCCEEDED


def _failed(error: str, exit_code: int, *, stopped: bool = False, steps: int | None = None,
            total_steps: int | None = None) -> int:
    """One line on stderr, the same in the termination message with the exit code; returns it.
    A stop on SIGTERM leaves an earlier message of another rank in place (termination.write)."""
    print(f"kubetune-trainer: {'stopped' if stopped else 'error'}: {error}", file=sys.stderr, flush=True)
    message = termination.failure_message(error, exit_code, steps=steps, total_steps=total_steps)
    termination.write(message, unless_written=stopped)
    return int(exit_code)


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
        # Every problem at once, so one fix-and-retry round covers them all; render() cuts
        # the end off where they exceed Kubernetes' 4096 bytes.
        error = "preflight: " + "; ".join(failed)
        termination.write(termination.failure_message(error, ExitCode.PREFLIGHT_FAILED))
        return ExitCode.PREFLIGHT_FAILED
    return ExitCode.SUCCEEDED


if __name__ == "__main__":
    sys.exit(main())

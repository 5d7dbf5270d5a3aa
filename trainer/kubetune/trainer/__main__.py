"""Pod entrypoint: ``python -m kubetune.trainer --config /etc/kubetune/config.yaml``.

Exit codes: 0 = adapter trained and published; 1 = failed. Problems a user can fix
(config, data, storage) print ONE line on stderr naming what to fix, no traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kubetune.trainer import termination
from kubetune.trainer.config import load_config
from kubetune.trainer.errors import TrainerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="Fine-tune a LoRA adapter as one worker of a kubetune FineTuneJob (run under torchrun).",
    )
    parser.add_argument(
        "--config", required=True, metavar="PATH", help="trainer config YAML (in a pod: /etc/kubetune/config.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        # The config is checked before torch is imported (seconds), so typos fail at once.
        config = load_config(args.config)
        from kubetune.trainer.train import run

        results = run(config)
    except TrainerError as exc:
        print(f"kubetune-trainer: error: {exc}", file=sys.stderr, flush=True)
        termination.write(termination.failure_message(str(exc)))
        return 1
    if results is not None:  # rank 0 only: it alone knows the final loss and published the adapter
        termination.write(termination.success_message(results, config.output.adapter_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())

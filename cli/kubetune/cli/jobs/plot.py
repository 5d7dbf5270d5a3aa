"""`kubectl kubetune plot NAME [-o loss.png]`: the loss curve of a job.

Once the adapter is published: its ``loss.png`` (training loss per logged step and the eval
losses, drawn by the trainer and listed in ``manifest.json`` like every adapter file, so its
sha256 is checked) is saved to -o, and the manifest's ``results.lossHistory`` is drawn in the
terminal as a sparkline. While the job still trains there is no PNG yet: the sparkline is drawn
from the loss lines rank 0 has logged so far (worker 0's pod log).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path
from typing import Any

from kubetune.api.results import eval_points
from kubetune.cli.jobs.adapter import published_manifest
from kubetune.cli.jobs.common import (
    describe_command, ATTEMPT_LABEL, COMPONENT_LABEL, CONTAINER, REPLICA_INDEX_LABEL, CommandError, Kubectl, add_cluster_flags,
    handles_errors, prog, unicode_ok,
)
from kubetune.cli.jobs.s3 import add_s3_flags, join, store_for

HELP = "the loss curve: the published loss.png (-o FILE) and a sparkline in the terminal"
PLOT_NAME = "loss.png"
BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_BLOCKS = "_.-:=+*#"
WIDTH = 60
_LOSS_LINE = re.compile(r"\bstep=(\d+)(?:/\d+)?\b.*?\bloss=([-+0-9.eE]+|nan|inf)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe_command(parser, __doc__)
    parser.add_argument("name", help="the FineTuneJob")
    parser.add_argument("-o", "--output", metavar="FILE", help="where to save the PNG (default NAME-loss.png)")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"sparkline width in characters (default {WIDTH})")
    add_s3_flags(parser)
    add_cluster_flags(parser)


def sparkline(values: list[float], width: int = WIDTH, fancy: bool = True) -> str:
    """``values`` as one line of block characters, lowest ▁ to highest █; longer series are
    averaged into ``width`` buckets."""
    values = [value for value in values if value == value]  # drop NaN
    if not values:
        return ""
    if len(values) > width:
        buckets = []
        for index in range(width):
            start, end = index * len(values) // width, (index + 1) * len(values) // width
            chunk = values[start:max(end, start + 1)]
            buckets.append(sum(chunk) / len(chunk))
        values = buckets
    blocks = BLOCKS if fancy else ASCII_BLOCKS
    low, high = min(values), max(values)
    if high == low:
        return blocks[len(blocks) // 2] * len(values)
    scale = (len(blocks) - 1) / (high - low)
    return "".join(blocks[int(round((value - low) * scale))] for value in values)


def describe_curve(history: list[tuple[int, float]], width: int = WIDTH, fancy: bool = True,
                   evals: list[tuple[int, float]] | None = None) -> str:
    """`loss 6.2312 ▇▇▆▅▄▃▂▂▁▁ 5.4493  (steps 1-150, min 5.4102 at step 141)` and an eval line."""
    if not history:
        return "no loss logged yet"
    steps = [step for step, _ in history]
    losses = [loss for _, loss in history]
    best = min(range(len(losses)), key=lambda i: losses[i])
    lines = [f"loss  {losses[0]:.4f} {sparkline(losses, width, fancy)} {losses[-1]:.4f}"
             f"   (steps {steps[0]}-{steps[-1]}, lowest {losses[best]:.4f} at step {steps[best]})"]
    if evals:
        arrow = " → " if fancy else " -> "
        lines.append("eval  " + arrow.join(f"{loss:.4f}@{step}" for step, loss in evals))
    return "\n".join(lines)


def losses_from_log(text: str) -> list[tuple[int, float]]:
    """(step, loss) of rank 0's `step=20/300 ... loss=2.4312 ...` lines, the last per step."""
    found: dict[int, float] = {}
    for line in text.splitlines():
        match = _LOSS_LINE.search(line)
        if match:
            try:
                found[int(match.group(1))] = float(match.group(2))
            except ValueError:
                continue
    return sorted(found.items())


def _live_history(kubectl: Kubectl, job: dict[str, Any]) -> list[tuple[int, float]]:
    attempt = ((job.get("status") or {}).get("launched") or {}).get("attempt")
    if attempt is None:
        return []
    for pod in kubectl.pods(job):
        labels = pod["metadata"].get("labels", {})
        if (labels.get(COMPONENT_LABEL) == "worker" and labels.get(ATTEMPT_LABEL) == str(attempt)
                and labels.get(REPLICA_INDEX_LABEL) == "0"):
            result = kubectl.run("logs", pod["metadata"]["name"], "-c", CONTAINER, check=False, timeout=120)
            return losses_from_log(result.stdout)
    return []


@handles_errors
def main(args: argparse.Namespace) -> int:
    kubectl = Kubectl.from_args(args)
    job = kubectl.job(args.name)
    fancy = unicode_ok()
    status = job.get("status") or {}
    if not (status.get("adapter") or {}).get("uri"):
        phase = status.get("phase")
        if phase in ("Succeeded", "Failed"):
            raise CommandError(f"{args.name} is {phase} without a published adapter, so no loss curve was kept"
                               + (f"; its logs have the loss lines: {prog()} logs {args.name} --rank 0 --from-s3"
                                  if status.get("launched") else ""))
        history = _live_history(kubectl, job)
        print(f"{args.name} is {phase or 'not started'}: loss.png is published with the adapter; "
              "the loss so far (worker 0's log):", file=sys.stderr)
        print(describe_curve(history, args.width, fancy))
        return 0
    store = store_for(job, kubectl, args)
    uri, manifest, _ = published_manifest(job, store)
    results = manifest.get("results") or {}
    history = [(int(step), float(loss)) for step, loss in results.get("lossHistory") or []]
    output = Path(args.output or f"{args.name}-loss.png")
    entry = next((item for item in manifest.get("files") or [] if item.get("path") == PLOT_NAME), None)
    if entry is None:
        raise CommandError(f"the adapter at {uri} has no {PLOT_NAME} (published by an older kubetune); "
                           f"its loss history is in {join(uri, 'manifest.json')} (results.lossHistory):\n"
                           + describe_curve(history, args.width, fancy))
    output.parent.mkdir(parents=True, exist_ok=True)
    digest = store.download(join(uri, PLOT_NAME), output)
    if digest != entry.get("sha256"):
        output.unlink()
        raise CommandError(f"{join(uri, PLOT_NAME)} does not match the sha256 in its manifest.json "
                           f"({digest[:12]} vs {str(entry.get('sha256'))[:12]}); not saved")
    print(describe_curve(history, args.width, fancy, eval_points(results)))
    print(f"saved {output} ({output.stat().st_size:,} bytes, sha256 {hashlib.sha256(output.read_bytes()).hexdigest()[:12]} "
          f"as in the manifest)")
    return 0

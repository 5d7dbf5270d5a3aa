"""Reading the ``results`` of a published adapter's manifest.json (written by the trainer's
``publish``): what the trainer's loss.png and `kubectl kubetune plot` both draw."""

from __future__ import annotations

from typing import Any


def eval_points(results: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, eval loss): before training (step 0), at each epoch end and at the end."""
    points: dict[int, float] = {}
    if results.get("initialEvalLoss") is not None:
        points[0] = float(results["initialEvalLoss"])
    for entry in results.get("evalHistory") or []:
        points[int(entry["step"])] = float(entry["evalLoss"])
    if results.get("evalLoss") is not None and results.get("steps") is not None:
        points[int(results["steps"])] = float(results["evalLoss"])
    return sorted(points.items())

"""Learning-rate schedule and the DeepSpeed config override: pure functions, unit-tested alone."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

AUTO_WARMUP_CAP = 100
"""With ``training.warmupSteps`` unset, warm up over 10% of the steps but never more than this."""


def warmup_steps(requested: int | None, total_steps: int) -> int:
    """``training.warmupSteps``, or 10% of the run (1 to 100 steps) when unset; never the whole run."""
    if requested is None:
        return min(AUTO_WARMUP_CAP, max(1, total_steps // 10))
    return min(requested, total_steps)


def lr_factor(step: int, *, warmup: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up reaches the peak AT step ``warmup - 1`` (the first step already moves, unlike
    a warm-up that starts from 0 and wastes it), then cosine decay towards ``min_ratio`` at
    ``total_steps``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(warmup_request: int | None, total_steps: int, peak: float, minimum: float) -> Callable[[int], float]:
    """The factor function for ``torch.optim.lr_scheduler.LambdaLR`` (whose state DeepSpeed
    checkpoints, so a resumed run continues the same curve)."""
    warmup, ratio = warmup_steps(warmup_request, total_steps), minimum / peak
    return lambda step: lr_factor(step, warmup=warmup, total_steps=total_steps, min_ratio=ratio)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: nested objects merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged

"""Where a worker's wall time goes, from its process start to the published adapter.

Users feel the whole job, not the training loop: start-up, downloads, tokenisation,
evaluation, checkpoints and the publish all come before the adapter exists. Rank 0 logs the
breakdown at the end of every job and writes it into the manifest's results
(``timeToAdapter``), so a slow job says which part was slow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

PHASES = ("startup", "download", "tokenize", "modelLoad", "evaluation", "training", "checkpoints", "publish")
"""In the order a job meets them. ``startup`` is the process's start until it has joined the
process group and imported what loads the model (Python, torch, DeepSpeed, transformers and peft
imports, the rendezvous); the downloads run meanwhile, and ``download`` is what is left of them
after that. ``training`` is the loop without the evaluations and checkpoint saves inside it,
which count under their own names."""


class Stopwatch:
    """Seconds per phase; a phase may be timed several times (evaluation, checkpoints) and adds up."""

    def __init__(self) -> None:
        # The process's own start, not this object's: imports are the first cost of a job.
        self.started = psutil.Process().create_time()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._running: tuple[str, float] | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._running = (name, started)
        try:
            yield
        finally:
            self._running = None
            self.seconds[name] += time.perf_counter() - started

    def mark_started_up(self) -> None:
        """The process has joined the process group: everything so far was start-up."""
        self.seconds["startup"] = time.time() - self.started

    def summary(self) -> dict[str, float]:
        """``{"totalSeconds", "<phase>Seconds"..., "otherSeconds"}`` until now; other is what no
        phase covers (the waits at barriers, the process group's teardown). A phase still
        running counts up to now: the manifest is written during the publish."""
        total = time.time() - self.started
        seconds = dict(self.seconds)
        if self._running is not None:
            name, started = self._running
            seconds[name] += time.perf_counter() - started
        figures = {f"{name}Seconds": round(seconds[name], 3) for name in PHASES}
        return {"totalSeconds": round(total, 3), **figures,
                "otherSeconds": round(max(0.0, total - sum(seconds.values())), 3)}


def describe(summary: dict[str, float]) -> str:
    """One log line: ``time to adapter 172.3s: startup 12.1s, download 3.2s, ...``, phases in the
    order a job meets them whatever the order of ``summary`` (a manifest's keys are sorted)."""
    parts = [f"{name} {summary[f'{name}Seconds']:.1f}s" for name in (*PHASES, "other") if f"{name}Seconds" in summary]
    return f"time to adapter {summary['totalSeconds']:.1f}s: " + ", ".join(parts)

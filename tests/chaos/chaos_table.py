"""The chaos table: one row per fault, filled in by the tests that inject it.

A test asks ``table.row(fault, figure=...)`` for its row, runs its trials and records each with
``row.record(survived, lost=..., figure=...)``; pytest prints every row at the end of the run
(conftest's ``pytest_terminal_summary``) as

    fault | trials | survived | data lost | figure

Trials are recorded before the test asserts on them, so a failing row still shows how many
trials of how many survived.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

FULL = os.environ.get("KUBETUNE_CHAOS") == "full"


def trials(full: int, fast: int = 1) -> int:
    """The number of trials of a row: ``full`` under ``make chaos``, ``fast`` in ``make test``."""
    return full if FULL else fast


@dataclass
class Row:
    fault: str
    figure_name: str = ""
    trials: int = 0
    survived: int = 0
    lost: int = 0
    figures: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    more: dict[str, list[float]] = field(default_factory=dict)
    """Further figures of each trial, by name (steps lost beside the recovery time)."""

    def record(self, survived: bool, lost: int = 0, figure: float | None = None, note: str = "",
               more: dict[str, float] | None = None) -> None:
        self.trials += 1
        self.survived += bool(survived)
        self.lost += lost
        if figure is not None:
            self.figures.append(figure)
        for name, value in (more or {}).items():
            self.more.setdefault(name, []).append(value)
        if note and not survived:
            self.notes.append(note)

    @property
    def figure(self) -> str:
        if not self.figures:
            return self.figure_name
        return "; ".join(f"{name} {_percentiles(values)}"
                         for name, values in {self.figure_name: self.figures, **self.more}.items())

    def as_dict(self) -> dict[str, object]:
        return {"fault": self.fault, "trials": self.trials, "survived": self.survived, "dataLost": self.lost,
                "figure": self.figure, "figures": self.figures, "more": self.more, "failures": self.notes}


def _percentiles(figures: list[float]) -> str:
    values = sorted(figures)
    p50 = statistics.median(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"p50 {p50:.2f} / p95 {p95:.2f}"


@dataclass
class ChaosTable:
    rows: dict[str, Row] = field(default_factory=dict)

    def row(self, fault: str, figure: str = "") -> Row:
        return self.rows.setdefault(fault, Row(fault, figure))

    def render(self) -> str:
        header = ("fault", "trials", "survived", "data lost", "figure")
        lines = [header] + [(r.fault, str(r.trials), f"{r.survived}/{r.trials}", str(r.lost), r.figure)
                            for r in self.rows.values()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "-+-".join("-" * width for width in widths))
        return "\n".join(text)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([row.as_dict() for row in self.rows.values()], indent=2) + "\n")


TABLE = ChaosTable()

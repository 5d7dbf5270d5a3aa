"""Chaos tests: each injects one fault, ``trials`` times, and fills its row of the chaos table.

``make test`` runs each row with a few trials; ``make chaos`` sets ``KUBETUNE_CHAOS=full`` for
the full counts of issue 13 and ``KUBETUNE_CHAOS_REPORT`` to a path for the table as JSON.
(Environment variables, not pytest options: an option of a conftest below the root exists only
when pytest is started on this folder.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from chaos_table import TABLE, ChaosTable  # noqa: E402

@pytest.fixture(scope="session")
def chaos_table() -> ChaosTable:
    return TABLE


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not TABLE.rows:
        return
    terminalreporter.section("chaos table")
    terminalreporter.write_line(TABLE.render())
    report = os.environ.get("KUBETUNE_CHAOS_REPORT")
    if report:
        TABLE.write(Path(report))

"""What `make demo` prints while it follows the job: one aligned `kubectl get ftj` row per change."""

from __future__ import annotations

import subprocess

from kubetune.cli import demo

TABLES = {
    "Pending": "NAME         PHASE   PROGRESS   LOSS   ETA   WORKERS   AGE\nquickstart                                   2         1s\n",
    "Running": "NAME         PHASE     PROGRESS   LOSS   ETA    WORKERS   AGE\n"
               "quickstart   Running   12/30      5.91   1m4s   2         40s\n",
    "Succeeded": "NAME         PHASE       PROGRESS   LOSS     ETA   WORKERS   AGE\n"
                 "quickstart   Succeeded   30/30      5.6537   0s    2         93s\n",
}


class FakeKubectl:
    """Answers `kubectl get ftj` from a scripted sequence of job states, one per poll."""

    def __init__(self, states: list[dict]) -> None:
        self.states = states
        self.polls = 0

    def json(self, *args: str) -> dict:
        state = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        return {"status": state}

    def run(self, *args: str, **_: object) -> subprocess.CompletedProcess:
        state = self.states[min(self.polls - 1, len(self.states) - 1)]
        return subprocess.CompletedProcess(args, 0, TABLES[state.get("phase", "Pending")], "")


def test_follow_job_prints_a_row_per_phase_or_progress_change(capsys, monkeypatch) -> None:
    monkeypatch.setattr(demo.time, "sleep", lambda seconds: None)
    running = {"phase": "Running", "progress": {"display": "12/30", "loss": 5.91}}
    states = [{}, {"phase": "Running"}, running, running, {"phase": "Succeeded", "progress": {"display": "30/30"}}]
    job = demo.follow_job(FakeKubectl(states), "quickstart", timeout=60)  # type: ignore[arg-type]
    assert job["status"]["phase"] == "Succeeded"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5  # header + 4 distinct states (the repeated Running poll prints nothing)
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "WORKERS", "AGE"]
    assert lines[3].split() == ["quickstart", "Running", "12/30", "5.91", "1m4s", "2", "40s"]
    assert lines[4].split()[:3] == ["quickstart", "Succeeded", "30/30"]
    # Columns line up across rows although kubectl sized each table differently.
    assert lines[0].index("PROGRESS") == lines[3].index("12/30") == lines[4].index("30/30")
    assert lines[0].index("WORKERS") == lines[1].index("2") == lines[4].index("2 ")


def test_aligned_rows_keep_empty_cells_in_place() -> None:
    header, row = demo.aligned_rows(TABLES["Pending"])
    assert header.index("WORKERS") == row.index("2")
    assert row.split() == ["quickstart", "2", "1s"]

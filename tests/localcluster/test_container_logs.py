"""Container logs in the CRI format: how output becomes records and records become what
`kubectl logs` prints with each of its options."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from kubetune.localcluster.kubelet import containerlogs
from kubetune.localcluster.kubelet.containerlogs import LogOptions, Record

T0, T1, T2 = "2026-11-30T10:00:00.000001000Z", "2026-11-30T10:00:05.000000000Z", "2026-11-30T10:00:09.500000000Z"


def _write(path: Path, *records: Record) -> Path:
    path.write_bytes(b"".join(r.encode() for r in records))
    return path


def test_output_is_cut_into_lines_and_overlong_lines_into_partial_records() -> None:
    pending = bytearray()
    first = containerlogs.records(b"one\ntw", "stdout", pending, T0)
    assert [(r.text, r.full) for r in first] == [(b"one", True)] and pending == b"tw"
    second = containerlogs.records(b"o\n" + b"x" * (containerlogs.MAX_LINE_BYTES + 5), "stdout", pending, T1)
    assert [(r.text[:3], r.full) for r in second] == [(b"two", True), (b"xxx", False)]
    assert len(second[1].text) == containerlogs.MAX_LINE_BYTES and pending == b"x" * 5
    assert Record.decode(second[0].encode()) == second[0]


def test_since_tail_timestamps_and_partial_lines(tmp_path: Path) -> None:
    log = _write(tmp_path / "c.0.log", Record(T0, "stdout", True, b"early"), Record(T1, "stderr", False, b"spl"),
                 Record(T1, "stderr", True, b"it"), Record(T2, "stdout", True, b"late"))

    assert containerlogs.select(log, LogOptions())[0] == [b"early\n", b"split\n", b"late\n"]
    assert containerlogs.select(log, LogOptions(tail_lines=2))[0] == [b"split\n", b"late\n"]
    assert containerlogs.select(log, LogOptions(tail_lines=0))[0] == []
    since = datetime(2026, 11, 30, 10, 0, 5, tzinfo=timezone.utc)
    assert containerlogs.select(log, LogOptions(since=since))[0] == [b"split\n", b"late\n"]
    assert containerlogs.select(log, LogOptions(timestamps=True, tail_lines=1))[0] == [f"{T2} late\n".encode()]


def test_a_follower_starts_after_the_last_whole_line(tmp_path: Path) -> None:
    log = _write(tmp_path / "c.0.log", Record(T0, "stdout", True, b"done"), Record(T1, "stdout", False, b"half"))
    lines, offset = containerlogs.select(log, LogOptions(follow=True))
    assert lines == [b"done\n"] and offset == len(Record(T0, "stdout", True, b"done").encode())
    assert containerlogs.select(log, LogOptions())[0] == [b"done\n", b"half"]  # no follow: all there is


def test_query_of_the_api_server_becomes_options() -> None:
    now = datetime(2026, 11, 30, 10, 0, 10, tzinfo=timezone.utc)
    options = LogOptions.from_query({"follow": "true", "tailLines": "5", "sinceSeconds": "10", "timestamps": "true",
                                     "limitBytes": "100", "previous": "false"}, now)
    assert options == LogOptions(follow=True, timestamps=True, tail_lines=5, limit_bytes=100,
                                 since=datetime(2026, 11, 30, 10, 0, 0, tzinfo=timezone.utc))
    assert LogOptions.from_query({"sinceTime": "2026-11-30T10:00:05Z"}).since == datetime(
        2026, 11, 30, 10, 0, 5, tzinfo=timezone.utc)

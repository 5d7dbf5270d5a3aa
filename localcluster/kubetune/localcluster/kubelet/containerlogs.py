"""Container logs in the CRI format, so `kubectl logs` options work as on any cluster.

Each line a container prints is stored as ``<RFC 3339 time> <stream> <F|P> <text>``, the format
containerd and CRI-O write (``P`` marks a line cut at ``MAX_LINE_BYTES`` and continued on the
next record). Storing the time of every line is what makes ``--since`` and ``--timestamps``
possible; ``--tail``, ``--limit-bytes``, ``--previous`` and ``--follow`` are answered from the same
files. One file per container start (``<container>.<restart>.log``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

MAX_LINE_BYTES = 16 * 1024


def timestamp(when: datetime | None = None) -> str:
    """RFC 3339 with nanoseconds, as the kubelet prints them (Python has microseconds)."""
    when = when or datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def parse_timestamp(text: str) -> datetime:
    text = text.rstrip("Z")
    if "." in text:
        head, fraction = text.split(".", 1)
        text = f"{head}.{fraction[:6]}"
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Record:
    time: str
    stream: str
    full: bool  # False: the line continues in the next record
    text: bytes

    def encode(self) -> bytes:
        return f"{self.time} {self.stream} {'F' if self.full else 'P'} ".encode() + self.text + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "Record | None":
        parts = line.rstrip(b"\n").split(b" ", 3)
        if len(parts) < 3:
            return None
        text = parts[3] if len(parts) == 4 else b""
        return cls(parts[0].decode(), parts[1].decode(), parts[2] == b"F", text)


def records(chunk: bytes, stream: str, pending: bytearray, now: str) -> list[Record]:
    """Split output into records; an unfinished line stays in ``pending`` unless too long."""
    pending += chunk
    out: list[Record] = []
    while True:
        newline = pending.find(b"\n")
        if newline < 0 or newline > MAX_LINE_BYTES:
            break
        out.append(Record(now, stream, True, bytes(pending[:newline])))
        del pending[: newline + 1]
    while len(pending) >= MAX_LINE_BYTES and pending.find(b"\n", 0, MAX_LINE_BYTES) < 0:
        out.append(Record(now, stream, False, bytes(pending[:MAX_LINE_BYTES])))
        del pending[:MAX_LINE_BYTES]
    return out


async def pump(reader: asyncio.StreamReader, stream: str, sink: BinaryIO) -> None:
    """Copy a container's stdout or stderr into its log file until the pipe closes."""
    pending = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        for record in records(chunk, stream, pending, timestamp()):
            sink.write(record.encode())
        sink.flush()
    if pending:
        sink.write(Record(timestamp(), stream, True, bytes(pending)).encode())
        sink.flush()


@dataclass(frozen=True)
class LogOptions:
    """The query of the kubelet's /containerLogs endpoint, as kubectl and the API server send it."""

    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    since: datetime | None = None
    limit_bytes: int | None = None

    @classmethod
    def from_query(cls, query: dict[str, str], now: datetime | None = None) -> "LogOptions":
        def flag(name: str) -> bool:
            return query.get(name, "false").lower() in ("true", "1")

        def number(name: str) -> int | None:
            value = query.get(name)
            if value in (None, ""):
                return None
            parsed = int(value)
            if parsed < 0:
                raise ValueError(f"{name} must be >= 0, not {parsed}")
            return parsed

        since = None
        if query.get("sinceTime"):
            since = parse_timestamp(query["sinceTime"])
        elif number("sinceSeconds") is not None:
            since = (now or datetime.now(timezone.utc)).timestamp() - (number("sinceSeconds") or 0)
            since = datetime.fromtimestamp(since, timezone.utc)
        return cls(
            follow=flag("follow"), previous=flag("previous"), timestamps=flag("timestamps"),
            tail_lines=number("tailLines"), since=since, limit_bytes=number("limitBytes"),
        )


def lines(raw: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
    """(time of the line's first record, whole line with its newline) from stored records."""
    start: str | None = None
    parts: list[bytes] = []
    for stored in raw:
        record = Record.decode(stored)
        if record is None:
            continue
        start = start or record.time
        parts.append(record.text)
        if record.full:
            yield start, b"".join(parts) + b"\n"
            start, parts = None, []
    if parts and start is not None:
        yield start, b"".join(parts)


def render(time: str, line: bytes, options: LogOptions) -> bytes:
    return (time.encode() + b" " + line) if options.timestamps else line


def whole_lines(data: bytes) -> int:
    """How many bytes of ``data`` hold whole lines: the records up to the last one that ends a
    line (a follower reads on from there, so a line cut into records is never sent in parts)."""
    end = offset = 0
    for stored in data.splitlines(keepends=True):
        if not stored.endswith(b"\n"):
            break
        offset += len(stored)
        record = Record.decode(stored)
        if record is None or record.full:
            end = offset
    return end


def select(path: Path, options: LogOptions) -> tuple[list[bytes], int]:
    """What is already in the file, filtered by since and tail; also the byte offset where a
    follower goes on reading. Without ``follow`` an unfinished last line is included."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    end = whole_lines(data)
    chosen = [
        (time, line) for time, line in lines((data[:end] if options.follow else data).splitlines(keepends=True))
        if options.since is None or parse_timestamp(time) >= options.since
    ]
    if options.tail_lines is not None:
        chosen = chosen[-options.tail_lines:] if options.tail_lines else []
    return [render(time, line, options) for time, line in chosen], end


def plain_tail(path: Path, max_lines: int, max_bytes: int) -> str:
    """The end of a container's output as plain text (for FallbackToLogsOnError messages)."""
    output, _ = select(path, LogOptions(tail_lines=max_lines))
    text = b"".join(output)[-max_bytes:].decode("utf-8", errors="replace")
    if len(b"".join(output)) > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]  # the first line was cut by the byte limit
    return text.rstrip("\n")

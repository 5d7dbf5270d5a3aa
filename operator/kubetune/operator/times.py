"""Times in a FineTuneJob's status: RFC 3339 in UTC, as Kubernetes writes them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

_LAYOUTS = ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(moment: datetime, *, precise: bool = False) -> str:
    """Whole seconds, as metav1.Time; ``precise`` keeps the microseconds (a step rate needs them)."""
    moment = moment.astimezone(UTC)
    if precise:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> datetime | None:
    """A time this module (or the API server) wrote; None for anything else."""
    if not isinstance(text, str):
        return None
    for layout in _LAYOUTS:
        try:
            return datetime.strptime(text, layout).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def seconds_since(text: Any, now: datetime) -> float | None:
    moment = parse_time(text)
    return None if moment is None else (now - moment).total_seconds()

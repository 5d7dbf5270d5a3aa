"""Pure assembly of a FineTuneJob ``status`` from a decided phase, in kstatus's shape.

The reconciler decides the phase and its message; this module turns them into the status
object: ``observedGeneration``, the conditions (``Ready`` always, the others only while they
hold), what carries over from the stored status (the launch record, restarts, the last
failure, cost, progress), and the times. Conditions keep their ``lastTransitionTime`` while
their status is unchanged, so a status re-derived with nothing new equals the stored one (no
needless patches).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubetune.api.status import ACTIVE_PHASES, FINAL_PHASES, Phase
from kubetune.operator.times import format_time

CARRIED = ("launched", "restarts", "lastFailure", "cost", "progress", "results", "adapter", "startTime",
           "nextAttemptTime", "workers")
"""Status fields kept from the stored status unless the new one says otherwise."""


def assemble(previous: dict[str, Any], phase: Phase, message: str, generation: int, now: datetime,
             reason: str | None = None, **fields: Any) -> dict[str, Any]:
    """The whole new status. ``reason``: a CamelCase word for the conditions (the failure's for
    Failed). ``fields`` replace carried ones; a field given as None is dropped."""
    stamp = format_time(now)
    status: dict[str, Any] = {key: previous[key] for key in CARRIED if key in previous}
    for key, value in fields.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    if phase != "Restarting":
        status.pop("nextAttemptTime", None)
    status.update(phase=phase, message=message, observedGeneration=generation,
                  conditions=_conditions(previous, phase, message, reason, generation, stamp))
    if phase in FINAL_PHASES:
        status["completionTime"] = previous.get("completionTime") or stamp
    return status


def _conditions(previous: dict[str, Any], phase: Phase, message: str, reason: str | None, generation: int,
                stamp: str) -> list[dict[str, Any]]:
    why = reason or phase
    holding: list[tuple[str, bool, str, str]] = [
        ("Ready", phase == "Succeeded", "Succeeded" if phase == "Succeeded" else why, message),
    ]
    if phase in ACTIVE_PHASES:
        holding.append(("Reconciling", True, phase, message))
    if phase == "Suspended":
        holding.append(("Suspended", True, "Suspended", message))
    if phase == "Succeeded":
        holding.append(("Succeeded", True, "AdapterPublished", message))
    if phase == "Failed":
        holding += [("Stalled", True, why, message), ("Failed", True, why, message)]
    old = {condition.get("type"): condition for condition in previous.get("conditions") or []}
    conditions = []
    for kind, truth, cause, detail in holding:
        state = "True" if truth else "False"
        before = old.get(kind) or {}
        conditions.append({
            "type": kind,
            "status": state,
            "reason": cause,
            "message": detail,
            "lastTransitionTime": before["lastTransitionTime"]
            if before.get("status") == state and before.get("lastTransitionTime") else stamp,
            "observedGeneration": generation,
        })
    return conditions

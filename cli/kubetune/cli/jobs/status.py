"""`kubectl kubetune status NAME`: how a job is doing, for people (-o json for scripts).

Phase, a progress bar with step/total and ETA, loss and eval loss, tokens/s, restarts, cost,
the last failure (reason, message, its kept log in S3) and the adapter once published; read
from the job's status (``kubetune.api.status.FineTuneJobStatus``) alone.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import yaml

from kubetune.cli.jobs.common import (
    describe_command, PHASE_COLOURS, Kubectl, add_cluster_flags, format_duration, handles_errors, paint, prog, unicode_ok, use_colour,
)

HELP = "phase, progress, loss, speed, restarts, cost, last failure and adapter of a job"
DEFAULT_BACKOFF_LIMIT = 3
BAR_WIDTH = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe_command(parser, __doc__)
    parser.add_argument("name", help="the FineTuneJob")
    parser.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text",
                        help="json or yaml: a summary for scripts (its `status` is the job's whole status)")
    add_cluster_flags(parser)


@handles_errors
def main(args: argparse.Namespace) -> int:
    job = Kubectl.from_args(args).job(args.name)
    if args.output == "json":
        print(json.dumps(summary(job), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(summary(job), sort_keys=False), end="")
    else:
        print(render(job, colour=use_colour(), fancy=unicode_ok()))
    return 0


def _parse_time(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds_between(start: str | None, end: str | None, now: datetime | None = None) -> float | None:
    begin = _parse_time(start)
    finish = _parse_time(end) or now
    return None if begin is None or finish is None else max((finish - begin).total_seconds(), 0.0)


def summary(job: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """The figures `status` shows, flat, for scripts; ``status``: the job's whole status.

    Read from the status as the API server returns it, field by field (the names of
    ``kubetune.api.status.FineTuneJobStatus``), so that a status written by a newer operator,
    with fields this client does not know, still shows."""
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    progress, results = status.get("progress") or {}, status.get("results") or {}
    launched, adapter = status.get("launched") or {}, status.get("adapter") or {}
    step = progress.get("step", results.get("steps"))
    total = progress.get("totalSteps")
    failed = [c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"]
    loss = results.get("finalLoss")
    return {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace", "default"),
        "phase": status.get("phase"),
        "message": status.get("message"),
        "reason": failed[0].get("reason") if failed else None,
        "step": step,
        "totalSteps": total,
        "percent": round(100.0 * step / total, 1) if step is not None and total else None,
        "epoch": progress.get("epoch"),
        "eta": progress.get("eta"),
        "etaSeconds": progress.get("etaSeconds"),
        "loss": loss if loss is not None else progress.get("loss"),
        "evalLoss": results.get("evalLoss"),
        "retentionLossBefore": results.get("retentionLossBefore"),
        "retentionLossAfter": results.get("retentionLossAfter"),
        "tokensPerSecond": progress.get("tokensPerSecond"),
        "restarts": status.get("restarts") or 0,
        "backoffLimit": (spec.get("runPolicy") or {}).get("backoffLimit", DEFAULT_BACKOFF_LIMIT),
        "attempt": launched.get("attempt"),
        "workers": launched.get("replicas") or (spec.get("workers") or {}).get("replicas", 1),
        "gpusPerWorker": launched.get("gpusPerWorker", (spec.get("workers") or {}).get("gpusPerWorker", 0)),
        "elapsedSeconds": _seconds_between(job["metadata"].get("creationTimestamp"), status.get("completionTime"),
                                           now or datetime.now(UTC)),
        "cost": status.get("cost"),
        "lastFailure": status.get("lastFailure"),
        "adapterUri": adapter.get("uri"),
        "manifestSha256": adapter.get("manifestSha256"),
        "logsUri": launched.get("logsUri"),
        "status": status,
    }


def progress_bar(step: int | None, total: int | None, width: int = BAR_WIDTH, fancy: bool = True) -> str:
    """[███████████░░░░░░░░░░░░░░░░░░░]  37%  (fancy) or [###########-------------------]."""
    full, empty = ("█", "░") if fancy else ("#", "-")
    if not total or step is None:
        return "[" + empty * width + "]    ?"
    fraction = min(max(step / total, 0.0), 1.0)
    filled = int(round(fraction * width))
    return f"[{full * filled}{empty * (width - filled)}] {fraction * 100:3.0f}%"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(job: dict[str, Any], *, colour: bool = False, fancy: bool = True, now: datetime | None = None) -> str:
    """The text `status` prints: one aligned `Label  value` line per fact that is known."""
    s = summary(job, now)
    status = s["status"]
    rows: list[tuple[str, str]] = []
    phase = s["phase"] or "(not yet reconciled: is the operator running?)"
    head = paint(phase, PHASE_COLOURS.get(s["phase"] or "", "yellow"), colour)
    if s["reason"] and s["reason"] != s["phase"]:
        head += f" ({s['reason']})"
    rows.append(("Phase", head))
    message = s["message"]
    if message and s["phase"] != "Succeeded":
        rows.append(("Message", message))
    if s["totalSteps"] or s["step"] is not None:
        line = progress_bar(s["step"], s["totalSteps"], fancy=fancy)
        line += f"  step {s['step'] if s['step'] is not None else '?'}/{s['totalSteps'] or '?'}"
        if s["epoch"] is not None:
            line += f"  epoch {s['epoch']:.2f}"
        if s["phase"] not in ("Succeeded", "Failed") and s["eta"]:
            line += f"  ETA {s['eta']}"
        rows.append(("Progress", line))
    if s["loss"] is not None or s["evalLoss"] is not None:
        loss = _number(s["loss"])
        if s["evalLoss"] is not None:
            loss += f"   eval {_number(s['evalLoss'])}"
        rows.append(("Loss", loss))
    if s["retentionLossAfter"] is not None:  # spec.evaluation.retentionUri: what the adapter forgot
        rows.append(("Retention", f"{_number(s['retentionLossBefore'])} before, {_number(s['retentionLossAfter'])} "
                                  "after training"))
    if s["tokensPerSecond"] is not None:
        last = " (last logged step)" if s["phase"] in ("Succeeded", "Failed") else ""
        rows.append(("Speed", f"{s['tokensPerSecond']:,.0f} tokens/s{last}"))
    workers = status.get("workers") or {}
    if s["workers"]:
        counts = ", ".join(f"{workers[key]} {key}" for key in ("active", "succeeded", "failed") if workers.get(key))
        gpus = s["gpusPerWorker"]
        each = f" x {gpus} GPU" if gpus else " (CPU)"
        line = f"{s['workers']}{each}" + (f"   {counts}" if counts else "")
        if s["attempt"]:
            line += f"   attempt {s['attempt']}"
        rows.append(("Workers", line))
    restarts = f"{s['restarts']} of {s['backoffLimit']} allowed"
    if status.get("nextAttemptTime") and s["phase"] == "Restarting":
        restarts += f"   next attempt at {status['nextAttemptTime']}"
    rows.append(("Restarts", restarts))
    if s["elapsedSeconds"] is not None:
        label = "Took" if s["phase"] in ("Succeeded", "Failed") else "Age"
        rows.append((label, format_duration(s["elapsedSeconds"])))
    cost = s["cost"] or {}
    if cost:
        parts = []
        if cost.get("workerSeconds") is not None:
            parts.append(f"{format_duration(cost['workerSeconds'])} worker time")
        if cost.get("gpuSeconds"):
            parts.append(f"{cost['gpuSeconds'] / 3600:.2f} GPU-hours")
        elif cost.get("gpuSeconds") == 0:
            parts.append("0 GPU-hours")
        if cost.get("tokens"):
            parts.append(f"{cost['tokens']:,} tokens")
        if len(cost.get("attempts") or []) > 1:
            parts.append(f"over {len(cost['attempts'])} attempts")
        rows.append(("Cost", ", ".join(parts)))
    failure = s["lastFailure"]
    if failure:
        what = failure.get("reason") or "failed"
        if failure.get("pod"):
            what += f" in {failure['pod']}"
        details = []
        if failure.get("exitCode") is not None:
            details.append(f"exit code {failure['exitCode']}")
        if failure.get("signal"):
            details.append(failure["signal"])
        if details:
            what += f" ({', '.join(details)})"
        if failure.get("attempt"):
            what = f"attempt {failure['attempt']}: {what}"
        rows.append(("Last failure", paint(what, "red", colour)))
        if failure.get("message") and failure.get("message") != message:
            rows.append(("", failure["message"]))
        if failure.get("logUri"):
            rows.append(("", f"log: {failure['logUri']}"))
    if s["adapterUri"]:
        adapter = paint(s["adapterUri"], "green", colour)
        if s["manifestSha256"]:
            adapter += f"   manifest sha256 {s['manifestSha256'][:12]}"
        rows.append(("Adapter", adapter))
    if s["logsUri"]:
        rows.append(("Logs", s["logsUri"]))
    name = s["name"]
    if s["adapterUri"]:
        rows.append(("Next", f"{prog()} adapter {name} --download DIR   |   plot {name}"))
    elif s["phase"] not in ("Succeeded", "Failed"):
        rows.append(("Next", f"{prog()} logs {name} -f   |   wait {name}"))
    elif s["phase"] == "Failed":
        kept = "   (once the pods are gone: --from-s3)" if s["logsUri"] else ""
        rows.append(("Next", f"{prog()} logs {name}{kept}"))
    width = max(len(label) for label, _ in rows) + 2
    title = paint(f"FineTuneJob {s['namespace']}/{name}", "bold", colour)
    return "\n".join([title] + [f"  {label.ljust(width)}{value}" for label, value in rows])

"""Pure progress derivation: rank 0's /metrics text (+ the stored progress, + now) -> ``status.progress``.

The trainer's gauges (named in kubetune.api.metrics) give step, total steps, epoch, loss
and throughput. The ETA comes from the step rate between the last two step changes the
operator saw: the gauges move only every ``logEverySteps``, so between changes the stored
progress (and its ETA) is kept as is, which also spares the API a patch per scrape.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from kubetune.api import metrics
from kubetune.operator.times import format_time, parse_time
from prometheus_client.parser import text_string_to_metric_families

METRIC_FIELDS = {
    metrics.STEP: "step",
    metrics.TOTAL_STEPS: "totalSteps",
    metrics.EPOCH: "epoch",
    metrics.LOSS: "loss",
    metrics.TOKENS_PER_SECOND: "tokensPerSecond",
    metrics.STEPS_BEGUN: "stepsBegun",
}


class MetricsParseError(ValueError):
    """The scraped text is not the Prometheus exposition format."""


def parse_metrics(text: str) -> dict[str, float]:
    """The trainer's gauges by progress field name; series it does not export are left out."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                # NaN: not measured yet (the trainer's gauges before their first log line); JSON
                # and the status have no NaN, and NaN != NaN would patch the status every scrape.
                if sample.name in METRIC_FIELDS and not math.isnan(float(sample.value)):
                    values[METRIC_FIELDS[sample.name]] = float(sample.value)
    except ValueError as error:
        raise MetricsParseError(f"not Prometheus text: {error}") from None
    return values


def derive_progress(metrics_text: str, previous: dict[str, Any] | None, now: datetime) -> dict[str, Any] | None:
    """``status.progress`` from one scrape; None when the trainer has not planned its steps yet.

    Raises MetricsParseError on text that is not Prometheus metrics.
    """
    values = parse_metrics(metrics_text)
    total = int(values.get("totalSteps", 0))
    if total <= 0:
        return None  # still downloading or tokenizing: nothing to show beyond "Running"
    previous = previous or {}
    step = min(int(values.get("step", 0)), total)
    progress: dict[str, Any] = {"step": step, "totalSteps": total, "display": f"{step}/{total}"}
    if step > 0:  # before the first log line there is no loss or throughput to show
        progress["epoch"] = round(values.get("epoch", 0.0), 3)
        for field, digits in (("loss", 4), ("tokensPerSecond", 1)):
            if field in values:
                progress[field] = round(values[field], digits)
    seen_step, seen_at = previous.get("step"), parse_time(previous.get("stepTime"))
    if step == 0 and seen_step:
        return dict(previous)  # a restarted attempt still loading: the last known progress stands
    if step == 0 or (isinstance(seen_step, int) and step < seen_step):
        # No step made in this attempt yet (planned, or restarted from an older checkpoint): no
        # step time, so the stall clock starts at this attempt's first step, and no ETA.
        return progress
    if seen_step == step:
        # No new step since the last change: keep its time and the ETA derived then.
        for key in ("stepTime", "eta", "etaSeconds"):
            if key in previous:
                progress[key] = previous[key]
        return progress
    progress["stepTime"] = format_time(now, precise=True)
    if isinstance(seen_step, int) and seen_at is not None and now > seen_at:
        seconds_per_step = (now - seen_at).total_seconds() / (step - seen_step)
        eta = round(seconds_per_step * (total - step))
        progress["etaSeconds"] = eta
        progress["eta"] = format_duration(eta)
    return progress


def steps_begun(metrics_text: str) -> int | None:
    """The optimizer steps a worker's first process has begun (any worker serves it); None when
    the text is not metrics or lacks the series."""
    try:
        value = parse_metrics(metrics_text).get("stepsBegun")
    except MetricsParseError:
        return None
    return None if value is None else int(value)


def finished_progress(previous: dict[str, Any] | None, total_steps: int, final_loss: float | None) -> dict[str, Any]:
    """Progress of a succeeded job: at its last step, whatever the last scrape caught."""
    progress = {key: value for key, value in (previous or {}).items() if key not in ("eta", "etaSeconds")}
    progress.update(step=total_steps, totalSteps=total_steps, display=f"{total_steps}/{total_steps}",
                    eta=format_duration(0), etaSeconds=0)
    if final_loss is not None:
        progress["loss"] = round(final_loss, 4)
    return progress


def format_duration(seconds: int) -> str:
    """Like kubectl's ages: 45s, 3m20s, 2h5m, 1d3h."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def metrics_url(pod: dict[str, Any]) -> str | None:
    """Where a worker serves /metrics: the pod's IP and its container port named ``metrics``."""
    ip = (pod.get("status") or {}).get("podIP")
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == metrics.METRICS_PORT_NAME and port.get("containerPort") and ip:
                host = f"[{ip}]" if ":" in ip else ip
                return f"http://{host}:{port['containerPort']}/metrics"
    return None

"""The operator's own Prometheus metrics, served on ``--metrics-port`` (default 8080, 0 = off).

Names come from ``kubetune.api.metrics``, where the chart's dashboard and alerts are checked
against them. A private registry per instance keeps tests independent and the output to these
series.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api import PHASES
from kubetune.api import metrics as names
from kubetune.operator.times import parse_time
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Reads of one job and a few API calls: milliseconds, with the API server's latency on top.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A tiny CPU job steps within a minute; a large model on GPUs after its download, minutes to an hour.
FIRST_STEP_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
HANDLERS = ("create", "resume", "update", "pod_event", "tick")
"""The ``handler`` label's values, why a pass ran (the job was created, found at start-up, its
spec changed, a pod changed, time passed): exported at 0 from the start, so a rate of errors is
0, not absent, on an operator that has had none."""


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge(names.OPERATOR_JOBS, "FineTuneJobs the operator sees, by status.phase.", ["phase"],
                          registry=self.registry)
        self.reconciles = Counter(
            names.OPERATOR_RECONCILES, "Reconcile passes, by why they ran.", ["handler"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            names.OPERATOR_RECONCILE_ERRORS, "Reconcile passes that raised (retried with a back-off).", ["handler"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            names.OPERATOR_RECONCILE_SECONDS, "Time one reconcile pass took: read the job, reconcile, carry out.",
            ["handler"], buckets=RECONCILE_BUCKETS, registry=self.registry,
        )
        self.pods_created = Counter(names.OPERATOR_PODS_CREATED, "Worker pods the operator created.",
                                    registry=self.registry)
        self.scrape_failures = Counter(
            names.OPERATOR_SCRAPE_FAILURES,
            "Scrapes of a rank 0 /metrics endpoint that failed (unreachable or not Prometheus text).",
            registry=self.registry,
        )
        self.time_to_first_step = Histogram(
            names.OPERATOR_TIME_TO_FIRST_STEP,
            "From a job's creation to the first optimizer step the operator saw (jobs it saw start).",
            buckets=FIRST_STEP_BUCKETS, registry=self.registry,
        )
        job_labels = ["namespace", names.JOB_LABEL]
        self.job_phase = Gauge(names.JOB_PHASE, "1 for the job's current status.phase.", [*job_labels, "phase"],
                               registry=self.registry)
        self.job_restarts = Gauge(names.JOB_RESTARTS, "Gang restarts of the job so far (status.restarts).",
                                  job_labels, registry=self.registry)
        self.job_last_step = Gauge(
            names.JOB_LAST_STEP_TIMESTAMP, "When the job's optimizer step last moved (status.progress.stepTime).",
            job_labels, registry=self.registry,
        )
        for handler in HANDLERS:
            self.reconciles.labels(handler=handler)
            self.reconcile_errors.labels(handler=handler)
            self.reconcile_seconds.labels(handler=handler)
        self._phases: dict[tuple[str, str], str] = {}
        self._not_stepped: set[tuple[str, str]] = set()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def job_seen(self, namespace: str, name: str, status: Mapping[str, Any], created: str | None = None) -> None:
        """Record a job's status (a job with no status yet counts as Pending). ``created``, the
        job's creationTimestamp, times its first step when this operator saw it start."""
        phase = status.get("phase") or "Pending"
        key = (namespace, name)
        before = self._phases.get(key)
        if before is not None and before != phase:
            self.job_phase.remove(namespace, name, before)
        self._phases[(namespace, name)] = phase
        self.job_phase.labels(namespace, name, phase).set(1)
        self.job_restarts.labels(namespace, name).set(int(status.get("restarts") or 0))
        stepped = parse_time((status.get("progress") or {}).get("stepTime"))
        if stepped is not None:
            self.job_last_step.labels(namespace, name).set(stepped.timestamp())
            if key in self._not_stepped and (start := parse_time(created)) is not None:
                self.time_to_first_step.observe(max(0.0, (stepped - start).total_seconds()))
            self._not_stepped.discard(key)
        elif before is None:
            self._not_stepped.add(key)  # seen before its first step: its wait can be timed
        self._recount()

    def job_gone(self, namespace: str, name: str) -> None:
        self._not_stepped.discard((namespace, name))
        phase = self._phases.pop((namespace, name), None)
        if phase is not None:
            self.job_phase.remove(namespace, name, phase)
            self.job_restarts.remove(namespace, name)
            try:
                self.job_last_step.remove(namespace, name)
            except KeyError:  # it never took a step
                pass
        self._recount()

    def _recount(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in list(self._phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase=phase).set(count)

    def serve(self, port: int) -> None:
        """Serve /metrics on every interface; port 0 = off. Raises OSError if the port is taken."""
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)

"""The operator's own Prometheus metrics, served on ``--metrics-port`` (default 8080, 0 = off).

A private registry per instance keeps tests independent and the output to these series.
"""

from __future__ import annotations

from kubetune.api import PHASES
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge(
            "kubetune_operator_jobs", "FineTuneJobs the operator sees, by status.phase.", ["phase"],
            registry=self.registry,
        )
        self.reconciles = Counter(
            "kubetune_operator_reconciles", "Handler runs (job created or resumed, worker pod changed).", ["handler"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors", "Handler runs that raised (kopf retries them).", ["handler"],
            registry=self.registry,
        )
        self.pods_created = Counter(
            "kubetune_operator_pods_created", "Worker pods the operator created.", registry=self.registry
        )
        self.scrape_failures = Counter(
            "kubetune_operator_progress_scrape_failures",
            "Scrapes of a rank 0 /metrics endpoint that failed (unreachable or not Prometheus text).",
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def job_seen(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase (a job with no status yet counts as Pending)."""
        self._phases[(namespace, name)] = phase or "Pending"
        self._recount()

    def job_gone(self, namespace: str, name: str) -> None:
        self._phases.pop((namespace, name), None)
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

"""Prometheus metrics served by rank 0 at ``:<metrics.port>/metrics``.

The operator (or a PodMonitor) scrapes these to show progress in the FineTuneJob status.
A private registry keeps the output to these series (plus nothing from other libraries).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, start_http_server


class TrainMetrics:
    """The gauges one training run exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.step = Gauge("kubetune_train_step", "Optimizer steps completed.", registry=self.registry)
        self.total_steps = Gauge(
            "kubetune_train_total_steps", "Optimizer steps this run will take.", registry=self.registry
        )
        self.loss = Gauge(
            "kubetune_train_loss", "Training loss of the last logged step (mean over ranks).", registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "kubetune_train_tokens_per_second",
            "Non-padding tokens processed per second, all ranks together, since the last log line.",
            registry=self.registry,
        )
        self.epoch = Gauge(
            "kubetune_train_epoch", "Fractional epoch (e.g. 1.5 = half way through the second).", registry=self.registry
        )

    def serve(self, port: int) -> None:
        """Serve /metrics on every interface (the pod IP must be scrapable); port 0 = off."""
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)

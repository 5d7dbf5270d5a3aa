"""Prometheus metrics served by rank 0 at ``:<metrics.port>/metrics`` (the first process of every
other worker serves ``RankMetrics`` only).

The operator (or a PodMonitor) scrapes these to show progress in the FineTuneJob status.
A private registry keeps the output to these series (plus nothing from other libraries).
Rates cover the window since the previous log line (``training.logEverySteps``), all ranks
together.
"""

from __future__ import annotations

from kubetune.api import metrics as names
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

# Checkpoint uploads take from well under a second (LoRA state of a small model) to minutes.
UPLOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RankMetrics:
    """What the first process of every worker serves: the optimizer steps it has begun. A rank
    that sleeps or hangs between steps lags the others (which wait for it in the next step's
    first collective); a stopped one does not answer. The operator reads them on a stall."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps_begun = Gauge(names.STEPS_BEGUN, "Optimizer steps this process has begun.", registry=self.registry)

    def serve(self, port: int) -> None:
        """Serve /metrics on every interface (the pod IP must be scrapable); port 0 = off."""
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)


class TrainMetrics(RankMetrics):
    """The series one training run exports (rank 0)."""

    def __init__(self, *, gpu: bool = False) -> None:
        super().__init__()
        r = self.registry
        self.step = Gauge(names.STEP, "Optimizer steps completed.", registry=r)
        self.total_steps = Gauge(names.TOTAL_STEPS, "Optimizer steps this run will take.", registry=r)
        self.loss = Gauge(
            names.LOSS, "Training loss of the last logged step (mean over ranks).", registry=r
        )
        self.eval_loss = Gauge(
            names.EVAL_LOSS,
            "Validation loss of the latest evaluation (before training, each epoch end, the end); "
            "0 without validation data.",
            registry=r,
        )
        self.learning_rate = Gauge(
            names.LEARNING_RATE, "Learning rate used by the last logged optimizer step.", registry=r
        )
        self.grad_norm = Gauge(
            names.GRAD_NORM,
            "Global gradient norm of the last logged optimizer step, before clipping.",
            registry=r,
        )
        # The operator reads this one into status.progress.tokensPerSecond: it stays non-padding.
        self.tokens_per_second = Gauge(
            names.TOKENS_PER_SECOND,
            "Effective tokens per second: real (non-padding) tokens, all ranks together.",
            registry=r,
        )
        self.padded_tokens_per_second = Gauge(
            names.PADDED_TOKENS_PER_SECOND,
            "Token positions computed per second, padding included; the gap to "
            "kubetune_train_tokens_per_second is compute spent on padding.",
            registry=r,
        )
        self.samples_per_second = Gauge(
            names.SAMPLES_PER_SECOND, "Training examples per second, all ranks together.", registry=r
        )
        self.epoch = Gauge(
            names.EPOCH, "Fractional epoch (e.g. 1.5 = half way through the second).", registry=r
        )
        self.checkpoint_upload_seconds = Histogram(
            names.CHECKPOINT_UPLOAD_SECONDS,
            "Seconds rank 0 took to upload its part of each checkpoint (in the background).",
            buckets=UPLOAD_BUCKETS, registry=r,
        )
        # Only with a GPU: a CPU run showing 0 bytes would read as a measurement.
        self.gpu_memory_bytes = Gauge(
            names.GPU_MAX_MEMORY_ALLOCATED_BYTES,
            "Peak GPU memory allocated by rank 0's process so far (torch.cuda.max_memory_allocated).",
            registry=r,
        ) if gpu else None

        # Not measured before the first logged step: NaN (no value) rather than a 0 a dashboard
        # or an alert would read as a measurement.
        for gauge in (self.loss, self.learning_rate, self.grad_norm, self.tokens_per_second,
                      self.padded_tokens_per_second, self.samples_per_second):
            gauge.set(float("nan"))
        self.info = Gauge(names.INFO, "What this run trains; always 1.",
                          ["model_uri", "dataset_uri", "adapter_uri", "zero_stage"], registry=r)

    def describe_run(self, model_uri: str, dataset_uri: str, adapter_uri: str, zero_stage: int) -> None:
        self.info.labels(model_uri=model_uri, dataset_uri=dataset_uri, adapter_uri=adapter_uri,
                         zero_stage=str(zero_stage)).set(1)


class _NoBar:
    """Stands in for tqdm when no one is watching a terminal (pod logs are not one)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, *, enabled: bool, stream=None):
    """A tqdm bar over optimizer steps, only when ``enabled`` (rank 0) and stderr is a TTY;
    a no-op otherwise, so ``kubectl logs`` holds the structured lines and no bar redraws."""
    import sys

    stream = sys.stderr if stream is None else stream
    if not (enabled and stream.isatty()):
        return _NoBar()
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, initial=initial, unit="step", file=stream, dynamic_ncols=True)
    # Log lines go through tqdm.write while the bar is shown, so they do not tear it.
    redirect = logging_redirect_tqdm()
    redirect.__enter__()
    close = bar.close

    def close_and_restore() -> None:
        if not bar.disable:  # tqdm sets disable once closed
            close()
            redirect.__exit__(None, None, None)

    bar.close = close_and_restore
    return bar

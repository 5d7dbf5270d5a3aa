"""Names of the Prometheus series kubetune exports: those rank 0 serves (the trainer exports
them, the operator reads some of them into ``status.progress``) and the operator's own. The
chart's dashboard and alert rules query them. One list, so that renaming one on any side breaks
a test instead of a dashboard.

Counters are named without ``_total``: prometheus-client adds it to the series it exports.
"""

from __future__ import annotations

STEP = "kubetune_train_step"
TOTAL_STEPS = "kubetune_train_total_steps"
EPOCH = "kubetune_train_epoch"
LOSS = "kubetune_train_loss"
EVAL_LOSS = "kubetune_train_eval_loss"
LEARNING_RATE = "kubetune_train_learning_rate"
GRAD_NORM = "kubetune_train_grad_norm"
TOKENS_PER_SECOND = "kubetune_train_tokens_per_second"
PADDED_TOKENS_PER_SECOND = "kubetune_train_padded_tokens_per_second"
SAMPLES_PER_SECOND = "kubetune_train_samples_per_second"
CHECKPOINT_UPLOAD_SECONDS = "kubetune_train_checkpoint_upload_seconds"
GPU_MAX_MEMORY_ALLOCATED_BYTES = "kubetune_train_gpu_max_memory_allocated_bytes"
INFO = "kubetune_train_info"
"""Gauge, always 1: what the run trains, as labels (model_uri, dataset_uri, adapter_uri,
zero_stage), to join on the series above. The job, namespace, attempt and rank come from the
scrape's target labels (the chart's PodMonitor), not from the trainer."""
STEPS_BEGUN = "kubetune_train_steps_begun"
"""Gauge: optimizer steps this process has begun. Served by the first process of EVERY worker
(the one series the others serve): when rank 0's step stops moving, the operator asks each
worker, and the one behind the rest (or silent) is the one the stall is named after."""
METRICS_PORT_NAME = "metrics"
"""The worker container's port that serves them (every series on worker 0, STEPS_BEGUN on the others)."""

# -- the operator's /metrics (the chart's metrics Service) -------------------------------------
OPERATOR_JOBS = "kubetune_operator_jobs"
"""Gauge: FineTuneJobs the operator sees, by ``phase``."""
OPERATOR_RECONCILES = "kubetune_operator_reconciles"
"""Counter: handler runs, by ``handler``."""
OPERATOR_RECONCILE_ERRORS = "kubetune_operator_reconcile_errors"
"""Counter: handler runs that raised (an API error, a permission missing), by ``handler``."""
OPERATOR_RECONCILE_SECONDS = "kubetune_operator_reconcile_duration_seconds"
"""Histogram: how long one handler run took (read the job, decide, carry out), by ``handler``."""
OPERATOR_PODS_CREATED = "kubetune_operator_pods_created"
"""Counter: worker and preflight pods created."""
OPERATOR_SCRAPE_FAILURES = "kubetune_operator_progress_scrape_failures"
"""Counter: failed reads of a rank 0 /metrics endpoint."""

OPERATOR_TIME_TO_FIRST_STEP = "kubetune_operator_time_to_first_step_seconds"
"""Histogram: from a job's creation to the first optimizer step the operator saw (validation,
scheduling, image pull, model and data download, compilation: what a user waits through)."""

# Per job, from its status (labels ``namespace`` and JOB_LABEL): what alerts are about.
JOB_LABEL = "finetunejob"
"""The label naming the job: ``job`` is Prometheus' own (the scrape job)."""
JOB_PHASE = "kubetune_job_phase"
"""Gauge: 1 for the job's current ``phase``; the series of the other phases are absent."""
JOB_RESTARTS = "kubetune_job_restarts"
"""Gauge: ``status.restarts``, gang restarts so far."""
JOB_LAST_STEP_TIMESTAMP = "kubetune_job_last_step_timestamp_seconds"
"""Gauge: when the operator last saw the job's step move (``status.progress.stepTime``)."""

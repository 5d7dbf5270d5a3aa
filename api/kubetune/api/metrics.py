"""Names of the Prometheus series rank 0 serves: the trainer exports them, the operator reads
some of them into ``status.progress``, dashboards and alerts query them. One list, so that
renaming one on either side breaks a test instead of a dashboard."""

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
METRICS_PORT_NAME = "metrics"
"""The worker container's port that serves them (rank 0 only)."""

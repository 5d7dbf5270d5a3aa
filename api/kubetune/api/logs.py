"""Where a job's worker logs are kept in S3: the operator names them in the job's status, the
worker pods write them (``kubetune.trainer.logkeeper``), so a job whose pods are gone still
explains itself.

One object per worker pod and attempt, the pod's whole output (torchrun's and every local
rank's, rank 0's in worker 0)::

    <checkpointUri, else adapterUri, without its "/">.logs/attempt-<N>/<pod>.log
    s3://ckpt/support-bot/  ->  s3://ckpt/support-bot.logs/attempt-2/support-bot-worker-0.log

Beside the folder, never inside it: a log in adapterUri would be published with the adapter,
one in checkpointUri would look like a checkpoint. For a folder at a bucket's root there is no
"beside" in the bucket, so the logs go to a hidden ``.logs/`` inside it (a suffix on the
bucket's name would name another bucket).
"""

from __future__ import annotations

from kubetune.api.spec import ATTEMPT_ENV, POD_NAME_ENV, Output

__all__ = ["ATTEMPT_ENV", "POD_NAME_ENV", "attempt_logs_uri", "logs_uri", "worker_log_uri"]


def logs_uri(output: Output) -> str:
    """The folder holding every attempt's worker logs."""
    folder = output.checkpoint_uri or output.adapter_uri
    bucket_and_key = folder[len("s3://"):].rstrip("/")
    if "/" not in bucket_and_key:
        return f"{folder}.logs/"
    return f"s3://{bucket_and_key}.logs/"


def attempt_logs_uri(output: Output, attempt: int) -> str:
    """The folder of one attempt's worker logs."""
    return f"{logs_uri(output)}attempt-{attempt}/"


def worker_log_uri(attempt_logs: str, pod: str) -> str:
    """The object holding one worker pod's whole log, in its attempt's folder."""
    return f"{attempt_logs}{pod}.log"

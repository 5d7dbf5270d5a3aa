"""Writing the container's termination message (its schema: kubetune.api.termination), which the
kubelet puts into the pod's ``status.containerStatuses[].state.terminated.message``, where the
operator reads it.

Written to ``$KUBETUNE_TERMINATION_LOG`` (the local node points it at a per-pod file when it
cannot bind-mount one), else the pod's default ``/dev/termination-log``, written only inside a
pod (every kubelet sets KUBERNETES_SERVICE_HOST) and only if it exists (the kubelet creates it
before the container starts): outside a pod (tests, a laptop, as root) the trainer must not
write into the host's /dev, where the local cluster's node agent may have created the file as a
mount point for its pods.
"""

from __future__ import annotations

import os
from typing import Any

from kubetune.api.termination import DEFAULT_PATH, MAX_BYTES, ExitCode, TerminationMessage

PATH_ENV = "KUBETUNE_TERMINATION_LOG"
SUMMARY_KEYS = ("steps", "totalSteps", "finalLoss", "evalLoss", "retentionLossBefore", "retentionLossAfter",
                "tokens", "manifestSha256")
__all__ = ["DEFAULT_PATH", "MAX_BYTES", "PATH_ENV", "failure_message", "success_message", "write"]


def success_message(results: dict[str, Any], adapter_uri: str) -> str:
    """Rank 0's summary of a published adapter (``results`` as in the adapter's manifest, plus
    ``manifestSha256``: the sha256 of manifest.json as uploaded)."""
    summary = {key: results.get(key) for key in SUMMARY_KEYS}
    return TerminationMessage.model_validate({"outcome": "Succeeded", "adapterUri": adapter_uri, **summary}).render()


def failure_message(error: str, exit_code: int = ExitCode.FAILED, *, steps: int | None = None,
                    total_steps: int | None = None) -> str:
    """A failed run: the one-line error, the process's exit code (which torchrun does not pass
    on: a code in PERMANENT_EXIT_CODES tells the operator not to restart), and where training
    stood when it is known (a stop on SIGTERM)."""
    message = TerminationMessage.failed(error, exit_code)
    return message.model_copy(update={"steps": steps, "total_steps": total_steps}).render()


def write(message: str, path: str | None = None, *, unless_written: bool = False) -> bool:
    """Write the message; False (and nothing raised) where the path is not writable.

    ``unless_written``: keep a message another process of this container already left. A
    worker stopped by SIGTERM passes it: torchrun also sends SIGTERM to the survivors when one
    worker fails, and the failed worker's message says what went wrong, theirs would not."""
    target = path or os.environ.get(PATH_ENV)
    if not target:
        if not os.environ.get("KUBERNETES_SERVICE_HOST") or not os.path.exists(DEFAULT_PATH):
            return False
        target = DEFAULT_PATH
    try:
        if unless_written and os.path.exists(target) and os.path.getsize(target) > 0:
            return False
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(message)
    except OSError:
        return False
    return True

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

from kubetune.api.termination import DEFAULT_PATH, MAX_BYTES, TerminationMessage

PATH_ENV = "KUBETUNE_TERMINATION_LOG"
SUMMARY_KEYS = ("steps", "totalSteps", "finalLoss", "evalLoss", "tokens")
__all__ = ["DEFAULT_PATH", "MAX_BYTES", "PATH_ENV", "failure_message", "success_message", "write"]


def success_message(results: dict[str, Any], adapter_uri: str) -> str:
    """Rank 0's summary of a published adapter (``results`` as in the adapter's manifest)."""
    summary = {key: results.get(key) for key in SUMMARY_KEYS}
    return TerminationMessage.model_validate({"outcome": "Succeeded", "adapterUri": adapter_uri, **summary}).render()


def failure_message(error: str) -> str:
    return TerminationMessage.failed(error).render()


def write(message: str, path: str | None = None) -> bool:
    """Write the message; False (and nothing raised) where the path is not writable."""
    target = path or os.environ.get(PATH_ENV)
    if not target:
        if not os.environ.get("KUBERNETES_SERVICE_HOST") or not os.path.exists(DEFAULT_PATH):
            return False
        target = DEFAULT_PATH
    try:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(message)
    except OSError:
        return False
    return True

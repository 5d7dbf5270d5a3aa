"""The container's termination message: a short JSON outcome the kubelet puts into the pod's
``status.containerStatuses[].state.terminated.message``, where the operator reads it.

Success (rank 0): ``{"outcome": "Succeeded", "steps", "totalSteps", "finalLoss", "evalLoss",
"tokens", "adapterUri"}``. A problem a user can fix (any rank): ``{"outcome": "Failed",
"error": "<the one-line error>"}``. Kubernetes keeps at most 4096 bytes, so an overlong error is
cut rather than the JSON left unparsable. Written to ``$KUBETUNE_TERMINATION_LOG`` (the local
kubelet points it at a per-pod file when it cannot bind-mount one), else the pod's default
``/dev/termination-log``, written only inside a pod (every kubelet sets KUBERNETES_SERVICE_HOST)
and only if it exists (the kubelet creates it before the container starts): outside a pod (tests,
a laptop, as root) the trainer must not write into the host's /dev, where the local cluster's
node agent may have created the file as a mount point for its pods.
"""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_PATH = "/dev/termination-log"
PATH_ENV = "KUBETUNE_TERMINATION_LOG"
MAX_BYTES = 4096
_SUMMARY_KEYS = ("steps", "totalSteps", "finalLoss", "evalLoss", "tokens")


def success_message(results: dict[str, Any], adapter_uri: str) -> str:
    summary = {"outcome": "Succeeded", **{key: results.get(key) for key in _SUMMARY_KEYS}, "adapterUri": adapter_uri}
    return json.dumps(summary, separators=(",", ":"), ensure_ascii=False)


def failure_message(error: str) -> str:
    line = " ".join(str(error).split())  # one line, whatever the exception held
    text = _failed(line)
    excess = len(text.encode()) - MAX_BYTES
    if excess > 0:
        # Cut whole UTF-8 characters off the end: a half character would not decode.
        kept = line.encode()[: -(excess + 3)].decode("utf-8", errors="ignore")
        text = _failed(kept + "...")
    return text


def _failed(line: str) -> str:
    return json.dumps({"outcome": "Failed", "error": line}, separators=(",", ":"), ensure_ascii=False)


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

"""Container termination messages, as the kubelet reports them.

Each container start gets an empty per-pod file that the process sees at its
``terminationMessagePath`` (default ``/dev/termination-log``): bind-mounted there when pods run
in their own mount namespace; without mount namespaces (loopback fallback, not root) nothing can
be mounted, so the file's path is handed over in ``$KUBETUNE_TERMINATION_LOG`` instead, which
the kubetune trainer honours (other programs then report no message). When the container
exits, the file's first 4096 bytes become ``state.terminated.message``; with
``terminationMessagePolicy: FallbackToLogsOnError`` a failed container that wrote nothing gets
the tail of its log instead (at most 80 lines and 2048 bytes), like Kubernetes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.localcluster.kubelet import containerlogs

DEFAULT_PATH = "/dev/termination-log"
PATH_ENV = "KUBETUNE_TERMINATION_LOG"
MAX_MESSAGE_BYTES = 4096
MAX_LOG_BYTES = 2048
MAX_LOG_LINES = 80


def message_path(container_spec: dict[str, Any]) -> str:
    return container_spec.get("terminationMessagePath") or DEFAULT_PATH


def read_message(container_spec: dict[str, Any], message_file: Path, log_file: Path, exit_code: int) -> str | None:
    """The message to report for a container that exited with ``exit_code``."""
    try:
        with open(message_file, "rb") as handle:
            written = handle.read(MAX_MESSAGE_BYTES)
    except OSError:
        written = b""
    if written.strip():
        return written.decode("utf-8", errors="replace")
    if exit_code != 0 and container_spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        return containerlogs.plain_tail(log_file, MAX_LOG_LINES, MAX_LOG_BYTES) or None
    return None

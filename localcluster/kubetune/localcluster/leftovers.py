"""Finding and removing what a cluster leaves behind: processes, netns, links, etcd data.

Every process the cluster starts (etcd, the API server, the controllers, S3, every pod)
carries ``KUBETUNE_LOCAL_CLUSTER=<prefix>`` in its environment and every namespace/link name
starts with the prefix. A running cluster records its pid and state folder in the registry
folder; anything whose prefix has no live owner belongs to a crashed cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from kubetune.localcluster import network

MARKER_ENV = "KUBETUNE_LOCAL_CLUSTER"
PREFIX_RE = re.compile(r"^kt[0-9a-f]{5}-")


def registry_dir() -> Path:
    base = Path("/run") if os.access("/run", os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))
    path = base / f"kubetune-local-{os.geteuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def register(prefix: str, state_dir: Path) -> None:
    (registry_dir() / prefix).write_text(json.dumps({"pid": os.getpid(), "stateDir": str(state_dir)}))


def _registration(prefix: str) -> dict[str, object]:
    try:
        return json.loads((registry_dir() / prefix).read_text())
    except (OSError, ValueError):
        return {}


def unregister(prefix: str) -> None:
    (registry_dir() / prefix).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie does not: where nothing reaps orphans (some
    container inits), a killed cluster stays a zombie and must still count as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def owner_alive(prefix: str) -> bool:
    pid = _registration(prefix).get("pid")
    return isinstance(pid, int) and pid_alive(pid)


def cluster_processes(prefix: str | None = None) -> dict[int, str]:
    """pid -> cluster prefix for every process a local cluster started."""
    found: dict[int, str] = {}
    marker = f"{MARKER_ENV}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(marker):
                value = item[len(marker) :].decode(errors="replace")
                if prefix is None or value == prefix:
                    found[int(entry.name)] = value
                break
    return found


def kill_cluster_processes(prefix: str) -> None:
    for pid in cluster_processes(prefix):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def leftovers(prefix: str) -> dict[str, list[str]]:
    """What is left of the cluster ``prefix``: for `down` to verify and report."""
    namespaces, links = network.list_leftovers(prefix)
    return {
        "processes": [str(p) for p in cluster_processes(prefix)],
        "netns": namespaces,
        "links": links,
    }


def remove(prefix: str) -> None:
    kill_cluster_processes(prefix)
    network.remove_leftovers(prefix)


def clean_crashed_clusters() -> list[str]:
    """Remove leftovers of every cluster whose owner is gone; returns their prefixes."""
    namespaces, links = network.list_leftovers("kt")
    prefixes = {name[:network.PREFIX_LEN] for name in namespaces + links if PREFIX_RE.match(name)}
    prefixes |= {p for p in cluster_processes().values() if PREFIX_RE.match(p)}
    stale = sorted(p for p in prefixes if not owner_alive(p))
    for prefix in stale:
        remove(prefix)
        state_dir = _registration(prefix).get("stateDir")
        if isinstance(state_dir, str):
            shutil.rmtree(Path(state_dir) / "etcd", ignore_errors=True)
        unregister(prefix)
    return stale

"""Helpers for the local cluster's tests: kubectl bound to a running LocalCluster, waits,
pod manifests. The shared cluster itself is the ``cluster`` fixture in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from kubetune.localcluster.cluster import LocalCluster
from kubetune.localcluster.leftovers import pid_alive  # noqa: F401  (re-exported for the tests)

KUBECTL = str(Path(sys.executable).parent / "kubectl")
WAIT_SECONDS = 90.0
T = TypeVar("T")


class Cluster:
    """A started LocalCluster plus kubectl and wait helpers bound to it."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [KUBECTL, "--kubeconfig", str(self.cluster.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return json.loads(self.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)

    def wait_phase(self, name: str, phases: set[str], namespace: str = "default") -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            pod = self.pod(name, namespace)
            return pod if pod.get("status", {}).get("phase") in phases else None

        return wait_for(reached, f"pod {name} to reach {sorted(phases)}")

    def logs(self, name: str, namespace: str = "default") -> str:
        return self.kubectl("logs", name, "-n", namespace).stdout


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = WAIT_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except AssertionError as err:  # kubectl errors while objects appear
            value, last = None, err
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def pod_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "ignored:local", "command": command}
    container.update(spec.pop("container", {}))
    body: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": body}


def container_pid(pod: dict[str, Any]) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))

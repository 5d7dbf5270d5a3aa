"""`kubetune local up --detach` / `down` / `status`, and recovery from a crashed cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from cluster_tools import KUBECTL, container_pid, pid_alive, pod_manifest, wait_for

from kubetune.localcluster import leftovers


def _local(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune.localcluster", *args],
                          capture_output=True, text=True, timeout=180)


def _kubectl(state: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--kubeconfig", str(state / "kubeconfig"), *args],
                          input=input, capture_output=True, text=True, timeout=60)


def _start_sleeper(state: Path, image: str = "ignored:local") -> int:
    import yaml

    pod = pod_manifest("sleeper", ["sleep", "600"], container={"image": image})
    _kubectl(state, "apply", "-f", "-", input=yaml.safe_dump(pod))

    def running_pid() -> int | None:
        result = _kubectl(state, "get", "pod", "sleeper", "-o", "json")
        pod = json.loads(result.stdout) if result.returncode == 0 else {}
        return container_pid(pod) if pod.get("status", {}).get("phase") == "Running" else None

    return wait_for(running_pid, "the sleeper pod to run")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state folder whose cluster is always stopped, even when the test fails."""
    yield tmp_path
    info_path = tmp_path / "cluster.json"
    if info_path.exists():
        _local("down", "--dir", str(tmp_path))


def test_up_detach_then_down_leaves_nothing_behind(state: Path) -> None:
    up = _local("up", "--detach", "--dir", str(state), "--image", "docker.io/library/busybox:1.36",
                "--with-prometheus")
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state / 'kubeconfig'}" in up.stdout
    assert "busybox, ignored, kubetune/operator, kubetune/trainer" in up.stdout  # the images it runs
    info = json.loads((state / "cluster.json").read_text())
    assert info["s3ClusterEndpoint"].startswith("http://s3.kubetune-system.svc.cluster.local:")
    assert _kubectl(state, "get", "nodes").stdout.count("kubetune-local") == 1
    assert "ready" in _local("status", "--dir", str(state)).stdout
    pod_pid = _start_sleeper(state, image="busybox")  # runs: --image reached the detached node

    names = {Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
             for pid in leftovers.cluster_processes(info["prefix"])}
    assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "prometheus"} <= names
    # Prometheus answers, and discovers through the API as its own ServiceAccount.
    assert f"# Prometheus: {info['prometheusUrl']}" in up.stdout
    ready = urllib.request.urlopen(info["prometheusUrl"] + "/-/ready", timeout=5).read().decode()
    assert "Ready" in ready
    as_prometheus = "--as=system:serviceaccount:monitoring:prometheus"
    assert _kubectl(state, "auth", "can-i", "list", "pods", "-A", as_prometheus).stdout.strip() == "yes"
    assert _kubectl(state, "auth", "can-i", "get", "secrets", "-A", as_prometheus).stdout.strip() == "no"
    assert (state / "etcd").is_dir()

    down = _local("down", "--dir", str(state))

    assert down.returncode == 0, down.stderr
    assert not (state / "etcd").exists()
    assert not pid_alive(info["pid"])
    assert not pid_alive(pod_pid)
    assert not (state / "cluster.json").exists()
    assert leftovers.leftovers(info["prefix"]) == {"processes": [], "netns": [], "links": []}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert info["prefix"] not in netns and info["prefix"] not in links
    again = _local("down", "--dir", str(state))
    assert again.returncode == 0 and "no local cluster running" in again.stdout


def test_next_up_cleans_a_crashed_clusters_leftovers(state: Path) -> None:
    assert _local("up", "--detach", "--dir", str(state)).returncode == 0
    crashed = json.loads((state / "cluster.json").read_text())
    _start_sleeper(state)
    os.kill(crashed["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(crashed["pid"]), "the cluster process to die")
    assert leftovers.leftovers(crashed["prefix"])["links"], "a killed cluster leaves its bridge behind"

    up = _local("up", "--detach", "--dir", str(state))

    assert up.returncode == 0, up.stderr
    assert leftovers.leftovers(crashed["prefix"]) == {"processes": [], "netns": [], "links": []}
    assert json.loads((state / "cluster.json").read_text())["prefix"] != crashed["prefix"]


def test_up_refuses_an_image_that_is_no_reference_before_starting_anything(state: Path) -> None:
    up = _local("up", "--detach", "--dir", str(state), "--image", "Team/App")

    assert up.returncode == 2 and "'Team/App' is no image reference" in up.stderr
    assert not (state / "cluster.json").exists()

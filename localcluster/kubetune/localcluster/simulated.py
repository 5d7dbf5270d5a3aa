"""Simulated nodes: kwok plays many Nodes and moves their pods through their phases on a
timeline, running nothing. With the control plane alone (``LocalCluster(node=False)``) it is a
cluster of any size on one machine, for the operator's scale benchmark and the chaos tests of
the operator's own decisions (a worker's training is simulated; its pod's life is real API
traffic).

A pod here is scheduled by the real scheduler onto a fake node, turns Running (with an IP from
kwok's range, which nothing answers on) and, ``run_seconds`` later (plus up to
``jitter_seconds``), Succeeded with exit code 0. A test ends a pod otherwise by writing its
status itself (``fail_pod``), as a kubelet would.

kwok's stages are its own (``kustomize/stage/node/fast``, ``node/heartbeat`` and
``pod/fast`` of the pinned version), but for pod-complete: upstream's completes only pods owned
by a Job; this one completes every pod (kubetune's workers, and the Job controller's pods the
scale benchmark compares with).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune.localcluster import leftovers, processes
from kubetune.localcluster.processes import free_port

log = logging.getLogger(__name__)

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
POD_CIDR = "10.200.0.0/16"

_NODE_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-initialize
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $lastTransitionTime | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type  | Quote}}
      {{ end }}
      addresses:
      {{ with NodeIP }}
      - address: {{ . | Quote }}
        type: InternalIP
      {{ end }}
      {{ with NodeName }}
      - address: {{ . | Quote }}
        type: Hostname
      {{ end }}
      allocatable:
      {{ YAML .status.allocatable 1 }}
      capacity:
      {{ YAML .status.capacity 1 }}
      nodeInfo:
        architecture: amd64
        containerRuntimeVersion: {{ printf "kwok-%s" Version }}
        kernelVersion: {{ printf "kwok-%s" Version }}
        kubeletVersion: {{ printf "kwok-%s" Version }}
        operatingSystem: linux
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-heartbeat
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'In'
      values: ['True']
  delay:
    durationMilliseconds: 20000
    jitterDurationMilliseconds: 25000
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $lastTransitionTime | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type  | Quote }}
      {{ end }}
"""

_POD_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Pending']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      {{ $hostIPs := NodeIPsWith .spec.nodeName }}
      {{ with $hostIPs }}
      hostIP: {{ index . 0 | Quote }}
      {{ end }}
      {{ $podIPs := PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
      {{ with $podIPs }}
      podIP: {{ index . 0 | Quote }}
      podIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-complete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'In'
      values: ['True']
  delay:
    durationMilliseconds: %(run_ms)d
    jitterDurationMilliseconds: %(jitter_ms)d
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $root := . }}
      containerStatuses:
      {{ range $index, $item := .spec.containers }}
      - image: {{ $item.image | Quote }}
        name: {{ $item.name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: Succeeded
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    delete: true
"""


def simulated_job(name: str, workers: int, namespace: str = "default", **run_policy: Any) -> dict[str, Any]:
    """A FineTuneJob for simulated nodes (the operator's scale benchmark and chaos tests): its
    workers run nothing, so nothing it names is read, and no preflight pod runs. 840, its global
    batch, is a multiple of every gang size from 2 to 8 (one process per worker)."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama/"},
            "dataset": {"uri": "s3://datasets/quickstart/train.jsonl", "format": "text"},
            "training": {"microBatchSize": 1, "globalBatchSize": 840},
            "workers": {"replicas": workers},
            "output": {"adapterUri": f"s3://adapters/{name}/"},
            "runPolicy": {"skipPreflight": True, **run_policy},
        },
    }


def stages(run_seconds: float, jitter_seconds: float) -> str:
    """kwok's configuration: the node stages and the pod stages, kubetune's pods running for
    ``run_seconds`` plus up to ``jitter_seconds``."""
    # kwok's jitter is the upper bound of the delay, not an addition to it.
    pods = _POD_STAGES % {"run_ms": int(run_seconds * 1000), "jitter_ms": int((run_seconds + jitter_seconds) * 1000)}
    return _NODE_STAGES + "---\n" + pods


@dataclass
class SimulatedNodes:
    """``count`` fake nodes named ``kwok-node-<i>`` and the kwok process that plays them.

    Each node offers ``cpu``, ``memory``, ``pods`` and ``gpus`` (nvidia.com/gpu) to the
    scheduler. Use as a context manager, or ``start()`` and ``stop()``. ``cluster_prefix``: the
    local cluster's marker (``LocalCluster.prefix``), so that kwok goes with the cluster's other
    processes when a crashed run's leftovers are cleaned.
    """

    kubeconfig: Path
    state_dir: Path
    count: int = 4
    run_seconds: float = 3.0
    jitter_seconds: float = 1.0
    cpu: str = "1000"
    memory: str = "4Ti"
    pods: int = 1000
    gpus: int = 64
    cluster_prefix: str = ""
    binary: str = field(default_factory=lambda: str(Path(sys.executable).parent / "kwok"))
    process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SimulatedNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> SimulatedNodes:
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"{self.binary} not found: run `make install` (it builds kwok from its Go module)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.state_dir / "kwok.yaml"
        config_path.write_text(stages(self.run_seconds, self.jitter_seconds))
        api = self._api()
        for index in range(self.count):
            self._create_node(api, f"kwok-node-{index}")
        port = free_port("127.0.0.1")
        with open(self.state_dir / "kwok.log", "ab") as log_file:
            self.process = subprocess.Popen(
                [self.binary, f"--kubeconfig={self.kubeconfig}", f"--config={config_path}",
                 f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake", f"--cidr={POD_CIDR}",
                 f"--server-address=127.0.0.1:{port}", "--v=WARN"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=processes.environ_with({leftovers.MARKER_ENV: self.cluster_prefix} if self.cluster_prefix else {}))
        self._wait_ready(api, timeout)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def fail_pod(self, namespace: str, name: str, exit_code: int = 1, reason: str = "Error",
                 message: str = "") -> None:
        """End a running pod as its kubelet would when its container exits with ``exit_code``.
        kwok still completes it when its run time is up: a test acts on the failure before."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pod = self._api().read_namespaced_pod(name, namespace)
        terminated = {"exitCode": exit_code, "reason": reason, "message": message, "startedAt": now,
                      "finishedAt": now}
        statuses = [{"name": container.name, "image": container.image, "ready": False, "restartCount": 0,
                     "state": {"terminated": terminated}} for container in pod.spec.containers]
        self._api().patch_namespaced_pod_status(
            name, namespace, {"status": {"phase": "Failed", "containerStatuses": statuses}})

    def _api(self) -> client.CoreV1Api:
        return client.CoreV1Api(config.new_client_from_config(str(self.kubeconfig)))

    def _create_node(self, api: client.CoreV1Api, name: str) -> None:
        allocatable = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods),
                       "nvidia.com/gpu": str(self.gpus)}
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {FAKE_NODE_ANNOTATION: "fake"},
                         "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64", "type": "kwok"}},
            "status": {"allocatable": allocatable, "capacity": allocatable},
        }
        try:
            api.create_node(node)
        except ApiException as error:
            if error.status != 409:
                raise

    def _wait_ready(self, api: client.CoreV1Api, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"kwok exited with {self.process.returncode}: see {self.state_dir / 'kwok.log'}")
            nodes = api.list_node(label_selector="type=kwok").items
            ready = [node for node in nodes
                     if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or ())]
            if len(ready) >= self.count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"kwok's {self.count} nodes were not Ready within {timeout:.0f}s: "
                           f"see {self.state_dir / 'kwok.log'}")

"""The operator against the real control plane with kwok's simulated nodes: workers "run" for a
few seconds and succeed, so the chaos rows about the operator's own decisions (it is killed,
jobs are deleted and re-created) cost seconds per trial, not a training run each.

``Operator``: the operator as its own process, as in a pod, that a test kills (SIGKILL) and
starts again. ``PodLedger``: every worker pod the API server has held, from a watch, checking
at each event that no rank of a job ever has two pods at once. ``PhaseLog``: every job's
``status.phase`` as the API server changed it, from a watch, to check that it only ever moves
forward.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kubetune.api.labels import JOB_UID_LABEL, REPLICA_INDEX_LABEL
from kubetune.cli.demo import Kubectl, install_crd
from kubetune.localcluster.cluster import LocalCluster
from kubetune.localcluster.leftovers import MARKER_ENV
from kubetune.localcluster.processes import free_port
from kubetune.localcluster.simulated import SimulatedNodes

KUBETUNE = str(Path(sys.executable).parent / "kubetune")
NAMESPACE = "default"
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def simulated_cluster(state: Path, run_seconds: float) -> Iterator[tuple[LocalCluster, client.ApiClient, SimulatedNodes]]:
    """The control plane (audited) with the CRD and 4 kwok nodes whose pods run ``run_seconds``
    (plus up to half a second)."""
    with LocalCluster(state_dir=state / "cluster", node=False, audit=True) as cluster:
        install_crd(Kubectl(str(cluster.kubeconfig)), REPO)
        api = config.new_client_from_config(str(cluster.kubeconfig))
        with SimulatedNodes(cluster.kubeconfig, state / "kwok", count=4, run_seconds=run_seconds,
                            jitter_seconds=0.5, cluster_prefix=cluster.prefix) as nodes:
            yield cluster, api, nodes


def operator_env(cluster: LocalCluster) -> dict[str, str]:
    """A 1 s restart back-off (trials restart gangs), and the cluster's marker (``local down``
    finds the operator with the cluster's other processes)."""
    return {"KUBETUNE_RESTART_BACKOFF_SECONDS": "1", MARKER_ENV: cluster.prefix}


@dataclass
class Operator:
    """``kubetune operator`` as a child process; ``kill()`` is SIGKILL (no clean-up of any kind)."""

    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> Operator:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBETUNE_METRICS_PORT": str(free_port()),
               **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([KUBETUNE, "operator", *self.args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.started_at = time.monotonic()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a frozen one, too
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


class PodLedger:
    """Worker pods as the API server holds them, from one watch: ``live[(job uid, rank)]`` is the
    set of pod names that exist for that rank now; ``duplicates`` every instant one held two."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core
        self.live: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        self.uids_seen: set[str] = set()
        self.duplicates: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PodLedger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def pods_of(self, uid: str) -> set[str]:
        with self._lock:
            return {name for (owner, _), names in self.live.items() if owner == uid for name in names}

    def _run(self) -> None:
        while not self._stop.is_set():
            resource_version = None
            try:
                listing = self.core.list_namespaced_pod(NAMESPACE, label_selector=JOB_UID_LABEL)
                with self._lock:
                    self.live.clear()
                    for pod in listing.items:
                        self._add(pod)
                resource_version = listing.metadata.resource_version
                for event in watch.Watch().stream(self.core.list_namespaced_pod, NAMESPACE,
                                                  label_selector=JOB_UID_LABEL, resource_version=resource_version,
                                                  timeout_seconds=20):
                    pod = event["object"]
                    with self._lock:
                        if event["type"] == "DELETED":
                            self.live[self._rank(pod)].discard(pod.metadata.name)
                        else:
                            self._add(pod)
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - the watch is re-listed
                time.sleep(0.2)

    def _add(self, pod: client.V1Pod) -> None:
        rank = self._rank(pod)
        self.uids_seen.add(rank[0])
        self.live[rank].add(pod.metadata.name)
        if len(self.live[rank]) > 1:
            self.duplicates.append(f"job uid {rank[0]} rank {rank[1]}: {sorted(self.live[rank])}")

    @staticmethod
    def _rank(pod: client.V1Pod) -> tuple[str, str]:
        labels = pod.metadata.labels or {}
        return labels.get(JOB_UID_LABEL, "?"), labels.get(REPLICA_INDEX_LABEL, "preflight")


PHASE_ORDER = ("Pending", "Validating", "Running", "Publishing", "Succeeded")
"""The phases a job that nothing fails goes through, in order (Validating with a preflight)."""


class PhaseLog:
    """``phases[name]``: the (status.phase, status.launched.attempt) pairs a job went through, as
    one watch of FineTuneJobs (in its own thread) saw them, repeats dropped. The watch resumes
    from its last resourceVersion when it breaks (the API server restarting), and lists again
    only when that is gone (410): the states in between are then unseen, never invented."""

    def __init__(self, custom: client.CustomObjectsApi) -> None:
        self.custom = custom
        self.phases: dict[str, list[tuple[str | None, int | None]]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PhaseLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def of(self, name: str) -> list[tuple[str | None, int | None]]:
        with self._lock:
            return list(self.phases[name])

    def backwards(self, name: str) -> list[str]:
        """Every step of ``name`` that went back (or aside: a phase a job nothing fails never
        has), or to an earlier attempt."""
        bad, rank, attempt = [], -1, 0
        for phase, launched in self.of(name):
            if phase is not None and phase not in PHASE_ORDER:
                bad.append(f"{name}: phase {phase}")
            elif phase is not None:
                if PHASE_ORDER.index(phase) < rank:
                    bad.append(f"{name}: {PHASE_ORDER[rank]} -> {phase}")
                rank = max(rank, PHASE_ORDER.index(phase))
            if launched is not None:
                if launched < attempt:
                    bad.append(f"{name}: attempt {attempt} -> {launched}")
                attempt = max(attempt, launched)
        return bad

    def _record(self, job: dict[str, Any]) -> None:
        status = job.get("status") or {}
        state = (status.get("phase"), (status.get("launched") or {}).get("attempt"))
        with self._lock:
            seen = self.phases[job["metadata"]["name"]]
            if not seen or seen[-1] != state:
                seen.append(state)

    def _run(self) -> None:
        args = ("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs")
        resource_version = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listing = self.custom.list_namespaced_custom_object(*args, _request_timeout=10)
                    for job in listing["items"]:
                        self._record(job)
                    resource_version = listing["metadata"]["resourceVersion"]
                for event in watch.Watch().stream(self.custom.list_namespaced_custom_object, *args,
                                                  resource_version=resource_version, timeout_seconds=20,
                                                  _request_timeout=30):
                    job = event["object"]
                    resource_version = job["metadata"]["resourceVersion"]
                    if event["type"] != "DELETED":
                        self._record(job)
                    if self._stop.is_set():
                        return
            except ApiException as error:
                if error.status == 410:  # too old: list again
                    resource_version = None
                time.sleep(0.2)
            except Exception:  # noqa: BLE001 - the API server is away: resume from resource_version
                time.sleep(0.2)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)

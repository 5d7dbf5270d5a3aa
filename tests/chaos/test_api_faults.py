"""Chaos row 5, "API faults", on simulated nodes (kwok): the Kubernetes API server restarted under
jobs in flight, and a fault-injecting proxy between the operator and the API server.

(a) The API server is stopped and started again (etcd keeps the cluster's state) while jobs of
    4 workers are in flight at every stage: one just created, one running, one finishing. Every
    job must succeed, its phase only ever moving forward (a watch of the test's own, across the
    restart), with never two pods for one rank; the figure is how long the operator takes, once
    the API server is ready again, to write a job's status again (the audit log's record).
(b) The operator talks to the API server through ``FaultProxy`` (its own kubeconfig names the
    proxy; the proxy authenticates upstream as the admin), so that only its traffic is faulted:
    a quarter of its requests but watches answer 409, 422, 429 (with Retry-After) or 500 (some
    after the API server acted: the answer is lost, not the write), one request per job is
    blackholed (accepted, never answered), and its watches of FineTuneJobs and pods are cut
    mid-job and their reconnections blackholed. Each job must still succeed, with the same
    checks; the figure is how long a blackholed watch took to be reopened (the operator's watch
    timeout, shortened for the test through ``KUBETUNE_API_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import json
import random
import ssl
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from chaos_table import TABLE, trials
from faultproxy import Fault, FaultProxy, k8s_status
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from simulated import NAMESPACE, Operator, PhaseLog, PodLedger, operator_env, simulated_cluster, wait_for

from kubetune.localcluster.simulated import simulated_job

RUN_SECONDS = 6.0  # a simulated worker's run: long enough for a restart to land mid-job
WORKERS = 4
API_TIMEOUT_SECONDS = 4  # the proxied operator's KUBETUNE_API_TIMEOUT_SECONDS (production: 70)
FAULT_RATE = 0.25  # of the operator's requests but watches
WATCH = r"[?&]watch=(true|1)(&|$)"
NOT_WATCH = r"^(?!.*[?&]watch=(true|1)(&|$))"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    state = tmp_path_factory.mktemp("api")
    with simulated_cluster(state, RUN_SECONDS) as (cluster, api, nodes):
        pki = cluster.control_plane.pki
        upstream_tls = ssl.create_default_context(cafile=str(pki.ca.cert))
        upstream_tls.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
        with (FaultProxy(cluster.api_url, upstream_ssl=upstream_tls, seed=5) as proxy,
              PodLedger(client.CoreV1Api(api)) as ledger,
              PhaseLog(client.CustomObjectsApi(api)) as phases):
            env = operator_env(cluster)
            direct = Operator(cluster.kubeconfig, state / "operator.log", env=env)
            proxied = Operator(_proxy_kubeconfig(state / "proxied.kubeconfig", proxy.url),
                               state / "operator-proxied.log",
                               env={**env, "KUBETUNE_API_TIMEOUT_SECONDS": str(API_TIMEOUT_SECONDS)})
            try:
                yield _Sim(api, cluster, nodes, proxy, ledger, phases, direct, proxied)
            finally:
                direct.stop()
                proxied.stop()


def _proxy_kubeconfig(path: Path, server: str) -> Path:
    """The operator's kubeconfig: the proxy, in plain HTTP on loopback, with no credentials of
    its own (the proxy presents the admin's certificate upstream)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "operator", "namespace": NAMESPACE}}],
        "current-context": "proxy",
    }))
    return path


class _Sim:
    def __init__(self, api, cluster, nodes, proxy, ledger, phases, direct, proxied) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.cluster, self.nodes, self.proxy, self.ledger, self.phases = cluster, nodes, proxy, ledger, phases
        self.direct, self.proxied = direct, proxied

    def apply(self, name: str) -> str:
        body = self.custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs",
                                                           simulated_job(name, WORKERS))
        return body["metadata"]["uid"]

    def job(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs",
                                                            name, _request_timeout=10)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        except Exception:  # noqa: BLE001 - the API server is restarting: no answer yet
            return None

    def phase(self, name: str) -> str | None:
        return ((self.job(name) or {}).get("status") or {}).get("phase")

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", name)
        except ApiException as error:
            if error.status != 404:
                raise

    def use(self, operator: Operator) -> None:
        """Run ``operator`` alone."""
        for other in (self.direct, self.proxied):
            if other is not operator:
                other.stop()
        if not operator.alive():
            operator.start()

    def ended_well(self, names: list[str], duplicates_before: int) -> list[str]:
        """What went wrong with finished jobs: a phase that went back, a restart, two pods of a rank."""
        bad = [problem for name in names for problem in self.phases.backwards(name)]
        for name in names:
            status = (self.job(name) or {}).get("status") or {}
            if status.get("restarts") or (status.get("launched") or {}).get("attempt") != 1:
                bad.append(f"{name}: restarts {status.get('restarts')}, launched {status.get('launched')}")
        return bad + self.ledger.duplicates[duplicates_before:]


def _reconnect(audit_log: Path, names: list[str], ready: float) -> tuple[float | None, str]:
    """Seconds from the API server being ready again (epoch ``ready``) to the operator's next
    status write of one of ``names``, and which. It includes the operator's back-off (its passes
    failed while the API server was away) and, where the operator had nothing to write until
    kwok ended a pod, kwok's own reconnection."""
    first, what = None, "no status write by the operator"
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if (event.get("userAgent", "").startswith("kubetune-operator/") and event["verb"] == "patch"
                and ref.get("resource") == "finetunejobs" and ref.get("subresource") == "status"
                and ref.get("name") in names):
            received = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
            if received >= ready and (first is None or received < first):
                code = (event.get("responseStatus") or {}).get("code")
                first, what = received, f"{ref['name']} ({code})"
    return (None if first is None else first - ready), what


def test_api_server_restarted_mid_job(sim: _Sim) -> None:
    row = TABLE.row("API server restarted mid-job", figure="reconnect (s)")
    sim.use(sim.direct)
    rng = random.Random(3)
    for trial in range(trials(10, 1)):
        names = [f"restart-{trial}-{stage}" for stage in ("finishing", "running", "creation")]
        figure, note = None, ""
        try:
            duplicates_before = len(sim.ledger.duplicates)
            # Three jobs in flight at three stages when the API server goes: the first finishing
            # (its pods end about RUN_SECONDS after they run), the second running, the third just
            # created. Where exactly each is, is left to chance.
            sim.apply(names[0])
            # Up to the scheduler and kwok, whose own watches may still be backing off after the
            # last trial's restart (the new API server refused them until its RBAC cache filled).
            wait_for(lambda: sim.phase(names[0]) == "Running", 90, f"{names[0]} Running")
            running = time.monotonic()
            time.sleep(rng.uniform(0.5, 2.5))
            sim.apply(names[1])
            time.sleep(max(0.0, running + RUN_SECONDS - rng.uniform(0.0, 1.5) - time.monotonic()))
            sim.apply(names[2])
            time.sleep(rng.uniform(0.0, 0.5))
            stages = {name: sim.phase(name) for name in names}
            down = rng.uniform(0.0, 3.0)
            sim.cluster.control_plane.restart_apiserver(down_seconds=down)
            ready = time.time()
            for name in names:
                wait_for(lambda name=name: sim.phase(name) == "Succeeded", 90, f"{name} Succeeded after the restart")
            time.sleep(1.5)  # the audit log is written in batches
            figure, what = _reconnect(sim.cluster.control_plane.audit_log_path, names, ready)
            bad = sim.ended_well(names, duplicates_before)
            survived, note = not bad, "; ".join(bad[:5])
            print(f"trial {trial}: down {down:.1f}s at {stages}; first status write {figure and round(figure, 2)}s after "
                  f"ready: {what}; phases {[sim.phases.of(name) for name in names]}")
        except (TimeoutError, AssertionError) as error:
            survived, note = False, f"{names}: {error}; phases {[sim.phases.of(name) for name in names]}"
        row.record(survived, figure=figure, note=note)
        for name in names:
            sim.delete(name)
    assert row.survived == row.trials, row.notes


def _request_faults(rate: float) -> list[Fault]:
    """Faults of the operator's requests but watches, ``rate`` of each method's in all, split
    evenly among what that method may get: writes 409 (a name taken; a conflict) and 500 after
    the API server acted; a patch 422 (a status the API refuses); every request 429 (Retry-After)
    and 500. A create is never answered 422: that is the API server's verdict on the child, and
    fails the job by design (ChildRefused; chaos row 7)."""
    kinds = {
        "POST": [(409, "AlreadyExists", False), (429, "TooManyRequests", False), (500, "InternalError", False),
                 (500, "InternalError", True)],
        "PATCH": [(409, "Conflict", False), (422, "Invalid", False), (429, "TooManyRequests", False),
                  (500, "InternalError", False), (500, "InternalError", True)],
        "GET|DELETE|PUT": [(429, "TooManyRequests", False), (500, "InternalError", False)],
    }
    faults = []
    for method, answers in kinds.items():
        each = 1 - (1 - rate) ** (1 / len(answers))  # the first rule that fires decides
        for status, reason, forward in answers:
            extra = {"headers": {"Retry-After": "1"}} if status == 429 else {}
            faults.append(k8s_status(status, reason, method=method, path=NOT_WATCH, probability=each,
                                     forward=forward, **extra))
    return faults


def _watch_reconnects(proxy: FaultProxy, since: float) -> list[float]:
    """For each watch request blackholed since ``since``: seconds until the next request of the
    same watch (the resource, without its resourceVersion)."""
    def resource(path: str) -> str:
        return path.split("?", 1)[0]
    seen = [request for request in list(proxy.seen) if request.at >= since]
    gaps = []
    for index, request in enumerate(seen):
        if request.fault == "blackhole" and "watch=" in request.path:
            later = [other.at for other in seen[index + 1:] if resource(other.path) == resource(request.path)
                     and "watch=" in other.path and other.fault is None]
            gaps.append(later[0] - request.at if later else float("inf"))
    return gaps


def test_api_faults_and_blackholed_watches_through_a_proxy(sim: _Sim) -> None:
    row = TABLE.row("API 409/422/429/500 and blackholed watches (proxy)", figure="watch reconnect (s)")
    sim.proxy.clear()
    sim.use(sim.proxied)
    wait_for(lambda: sum("watch=" in request.path for request in sim.proxy.seen) >= 2, 60,
             "the operator watching through the proxy")
    rng = random.Random(4)
    for trial in range(trials(10, 1)):
        name, figure, note = f"faults-{trial}", None, ""
        since = time.monotonic()
        try:
            duplicates_before = len(sim.ledger.duplicates)
            # One of its next requests gets no answer at all: a hung connection.
            sim.proxy.add(Fault("blackhole", method="POST|PATCH|GET", path=NOT_WATCH, times=1),
                          *_request_faults(FAULT_RATE))
            sim.apply(name)
            # Mid-job, the watches break (a load balancer failing over) and reconnect to a
            # backend that accepts and never answers.
            time.sleep(rng.uniform(0.0, RUN_SECONDS))
            sim.proxy.add(Fault("blackhole", method="GET", path=r"/finetunejobs\?.*watch=", times=1),
                          Fault("blackhole", method="GET", path=r"/pods\?.*watch=", times=1))
            cut = sim.proxy.cut(WATCH)
            wait_for(lambda: sim.phase(name) == "Succeeded", 90, f"{name} Succeeded")
            gaps = _watch_reconnects(sim.proxy, since)
            figure = max(gaps, default=None)
            bad = sim.ended_well([name], duplicates_before)
            if len(gaps) < 2 or max(gaps) > API_TIMEOUT_SECONDS + 3:
                bad.append(f"{name}: {cut} watches cut, blackholed ones reopened after {gaps} s "
                           f"(watch timeout {API_TIMEOUT_SECONDS} s)")
            survived, note = not bad, "; ".join(bad[:5])
            faulted = [request.fault for request in sim.proxy.seen if request.at >= since]
            print(f"trial {trial}: {len(faulted)} requests, {sum(map(bool, faulted))} faulted; {cut} watches cut, "
                  f"reopened after {gaps}; phases {sim.phases.of(name)}")
        except (TimeoutError, AssertionError) as error:
            survived, note = False, f"{name}: {error}; phases {sim.phases.of(name)}"
            print(f"trial {trial} failed; its faulted requests:", *[
                f"{request.at - since:.1f}s {request.method} {request.path} -> {request.fault}"
                for request in list(sim.proxy.seen) if request.at >= since and request.fault], sep="\n  ")
        sim.proxy.clear()
        row.record(survived, figure=figure, note=note)
        sim.delete(name)
    assert row.survived == row.trials, row.notes

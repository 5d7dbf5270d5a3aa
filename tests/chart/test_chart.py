"""The Helm chart as a platform engineer reads and installs it, checked with real Helm and no
cluster: lint, every switch renders what it says, values and their schema and docs agree, the
CRD is the generated one, RBAC grants no more than the operator's calls, the operator pod meets
Pod Security "restricted", and the dashboard and alerts query only series the code exports."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib

import jsonschema
import pytest
import yaml
from chart_tools import CHART, NAMESPACE, REPO, SWITCHES, notes, of_kind, one, render

from kubetune.api import metrics as metric_names
from kubetune.api.spec import DEFAULT_TRAINER_IMAGE
from kubetune.operator.metrics import OperatorMetrics
from kubetune.trainer.metrics import TrainMetrics

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def operator_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container["env"]}


# -- Helm's own checks ---------------------------------------------------------------------------
def test_lint_strict_is_clean() -> None:
    import helm_python as helm

    result = helm.lint(str(CHART), strict=True)
    assert result["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); 2 and above are warnings and errors.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_the_chart_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == VERSION


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_switch_renders(switch: str) -> None:
    objects = render(SWITCHES[switch])
    assert one(objects, "Deployment") and all(obj["metadata"].get("name") for obj in objects)


# -- values, schema, docs --------------------------------------------------------------------------
def _schema_paths(schema: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= _schema_paths(sub, f"{path}.")
    return paths


def _value_paths(values: dict, schema: dict, prefix: str = "") -> set[str]:
    """The keys of values.yaml, descending where the schema describes the keys (not into
    objects given whole, such as resources)."""
    paths = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.add(path)
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            paths |= _value_paths(value, sub, f"{path}.")
    return paths


def test_the_schema_describes_every_value_and_nothing_else() -> None:
    assert _value_paths(VALUES, SCHEMA) == _schema_paths(SCHEMA)

    def closed(schema: dict, where: str) -> None:
        if "properties" in schema:
            assert schema.get("additionalProperties") is False, f"{where or 'the root'} accepts unknown keys"
            for key, sub in schema["properties"].items():
                closed(sub, f"{where}.{key}".lstrip("."))

    closed(SCHEMA, "")
    jsonschema.validate(VALUES, SCHEMA)


def test_the_readme_and_schema_descriptions_are_generated_from_values_comments() -> None:
    result = subprocess.run([sys.executable, str(REPO / "charts" / "chart_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    readme = (CHART / "README.md").read_text()
    assert "| `crds.keep` | `true` |" in readme
    assert "Deleting the CRD deletes every FineTuneJob" in readme
    assert SCHEMA["properties"]["replicaCount"]["description"].startswith("How many operator pods run.")


def test_an_undocumented_value_is_named() -> None:
    sys.path.insert(0, str(REPO / "charts"))
    from chart_docs import UndocumentedKey, documented_keys

    with pytest.raises(UndocumentedKey, match=r"line 3: image.tag has no comment"):
        documented_keys("# The image.\nimage:\n  tag: x\n")


@pytest.mark.parametrize("values, message", [
    ({"bogus": 1}, "additional properties 'bogus' not allowed"),
    ({"replicaCount": 0}, "minimum: got 0, want 1"),
    ({"scope": "namespace"}, "/scope"),
    ({"watchNamespace": "ml"}, "ERROR: watchNamespace is set but scope is Cluster"),
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
     "ERROR: metrics.serviceMonitor.enabled needs metrics.service.enabled"),
    ({"operator": {"healthPort": 8080}}, "ERROR: operator.metricsPort and operator.healthPort must differ"),
    ({"serviceAccount": {"create": False}}, "ERROR: serviceAccount.create is false"),
])
def test_bad_values_are_refused_with_the_key_and_the_fix(values: dict, message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        render(values)


# -- the CRD -----------------------------------------------------------------------------------
def test_the_charts_crd_is_the_generated_one() -> None:
    generated = (REPO / "crds" / "finetunejob.yaml").read_text()
    assert (CHART / "files" / "crds" / "finetunejob.yaml").read_text() == generated, "run `make crds`"
    rendered = copy.deepcopy(one(render(), "CustomResourceDefinition"))
    assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    labels = rendered["metadata"].pop("labels")
    expected = yaml.safe_load(generated)
    assert expected["metadata"].pop("labels").items() <= labels.items()
    assert labels["app.kubernetes.io/instance"] == "kubetune"
    assert rendered == expected


def test_crds_keep_and_enabled() -> None:
    kept = one(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in kept["metadata"]
    assert of_kind(render(SWITCHES["crds-off"]), "CustomResourceDefinition") == []


# -- the operator pod --------------------------------------------------------------------------
def test_the_operator_pod_meets_pod_security_restricted() -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"]:
        context = {**pod["securityContext"], **container["securityContext"]}
        assert context["runAsNonRoot"] is True and isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert context["readOnlyRootFilesystem"] is True
    assert not any(key in pod for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in pod["volumes"])


def test_one_replica_is_recreated_several_elect_a_leader_through_a_lease() -> None:
    single = render()
    assert one(single, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert operator_container(single)["args"] == ["operator"]
    assert [role["metadata"]["name"] for role in of_kind(single, "Role")] == []

    several = render(SWITCHES["replicas"])
    assert "strategy" not in one(several, "Deployment")["spec"]
    assert operator_container(several)["args"] == ["operator", "--leader-elect=kubetune"]
    assert env_of(operator_container(several))["POD_NAMESPACE"] is None  # from the downward API
    election = one(several, "Role")
    assert election["metadata"]["namespace"] == NAMESPACE  # the Lease is in the release's namespace
    assert election["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["kubetune"],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}]
    assert {binding["roleRef"]["name"] for binding in of_kind(several, "RoleBinding")} == {election["metadata"]["name"]}

    namespaced = render(SWITCHES["namespaced-replicas"])
    assert {role["metadata"]["name"] for role in of_kind(namespaced, "Role")} == {"kubetune",
                                                                                    "kubetune-leader-election"}


def test_settings_come_from_values() -> None:
    container = operator_container(render({"operator": {
        "s3Endpoint": "http://minio.storage:9000", "trainerImage": "registry.example/trainer:2",
        "restartBackoffSeconds": 30, "metricsPort": 9090, "healthPort": 9091, "verbose": True,
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]}}))
    env = env_of(container)
    assert env["KUBETUNE_S3_ENDPOINT"] == "http://minio.storage:9000"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example/trainer:2"
    assert env["KUBETUNE_RESTART_BACKOFF_SECONDS"] == "30"
    assert env["KUBETUNE_METRICS_PORT"] == "9090" and env["KUBETUNE_LIVENESS_PORT"] == "9091"
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and "--verbose" in container["args"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9090, "health": 9091}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}

    # The settings module reads every variable the chart sets.
    from kubetune.operator import settings
    assert all(name in settings.__doc__ for name in env if name.startswith("KUBETUNE_"))


def test_images_default_to_the_package_version() -> None:
    container = operator_container(render())
    assert container["image"] == f"kubetune/operator:{VERSION}"
    assert env_of(container)["KUBETUNE_TRAINER_IMAGE"] == DEFAULT_TRAINER_IMAGE == f"kubetune/trainer:{VERSION}"
    assert container["command"] == ["kubetune"] and container["args"][0] == "operator"
    digest = "sha256:" + "a" * 64
    assert operator_container(render({"image": {"digest": digest}}))["image"] == f"kubetune/operator@{digest}"


def test_namespaced_install_grants_nothing_cluster_wide() -> None:
    objects = render(SWITCHES["namespaced"])
    assert of_kind(objects, "ClusterRole") == [] and of_kind(objects, "ClusterRoleBinding") == []
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": NAMESPACE}]
    assert env_of(operator_container(objects))["KUBETUNE_NAMESPACE"] == "ml"
    assert "namespace ml only" in notes(SWITCHES["namespaced"])


@pytest.mark.parametrize("switch", SWITCHES)
def test_rbac_is_least_privilege(switch: str) -> None:
    for role in of_kind(render(SWITCHES[switch]), "ClusterRole") + of_kind(render(SWITCHES[switch]), "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
            assert not {"secrets", "pods/exec", "pods/attach", "pods/portforward"} & set(rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            # The one update: the replicas' own Lease, by name.
            assert "update" not in rule["verbs"] or (rule["resources"] == ["leases"] and rule.get("resourceNames")), rule
        if role["metadata"]["name"] == "kubetune":
            granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"]
                       for verb in rule["verbs"]}
            assert ("pods/log", "get") in granted and ("finetunejobs/status", "patch") in granted


# -- monitoring --------------------------------------------------------------------------------
def _exported_series() -> set[str]:
    """Every series name the operator and a (GPU) trainer export, as Prometheus stores them."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for registry in (OperatorMetrics().registry, TrainMetrics(gpu=True).registry):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def _queried_series(expression: str) -> set[str]:
    return set(re.findall(r"\bkubetune_[a-z0-9_]+", expression))


def test_every_metric_the_api_names_is_exported() -> None:
    declared = {value for name, value in vars(metric_names).items()
                if name.isupper() and isinstance(value, str) and value.startswith("kubetune_")}
    exported_families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in _exported_series()}
    assert declared == exported_families


def test_the_dashboard_queries_only_exported_series_with_the_labels_the_monitors_set() -> None:
    cm = one(render(SWITCHES["alerts-and-dashboard"]), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["kubetune.json"])
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in ("Training loss", "Eval loss", "Tokens per second", "Progress", "ETA", "Restarts", "Jobs by phase",
                   "Operator reconcile latency"):
        assert wanted in titles
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [var["query"]["query"] for var in dashboard["templating"]["list"] if var["type"] == "query"]
    queried = set().union(*map(_queried_series, expressions))
    assert queried and queried <= _exported_series(), queried - _exported_series()
    assert all(f"{metric_names.JOB_LABEL}=~" in e for e in expressions if "kubetune_train_" in e)

    # The PodMonitor gives training series that label, from the pod label the operator sets.
    relabel = one(render(SWITCHES["pod-monitor"]), "PodMonitor")["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_kubetune_dev_job_name"],
            "targetLabel": metric_names.JOB_LABEL} in relabel
    from kubetune.api import labels
    assert labels.JOB_NAME_LABEL == "kubetune.dev/job-name"
    selector = one(render(SWITCHES["pod-monitor"]), "PodMonitor")["spec"]["selector"]["matchLabels"]
    assert selector == {labels.MANAGED_BY_LABEL: labels.MANAGED_BY, labels.COMPONENT_LABEL: labels.WORKER,
                        labels.REPLICA_INDEX_LABEL: "0"}


def test_the_alerts_query_only_exported_series() -> None:
    rule = one(render(SWITCHES["alerts-and-dashboard"]), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"KubetuneJobFailed", "KubetuneJobStalled", "KubetuneJobRestartsClimbing",
                           "KubetuneOperatorReconcileErrors", "KubetuneOperatorDown"}
    for alert in alerts.values():
        assert _queried_series(alert["expr"]) <= _exported_series(), alert["expr"]
        assert alert["annotations"]["summary"] and alert["labels"]["severity"] in ("warning", "critical")
    assert "> 900" in alerts["KubetuneJobStalled"]["expr"]  # stalledMinutes 15
    assert 'up{job="kubetune-metrics", namespace="kubetune-system"}' in alerts["KubetuneOperatorDown"]["expr"]
    # Alert templates reach Prometheus as written: Helm must not have eaten them.
    assert "{{ $labels.finetunejob }}" in alerts["KubetuneJobFailed"]["annotations"]["summary"]
    service = one(render(), "Service")
    assert service["metadata"]["name"] == "kubetune-metrics"


def test_network_policies_open_the_gang_dns_s3_and_the_api_server() -> None:
    policies = {p["metadata"]["name"]: p for p in of_kind(render(SWITCHES["network-policy"]), "NetworkPolicy")}
    operator, training = policies["kubetune-operator"], policies["kubetune-training"]
    assert training["metadata"]["namespace"] == "ml"
    gang = training["spec"]["ingress"][0]
    assert "ports" not in gang and gang["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/managed-by": "kubetune"}}}]
    egress_ports = [port for rule in training["spec"]["egress"] for port in rule.get("ports", [])]
    assert {"protocol": "UDP", "port": 53} in egress_ports and {"protocol": "TCP", "port": 443} in egress_ports
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in training["spec"]["egress"][2]["to"]
    api = operator["spec"]["egress"][1]
    assert api["to"] == [{"ipBlock": {"cidr": "10.96.0.1/32"}}] and {"protocol": "TCP", "port": 6443} in api["ports"]
    # A Cluster-scoped operator has no namespace to guess: without workerNamespaces, only its own policy.
    alone = of_kind(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert [p["metadata"]["name"] for p in alone] == ["kubetune-operator"]

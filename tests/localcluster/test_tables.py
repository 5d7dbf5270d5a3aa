"""Server-side Table rendering: the columns and cells `kubectl get` prints."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from kubetune.localcluster.apiserver.tables import (
    builtin_columns,
    crd_columns,
    format_age,
    jsonpath_find,
    row_cells,
    to_table,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parents[2]


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("delta, text", [
    (timedelta(seconds=0), "0s"), (timedelta(seconds=45), "45s"), (timedelta(seconds=119), "119s"),
    (timedelta(minutes=3, seconds=2), "3m2s"), (timedelta(minutes=5), "5m"), (timedelta(minutes=10, seconds=30), "10m"),
    (timedelta(minutes=179), "179m"), (timedelta(hours=3), "3h"), (timedelta(hours=5, minutes=3), "5h3m"),
    (timedelta(hours=8, minutes=59), "8h"), (timedelta(hours=47), "47h"), (timedelta(days=3), "3d"),
    (timedelta(days=3, hours=4), "3d4h"), (timedelta(days=9, hours=4), "9d"), (timedelta(days=729), "729d"),
    (timedelta(days=730), "2y"), (timedelta(days=800), "2y70d"), (timedelta(days=365 * 9), "9y"),
    (timedelta(seconds=-1), "0s"), (timedelta(seconds=-5), "<invalid>"),
])
def test_format_age_matches_human_duration(delta: timedelta, text: str) -> None:
    assert format_age((NOW - delta).strftime("%Y-%m-%dT%H:%M:%SZ"), NOW) == text


def test_format_age_accepts_kubernetes_timestamp_forms() -> None:
    assert format_age("2026-11-25T11:59:00.123456+00:00", NOW) == "59s"  # truncated, like Go
    assert format_age(None, NOW) == "<unknown>"
    assert format_age("yesterday", NOW) == "<invalid>"


# --- custom resources --------------------------------------------------------------------------

FTJ_VERSION = {
    "name": "v1alpha1",
    "additionalPrinterColumns": [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Workers", "type": "integer", "jsonPath": ".spec.workers.replicas"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 1, "description": "Base model."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}


def ftj(**status: object) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "job1", "namespace": "default", "creationTimestamp": ago(minutes=2), "uid": "u1"},
            "spec": {"workers": {"replicas": 2.0}, "model": {"uri": "s3://models/tiny/"}}, "status": status}


def test_crd_columns_are_name_then_printer_columns() -> None:
    columns = crd_columns(FTJ_VERSION)
    assert [(c["name"], c["type"], c["priority"]) for c in columns] == [
        ("Name", "string", 0), ("Phase", "string", 0), ("Workers", "integer", 0), ("Loss", "number", 0),
        ("Ready", "string", 0), ("Model", "string", 1), ("Age", "date", 0)]
    assert columns[0]["format"] == "name"
    assert columns[5]["description"] == "Base model."
    assert columns[1]["description"] == "Custom resource definition column (in JSONPath format): .status.phase"


def test_crd_without_printer_columns_gets_name_and_age() -> None:
    columns = crd_columns({"name": "v1"})
    assert [(c["name"], c["type"]) for c in columns] == [("Name", "string"), ("Age", "date")]
    assert row_cells("widgets", columns, ftj(), NOW) == ["job1", "2m"]


def test_crd_with_printer_columns_does_not_add_age() -> None:
    columns = crd_columns({"additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]})
    assert [c["name"] for c in columns] == ["Name", "Phase"]


def test_custom_resource_cells_follow_column_types() -> None:
    obj = ftj(phase="Running", progress={"loss": 1},
              conditions=[{"type": "Scheduled", "status": "True"}, {"type": "Ready", "status": "False"}])
    assert row_cells("finetunejobs", crd_columns(FTJ_VERSION), obj, NOW) == [
        "job1", "Running", 2, 1.0, "False", "s3://models/tiny/", "2m"]


def test_missing_custom_resource_values_are_null() -> None:
    cells = row_cells("finetunejobs", crd_columns(FTJ_VERSION), ftj(), NOW)
    assert cells == ["job1", None, 2, None, None, "s3://models/tiny/", "2m"]


@pytest.mark.parametrize("path, expected", [
    (".spec.a", [1]), (".spec.list[1]", ["y"]), (".spec.list[-1]", ["y"]), (".spec.list[5]", []),
    (".spec.missing.deeper", []), ("{.spec.a}", [1]), (".spec['a']", [1]),
    ('.status.conditions[?(@.type=="Ready")].reason', ["Up"]),
    (".status.conditions[?(@.type=='Gone')].reason", []),
])
def test_jsonpath_subset(path: str, expected: list) -> None:
    obj = {"spec": {"a": 1, "list": ["x", "y"]},
           "status": {"conditions": [{"type": "Init", "reason": "Done"}, {"type": "Ready", "reason": "Up"}]}}
    assert jsonpath_find(obj, path) == expected


def test_string_column_prints_non_strings_like_kubectl_jsonpath() -> None:
    columns = crd_columns({"additionalPrinterColumns": [
        {"name": "Replicas", "type": "string", "jsonPath": ".spec.workers.replicas"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"}]})
    assert row_cells("finetunejobs", columns, ftj(), NOW)[1:] == ["2", '{"uri":"s3://models/tiny/"}']


# --- built-in kinds ----------------------------------------------------------------------------

def pod(phase: str = "Running", **status: object) -> dict:
    body = {"phase": phase, "podIP": "10.244.0.5",
            "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0, "state": {"running": {}}}]}
    body.update(status)
    return {"metadata": {"name": "trainer-0", "creationTimestamp": ago(hours=5, minutes=3)},
            "spec": {"containers": [{"name": "main"}], "nodeName": "local"}, "status": body}


def waiting(reason: str) -> list[dict]:
    return [{"name": "main", "ready": False, "restartCount": 0, "state": {"waiting": {"reason": reason}}}]


def terminated(reason: str, code: int) -> list[dict]:
    return [{"name": "main", "ready": False, "restartCount": 0,
             "state": {"terminated": {"reason": reason, "exitCode": code}}}]


@pytest.mark.parametrize("obj, status", [
    (pod(), "Running"),
    (pod("Pending", containerStatuses=waiting("ContainerCreating")), "ContainerCreating"),
    (pod("Pending", containerStatuses=waiting("CreateContainerConfigError")), "CreateContainerConfigError"),
    (pod("Succeeded", containerStatuses=terminated("Completed", 0)), "Completed"),
    (pod("Failed", containerStatuses=terminated("Error", 1)), "Error"),
    (pod("Failed", containerStatuses=terminated("", 137)), "ExitCode:137"),
    (pod("Pending", containerStatuses=[]), "Pending"),
    ({**pod(), "metadata": {"name": "trainer-0", "deletionTimestamp": ago(seconds=1)}}, "Terminating"),
])
def test_pod_status_column(obj: dict, status: str) -> None:
    assert row_cells("pods", builtin_columns("pods"), obj, NOW)[2] == status


def test_pod_row_has_ready_restarts_age_and_wide_cells() -> None:
    obj = pod(containerStatuses=[{"name": "main", "ready": True, "restartCount": 2, "state": {"running": {}},
                                  "lastState": {"terminated": {"finishedAt": ago(minutes=4)}}}])
    columns = builtin_columns("pods")
    assert [c["name"] for c in columns if c["priority"] == 0] == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert [c["name"] for c in columns if c["priority"] == 1][:2] == ["IP", "Node"]
    assert row_cells("pods", columns, obj, NOW) == [
        "trainer-0", "1/1", "Running", "2 (4m ago)", "5h3m", "10.244.0.5", "local", "<none>", "<none>"]


@pytest.mark.parametrize("resource, obj, cells", [
    ("services", {"metadata": {"name": "job1", "creationTimestamp": ago(days=3)},
                  "spec": {"type": "ClusterIP", "clusterIP": "None", "ports": [{"port": 29500, "protocol": "TCP"}],
                           "selector": {"app": "x"}}},
     ["job1", "ClusterIP", "None", "<none>", "29500/TCP", "3d", "app=x"]),
    ("configmaps", {"metadata": {"name": "cfg", "creationTimestamp": ago(seconds=45)}, "data": {"a": "1", "b": "2"}},
     ["cfg", 2, "45s"]),
    ("secrets", {"metadata": {"name": "s3", "creationTimestamp": ago(minutes=10)}, "type": "Opaque", "data": {"k": "dg=="}},
     ["s3", "Opaque", 1, "10m"]),
    ("namespaces", {"metadata": {"name": "ml", "creationTimestamp": ago(days=800)}, "status": {"phase": "Active"}},
     ["ml", "Active", "2y70d"]),
    ("serviceaccounts", {"metadata": {"name": "default", "creationTimestamp": ago(hours=1)}}, ["default", 0, "60m"]),
    ("leases", {"metadata": {"name": "kopf", "creationTimestamp": ago(seconds=5)}, "spec": {"holderIdentity": "op-1"}},
     ["kopf", "op-1", "5s"]),
    ("endpoints", {"metadata": {"name": "job1", "creationTimestamp": ago(seconds=5)},
                   "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}]}]},
     ["job1", "10.0.0.1:80,10.0.0.2:80", "5s"]),
    ("customresourcedefinitions", {"metadata": {"name": "finetunejobs.kubetune.dev",
                                                "creationTimestamp": "2026-11-25T10:00:00.5+00:00"}},
     ["finetunejobs.kubetune.dev", "2026-11-25T10:00:00Z"]),
    ("nodes", {"metadata": {"name": "local", "creationTimestamp": ago(days=1),
                            "labels": {"node-role.kubernetes.io/control-plane": ""}},
               "status": {"conditions": [{"type": "Ready", "status": "True"}],
                          "addresses": [{"type": "InternalIP", "address": "10.244.0.1"}],
                          "nodeInfo": {"kubeletVersion": "v1.37.1"}}},
     ["local", "Ready", "control-plane", "24h", "v1.37.1", "10.244.0.1", "<none>", "<unknown>", "<unknown>", "<unknown>"]),
    ("widgets", {"metadata": {"name": "w", "creationTimestamp": ago(seconds=3)}}, ["w", "3s"]),
])
def test_builtin_rows(resource: str, obj: dict, cells: list) -> None:
    columns = builtin_columns(resource)
    assert row_cells(resource, columns, obj, NOW) == cells
    assert len(cells) == len(columns)


def test_event_row() -> None:
    event = {"metadata": {"name": "job1.abc"}, "type": "Normal", "reason": "Created", "message": " made pods ",
             "involvedObject": {"kind": "FineTuneJob", "name": "job1"}, "source": {"component": "kopf"},
             "firstTimestamp": ago(minutes=3), "lastTimestamp": ago(seconds=30), "count": 2}
    columns = builtin_columns("events")
    assert [c["name"] for c in columns if c["priority"] == 0] == ["Last Seen", "Type", "Reason", "Object", "Message"]
    assert row_cells("events", columns, event, NOW) == [
        "30s", "Normal", "Created", "finetunejob/job1", "", "kopf", "made pods", "3m", 2, "job1.abc"]


# --- the Table object --------------------------------------------------------------------------

def test_to_table_shape_kubectl_reads() -> None:
    columns = crd_columns(FTJ_VERSION)
    table = to_table("finetunejobs", columns, [ftj(phase="Running")], NOW, resource_version="105")
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert table["metadata"] == {"resourceVersion": "105"}
    assert all(set(c) == {"name", "type", "format", "description", "priority"} for c in table["columnDefinitions"])
    row = table["rows"][0]
    assert len(row["cells"]) == len(table["columnDefinitions"])
    assert row["object"] == {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": ftj()["metadata"]}


@pytest.mark.parametrize("include, has_object, kind", [("Object", True, "FineTuneJob"), ("None", False, None)])
def test_to_table_include_object(include: str, has_object: bool, kind: str | None) -> None:
    table = to_table("finetunejobs", crd_columns(FTJ_VERSION), [ftj()], NOW, include_object=include)
    assert ("object" in table["rows"][0]) is has_object
    if has_object:
        assert table["rows"][0]["object"]["kind"] == kind


def test_finetunejob_crd_columns() -> None:
    crd = yaml.safe_load((REPO / "crds" / "finetunejob.yaml").read_text())
    version = crd["spec"]["versions"][0]
    columns = crd_columns(version)
    assert columns[0]["name"] == "Name"
    assert [c["name"] for c in columns[1:]] == [c["name"] for c in version["additionalPrinterColumns"]]
    cells = row_cells("finetunejobs", columns, ftj(phase="Running"), NOW)
    assert cells[0] == "job1" and len(cells) == len(columns)

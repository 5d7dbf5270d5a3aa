"""The wire-level traps of KUBE_API_TRACE.md, the kubernetes python client, watches and pod logs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import AsyncIterator

import kubernetes
import pytest

from apiserver_harness import start_apiserver, stop_apiserver
from apiserver_manifests import WIDGET_CRD, training

AGGREGATED = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
TRAININGS = "/apis/example.kubetune.dev/v1/namespaces/default/trainings"


@pytest.fixture
def cluster(apiserver):
    apiserver.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    return apiserver


@pytest.fixture
def client(cluster):
    api_client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield api_client
    api_client.close()


def watch_lines(response, count: int) -> list[dict]:
    """The next `count` watch events; one line iterator per response, so nothing buffered is lost."""
    if not hasattr(response, "watch_events"):
        response.watch_events = (json.loads(line) for line in response.iter_lines(chunk_size=None) if line)
    return [event for _, event in zip(range(count), response.watch_events)]


def test_requests_without_the_token_are_unauthorized(apiserver):
    response = apiserver.http("GET", "/api/v1/namespaces", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["reason"] == "Unauthorized"


def test_aggregated_discovery_is_served_with_its_exact_content_type(cluster):
    response = cluster.http("GET", "/apis", headers={"Accept": AGGREGATED + ",application/json"})
    assert response.headers["Content-Type"] == AGGREGATED
    groups = {item["metadata"]["name"]: item for item in response.json()["items"]}
    resource = groups["example.kubetune.dev"]["versions"][0]["resources"][0]
    assert resource["shortNames"] == ["trn"] and resource["subresources"][0]["subresource"] == "status"
    core = cluster.http("GET", "/api", headers={"Accept": AGGREGATED}).json()
    assert [item["metadata"]["name"] for item in core["items"]] == [""]


def test_legacy_discovery_lists_subresources(cluster):
    assert cluster.http("GET", "/api").json()["kind"] == "APIVersions"
    names = [r["name"] for r in cluster.http("GET", "/api/v1").json()["resources"]]
    assert "pods/log" in names and "pods/status" in names
    group = cluster.http("GET", "/apis/example.kubetune.dev/v1").json()
    assert {"trainings", "trainings/status"} <= {r["name"] for r in group["resources"]}


def test_openapi_patch_operations_advertise_field_validation_and_v2_is_absent(cluster):
    index = cluster.http("GET", "/openapi/v3").json()["paths"]
    document = cluster.http("GET", index["apis/example.kubetune.dev/v1"]["serverRelativeURL"]).json()
    patch = document["paths"]["/apis/example.kubetune.dev/v1/namespaces/{namespace}/trainings/{name}"]["patch"]
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    assert patch["x-kubernetes-group-version-kind"] == {"group": "example.kubetune.dev", "version": "v1", "kind": "Training"}
    assert cluster.http("GET", "/openapi/v2").status_code == 404


def test_not_found_is_a_kubernetes_status(cluster):
    body = cluster.http("GET", TRAININGS + "/missing").json()
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": 'trainings.example.kubetune.dev "missing" not found', "reason": "NotFound",
                    "details": {"name": "missing", "group": "example.kubetune.dev", "kind": "trainings"}, "code": 404}


def test_apply_patch_creates_when_absent(cluster):
    response = cluster.http("PATCH", TRAININGS + "/applied?fieldManager=test",
                            headers={"Content-Type": "application/apply-patch+yaml"}, data=training("applied"))
    assert response.status_code == 201
    again = cluster.http("PATCH", TRAININGS + "/applied?fieldManager=test",
                         headers={"Content-Type": "application/apply-patch+yaml"}, data=training("applied"))
    assert again.status_code == 200


def test_json_patch_with_a_stale_resource_version_test_is_a_conflict(cluster):
    created = cluster.http("POST", TRAININGS, data=training("kopfish")).json()
    version = created["metadata"]["resourceVersion"]
    finalizer = [{"op": "test", "path": "/metadata/resourceVersion", "value": version},
                 {"op": "add", "path": "/metadata/finalizers", "value": ["kopf.zalando.org/KopfFinalizerMarker"]}]
    headers = {"Content-Type": "application/json-patch+json"}
    first = cluster.http("PATCH", TRAININGS + "/kopfish", headers=headers, json=finalizer)
    assert first.status_code == 200 and first.json()["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    stale = cluster.http("PATCH", TRAININGS + "/kopfish", headers=headers, json=finalizer)
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"


def test_strict_field_validation_rejects_and_warn_reports_unknown_fields(cluster):
    body = training("unknown", foo=1)
    strict = cluster.http("POST", TRAININGS + "?fieldValidation=Strict", data=body)
    assert strict.status_code == 400 and 'unknown field "spec.foo"' in strict.json()["message"]
    warned = cluster.http("POST", TRAININGS + "?fieldValidation=Warn", data=body)
    assert warned.status_code == 201 and 'unknown field \\"spec.foo\\"' in warned.headers["Warning"] or \
        'unknown field "spec.foo"' in warned.headers["Warning"]
    assert "foo" not in warned.json()["spec"]


def test_dry_run_validates_without_persisting(cluster):
    response = cluster.http("POST", TRAININGS + "?dryRun=All", data=training("dry"))
    assert response.status_code == 201
    assert cluster.http("GET", TRAININGS + "/dry").status_code == 404


def test_table_for_get_list_and_partial_object_metadata(cluster):
    cluster.http("POST", TRAININGS, data=training("t"))
    table = cluster.http("GET", TRAININGS, headers={"Accept": TABLE}).json()
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Phase", "Replicas", "Model", "Age"]
    row = table["rows"][0]
    assert len(row["cells"]) == 5 and row["object"]["kind"] == "PartialObjectMetadata"


def test_events_are_filtered_by_involved_object_field_selectors(apiserver):
    for name, kind in (("a", "FineTuneJob"), ("b", "Pod")):
        apiserver.http("POST", "/api/v1/namespaces/default/events", json={
            "metadata": {"generateName": "kopf-event-"}, "type": "Normal", "reason": "Made", "message": name,
            "involvedObject": {"kind": kind, "name": "job1", "namespace": "default", "uid": "u-" + name}})
    selector = "involvedObject.name=job1,involvedObject.namespace=default,involvedObject.kind=FineTuneJob,involvedObject.uid=u-a"
    events = apiserver.http("GET", f"/api/v1/namespaces/default/events?fieldSelector={selector}&limit=500",
                            headers={"Accept": "application/vnd.kubernetes.protobuf,application/json"}).json()
    assert events["kind"] == "EventList"
    assert [e["message"] for e in events["items"]] == ["a"]
    assert events["items"][0]["metadata"]["name"].startswith("kopf-event-")


def test_python_client_create_patch_status_and_label_selector(client):
    api = kubernetes.client.CustomObjectsApi(client)
    body = json.loads(training("py"))
    body["metadata"]["labels"] = {"a": "b"}
    created = api.create_namespaced_custom_object("example.kubetune.dev", "v1", "default", "trainings", body)
    assert created["spec"]["precision"] == "auto"
    patched = api.patch_namespaced_custom_object_status("example.kubetune.dev", "v1", "default", "trainings", "py",
                                                        {"status": {"phase": "Running"}})
    assert patched["status"] == {"phase": "Running"}
    listed = api.list_namespaced_custom_object("example.kubetune.dev", "v1", "default", "trainings", label_selector="a=b")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["py"]
    assert api.list_namespaced_custom_object("example.kubetune.dev", "v1", "default", "trainings",
                                             label_selector="a=c")["items"] == []


def test_python_client_watch_without_list_gets_synthetic_added(client):
    api = kubernetes.client.CustomObjectsApi(client)
    api.create_namespaced_custom_object("example.kubetune.dev", "v1", "default", "trainings", json.loads(training("w")))
    watch = kubernetes.watch.Watch()
    events = []
    for event in watch.stream(api.list_namespaced_custom_object, "example.kubetune.dev", "v1", "default",
                              "trainings", timeout_seconds=1):
        events.append((event["type"], event["object"]["metadata"]["name"]))
        watch.stop()
    assert events == [("ADDED", "w")]


def test_watch_list_sends_initial_events_then_the_end_bookmark_then_live_changes(cluster):
    cluster.http("POST", TRAININGS, data=training("x"))
    cluster.http("POST", TRAININGS, data=training("y"))
    query = ("?allowWatchBookmarks=true&fieldSelector=metadata.name%3Dx&resourceVersionMatch=NotOlderThan"
             "&sendInitialEvents=true&timeoutSeconds=30&watch=true")
    with cluster.http("GET", TRAININGS + query, stream=True) as response:
        added, bookmark = watch_lines(response, 2)
        assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "x")
        assert bookmark["type"] == "BOOKMARK"
        assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
        cluster.http("PATCH", TRAININGS + "/y", headers={"Content-Type": "application/merge-patch+json"},
                     json={"metadata": {"labels": {"k": "v"}}})
        cluster.http("PATCH", TRAININGS + "/x", headers={"Content-Type": "application/merge-patch+json"},
                     json={"metadata": {"labels": {"k": "v"}}})
        [modified] = watch_lines(response, 1)
        assert (modified["type"], modified["object"]["metadata"]["name"]) == ("MODIFIED", "x")


def test_watch_resumes_from_a_resource_version(cluster):
    created = cluster.http("POST", TRAININGS, data=training("r")).json()
    cluster.http("DELETE", TRAININGS + "/r")
    query = f"?watch=true&timeoutSeconds=5&resourceVersion={created['metadata']['resourceVersion']}"
    with cluster.http("GET", TRAININGS + query, stream=True) as response:
        [deleted] = watch_lines(response, 1)
    assert (deleted["type"], deleted["object"]["metadata"]["name"]) == ("DELETED", "r")


def test_label_selector_watch_sees_objects_enter_and_leave(cluster):
    cluster.http("POST", TRAININGS, data=training("s"))
    with cluster.http("GET", TRAININGS + "?watch=true&timeoutSeconds=10&labelSelector=team%3Da&resourceVersion=1",
                      stream=True) as response:
        for labels in ({"team": "a"}, {"team": "b"}):
            cluster.http("PATCH", TRAININGS + "/s", headers={"Content-Type": "application/merge-patch+json"},
                         json={"metadata": {"labels": labels}})
        events = [(e["type"], e["object"]["metadata"]["name"]) for e in watch_lines(response, 2)]
    assert events == [("ADDED", "s"), ("DELETED", "s")]


def test_watch_with_table_accept_sends_one_row_tables(cluster):
    cluster.http("POST", TRAININGS, data=training("tab"))
    with cluster.http("GET", TRAININGS + "?watch=true&timeoutSeconds=5", headers={"Accept": TABLE},
                      stream=True) as response:
        [event] = watch_lines(response, 1)
    assert event["object"]["kind"] == "Table" and len(event["object"]["rows"]) == 1


def test_watch_from_an_expired_resource_version_gets_a_410_error_event(tmp_path):
    running, thread = start_apiserver(tmp_path, history_size=3)
    try:
        for index in range(6):
            running.http("POST", "/api/v1/namespaces/default/configmaps", json={"metadata": {"name": f"c{index}"}})
        with running.http("GET", "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=2",
                          stream=True) as response:
            [event] = watch_lines(response, 1)
        assert event["type"] == "ERROR"
        assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    finally:
        stop_apiserver(running, thread)


class FakeLogs:
    """A LogSource with fixed lines per (namespace, pod, container)."""

    def __init__(self, logs: dict[tuple[str, str, str], list[bytes]]) -> None:
        self.logs = logs

    async def stream(self, namespace: str, pod: str, container: str, follow: bool) -> AsyncIterator[bytes]:
        if (namespace, pod, container) not in self.logs:
            raise KeyError((namespace, pod, container))
        for line in self.logs[(namespace, pod, container)]:
            await asyncio.sleep(0)
            yield line


def _pod(name: str, containers: list[str]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers]}})


def test_kubectl_logs_follow_streams_until_the_source_ends(tmp_path):
    logs = FakeLogs({("default", "trainer-0", "main"): [b"step 1 loss 2.0\n", b"step 2 loss 1.5\n"]})
    running, thread = start_apiserver(tmp_path, log_source=logs)
    try:
        running.kubectl("apply", "-f", "-", input=_pod("trainer-0", ["main", "sidecar"]))
        result = running.kubectl("logs", "trainer-0", "-c", "main", "-f")
        assert result.stdout == "step 1 loss 2.0\nstep 2 loss 1.5\n"
        missing = running.kubectl("logs", "trainer-0", "-c", "sidecar", check=False)
        assert missing.returncode != 0 and "sidecar" in missing.stderr
    finally:
        stop_apiserver(running, thread)


def test_logs_without_a_log_source_say_why(apiserver):
    apiserver.kubectl("apply", "-f", "-", input=_pod("p", ["main"]))
    result = apiserver.kubectl("logs", "p", check=False)
    assert result.returncode != 0 and "no log source" in result.stderr


def test_kubeconfig_without_ca_data_still_reaches_the_https_server(apiserver, tmp_path):
    from kubetune.localcluster.apiserver import kubeconfig

    path = kubeconfig(apiserver.url, apiserver.token, tmp_path / "insecure-kubeconfig")
    result = subprocess.run([apiserver.kubectl_command()[0], "--kubeconfig", str(path), "get", "namespaces", "-o", "name"],
                            capture_output=True, text=True, timeout=60)
    assert "namespace/default" in result.stdout, result.stderr


def test_tls_can_be_turned_off_for_plain_http_clients(tmp_path):
    running, thread = start_apiserver(tmp_path, tls=False)
    try:
        assert running.url.startswith("http://")
        assert running.http("GET", "/api/v1/namespaces/default").json()["metadata"]["name"] == "default"
    finally:
        stop_apiserver(running, thread)


def test_idle_watches_get_periodic_bookmarks_when_allowed(cluster, monkeypatch):
    from kubetune.localcluster.apiserver import watch

    monkeypatch.setattr(watch, "IDLE_WAKEUP_SECONDS", 0.2)
    with cluster.http("GET", TRAININGS + "?watch=true&allowWatchBookmarks=true&resourceVersion=1&timeoutSeconds=20",
                      stream=True) as response:
        [event] = watch_lines(response, 1)
    assert event["type"] == "BOOKMARK" and event["object"]["kind"] == "Training"

"""The embedded API server as real kubectl 1.37 sees it: apply, get, wait, describe, delete, explain, patch."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from apiserver_manifests import WIDGET_CRD, training


@pytest.fixture
def cluster(apiserver):
    apiserver.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    return apiserver


def wait_until(check, attempts: int = 600) -> None:
    for _ in range(attempts):
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"never happened: {check}")


def get_json(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_applied_crd_is_established_and_discoverable(cluster):
    crd = get_json(cluster, "crd", "trainings.example.kubetune.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    resources = cluster.kubectl("api-resources", "--api-group=example.kubetune.dev").stdout
    assert "trainings" in resources and "trn" in resources


def test_apply_reports_created_unchanged_configured_and_applies_defaults(cluster):
    assert "training.example.kubetune.dev/a created" in cluster.kubectl("apply", "-f", "-", input=training("a")).stdout
    assert "unchanged" in cluster.kubectl("apply", "-f", "-", input=training("a")).stdout
    assert "configured" in cluster.kubectl("apply", "-f", "-", input=training("a", precision="bf16")).stdout
    obj = get_json(cluster, "trn", "a")
    assert obj["spec"] == {"model": "s3://models/tiny/", "precision": "bf16", "workers": {"replicas": 1}}
    assert obj["metadata"]["generation"] == 2


def test_server_side_apply_creates_then_updates(cluster):
    first = cluster.kubectl("apply", "--server-side", "-f", "-", input=training("ssa"))
    assert "serverside-applied" in first.stdout
    cluster.kubectl("apply", "--server-side", "-f", "-", input=training("ssa", workers={"replicas": 3}))
    assert get_json(cluster, "trn", "ssa")["spec"]["workers"]["replicas"] == 3


@pytest.mark.parametrize(("spec", "expected"), [
    ({"workers": {"replicas": 0}},
     "spec.workers.replicas: Invalid value: 0: spec.workers.replicas in body should be greater than or equal to 1"),
    ({"precision": "fp8"}, 'spec.precision: Unsupported value: "fp8"'),
    ({"model": "http://elsewhere"}, "spec.model in body should match '^s3://.+'"),
    ({"model": None}, "spec.model: Required value"),
    ({"foo": 1}, 'unknown field "spec.foo"'),
])
def test_invalid_objects_are_refused_naming_the_field(cluster, spec, expected):
    manifest = json.loads(training("bad", **spec))
    manifest["spec"] = {k: v for k, v in manifest["spec"].items() if v is not None}
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
    assert result.returncode != 0
    assert expected in result.stderr
    assert cluster.kubectl("get", "trn", "bad", check=False).returncode != 0


def test_get_prints_printer_columns_and_wide_columns(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("a", workers={"replicas": 2}))
    cluster.kubectl("patch", "trn", "a", "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Running"}}')
    lines = cluster.kubectl("get", "trn").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "REPLICAS", "AGE"]
    assert lines[1].split()[:3] == ["a", "Running", "2"]
    wide = cluster.kubectl("get", "trn", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "REPLICAS", "MODEL", "AGE"]
    assert "s3://models/tiny/" in wide[1]


def test_get_watch_prints_a_row_per_change(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("w"))
    process = subprocess.Popen(
        [*cluster.kubectl_command(), "get", "trn", "w", "-w", "--output-watch-events"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        assert process.stdout.readline().split() == ["EVENT", "NAME", "PHASE", "REPLICAS", "AGE"]
        assert process.stdout.readline().split()[:2] == ["ADDED", "w"]
        cluster.kubectl("patch", "trn", "w", "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Done"}}')
        assert process.stdout.readline().split()[:3] == ["MODIFIED", "w", "Done"]
    finally:
        watchdog.cancel()
        process.kill()
        process.communicate()


def test_wait_for_condition_already_true(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("done"))
    cluster.kubectl("patch", "trn", "done", "--subresource=status", "--type=merge",
                    "-p", '{"status":{"conditions":[{"type":"Succeeded","status":"True"}]}}')
    result = cluster.kubectl("wait", "--for=condition=Succeeded", "trn/done", "--timeout=30s")
    assert "condition met" in result.stdout


def test_wait_for_condition_that_becomes_true_later(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("later"))
    process = subprocess.Popen([*cluster.kubectl_command(), "wait", "--for=condition=Succeeded", "trn/later",
                                "--timeout=60s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Only once kubectl watches does the condition become true, so the watch (not the GET) must see it.
        wait_until(lambda: cluster.server.cluster.store.watcher_count("example.kubetune.dev", "trainings") > 0)
        cluster.kubectl("patch", "trn", "later", "--subresource=status", "--type=merge",
                        "-p", '{"status":{"conditions":[{"type":"Succeeded","status":"True"}]}}')
        out, err = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "condition met" in out


def test_describe_lists_events_of_the_object(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("d"))
    uid = get_json(cluster, "trn", "d")["metadata"]["uid"]
    other = {"kind": "Training", "name": "other", "namespace": "default", "apiVersion": "example.kubetune.dev/v1"}
    for name, involved, reason in (("e1", {**other, "name": "d", "uid": uid}, "Scheduled"),
                                   ("e2", other, "NotMine")):
        event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name}, "involvedObject": involved,
                 "reason": reason, "message": f"{reason} happened", "type": "Normal", "count": 1,
                 "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z"}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(event))
    described = cluster.kubectl("describe", "trn", "d").stdout
    assert "Scheduled happened" in described
    assert "NotMine" not in described


def test_delete_without_finalizers_removes_at_once(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("gone"))
    assert 'deleted' in cluster.kubectl("delete", "trn", "gone").stdout
    assert "NotFound" in cluster.kubectl("get", "trn", "gone", check=False).stderr


def test_delete_with_finalizer_waits_for_it_to_be_removed(cluster):
    manifest = json.loads(training("held"))
    manifest["metadata"]["finalizers"] = ["example.kubetune.dev/cleanup"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    cluster.kubectl("delete", "trn", "held", "--wait=false")
    held = get_json(cluster, "trn", "held")
    assert held["metadata"]["deletionTimestamp"]
    cluster.kubectl("patch", "trn", "held", "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    assert "NotFound" in cluster.kubectl("get", "trn", "held", check=False).stderr


def _owned_configmap(name: str, owner: dict) -> str:
    reference = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                 "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    return json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "ownerReferences": [reference]}, "data": {"k": "v"}})


def test_deleting_an_owner_garbage_collects_its_children(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("owner"))
    cluster.kubectl("apply", "-f", "-", input=_owned_configmap("child", get_json(cluster, "trn", "owner")))
    cluster.kubectl("delete", "trn", "owner")
    assert "NotFound" in cluster.kubectl("get", "cm", "child", check=False).stderr


def test_orphan_deletion_keeps_children_without_the_owner_reference(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("owner"))
    cluster.kubectl("apply", "-f", "-", input=_owned_configmap("child", get_json(cluster, "trn", "owner")))
    cluster.kubectl("delete", "trn", "owner", "--cascade=orphan")
    assert "ownerReferences" not in get_json(cluster, "cm", "child")["metadata"]


def test_explain_prints_schema_descriptions(cluster):
    explained = cluster.kubectl("explain", "trainings.spec").stdout
    assert "Spec says what to train and how." in explained
    assert "Base model folder, an s3:// URI." in explained
    assert "model\t<string> -required-" in explained


def test_merge_patch_ignores_status_and_status_subresource_only_changes_status(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("p"))
    cluster.kubectl("patch", "trn", "p", "--type=merge", "-p", '{"status":{"phase":"Hacked"},"spec":{"precision":"fp32"}}')
    obj = get_json(cluster, "trn", "p")
    assert "status" not in obj and obj["spec"]["precision"] == "fp32" and obj["metadata"]["generation"] == 2
    cluster.kubectl("patch", "trn", "p", "--subresource=status", "--type=merge",
                    "-p", '{"status":{"phase":"Running"},"spec":{"precision":"bf16"}}')
    obj = get_json(cluster, "trn", "p")
    assert obj["status"] == {"phase": "Running"}
    assert obj["spec"]["precision"] == "fp32" and obj["metadata"]["generation"] == 2


def test_strategic_merge_patch_merges_containers_by_name(apiserver):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "a", "image": "one", "env": [{"name": "X", "value": "1"}]},
                                   {"name": "b", "image": "two"}]}}
    apiserver.kubectl("apply", "-f", "-", input=json.dumps(pod))
    apiserver.kubectl("patch", "pod", "p", "-p", '{"spec":{"containers":[{"name":"b","image":"three"}]}}')
    containers = get_json(apiserver, "pod", "p")["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [("a", "one"), ("b", "three")]
    assert containers[0]["env"] == [{"name": "X", "value": "1"}]


def test_client_side_apply_of_a_configmap_uses_strategic_merge(apiserver):
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}}
    apiserver.kubectl("apply", "-f", "-", input=json.dumps(configmap))
    configmap["data"] = {"a": "3"}
    assert "configured" in apiserver.kubectl("apply", "-f", "-", input=json.dumps(configmap)).stdout
    assert get_json(apiserver, "cm", "c")["data"] == {"a": "3"}


def test_label_selectors(apiserver):
    for name, labels in (("one", {"app": "a", "tier": "web"}), ("two", {"app": "b"}), ("three", {"app": "c"})):
        apiserver.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}}))

    def names(selector: str) -> list[str]:
        return apiserver.kubectl("get", "cm", "-l", selector, "-o", "name").stdout.split()

    assert names("app=a") == ["configmap/one"]
    assert names("app in (a,b)") == ["configmap/one", "configmap/two"]
    assert names("app notin (a,b)") == ["configmap/three"]
    assert names("app!=a,!tier") == ["configmap/three", "configmap/two"]
    assert names("tier") == ["configmap/one"]


def test_replace_with_a_stale_resource_version_is_a_conflict(cluster):
    cluster.kubectl("apply", "-f", "-", input=training("c"))
    stale = get_json(cluster, "trn", "c")
    cluster.kubectl("patch", "trn", "c", "--type=merge", "-p", '{"spec":{"precision":"fp32"}}')
    result = cluster.kubectl("replace", "-f", "-", input=json.dumps(stale), check=False)
    assert result.returncode != 0
    assert "the object has been modified" in result.stderr


def test_creating_in_a_missing_namespace_is_not_found(apiserver):
    result = apiserver.kubectl("apply", "-n", "nowhere", "-f", "-", check=False, input=json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}))
    assert 'namespaces "nowhere" not found' in result.stderr


def test_deleting_a_namespace_deletes_its_content(apiserver):
    apiserver.kubectl("create", "namespace", "team")
    apiserver.kubectl("apply", "-n", "team", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}))
    apiserver.kubectl("delete", "namespace", "team")
    assert "NotFound" in apiserver.kubectl("get", "namespace", "team", check=False).stderr
    assert apiserver.kubectl("get", "cm", "-A", "-o", "name").stdout.split() == []


def test_secret_string_data_is_stored_base64(apiserver):
    apiserver.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"user": "admin"}}))
    secret = get_json(apiserver, "secret", "s")
    assert secret["data"] == {"user": "YWRtaW4="} and "stringData" not in secret


def test_imperative_create_commands_send_protobuf_that_is_understood(apiserver):
    apiserver.kubectl("create", "namespace", "ml")
    apiserver.kubectl("create", "configmap", "settings", "-n", "ml", "--from-literal=mode=fast")
    apiserver.kubectl("create", "secret", "generic", "creds", "-n", "ml", "--from-literal=key=s3cr3t")
    apiserver.kubectl("create", "serviceaccount", "runner", "-n", "ml")
    assert get_json(apiserver, "cm", "settings", "-n", "ml")["data"] == {"mode": "fast"}
    assert get_json(apiserver, "secret", "creds", "-n", "ml")["data"] == {"key": "czNjcjN0"}
    assert get_json(apiserver, "sa", "runner", "-n", "ml")["metadata"]["namespace"] == "ml"


def test_kubectl_delete_waits_until_the_finalizer_is_removed(cluster):
    manifest = json.loads(training("slow"))
    manifest["metadata"]["finalizers"] = ["example.kubetune.dev/cleanup"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    process = subprocess.Popen([*cluster.kubectl_command(), "delete", "trn", "slow", "--timeout=60s"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Remove the finalizer only once kubectl has asked for the deletion, as a controller would.
        wait_until(lambda: "deletionTimestamp" in get_json(cluster, "trn", "slow")["metadata"])
        cluster.kubectl("patch", "trn", "slow", "--type=json", "-p", '[{"op":"remove","path":"/metadata/finalizers"}]')
        out, err = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert '"slow" deleted' in out

"""Pure logic of the embedded API server, without HTTP: selectors, patches, watch filtering, object semantics."""

from __future__ import annotations

import pytest
import yaml

from kubetune.localcluster.apiserver.errors import APIError
from kubetune.localcluster.apiserver.operations import Cluster, WriteOptions
from kubetune.localcluster.apiserver.patch import json_patch, merge_patch, strategic_merge_patch
from kubetune.localcluster.apiserver.resources import Registry
from kubetune.localcluster.apiserver.selectors import FieldSelector, LabelSelector, Selector
from kubetune.localcluster.apiserver.store import Change, Store
from kubetune.localcluster.apiserver.watch import visible_type

from apiserver_manifests import WIDGET_CRD


def labelled(**labels: str) -> dict:
    return {"metadata": {"name": "x", "labels": labels}}


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("app=a", {"app": "a"}, True),
    ("app==a", {"app": "b"}, False),
    ("app!=a", {}, True),
    ("app in (a, b),tier", {"app": "b", "tier": "x"}, True),
    ("app notin (a,b)", {"app": "a"}, False),
    ("!tier", {"tier": "x"}, False),
    ("", {}, True),
])
def test_label_selector(selector, labels, matches):
    assert LabelSelector.parse(selector).matches(labelled(**labels)) is matches


def test_malformed_label_selector_is_a_bad_request():
    with pytest.raises(APIError) as error:
        LabelSelector.parse("app in a,b)")
    assert error.value.code == 400


def test_field_selector_reads_nested_fields_and_missing_ones_are_empty():
    event = {"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"}}
    assert FieldSelector.parse("involvedObject.kind=Pod,involvedObject.name==p").matches(event)
    assert FieldSelector.parse("spec.nodeName=").matches(event)
    assert not FieldSelector.parse("involvedObject.kind!=Pod").matches(event)


def test_merge_patch_deletes_with_null_and_replaces_lists():
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert merge_patch(target, {"a": {"b": None}, "l": [3]}) == {"a": {"c": 2}, "l": [3]}
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2]}


def test_strategic_merge_patch_merges_keyed_lists_and_honours_directives():
    pod = {"spec": {"containers": [{"name": "a", "image": "1", "ports": [{"containerPort": 80}]}, {"name": "b"}],
                    "volumes": [{"name": "v"}]},
           "metadata": {"finalizers": ["one"]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                      "containers": [{"name": "a", "ports": [{"containerPort": 81}]}, {"name": "b", "$patch": "delete"}],
                      "volumes": [{"name": "w"}]},
             "metadata": {"finalizers": ["two"]}}
    result = strategic_merge_patch(pod, patch)
    assert result["spec"]["containers"] == [{"name": "a", "image": "1", "ports": [{"containerPort": 80}, {"containerPort": 81}]}]
    assert result["spec"]["volumes"] == [{"name": "v"}, {"name": "w"}]
    assert result["metadata"]["finalizers"] == ["one", "two"]


def test_json_patch_failed_resource_version_test_is_409_and_other_tests_422():
    obj = {"metadata": {"resourceVersion": "5"}, "spec": {"a": 1}}
    with pytest.raises(APIError) as conflict:
        json_patch(obj, [{"op": "test", "path": "/metadata/resourceVersion", "value": "4"}])
    assert conflict.value.code == 409
    with pytest.raises(APIError) as invalid:
        json_patch(obj, [{"op": "test", "path": "/spec/a", "value": 2}])
    assert invalid.value.code == 422


def _change(change_type: str, new: dict, old: dict | None) -> Change:
    return Change(1, change_type, "", "configmaps", "default", new, old)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ({"app": "a"}, {"app": "a"}, "MODIFIED"),
    ({"app": "b"}, {"app": "a"}, "ADDED"),
    ({"app": "a"}, {"app": "b"}, "DELETED"),
    ({"app": "b"}, {"app": "c"}, None),
])
def test_selector_watch_turns_moves_across_the_selector_into_added_or_deleted(old, new, expected):
    selector = Selector.parse("app=a", None)
    assert visible_type(_change("MODIFIED", labelled(**new), labelled(**old)), selector) == expected


def test_store_reports_expired_history():
    store = Store(history_size=2)
    subscription = store.subscribe("", "configmaps", None)
    for index in range(4):
        store.write("", "configmaps", {"metadata": {"name": f"c{index}", "namespace": "default"}}, None)
    assert [c.resource_version for c in store.changes_since(subscription, 2)] == [3, 4]
    with pytest.raises(APIError) as error:
        store.changes_since(subscription, 1)
    assert error.value.code == 410


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(Store(), Registry())


def _info(cluster: Cluster, group: str, version: str, resource: str):
    info = cluster.registry.get(group, version, resource)
    assert info is not None
    return info


def test_generate_name_uid_and_generation_bumps_only_on_spec_changes(cluster):
    cm_info = _info(cluster, "", "v1", "configmaps")
    created = cluster.create(cm_info, "default", {"metadata": {"generateName": "cfg-"}, "data": {"a": "1"}},
                             WriteOptions()).obj
    name = created["metadata"]["name"]
    assert name.startswith("cfg-") and len(name) == 9 and created["metadata"]["uid"]
    relabelled = cluster.patch(cm_info, "default", name, "application/merge-patch+json",
                               {"metadata": {"labels": {"x": "y"}}}, WriteOptions()).obj
    assert relabelled["metadata"]["generation"] == 1
    changed = cluster.patch(cm_info, "default", name, "application/merge-patch+json", {"data": {"a": "2"}},
                            WriteOptions()).obj
    assert changed["metadata"]["generation"] == 2
    assert int(changed["metadata"]["resourceVersion"]) > int(relabelled["metadata"]["resourceVersion"])


def test_create_twice_is_already_exists(cluster):
    cm_info = _info(cluster, "", "v1", "configmaps")
    cluster.create(cm_info, "default", {"metadata": {"name": "c"}}, WriteOptions())
    with pytest.raises(APIError) as error:
        cluster.create(cm_info, "default", {"metadata": {"name": "c"}}, WriteOptions())
    assert (error.value.code, error.value.reason, error.value.message) == (409, "AlreadyExists", 'configmaps "c" already exists')


def test_crd_creation_registers_the_resource_and_deletion_removes_its_objects(cluster):
    crd_info = _info(cluster, "apiextensions.k8s.io", "v1", "customresourcedefinitions")
    cluster.create(crd_info, "", yaml.safe_load(WIDGET_CRD), WriteOptions())
    trainings = _info(cluster, "example.kubetune.dev", "v1", "trainings")
    cluster.create(trainings, "default", {"metadata": {"name": "t"}, "spec": {"model": "s3://m/"}}, WriteOptions())
    cluster.delete(crd_info, "", "trainings.example.kubetune.dev", {})
    assert cluster.registry.get("example.kubetune.dev", "v1", "trainings") is None
    assert cluster.store.list("example.kubetune.dev", "trainings") == []


def test_garbage_collection_cascades_through_generations(cluster):
    cm_info = _info(cluster, "", "v1", "configmaps")
    parent = cluster.create(cm_info, "default", {"metadata": {"name": "parent"}}, WriteOptions()).obj

    def owned_by(owner: dict, name: str) -> dict:
        reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}
        return cluster.create(cm_info, "default", {"metadata": {"name": name, "ownerReferences": [reference]}},
                              WriteOptions()).obj

    owned_by(owned_by(parent, "child"), "grandchild")
    cluster.delete(cm_info, "default", "parent", {"propagationPolicy": "Background"})
    assert cluster.store.list("", "configmaps", "default") == []


@pytest.mark.parametrize(("resource", "name"), [("configmaps", "Upper"), ("services", "1svc"), ("namespaces", "a.b"),
                                                ("configmaps", "x" * 254)])
def test_invalid_names_are_refused_naming_metadata_name(cluster, resource, name):
    info = _info(cluster, "", "v1", resource)
    with pytest.raises(APIError) as error:
        cluster.create(info, "default", {"metadata": {"name": name}}, WriteOptions())
    assert error.value.code == 422
    assert error.value.details["causes"][0]["field"] == "metadata.name"


def test_delete_collection_deletes_only_selected_objects(cluster):
    info = _info(cluster, "", "v1", "configmaps")
    for name, app in (("a", "x"), ("b", "x"), ("c", "y")):
        cluster.create(info, "default", {"metadata": {"name": name, "labels": {"app": app}}}, WriteOptions())
    deleted = cluster.delete_collection(info, "default", Selector.parse("app=x", None), {})
    assert [d["metadata"]["name"] for d in deleted] == ["a", "b"]
    assert [o["metadata"]["name"] for o in cluster.store.list("", "configmaps", "default")] == ["c"]


def test_crd_whose_name_is_not_plural_dot_group_is_refused(cluster):
    crd_info = _info(cluster, "apiextensions.k8s.io", "v1", "customresourcedefinitions")
    crd = yaml.safe_load(WIDGET_CRD)
    crd["metadata"]["name"] = "widgets.example.kubetune.dev"
    with pytest.raises(APIError) as error:
        cluster.create(crd_info, "", crd, WriteOptions())
    assert error.value.code == 422
    assert 'metadata.name: Invalid value: "widgets.example.kubetune.dev": must be spec.names.plural+"."+spec.group' \
        in error.value.message
    assert cluster.registry.get("example.kubetune.dev", "v1", "trainings") is None

"""A tiny kopf operator run in-process against the embedded API server (what kubetune's operator relies on)."""

from __future__ import annotations

import textwrap
import time

import kopf.testing
import kubernetes

from apiserver_manifests import WIDGET_CRD, training

OPERATOR = textwrap.dedent('''
    import kopf
    import kubernetes

    @kopf.on.login()  # a fresh registry has no default login handlers
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.create("example.kubetune.dev", "v1", "trainings")
    def create_fn(name, namespace, patch, **_):
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-cfg"},
                     "data": {"owner": name}}
        kopf.adopt(configmap)
        kubernetes.config.load_kube_config()
        with kubernetes.client.ApiClient() as client:
            kubernetes.client.CoreV1Api(client).create_namespaced_config_map(namespace, configmap)
        patch.status["phase"] = "Running"
        return {"configmap": f"{name}-cfg"}

    @kopf.on.delete("example.kubetune.dev", "v1", "trainings")
    def delete_fn(**_):
        pass
''')


def eventually(check, timeout: float = 60.0):
    """Poll until `check()` returns a truthy value (kopf works asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check.__doc__ or check}")
        time.sleep(0.2)


class Observer:
    """What a user sees through the kubernetes client while the operator works."""

    def __init__(self, kubeconfig: str) -> None:
        self.client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)

    def training(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object("example.kubetune.dev", "v1", "default", "trainings", name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def configmap_names(self) -> list[str]:
        return [c.metadata.name for c in self.core.list_namespaced_config_map("default").items]


def test_kopf_operator_adds_finalizer_adopts_child_patches_status_and_deletes(apiserver, tmp_path, monkeypatch):
    apiserver.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    monkeypatch.setenv("KUBECONFIG", str(apiserver.kubeconfig))
    # The client library reads $KUBECONFIG once, at import: point its default there too.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(apiserver.kubeconfig))
    operator_file = tmp_path / "operator.py"
    operator_file.write_text(OPERATOR)
    observer = Observer(str(apiserver.kubeconfig))
    # Handlers register into kopf's process-wide default registry: give this operator its own and
    # put the old one back afterwards, so they never leak into other tests' operators.
    previous_registry = kopf.get_default_registry()
    try:
        with kopf.testing.KopfRunner(["run", "--standalone", "--all-namespaces", str(operator_file)],
                                     timeout=120, registry=kopf.OperatorRegistry()) as runner:
            apiserver.kubectl("apply", "-f", "-", input=training("job1"))
            handled = eventually(lambda: (obj := observer.training("job1")) and obj.get("status", {}).get("create_fn") and obj)
            assert handled["status"]["phase"] == "Running"
            assert handled["status"]["create_fn"] == {"configmap": "job1-cfg"}
            assert "kopf.zalando.org/KopfFinalizerMarker" in handled["metadata"]["finalizers"]
            child = observer.core.read_namespaced_config_map("job1-cfg", "default")
            assert child.metadata.owner_references[0].uid == handled["metadata"]["uid"]

            apiserver.kubectl("delete", "trn", "job1", "--wait=false")
            eventually(lambda: observer.training("job1") is None)
            eventually(lambda: "job1-cfg" not in observer.configmap_names())
    finally:
        kopf.set_default_registry(previous_registry)
        observer.client.close()
    assert runner.exception is None
    assert runner.exit_code == 0

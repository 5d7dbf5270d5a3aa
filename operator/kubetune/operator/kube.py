"""The few Kubernetes API calls the operator makes, returning plain dicts.

Kept apart from the handlers so they read as "what happens" and this file as "how it is sent".
Uses the official client (kubeconfig from KUBECONFIG / ~/.kube/config, in-cluster otherwise).
"""

from __future__ import annotations

import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubetune.api.resource import GROUP, PLURAL, VERSION


class NoCredentialsError(RuntimeError):
    """Neither a kubeconfig nor an in-cluster service account was found."""


def load_credentials() -> client.Configuration:
    """Configure the client: $KUBECONFIG if set, else the pod's service account, else
    ~/.kube/config. Returns the resulting configuration (kopf's login reuses it)."""
    # The client captures $KUBECONFIG when it is imported; read it now so a later value counts.
    kubeconfig = os.environ.get("KUBECONFIG") or None
    loaders = [
        lambda: config.load_incluster_config(),
        lambda: config.load_kube_config(config_file=os.path.expanduser("~/.kube/config")),
    ]
    if kubeconfig:
        loaders.insert(0, lambda: config.load_kube_config(config_file=kubeconfig))
    for load in loaders:
        try:
            load()
            return client.Configuration.get_default_copy()
        except config.ConfigException:
            continue
    raise NoCredentialsError(
        "no Kubernetes credentials: set KUBECONFIG (or ~/.kube/config), or run in a pod with a service account"
    )


def bearer_token(configuration: client.Configuration) -> str | None:
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    if not header:
        return None
    return header.split(" ", 1)[-1]


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        """Create a ConfigMap, Service or Pod; False when it already exists (idempotent resume)."""
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Pod": self.core.create_namespaced_pod,
        }[obj["kind"]]
        try:
            create(namespace=obj["metadata"]["namespace"], body=obj)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        found = self.core.list_namespaced_pod(namespace=namespace, label_selector=selector)
        return self.api_client.sanitize_for_serialization(found).get("items") or []

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body={"status": status}
        )

"""The few Kubernetes API calls the operator makes, returning plain dicts.

Kept apart from the handlers so they read as "what happens" and this file as "how it is sent".
Uses the official client (kubeconfig from KUBECONFIG / ~/.kube/config, in-cluster otherwise).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubetune.api import JobRef
from kubetune.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

REPORTING_COMPONENT = "kubetune-operator"
REPORTING_INSTANCE = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or REPORTING_COMPONENT


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

    def create(self, obj: dict[str, Any]) -> None:
        """Create a ConfigMap, Service or Pod; ApiException as the API answered (409: the name is taken)."""
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Pod": self.core.create_namespaced_pod,
        }[obj["kind"]]
        create(namespace=obj["metadata"]["namespace"], body=obj)

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap, Service or Pod as the API returns it; None when there is none."""
        read = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "Pod": self.core.read_namespaced_pod,
        }[kind]
        try:
            return self.api_client.sanitize_for_serialization(read(name=name, namespace=namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

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

    def post_event(self, job: JobRef, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the job, as `kubectl describe ftj` shows them."""
        now = datetime.now(UTC)
        self.core.create_namespaced_event(job.namespace, {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{job.name}.", "namespace": job.namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": job.name,
                               "namespace": job.namespace, "uid": job.uid},
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": REPORTING_INSTANCE,
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        })

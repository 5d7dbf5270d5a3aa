"""The few Kubernetes API calls the operator makes, returning plain dicts.

Kept apart from the handlers so they read as "what happens" and this file as "how it is sent".
Uses the official client (kubeconfig from KUBECONFIG / ~/.kube/config, in-cluster otherwise).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubetune.api import JobRef
from kubetune.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

REPORTING_COMPONENT = "kubetune-operator"
REPORTING_INSTANCE = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or REPORTING_COMPONENT
# Names the operator, and which replica, in the API server's audit log.
USER_AGENT = f"kubetune-operator/{version('kubetune')} ({REPORTING_INSTANCE})"


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
    def __init__(self, api_client: client.ApiClient | None = None, pool_size: int | None = None) -> None:
        if api_client is None:
            configuration = client.Configuration.get_default_copy()
            if pool_size:  # one connection per thread calling at once (urllib3 keeps 5 x cores by default)
                configuration.connection_pool_maxsize = pool_size
            api_client = client.ApiClient(configuration)
        self.api_client = api_client
        self.api_client.user_agent = USER_AGENT  # kopf's own requests say kopf/
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> None:
        """Create a ConfigMap, Service or Pod; ApiException as the API answered (409: the name is taken).
        ``dry_run``: the API server checks it all and stores nothing."""
        create = {
            "ConfigMap": client.CoreV1Api.create_namespaced_config_map,
            "Service": client.CoreV1Api.create_namespaced_service,
            "Pod": client.CoreV1Api.create_namespaced_pod,
        }[obj["kind"]]
        # raw_function: the client's call without its own pydantic models, which are stricter than
        # the API server (an integer quantity such as the nvidia.com/gpu limit, a field of
        # spec.scheduling.affinity missing) and would refuse a child before sending it, with an
        # error that is no API answer (the pass would be retried for ever). The API server alone
        # judges a child; its refusal fails the job (ChildRefused), naming the field.
        create.raw_function(self.core, namespace=obj["metadata"]["namespace"], body=obj,
                            dry_run="All" if dry_run else None)

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

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        """Delete the pod if it is still the one with ``uid`` (gracefully: it gets its grace
        period to stop); gone already, or replaced by another of the same name, is no error."""
        self._delete(self.core.delete_namespaced_pod, name=name, namespace=namespace, uid=uid)

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the FineTuneJob with ``uid``; its children go with it (garbage collection)."""
        self._delete(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, uid=uid,
                     propagation="Background")

    def _delete(self, call: Any, *args: Any, uid: str, propagation: str | None = None, **kwargs: Any) -> None:
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid),
                                         propagation_policy=propagation)
        try:
            call(*args, body=options, **kwargs)
        except ApiException as error:
            if error.status not in (404, 409):  # 409: the UID precondition failed, another object now
                raise

    def pod_log_tail(self, namespace: str, name: str, lines: int) -> str | None:
        """The last ``lines`` lines of the trainer container's log; None when there is none
        (the pod is gone, or its container never started)."""
        try:
            return self.core.read_namespaced_pod_log(name, namespace, container="trainer", tail_lines=lines)
        except ApiException as error:
            if error.status in (400, 404):
                return None
            raise

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> str:
        """A JSON merge patch of the status (``status_patch`` makes one: None removes a key).
        Returns the job's resourceVersion after it."""
        job = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body={"status": patch}
        )
        return job["metadata"]["resourceVersion"]


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


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) from ``old`` to ``new``: changed keys, None for removed
    ones (a merge patch keeps whatever it does not mention), objects recursively, lists whole."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = status_patch(before, value)
            if nested:
                patch[key] = nested
        elif value != before or key not in old:
            patch[key] = value
    return patch

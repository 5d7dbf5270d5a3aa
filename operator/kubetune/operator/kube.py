"""The few Kubernetes API calls the operator makes, returning plain dicts.

Kept apart from the handlers so they read as "what happens" and this file as "how it is sent".
Uses the official client (kubeconfig from KUBECONFIG / ~/.kube/config, in-cluster otherwise).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubetune.api import JobRef
from kubetune.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION
from kubetune.operator.settings import API_TIMEOUT_SECONDS

REPORTING_COMPONENT = "kubetune-operator"
REPORTING_INSTANCE = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or REPORTING_COMPONENT
# Names the operator, and which replica, in the API server's audit log.
USER_AGENT = f"kubetune-operator/{version('kubetune')} ({REPORTING_INSTANCE})"
# A TCP connection to the API server is made within seconds, or the server is unreachable.
CONNECT_TIMEOUT_SECONDS = 10.0
# Answers of an API server unwell for a moment (OperatorApiClient): retried after these delays.
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_DELAYS_SECONDS = (0.5, 1.0, 2.0)
MAX_RETRY_AFTER_SECONDS = 10.0


def request_timeout(seconds: float) -> tuple[float, float]:
    """(connect, read) timeouts of a request, given the operator's API timeout."""
    return min(CONNECT_TIMEOUT_SECONDS, seconds), float(seconds)


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


class OperatorApiClient(client.ApiClient):
    """The official client, with two things it lacks for a controller:

    - a timeout on every request that names none (``timeout``: (connect, read) seconds). Without
      one, urllib3 waits for ever on a connection that never answers (a half-open TCP connection,
      a load balancer that accepts and forwards nothing): the calling thread hangs, and with it
      the pass that holds its job's lock, so that job never moves again. With one, the call
      raises urllib3's timeout error and the pass is retried with a back-off (urllib3 itself
      first retries a read that timed out on a GET or DELETE, up to 3 times);
    - a few quick retries of a request the API server answered 429 (after its Retry-After) or
      500, 502, 503, 504, as kopf retries its own. A pass is all or nothing over a dozen
      requests (a gang's creations, the holders of names taken, its Event, its status): with no
      retry below it, an API failing a quarter of them (overloaded, restarting, an etcd leader
      election) failed nearly every pass, and the back-off between passes grew to a minute:
      jobs stood still for minutes. Each retry is safe: a 429 was not processed; a create that
      was answers 409 next, which the handlers check is this job's child; a merge patch, a
      read, a delete with a UID precondition are idempotent.
    """

    def __init__(self, configuration: client.Configuration, timeout: tuple[float, float],
                 retry_delays: tuple[float, ...] = RETRY_DELAYS_SECONDS) -> None:
        super().__init__(configuration)
        self.timeout, self.retry_delays = timeout, retry_delays

    def call_api(self, method: str, url: str, header_params: dict[str, Any] | None = None, body: Any = None,
                 post_params: Any = None, _request_timeout: Any = None) -> Any:
        for delay in (*self.retry_delays, None):
            response = super().call_api(method, url, header_params, body, post_params,
                                        _request_timeout=_request_timeout or self.timeout)
            if delay is None or response.status not in RETRIED_STATUSES:
                return response
            response.read()  # the connection goes back to the pool
            time.sleep(max(delay, _retry_after(response.getheader("Retry-After"))))
        raise AssertionError("unreachable")


def _retry_after(value: str | None) -> float:
    """The seconds of a Retry-After header (not its HTTP-date form), at most MAX_RETRY_AFTER_SECONDS."""
    try:
        return min(MAX_RETRY_AFTER_SECONDS, max(0.0, float(value or 0)))
    except ValueError:
        return 0.0


class Kube:
    """``timeout``: seconds to wait for the API server's answer (every call, the Lease's included,
    goes through this client); ``api_client``: one of the caller's, as it is."""

    def __init__(self, api_client: client.ApiClient | None = None, pool_size: int | None = None,
                 timeout: float = API_TIMEOUT_SECONDS) -> None:
        if api_client is None:
            configuration = client.Configuration.get_default_copy()
            if pool_size:  # one connection per thread calling at once (urllib3 keeps 5 x cores by default)
                configuration.connection_pool_maxsize = pool_size
            api_client = OperatorApiClient(configuration, request_timeout(timeout))
        self.api_client = api_client
        self.api_client.user_agent = USER_AGENT  # kopf's own requests say kopf/
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> None:
        """Create a Service or Pod; ApiException as the API answered (409: the name is taken).
        ``dry_run``: the API server checks it all and stores nothing."""
        create = {
            "Service": client.CoreV1Api.create_namespaced_service,
            "Pod": client.CoreV1Api.create_namespaced_pod,
        }[obj["kind"]]
        # raw_function: the client's call without its own pydantic models, which are stricter than
        # the API server (an integer quantity such as the nvidia.com/gpu limit, a field of
        # spec.scheduling.affinity missing) and would refuse a child before sending it, with an
        # error that is no API answer (the pass would be retried for ever). The API server alone
        # judges a child; its refusal fails the job (ChildRefused), naming the field.
        _discard(create.raw_function(self.core, namespace=obj["metadata"]["namespace"], body=obj,
                                     dry_run="All" if dry_run else None, _preload_content=False))

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Service or Pod as the API returns it; None when there is none."""
        read = {
            "Service": self.core.read_namespaced_service,
            "Pod": self.core.read_namespaced_pod,
        }[kind]
        try:
            return json.loads(read(name=name, namespace=namespace, _preload_content=False).data)
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
            _discard(call(*args, body=options, _preload_content=False, **kwargs))
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

    def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any],
                         resource_version: str | None = None) -> str:
        """A JSON merge patch of the status (``status_patch`` makes one: None removes a key),
        applied only to ``resource_version`` of the job when given (409 Conflict otherwise).
        Returns the job's resourceVersion after it."""
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        job = self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body=body)
        return job["metadata"]["resourceVersion"]


    def post_event(self, job: JobRef, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the job, as `kubectl describe ftj` shows them."""
        now = datetime.now(UTC)
        _discard(self.core.create_namespaced_event(job.namespace, _preload_content=False, body={
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
        }))


def _discard(response: Any) -> None:
    """Read and drop an answer the operator has no use for (a created or deleted object). The
    client would build its pydantic model: 11 ms for a pod, half the operator's CPU at a
    thousand jobs. Read to its end, the connection goes back to the pool."""
    response.data  # noqa: B018  (reads the body)
    response.release_conn()


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

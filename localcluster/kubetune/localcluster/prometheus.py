"""The local cluster's Prometheus, configured as prometheus-operator configures one.

A real Prometheus (built from its Go module by `make`, with Kubernetes service discovery) runs
on the host, where pod IPs are reachable. It discovers targets through the cluster's API as a
ServiceAccount of its own (namespace ``monitoring``, a ClusterRole that reads pods, services,
endpoints and EndpointSlices, and nothing else), and its scrape configs and rules come from the
ServiceMonitor, PodMonitor and PrometheusRule objects in the cluster, translated the way
prometheus-operator translates them (``scrape_configs``, ``rule_groups``). A watcher thread
re-reads those objects every few seconds and reloads Prometheus when they change, so a chart
installed after ``kubetune local up --with-prometheus`` is scraped without a restart.

The translation covers the monitor fields kubetune's chart uses (selector.matchLabels,
namespaceSelector, port, path, interval, honorLabels, relabelings) and refuses the others by
name rather than ignoring them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune.localcluster.processes import free_port

NAMESPACE = "monitoring"
SERVICE_ACCOUNT = "prometheus"
RELOAD_SECONDS = 3.0
READY_TIMEOUT_SECONDS = 60.0
MONITOR_KINDS = ("servicemonitors", "podmonitors", "prometheusrules")
# prometheus-operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) come from its Go
# module, through the Go module proxy the machines reach, cached by Go like the builds.
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
# Fields of a monitor endpoint this translation understands; any other is refused by name.
_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
_MONITOR_FIELDS = {"selector", "namespaceSelector", "podMetricsEndpoints", "endpoints", "jobLabel"}

RBAC = """
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: prometheus, namespace: monitoring}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: kubetune-local-prometheus}
rules:
  # Kubernetes service discovery: role pod, and role endpointslice for Services.
  - apiGroups: [""]
    resources: [pods, services, endpoints]
    verbs: [get, list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: kubetune-local-prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kubetune-local-prometheus}
subjects:
  - {kind: ServiceAccount, name: prometheus, namespace: monitoring}
"""


class UnsupportedMonitor(ValueError):
    """A monitor uses a field this translation does not implement."""


def operator_crds() -> list[Path]:
    """The CRDs of the monitors, from prometheus-operator's module (downloaded once by Go)."""
    found = subprocess.run(["go", "mod", "download", "-json", PROMETHEUS_OPERATOR_MODULE], capture_output=True,
                           text=True, timeout=600)
    if found.returncode != 0:
        raise RuntimeError(f"go mod download {PROMETHEUS_OPERATOR_MODULE} failed: {found.stderr.strip() or found.stdout}")
    folder = Path(json.loads(found.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return [folder / f"monitoring.coreos.com_{kind}.yaml" for kind in MONITOR_KINDS]


def label_name(name: str) -> str:
    """A Kubernetes label or annotation name as Prometheus' discovery spells it in meta labels."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _selector(role: str, match_labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"action": "keep",
             "source_labels": [f"__meta_kubernetes_{role}_label_{label_name(key)}",
                               f"__meta_kubernetes_{role}_labelpresent_{label_name(key)}"],
             "regex": f"({re.escape(value)});true"}
            for key, value in sorted(match_labels.items())]


def _relabelings(relabelings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prometheus-operator's RelabelConfig (camelCase) as Prometheus' relabel_config."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{names.get(key, key.lower()): value for key, value in relabel.items()} for relabel in relabelings]


def _namespaces(monitor: dict[str, Any]) -> dict[str, Any]:
    selector = monitor["spec"].get("namespaceSelector") or {}
    if selector.get("any"):
        return {}
    names = selector.get("matchNames") or [monitor["metadata"]["namespace"]]
    return {"namespaces": {"names": list(names)}}


def _check(monitor: dict[str, Any], endpoints: list[dict[str, Any]]) -> None:
    where = f"{monitor['kind']} {monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    unknown = set(monitor["spec"]) - _MONITOR_FIELDS
    unknown |= {f"{key} (endpoint)" for endpoint in endpoints for key in set(endpoint) - _ENDPOINT_FIELDS}
    if set((monitor["spec"].get("selector") or {})) - {"matchLabels"}:
        unknown.add("selector.matchExpressions")
    if unknown:
        raise UnsupportedMonitor(f"{where}: the local Prometheus does not implement {', '.join(sorted(unknown))}")


def scrape_configs(monitors: list[dict[str, Any]], api_server: str, ca_file: str,
                   token_file: str) -> list[dict[str, Any]]:
    """Prometheus scrape configs for ServiceMonitors and PodMonitors, as prometheus-operator
    generates them: one job per endpoint, targets kept by the selector's labels and the port's
    name, labelled namespace/pod/container (and service), then the monitor's own relabelings.
    A PodMonitor's job label is "<namespace>/<name>", a ServiceMonitor's the Service's name."""
    configs = []
    for monitor in sorted(monitors, key=lambda m: (m["kind"], m["metadata"]["namespace"], m["metadata"]["name"])):
        pod_monitor = monitor["kind"] == "PodMonitor"
        endpoints = monitor["spec"].get("podMetricsEndpoints" if pod_monitor else "endpoints") or []
        _check(monitor, endpoints)
        namespace, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
        match_labels = (monitor["spec"].get("selector") or {}).get("matchLabels") or {}
        for index, endpoint in enumerate(endpoints):
            if pod_monitor:
                relabel = [
                    *_selector("pod", match_labels),
                    {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                     "regex": endpoint["port"]},
                    # Finished pods are not scraped (prometheus-operator drops them too).
                    {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    {"target_label": "job", "replacement": f"{namespace}/{name}"},
                ]
                role = "pod"
            else:
                relabel = [
                    *_selector("service", match_labels),
                    {"action": "keep", "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                     "regex": endpoint["port"]},
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
                ]
                role = "endpointslice"
            relabel += [{"target_label": "endpoint", "replacement": endpoint["port"]},
                        *_relabelings(endpoint.get("relabelings") or [])]
            config: dict[str, Any] = {
                "job_name": f"{'podMonitor' if pod_monitor else 'serviceMonitor'}/{namespace}/{name}/{index}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "kubernetes_sd_configs": [{
                    "role": role, "api_server": api_server,
                    "tls_config": {"ca_file": ca_file}, "authorization": {"credentials_file": token_file},
                    **_namespaces(monitor),
                }],
                "relabel_configs": relabel,
            }
            for key, target in (("interval", "scrape_interval"), ("scrapeTimeout", "scrape_timeout")):
                if endpoint.get(key):
                    config[target] = endpoint[key]
            configs.append(config)
    return configs


def rule_groups(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PrometheusRule objects' groups, as one rule file holds them; group names are made
    unique per object, as prometheus-operator's per-object files keep them apart."""
    groups = []
    for rule in sorted(rules, key=lambda r: (r["metadata"]["namespace"], r["metadata"]["name"])):
        for group in rule["spec"].get("groups") or []:
            groups.append({**group, "name": f"{rule['metadata']['namespace']}/{rule['metadata']['name']}/{group['name']}"})
    return groups


@dataclass
class LocalPrometheus:
    """Prometheus for a local cluster: ``start``, ``url``, ``query``, ``stop``."""

    state_dir: Path
    kubeconfig: str
    kubectl: str = field(default_factory=lambda: str(Path(sys.executable).parent / "kubectl"))
    binary: str = field(default_factory=lambda: str(Path(sys.executable).parent / "prometheus"))
    interval: str = "5s"
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)  # added to its environment (the cluster marks its processes)
    process: subprocess.Popen[bytes] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _objects: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalPrometheus:
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"{self.binary} not found: run `make install` (it builds Prometheus from its Go module)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._kubectl("apply", "-f", "-", input=RBAC)
        for crd in operator_crds():  # so that charts with monitors install here as on a cluster
            self._kubectl("apply", "--server-side", "-f", str(crd))
        self._kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      *(f"crd/{kind}.monitoring.coreos.com" for kind in MONITOR_KINDS))
        token = self._kubectl("create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration=24h").strip()
        (self.state_dir / "token").write_text(token)
        (self.state_dir / "token").chmod(0o600)
        config = yaml.safe_load(Path(self.kubeconfig).read_text())
        cluster = config["clusters"][0]["cluster"]
        self._api_server = cluster["server"]
        ca_file = self.state_dir / "ca.crt"
        if "certificate-authority-data" in cluster:
            import base64
            ca_file.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        else:
            ca_file.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
        self._ca_file = str(ca_file)
        self._write_config(self._read_objects())
        self.port = self.port or free_port("127.0.0.1")
        with open(self.state_dir / "prometheus.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.state_dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.state_dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **self.env})
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}; see {self.state_dir / 'prometheus.log'}")
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"prometheus was not ready within {READY_TIMEOUT_SECONDS:.0f}s")
                time.sleep(0.2)
        self._watcher = threading.Thread(target=self._watch, name="prometheus-monitors", daemon=True)
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the monitors --------------------------------------------------------------------
    def reload_now(self) -> None:
        """Read the monitors and rules again and reload Prometheus if they changed."""
        objects = self._read_objects()
        if self._write_config(objects):
            urllib.request.urlopen(urllib.request.Request(f"{self.url}/-/reload", method="POST"), timeout=10).read()

    def _watch(self) -> None:
        while not self._stop.wait(RELOAD_SECONDS):
            try:
                self.reload_now()
            except (OSError, subprocess.CalledProcessError, UnsupportedMonitor) as error:
                print(f"local prometheus: {error}", file=sys.stderr)

    def _read_objects(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for kind in MONITOR_KINDS:
            result = subprocess.run([self.kubectl, "--kubeconfig", self.kubeconfig, "get", f"{kind}.monitoring.coreos.com",
                                     "-A", "-o", "json"], capture_output=True, text=True)
            # No prometheus-operator CRDs: no monitors of that kind.
            found[kind] = json.loads(result.stdout)["items"] if result.returncode == 0 else []
        return found

    def _write_config(self, objects: dict[str, list[dict[str, Any]]]) -> bool:
        """Write prometheus.yml and rules.yml; whether anything changed."""
        monitors = objects["servicemonitors"] + objects["podmonitors"]
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(self.state_dir / "rules.yml")],
            "scrape_configs": scrape_configs(monitors, self._api_server, self._ca_file, str(self.state_dir / "token")),
        }
        texts = {"prometheus.yml": yaml.safe_dump(config, sort_keys=False),
                 "rules.yml": yaml.safe_dump({"groups": rule_groups(objects["prometheusrules"])}, sort_keys=False)}
        changed = False
        for name, text in texts.items():
            path = self.state_dir / name
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                changed = True
        return changed

    def _kubectl(self, *args: str, input: str | None = None) -> str:
        return subprocess.run([self.kubectl, "--kubeconfig", self.kubeconfig, *args], input=input, capture_output=True,
                              text=True, check=True).stdout

    # -- the HTTP API --------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>: the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        return self.api("query", query=expression)["result"]

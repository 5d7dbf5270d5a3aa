"""The real Kubernetes control plane as child processes: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, configured the way kubeadm configures them.

Nothing here is Kubernetes code of ours: the binaries are the official ones (see
``binaries.py``); this module only chooses ports, writes certificates and kubeconfigs, passes
flags and waits until each part answers.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.localcluster import kubeconfig, processes
from kubetune.localcluster.binaries import ControlPlaneBinaries
from kubetune.localcluster.pki import ADMIN_USER, ClusterPKI

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT_SECONDS = 120.0
API_RATE_ARGS = ("--kube-api-qps=200", "--kube-api-burst=400")
# Requests of users and of their controllers (the operator, kwok, kubectl), at metadata level and
# once each (when the response is complete); the control plane's own traffic is left out.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: None
  users: [system:kube-scheduler, system:kube-controller-manager, system:apiserver]
- level: None
  userGroups: [system:nodes, system:serviceaccounts:kube-system]
- level: Metadata
"""


@dataclass
class ControlPlane:
    """Start with ``start()``; ``api_url`` and ``admin_kubeconfig`` are then usable.

    ``address`` is where the API server listens and what it advertises: the address pods reach
    the host on (the pod bridge, or loopback), so pods and users talk to the same endpoint.
    ``env`` is added to every process's environment (the cluster's marker for crash clean-up).
    ``audit``: the API server writes an audit log (``audit_log_path``, JSON lines, metadata
    only) of every request made by a user rather than by the control plane itself: how the
    operator's benchmark counts the operator's requests by verb.
    """

    state_dir: Path
    address: str
    service_cidr: str
    pki: ClusterPKI
    binaries: ControlPlaneBinaries
    env: dict[str, str] = field(default_factory=dict)
    audit: bool = False
    api_port: int = 0
    _etcd_port: int = 0
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def etcd_dir(self) -> Path:
        return self.state_dir / "etcd"

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    @property
    def audit_log_path(self) -> Path:
        return self.state_dir / "logs" / "audit.jsonl"

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_SECONDS, controllers: bool = True) -> None:
        """Start all four and return once the API server is ready. Blocking: call it from the
        thread that should own the processes (they die with it). ``controllers=False`` starts
        etcd and the API server alone (envtest's shape: the benchmarks' baseline)."""
        deadline = time.monotonic() + timeout
        shutil.rmtree(self.etcd_dir, ignore_errors=True)  # every `up` is a new cluster
        self._etcd_port = etcd_port = processes.free_port()
        self._start("etcd", self._etcd_args(etcd_port))
        processes.wait_for_port(
            "127.0.0.1", etcd_port, self._processes["etcd"], self.log_path("etcd"), deadline - time.monotonic()
        )
        self.api_port = processes.free_port(self.address)
        self._start("kube-apiserver", self._apiserver_args(etcd_port))
        kubeconfig.write(
            self.admin_kubeconfig, server=self.api_url, ca=self.pki.ca.cert, user=self.pki.admin, user_name=ADMIN_USER
        )
        self._wait_ready(deadline)
        if controllers:
            self._start("kube-controller-manager", self._controller_manager_args())
            self._start("kube-scheduler", self._scheduler_args())

    def restart_apiserver(self, down_seconds: float = 0.0, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Stop the API server (SIGTERM, as an upgrade or a crash-looping static pod would) and
        start it again on the same address after ``down_seconds``; etcd keeps the cluster's
        state. Returns once it is ready."""
        processes.stop(self._processes.pop("kube-apiserver"))
        time.sleep(down_seconds)
        self._start("kube-apiserver", self._apiserver_args(self._etcd_port))
        self._wait_ready(time.monotonic() + timeout)

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._processes.items()}

    def stop(self) -> None:
        """Stop in reverse order of need, then forget the cluster's data."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            process = self._processes.pop(name, None)
            if process is not None:
                processes.stop(process)
        shutil.rmtree(self.etcd_dir, ignore_errors=True)

    def check_running(self) -> None:
        """Raise naming the first component that died, with the end of its log."""
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode}; last lines of {self.log_path(name)}:\n"
                    + processes.log_tail(self.log_path(name))
                )

    def _start(self, name: str, args: list[str]) -> None:
        binary = {
            "etcd": self.binaries.etcd,
            "kube-apiserver": self.binaries.apiserver,
            "kube-controller-manager": self.binaries.controller_manager,
            "kube-scheduler": self.binaries.scheduler,
        }[name]
        log.debug("starting %s %s", name, " ".join(args))
        self._processes[name] = processes.start(
            [str(binary), *args], self.log_path(name), processes.environ_with(self.env)
        )

    def _admin_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return context

    def get(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` as the admin; None when it fails (absent, or not answering yet)."""
        try:
            with urllib.request.urlopen(self.api_url + path, timeout=5, context=self._admin_context()) as answer:
                return json.loads(answer.read())
        except OSError:
            return None

    def _wait_ready(self, deadline: float) -> None:
        context = self._admin_context()
        last = ""
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with urllib.request.urlopen(f"{self.api_url}/readyz", timeout=2, context=context) as answer:
                    if answer.status == 200:
                        return
            except urllib.error.HTTPError as error:
                last = error.read().decode(errors="replace")[-500:]
            except OSError as error:
                last = str(error)
            time.sleep(0.1)
        raise RuntimeError(f"kube-apiserver was not ready in time: {last}")

    # -- flags ---------------------------------------------------------------------------
    def _etcd_args(self, port: int) -> list[str]:
        peer = f"http://127.0.0.1:{processes.free_port()}"
        client = f"https://127.0.0.1:{port}"
        return [
            "--name=local",
            f"--data-dir={self.etcd_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=local={peer}",
            f"--cert-file={self.pki.etcd_server.cert}",
            f"--key-file={self.pki.etcd_server.key}",
            f"--trusted-ca-file={self.pki.ca.cert}",
            "--client-cert-auth",
            # The data is thrown away at `down`: durability buys nothing and fsync costs every write.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, etcd_port: int) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=https://127.0.0.1:{etcd_port}",
            f"--etcd-cafile={pki.ca.cert}",
            f"--etcd-certfile={pki.apiserver_etcd_client.cert}",
            f"--etcd-keyfile={pki.apiserver_etcd_client.key}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--service-cluster-ip-range={self.service_cidr}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            "--authorization-mode=Node,RBAC",
            # PodSecurity and the other defaults stay on; NodeRestriction is what kubeadm adds.
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
            f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
            f"--kubelet-certificate-authority={pki.ca.cert}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--allow-privileged=true",
            "--profiling=false",
            # The endpoint reconciler refuses a loopback address (the loopback network mode,
            # where nothing but this machine could use the `kubernetes` Service's endpoints).
            *(["--endpoint-reconciler-type=none"] if ipaddress.ip_address(self.address).is_loopback else []),
            *(self._audit_args() if self.audit else []),
        ]

    def _audit_args(self) -> list[str]:
        policy = self.state_dir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log_path}", "--audit-log-format=json",
                "--audit-log-mode=batch", "--audit-log-maxbackup=0"]

    def _component_kubeconfig(self, name: str, user: str) -> Path:
        pair = self.pki.controller_manager if name == "controller-manager" else self.pki.scheduler
        return kubeconfig.write(
            self.state_dir / "kubeconfigs" / f"{name}.kubeconfig",
            server=self.api_url, ca=self.pki.ca.cert, user=pair, user_name=user,
        )

    def _controller_manager_args(self) -> list[str]:
        pki = self.pki
        config = self._component_kubeconfig("controller-manager", "system:kube-controller-manager")
        return [
            f"--kubeconfig={config}",
            # One instance per cluster: no leader election to wait for.
            "--leader-elect=false",
            # Serving only /healthz and /metrics, which nothing here reads; 0 keeps ports free.
            "--secure-port=0",
            # Each controller acts as its own service account, as on kubeadm clusters.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",  # published to every namespace as kube-root-ca.crt
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            # Client rate limits of a single-tenant cluster: the defaults (20 requests a second,
            # bursts of 30) are sized for a shared control plane, and throttle the Job controller
            # and the garbage collector (a deleted job's pods) long before the API server is busy.
            *API_RATE_ARGS,
        ]

    def _scheduler_args(self) -> list[str]:
        config = self._component_kubeconfig("scheduler", "system:kube-scheduler")
        return [f"--kubeconfig={config}", "--leader-elect=false", "--secure-port=0", *API_RATE_ARGS]


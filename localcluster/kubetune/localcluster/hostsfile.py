"""Cluster DNS as hosts files: pure rendering plus an in-place writer.

Each pod gets its own hosts file (its own hostname first, so torch gloo, which resolves the
machine hostname to pick an interface, finds the pod IP), followed by the cluster-wide names.
Files are rewritten in place (same inode) because they are bind-mounted over /etc/hosts in
each pod's mount namespace: replacing the file would leave the pods reading a stale copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLUSTER_DOMAIN = "svc.cluster.local"
API_SERVICE_NAMES = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
S3_SERVICE_NAME = f"s3.kubetune-system.{CLUSTER_DOMAIN}"


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    name: str
    ip: str
    hostname: str | None = None
    subdomain: str | None = None

    @property
    def own_hostname(self) -> str:
        return self.hostname or self.name

    def names(self) -> list[str]:
        """Every name that resolves to this pod, most specific first."""
        names: list[str] = []
        if self.hostname and self.subdomain:
            names.append(f"{self.hostname}.{self.subdomain}.{self.namespace}.{CLUSTER_DOMAIN}")
            names.append(f"{self.hostname}.{self.subdomain}")
        names.append(self.name)
        return names


@dataclass(frozen=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ip: str | None

    def names(self) -> list[str]:
        return [f"{self.name}.{self.namespace}.{CLUSTER_DOMAIN}"]


def cluster_lines(
    pods: list[PodRecord], services: list[ServiceRecord], s3_address: str, api_address: str
) -> list[str]:
    """Hosts-file lines shared by every pod. Headless services (no clusterIP) get no line:
    their pods are reached by `<hostname>.<subdomain>` names instead. The API server's
    service names lead to the API server itself: without kube-proxy its ClusterIP is not
    routed, and its certificate names them."""
    lines = [f"{s3_address}\t{S3_SERVICE_NAME}", f"{api_address}\t" + " ".join(reversed(API_SERVICE_NAMES))]
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        lines.append(f"{pod.ip}\t" + " ".join(pod.names()))
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if (svc.namespace, svc.name) == ("default", "kubernetes"):
            continue
        if svc.cluster_ip and svc.cluster_ip != "None":
            lines.append(f"{svc.cluster_ip}\t" + " ".join(svc.names()))
    return lines


def render_pod_hosts(pod: PodRecord, shared: list[str]) -> str:
    head = [
        "# Managed by the kubetune local kubelet.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod.ip}\t{pod.own_hostname}",
    ]
    return "\n".join(head + shared) + "\n"


def write_in_place(path: Path, text: str) -> None:
    """Overwrite `path` keeping its inode, so bind mounts of it see the new content."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        # Write first, truncate after: a reader may briefly see a mix, never an empty file.
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)

"""Pod networking for the local kubelet.

Two modes:

* ``netns`` (root with iproute2 and unshare): one network namespace per pod, a veth pair per
  pod on one Linux bridge per cluster, pod IPs from a private /16 used only inside those
  namespaces; the bridge holds ``.1`` and is every pod's default route, so pods reach the
  host's services (S3) on the bridge address. Every pod may bind the same port.
* ``loopback`` (fallback): each pod gets its own 127.0.x.y address and no network isolation.

In both modes, when we may create mount namespaces (root and unshare), the pod process runs
in its own UTS + mount namespace where its hostname is set and its hosts file and volumes are
bind-mounted. Every namespace and link name starts with the per-cluster prefix so that a
crashed cluster's leftovers can be found and removed at the next start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Linux limits link names to 15 characters (IFNAMSIZ - 1); the prefix leaves room for a
# role letter and a pod index of up to 5 digits.
PREFIX_LEN = 8


def new_prefix() -> str:
    """A per-cluster name prefix like ``kt3f9a1-`` (8 characters)."""
    return "kt" + "%05x" % random.randrange(16**5) + "-"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def netns_supported() -> tuple[bool, str]:
    """Whether netns mode can work here, and if not, why (for the warning)."""
    if os.geteuid() != 0:
        return False, "not running as root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found"
    return True, ""


def mount_namespaces_supported() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def list_leftovers(prefix: str = "kt") -> tuple[list[str], list[str]]:
    """Network namespaces and links whose names start with ``prefix``."""
    namespaces: list[str] = []
    links: list[str] = []
    if shutil.which("ip") is None:
        return namespaces, links
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            namespaces.append(name)
    out = _run("ip", "-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@")[0]
            if name.startswith(prefix):
                links.append(name)
    return namespaces, links


def remove_leftovers(prefix: str) -> None:
    """Delete every network namespace and link named with ``prefix`` (crash recovery and stop)."""
    namespaces, links = list_leftovers(prefix)
    for ns in namespaces:
        _kill_netns_processes(ns)
        _run("ip", "netns", "del", ns, check=False)
    for link in links:
        _run("ip", "link", "del", link, check=False)
    for stage in Path(STAGE_ROOT).glob(f"{prefix}-*"):
        shutil.rmtree(stage, ignore_errors=True)


def _is_under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder if folder == "/" else folder + "/")


def image_paths() -> list[str]:
    """What pods need from this machine to run `torchrun`/`kubetune`: the Python environment
    and the source roots on sys.path (an editable install points into the checkout)."""
    paths = sorted({sys.prefix, sys.base_prefix, *(p for p in sys.path if os.path.isabs(p) and os.path.isdir(p))})
    return [p for p in paths if not any(_is_under(p, q) for q in paths if q != p)]


STAGE_ROOT = "/run/kubetune-stage"


def _staging_dir(pod_dir: str, prefix: str, targets: list[str]) -> str:
    """A folder for pinned mount sources that no mountPath covers (the pod's own folder when it
    can be; else one under /run, removed with the cluster's other leftovers)."""
    for candidate in (os.path.join(pod_dir, "stage"),
                      os.path.join(STAGE_ROOT, f"{prefix}-{os.path.basename(pod_dir)}")):
        if not any(_is_under(candidate, t) for t in targets):
            return candidate
    raise ValueError(f"every staging folder is under a volume mountPath ({', '.join(targets)})")


def _kill_netns_processes(ns: str) -> None:
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def _used_networks() -> list[ipaddress.IPv4Network]:
    used: list[ipaddress.IPv4Network] = []
    out = _run("ip", "-4", "-o", "addr", "show", check=False).stdout
    out += _run("ip", "-4", "route", "show", "table", "all", check=False).stdout
    for token in out.split():
        if "/" in token and token[0].isdigit():
            try:
                used.append(ipaddress.ip_network(token, strict=False))
            except ValueError:
                continue
    return used


def choose_free_cidr(avoid: list[ipaddress.IPv4Network] | None = None) -> ipaddress.IPv4Network:
    """A 10.x.0.0/16 that overlaps no host address or route (other clusters included) nor
    ``avoid``. A /16 for pods because finished pods keep no address but a 1000-job load test
    runs many at once; the service range takes one too."""
    used = _used_networks() + list(avoid or [])
    for _ in range(200):
        candidate = ipaddress.ip_network(f"10.{random.randrange(64, 250)}.0.0/16")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise RuntimeError("no free 10.x.0.0/16 for the pod or service network; remove unused routes")


@dataclass
class PodNet:
    """What a pod got from the network: its IP and, in netns mode, its namespace name."""

    ip: str
    netns: str | None = None
    host_link: str | None = None


@dataclass
class PodNetwork:
    prefix: str
    mode: str  # "netns" | "loopback"
    cidr: ipaddress.IPv4Network | None = None
    use_mount_namespace: bool = False
    _free: list[str] = field(default_factory=list)
    _next_index: int = 0

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def host_address(self) -> str:
        """Where pods reach services the host runs (S3)."""
        if self.mode == "netns" and self.cidr is not None:
            return str(self.cidr.network_address + 1)
        return "127.0.0.1"

    @classmethod
    def create(cls, prefix: str, mode: str = "auto") -> "PodNetwork":
        ok, why = netns_supported()
        if mode == "netns" and not ok:
            raise RuntimeError(f"pod network mode netns is unavailable: {why}")
        if mode == "auto":
            mode = "netns" if ok else "loopback"
        if mode == "loopback":
            mounts = mount_namespaces_supported()
            missing = ["network isolation (pods share the host network; two pods cannot bind the same port)"]
            if not mounts:
                missing += [
                    "per-pod /etc/hosts, so cluster DNS names do not resolve",
                    "volume mounts at their mountPath",
                    "per-pod hostname",
                ]
            log.warning(
                "pod network: loopback fallback (%s); each pod gets its own 127.0.x.y address. "
                "Unavailable: %s.",
                why or "loopback mode requested",
                "; ".join(missing),
            )
            return cls(prefix=prefix, mode="loopback", use_mount_namespace=mounts)
        net = cls(prefix=prefix, mode="netns", cidr=choose_free_cidr(), use_mount_namespace=True)
        net._setup_bridge()
        return net

    def _setup_bridge(self) -> None:
        assert self.cidr is not None
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_address}/{self.cidr.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def _allocate_ip(self) -> str:
        # Fresh addresses first: reusing a just-freed IP could reach a peer's stale connection.
        capacity = (self.cidr.num_addresses - 3) if self.cidr is not None else 254 * 254
        if self._next_index >= capacity:
            if not self._free:
                raise RuntimeError(f"pod address range of {self.mode} mode is full ({capacity} pods)")
            return self._free.pop(0)
        self._next_index += 1
        if self.mode == "netns":
            assert self.cidr is not None
            return str(self.cidr.network_address + self._next_index + 1)  # .1 is the bridge
        # 127.0.0.1 is the host's own; pods start at 127.0.1.1.
        index = self._next_index - 1
        return f"127.0.{1 + index // 254}.{1 + index % 254}"

    def add_pod(self) -> PodNet:
        ip = self._allocate_ip()
        if self.mode == "loopback":
            return PodNet(ip=ip)
        assert self.cidr is not None
        index = int(ipaddress.ip_address(ip)) - int(self.cidr.network_address)
        ns = f"{self.prefix}p{index}"
        host_link = f"{self.prefix}h{index}"
        peer = f"{self.prefix}c{index}"
        try:
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_link, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "link", "set", host_link, "master", self.bridge)
            _run("ip", "link", "set", host_link, "up")
            _run("ip", "-n", ns, "link", "set", peer, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/{self.cidr.prefixlen}", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.host_address)
        except Exception:
            self.remove_pod(PodNet(ip=ip, netns=ns, host_link=host_link))
            raise
        return PodNet(ip=ip, netns=ns, host_link=host_link)

    def remove_pod(self, pod: PodNet) -> None:
        if pod.netns:
            _kill_netns_processes(pod.netns)
            _run("ip", "netns", "del", pod.netns, check=False)
        if pod.host_link:
            _run("ip", "link", "del", pod.host_link, check=False)
        self._free.append(pod.ip)

    def wrap_command(
        self,
        pod: PodNet,
        argv: list[str],
        *,
        hostname: str,
        hosts_file: str,
        mounts: list[tuple[str, str, bool]],
        working_dir: str | None,
    ) -> list[str]:
        """The argv that runs ``argv`` inside the pod's namespaces.

        ``mounts`` are (source directory, mountPath, readOnly). The setup runs as a tiny shell
        script before ``exec`` so the pod's process is the shell's own pid (signals reach it).
        """
        if not self.use_mount_namespace:
            return argv
        setup = [f"hostname {shlex.quote(hostname)}", f"mount --bind {shlex.quote(hosts_file)} /etc/hosts"]
        if pod.netns:
            # Pods cannot reach the host's nameserver (no NAT), and every reverse lookup
            # (torch's c10d does one per connection) would wait for its timeout. A nameserver
            # on the pod's own loopback, where nothing listens, fails at once instead.
            resolv = os.path.join(os.path.dirname(hosts_file), "resolv.conf")
            with open(resolv, "w") as f:
                f.write("# kubetune local pod: names resolve from /etc/hosts only\n"
                        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            setup.append(f"mount --bind {shlex.quote(resolv)} /etc/resolv.conf")
        # The local "image" is this machine's filesystem, so a volume may hide part of it: an
        # emptyDir at /tmp hides a virtualenv or checkout that lives under /tmp. Every bind
        # source is first pinned under a staging folder outside all mountPaths, so later
        # mounts cannot hide earlier sources, and the Python environment is bound back on top.
        targets = [target for _, target, _ in mounts]
        hidden_image = [p for p in image_paths() if any(_is_under(p, t) for t in targets)]
        stage = _staging_dir(os.path.dirname(hosts_file), self.prefix, targets)
        pinned: list[str] = []
        for index, source in enumerate([*(m[0] for m in mounts), *hidden_image]):
            pin = shlex.quote(os.path.join(stage, str(index)))
            make = f"touch {pin}" if os.path.isfile(source) else f"mkdir -p {pin}"
            setup.append(f"mkdir -p {shlex.quote(stage)} && {make} && mount --bind {shlex.quote(source)} {pin}")
            pinned.append(pin)
        for (source, target, read_only), pin in zip(mounts, pinned):
            q_target = shlex.quote(target)
            if os.path.isfile(source):  # a subPath file: bind onto a file, not a directory
                parent = shlex.quote(os.path.dirname(target) or "/")
                setup.append(f"mkdir -p {parent} && touch {q_target}")
            else:
                setup.append(f"mkdir -p {q_target}")
            setup.append(f"mount --bind {pin} {q_target}")
            if read_only:
                setup.append(f"mount -o remount,bind,ro {q_target}")
        for path, pin in zip(hidden_image, pinned[len(mounts):]):
            setup.append(f"mkdir -p {shlex.quote(path)} && mount --bind {pin} {shlex.quote(path)}")
        if working_dir:
            setup.append(f"mkdir -p {shlex.quote(working_dir)} && cd {shlex.quote(working_dir)}")
        script = " && ".join(setup) + ' && exec "$@"'
        wrapped = ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        if pod.netns:
            wrapped = ["ip", "netns", "exec", pod.netns, *wrapped]
        return wrapped

    def close(self) -> None:
        if self.mode == "netns":
            remove_leftovers(self.prefix)

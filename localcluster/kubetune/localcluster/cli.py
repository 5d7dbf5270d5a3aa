"""``kubetune local up|down|status``: the local cluster's lifecycle from a shell.

``up`` writes ``<dir>/kubeconfig`` (the admin's) and ``<dir>/cluster.json`` (pid, API URL, S3
endpoints, prefix) and runs in the foreground until Ctrl-C, or with ``--detach`` starts itself
in the background (``python -m kubetune.localcluster up --dir DIR``) and returns once a pod can
be scheduled. The control plane's logs are in ``<dir>/logs/``. ``--with-prometheus`` adds a
Prometheus that discovers targets through the cluster's API and follows the ServiceMonitors,
PodMonitors and PrometheusRules in the cluster (``kubetune.localcluster.prometheus``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kubetune.localcluster import leftovers
from kubetune.localcluster.leftovers import pid_alive

DEFAULT_DIR = ".kubetune"
STOP_TIMEOUT_SECONDS = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="local_command", required=True)
    up = sub.add_parser("up", help="start the local cluster (real control plane, local node, S3)")
    up.add_argument("--dir", default=DEFAULT_DIR, help="state folder (default .kubetune)")
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument(
        "--network", choices=["auto", "netns", "loopback"], default="auto",
        help="pod network: netns needs root and iproute2; loopback gives no isolation",
    )
    up.add_argument(
        "--image", action="append", default=[], metavar="REPOSITORY", type=_image,
        help="an image the node runs besides kubetune/trainer and kubetune/operator, any tag or digest "
             "(repeatable); a pod with another image waits in ErrImagePull",
    )
    up.add_argument(
        "--with-prometheus", action="store_true",
        help="also run Prometheus (Kubernetes discovery; scrapes what ServiceMonitors and PodMonitors select, "
             "evaluates PrometheusRules); its URL is in the banner",
    )
    down = sub.add_parser("down", help="stop the cluster recorded in <dir>/cluster.json")
    down.add_argument("--dir", default=DEFAULT_DIR)
    status = sub.add_parser("status", help="say whether a local cluster runs and where")
    status.add_argument("--dir", default=DEFAULT_DIR)


def _image(value: str) -> str:
    # Imported here: the node agent's package loads aiohttp, which `down` and `status` do without.
    from kubetune.localcluster.kubelet.images import InvalidImageName, parse

    try:
        parse(value)
    except InvalidImageName as err:
        raise argparse.ArgumentTypeError(f"{value!r} is no image reference: {err}") from None
    return value


def _info_path(directory: Path) -> Path:
    return directory / "cluster.json"


def _read_info(directory: Path) -> dict | None:
    try:
        return json.loads(_info_path(directory).read_text())
    except (OSError, ValueError):
        return None


def _api_ready(url: str) -> bool:
    # /readyz needs no token; the probe sends none, so skipping certificate checks is harmless.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2, context=context) as r:
            return r.status == 200
    except OSError:
        return False


def _banner(info: dict) -> str:
    return (
        f"export KUBECONFIG={info['kubeconfig']}\n"
        f"# API server: {info['apiUrl']}  (Kubernetes {info.get('version', '?')}, pod network: {info['network']})\n"
        f"# S3 endpoint (host): {info['s3Endpoint']}\n"
        f"# S3 endpoint (pods): {info['s3ClusterEndpoint']}\n"
        + (f"# Prometheus: {info['prometheusUrl']}  (follows ServiceMonitors, PodMonitors, PrometheusRules)\n"
           if info.get("prometheusUrl") else "")
        + f"# control plane logs: {info.get('logs', '')}\n"
        f"# images the node runs (any tag): {', '.join(info.get('images', []))} (more: `up --image REPOSITORY`)\n"
        "# try: kubectl get nodes; kubectl api-resources; then `kubetune local down`\n"
    )


def _up_foreground(directory: Path, network: str, images: list[str], with_prometheus: bool = False) -> int:
    from kubetune.localcluster.cluster import LocalCluster
    from kubetune.localcluster.prometheus import LocalPrometheus

    info = _read_info(directory)
    if info and pid_alive(int(info["pid"])):
        print(f"a local cluster already runs (pid {info['pid']}); `kubetune local down` first", file=sys.stderr)
        return 1
    cluster = LocalCluster(state_dir=directory, network=network, images=images)
    prometheus: LocalPrometheus | None = None

    def ready(c: LocalCluster) -> None:
        nonlocal prometheus
        if with_prometheus:
            prometheus = LocalPrometheus(directory / "prometheus", str(c.kubeconfig),
                                         env={leftovers.MARKER_ENV: c.prefix}).start()
        info = {
            "pid": os.getpid(),
            "apiUrl": c.api_url,
            "kubeconfig": str(c.kubeconfig),
            "s3Endpoint": c.s3_endpoint,
            "s3ClusterEndpoint": c.s3_cluster_endpoint,
            "prefix": c.prefix,
            "network": c.network_mode,
            "version": c.version,
            "logs": str(directory / "logs"),
            "images": c.images.names(),
            **({"prometheusUrl": prometheus.url} if prometheus else {}),
        }
        path = _info_path(directory)
        path.write_text(json.dumps(info, indent=2) + "\n")
        print(_banner(info), end="", flush=True)

    try:
        cluster.run_forever(on_ready=ready)
    finally:
        if prometheus is not None:
            prometheus.stop()
        info = _read_info(directory)
        if info and info.get("pid") == os.getpid():
            _info_path(directory).unlink(missing_ok=True)
    return 0


def _up_detached(directory: Path, network: str, images: list[str], with_prometheus: bool = False) -> int:
    info = _read_info(directory)
    if info and pid_alive(int(info["pid"])):
        print(_banner(info), end="")
        return 0
    _info_path(directory).unlink(missing_ok=True)
    log_path = directory / "cluster.log"
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "kubetune.localcluster", "up", "--dir", str(directory), "--network", network,
             *(arg for image in images for arg in ("--image", image)),
             *(["--with-prometheus"] if with_prometheus else [])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"the local cluster exited with {child.returncode}; see {log_path}", file=sys.stderr)
            return 1
        info = _read_info(directory)
        if info and info.get("pid") == child.pid and _api_ready(info["apiUrl"]):
            print(_banner(info), end="")
            return 0
        time.sleep(0.2)
    child.kill()
    print(f"the local cluster did not become ready in 240s; see {log_path}", file=sys.stderr)
    return 1


def _down(directory: Path) -> int:
    info = _read_info(directory)
    if not info:
        print("no local cluster running")
        return 0
    pid, prefix = int(info["pid"]), info["prefix"]
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            print(f"cluster pid {pid} ignored SIGTERM for {STOP_TIMEOUT_SECONDS:.0f}s; killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.1)
    else:
        print(f"cluster pid {pid} was not running; cleaning its leftovers")
    left = leftovers.leftovers(prefix)
    if any(left.values()):
        leftovers.remove(prefix)
        left = leftovers.leftovers(prefix)
    shutil.rmtree(directory / "etcd", ignore_errors=True)
    leftovers.unregister(prefix)
    if any(left.values()):
        print(f"could not remove: {json.dumps(left)}", file=sys.stderr)
        return 1
    _info_path(directory).unlink(missing_ok=True)
    print("local cluster stopped; its processes, network namespaces and etcd data are gone")
    return 0


def _status(directory: Path) -> int:
    info = _read_info(directory)
    if not info or not pid_alive(int(info["pid"])):
        print("no local cluster running")
        return 1
    state = "ready" if _api_ready(info["apiUrl"]) else "not answering"
    print(f"local cluster pid {info['pid']}: {state}")
    print(_banner(info), end="")
    return 0 if state == "ready" else 1


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = Path(args.dir).resolve()
    if args.local_command == "up":
        directory.mkdir(parents=True, exist_ok=True)
        if args.detach:
            return _up_detached(directory, args.network, args.image, args.with_prometheus)
        return _up_foreground(directory, args.network, args.image, args.with_prometheus)
    if args.local_command == "down":
        return _down(directory)
    return _status(directory)

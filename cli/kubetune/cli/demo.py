"""`kubetune demo`: the quickstart on a fresh local cluster, start to finish.

1. start the local cluster (`kubetune local up --detach`),
2. build the tiny demo model and datasets and upload them to the cluster's S3,
3. create the S3 credentials Secret and install the FineTuneJob CRD with kubectl,
4. start the operator, pointed at the cluster (its default S3 endpoint is the local cluster's),
5. `kubectl apply -f examples/quickstart.yaml` and follow the job to Succeeded,
6. print the adapter URI, then stop the operator and the cluster.

Every step uses the same commands a user types; the pieces are reused by the end-to-end tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEMO_ACCESS_KEY = "kubetune-demo"
# The local S3 accepts any key; a real cluster would take these from a Secret you create.
DEMO_SECRET_KEY = "kubetune-demo-secret"
CREDENTIALS_SECRET = "s3-credentials"
CRD_NAME = "finetunejobs.kubetune.dev"


def _bin(name: str) -> str:
    """A tool installed beside this Python (the venv's pinned kubectl, kubetune), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"kubetune demo: `{name}` not found; run `make install` first")
    return found


def find_repo_root(start: Path | None = None) -> Path:
    for folder in [start or Path.cwd(), *(start or Path.cwd()).parents]:
        if (folder / "crds" / "finetunejob.yaml").is_file() and (folder / "examples").is_dir():
            return folder
    raise SystemExit("kubetune demo: run it from the kubetune repository (crds/ and examples/ not found)")


@dataclass(frozen=True)
class Kubectl:
    """Real kubectl against one kubeconfig."""

    kubeconfig: str

    def command(self, *args: str) -> list[str]:
        """The kubectl command line for ``args`` against this cluster."""
        return [_bin("kubectl"), "--kubeconfig", self.kubeconfig, *args]

    def run(self, *args: str, input: str | None = None, check: bool = True,
            capture: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.command(*args),
            input=input, text=True, capture_output=capture, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "-o", "json").stdout)


@dataclass(frozen=True)
class ClusterInfo:
    state_dir: Path
    kubeconfig: str
    api_url: str
    s3_endpoint: str  # reachable from this machine
    s3_cluster_endpoint: str  # reachable from pods
    network: str


@contextlib.contextmanager
def local_cluster(state_dir: Path) -> Iterator[ClusterInfo]:
    """`kubetune local up --detach`, and `kubetune local down` on the way out, whatever happens."""
    state_dir.mkdir(parents=True, exist_ok=True)
    up = subprocess.run([_bin("kubetune"), "local", "up", "--detach", "--dir", str(state_dir)],
                        text=True, capture_output=True)
    try:
        if up.returncode != 0:
            raise RuntimeError(f"kubetune local up failed: {up.stderr.strip()}")
        info = json.loads((state_dir / "cluster.json").read_text())
        yield ClusterInfo(
            state_dir=state_dir, kubeconfig=info["kubeconfig"], api_url=info["apiUrl"],
            s3_endpoint=info["s3Endpoint"], s3_cluster_endpoint=info["s3ClusterEndpoint"],
            network=info["network"],
        )
    finally:
        subprocess.run([_bin("kubetune"), "local", "down", "--dir", str(state_dir)],
                       text=True, capture_output=True)


def install_crd(kubectl: Kubectl, repo: Path, timeout: float = 60) -> None:
    kubectl.run("apply", "-f", str(repo / "crds" / "finetunejob.yaml"))
    # Polled, not `kubectl wait --for=condition=Established`: that (like a jsonpath filter) errors
    # out when it looks before the API server has written the CRD's first conditions.
    deadline = time.monotonic() + timeout
    established = '{.status.conditions[?(@.type=="Established")].status}'
    while kubectl.run("get", f"crd/{CRD_NAME}", "-o", f"jsonpath={established}", check=False).stdout.strip() != "True":
        if time.monotonic() > deadline:
            raise RuntimeError(f"crd/{CRD_NAME} was not Established within {timeout:.0f}s")
        time.sleep(0.2)


def create_credentials_secret(kubectl: Kubectl, namespace: str = "default") -> None:
    # Rendered client-side and applied, so running the demo twice is harmless.
    manifest = kubectl.run(
        "create", "secret", "generic", CREDENTIALS_SECRET, "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={DEMO_ACCESS_KEY}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={DEMO_SECRET_KEY}",
        "--dry-run=client", "-o", "yaml",
    ).stdout
    kubectl.run("apply", "-f", "-", input=manifest)


def upload_demo_data(s3_endpoint: str) -> dict[str, str]:
    from kubetune.trainer.tiny import upload_demo_assets  # torch-heavy: import only when used

    return upload_demo_assets(s3_endpoint, access_key=DEMO_ACCESS_KEY, secret_key=DEMO_SECRET_KEY)


@dataclass(frozen=True)
class OperatorProcess:
    process: subprocess.Popen
    metrics_url: str  # the operator's own Prometheus endpoint


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_operator(cluster: ClusterInfo, log_path: Path) -> Iterator[OperatorProcess]:
    """The operator as its own process, as it runs in a cluster; stopped on the way out.

    Its metrics go to a free port rather than the default 8080, so demos and test runs side by
    side (or anything else on 8080) do not collide."""
    metrics_port = _free_port()
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig, "KUBETUNE_S3_ENDPOINT": cluster.s3_cluster_endpoint,
           "KUBETUNE_METRICS_PORT": str(metrics_port)}
    with open(log_path, "ab") as log:
        operator = subprocess.Popen([_bin("kubetune"), "operator"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        yield OperatorProcess(operator, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()


def follow_job(kubectl: Kubectl, name: str, namespace: str = "default", timeout: float = 1200,
               echo: bool = True) -> dict:
    """Poll the job until it ends (Succeeded or Failed) and return its final object.

    Prints a `kubectl get ftj` row whenever the phase or the progress changes (the header once),
    as a user watching `kubectl get ftj -w` would see it.
    """
    deadline = time.monotonic() + timeout
    last_seen = None
    header_shown = False
    while time.monotonic() < deadline:
        job = kubectl.json("get", "ftj", name, "-n", namespace)
        status = job.get("status", {})
        phase = status.get("phase")
        seen = (phase, (status.get("progress") or {}).get("display"), (status.get("progress") or {}).get("loss"))
        if seen != last_seen and echo:
            header, row = aligned_rows(kubectl.run("get", "ftj", name, "-n", namespace).stdout)
            print("\n".join(([header] if not header_shown else []) + [row]), flush=True)
            header_shown, last_seen = True, seen
        if phase in ("Succeeded", "Failed"):
            return job
        time.sleep(1)
    raise TimeoutError(f"FineTuneJob {namespace}/{name} did not finish in {timeout:.0f}s")


def aligned_rows(table: str, width: int = 11) -> tuple[str, str]:
    """Header and first row of a `kubectl get` table with fixed column widths, so rows printed
    one at a time line up (kubectl sizes each table's columns to that table's cells)."""
    header, row = (table.rstrip("\n").splitlines() + ["", ""])[:2]
    starts = [i for i, char in enumerate(header) if char != " " and (i == 0 or header[i - 1] == " ")]
    bounds = list(zip(starts, starts[1:] + [None]))
    cells = [[line[start:end].strip() for start, end in bounds] for line in (header, row)]
    widths = [max(width, len(cells[1][0]) + 2)] + [width] * (len(bounds) - 1)
    return tuple("".join((cell + " ").ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".kubetune/demo", help="state folder of the demo cluster")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the job")


def main(args: argparse.Namespace) -> int:
    repo = find_repo_root()
    state_dir = Path(args.dir).resolve()
    print("==> starting the local cluster (Kubernetes control plane, local node, S3)", flush=True)
    with local_cluster(state_dir) as cluster:
        kubectl = Kubectl(cluster.kubeconfig)
        print(f"    export KUBECONFIG={cluster.kubeconfig}   (pod network: {cluster.network})", flush=True)
        print("==> uploading the tiny demo model and dataset to S3", flush=True)
        for uri in upload_demo_data(cluster.s3_endpoint).values():
            print(f"    {uri}")
        print("==> installing the FineTuneJob CRD and the S3 credentials Secret", flush=True)
        install_crd(kubectl, repo)
        create_credentials_secret(kubectl)
        print(f"==> starting the operator (log: {state_dir / 'operator.log'})", flush=True)
        with running_operator(cluster, state_dir / "operator.log"):
            print("==> kubectl apply -f examples/quickstart.yaml", flush=True)
            print(kubectl.run("apply", "-f", str(repo / "examples" / "quickstart.yaml")).stdout.rstrip())
            started = time.monotonic()
            job = follow_job(kubectl, "quickstart", timeout=args.timeout)
            elapsed = time.monotonic() - started
            print(kubectl.run("get", "pods", "-l", "kubetune.dev/job-name=quickstart").stdout.rstrip())
            status = job.get("status", {})
            if status.get("phase") != "Succeeded":
                print(f"==> the job failed: {status.get('message', '')}", file=sys.stderr)
                logs = kubectl.run("logs", "quickstart-worker-0", "--tail=30", check=False)
                print(logs.stdout + logs.stderr, file=sys.stderr)
                return 1
            print(f"==> Succeeded in {elapsed:.0f}s from kubectl apply")
            results = status.get("results") or {}
            if results.get("finalLoss") is not None:
                evaluated = f", eval loss {results['evalLoss']:.4f}" if results.get("evalLoss") is not None else ""
                print(f"==> final loss {results['finalLoss']:.4f} after {results.get('steps')} steps{evaluated}")
            print(f"==> adapter: {status.get('adapter', {}).get('uri', job['spec']['output']['adapterUri'])}")
    print("==> local cluster stopped; nothing left running")
    return 0

"""Local cluster benchmark: how long `kubetune local up` takes to a node a pod can be scheduled
on, and how much memory the whole cluster holds at idle, against envtest's shape (etcd and
kube-apiserver alone, no controllers, no node) measured in the same run.

    make bench-local                                   # 5 interleaved rounds, about 3 minutes
    python benchmarks/localcluster_bench.py --rounds 1 # checks the harness

Every round starts the baseline (etcd + kube-apiserver to /readyz), then `kubetune local up
--detach` exactly as a user types it (returns once the node is Ready and schedulable and the
default ServiceAccount exists), lets each settle for ``--settle`` seconds and reads every
process's resident memory (VmRSS), then stops it (`kubetune local down`). Binaries and Go's
caches are warm: the first build of the control plane is reported in the README, not here.

Writes benchmarks/results/localcluster.json and its table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
TABLE_BEGIN, TABLE_END = "<!-- localcluster-bench:begin -->", "<!-- localcluster-bench:end -->"
GOALS = {"upSeconds": 20.0, "idleRssMiB": 1536.0}
NODE_PARTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node agent")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_name(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    name = Path(argv[0].decode()).name
    if name.startswith("python"):
        return "s3 (moto)" if b"kubetune.localcluster.s3server" in argv else "node agent"
    return name


def baseline_round(settle: float) -> dict:
    """etcd + kube-apiserver, started and configured as the local cluster starts them."""
    from kubetune.localcluster import pki
    from kubetune.localcluster.binaries import find
    from kubetune.localcluster.controlplane import ControlPlane

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as state:
        started = time.monotonic()
        credentials = pki.create(Path(state) / "pki", api_addresses=["127.0.0.1"], service_ip="10.96.0.1",
                                 node_name="bench", node_address="127.0.0.1")
        plane = ControlPlane(Path(state), address="127.0.0.1", service_cidr="10.96.0.0/16", pki=credentials,
                             binaries=find())
        try:
            plane.start(controllers=False)
            up = time.monotonic() - started
            time.sleep(settle)
            rss = {name: rss_mib(pid) for name, pid in plane.pids().items()}
        finally:
            plane.stop()
    return {"upSeconds": up, "rssMiB": rss}


def kubetune_round(settle: float) -> dict:
    """`kubetune local up --detach` and `down`, as a user runs them."""
    from kubetune.localcluster import leftovers

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as state:
        started = time.monotonic()
        subprocess.run([KUBETUNE, "local", "up", "--detach", "--dir", state], check=True, capture_output=True)
        up = time.monotonic() - started
        info = json.loads((Path(state) / "cluster.json").read_text())
        try:
            time.sleep(settle)
            pids = {info["pid"], *leftovers.cluster_processes(info["prefix"])}
            rss: dict[str, float] = {}
            for pid in pids:
                try:
                    name = process_name(pid)
                    if name in NODE_PARTS or name == "s3 (moto)":
                        rss[name] = rss.get(name, 0.0) + rss_mib(pid)
                except OSError:
                    continue  # a pod's process that ended meanwhile
        finally:
            stopping = time.monotonic()
            subprocess.run([KUBETUNE, "local", "down", "--dir", state], check=True, capture_output=True)
            down = time.monotonic() - stopping
    return {"upSeconds": up, "downSeconds": down, "rssMiB": rss}


def summarise(baseline: list[dict], ours: list[dict]) -> dict:
    def median_rss(runs: list[dict]) -> dict[str, float]:
        names = sorted({name for run in runs for name in run["rssMiB"]})
        return {name: statistics.median(run["rssMiB"].get(name, 0.0) for run in runs) for name in names}

    base_up = statistics.median(r["upSeconds"] for r in baseline)
    up = statistics.median(r["upSeconds"] for r in ours)
    rss = median_rss(ours)
    base_rss = median_rss(baseline)
    cluster_rss = sum(rss.get(name, 0.0) for name in NODE_PARTS)
    return {
        "measuredAt": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "rounds": len(ours),
        "goals": GOALS,
        "baseline": {"name": "etcd + kube-apiserver alone (envtest's shape)", "upSeconds": base_up,
                     "rssMiB": base_rss, "allUpSeconds": [r["upSeconds"] for r in baseline]},
        "kubetune": {"upSeconds": up, "downSeconds": statistics.median(r["downSeconds"] for r in ours),
                     "rssMiB": rss, "clusterRssMiB": cluster_rss, "allUpSeconds": [r["upSeconds"] for r in ours]},
        "upRatioVsBaseline": up / base_up,
        "rssRatioVsBaseline": cluster_rss / sum(base_rss.values()),
    }


def write_table(markdown: Path, report: dict) -> None:
    ours, base = report["kubetune"], report["baseline"]
    parts = ", ".join(f"{name} {ours['rssMiB'].get(name, 0):.0f}" for name in NODE_PARTS)
    lines = [
        TABLE_BEGIN, "",
        f"Measured {report['measuredAt']} on {report['cores']} cores, median of {report['rounds']} rounds.", "",
        "| | `kubetune local up` | baseline: etcd + kube-apiserver | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        f"| up, to a schedulable node (s) | {ours['upSeconds']:.1f} | {base['upSeconds']:.1f} | "
        f"{report['upRatioVsBaseline']:.2f}x | <= {GOALS['upSeconds']:.0f} |",
        f"| idle memory, control plane + node agent (MiB) | {ours['clusterRssMiB']:.0f} | "
        f"{sum(base['rssMiB'].values()):.0f} | {report['rssRatioVsBaseline']:.2f}x | <= {GOALS['idleRssMiB']:.0f} |",
        "", f"Idle memory by part (MiB): {parts}; S3 (moto, not counted above) "
        f"{ours['rssMiB'].get('s3 (moto)', 0):.0f}. `kubetune local down` takes {ours['downSeconds']:.1f} s.",
        "", TABLE_END,
    ]
    text = markdown.read_text() if markdown.is_file() else ""
    if TABLE_BEGIN not in text:
        text += f"\n{TABLE_BEGIN}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_BEGIN, 1)
    markdown.write_text(head + "\n".join(lines) + rest.split(TABLE_END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds idle before reading memory")
    args = parser.parse_args(argv)
    baseline, ours = [], []
    for round_number in range(1, args.rounds + 1):
        baseline.append(baseline_round(args.settle))
        ours.append(kubetune_round(args.settle))
        print(f"round {round_number}: baseline up {baseline[-1]['upSeconds']:.1f}s, "
              f"kubetune up {ours[-1]['upSeconds']:.1f}s", flush=True)
    report = summarise(baseline, ours)
    if args.rounds > 1:  # one round only checks the harness: no figures from it
        (ROOT / "benchmarks" / "results" / "localcluster.json").write_text(json.dumps(report, indent=2) + "\n")
        write_table(ROOT / "BENCHMARKS.md", report)
    print(json.dumps({k: report[k] for k in ("upRatioVsBaseline", "rssRatioVsBaseline")}, indent=2))
    print(f"kubetune local up {report['kubetune']['upSeconds']:.1f}s, idle "
          f"{report['kubetune']['clusterRssMiB']:.0f} MiB (control plane + node agent)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

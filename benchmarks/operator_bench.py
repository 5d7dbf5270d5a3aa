"""Operator scale benchmark: N FineTuneJobs of 2-8 workers applied at once to the local control
plane with simulated nodes (kwok), against the Kubernetes Job controller given the same gangs
as Indexed Jobs on the same nodes in the same run.

    make bench-operator                                     # 100, 300 and 1000 jobs
    python benchmarks/operator_bench.py --jobs 20 --no-write  # checks the harness

For each job count, a fresh cluster (etcd, kube-apiserver with an audit log, controller-manager,
scheduler) and ``--nodes`` kwok nodes; every pod runs ``--run-seconds`` (plus jitter) and
succeeds. Then:

1. **kubetune**: the operator as its own process (``kubetune operator``, as in a pod), and N
   FineTuneJobs (seeded: 2-8 workers, preflight skipped: nothing can be validated on fake
   nodes) created from 16 threads as fast as the API takes them.
2. **baseline**: the same N gangs as batch/v1 Indexed Jobs (completions = parallelism =
   workers), handled by kube-controller-manager's Job controller.

Measured, per job, from the moment its create returned: until the bench's own watch has seen
all its pods (apply -> pods) and its end (Succeeded, or the Job's Complete condition). For the
operator: peak RSS (VmHWM) and CPU seconds of its process, and its API requests by verb and
its writes, counted in the API server's audit log by user agent (kopf's and the operator's
client's).

Writes benchmarks/results/operator.json (keyed by job count) and its table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

ROOT = Path(__file__).resolve().parent.parent
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
TABLE_BEGIN, TABLE_END = "<!-- operator-bench:begin -->", "<!-- operator-bench:end -->"
GOALS = {"p99_apply_to_pods_s": 2.0, "operator_rss_mb": 200.0, "writes_per_job_over_pods": 4.0}
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
OPERATOR_AGENTS = ("kopf/", "kubetune-operator/")
BENCH_AGENT = "kubetune-bench"
NAMESPACE = "default"
CREATE_THREADS = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def gang_sizes(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(2, 8) for _ in range(count)]


def indexed_job(name: str, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "completionMode": "Indexed", "completions": workers, "parallelism": workers, "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "trainer", "image": "kubetune/trainer:bench", "resources": {"requests": {"cpu": "1"}}}]}},
        },
    }


class Watcher:
    """The bench's own watches: when each job's pods were first seen and when it ended."""

    def __init__(self, api_client: client.ApiClient, kind: str) -> None:
        self.core, self.batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.kind = kind
        self.pods: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.ended: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target,), daemon=True)
                         for target in (self._watch_pods, self._watch_jobs)]

    def start(self) -> Watcher:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, target: Any) -> None:
        while not self._stop.is_set():
            try:
                target()
            except Exception as error:  # noqa: BLE001 - a watch that broke is restarted
                print(f"  watch restarted: {error}", file=sys.stderr)
                time.sleep(0.5)

    def _events(self, list_call: Any, *args: Any, **kwargs: Any) -> Any:
        """A watch's events as plain dicts: the client's models cost a millisecond or more per
        event, and at 5000 pods the bench's own watch would fall behind what it measures."""
        response = list_call(*args, watch=True, _preload_content=False, timeout_seconds=30, **kwargs)
        try:
            for line in iter_resp_lines(response):
                event = json.loads(line)
                if event.get("type") == "ERROR":  # the watch expired (410 Gone): it starts again
                    return
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    yield event
                if self._stop.is_set():
                    return
        finally:
            response.release_conn()

    def _watch_pods(self) -> None:
        job_label = "kubetune.dev/job-name" if self.kind == "kubetune" else "batch.kubernetes.io/job-name"
        for event in self._events(self.core.list_namespaced_pod, NAMESPACE, label_selector=job_label):
            meta = event["object"]["metadata"]
            if event["type"] in ("ADDED", "MODIFIED"):
                self.pods[meta["labels"][job_label]].setdefault(meta["name"], time.monotonic())

    def _watch_jobs(self) -> None:
        if self.kind == "kubetune":
            events = self._events(self.custom.list_namespaced_custom_object, "kubetune.dev", "v1alpha1", NAMESPACE,
                                  "finetunejobs")
        else:
            events = self._events(self.batch.list_namespaced_job, NAMESPACE)
        for event in events:
            job = event["object"]
            status = job.get("status") or {}
            if self.kind == "kubetune":
                phase = status.get("phase")
            else:
                ended = [c["type"] for c in status.get("conditions") or ()
                         if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
                phase = {"Complete": "Succeeded", "Failed": "Failed"}.get(ended[0]) if ended else None
            if phase in ("Succeeded", "Failed"):
                self.ended.setdefault(job["metadata"]["name"], (time.monotonic(), phase))


def create_all(api_client: client.ApiClient, objects: list[dict[str, Any]]) -> dict[str, float]:
    """Create every object from CREATE_THREADS threads; the time each create returned."""
    custom, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)

    def create(obj: dict[str, Any]) -> tuple[str, float]:
        if obj["kind"] == "FineTuneJob":
            custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", obj)
        else:
            batch.create_namespaced_job(NAMESPACE, obj)
        return obj["metadata"]["name"], time.monotonic()

    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        return dict(pool.map(create, objects))


def wait_until(done: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.5)


def latencies(applied: dict[str, float], sizes: dict[str, int], watcher: Watcher) -> dict[str, Any]:
    to_pods = [max(0.0, sorted(watcher.pods[name].values())[sizes[name] - 1] - applied[name]) for name in applied]
    to_end = [watcher.ended[name][0] - applied[name] for name in applied]
    return {
        "p50_apply_to_pods_s": statistics.median(to_pods),
        "p99_apply_to_pods_s": percentile(to_pods, 0.99),
        "p50_apply_to_succeeded_s": statistics.median(to_end),
        "p99_apply_to_succeeded_s": percentile(to_end, 0.99),
        "failed": sum(phase != "Succeeded" for _, phase in watcher.ended.values()),
    }


def process_figures(pid: int) -> tuple[float, float]:
    """Peak resident memory (MB) and CPU seconds of a live process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    peak_mb = int(status["VmHWM"].split()[0]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return peak_mb, cpu_s


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each process has used so far (those that are gone count 0)."""
    seconds = {}
    for name, pid in pids.items():
        try:
            seconds[name] = process_figures(pid)[1]
        except OSError:
            seconds[name] = 0.0
    return seconds


def operator_requests(audit_log: Path) -> collections.Counter[tuple[str, str]]:
    """(verb, resource[/subresource]) of every request the operator made, from the audit log:
    those the API server refused (429 when it is saturated, 409, 5xx) included, since they cost
    it too; ``refused`` counts them alone, under the verb "refused"."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        if not event.get("userAgent", "").startswith(OPERATOR_AGENTS):
            continue
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", event.get("requestURI", "?").split("?")[0])
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        counts[(event["verb"], resource)] += 1
        if event.get("responseStatus", {}).get("code", 200) >= 300 and event["verb"] in WRITE_VERBS:
            counts[("refused", resource)] += 1
    return counts


def start_operator(kubeconfig: Path, log_path: Path, cluster_prefix: str) -> subprocess.Popen[bytes]:
    from kubetune.localcluster.leftovers import MARKER_ENV
    from kubetune.localcluster.processes import free_port

    port = free_port()
    # The cluster's marker: a crashed run's operator goes with the cluster's leftovers.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_METRICS_PORT": str(port), MARKER_ENV: cluster_prefix}
    with open(log_path, "ab") as log:
        operator = subprocess.Popen([KUBETUNE, "operator"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def serving() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                return True
        except OSError:
            if operator.poll() is not None:
                raise RuntimeError(f"the operator exited with {operator.returncode}: see {log_path}") from None
            return False

    wait_until(serving, 60, "the operator serving its metrics")
    time.sleep(2)  # kopf's watches start after its startup handlers
    return operator


def run_count(count: int, args: argparse.Namespace) -> dict[str, Any]:
    from kubetune.cli.demo import Kubectl, install_crd
    from kubetune.localcluster.cluster import LocalCluster
    from kubetune.localcluster.simulated import SimulatedNodes, simulated_job

    sizes = gang_sizes(count, seed=count)
    result: dict[str, Any] = {"jobs": count, "pods": sum(sizes)}
    with tempfile.TemporaryDirectory(prefix="kubetune-opbench-") as state, \
            LocalCluster(state_dir=state, node=False, audit=True) as cluster:
        install_crd(Kubectl(str(cluster.kubeconfig)), ROOT)
        api_client = config.new_client_from_config(str(cluster.kubeconfig))
        api_client.user_agent = BENCH_AGENT
        nodes = SimulatedNodes(cluster.kubeconfig, Path(state) / "kwok", count=args.nodes,
                               run_seconds=args.run_seconds, jitter_seconds=args.jitter_seconds,
                               pods=max(110, 2 * sum(sizes) // args.nodes), cluster_prefix=cluster.prefix)
        with nodes:
            for kind in ("baseline", "kubetune"):
                names = [f"{'ftj' if kind == 'kubetune' else 'job'}-{index:04d}" for index in range(count)]
                by_name = dict(zip(names, sizes))
                maker = simulated_job if kind == "kubetune" else indexed_job
                objects = [maker(name, size) for name, size in by_name.items()]
                operator = start_operator(cluster.kubeconfig, Path(state) / "operator.log", cluster.prefix) \
                    if kind == "kubetune" else None
                watcher = Watcher(api_client, kind).start()
                time.sleep(1)
                print(f"  {count} {kind} jobs ({sum(sizes)} pods) ...", flush=True)
                parts = {**cluster.control_plane.pids(), "kwok": nodes.process.pid, "bench": os.getpid(),
                         **({"operator": operator.pid} if operator else {})}
                cpu_before = cpu_seconds(parts)
                started = time.monotonic()
                applied = create_all(api_client, objects)
                created_s = time.monotonic() - started
                wait_until(lambda: len(watcher.ended) == count, args.timeout, f"the end of {count} {kind} jobs")
                figures = {"create_all_s": created_s, **latencies(applied, by_name, watcher)}
                watcher.stop()
                cpu_after = cpu_seconds(parts)
                figures["cpu_s_by_process"] = {name: cpu_after[name] - cpu_before[name] for name in parts}
                figures["wall_s"] = time.monotonic() - started
                if operator is not None:
                    figures["operator_rss_mb"], figures["operator_cpu_s"] = process_figures(operator.pid)
                    operator.terminate()
                    operator.wait(timeout=30)
                result[kind] = figures
                print(f"    {json.dumps(figures, default=lambda v: round(v, 2))}", flush=True)
        time.sleep(2)  # the audit log is written in batches
        requests = operator_requests(cluster.control_plane.audit_log_path)
    by_verb: collections.Counter[str] = collections.Counter()
    for (verb, _), number in requests.items():
        if verb != "refused":
            by_verb[verb] += number
    writes = sum(number for (verb, _), number in requests.items() if verb in WRITE_VERBS)
    refused = sum(number for (verb, _), number in requests.items() if verb == "refused")
    status_writes = sum(number for (verb, resource), number in requests.items()
                        if verb in WRITE_VERBS and resource == "finetunejobs/status")
    ours = result["kubetune"]
    ours["requests_per_job"] = {verb: number / count for verb, number in sorted(by_verb.items())}
    ours["writes_per_job"] = writes / count
    ours["refused_writes_per_job"] = refused / count
    ours["status_writes_per_job"] = status_writes / count
    ours["pods_per_job"] = sum(sizes) / count
    ours["writes_by_resource"] = {f"{verb} {resource}": number / count for (verb, resource), number
                                  in sorted(requests.items()) if verb in WRITE_VERBS}
    return result


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one count in the shape BENCHMARKS.md and the issue name them."""
    ours, base = result["kubetune"], result["baseline"]
    return {
        **{key: ours[key] for key in ("p50_apply_to_pods_s", "p99_apply_to_pods_s", "p99_apply_to_succeeded_s",
                                      "operator_rss_mb", "operator_cpu_s", "requests_per_job", "writes_per_job",
                                      "refused_writes_per_job", "status_writes_per_job", "pods_per_job", "writes_by_resource",
                                      "create_all_s", "failed", "cpu_s_by_process", "wall_s")},
        "baseline_job_controller": {key: base[key] for key in ("p50_apply_to_pods_s", "p99_apply_to_pods_s",
                                                               "p99_apply_to_succeeded_s", "create_all_s",
                                                               "cpu_s_by_process", "wall_s")},
        "p99_apply_to_pods_ratio_vs_baseline": ours["p99_apply_to_pods_s"] / base["p99_apply_to_pods_s"],
    }


def write_table(markdown: Path, report: dict[str, Any]) -> None:
    counts = [key for key in report if key.isdigit()]
    lines = [TABLE_BEGIN, "", f"Measured {report['measuredAt']} on {report['cores']} cores; {report['nodes']} kwok "
             f"nodes, every pod runs {report['runSeconds']:g} s (+ up to {report['jitterSeconds']:g} s).", "",
             "| jobs (pods) | apply -> pods p50 / p99 (s) | Job controller p99 (s) | ratio | apply -> Succeeded "
             "p99 (s) | operator RSS (MB) | operator CPU (s) | writes per job (pods + n) | status writes per job |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for count in counts:
        row = report[count]
        base = row["baseline_job_controller"]
        lines.append(
            f"| {count} ({row['pods_per_job'] * int(count):.0f}) | {row['p50_apply_to_pods_s']:.2f} / "
            f"{row['p99_apply_to_pods_s']:.2f} | {base['p99_apply_to_pods_s']:.2f} | "
            f"{row['p99_apply_to_pods_ratio_vs_baseline']:.2f}x | {row['p99_apply_to_succeeded_s']:.1f} | "
            f"{row['operator_rss_mb']:.0f} | {row['operator_cpu_s']:.0f} | {row['writes_per_job']:.1f} "
            f"(+{row['writes_per_job'] - row['pods_per_job']:.1f}) | {row['status_writes_per_job']:.1f} |")
    last = report[counts[-1]]
    verbs = ", ".join(f"{verb} {number:.1f}" for verb, number in last["requests_per_job"].items())
    lines += ["", f"Requests per job at {counts[-1]} jobs, by verb: {verbs}.",
              f"Goals: p99 apply -> pods <= {GOALS['p99_apply_to_pods_s']:g} s at 1000 jobs, operator RSS <= "
              f"{GOALS['operator_rss_mb']:g} MB, writes per job <= pods + {GOALS['writes_per_job_over_pods']:g}.",
              "", TABLE_END]
    text = markdown.read_text()
    if TABLE_BEGIN in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    markdown.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="100,300,1000", help="comma-separated job counts")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--run-seconds", type=float, default=10.0)
    parser.add_argument("--jitter-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one count's jobs to end")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"measuredAt": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "cores": os.cpu_count(), "nodes": args.nodes, "runSeconds": args.run_seconds,
                              "jitterSeconds": args.jitter_seconds, "goals": GOALS}
    for count in (int(text) for text in args.jobs.split(",")):
        report[str(count)] = flatten(run_count(count, args))
    print(json.dumps(report, indent=2))
    if not args.no_write:
        (ROOT / "benchmarks" / "results" / "operator.json").write_text(json.dumps(report, indent=2) + "\n")
        write_table(ROOT / "BENCHMARKS.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

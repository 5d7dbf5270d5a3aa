"""The operator benchmark's own parts (it runs in ``make bench-operator``, not here): requests
counted from an audit log by the operator's user agents only, per-job latencies from the
bench's watch, and the table written between its markers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import operator_bench  # noqa: E402


def _event(agent: str, verb: str, resource: str, code: int = 201, subresource: str | None = None) -> str:
    ref = {"resource": resource, **({"subresource": subresource} if subresource else {})}
    return json.dumps({"userAgent": agent, "verb": verb, "objectRef": ref, "requestURI": "/x",
                       "responseStatus": {"code": code}})


def test_requests_are_the_operators_by_verb_and_resource_refusals_counted_apart(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join([
        _event("kubetune-operator/0.1.0 (pod-a)", "create", "pods"),
        _event("kubetune-operator/0.1.0 (pod-a)", "create", "pods", code=429),
        _event("kopf/1.45.2", "watch", "pods", code=200),
        _event("kubetune-operator/0.1.0 (pod-a)", "patch", "finetunejobs", code=200, subresource="status"),
        _event("kwok/v0.8.0", "patch", "pods", code=200, subresource="status"),  # not the operator's
        _event("kubetune-bench", "create", "finetunejobs"),
    ]) + "\n")
    counts = operator_bench.operator_requests(log)
    assert counts == {("create", "pods"): 2, ("refused", "pods"): 1, ("watch", "pods"): 1,
                      ("patch", "finetunejobs/status"): 1}


def test_apply_to_pods_waits_for_every_pod_of_the_gang() -> None:
    watcher = SimpleNamespace(pods={"a": {"a-0": 10.5, "a-1": 12.0}, "b": {"b-0": 20.2, "b-1": 20.4, "b-2": 21.0}},
                              ended={"a": (30.0, "Succeeded"), "b": (40.0, "Failed")})
    figures = operator_bench.latencies({"a": 10.0, "b": 20.0}, {"a": 2, "b": 3}, watcher)
    assert figures["p50_apply_to_pods_s"] == 1.5 and figures["p99_apply_to_pods_s"] == 2.0
    assert figures["p99_apply_to_succeeded_s"] == 20.0 and figures["failed"] == 1


def test_the_table_replaces_only_what_is_between_its_markers(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\n{operator_bench.TABLE_BEGIN}\nold\n{operator_bench.TABLE_END}\n\nafter\n")
    row = {"p50_apply_to_pods_s": 1.0, "p99_apply_to_pods_s": 3.0, "p99_apply_to_succeeded_s": 20.0,
           "operator_rss_mb": 120.0, "operator_cpu_s": 10.0, "requests_per_job": {"create": 7.0, "patch": 3.0},
           "writes_per_job": 10.0, "status_writes_per_job": 3.0, "pods_per_job": 5.0,
           "baseline_job_controller": {"p99_apply_to_pods_s": 2.0}, "p99_apply_to_pods_ratio_vs_baseline": 1.5}
    operator_bench.write_table(markdown, {"measuredAt": "now", "cores": 2, "nodes": 50, "runSeconds": 10.0,
                                          "jitterSeconds": 5.0, "100": row})
    text = markdown.read_text()
    assert "old" not in text and text.endswith("\n\nafter\n") and text.startswith("# Benchmarks\n")
    assert "| 100 (500) | 1.00 / 3.00 | 2.00 | 1.50x | 20.0 | 120 | 10 | 10.0 (+5.0) | 3.0 |" in text

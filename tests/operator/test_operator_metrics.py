"""The operator's own metrics: what a Prometheus scrape of the operator shows."""

from __future__ import annotations

import re
import socket
import urllib.request

from prometheus_client import generate_latest

from kubetune.operator.metrics import OperatorMetrics


def _sample(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_jobs_by_phase_follow_each_job_until_it_is_gone() -> None:
    metrics = OperatorMetrics()
    assert _sample(metrics, "kubetune_operator_jobs", phase="Running") == 0  # every phase exported from the start
    metrics.job_seen("default", "a", {})
    metrics.job_seen("default", "b", {"phase": "Running"})
    metrics.job_seen("ml", "a", {"phase": "Running"})
    assert _sample(metrics, "kubetune_operator_jobs", phase="Pending") == 1
    assert _sample(metrics, "kubetune_operator_jobs", phase="Running") == 2

    metrics.job_seen("default", "b", {"phase": "Succeeded"})  # a job moves, it is not counted twice
    metrics.job_gone("ml", "a")
    metrics.job_gone("ml", "never-seen")
    assert [_sample(metrics, "kubetune_operator_jobs", phase=p) for p in ("Pending", "Running", "Succeeded")] == [
        1, 0, 1]


def test_each_job_has_its_phase_restarts_and_last_step_until_it_is_gone() -> None:
    metrics = OperatorMetrics()
    job = {"namespace": "ml", "finetunejob": "a"}
    metrics.job_seen("ml", "a", {"phase": "Running", "progress": {"step": 3, "stepTime": "2026-12-01T10:00:00.5Z"}})
    assert _sample(metrics, "kubetune_job_phase", **job, phase="Running") == 1
    assert _sample(metrics, "kubetune_job_restarts", **job) == 0
    assert _sample(metrics, "kubetune_job_last_step_timestamp_seconds", **job) == 1796119200.5

    metrics.job_seen("ml", "a", {"phase": "Restarting", "restarts": 1, "progress": {"step": 3}})
    assert _sample(metrics, "kubetune_job_phase", **job, phase="Running") is None  # one phase at a time
    assert _sample(metrics, "kubetune_job_phase", **job, phase="Restarting") == 1
    assert _sample(metrics, "kubetune_job_restarts", **job) == 1

    metrics.job_gone("ml", "a")
    text = generate_latest(metrics.registry).decode()
    assert 'finetunejob="a"' not in text


def test_handler_runs_are_timed_by_handler() -> None:
    metrics = OperatorMetrics()
    metrics.reconcile_seconds.labels(handler="tick").observe(0.03)
    assert _sample(metrics, "kubetune_operator_reconcile_duration_seconds_count", handler="tick") == 1
    assert _sample(metrics, "kubetune_operator_reconcile_duration_seconds_bucket", handler="tick", le="0.05") == 1
    assert _sample(metrics, "kubetune_operator_reconcile_duration_seconds_bucket", handler="tick", le="0.025") == 0


def test_counters_are_exported_with_their_totals() -> None:
    metrics = OperatorMetrics()
    metrics.reconciles.labels(handler="pod_event").inc()
    metrics.reconciles.labels(handler="pod_event").inc()
    metrics.reconcile_errors.labels(handler="create").inc()
    metrics.pods_created.inc(2)
    metrics.scrape_failures.inc()
    text = generate_latest(metrics.registry).decode()
    assert 'kubetune_operator_reconciles_total{handler="pod_event"} 2.0' in text
    assert 'kubetune_operator_reconcile_errors_total{handler="create"} 1.0' in text
    assert "kubetune_operator_pods_created_total 2.0" in text
    assert "kubetune_operator_progress_scrape_failures_total 1.0" in text


def test_serve_answers_a_scrape_and_port_0_serves_nothing() -> None:
    metrics = OperatorMetrics()
    metrics.serve(0)  # off: nothing to assert but that it does not raise or bind
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics.pods_created.inc()
    metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "kubetune_operator_pods_created_total 1.0" in body
    assert 'kubetune_operator_jobs{phase="Failed"} 0.0' in body


def test_every_handler_is_exported_at_zero_before_it_runs() -> None:
    """An operator without errors shows an error rate of 0, not no data; and the list is the
    handlers' own."""
    import inspect

    from kubetune.operator import handlers
    from kubetune.operator.metrics import HANDLERS

    metrics = OperatorMetrics()
    assert all(_sample(metrics, "kubetune_operator_reconcile_errors_total", handler=h) == 0 for h in HANDLERS)
    queueing = [line for line in inspect.getsource(handlers).splitlines() if "queue.add(" in line]
    assert set(HANDLERS) == {reason for line in queueing for reason in re.findall(r'"([a-z_]+)"', line)}


def test_the_wait_for_the_first_step_is_timed_for_jobs_seen_starting() -> None:
    metrics = OperatorMetrics()
    created = "2026-12-01T10:00:00Z"
    metrics.job_seen("ml", "new", {"phase": "Validating"}, created)
    metrics.job_seen("ml", "new", {"phase": "Running", "progress": {"stepTime": "2026-12-01T10:00:42.0Z"}}, created)
    metrics.job_seen("ml", "new", {"phase": "Running", "progress": {"stepTime": "2026-12-01T10:00:50.0Z"}}, created)
    # A job already stepping when the operator (re)started: its first step was not seen.
    metrics.job_seen("ml", "old", {"phase": "Running", "progress": {"stepTime": "2026-12-01T10:00:50.0Z"}}, created)
    assert _sample(metrics, "kubetune_operator_time_to_first_step_seconds_count") == 1
    assert _sample(metrics, "kubetune_operator_time_to_first_step_seconds_sum") == 42

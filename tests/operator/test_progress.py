"""Progress from rank 0's /metrics text: what `kubectl get ftj` shows in PROGRESS, LOSS and ETA."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubetune.operator.progress import (
    MetricsParseError,
    derive_progress,
    finished_progress,
    format_duration,
    metrics_url,
    parse_metrics,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def scrape(step: float, total: float = 30, loss: float = 1.23456, epoch: float = 0.4, tps: float = 812.34) -> str:
    """What prometheus_client renders for the trainer's gauges (names as in trainer/metrics.py)."""
    lines = []
    for name, value in [("kubetune_train_step", step), ("kubetune_train_total_steps", total),
                        ("kubetune_train_loss", loss), ("kubetune_train_tokens_per_second", tps),
                        ("kubetune_train_epoch", epoch)]:
        lines += [f"# HELP {name} x", f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def test_parse_reads_the_trainer_gauges_and_ignores_other_series() -> None:
    text = scrape(12) + "# TYPE python_gc_objects_collected counter\npython_gc_objects_collected_total 5.0\n"
    assert parse_metrics(text) == {
        "step": 12.0, "totalSteps": 30.0, "loss": 1.23456, "tokensPerSecond": 812.34, "epoch": 0.4}


def test_first_scrape_shows_step_of_total_without_an_eta() -> None:
    progress = derive_progress(scrape(12), None, T0)
    assert progress == {"step": 12, "totalSteps": 30, "display": "12/30", "epoch": 0.4, "loss": 1.2346,
                        "tokensPerSecond": 812.3, "stepTime": "2026-01-01T12:00:00.000000Z"}


def test_eta_comes_from_the_step_rate_between_step_changes() -> None:
    first = derive_progress(scrape(10), None, T0)
    same = derive_progress(scrape(10), first, T0 + timedelta(seconds=3))
    assert same == first  # nothing new: no patch needed
    later = derive_progress(scrape(15, loss=1.1), same, T0 + timedelta(seconds=10))  # 2 s a step
    assert (later["display"], later["etaSeconds"], later["eta"], later["loss"]) == ("15/30", 30, "30s", 1.1)
    held = derive_progress(scrape(15, loss=1.1), later, T0 + timedelta(seconds=14))
    assert held == later  # the ETA is kept until the next step change


@pytest.mark.parametrize("text", [scrape(0, total=0), "", "# nothing of ours\nother_metric 1\n"])
def test_nothing_to_show_before_the_trainer_plans_its_steps(text: str) -> None:
    assert derive_progress(text, None, T0) is None


def test_step_zero_shows_the_plan_with_no_loss_and_no_step_time_yet() -> None:
    # No stepTime: the stall clock starts at the first step, not while the model loads.
    planned = derive_progress(scrape(0, loss=0.0), None, T0)
    assert planned == {"step": 0, "totalSteps": 30, "display": "0/30"}
    first = derive_progress(scrape(1), planned, T0 + timedelta(seconds=20))
    assert first["stepTime"] == "2026-01-01T12:00:20.000000Z" and "eta" not in first  # 20 s of loading is no rate


def test_a_restarted_attempt_keeps_the_last_progress_until_it_moves() -> None:
    before = derive_progress(scrape(20), derive_progress(scrape(10), None, T0), T0 + timedelta(seconds=10))
    loading = derive_progress(scrape(0, loss=0.0), before, T0 + timedelta(seconds=60))
    assert loading == before
    resumed = derive_progress(scrape(20), loading, T0 + timedelta(seconds=70))  # the checkpoint's step
    assert resumed == before  # no new step: the old step time stays, older than the attempt


def test_a_restart_from_an_older_checkpoint_shows_its_step_without_a_step_time() -> None:
    before = derive_progress(scrape(25), None, T0)
    back = derive_progress(scrape(20), before, T0 + timedelta(seconds=60))
    assert back["display"] == "20/30" and "stepTime" not in back and "eta" not in back
    on = derive_progress(scrape(21), back, T0 + timedelta(seconds=65))
    assert on["stepTime"] == "2026-01-01T12:01:05.000000Z" and "eta" not in on


def test_text_that_is_not_prometheus_is_an_error() -> None:
    with pytest.raises(MetricsParseError, match="not Prometheus text"):
        derive_progress("kubetune_train_step {{garbage", None, T0)


def test_finished_progress_ends_at_the_last_step_with_the_final_loss() -> None:
    running = {"step": 25, "totalSteps": 30, "display": "25/30", "loss": 1.3, "eta": "10s", "etaSeconds": 10,
               "epoch": 0.8}
    assert finished_progress(running, 30, 1.05432) == {
        "step": 30, "totalSteps": 30, "display": "30/30", "loss": 1.0543, "eta": "0s", "etaSeconds": 0,
        "epoch": 0.8}
    assert finished_progress(None, 30, None)["display"] == "30/30"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (45, "45s"), (200, "3m20s"), (7500, "2h5m"), (97200, "1d3h")])
def test_durations_read_like_kubectl_ages(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


def test_metrics_url_is_the_pod_ip_and_its_metrics_port() -> None:
    pod = {"spec": {"containers": [{"ports": [{"name": "rdzv", "containerPort": 29500},
                                              {"name": "metrics", "containerPort": 9400}]}]},
           "status": {"podIP": "10.244.0.7"}}
    assert metrics_url(pod) == "http://10.244.0.7:9400/metrics"
    assert metrics_url({**pod, "status": {}}) is None  # not started yet
    assert metrics_url({"spec": {"containers": [{}]}, "status": {"podIP": "10.0.0.1"}}) is None


def test_a_gauge_not_measured_yet_is_left_out_not_nan() -> None:
    text = ("kubetune_train_step 3.0\nkubetune_train_total_steps 30.0\nkubetune_train_loss 2.5\n"
            "kubetune_train_tokens_per_second NaN\n")
    progress = derive_progress(text, None, datetime(2026, 1, 1, tzinfo=UTC))
    assert progress["loss"] == 2.5 and "tokensPerSecond" not in progress

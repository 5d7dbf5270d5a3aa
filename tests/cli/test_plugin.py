"""`kubectl kubetune` without a cluster: the manifest `submit` builds from flags and checks with
kubetune.api before sending, what `status` prints for real-looking statuses, the sparkline,
log interleaving, `wait`'s exit codes and the adapter's sha256 verification.

The statuses below have the shape the operator writes (each is checked against
kubetune.api.status.FineTuneJobStatus); the Running and Succeeded ones are copied from a run of
examples/quickstart.yaml on the local cluster. tests/e2e/test_kubectl_plugin.py runs the real thing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from kubetune import cli as kubetune_cli
from kubetune.api import FineTuneJobStatus, parse_spec
from kubetune.cli import jobs
from kubetune.cli.jobs import adapter, common, logs, plot, status, wait
from kubetune.cli.jobs.s3 import Store

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 1, 3, 40, 0, tzinfo=UTC)
FLAGS = ["submit", "support-bot", "--model", "s3://models/tiny-llama/", "--dataset", "s3://datasets/support/train.jsonl",
         "--format", "chat", "--workers", "2", "--output", "s3://adapters/support-bot/"]


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    """Nothing here may reach a cluster: a kubectl call fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test ran a process: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = jobs.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- submit ----------------------------------------------------------------------------------


def test_flags_build_a_minimal_fine_tune_job_that_kubetune_api_accepts(capsys) -> None:
    code, out, err = run([*FLAGS, "--epochs", "3", "--learning-rate", "2e-4", "--lora-r", "16", "--zero-stage", "3",
                          "--credentials-secret", "s3-creds", "--s3-endpoint", "https://minio.example:9000",
                          "--lora-target-modules", "q_proj,k_proj,v_proj", "--max-steps", "50",
                          "--set", "training.packing=true", "--set", "dataset.validationSplit=0.05",
                          "--dry-run", "-o", "yaml"], capsys)
    assert (code, err) == (0, "")
    job = yaml.safe_load(out)
    assert job == {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "support-bot"},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama/"},
            "dataset": {"uri": "s3://datasets/support/train.jsonl", "format": "chat", "validationSplit": 0.05},
            "workers": {"replicas": 2},
            "output": {"adapterUri": "s3://adapters/support-bot/"},
            "training": {"epochs": 3, "maxSteps": 50, "learningRate": 0.0002, "packing": True},
            "lora": {"r": 16, "targetModules": ["q_proj", "k_proj", "v_proj"]},
            "deepspeed": {"zeroStage": 3},
            "storage": {"credentialsSecret": "s3-creds", "endpoint": "https://minio.example:9000"},
        },
    }
    spec = parse_spec(job["spec"])  # what the operator will read
    assert (spec.workers.replicas, spec.lora.r, spec.deepspeed.zero_stage, spec.training.packing) == (2, 16, 3, True)


def test_dry_run_prints_json_with_the_namespace_and_applies_nothing(capsys) -> None:
    code, out, _ = run([*FLAGS, "-n", "ml", "--dry-run=client", "-o", "json"], capsys)
    assert code == 0  # the autouse fixture proves no kubectl ran
    assert json.loads(out)["metadata"] == {"name": "support-bot", "namespace": "ml"}


def test_a_manifest_with_flags_laid_over_it(capsys) -> None:
    code, out, _ = run(["submit", "short", "-f", str(REPO / "examples" / "quickstart.yaml"), "--max-steps", "20",
                        "--output", "s3://adapters/short/", "--dry-run"], capsys)
    job = yaml.safe_load(out)
    assert code == 0 and job["metadata"] == {"name": "short", "namespace": "default"}
    assert job["spec"]["training"]["maxSteps"] == 20 and job["spec"]["training"]["epochs"] == 5  # the rest kept
    assert job["spec"]["output"] == {"adapterUri": "s3://adapters/short/"}


@pytest.mark.parametrize("extra, field, flag", [
    (["--zero-stage", "4"], "spec.deepspeed.zeroStage: Input should be 1, 2 or 3", "--zero-stage"),
    (["--format", "jsonl"], "spec.dataset.format: Input should be 'text', 'chat' or 'instruction'", "--format"),
    (["--learning-rate", "0"], "spec.training.learningRate: Input should be greater than 0", "--learning-rate"),
    (["--workers", "0"], "spec.workers.replicas: Input should be greater than or equal to 1", "--workers"),
    (["--workers", "3"], "spec.training.globalBatchSize must be a multiple of", "--global-batch-size"),
    (["--output", "/local/dir"], "spec.output.adapterUri: must be an s3:// URI", "--output"),
    (["--set", "training.warmup=5"], "spec.training.warmup: unknown field", "--set training.warmup=..."),
])
def test_a_bad_flag_names_the_field_the_flag_and_the_fix_and_sends_nothing(capsys, extra, field, flag) -> None:
    code, out, err = run([*FLAGS, *extra], capsys)  # not a dry run: only the validation stops it
    assert code == 1 and out == ""
    assert "the job is not valid, nothing was sent" in err
    assert field in err and flag in err, err


def test_a_missing_field_and_a_bad_name_are_each_named(capsys) -> None:
    code, _, err = run(["submit", "Support_Bot", "--dataset", "s3://datasets/x.jsonl"], capsys)
    assert code == 1
    lines = err.splitlines()
    assert any(line.strip().startswith("metadata.name 'Support_Bot': metadata.name must be a DNS-1035 label")
               for line in lines), err
    assert "  spec.model: required field is missing" in lines and "  spec.output: required field is missing" in lines
    assert lines[-1] == "  set with: --model (spec.model.uri), --output (spec.output.adapterUri)"


def test_a_name_or_a_manifest_is_needed(capsys) -> None:
    code, _, err = run(["submit", "--model", "s3://models/m/"], capsys)
    assert code == 1 and "name the job (submit NAME" in err


def test_submit_sends_the_built_manifest_to_kubectl_apply(monkeypatch, capsys) -> None:
    sent = {}

    def fake_run(self, *args, input=None, check=True, timeout=60):
        sent["args"], sent["input"] = args, input
        return subprocess.CompletedProcess(args, 0, "finetunejob.kubetune.dev/support-bot created\n", "")
    monkeypatch.setattr(common.Kubectl, "run", fake_run)
    code, out, err = run([*FLAGS, "--context", "prod"], capsys)
    assert code == 0 and out == "finetunejob.kubetune.dev/support-bot created\n"
    assert sent["args"] == ("apply", "-f", "-") and yaml.safe_load(sent["input"])["metadata"]["name"] == "support-bot"
    assert "status support-bot" in err
    assert common.Kubectl(None, "prod", "ml").command("get", "ftj")[1:] == ["--context", "prod", "--namespace", "ml",
                                                                             "get", "ftj"]


def test_the_kubetune_command_has_the_same_subcommands(capsys) -> None:
    assert kubetune_cli.main([*FLAGS, "--dry-run", "-o", "name"]) == 0
    assert capsys.readouterr().out == "finetunejob.kubetune.dev/support-bot\n"


def test_cluster_flags_before_the_subcommand_are_kept() -> None:
    args = jobs.parser().parse_args(["-n", "ml", "--kubeconfig", "/k", "status", "x"])
    assert (args.namespace, args.kubeconfig, args.context) == ("ml", "/k", None)
    args = jobs.parser().parse_args(["status", "x", "--namespace", "team"])
    assert args.namespace == "team"


# ---- status ----------------------------------------------------------------------------------

RUNNING = {
    "phase": "Running", "message": "all 2 workers running (attempt 1)", "observedGeneration": 1,
    "conditions": [
        {"type": "Ready", "status": "False", "reason": "Running", "message": "all 2 workers running (attempt 1)",
         "lastTransitionTime": "2026-12-01T03:39:41Z", "observedGeneration": 1},
        {"type": "Reconciling", "status": "True", "reason": "Running", "message": "all 2 workers running (attempt 1)",
         "lastTransitionTime": "2026-12-01T03:39:41Z", "observedGeneration": 1}],
    "workers": {"active": 2, "succeeded": 0, "failed": 0},
    "progress": {"step": 43, "totalSteps": 150, "display": "43/150", "epoch": 1.43, "loss": 5.5489,
                 "tokensPerSecond": 4518.2, "eta": "5s", "etaSeconds": 5, "stepTime": "2026-12-01T03:40:09.1Z"},
    "launched": {"replicas": 2, "gpusPerWorker": 0, "configHash": "cb23" * 16, "attempt": 1,
                 "adapterUri": "s3://adapters/quickstart/", "logsUri": "s3://adapters/quickstart.logs/attempt-1/",
                 "createdTime": "2026-12-01T03:39:39Z", "runningTime": "2026-12-01T03:39:41Z"},
    "startTime": "2026-12-01T03:39:41Z",
}
SUCCEEDED = {
    **RUNNING, "phase": "Succeeded", "message": "adapter published to s3://adapters/quickstart/ (final loss 5.4493)",
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "Succeeded", "lastTransitionTime": "2026-12-01T03:40:24Z",
         "message": "adapter published to s3://adapters/quickstart/ (final loss 5.4493)", "observedGeneration": 1},
        {"type": "Succeeded", "status": "True", "reason": "AdapterPublished", "observedGeneration": 1,
         "message": "adapter published to s3://adapters/quickstart/ (final loss 5.4493)",
         "lastTransitionTime": "2026-12-01T03:40:24Z"}],
    "workers": {"active": 0, "succeeded": 2, "failed": 0},
    "progress": {"step": 150, "totalSteps": 150, "display": "150/150", "epoch": 5, "loss": 5.4493,
                 "tokensPerSecond": 3267.3, "eta": "0s", "etaSeconds": 0},
    "results": {"finalLoss": 5.449349721272786, "evalLoss": 5.512, "steps": 150, "tokens": 16900},
    "adapter": {"uri": "s3://adapters/quickstart/", "manifestSha256": "1bfb70a0a7d4" + "0" * 52},
    "cost": {"workerSeconds": 98, "gpuSeconds": 0, "tokens": 16900,
             "attempts": [{"attempt": 1, "workerSeconds": 98, "gpuSeconds": 0}]},
    "completionTime": "2026-12-01T03:40:24Z",
}
FAILED = {
    "phase": "Failed", "observedGeneration": 1,
    "message": "rank 1 was killed by SIGKILL (worker pod bot-worker-1 failed with exit code 137); backoffLimit 1 reached",
    "conditions": [
        {"type": "Ready", "status": "False", "reason": "WorkerFailed", "observedGeneration": 1},
        {"type": "Stalled", "status": "True", "reason": "WorkerFailed", "observedGeneration": 1},
        {"type": "Failed", "status": "True", "reason": "WorkerFailed", "observedGeneration": 1}],
    "workers": {"active": 0, "succeeded": 0, "failed": 1},
    "progress": {"step": 12, "totalSteps": 60, "display": "12/60", "epoch": 0.4, "loss": 5.7, "eta": "30s"},
    "launched": {"replicas": 2, "gpusPerWorker": 8, "attempt": 2, "logsUri": "s3://ckpt/bot.logs/attempt-2/"},
    "restarts": 1,
    "lastFailure": {"attempt": 2, "reason": "WorkerFailed", "pod": "bot-worker-1", "exitCode": 137,
                    "signal": "SIGKILL", "message": "rank 1 was killed by SIGKILL",
                    "logUri": "s3://ckpt/bot.logs/attempt-2/bot-worker-1.log", "time": "2026-12-01T03:39:00Z"},
    "cost": {"workerSeconds": 7260, "gpuSeconds": 58080,
             "attempts": [{"attempt": 1, "workerSeconds": 3600, "gpuSeconds": 28800},
                          {"attempt": 2, "workerSeconds": 3660, "gpuSeconds": 29280}]},
    "completionTime": "2026-12-01T03:39:05Z",
}


def job(status_: dict, name: str = "quickstart", **spec) -> dict:
    FineTuneJobStatus.model_validate(status_)  # the operator's shape, field by field
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "default", "uid": "u-1", "creationTimestamp": "2026-12-01T03:39:20Z"},
            "spec": {"output": {"adapterUri": f"s3://adapters/{name}/"}, "workers": {"replicas": 2}, **spec},
            "status": copy.deepcopy(status_)}


def test_status_of_a_running_job() -> None:
    assert status.render(job(RUNNING), now=NOW) == "\n".join([
        "FineTuneJob default/quickstart",
        "  Phase     Running",
        "  Message   all 2 workers running (attempt 1)",
        "  Progress  [█████████░░░░░░░░░░░░░░░░░░░░░]  29%  step 43/150  epoch 1.43  ETA 5s",
        "  Loss      5.5489",
        "  Speed     4,518 tokens/s",
        "  Workers   2 (CPU)   2 active   attempt 1",
        "  Restarts  0 of 3 allowed",
        "  Age       40s",
        "  Logs      s3://adapters/quickstart.logs/attempt-1/",
        "  Next      kubetune logs quickstart -f   |   wait quickstart",
    ])


def test_status_of_a_succeeded_job_shows_the_adapter_the_losses_and_the_cost() -> None:
    text = status.render(job(SUCCEEDED), now=NOW)
    assert "  Phase     Succeeded\n" in text and "Message" not in text  # the message says nothing new
    assert "[██████████████████████████████] 100%  step 150/150  epoch 5.00\n" in text and "ETA" not in text
    assert "  Loss      5.4493   eval 5.5120\n" in text and "Retention" not in text  # no retention set
    assert "  Took      1m04s\n" in text
    assert "  Cost      1m38s worker time, 0 GPU-hours, 16,900 tokens\n" in text
    assert "  Adapter   s3://adapters/quickstart/   manifest sha256 1bfb70a0a7d4\n" in text
    assert "adapter quickstart --download DIR" in text


def test_status_shows_the_retention_losses_when_the_job_measured_them() -> None:
    retained = {**SUCCEEDED, "results": {**SUCCEEDED["results"], "retentionLossBefore": 2.81123,
                                         "retentionLossAfter": 2.853}}
    assert "  Retention  2.8112 before, 2.8530 after training\n" in status.render(job(retained), now=NOW)


def test_status_of_a_failed_job_shows_the_last_failure_and_its_kept_log() -> None:
    text = status.render(job(FAILED, name="bot", runPolicy={"backoffLimit": 1}), now=NOW)
    assert "  Phase         Failed (WorkerFailed)\n" in text
    assert "  Last failure  attempt 2: WorkerFailed in bot-worker-1 (exit code 137, SIGKILL)\n" in text
    assert "                rank 1 was killed by SIGKILL\n" in text
    assert "                log: s3://ckpt/bot.logs/attempt-2/bot-worker-1.log\n" in text
    assert "  Restarts      1 of 1 allowed\n" in text
    assert "  Workers       2 x 8 GPU   1 failed   attempt 2\n" in text
    assert "  Cost          2h01m worker time, 16.13 GPU-hours, over 2 attempts\n" in text
    assert "ETA" not in text  # a finished job has none left


def test_status_has_colour_only_when_asked_and_ascii_without_utf8() -> None:
    plain = status.render(job(FAILED, name="bot"), now=NOW)
    assert "\033[" not in plain
    coloured = status.render(job(FAILED, name="bot"), now=NOW, colour=True)
    assert "\033[31mFailed\033[0m" in coloured
    assert "[######------------------------]  20%" in status.render(job(FAILED, name="bot"), now=NOW, fancy=False)


def test_status_of_a_job_not_reconciled_yet() -> None:
    fresh = job({})
    fresh.pop("status")
    assert "Phase     (not yet reconciled: is the operator running?)" in status.render(fresh, now=NOW)


def test_status_json_for_scripts(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common.Kubectl, "job", lambda self, name: job(SUCCEEDED, name))
    code, out, _ = run(["status", "quickstart", "-o", "json"], capsys)
    summary = json.loads(out)
    assert code == 0
    assert {key: summary[key] for key in ("phase", "step", "totalSteps", "percent", "restarts", "adapterUri")} == {
        "phase": "Succeeded", "step": 150, "totalSteps": 150, "percent": 100.0, "restarts": 0,
        "adapterUri": "s3://adapters/quickstart/"}
    assert summary["evalLoss"] == 5.512 and summary["status"]["cost"]["tokens"] == 16900


def test_status_not_on_a_terminal_has_no_colour(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common.Kubectl, "job", lambda self, name: job(FAILED, name))
    code, out, _ = run(["status", "bot"], capsys)
    assert code == 0 and "Failed (WorkerFailed)" in out and "\033[" not in out


# ---- wait ------------------------------------------------------------------------------------


@pytest.mark.parametrize("final, code, printed", [
    (SUCCEEDED, 0, "finetunejob/quickstart Succeeded: adapter s3://adapters/quickstart/"),
    (FAILED, 1, "finetunejob/quickstart Failed (WorkerFailed): rank 1 was killed by SIGKILL"),
])
def test_wait_exits_0_when_succeeded_and_1_when_failed_with_the_reason(monkeypatch, capsys, final, code, printed):
    states = iter([{}, RUNNING, RUNNING, final])
    monkeypatch.setattr(common.Kubectl, "job", lambda self, name: job(next(states), name))
    monkeypatch.setattr(wait.time, "sleep", lambda seconds: None)
    result, out, err = run(["wait", "quickstart", "--timeout", "5m"], capsys)
    assert result == code and out.startswith(printed)
    assert err.splitlines()[:2] == ["finetunejob/quickstart: not reconciled yet", "finetunejob/quickstart: Running 43/150"]


def test_wait_exits_2_on_timeout_and_when_there_is_no_such_job(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common.Kubectl, "job", lambda self, name: job(RUNNING, name))
    code, _, err = run(["wait", "quickstart", "--timeout", "0", "-q"], capsys)
    assert code == 2 and "still Running after 0s (--timeout)" in err

    def missing(self, name):
        raise common.CommandError(f"no FineTuneJob {name!r} in the current namespace")
    monkeypatch.setattr(common.Kubectl, "job", missing)
    code, _, err = run(["wait", "nope"], capsys)
    assert code == 2 and "no FineTuneJob 'nope'" in err


def test_wait_rides_out_a_few_api_errors(monkeypatch, capsys) -> None:
    answers = iter([common.CommandError("connection refused")] * 2 + [SUCCEEDED])

    def flaky(self, name):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return job(answer, name)
    monkeypatch.setattr(common.Kubectl, "job", flaky)
    monkeypatch.setattr(wait.time, "sleep", lambda seconds: None)
    assert run(["wait", "quickstart", "-q"], capsys)[0] == 0


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2.5m", 150)])
def test_durations(text, seconds) -> None:
    assert common.parse_duration(text) == seconds


def test_a_bad_duration_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="30 minutes"):
        common.parse_duration("30 minutes")


# ---- sparkline and loss curves ---------------------------------------------------------------


def test_sparkline_spans_lowest_to_highest() -> None:
    assert plot.sparkline([8, 7, 6, 5, 4, 3, 2, 1]) == "█▇▆▅▄▃▂▁"
    assert plot.sparkline([1, 1, 1]) == "▅▅▅"
    assert plot.sparkline([]) == ""
    assert plot.sparkline([2.0, float("nan"), 1.0]) == "█▁"
    assert plot.sparkline([3, 2, 1], fancy=False) == "#=_"


def test_a_long_series_is_averaged_into_the_width() -> None:
    line = plot.sparkline([float(200 - step) for step in range(200)], width=40)
    assert len(line) == 40 and line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, reverse=True)


def test_the_curve_summary_names_the_ends_and_the_lowest_point() -> None:
    history = [(1, 5.75), (2, 5.80), (3, 5.60), (4, 5.66)]
    text = plot.describe_curve(history, evals=[(0, 6.1), (4, 5.7)])
    assert text.splitlines() == ["loss  5.7500 ▆█▁▃ 5.6600   (steps 1-4, lowest 5.6000 at step 3)",
                                 "eval  6.1000@0 → 5.7000@4"]


def test_losses_are_read_from_rank_0s_log_lines() -> None:
    log = ("2026-12-01 03:38:46,853 INFO rank=0 kubetune.trainer: step=1/30 epoch=0.03 loss=5.7532 lr=0.000333333 "
           "grad_norm=0.5286 tokens_per_s=868.7\n[W1201 socket.cpp:207] noise\n"
           "2026-12-01 03:38:46,900 INFO rank=0 kubetune.trainer: step=2/30 epoch=0.07 loss=5.7986 lr=0.000666667\n"
           "2026-12-01 03:38:51,721 INFO rank=0 kubetune.trainer: done steps=30 final_loss=5.6625 eval_loss=n/a\n")
    assert plot.losses_from_log(log) == [(1, 5.7532), (2, 5.7986)]


def test_eval_points_as_the_trainers_loss_png_draws_them() -> None:
    results = {"initialEvalLoss": 6.2, "evalHistory": [{"step": 30, "evalLoss": 5.9}], "evalLoss": 5.8, "steps": 60}
    assert plot.eval_points(results) == [(0, 6.2), (30, 5.9), (60, 5.8)]


# ---- logs ------------------------------------------------------------------------------------


def test_logs_of_several_pods_are_interleaved_by_time() -> None:
    lines = logs.interleave({
        "worker-0": "2026-12-01T03:38:46.9Z step=2\n2026-12-01T03:38:46.12Z step=1\n",
        "worker-1": "2026-12-01T03:38:46.5Z ready\n2026-12-01T03:38:47Z bye\n",
    })
    assert [(prefix, text) for prefix, _, text in lines] == [
        ("worker-0", "step=1"), ("worker-1", "ready"), ("worker-0", "step=2"), ("worker-1", "bye")]


def _pod(name: str, component: str, attempt: int | None = None, index: int | None = None, state: str = "running"):
    labels = {"app.kubernetes.io/component": component}
    if attempt is not None:
        labels |= {"kubetune.dev/attempt": str(attempt), "kubetune.dev/replica-index": str(index)}
    return {"metadata": {"name": name, "uid": name + "-uid", "labels": labels},
            "status": {"containerStatuses": [{"name": "trainer", "state": {state: {}}}]}}


def test_logs_pick_the_current_attempts_workers_one_rank_or_the_preflight() -> None:
    pods = [_pod("bot-worker-1", "worker", 2, 1), _pod("bot-preflight", "preflight", state="terminated"),
            _pod("bot-worker-0", "worker", 2, 0), _pod("bot-worker-0-old", "worker", 1, 0)]
    running = job(RUNNING, "bot")
    assert [t.prefix for t in logs.select(running, pods, 2, None, preflight=False)] == ["worker-0", "worker-1"]
    assert [t.name for t in logs.select(running, pods, 2, 1, preflight=False)] == ["bot-worker-1"]
    assert [t.prefix for t in logs.select(running, pods, 2, None, preflight=True)] == ["preflight", "worker-0",
                                                                                     "worker-1"]
    assert logs.show_preflight(job({"phase": "Validating"}, "bot")) and not logs.show_preflight(running)


def test_logs_of_pods_that_are_gone_point_at_s3(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common.Kubectl, "job", lambda self, name: job(FAILED, name, output={
        "adapterUri": "s3://adapters/bot/", "checkpointUri": "s3://ckpt/bot/"}))
    monkeypatch.setattr(common.Kubectl, "pods", lambda self, job_: [])
    code, _, err = run(["logs", "bot"], capsys)
    assert code == 1
    assert "the workers of attempt 2 of bot are gone" in err and "s3://ckpt/bot.logs/attempt-2/" in err
    assert "logs bot --from-s3" in err
    code, _, err = run(["logs", "bot", "--attempt", "1", "--rank", "0"], capsys)
    assert "s3://ckpt/bot.logs/attempt-1/" in err and "--from-s3 --attempt 1 --rank 0" in err
    code, _, err = run(["logs", "bot", "--attempt", "3"], capsys)
    assert code == 1 and "bot has no attempt 3 (attempts 1 to 2)" in err


# ---- adapter ---------------------------------------------------------------------------------


class MemoryS3:
    """boto3's get_object over a dict of s3:// URIs."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_object(self, Bucket: str, Key: str) -> dict:
        uri = f"s3://{Bucket}/{Key}"
        if uri not in self.objects:
            error = Exception("NoSuchKey")
            error.response = {"Error": {"Code": "NoSuchKey"}}  # type: ignore[attr-defined]
            raise error
        return {"Body": io.BytesIO(self.objects[uri])}


def published(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    manifest = {"files": [{"path": path, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                          for path, body in files.items()],
                "baseModel": {"uri": "s3://models/tiny-llama/"}, "trainerConfig": {"lora": {"r": 24}}}
    document = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    objects = {f"s3://adapters/bot/{path}": body for path, body in files.items()}
    objects["s3://adapters/bot/manifest.json"] = document
    return objects, hashlib.sha256(document).hexdigest()


FILES = {"adapter_config.json": b'{"r": 24}', "adapter_model.safetensors": b"\0" * 1000, "loss.png": b"\x89PNG"}


def _succeeded(digest: str) -> dict:
    return job({**SUCCEEDED, "adapter": {"uri": "s3://adapters/bot/", "manifestSha256": digest}}, "bot")


def test_the_adapter_is_downloaded_and_every_sha256_verified(tmp_path) -> None:
    objects, digest = published(FILES)
    store = Store(MemoryS3(objects), None, "")
    uri, manifest, document = adapter.published_manifest(_succeeded(digest), store)
    assert adapter.download(store, uri, manifest, tmp_path) == []
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == FILES


def test_a_tampered_file_is_detected_and_removed(tmp_path) -> None:
    objects, digest = published(FILES)
    objects["s3://adapters/bot/adapter_model.safetensors"] = b"\1" * 1000
    store = Store(MemoryS3(objects), None, "")
    uri, manifest, _ = adapter.published_manifest(_succeeded(digest), store)
    problems = adapter.download(store, uri, manifest, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("adapter_model.safetensors: sha256 ")
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_a_manifest_the_job_did_not_publish_is_refused() -> None:
    objects, _ = published(FILES)
    with pytest.raises(common.CommandError, match="is not the manifest bot published"):
        adapter.published_manifest(_succeeded("0" * 64), Store(MemoryS3(objects), None, ""))
    with pytest.raises(common.CommandError, match="bot has no published adapter \\(phase Running\\); it is published"):
        adapter.published_manifest(job(RUNNING, "bot"), Store(MemoryS3(objects), None, ""))


def test_a_manifest_path_outside_the_folder_is_refused(tmp_path) -> None:
    objects, _ = published({"../../etc/passwd": b"x"})
    with pytest.raises(common.CommandError, match="outside the adapter folder"):
        adapter.download(Store(MemoryS3(objects), None, ""), "s3://adapters/bot/",
                         {"files": [{"path": "../../etc/passwd"}]}, tmp_path)


def test_how_to_load_and_serve_it() -> None:
    text = adapter.usage("bot", "./bot-adapter", {"baseModel": {"uri": "s3://models/tiny-llama/"}}, 24)
    assert 'model = PeftModel.from_pretrained(base, "./bot-adapter")' in text
    assert "vllm serve BASE --enable-lora --lora-modules bot=./bot-adapter --max-lora-rank 32" in text
    assert [adapter.vllm_max_lora_rank(r) for r in (1, 8, 9, 16, 300, 512)] == [1, 8, 16, 16, 320, 512]


@pytest.mark.parametrize(("flag", "environment", "spec_endpoint", "launched", "expected"), [
    ("http://flag:9000", "http://env:9000", "http://spec:9000", "http://op:9000", ("http://flag:9000", "--s3-endpoint")),
    (None, "http://env:9000", "http://spec:9000", "http://op:9000", ("http://env:9000", "AWS_ENDPOINT_URL_S3")),
    (None, None, "http://spec:9000", "http://op:9000", ("http://spec:9000", "the job's spec.storage.endpoint")),
    (None, None, None, "http://op:9000",
     ("http://op:9000", "the operator's default, from the job's status.launched.storageEndpoint")),
    (None, None, None, None, (None, "")),
])
def test_the_s3_endpoint_comes_from_the_flag_the_environment_the_spec_then_the_operators_choice(
        monkeypatch, flag, environment, spec_endpoint, launched, expected) -> None:
    from kubetune.cli.jobs.s3 import endpoint_for
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable, raising=False)
    if environment:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", environment)
    job = {"metadata": {"name": "j", "namespace": "default"},
           "spec": {"storage": {"endpoint": spec_endpoint} if spec_endpoint else {}},
           "status": {"launched": {"storageEndpoint": launched}} if launched else {}}
    assert endpoint_for(job, argparse.Namespace(s3_endpoint=flag)) == expected

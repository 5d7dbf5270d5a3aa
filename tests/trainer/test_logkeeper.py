"""The worker pod's entrypoint keeps the pod's whole log in S3 (kubetune.api.logs) while passing
the command's output, signals and exit code through as if it were the container's process.
A real moto S3; the command is a small Python script (test_sigterm runs it around torchrun)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.api.logs import ATTEMPT_ENV, POD_NAME_ENV

LOGKEEPER = [sys.executable, "-m", "kubetune.trainer.logkeeper"]


def _config(tmp_path: Path, moto_endpoint: str, **output: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": "keeper", "uid": "uid-keeper"},
        "model": {"uri": "s3://models/tiny/"},
        "dataset": {"uri": "s3://datasets/keeper/train.jsonl"},
        "output": output or {"adapterUri": "s3://adapters/keeper/"},
        "storage": {"endpoint": moto_endpoint},
    }))
    return path


def _keep(config: Path, script: str, env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([*LOGKEEPER, "--config", str(config), "--", sys.executable, "-u", "-c", script],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _object(s3_client, bucket: str, key: str) -> str | None:
    try:
        return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except s3_client.exceptions.NoSuchKey:
        return None


@pytest.fixture
def buckets(s3_client) -> None:
    for bucket in ("adapters", "ckpt"):
        try:
            s3_client.create_bucket(Bucket=bucket)
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass


def test_output_and_exit_code_pass_through_and_the_whole_log_is_kept_beside_the_checkpoints(
    tmp_path: Path, moto_endpoint: str, s3_env: dict[str, str], s3_client, buckets: None,
) -> None:
    config = _config(tmp_path, moto_endpoint, adapterUri="s3://adapters/keeper/", checkpointUri="s3://ckpt/keeper/")
    script = "import sys; print('step 1'); print('boom', file=sys.stderr); print('step 2'); sys.exit(3)"
    env = {**s3_env, POD_NAME_ENV: "keeper-worker-0", ATTEMPT_ENV: "2"}

    run = _keep(config, script, env)
    stdout, stderr = run.communicate(timeout=60)

    assert (run.returncode, stdout, stderr) == (3, "step 1\nstep 2\n", "boom\n")
    kept = _object(s3_client, "ckpt", "keeper.logs/attempt-2/keeper-worker-0.log")
    assert kept is not None and sorted(kept.splitlines()) == ["boom", "step 1", "step 2"]


def test_sigterm_is_passed_on_once_and_the_log_written_after_it_is_kept(
    tmp_path: Path, moto_endpoint: str, s3_env: dict[str, str], s3_client, buckets: None,
) -> None:
    config = _config(tmp_path, moto_endpoint, adapterUri="s3://adapters/")  # at a bucket's root
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM, saving'), sys.exit(143)))\n"
        "print('ready')\n"
        "while True: time.sleep(0.05)\n"
    )
    env = {**s3_env, POD_NAME_ENV: "keeper-worker-1", ATTEMPT_ENV: "1"}

    run = _keep(config, script, env, start_new_session=True)
    assert run.stdout is not None and run.stdout.readline() == "ready\n"
    run.send_signal(signal.SIGTERM)  # to the log keeper only, as a container runtime signals PID 1
    stdout, _ = run.communicate(timeout=60)

    assert (run.returncode, stdout) == (143, "got SIGTERM, saving\n")
    assert _object(s3_client, "adapters", ".logs/attempt-1/keeper-worker-1.log") == "ready\ngot SIGTERM, saving\n"


def test_a_command_killed_by_a_signal_exits_as_a_container_would(
    tmp_path: Path, moto_endpoint: str, s3_env: dict[str, str],
) -> None:
    env = {**s3_env, POD_NAME_ENV: "keeper-worker-0", ATTEMPT_ENV: "1"}
    run = _keep(_config(tmp_path, moto_endpoint), "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", env)
    run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGKILL


def test_a_log_that_cannot_be_kept_never_fails_the_worker(
    tmp_path: Path, moto_endpoint: str, s3_env: dict[str, str],
) -> None:
    config = _config(tmp_path, moto_endpoint, adapterUri="s3://no-such-bucket/keeper/")
    env = {**s3_env, POD_NAME_ENV: "keeper-worker-0", ATTEMPT_ENV: "1"}
    started = time.monotonic()
    run = _keep(config, "print('trained')", env)
    stdout, stderr = run.communicate(timeout=60)

    assert (run.returncode, stdout) == (0, "trained\n")
    (warning,) = stderr.splitlines()
    assert warning.startswith("kubetune-logkeeper: this pod's log is not kept in S3: "
                              "s3://no-such-bucket/keeper.logs/attempt-1/keeper-worker-0.log"), warning
    assert time.monotonic() - started < 30


def test_run_by_hand_it_is_the_command_itself(tmp_path: Path, moto_endpoint: str,
                                                       s3_env: dict[str, str]) -> None:
    env = {key: value for key, value in s3_env.items() if key not in (POD_NAME_ENV, ATTEMPT_ENV)}
    run = _keep(tmp_path / "missing.yaml", "print('hello')", env)
    stdout, stderr = run.communicate(timeout=60)
    assert (run.returncode, stdout, stderr) == (0, "hello\n", "")

"""A worker pod deleted mid-training (suspend, gang restart, job deleted): the kubelet sends
SIGTERM to the container's PID 1 only, the log keeper (the worker pod's entrypoint) passes it
to torchrun, torchrun sends it on to its workers and SIGKILLs them 30 s later. The trainer finishes the step, checkpoints it, waits until the
checkpoint is COMPLETE in S3 and exits 143; the restarted job resumes from that step.

torchrun, 2 CPU processes, DeepSpeed ZeRO-2, real S3 (moto), as in test_checkpoint_resume.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from kubetune.api.logs import ATTEMPT_ENV, POD_NAME_ENV
from test_checkpoint_resume import _checkpoint_folders, _config, _manifest
from test_train_distributed import run_torchrun

TORCHRUN_SHUTDOWN_SECONDS = 30
"""torchrun's default --shutdown-timeout: how long a worker has after SIGTERM before SIGKILL."""


class Torchrun:
    """torchrun under the log keeper, as in a worker pod, in its own process group (killed on
    exit whatever happens), its output read line by line so the test can act on a progress line."""

    def __init__(self, config_path: Path, env: dict[str, str], master_port: int) -> None:
        torchrun = Path(sys.executable).with_name("torchrun")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.trainer.logkeeper", "--config", str(config_path), "--",
             str(torchrun), "--nnodes=1", "--nproc-per-node=2", f"--master-port={master_port}",
             "-m", "kubetune.trainer", "--config", str(config_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            assert self.proc.poll() is None, f"torchrun ended before {needle!r}:\n{self.output[-5000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout}s:\n{self.output[-5000:]}"
            time.sleep(0.05)

    def __enter__(self) -> Torchrun:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reader.join(timeout=10)


def _sigterm_mid_training(config: dict, tmp_path: Path, s3_env: dict[str, str], port: int) -> tuple[str, dict, float]:
    """Run ``config`` as worker pod 0 of attempt 1 would, SIGTERM its first process (only that
    one, as the kubelet does) once step 2 is logged; (output, termination message, seconds from
    SIGTERM to the end)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "termination-log"
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
           "KUBETUNE_TERMINATION_LOG": str(log), POD_NAME_ENV: f"{config['job']['name']}-worker-0", ATTEMPT_ENV: "1"}
    with Torchrun(path, env, port) as run:
        run.wait_for("kubetune.trainer: step=2/12", timeout=400)
        signalled = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        run.proc.wait(timeout=120)
        seconds = time.monotonic() - signalled
        run._reader.join(timeout=10)
        output = run.output
    return output, json.loads(log.read_text()), seconds


@pytest.mark.timeout(900)
def test_sigterm_checkpoints_the_step_it_stopped_at_and_a_restart_resumes_from_it(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client,
    tmp_path: Path, unused_port,
) -> None:
    try:
        s3_client.create_bucket(Bucket="ckpt")
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    name = "sigterm"
    # Checkpoints only at epoch ends (steps 6 and 12): the one written on SIGTERM is extra.
    config = _config(name, moto_endpoint, uploaded_assets, 2, checkpointUri=f"s3://ckpt/{name}/")

    output, message, seconds = _sigterm_mid_training(config, tmp_path, s3_env, unused_port())

    # 1. Every rank finished its step, and they stopped at the same one: step N.
    stopped = re.search(r"SIGTERM: stopping at step (\d+)/12", output)
    assert stopped, output[-5000:]
    step = int(stopped.group(1))
    assert 2 <= step < 12 and f"step={step}/12" in output and f"step={step + 1}/12" not in output, output[-5000:]
    # 2. ...wrote its checkpoint, waited until it was COMPLETE, and exited 143 in time: torchrun
    #    SIGKILLs its workers 30 s after passing SIGTERM on.
    assert seconds < TORCHRUN_SHUTDOWN_SECONDS, seconds
    assert "forcefully exiting via SIGKILL" not in output, output[-5000:]
    folder = _checkpoint_folders(s3_client, name)[f"step-{step}"]
    assert {"COMPLETE", "rank-0.pt", "rank-1.pt"} <= folder, folder
    marker = json.loads(s3_client.get_object(Bucket="ckpt", Key=f"{name}/step-{step}/COMPLETE")["Body"].read())
    assert marker == {"step": step, "worldSize": 2}
    assert message == {
        "outcome": "Failed", "exitCode": 143, "steps": step, "totalSteps": 12,
        "error": f"stopped on SIGTERM at step {step} with a checkpoint (s3://ckpt/{name}/step-{step}/): "
                 "a restart resumes from it"}
    assert "manifest.json" not in str(s3_client.list_objects_v2(Bucket="adapters", Prefix=f"{name}/"))
    # 3. The pod's whole log, up to its last line, is kept beside the checkpoints.
    kept = s3_client.get_object(Bucket="ckpt", Key=f"{name}.logs/attempt-1/{name}-worker-0.log")["Body"].read().decode()
    assert "step=1/12" in kept and stopped.group(0) in kept, kept

    # 4. The restarted job resumes from exactly that step and finishes.
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    again = run_torchrun(path, env, master_port=unused_port())
    assert again.returncode == 0, again.stdout[-5000:]
    assert f"resuming from checkpoint s3://ckpt/{name}/step-{step}/" in again.stdout, again.stdout[-5000:]
    assert f"step={step + 1}/12" in again.stdout and f"step={step}/12" not in again.stdout
    results = _manifest(s3_client, name)["results"]
    assert results["resumedFromStep"] == step
    assert [logged for logged, _ in results["lossHistory"]] == list(range(1, 13))


@pytest.mark.timeout(600)
def test_without_checkpoints_sigterm_stops_at_once(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client,
    tmp_path: Path, unused_port,
) -> None:
    config = _config("sigterm-no-ckpt", moto_endpoint, uploaded_assets, 2)

    output, message, seconds = _sigterm_mid_training(config, tmp_path, s3_env, unused_port())

    assert seconds < 10, (seconds, output[-5000:])
    assert "forcefully exiting via SIGKILL" not in output
    step = message["steps"]
    assert message == {
        "outcome": "Failed", "exitCode": 143, "steps": step, "totalSteps": 12,
        "error": f"stopped on SIGTERM at step {step} without a checkpoint (no output.checkpointUri): "
                 "a restart starts over"}
    assert 2 <= step < 12 and f"step={step + 1}/12" not in output

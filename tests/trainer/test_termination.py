"""The termination message the trainer leaves for the kubelet (and so for `kubectl get ftj`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from kubetune.api.termination import ExitCode, TerminationMessage
from kubetune.trainer import termination


def test_success_message_summarises_the_run() -> None:
    results = {"steps": 30, "totalSteps": 30, "finalLoss": 1.25, "evalLoss": None, "tokens": 4096, "worldSize": 2,
               "manifestSha256": "ab" * 32}
    summary = json.loads(termination.success_message(results, "s3://adapters/quickstart/"))
    assert summary == {  # what is unknown (no evaluation data) is left out
        "outcome": "Succeeded", "steps": 30, "totalSteps": 30, "finalLoss": 1.25,
        "tokens": 4096, "adapterUri": "s3://adapters/quickstart/", "manifestSha256": "ab" * 32,
    }


def test_failure_message_is_one_line_and_fits_kubernetes_4096_byte_limit() -> None:
    summary = json.loads(termination.failure_message("train.jsonl line 3:\nnot valid JSON"))
    assert summary == {"outcome": "Failed", "error": "train.jsonl line 3: not valid JSON", "exitCode": 1}
    assert not TerminationMessage.parse(json.dumps(summary)).permanent  # plain failures are retried

    bad_data = TerminationMessage.parse(termination.failure_message("line 3: not valid JSON", ExitCode.INVALID_DATA))
    assert (bad_data.exit_code, bad_data.permanent) == (65, True)
    stopped = json.loads(termination.failure_message("stopped on SIGTERM at step 7", 143, steps=7, total_steps=12))
    assert stopped == {"outcome": "Failed", "error": "stopped on SIGTERM at step 7", "exitCode": 143,
                       "steps": 7, "totalSteps": 12}

    long = termination.failure_message("line 1: " + "é" * 5000)
    assert len(long.encode()) <= termination.MAX_BYTES
    assert json.loads(long)["error"].startswith("line 1: éé") and json.loads(long)["error"].endswith("...")


def test_write_goes_to_the_env_path_and_skips_a_missing_default(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv(termination.PATH_ENV, str(target))
    assert termination.write("hello")
    assert target.read_text() == "hello"

    monkeypatch.delenv(termination.PATH_ENV)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # in a pod
    monkeypatch.setattr(termination, "DEFAULT_PATH", str(tmp_path / "absent" / "termination-log"))
    assert not termination.write("nowhere")
    assert not (tmp_path / "absent").exists()

    default = tmp_path / "dev-termination-log"
    default.touch()  # the kubelet's mount point
    monkeypatch.setattr(termination, "DEFAULT_PATH", str(default))
    assert termination.write("in a pod")
    assert default.read_text() == "in a pod"

    # Outside a pod the file may exist (the local cluster's mount point) but is not ours.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert not termination.write("not in a pod")
    assert default.read_text() == "in a pod"

    monkeypatch.setenv(termination.PATH_ENV, str(tmp_path / "no-such-dir" / "log"))
    assert not termination.write("unwritable")  # never an exception: the outcome is in the exit code


def test_a_config_error_is_left_as_the_termination_message(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"schemaVersion": 1, "training": {"learningrate": 0.1}}))
    log = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**_env(), termination.PATH_ENV: str(log)},
    )
    assert result.returncode == ExitCode.INVALID_CONFIG == 78
    summary = json.loads(log.read_text())
    assert summary["outcome"] == "Failed" and summary["exitCode"] == 78
    assert summary["error"] in result.stderr  # the same line the pod's log shows


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)

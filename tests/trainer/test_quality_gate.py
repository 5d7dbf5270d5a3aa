"""qualityGate.maxEvalLoss: a job whose final eval loss misses the gate publishes nothing and
fails with the measured value and the gate in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_train_distributed import run_torchrun


@pytest.mark.timeout(600)
def test_an_adapter_that_misses_the_gate_is_not_published(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client, tmp_path: Path,
    unused_port,
) -> None:
    config = {
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": "gated", "uid": "uid-gated"},
        "model": {"uri": uploaded_assets["model"]},
        "dataset": {"uri": uploaded_assets["train"], "format": "text", "validationSplit": 0.1},
        "training": {"maxSteps": 2, "microBatchSize": 4, "globalBatchSize": 8, "sequenceLength": 64},
        "output": {"adapterUri": "s3://adapters/gated/"},
        "qualityGate": {"maxEvalLoss": 0.5},  # the tiny model cannot get there in 2 steps
        "storage": {"endpoint": moto_endpoint},
        "metrics": {"port": 0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}

    result = run_torchrun(config_path, env, master_port=unused_port())

    assert result.returncode != 0
    match = re.search(
        r"kubetune-trainer: error: eval loss (\d+\.\d+) > qualityGate.maxEvalLoss 0.5: adapter not published\n",
        result.stdout,
    )
    assert match, result.stdout[-3000:]
    logged = re.search(r"final eval_loss=(\d+\.\d+)", result.stdout)
    assert logged and float(match.group(1)) == pytest.approx(float(logged.group(1)), abs=1e-4)
    listed = s3_client.list_objects_v2(Bucket="adapters", Prefix="gated").get("Contents", [])
    assert listed == []  # nothing published, not even staged files

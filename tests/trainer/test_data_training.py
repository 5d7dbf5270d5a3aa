"""The trainer on packed chat data from Parquet, with a separate validation file: what a user
sees is a published adapter, falling losses and the count of dropped long examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml


@pytest.mark.timeout(600)
def test_packed_chat_parquet_with_a_validation_file_trains_and_publishes(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client,
    tiny_assets: Path, tmp_path: Path,
) -> None:
    rows = [json.loads(line) for line in (tiny_assets / "datasets" / "chat.jsonl").read_text().splitlines()]
    rambling = {"messages": [{"role": "user", "content": "what is one plus one? " * 20},
                             {"role": "assistant", "content": "two."}]}
    train, validation = rows[:200] + [rambling] * 7, rows[200:]
    for name, data in [("train", train), ("validation", validation)]:
        pq.write_table(pa.Table.from_pylist(data), tmp_path / f"{name}.parquet")
        s3_client.upload_file(str(tmp_path / f"{name}.parquet"), "datasets", f"packed/{name}.parquet")
    config = {
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": "packed", "uid": "uid-packed"},
        "model": {"uri": uploaded_assets["model"]},
        "dataset": {"uri": "s3://datasets/packed/train.parquet", "format": "chat",
                    "validationUri": "s3://datasets/packed/validation.parquet", "overlong": "drop"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"epochs": 1, "maxSteps": 8, "learningRate": 0.01, "microBatchSize": 2, "globalBatchSize": 4,
                     "sequenceLength": 96, "seed": 7, "logEverySteps": 4, "packing": True},
        "output": {"adapterUri": "s3://adapters/packed/"},
        "storage": {"endpoint": moto_endpoint, "region": "us-east-1"},
        "evaluation": {"atStart": True},
        "metrics": {"port": 0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**s3_env, "KUBETUNE_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}

    # One process (no torchrun): the trainer then forms a world of one by itself.
    result = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)], env=env,
                            capture_output=True, text=True, timeout=540, check=False)
    log = result.stdout + result.stderr

    assert result.returncode == 0, log[-5000:]
    assert ("s3://datasets/packed/train.parquet: dropped 7 of 207 examples longer than 96 tokens "
            "(dataset.overlong: drop)") in log, log[-3000:]
    assert [line.split("step=")[1].split()[0] for line in log.splitlines() if "kubetune.trainer: step=" in line] \
        == ["4/8", "8/8"], log[-3000:]
    manifest = json.loads(s3_client.get_object(Bucket="adapters", Key="packed/manifest.json")["Body"].read())
    results = manifest["results"]
    assert results["finalLoss"] < results["initialLoss"], results
    # Evaluated on the 40 conversations of the validation file, which improved too.
    assert results["evalLoss"] < results["initialEvalLoss"], results

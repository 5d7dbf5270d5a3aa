"""loss.png: published with the adapter, listed in the manifest, and a readable chart."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib import colors
from matplotlib import image as mpimg

from kubetune.api.spec import Storage
from kubetune.api.trainer_config import parse_config
from kubetune.trainer.plot import render_loss_curve
from kubetune.trainer.publish import publish_adapter
from kubetune.trainer.s3 import make_client

RESULTS = {
    "steps": 40,
    "lossHistory": [[step, 3.0 * math.exp(-step / 15) + 0.5] for step in range(1, 41)],
    "initialEvalLoss": 3.4,
    "evalHistory": [{"epoch": 1, "step": 20, "evalLoss": 1.3}],
    "evalLoss": 0.9,
    "finalLoss": 0.6,
}


def count_pixels_near(rgba: np.ndarray, colour: str, tolerance: float = 0.08) -> int:
    target = np.array(colors.to_rgb(colour))
    return int((np.abs(rgba[..., :3] - target).max(axis=-1) < tolerance).sum())


def test_the_published_adapter_includes_a_readable_loss_curve(moto_endpoint: str, s3_client, tmp_path: Path) -> None:
    s3_client.create_bucket(Bucket="plots")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    config = parse_config({
        "schemaVersion": 1, "job": {"namespace": "team-a", "name": "sums"},
        "model": {"uri": "s3://models/tiny-llama/"}, "dataset": {"uri": "s3://datasets/q/train.jsonl"},
        "output": {"adapterUri": "s3://plots/sums/"},
    })
    publish_adapter(make_client(Storage(endpoint=moto_endpoint)), adapter, config, RESULTS)

    body = s3_client.get_object(Bucket="plots", Key="sums/loss.png")["Body"].read()
    manifest = json.loads(s3_client.get_object(Bucket="plots", Key="sums/manifest.json")["Body"].read())
    [entry] = [entry for entry in manifest["files"] if entry["path"] == "loss.png"]
    assert entry == {"path": "loss.png", "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    pixels = mpimg.imread(io.BytesIO(body), format="png")
    assert pixels.shape == (400, 640, 4)
    # The training curve (blue) and the eval points (orange) are drawn, not an empty frame.
    assert count_pixels_near(pixels, "tab:blue") > 500
    assert count_pixels_near(pixels, "tab:orange") > 100


def test_no_training_loss_draws_no_chart(tmp_path: Path) -> None:
    assert render_loss_curve({"steps": 3, "finalLoss": 1.5}, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_a_run_without_evaluation_draws_only_the_training_curve(tmp_path: Path) -> None:
    path = render_loss_curve({"steps": 2, "lossHistory": [[1, 2.0], [2, 1.5]]}, tmp_path / "loss.png")
    pixels = mpimg.imread(path)
    assert pixels.shape == (400, 640, 4)
    assert count_pixels_near(pixels, "tab:blue") > 100
    assert count_pixels_near(pixels, "tab:orange") == 0

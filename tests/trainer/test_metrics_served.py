"""Who serves /metrics: rank 0 every training series; the first process of every other worker
only the steps it has begun (what the operator asks each worker when a job stalls); the other
processes of a worker nothing (one port per pod)."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import pytest
from kubetune.api import metrics as names
from kubetune.trainer.train import Topology, _start_metrics


def _config(port: int) -> SimpleNamespace:
    return SimpleNamespace(metrics=SimpleNamespace(port=port), model=SimpleNamespace(uri="s3://m/"),
                           dataset=SimpleNamespace(uri="s3://d/x.jsonl"), output=SimpleNamespace(adapter_uri="s3://a/"),
                           deepspeed=SimpleNamespace(zero_stage=2))


def _series(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split()[0].split("{")[0] for line in text.splitlines() if line.startswith("kubetune_")}


def test_rank_0_serves_every_series_and_the_steps_it_has_begun(unused_port) -> None:
    port = unused_port()
    metrics = _start_metrics(_config(port), Topology(rank=0, world_size=4, local_rank=0, node_rank=0))
    metrics.steps_begun.set(3)
    assert {names.STEP, names.TOTAL_STEPS, names.STEPS_BEGUN, names.INFO} <= _series(port)


def test_another_workers_first_process_serves_only_the_steps_it_has_begun(unused_port) -> None:
    port = unused_port()
    metrics = _start_metrics(_config(port), Topology(rank=2, world_size=4, local_rank=0, node_rank=1))
    metrics.steps_begun.set(3)
    assert _series(port) == {names.STEPS_BEGUN}


@pytest.mark.parametrize("rank, local_rank", [(1, 1), (3, 1)])
def test_the_other_processes_of_a_worker_serve_nothing(unused_port, rank: int, local_rank: int) -> None:
    assert _start_metrics(_config(unused_port()), Topology(rank=rank, world_size=4, local_rank=local_rank,
                                                           node_rank=rank // 2)) is None

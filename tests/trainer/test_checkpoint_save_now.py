"""Checkpointer.save_now, the last act of a worker stopping on SIGTERM: the checkpoint is
COMPLETE in S3 when it returns, and a checkpoint of the same step already uploading is waited
for rather than written twice. One process (a gloo group of one) and a stand-in for the
DeepSpeed engine; the real engine is exercised in test_sigterm.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from kubetune.api.spec import Storage
from kubetune.trainer.checkpoint import Checkpointer, Position
from kubetune.trainer.s3 import make_client


class Engine:
    """Writes one file per save, as DeepSpeed writes its shards, and counts the saves."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def save_checkpoint(self, save_dir: str, tag: str, **_kwargs) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights of " + tag.encode())
        self.saved.append(tag)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_save_now_returns_once_the_checkpoint_is_complete_and_never_writes_a_step_twice(
    group: None, moto_endpoint: str, s3_client, tmp_path: Path,
) -> None:
    s3_client.create_bucket(Bucket="save-now")
    checkpointer = Checkpointer(make_client(Storage(endpoint=moto_endpoint)), "s3://save-now/job/", 5,
                                tmp_path / "scratch", rank=0, local_rank=0, local_world_size=1)
    engine = Engine()

    # Step 6 was checkpointed as usual (upload in the background, not yet marked complete)...
    checkpointer.save(engine, Position(6, 1, 0), {"steps": 6}, {"window": []})
    assert not _has(s3_client, "job/step-6/COMPLETE")
    # ...then SIGTERM: step 6 is waited for, not written again, and complete on return.
    assert checkpointer.save_now(engine, Position(6, 1, 0), {"steps": 6}, {"window": []})
    assert engine.saved == ["step-6"]
    assert json.loads(_get(s3_client, "job/step-6/COMPLETE")) == {"step": 6, "worldSize": 1}

    # A step with no checkpoint yet is written and completed before save_now returns.
    assert checkpointer.save_now(engine, Position(7, 1, 2), {"steps": 7}, {"window": []})
    assert engine.saved == ["step-6", "step-7"]
    assert json.loads(_get(s3_client, "job/step-7/COMPLETE")) == {"step": 7, "worldSize": 1}
    assert _get(s3_client, "job/step-7/step-7/mp_rank_00_model_states.pt") == b"weights of step-7"


def test_save_now_says_so_when_the_checkpoint_cannot_be_completed(
    group: None, moto_endpoint: str, s3_client, tmp_path: Path,
) -> None:
    # The bucket does not exist: every upload fails, training would go on, a stop reports it.
    checkpointer = Checkpointer(make_client(Storage(endpoint=moto_endpoint)), "s3://no-such-save-now/job/", 2,
                                tmp_path / "scratch", rank=0, local_rank=0, local_world_size=1)
    assert not checkpointer.save_now(Engine(), Position(3, 0, 6), {"steps": 3}, {"window": []})


def _get(s3_client, key: str) -> bytes:
    return s3_client.get_object(Bucket="save-now", Key=key)["Body"].read()


def _has(s3_client, key: str) -> bool:
    return "Contents" in s3_client.list_objects_v2(Bucket="save-now", Prefix=key)

"""The tokenized-data cache (datacache.py): what a run keeps beside its checkpoints comes back
as the same examples, and any change to what the examples depend on makes another key."""

from __future__ import annotations

import shutil
from pathlib import Path

from kubetune.api.trainer_config import parse_config
from kubetune.trainer import datacache
from kubetune.trainer.data import Datasets, Example
from kubetune.trainer.s3 import make_client


def config(**changes: dict) -> object:
    document = {
        "schemaVersion": 1,
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {"uri": "s3://datasets/quickstart/train.jsonl", "validationSplit": 0.1},
        "output": {"adapterUri": "s3://adapters/cache/", "checkpointUri": "s3://ckpt/cache/"},
    }
    for section, values in changes.items():
        document[section] = {**document.get(section, {}), **values}
    return parse_config(document)


def test_kept_examples_come_back_the_same(moto_endpoint: str, s3_client, tmp_path: Path) -> None:
    try:
        s3_client.create_bucket(Bucket="ckpt")
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    made = Datasets([Example([1, 5, 9, 2], [-100, 5, 9, 2]), Example([1, 7, 2], [-100, -100, 2])],
                    [Example([1, 3, 2], [-100, 3, 2])], ["s3://x: truncated 1 of 3 examples"],
                    [Example([1, 4, 4, 4, 2], [-100, 4, 4, 4, 2])])
    client = make_client(config().storage.model_copy(update={"endpoint": moto_endpoint}))
    uri = datacache.cache_uri(config(), "a" * 64)
    assert uri == f"s3://ckpt/cache/tokenized/{'a' * 64}.pt"
    assert not datacache.fetch(client, uri, tmp_path / "missing.pt")  # nothing kept yet: tokenise
    datacache.store(client, uri, made, tmp_path / "scratch").join()
    assert datacache.fetch(client, uri, tmp_path / "got.pt")
    assert datacache.load(tmp_path / "got.pt") == made
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    assert datacache.load(tmp_path / "bad.pt") is None  # unreadable: tokenise as without it


def test_the_key_follows_every_input_of_the_examples(tiny_assets: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_assets / "tiny-llama", model)
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "one"}\n')
    key = datacache.cache_key(config(), model, [data])
    assert datacache.cache_key(config(), model, [data]) == key  # the same inputs, the same key
    assert datacache.cache_key(config(training={"sequenceLength": 256}), model, [data]) != key
    assert datacache.cache_key(config(dataset={"format": "chat"}), model, [data]) != key
    assert datacache.cache_key(config(evaluation={"retentionUri": "s3://data/r.jsonl"}), model, [data]) != key
    data.write_text('{"text": "two"}\n')
    assert datacache.cache_key(config(), model, [data]) != key
    data.write_text('{"text": "one"}\n')
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    assert datacache.cache_key(config(), model, [data]) != key
    # The weights decide no token: not read (they are the large files).
    data.write_text('{"text": "one"}\n')
    shutil.copytree(tiny_assets / "tiny-llama", model, dirs_exist_ok=True)
    (model / "model.safetensors").write_bytes(b"other weights")
    assert datacache.cache_key(config(), model, [data]) == key
    # No checkpoints, no cache.
    assert datacache.cache_uri(config(output={"checkpointUri": None}), key) is None

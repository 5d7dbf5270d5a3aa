"""S3 helpers and adapter publishing against a real moto server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune.trainer.config import StorageConfig, parse_config
from kubetune.trainer.errors import TrainerError
from kubetune.trainer.publish import publish_adapter
from kubetune.trainer.s3 import download_file, download_prefix, make_client, parse_s3_uri, upload_file


@pytest.fixture
def bucket(s3_client, request: pytest.FixtureRequest) -> str:
    name = "t-" + request.node.name.replace("_", "-").lower()[:50]
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def client(moto_endpoint: str, s3_client):
    return make_client(StorageConfig(endpoint=moto_endpoint))


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [("s3://models/tiny/", ("models", "tiny/")), ("s3://bkt/a/b.jsonl", ("bkt", "a/b.jsonl")), ("s3://bkt", ("bkt", ""))],
)
def test_parse_s3_uri(uri: str, parsed: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == parsed


@pytest.mark.parametrize(("uri", "message"), [("https://x/y", "not an S3 URI"), ("s3://ab/k", r"no valid bucket name \('ab'\)")])
def test_parse_s3_uri_rejects_what_is_not_s3(uri: str, message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        parse_s3_uri(uri)


def test_download_prefix_keeps_sub_paths_and_ignores_siblings(client, s3_client, bucket: str, tmp_path: Path) -> None:
    for key in ["m/config.json", "m/sub/w.bin", "m/", "m2/other.json"]:
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    written = download_prefix(client, f"s3://{bucket}/m", tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == ["config.json", "sub/w.bin"]
    assert (tmp_path / "sub" / "w.bin").read_bytes() == b"m/sub/w.bin"


def test_download_prefix_of_nothing_is_an_error(client, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match=f"no objects under s3://{bucket}/absent/.*bucket '{bucket}'"):
        download_prefix(client, f"s3://{bucket}/absent/", tmp_path)


def test_missing_bucket_and_key_errors_name_uri_and_bucket(client, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="s3://no-such-bucket/x.jsonl: bucket 'no-such-bucket' does not exist"):
        download_file(client, "s3://no-such-bucket/x.jsonl", tmp_path / "x")
    with pytest.raises(TrainerError, match=f"s3://{bucket}/x.jsonl: no such object in bucket '{bucket}'"):
        download_file(client, f"s3://{bucket}/x.jsonl", tmp_path / "x")


def test_unreachable_endpoint_points_at_storage_endpoint(s3_client, tmp_path: Path, unused_port) -> None:
    dead = make_client(StorageConfig(endpoint=f"http://127.0.0.1:{unused_port()}"))
    with pytest.raises(TrainerError, match="cannot reach the S3 endpoint.*storage.endpoint"):
        download_file(dead, "s3://models/x", tmp_path / "x")


def test_upload_then_download_round_trips(client, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_text("hello")
    upload_file(client, source, f"s3://{bucket}/dir/a.txt")
    assert download_file(client, f"s3://{bucket}/dir/a.txt", tmp_path / "out" / "a.txt").read_text() == "hello"


class RecordingClient:
    """Wraps a real client and records the order of uploads."""

    def __init__(self, inner) -> None:
        self.inner, self.keys = inner, []

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        self.keys.append(key)
        self.inner.upload_file(filename, bucket, key)


def test_publish_uploads_files_then_manifest_last_with_matching_digests(client, s3_client, bucket: str, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    config = parse_config({
        "schemaVersion": 1,
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {"uri": "s3://datasets/q/train.jsonl"},
        "output": {"adapterUri": f"s3://{bucket}/out"},
    })
    recorder = RecordingClient(client)
    publish_adapter(recorder, adapter, config, {"finalLoss": 1.5, "steps": 3})

    assert recorder.keys == ["out/adapter_config.json", "out/adapter_model.safetensors", "out/manifest.json"]
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    for entry in manifest["files"]:
        body = s3_client.get_object(Bucket=bucket, Key=f"out/{entry['path']}")["Body"].read()
        assert (entry["size"], entry["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert manifest["baseModel"] == {"uri": "s3://models/tiny-llama/"}
    assert manifest["results"] == {"finalLoss": 1.5, "steps": 3}
    assert manifest["trainerConfig"]["output"]["adapterUri"] == f"s3://{bucket}/out/"
    assert manifest["trainerConfig"]["training"]["globalBatchSize"] == 8
    assert manifest["kubetuneVersion"] and manifest["createdAt"]

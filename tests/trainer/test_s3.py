"""S3 helpers and adapter publishing against a real moto server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import pytest

from kubetune.api.spec import Storage
from kubetune.api.trainer_config import parse_config
from kubetune.trainer.errors import ConfigError, TrainerError
from kubetune.trainer.publish import publish_adapter, staging_uri
from kubetune.trainer.s3 import download_file, download_prefix, make_client, parse_s3_uri, upload_file


@pytest.fixture
def bucket(s3_client, request: pytest.FixtureRequest) -> str:
    name = ("t-" + request.node.name.replace("_", "-").lower()[:50]).rstrip("-")  # a valid bucket name
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def client(moto_endpoint: str, s3_client):
    return make_client(Storage(endpoint=moto_endpoint))


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
    dead = make_client(Storage(endpoint=f"http://127.0.0.1:{unused_port()}"))
    with pytest.raises(TrainerError, match="cannot reach the S3 endpoint.*storage.endpoint"):
        download_file(dead, "s3://models/x", tmp_path / "x")


def test_upload_then_download_round_trips(client, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_text("hello")
    upload_file(client, source, f"s3://{bucket}/dir/a.txt")
    assert download_file(client, f"s3://{bucket}/dir/a.txt", tmp_path / "out" / "a.txt").read_text() == "hello"


class RecordingClient:
    """Wraps a real client and records every write (upload, put, copy, delete) in order."""

    WRITES: ClassVar = {"upload_file": 2, "put_object": "Key", "copy": 2, "delete_object": "Key", "delete_objects": "Delete"}

    def __init__(self, inner) -> None:
        self.inner, self.writes = inner, []

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)
        if name not in self.WRITES:
            return method

        def recorded(*args, **kwargs):
            where = self.WRITES[name]
            target = args[where] if isinstance(where, int) else kwargs[where]
            if name == "delete_objects":
                target = [obj["Key"] for obj in target["Objects"]]
            self.writes.append((name, target))
            return method(*args, **kwargs)

        return recorded


def _adapter(tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    return adapter


def _config(bucket: str, folder: str = "out", uid: str = "uid-a", overwrite: bool = False):
    return parse_config({
        "schemaVersion": 1,
        "job": {"namespace": "team", "name": "job-a", "uid": uid},
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {"uri": "s3://datasets/q/train.jsonl"},
        "output": {"adapterUri": f"s3://{bucket}/{folder}", "overwrite": overwrite},
    })


def test_publish_stages_verifies_copies_then_writes_the_manifest_last(client, s3_client, bucket: str, tmp_path: Path) -> None:
    recorder = RecordingClient(client)
    published = publish_adapter(recorder, _adapter(tmp_path), _config(bucket), {"finalLoss": 1.5, "steps": 3})

    # The publish lock beside adapterUri: taken before the first change under it, renewed before
    # each, released after the manifest (tests/chaos/test_s3_faults.py races two publishers).
    locking = [index for index, (_, key) in enumerate(recorder.writes) if key == "out.staging-lock"]
    assert [recorder.writes[index][0] for index in locking] == ["put_object"] * 5 + ["delete_object"]
    writes = [write for index, write in enumerate(recorder.writes) if index not in locking]
    kinds = [kind for kind, _ in writes]
    assert kinds == ["upload_file", "upload_file", "copy", "copy", "put_object", "delete_objects"], recorder.writes
    assert [kind for kind, _ in recorder.writes[locking[0] - 2: locking[-1] + 1]] == [
        "upload_file", "upload_file", "put_object", "put_object", "put_object", "copy", "put_object", "copy",
        "put_object", "put_object", "delete_object"]
    staged = [key for kind, key in recorder.writes if kind == "upload_file"]
    assert all(key.startswith("out.staging-") for key in staged)  # beside adapterUri, not inside it
    assert [key for kind, key in writes if kind in ("copy", "put_object")] == [
        "out/adapter_config.json", "out/adapter_model.safetensors", "out/manifest.json"]
    assert sorted(recorder.writes[-1][1]) == sorted(staged)
    listed = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {"out/adapter_config.json", "out/adapter_model.safetensors", "out/manifest.json"}

    document = s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read()
    manifest = json.loads(document)
    assert published.sha256 == hashlib.sha256(document).hexdigest()  # for the termination message
    assert published.manifest == manifest
    assert manifest["job"] == {"namespace": "team", "name": "job-a", "uid": "uid-a"}  # who published it
    for entry in manifest["files"]:
        body = s3_client.get_object(Bucket=bucket, Key=f"out/{entry['path']}")["Body"].read()
        assert (entry["size"], entry["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert manifest["baseModel"] == {"uri": "s3://models/tiny-llama/"}
    assert manifest["results"] == {"finalLoss": 1.5, "steps": 3}
    assert manifest["trainerConfig"]["output"]["adapterUri"] == f"s3://{bucket}/out/"
    assert manifest["trainerConfig"]["training"]["globalBatchSize"] == 8
    assert manifest["kubetuneVersion"] and manifest["createdAt"]


class CorruptingClient(RecordingClient):
    """Stores a different body than the file it is given for one object, as a faulty proxy would."""

    def __init__(self, inner, victim: str, tmp_path: Path) -> None:
        super().__init__(inner)
        self.victim, self.tmp_path = victim, tmp_path

    def upload_file(self, filename: str, bucket: str, key: str, **kwargs) -> None:
        if key.endswith(self.victim):
            truncated = self.tmp_path / "truncated"
            truncated.write_bytes(Path(filename).read_bytes()[:-1])
            filename = str(truncated)
        self.writes.append(("upload_file", key))
        self.inner.upload_file(filename, bucket, key, **kwargs)


def test_failed_verification_publishes_nothing_and_cleans_up(client, s3_client, bucket: str, tmp_path: Path) -> None:
    # An older adapter's manifest is already there: it must survive a failed re-publish untouched.
    s3_client.put_object(Bucket=bucket, Key="out/manifest.json", Body=b'{"old": true}')
    corrupting = CorruptingClient(client, "adapter_model.safetensors", tmp_path)

    mismatch = r"adapter_model.safetensors: uploaded object does not match .*size 799 vs 800.*not published"
    with pytest.raises(TrainerError, match=mismatch) as raised:
        publish_adapter(corrupting, _adapter(tmp_path), _config(bucket, overwrite=True), {"steps": 3})
    assert raised.value.exit_code == 1  # maybe a flaky proxy: worth a restart

    listed = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {"out/manifest.json"}  # nothing copied into place, staging removed
    assert s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read() == b'{"old": true}'
    assert not [kind for kind, _ in corrupting.writes if kind in ("copy", "put_object")]


def test_republishing_removes_the_old_manifest_before_files_change(client, s3_client, bucket: str, tmp_path: Path) -> None:
    s3_client.put_object(Bucket=bucket, Key="out/manifest.json", Body=b'{"old": true}')
    recorder = RecordingClient(client)
    publish_adapter(recorder, _adapter(tmp_path), _config(bucket, overwrite=True), {"steps": 3})
    kinds = [kind for kind, _ in recorder.writes]
    assert kinds.index("delete_object") < kinds.index("copy")
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["results"] == {"steps": 3}


def test_another_jobs_adapter_is_replaced_only_with_overwrite(client, s3_client, bucket: str, tmp_path: Path) -> None:
    publish_adapter(client, _adapter(tmp_path), _config(bucket, uid="uid-a"), {"steps": 1})
    before = s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read()

    # Another job (another uid) aimed at the same adapterUri: refused before any write.
    recorder = RecordingClient(client)
    with pytest.raises(ConfigError) as raised:
        publish_adapter(recorder, tmp_path / "adapter", _config(bucket, uid="uid-b"), {"steps": 2})
    assert str(raised.value) == (
        f"spec.output.adapterUri s3://{bucket}/out/ already holds a published adapter (manifest.json of job "
        "team/job-a uid uid-a); set spec.output.overwrite: true to replace it, or choose another adapterUri")
    assert raised.value.exit_code == 78
    assert recorder.writes == []
    assert s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read() == before

    # The same job again (a restart after it published) replaces its own adapter.
    publish_adapter(client, tmp_path / "adapter", _config(bucket, uid="uid-a"), {"steps": 3})
    assert _published(s3_client, bucket)["results"] == {"steps": 3}
    # With overwrite the other job may replace it, and then owns it.
    publish_adapter(client, tmp_path / "adapter", _config(bucket, uid="uid-b", overwrite=True), {"steps": 4})
    assert (_published(s3_client, bucket)["results"], _published(s3_client, bucket)["job"]["uid"]) == (
        {"steps": 4}, "uid-b")


def test_a_manifest_that_names_no_job_belongs_to_no_job(client, s3_client, bucket: str, tmp_path: Path) -> None:
    s3_client.put_object(Bucket=bucket, Key="out/manifest.json", Body=b"not json")
    with pytest.raises(ConfigError, match=r"holds a published adapter \(a manifest.json that names no kubetune job\)"):
        publish_adapter(client, _adapter(tmp_path), _config(bucket, uid=""), {"steps": 1})


def test_an_adapter_uri_at_a_bucket_root_is_staged_inside_that_bucket(client, s3_client, bucket: str,
                                                                     tmp_path: Path) -> None:
    assert staging_uri(f"s3://{bucket}/").startswith(f"s3://{bucket}/.kubetune-staging-")
    assert staging_uri(f"s3://{bucket}/a/b/").startswith(f"s3://{bucket}/a/b.staging-")
    buckets = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    recorder = RecordingClient(client)

    publish_adapter(recorder, _adapter(tmp_path), _config(bucket, folder=""), {"steps": 3})

    staged = [key for kind, key in recorder.writes if kind == "upload_file"]
    assert staged and all(key.startswith(".kubetune-staging-") for key in staged), recorder.writes
    assert {b["Name"] for b in s3_client.list_buckets()["Buckets"]} == buckets
    listed = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}  # staging removed


def _published(s3_client, bucket: str) -> dict:
    return json.loads(s3_client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())

"""Chaos table, row 6: S3 faults.

The trainer's own S3 code (``s3.py``, ``checkpoint.py``, ``publish.py``) against the local S3
(moto in a child process, as the local cluster runs it, with its SigV4 signature checks on)
behind a :class:`FaultProxy` that answers 500 InternalError and 503 SlowDown, resets
connections before S3 saw a request and after it acted (the answer lost), answers later than
the client's read timeout, never answers, and cuts download bodies short (a clean close, or a
reset: a network cut mid-download).

Every trial ends one of two ways: the operation completed and what it wrote or read is
byte-identical to its source, or it raised a TrainerError (transient: a restart may cure it).
Whatever a failed one left in S3 is never taken for more than it is: no checkpoint resumed
without its COMPLETE marker, no adapter file that disagrees with a visible manifest.json. Each
operation has its own client, as a pod would (boto's retry quota is per client), with the
trainer's retry settings; only the read timeout and boto's back-off are shortened here so that
a timeout costs a second, not minutes.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.retries.standard import ExponentialBackoff
from chaos_table import ChaosTable, trials
from faultproxy import Fault, FaultProxy, s3_error

from kubetune.api.spec import Storage
from kubetune.api.trainer_config import TrainerConfig, parse_config
from kubetune.localcluster.s3server import S3Server
from kubetune.trainer.errors import ConfigError, TrainerError
from kubetune.trainer.publish import MANIFEST_NAME, publish_adapter
from kubetune.trainer.s3 import make_client

READ_TIMEOUT = 1.0
"""The client's read timeout here (the trainer's is 120 s): a late answer costs a second."""
BUCKETS = ("models", "datasets", "ckpt", "adapters")


@dataclass
class Store:
    endpoint: str
    keys: dict[str, str]

    def client(self, endpoint: str | None = None, **storage: Any):
        """A trainer client (make_client) for ``endpoint`` (default: S3 itself, no faults)."""
        return make_client(Storage(endpoint=endpoint or self.endpoint, **storage), read_timeout=READ_TIMEOUT,
                           **self.keys)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The local S3 with signature checks on: a request the proxy altered would get a 403."""
    server = S3Server.start(["127.0.0.1"], str(tmp_path_factory.mktemp("s3") / "s3.log"))
    try:
        endpoint = server.url("127.0.0.1")
        requests.post(f"{endpoint}/moto-api/reset-auth", data="4", timeout=10).raise_for_status()
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="unused", aws_secret_access_key="unused")
        iam.create_user(UserName="chaos")
        iam.put_user_policy(UserName="chaos", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="chaos")["AccessKey"]
        keys = {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
        found = Store(endpoint, keys)
        client = found.client()
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        yield found
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto's retry back-off at 1/20 (50 ms, not 1 s, for a SlowDown): same retries, less waiting."""
    monkeypatch.setattr(ExponentialBackoff, "_DEFAULT_BACKOFF_CONFIG",
                        {"throttling_base_scale": 0.05, "non_throttling_base_scale": 0.0025})


@pytest.fixture
def proxy(store: Store) -> Iterator[FaultProxy]:
    with FaultProxy(store.endpoint, seed=6) as running:
        yield running


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def get(client, uri: str) -> bytes | None:
    bucket, _, key = uri[len("s3://"):].partition("/")
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


# ---- two publishers race for one adapterUri ----------------------------------------------


def adapter_files(rng: random.Random) -> dict[str, bytes]:
    """An adapter folder's files, different every call (sizes and bytes)."""
    return {
        "adapter_config.json": json.dumps({"r": rng.choice([4, 8, 16]), "nonce": rng.random()}).encode(),
        "adapter_model.safetensors": rng.randbytes(rng.randrange(20_000, 200_000)),
        "tokenizer.json": rng.randbytes(rng.randrange(1_000, 20_000)),
    }


def write_adapter(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def job_config(adapter_uri: str, uid: str, *, overwrite: bool = False) -> TrainerConfig:
    return parse_config({
        "schemaVersion": 1,
        "job": {"namespace": "chaos", "name": f"job-{uid}", "uid": uid},
        "model": {"uri": "s3://models/m/"},
        "dataset": {"uri": "s3://datasets/d.jsonl"},
        "output": {"adapterUri": adapter_uri, "overwrite": overwrite},
    })


def consistent_view(client, adapter_uri: str) -> tuple[bool, str | None]:
    """What a careful reader sees: (True, uid) when the manifest it read before and after the
    files is the same one and the files match it; (True, None) for no adapter or a view a
    publisher changed meanwhile (the reader would read again); (False, uid) for a mix."""
    before = get(client, adapter_uri + MANIFEST_NAME)
    if before is None:
        return True, None
    manifest = json.loads(before)
    found = {entry["path"]: get(client, adapter_uri + entry["path"]) for entry in manifest["files"]}
    if get(client, adapter_uri + MANIFEST_NAME) != before:
        return True, None
    matches = all(body is not None and sha256(body) == entry["sha256"]
                  for entry in manifest["files"] for body in [found[entry["path"]]])
    return matches, manifest["job"]["uid"]


def test_two_publishers_racing_for_one_adapter_uri(store: Store, proxy: FaultProxy, tmp_path: Path,
                                                    chaos_table: ChaosTable) -> None:
    """Two jobs publish different adapters to one adapterUri at once, a reader polling all the
    while. Exactly one manifest is left, the files always match the manifest a reader sees, and
    the loser fails with a clear error (overwrite off: the winner's adapter is another job's)
    or, with overwrite on, publishes after the winner, replacing its adapter whole."""
    row = chaos_table.row("Two publishers race for one adapterUri (a reader polls)", figure="s per race")
    rng = random.Random(66)
    # Small random delays on requests shuffle how the two publishers' requests interleave.
    proxy.add(Fault("delay", seconds=0.01, probability=0.3), Fault("delay", seconds=0.03, probability=0.1))
    direct = store.client()
    for trial in range(trials(full=20, fast=1)):
        uri = f"s3://adapters/race-{trial}/"
        overwrite = trial % 2 == 1
        contenders = {uid: (write_adapter(tmp_path / f"{trial}-{uid}", adapter_files(rng)),
                            job_config(uri, uid, overwrite=overwrite)) for uid in ("uid-a", "uid-b")}
        outcome: dict[str, BaseException | None] = {}
        start = threading.Barrier(3)
        done = threading.Event()
        views: list[tuple[bool, str | None]] = []

        def publish(uid: str) -> None:
            folder, config = contenders[uid]
            client = store.client(proxy.url)
            start.wait()
            try:
                publish_adapter(client, folder, config, {"steps": 1})
                outcome[uid] = None
            except BaseException as exc:  # noqa: BLE001 - judged below
                outcome[uid] = exc

        def read() -> None:
            start.wait()
            while not done.is_set():
                views.append(consistent_view(direct, uri))

        threads = [threading.Thread(target=publish, args=(uid,)) for uid in contenders]
        threads.append(threading.Thread(target=read))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads[:2]:
            thread.join(120)
        seconds = time.monotonic() - started
        done.set()
        threads[2].join(30)

        print(f"race {trial} (overwrite {overwrite}): {seconds:.2f}s, {len(views)} reads, outcomes {outcome}")
        mixed = sum(not ok for ok, _ in views)
        final_ok, final_uid = consistent_view(direct, uri)
        winners = [uid for uid, exc in outcome.items() if exc is None]
        losers = {uid: exc for uid, exc in outcome.items() if exc is not None}
        clear = all(isinstance(exc, TrainerError) for exc in losers.values())
        if overwrite:  # both may publish, one after the other; the later one's adapter is left
            expected = bool(winners) and final_uid in winners and clear
        else:
            expected = (len(winners) == 1 and final_uid == winners[0] and clear
                        and all(isinstance(exc, ConfigError) or "publish" in str(exc) for exc in losers.values()))
        survived = mixed == 0 and final_ok and final_uid is not None and expected
        row.record(survived, lost=mixed + (not final_ok), figure=seconds,
                   note=f"trial {trial} overwrite={overwrite}: {mixed} mixed views of {len(views)}, final "
                        f"{final_uid} ok={final_ok}, outcomes {outcome}")
    assert row.survived == row.trials, row.notes


# ---- faults on download, checkpoint and publish ----------------------------------------

SCENARIOS: dict[str, Callable[[random.Random], list[Fault]]] = {
    "500 InternalError x2": lambda rng: [s3_error(500, "InternalError", "We encountered an internal error. "
                                                  "Please try again.", times=2)],
    "503 SlowDown x3": lambda rng: [s3_error(503, "SlowDown", "Please reduce your request rate.", times=3)],
    "reset before S3 saw the request x2": lambda rng: [Fault("reset", times=2)],
    "reset after S3 acted (answer lost) x2": lambda rng: [Fault("reset", forward=True, times=2)],
    "answer after the read timeout (S3 acted)": lambda rng: [
        Fault("delay", seconds=READ_TIMEOUT + 0.5, forward=True, times=1)],
    "no answer at all (blackhole)": lambda rng: [Fault("blackhole", times=1)],
    "download body cut short (clean close)": lambda rng: [
        Fault("truncate", method="GET", after_bytes=rng.randrange(0, 5000), times=2)],
    "network cut mid-download (reset after N bytes)": lambda rng: [
        Fault("truncate", method="GET", rst=True, after_bytes=rng.randrange(1000, 3_000_000), times=2)],
    "flaky: a third of requests 500, reset or cut": lambda rng: [
        s3_error(500, "InternalError", "We encountered an internal error.", probability=0.1),
        Fault("reset", probability=0.1), Fault("reset", forward=True, probability=0.1),
        Fault("truncate", method="GET", rst=True, after_bytes=rng.randrange(0, 100_000), probability=0.1)],
    "S3 down: every request 503": lambda rng: [s3_error(503, "ServiceUnavailable", "Service is unable to "
                                                        "handle request.")],
}
"""Each trial injects one scenario. All but the last two are bounded (fewer faults than boto's
five attempts): the operation must complete. "Flaky" may exhaust retries; "S3 down" must fail."""
MUST_COMPLETE = set(list(SCENARIOS)[:-2])
MUST_FAIL = {"S3 down: every request 503"}
"""(Scenarios a test adds for its own operation are in neither set: that test judges them.)"""


def judge(row, scenario: str, error: BaseException | None, problems: list[str], seconds: float,
          proxy: FaultProxy) -> None:
    """Record a trial: survived when its invariants hold and it ended as the scenario allows."""
    fired = sum(seen.fault is not None for seen in proxy.seen)
    if not fired and scenario in MUST_COMPLETE | MUST_FAIL:
        problems.append("no fault was injected: the scenario matched no request")
    print(f"{row.fault} | {scenario}: {fired} faults in {len(proxy.seen)} requests, {seconds:.2f}s, "
          f"{'completed' if error is None else f'{type(error).__name__}: {error}'}")
    if error is not None and not isinstance(error, TrainerError):
        problems.append(f"raised {type(error).__name__} (not a TrainerError): {error}")
    if error is None and scenario in MUST_FAIL:
        problems.append("completed although every request failed")
    if error is not None and scenario in MUST_COMPLETE:
        problems.append(f"failed although boto's retries outnumber the faults: {error}")
    corrupt = sum(p.startswith("CORRUPT") for p in problems)
    row.record(not problems, lost=corrupt, figure=seconds, note=f"{scenario}: {'; '.join(problems)}")


def each_scenario(rounds: int, **extra: Callable[[random.Random], list[Fault]]) -> Iterator[
        tuple[int, str, list[Fault]]]:
    """(trial number, scenario, its faults) for every scenario (and ``extra`` ones), ``rounds`` times."""
    scenarios = {**SCENARIOS, **extra}
    for trial in range(rounds):
        for number, (scenario, faults) in enumerate(scenarios.items()):
            yield trial * len(scenarios) + number, scenario, faults(random.Random(f"{trial}-{scenario}"))


@pytest.fixture(scope="module")
def model_source(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A model folder (one file above boto's 8 MiB multipart threshold: ranged, parallel GETs)
    and a dataset, in S3; {key: bytes}."""
    rng = random.Random(6)
    files = {
        "models/m/config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode(),
        "models/m/tokenizer.json": rng.randbytes(60_000),
        "models/m/model.safetensors": rng.randbytes(9 * 2**20 + 12345),
        "datasets/d.jsonl": b"".join(json.dumps({"text": f"example {i}"}).encode() + b"\n" for i in range(3000)),
    }
    client = store.client()
    for key, data in files.items():
        bucket, _, name = key.partition("/")
        client.put_object(Bucket=bucket, Key=name, Body=data)
    return files


def test_model_and_data_downloads_under_s3_faults(store: Store, proxy: FaultProxy, model_source: dict[str, bytes],
                                                  tmp_path: Path, chaos_table: ChaosTable) -> None:
    """download_prefix (the model) and download_file (the dataset), as a worker starts: every
    file is byte-identical, or the download raised a TrainerError and no file it left holds
    other bytes than its source (boto writes a temporary name and renames it when complete)."""
    from kubetune.trainer.s3 import download_file, download_prefix

    row = chaos_table.row("S3 faults on model + data download", figure="s per download")
    every_body_cut = "every download body cut (reset after 100 bytes)"
    for number, scenario, faults in each_scenario(trials(full=10, fast=1), **{
            every_body_cut: lambda rng: [Fault("truncate", method="GET", path="/models/m/.", rst=True,
                                               after_bytes=100)]}):
        proxy.clear()
        proxy.seen.clear()
        proxy.add(*faults)
        dest = tmp_path / f"d{number}"
        started, error = time.monotonic(), None
        try:
            client = store.client(proxy.url)
            download_prefix(client, "s3://models/m/", dest / "model")
            download_file(client, "s3://datasets/d.jsonl", dest / "data.jsonl")
        except BaseException as exc:  # noqa: BLE001 - judged below
            error = exc
        seconds = time.monotonic() - started
        proxy.clear()
        expected = {f"model/{key.removeprefix('models/m/')}" if key.startswith("models/") else "data.jsonl": data
                    for key, data in model_source.items()}
        problems = []
        found = {path.relative_to(dest).as_posix(): path for path in dest.rglob("*") if path.is_file()}
        for name, path in found.items():
            if name not in expected:
                problems.append(f"left a stray file {name}")
            elif path.read_bytes() != expected[name]:
                problems.append(f"CORRUPT: {name} differs from its source")
        if error is None and set(found) != set(expected):
            problems.append(f"completed without {sorted(set(expected) - set(found))}")
        if scenario == every_body_cut and "download kept breaking off" not in str(error):
            problems.append(f"ended with {error!r}, not an error saying the download kept breaking off")
        judge(row, scenario, error, problems, seconds, proxy)
    assert row.survived == row.trials, row.notes


class Engine:
    """DeepSpeed's part in a checkpoint, as checkpoint.py uses it: save_checkpoint writes the
    model states (with the client state) and an optimizer shard above boto's multipart
    threshold; load_checkpoint reads them back and says whether they are the bytes it wrote."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.written, self.corrupt = rng, {}, []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, **_: Any) -> None:
        import torch

        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, folder / "mp_rank_00_model_states.pt")
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(self.rng.randbytes(8 * 2**20 + 4321))
        self.written[tag] = {p.name: sha256(p.read_bytes()) for p in folder.iterdir()}

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict]:
        import torch

        folder = Path(load_dir) / tag
        found = {p.name: sha256(p.read_bytes()) for p in folder.iterdir()}
        if found != self.written[tag]:
            self.corrupt.append(tag)  # DeepSpeed itself might not notice: the test does
            raise ValueError(f"{tag}: files differ from the ones saved")
        return str(folder), torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """checkpoint.py's collectives, in a gloo group of one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_checkpoint_save_and_resume_under_s3_faults(store: Store, proxy: FaultProxy, process_group: None,
                                                    tmp_path: Path, chaos_table: ChaosTable) -> None:
    """Step 1 is saved without faults; step 2 is saved and the job resumed under the scenario,
    then resumed again once S3 is well. A checkpoint counts as complete only with its COMPLETE
    marker, and then every file of it is the one written; resuming picks step 2 only if it is
    complete, else step 1, never a corrupt file; save reports complete only if it is."""
    from kubetune.trainer.checkpoint import COMPLETE, Checkpointer, Position
    from kubetune.trainer.s3 import delete_prefix, list_keys

    row = chaos_table.row("S3 faults on checkpoint save (+ COMPLETE marker) and resume", figure="s per save+resume")
    direct = store.client()
    marker_lost = "COMPLETE marker never written (its every PUT 503)"
    for number, scenario, faults in each_scenario(trials(full=10, fast=1), **{
            marker_lost: lambda rng: [s3_error(503, "SlowDown", "Please reduce your request rate.", method="PUT",
                                               path=f"/{COMPLETE}$")]}):
        uri = f"s3://ckpt/job-{number}/"
        engine = Engine(random.Random(number))
        problems: list[str] = []

        def checkpointer(client) -> Checkpointer:
            return Checkpointer(client, uri, 2, tmp_path / f"scratch-{number}", rank=0, local_rank=0,
                                local_world_size=1)

        def state(step: int) -> dict:
            return {"position": Position(step, 0, 4 * step), "trainer_state": {"steps": step},
                    "rank_state": {"window": [step]}}

        well = checkpointer(direct)
        well.save(engine, **state(1))
        assert well.finish()
        proxy.clear()
        proxy.seen.clear()
        proxy.add(*faults)
        started, error, completed, resumed = time.monotonic(), None, None, None
        try:
            faulty = checkpointer(store.client(proxy.url))
            faulty.save(engine, **state(2))
            completed = faulty.finish()
            resumed = faulty.resume(engine)
        except BaseException as exc:  # noqa: BLE001 - judged below
            error = exc
        seconds = time.monotonic() - started
        proxy.clear()

        keys = list_keys(direct, uri)
        marked = f"step-2/{COMPLETE}" in keys
        if completed and not marked:
            problems.append("finish() said step 2 is complete but it has no COMPLETE marker")
        if marked:  # complete: every file of it is the one written
            local = {"step-2/" + name: digest for name, digest in engine.written["step-2"].items()}
            for key, digest in local.items():
                body = get(direct, uri + key.replace("step-2/", "step-2/step-2/"))
                if body is None or sha256(body) != digest:
                    problems.append(f"CORRUPT: {key} is complete but holds other bytes")
        if resumed is not None and resumed.position.step == 2 and not marked:
            problems.append("CORRUPT: resumed from step 2 without its COMPLETE marker")
        again = checkpointer(direct).resume(engine)
        if again is None or again.position.step != (2 if marked else 1):
            problems.append(f"once S3 is well, resumed {again and again.position} (step 2 marked: {marked})")
        problems += [f"CORRUPT: {tag} reached the loader with other bytes" for tag in engine.corrupt]
        if scenario == marker_lost and (completed or marked):
            problems.append("step 2 counts as complete without its marker")
        if error is None and scenario in MUST_FAIL and not completed:
            error = TrainerError("the checkpoint was reported incomplete")  # what a save under a dead S3 does
        judge(row, scenario, error if error or completed else TrainerError("step 2 not completed"), problems,
              seconds, proxy)
        delete_prefix(direct, uri)
    assert row.survived == row.trials, row.notes


def test_publish_under_s3_faults(store: Store, proxy: FaultProxy, tmp_path: Path, chaos_table: ChaosTable) -> None:
    """A job republishes over its own earlier adapter under the scenario: then either the new
    adapter is there whole, or publish raised a TrainerError and whatever manifest.json is
    visible (the old one, the new one, or none) matches the files beside it. The job's restart
    (no faults) then publishes: nothing a failed attempt left (its lock, its staging) is in
    the way."""
    row = chaos_table.row("S3 faults on adapter publish (staging, copy, manifest last)", figure="s per publish")
    direct = store.client()
    manifest_lost = "manifest.json never written (its every PUT 503)"
    lock_answers_lost = "the publish lock's writes land, their answers are lost x3"
    for number, scenario, faults in each_scenario(trials(full=10, fast=1), **{
            manifest_lost: lambda rng: [s3_error(503, "SlowDown", "Please reduce your request rate.", method="PUT",
                                                 path=f"/{MANIFEST_NAME}$")],
            lock_answers_lost: lambda rng: [Fault("reset", forward=True, method="PUT", path=r"\.staging-lock$",
                                                  times=3)]}):
        rng = random.Random(number)
        uri = f"s3://adapters/faults-{number}/"
        config = job_config(uri, "uid-same")
        publish_adapter(direct, write_adapter(tmp_path / f"{number}-old", adapter_files(rng)), config, {"steps": 1})
        new = write_adapter(tmp_path / f"{number}-new", adapter_files(rng))
        proxy.clear()
        proxy.seen.clear()
        proxy.add(*faults)
        started, error, published = time.monotonic(), None, None
        try:
            published = publish_adapter(store.client(proxy.url), new, config, {"steps": 2})
        except BaseException as exc:  # noqa: BLE001 - judged below
            error = exc
        seconds = time.monotonic() - started
        proxy.clear()

        problems = []
        ok, _ = consistent_view(direct, uri)
        if not ok:
            problems.append("CORRUPT: the visible manifest.json does not match the files beside it")
        document = get(direct, uri + MANIFEST_NAME)
        if published is not None and (document is None or sha256(document) != published.sha256):
            problems.append("publish returned but its manifest.json is not the one in S3")
        if scenario == manifest_lost and document is not None and json.loads(document)["results"]["steps"] == 2:
            problems.append("a manifest.json appeared although none could be written")
        try:  # the job's restart
            publish_adapter(direct, new, config, {"steps": 2})
            if consistent_view(direct, uri) != (True, "uid-same"):
                problems.append("CORRUPT: the restart's publish left a manifest.json that does not match")
        except TrainerError as exc:
            problems.append(f"the restart could not publish: {exc}")
        if scenario == lock_answers_lost and error is not None:
            problems.append(f"a lock write of its own, whose answer was lost, stopped the publish: {error}")
        judge(row, scenario, error, problems, seconds, proxy)
    assert row.survived == row.trials, row.notes


# ---- the publish lock ---------------------------------------------------------------------


def test_a_lock_left_by_a_crashed_publisher_is_taken_over(store: Store, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock of an earlier attempt of the same job is taken over at once; another job's is
    waited for until it is released, or until it goes unrenewed for LOCK_STALE_SECONDS."""
    from kubetune.trainer import publish
    from kubetune.trainer.s3 import put_bytes

    monkeypatch.setattr(publish, "LOCK_STALE_SECONDS", 1.0)
    monkeypatch.setattr(publish, "LOCK_PAUSES", (0.05, 0.2))
    direct, rng = store.client(), random.Random(7)

    def leave_lock(uri: str, uid: str) -> str:
        lock = publish.lock_uri(uri)
        put_bytes(direct, json.dumps({"token": "crashed", "job": {"namespace": "chaos", "name": "x", "uid": uid}})
                  .encode(), lock)
        return lock

    def publish_timed(uri: str, uid: str) -> float:
        started = time.monotonic()
        publish_adapter(direct, write_adapter(tmp_path / f"{uri[-8:]}-{uid}", adapter_files(rng)),
                        job_config(uri, uid), {"steps": 1})
        assert consistent_view(direct, uri) == (True, uid)
        assert get(direct, publish.lock_uri(uri)) is None  # released
        return time.monotonic() - started

    leave_lock("s3://adapters/lock-same/", "uid-a")
    assert publish_timed("s3://adapters/lock-same/", "uid-a") < 1.0  # an earlier attempt's: taken at once

    leave_lock("s3://adapters/lock-stale/", "uid-x")
    assert publish_timed("s3://adapters/lock-stale/", "uid-a") >= 1.0  # waited until it was stale

    lock = leave_lock("s3://adapters/lock-held/", "uid-x")
    monkeypatch.setattr(publish, "LOCK_STALE_SECONDS", 60.0)
    threading.Timer(0.5, lambda: direct.delete_object(Bucket="adapters", Key=lock.split("/", 3)[3])).start()
    assert 0.5 <= publish_timed("s3://adapters/lock-held/", "uid-a") < 5.0  # waited until it was released


def test_a_publisher_that_lost_its_lock_writes_no_manifest(store: Store, tmp_path: Path) -> None:
    """Another publisher takes the lock while this one copies (this one went unrenewed too
    long, or the store ignores conditions): it stops with a clear error before its manifest."""
    from kubetune.trainer.publish import lock_uri
    from kubetune.trainer.s3 import put_bytes

    direct, uri = store.client(), "s3://adapters/lock-lost/"

    class TakenOverMidway:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            if name == "copy":
                put_bytes(direct, b'{"token": "other", "job": {"name": "other", "uid": "uid-x"}}', lock_uri(uri))
            return getattr(self.inner, name)

    folder = write_adapter(tmp_path / "a", adapter_files(random.Random(8)))
    with pytest.raises(TrainerError, match=r"another publisher took the publish lock .*job \?/other uid uid-x.*"
                                           r"stopped before writing manifest.json"):
        publish_adapter(TakenOverMidway(direct), folder, job_config(uri, "uid-a"), {"steps": 1})
    assert get(direct, uri + MANIFEST_NAME) is None
    assert get(direct, lock_uri(uri)) is not None  # the other publisher's, left alone


def test_a_store_without_conditional_writes_publishes_unlocked(store: Store, proxy: FaultProxy, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    proxy.add(s3_error(501, "NotImplemented", "A header you provided implies functionality that is not implemented",
                       method="PUT", path=r"\.staging-lock$"))
    uri = "s3://adapters/no-conditions/"
    folder = write_adapter(tmp_path / "a", adapter_files(random.Random(9)))
    publish_adapter(store.client(proxy.url), folder, job_config(uri, "uid-a"), {"steps": 1})
    assert consistent_view(store.client(), uri) == (True, "uid-a")
    assert "does not implement conditional writes" in caplog.text and "without a lock" in caplog.text


# ---- storage.checksums --------------------------------------------------------------------

CHECKSUM_HEADERS = ("x-amz-checksum-", "x-amz-sdk-checksum-algorithm", "x-amz-trailer")


@pytest.mark.parametrize("checksums", ["when_required", "when_supported"])
def test_checksum_setting_decides_the_checksum_headers(store: Store, proxy: FaultProxy, tmp_path: Path,
                                                       checksums: str) -> None:
    """when_required (the default): uploads (one request, and multipart) carry no checksum
    header and downloads ask for no validation, as S3-compatible stores without them expect;
    when_supported: boto's CRC32 on every upload and checksum mode on downloads."""
    from kubetune.trainer.s3 import download_file, put_bytes, upload_file

    client = store.client(proxy.url, checksums=checksums)
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"x" * 1000)
    large.write_bytes(random.Random(10).randbytes(9 * 2**20))  # multipart: CreateMultipartUpload, UploadPart
    upload_file(client, small, f"s3://adapters/checksums-{checksums}/small")
    upload_file(client, large, f"s3://adapters/checksums-{checksums}/large", metadata={"sha256": "..."})
    put_bytes(client, b"{}", f"s3://adapters/checksums-{checksums}/manifest.json")
    download_file(client, f"s3://adapters/checksums-{checksums}/small", tmp_path / "back")

    def checksummed(seen) -> bool:
        return any(name.lower().startswith(CHECKSUM_HEADERS) for name in seen.headers)

    uploads = [seen for seen in proxy.seen if seen.method in ("PUT", "POST") and "/checksums-" in seen.path
               and "uploadId=" not in seen.path or seen.method == "PUT" and "partNumber=" in seen.path]
    downloads = [seen for seen in proxy.seen if seen.method == "GET" and "/checksums-" in seen.path]
    assert len(uploads) >= 5 and downloads
    if checksums == "when_required":
        assert not [seen.path for seen in uploads if checksummed(seen)]
        assert not [seen.path for seen in downloads if "x-amz-checksum-mode" in {h.lower() for h in seen.headers}]
    else:
        assert all(checksummed(seen) for seen in uploads), [(s.path, s.headers) for s in uploads]
        assert all("x-amz-checksum-mode" in {h.lower() for h in seen.headers} for seen in downloads)


# ---- the proxy itself ---------------------------------------------------------------------


def test_the_proxy_streams_responses_chunk_by_chunk_and_keeps_the_host_header() -> None:
    """As a Kubernetes watch needs: each chunk reaches the client while the upstream is still
    writing (the upstream sends its second chunk only once the client has the first), and the
    upstream sees the Host header the client sent."""
    import http.server

    first_arrived, hosts, streamed = threading.Event(), [], []

    class Watch(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in (b'{"type": "ADDED"}\n', b'{"type": "MODIFIED"}\n'):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                streamed.append(first_arrived.wait(5))  # False: the proxy held the chunk back
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *_: Any) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Watch)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            response = requests.get(proxy.url + "/api/v1/pods?watch=true", stream=True, timeout=10)
            lines = response.iter_lines()
            assert next(lines) == b'{"type": "ADDED"}'
            first_arrived.set()
            assert next(lines) == b'{"type": "MODIFIED"}'
            assert streamed[0] is True
            assert hosts == [proxy.url.removeprefix("http://")]
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_signatures_stay_valid_through_the_proxy(store: Store, proxy: FaultProxy) -> None:
    """The local S3 here checks SigV4 signatures: the proxy's requests pass with the right keys
    (as in every test above), and the same request signed with a wrong secret does not."""
    from kubetune.trainer.errors import AccessError
    from kubetune.trainer.s3 import get_bytes, put_bytes

    put_bytes(store.client(proxy.url), b"signed", "s3://adapters/signed")
    assert get_bytes(store.client(proxy.url), "s3://adapters/signed") == b"signed"
    forged = make_client(Storage(endpoint=proxy.url), access_key=store.keys["access_key"], secret_key="wrong")
    with pytest.raises(AccessError, match="SignatureDoesNotMatch"):
        get_bytes(forged, "s3://adapters/signed")

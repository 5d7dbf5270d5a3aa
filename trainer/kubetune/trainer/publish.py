"""Publish the trained adapter to ``output.adapterUri`` atomically (rank 0 only).

A reader that sees no ``manifest.json`` sees no adapter, so publishing goes:

0. refuse when adapterUri already holds another job's adapter (a ``manifest.json`` whose
   ``job.uid`` is not this job's) and ``output.overwrite`` is off (:func:`check_may_publish`,
   which preflight runs too): one job's adapter is never lost to another's typo. Then draw
   ``loss.png`` (training and eval loss per step, plot.py) into the adapter folder, so it is
   published, verified and listed in the manifest like every other file;
1. upload every file to a staging prefix beside the target, ``<adapterUri>.staging-<id>/``
   (for an adapterUri at a bucket's root, ``.kubetune-staging-<id>/`` inside it: staging never
   leaves the bucket; :func:`staging_uri`), each object with its sha256 as user metadata;
2. verify the staged objects (HEAD: size and sha256) - a mismatch fails before anything
   under adapterUri changes;
3. take the publish lock of adapterUri (:class:`PublishLock`, an object written with
   If-None-Match beside it), waiting while another publisher holds it, and check step 0 again:
   two publishers racing for one adapterUri would otherwise interleave their copies and leave
   one's manifest beside the other's files (found by the chaos tests), or both pass step 0;
4. remove an older ``manifest.json`` under adapterUri (a re-run over an old adapter must not
   show the old manifest beside new files), then copy the files into place server-side,
   renewing the lock before each (a publisher that lost it stops before writing anything);
5. write ``manifest.json`` LAST (files with size + sha256, the job: namespace, name and uid,
   base model, resolved config, metrics, kubetune version); the sha256 of its bytes goes into
   the success termination message, so the operator knows which publish is its job's;
6. release the lock and delete the staging prefix (also on failure).

So a reader that reads manifest.json, then the files, then manifest.json again and finds it
unchanged has read one adapter whole (each file matches the manifest's sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.errors import ConfigError, TrainerError
from kubetune.trainer.plot import PLOT_NAME, render_loss_curve
from kubetune.trainer.s3 import (
    ConditionalWritesUnsupported, copy_object, delete_object, delete_prefix, get_bytes, get_object, head, join_uri,
    parse_s3_uri, put_bytes, put_if, upload_file,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kubetune.api.trainer_config import TrainerConfig

log = logging.getLogger("kubetune.trainer")

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
ROOT_STAGING_PREFIX = ".kubetune-staging-"
LOCK_SUFFIX = ".staging-lock"
"""The publish lock of ``s3://b/a/`` is ``s3://b/a.staging-lock``: in the staging namespace
beside adapterUri, so credentials that may stage an adapter may also lock it."""
LOCK_STALE_SECONDS = 600.0
"""A lock not renewed for this long is a crashed publisher's and is taken over: a live holder
renews it before every file it copies (server-side copies, seconds each)."""
LOCK_PAUSES = (0.2, 5.0)
"""First and longest pause (seconds) between tries while another publisher holds the lock."""


@dataclass(frozen=True)
class Published:
    manifest: dict[str, Any]
    sha256: str
    """sha256 hex of manifest.json's bytes as uploaded."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(adapter_dir: Path, config: TrainerConfig, results: dict[str, Any]) -> dict[str, Any]:
    """The manifest for the files in ``adapter_dir``: how the adapter was made and what it holds."""
    files = [
        {"path": path.relative_to(adapter_dir).as_posix(), "size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(adapter_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    ]
    return {
        "manifestVersion": MANIFEST_VERSION,
        "kind": "peft-lora-adapter",
        "job": config.job.model_dump(mode="json", by_alias=True),
        "baseModel": {"uri": config.model.uri},
        "dataset": {"uri": config.dataset.uri, "format": config.dataset.format},
        "files": files,
        "results": results,
        "trainerConfig": config.to_document(),
        "kubetuneVersion": _version(),
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def publish_adapter(
    client: S3Client, adapter_dir: Path, config: TrainerConfig, results: dict[str, Any],
    on_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> Published:
    """Upload ``adapter_dir`` to ``config.output.adapterUri``; the manifest is written last.
    ``on_manifest`` may add to the manifest just before it is written (figures that take the
    publish's own time)."""
    check_may_publish(client, config)
    render_loss_curve(results, adapter_dir / PLOT_NAME, title=f"{config.job.namespace}/{config.job.name}")
    manifest = build_manifest(adapter_dir, config, results)
    target = config.output.adapter_uri
    staging = staging_uri(target)
    lock = PublishLock(client, target, manifest["job"])
    try:
        for entry in manifest["files"]:
            upload_file(client, adapter_dir / entry["path"], join_uri(staging, entry["path"]),
                        metadata={"sha256": entry["sha256"]})
        for entry in manifest["files"]:
            _verify(client, join_uri(staging, entry["path"]), entry)
        lock.acquire()
        check_may_publish(client, config)  # again: another publisher may have published meanwhile
        lock.renew()  # before each change under adapterUri: the lock is still this publisher's
        if head(client, join_uri(target, MANIFEST_NAME)) is not None:
            delete_object(client, join_uri(target, MANIFEST_NAME))
        for entry in manifest["files"]:
            lock.renew()
            copy_object(client, join_uri(staging, entry["path"]), join_uri(target, entry["path"]))
            _verify(client, join_uri(target, entry["path"]), entry)
        if on_manifest is not None:
            on_manifest(manifest)
        document = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        lock.renew()
        put_bytes(client, document, join_uri(target, MANIFEST_NAME))
    finally:
        for cleanup, what in ((lock.release, f"release the publish lock {lock.uri}"),
                              (lambda: delete_prefix(client, staging), f"remove the staging prefix {staging}")):
            try:
                cleanup()
            except TrainerError as exc:  # never hide the real failure behind a cleanup one
                log.warning("could not %s: %s", what, exc)
    return Published(manifest, hashlib.sha256(document).hexdigest())


def staging_uri(adapter_uri: str) -> str:
    """A fresh prefix beside (not inside) adapterUri, so listing the adapter never shows it;
    for an adapterUri at a bucket's root there is no "beside" within the bucket, so a hidden
    prefix inside it (``s3://adapters/`` -> ``s3://adapters/.kubetune-staging-<id>/``): a
    suffix on the bucket's name would name another bucket."""
    bucket, key = parse_s3_uri(adapter_uri)
    unique = uuid.uuid4().hex[:12]
    if not key.strip("/"):
        return f"s3://{bucket}/{ROOT_STAGING_PREFIX}{unique}/"
    return f"{adapter_uri.rstrip('/')}.staging-{unique}/"


def check_may_publish(client: S3Client, config: TrainerConfig) -> str | None:
    """Raise ConfigError when adapterUri holds another job's published adapter and
    output.overwrite is off; else say what publishing will replace (None: nothing).

    The same job (equal, non-empty ``job.uid``: a restart after a publish) replaces its own."""
    uri = config.output.adapter_uri
    found = get_bytes(client, join_uri(uri, MANIFEST_NAME))
    if found is None:
        return None
    owner = _manifest_job(found)
    ours = bool(config.job.uid) and owner.get("uid") == config.job.uid
    if not ours and not config.output.overwrite:
        raise ConfigError(
            f"spec.output.adapterUri {uri} already holds a published adapter ({_describe(owner)}); set "
            "spec.output.overwrite: true to replace it, or choose another adapterUri"
        )
    return f"replaces the adapter published there ({'by this job' if ours else _describe(owner)})"


def lock_uri(adapter_uri: str) -> str:
    """The publish lock beside adapterUri (inside the bucket for an adapterUri at its root)."""
    bucket, key = parse_s3_uri(adapter_uri)
    if not key.strip("/"):
        return f"s3://{bucket}/{ROOT_STAGING_PREFIX}lock"
    return adapter_uri.rstrip("/") + LOCK_SUFFIX


class PublishLock:
    """One publisher at a time per adapterUri: a small object created with If-None-Match: *
    (S3 creates it for one writer only) and renewed with If-Match: <its ETag> before every
    change under adapterUri, so a publisher that lost it (taken over as stale) stops at once.

    Its body names the job and a random token: a write whose answer was lost (the connection
    died after S3 acted) is recognised as the publisher's own on the retry. A lock of this
    same job (uid) is an earlier attempt's that died publishing (the operator starts the next
    attempt only once every pod of the last one is gone) and is taken over at once; another
    job's is waited for until it is released or stale (LOCK_STALE_SECONDS, by S3's clock).
    Where the store answers 501 to conditional writes, publishing goes on without the lock,
    with a warning: concurrent publishers of one adapterUri are then not excluded.
    """

    def __init__(self, client: S3Client, adapter_uri: str, job: dict[str, Any]) -> None:
        self.client, self.adapter_uri, self.uri, self.job = client, adapter_uri, lock_uri(adapter_uri), job
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        """The ETag of the lock as this publisher last wrote it; None while it holds none."""

    def acquire(self) -> None:
        pause, announced = LOCK_PAUSES[0], None
        while True:
            try:
                self.etag = put_if(self.client, self._document(), self.uri, etag=None)
            except ConditionalWritesUnsupported as exc:
                log.warning("%s: publishing %s without a lock, so concurrent publishers of it are not excluded",
                            exc, self.adapter_uri)
                return
            if self.etag is not None:
                return
            found = get_object(self.client, self.uri)
            holder = {} if found is None else _lock_holder(found.body)
            if found is not None and holder.get("token") == self.token:  # our own write, whose answer was lost
                self.etag = found.etag
                return
            job = holder.get("job") if isinstance(holder.get("job"), dict) else {}
            earlier_attempt = bool(self.job.get("uid")) and job.get("uid") == self.job["uid"]
            if found is not None and (earlier_attempt or found.age > LOCK_STALE_SECONDS):
                why = "an earlier attempt of this job" if earlier_attempt else f"not renewed for {found.age:.0f}s"
                log.warning("taking over the publish lock %s (%s, %s)", self.uri, _holder(holder), why)
                try:
                    self.etag = put_if(self.client, self._document(), self.uri, etag=found.etag)
                except ConditionalWritesUnsupported:  # If-None-Match but no If-Match: remove it, create anew
                    delete_object(self.client, self.uri)
                    continue
                if self.etag is not None:
                    return
                continue  # someone else changed it first: look again
            if found is not None and announced != found.etag:
                log.info("%s is being published by %s (lock %s): waiting until it is done",
                         self.adapter_uri, _holder(holder), self.uri)
                announced = found.etag
            time.sleep(pause * random.uniform(0.5, 1.0))  # (found None: released meanwhile, try again soon)
            pause = LOCK_PAUSES[0] if found is None else min(2 * pause, LOCK_PAUSES[1])

    def renew(self) -> None:
        """Rewrite the lock if it is still this publisher's; raise TrainerError if it is not."""
        if self.etag is None:
            return  # no conditional writes on this store
        try:
            etag = put_if(self.client, self._document(), self.uri, etag=self.etag)
        except ConditionalWritesUnsupported:
            return  # If-None-Match but no If-Match: the lock holds, unrenewed
        if etag is None:
            found = get_object(self.client, self.uri)
            holder = {} if found is None else _lock_holder(found.body)
            if found is None or holder.get("token") != self.token:
                self.etag = None
                raise TrainerError(
                    f"{self.adapter_uri}: another publisher took the publish lock {self.uri} "
                    f"({_holder(holder) if found else 'now gone'}): this one stopped before writing manifest.json. "
                    f"Either this one left it unrenewed for {LOCK_STALE_SECONDS:.0f}s or the S3 endpoint does "
                    "not honour conditional writes; restart the job"
                )
            etag = found.etag  # our own write, whose answer was lost
        self.etag = etag

    def release(self) -> None:
        if self.etag is None:
            return
        found = get_object(self.client, self.uri)
        if found is not None and _lock_holder(found.body).get("token") == self.token:
            delete_object(self.client, self.uri)
        self.etag = None

    def _document(self) -> bytes:
        return json.dumps({"token": self.token, "job": self.job, "adapterUri": self.adapter_uri,
                           "renewedAt": datetime.now(UTC).isoformat(timespec="seconds")}).encode()


def _holder(holder: dict[str, Any]) -> str:
    job = holder.get("job") if isinstance(holder.get("job"), dict) else {}
    if not job.get("name"):
        return "a publisher that names no kubetune job"
    return f"job {job.get('namespace', '?')}/{job['name']} uid {job.get('uid') or '(none)'}"


def _lock_holder(document: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(document)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _manifest_job(document: bytes) -> dict[str, Any]:
    """The ``job`` a manifest records; {} for one that names none or does not parse (an older
    or foreign manifest: owned by nobody this job could be)."""
    try:
        job = json.loads(document).get("job")
    except (ValueError, AttributeError):
        return {}
    return job if isinstance(job, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner.get("name"):
        return "a manifest.json that names no kubetune job"
    return (f"manifest.json of job {owner.get('namespace', '?')}/{owner['name']} "
            f"uid {owner.get('uid') or '(none)'}")


def _verify(client: S3Client, uri: str, entry: dict[str, Any]) -> None:
    found = head(client, uri)
    size = None if found is None else found.get("ContentLength")
    digest = None if found is None else found.get("Metadata", {}).get("sha256")
    if size != entry["size"] or digest != entry["sha256"]:
        raise TrainerError(
            f"{uri}: uploaded object does not match the local file (size {size} vs {entry['size']}, "
            f"sha256 {digest} vs {entry['sha256']}); the adapter was not published - check the "
            "S3 endpoint (storage.endpoint) for proxies or quotas that alter uploads, then restart the job"
        )


def _version() -> str:
    try:
        return metadata.version("kubetune")
    except metadata.PackageNotFoundError:
        return "unknown"

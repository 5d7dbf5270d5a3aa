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
3. remove an older ``manifest.json`` under adapterUri (a re-run over an old adapter must not
   show the old manifest beside new files), then copy the files into place server-side;
4. write ``manifest.json`` LAST (files with size + sha256, the job: namespace, name and uid,
   base model, resolved config, metrics, kubetune version); the sha256 of its bytes goes into
   the success termination message, so the operator knows which publish is its job's;
5. delete the staging prefix (also on failure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.errors import ConfigError, TrainerError
from kubetune.trainer.plot import PLOT_NAME, render_loss_curve
from kubetune.trainer.s3 import (
    copy_object, delete_object, delete_prefix, get_bytes, head, join_uri, parse_s3_uri, put_bytes, upload_file,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kubetune.api.trainer_config import TrainerConfig

log = logging.getLogger("kubetune.trainer")

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
ROOT_STAGING_PREFIX = ".kubetune-staging-"


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
    client: S3Client, adapter_dir: Path, config: TrainerConfig, results: dict[str, Any]
) -> Published:
    """Upload ``adapter_dir`` to ``config.output.adapterUri``; the manifest is written last."""
    check_may_publish(client, config)
    render_loss_curve(results, adapter_dir / PLOT_NAME, title=f"{config.job.namespace}/{config.job.name}")
    manifest = build_manifest(adapter_dir, config, results)
    target = config.output.adapter_uri
    staging = staging_uri(target)
    try:
        for entry in manifest["files"]:
            upload_file(client, adapter_dir / entry["path"], join_uri(staging, entry["path"]),
                        metadata={"sha256": entry["sha256"]})
        for entry in manifest["files"]:
            _verify(client, join_uri(staging, entry["path"]), entry)
        if head(client, join_uri(target, MANIFEST_NAME)) is not None:
            delete_object(client, join_uri(target, MANIFEST_NAME))
        for entry in manifest["files"]:
            copy_object(client, join_uri(staging, entry["path"]), join_uri(target, entry["path"]))
            _verify(client, join_uri(target, entry["path"]), entry)
        document = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        put_bytes(client, document, join_uri(target, MANIFEST_NAME))
    finally:
        try:
            delete_prefix(client, staging)
        except TrainerError as exc:  # never hide the real failure behind a cleanup one
            log.warning("could not remove the staging prefix %s: %s", staging, exc)
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

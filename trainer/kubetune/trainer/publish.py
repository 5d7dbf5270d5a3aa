"""Publish the trained adapter to ``output.adapterUri`` atomically (rank 0 only).

A reader that sees no ``manifest.json`` sees no adapter, so publishing goes:

0. draw ``loss.png`` (training and eval loss per step, plot.py) into the adapter folder, so
   it is published, verified and listed in the manifest like every other file;
1. upload every file to a staging prefix beside the target, ``<adapterUri>.staging-<id>/``
   (each object carries its sha256 as user metadata);
2. verify the staged objects (HEAD: size and sha256) - a mismatch fails before anything
   under adapterUri changes;
3. remove an older ``manifest.json`` under adapterUri (a re-run over an old adapter must not
   show the old manifest beside new files), then copy the files into place server-side;
4. write ``manifest.json`` LAST (files with size + sha256, base model, resolved config,
   metrics, kubetune version);
5. delete the staging prefix (also on failure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.errors import TrainerError
from kubetune.trainer.plot import PLOT_NAME, render_loss_curve
from kubetune.trainer.s3 import copy_object, delete_object, delete_prefix, head, join_uri, put_bytes, upload_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kubetune.api.trainer_config import TrainerConfig

log = logging.getLogger("kubetune.trainer")

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


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
) -> dict[str, Any]:
    """Upload ``adapter_dir`` to ``config.output.adapterUri``; the manifest is written last."""
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
        put_bytes(client, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
                  join_uri(target, MANIFEST_NAME))
    finally:
        try:
            delete_prefix(client, staging)
        except TrainerError as exc:  # never hide the real failure behind a cleanup one
            log.warning("could not remove the staging prefix %s: %s", staging, exc)
    return manifest


def staging_uri(adapter_uri: str) -> str:
    """A fresh prefix beside (not inside) adapterUri, so listing the adapter never shows it."""
    return f"{adapter_uri.rstrip('/')}.staging-{uuid.uuid4().hex[:12]}/"


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

"""Publish the trained adapter to ``output.adapterUri`` (rank 0 only).

Every file of the local adapter folder (PEFT adapter + tokenizer) is uploaded first;
``manifest.json`` goes LAST. Consumers treat "manifest.json exists" as "the adapter is
complete": its file list (size + sha256) lets them verify what they downloaded.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.s3 import join_uri, upload_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kubetune.trainer.config import TrainerConfig

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
    """Upload ``adapter_dir`` to ``config.output.adapterUri`` and write the manifest last."""
    manifest = build_manifest(adapter_dir, config, results)
    for entry in manifest["files"]:
        upload_file(client, adapter_dir / entry["path"], join_uri(config.output.adapter_uri, entry["path"]))
    manifest_path = adapter_dir / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    upload_file(client, manifest_path, join_uri(config.output.adapter_uri, MANIFEST_NAME))
    return manifest


def _version() -> str:
    try:
        return metadata.version("kubetune")
    except metadata.PackageNotFoundError:
        return "unknown"

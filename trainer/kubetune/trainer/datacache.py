"""Tokenised data kept beside the checkpoints, so that a restarted gang skips tokenisation.

A gang restart (a failure, a stall, a suspend and resume, the job applied again) reads the same
files with the same tokenizer and makes the same examples; tokenising a large chat dataset,
whose template is rendered several times per conversation, takes minutes. With
``output.checkpointUri`` the first run stores its examples at
``<checkpointUri>/tokenized/<key>.pt``, where ``key`` is the sha256 of everything they depend on:
the data files' bytes, the tokenizer's files, the dataset and evaluation settings and the
sequence length. A later run whose inputs hash the same loads that file instead.

The cache is only ever a shortcut: a missing, unreadable or foreign file means tokenising as
without it, and storing it is best effort.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kubetune.trainer.data import Datasets, Example
from kubetune.trainer.errors import TrainerError
from kubetune.trainer.s3 import download_file, head, join_uri, upload_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kubetune.api.trainer_config import TrainerConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Part of the key: a release that tokenises differently makes other keys."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
"""The model folder's files that do not decide the tokens (and are the large ones)."""


def cache_key(config: TrainerConfig, model_dir: Path, data_files: list[Path]) -> str:
    """The sha256 of the examples' inputs: data bytes, tokenizer files, settings."""
    digest = hashlib.sha256(f"kubetune-tokenized-v{CACHE_VERSION}\n".encode())
    settings = {"dataset": config.dataset.model_dump(mode="json"),
                "evaluation": config.evaluation.model_dump(mode="json", include={"retention_uri", "retention_text_field"}),
                "sequenceLength": config.training.sequence_length, "seed": config.training.seed}
    digest.update(repr(sorted(settings.items())).encode())
    tokenizer_files = sorted(path for path in model_dir.rglob("*")
                             if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES))
    for path in [*tokenizer_files, *data_files]:
        digest.update(f"\n{path.relative_to(path.parent.parent).as_posix()}\n".encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_uri(config: TrainerConfig, key: str) -> str | None:
    """Where the examples of ``key`` are kept; None without output.checkpointUri."""
    if not config.output.checkpoint_uri:
        return None
    return join_uri(config.output.checkpoint_uri, f"tokenized/{key}.pt")


def fetch(client: S3Client, uri: str, dest: Path) -> bool:
    """Download the cached examples to ``dest``; False when there are none (or they cannot be read)."""
    try:
        if head(client, uri) is None:
            return False
        download_file(client, uri, dest)
        return True
    except TrainerError as error:
        log.warning("tokenized data cache %s not used: %s", uri, error)
        return False


def load(path: Path) -> Datasets | None:
    """The examples in ``path`` (written by :func:`store`), or None if it is not such a file."""
    try:
        stored = torch.load(path, weights_only=True)
        if stored.get("version") != CACHE_VERSION:
            return None
        return Datasets(*(_examples(stored[name]) for name in ("train", "validation")), list(stored["notes"]),
                        _examples(stored["retention"]))
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError) as error:
        log.warning("tokenized data cache %s not used: %s", path, error)
        return None


def store(client: S3Client, uri: str, datasets: Datasets, scratch: Path) -> threading.Thread:
    """Upload ``datasets`` to ``uri`` in the background (training need not wait); best effort."""
    path = scratch / "tokenized-upload.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": CACHE_VERSION, "notes": list(datasets.notes),
                **{name: _packed(getattr(datasets, name)) for name in ("train", "validation", "retention")}}, path)

    def upload() -> None:
        try:
            upload_file(client, path, uri)
            log.info("tokenized data kept at %s for restarts", uri)
        except TrainerError as error:
            log.warning("could not keep the tokenized data at %s: %s", uri, error)

    thread = threading.Thread(target=upload, name="tokenized-data-upload", daemon=True)
    thread.start()
    return thread


def _packed(examples: list[Example]) -> dict[str, Any]:
    """Examples as three tensors (token ids, labels, where each example ends): compact, and
    readable by ``torch.load(weights_only=True)``."""
    ids = [token for example in examples for token in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    ends = torch.tensor([len(example.input_ids) for example in examples], dtype=torch.int64).cumsum(0)
    return {"ids": torch.tensor(ids, dtype=torch.int32), "labels": torch.tensor(labels, dtype=torch.int32),
            "ends": ends}


def _examples(packed: dict[str, torch.Tensor]) -> list[Example]:
    ids, labels, ends = packed["ids"].tolist(), packed["labels"].tolist(), packed["ends"].tolist()
    starts = [0, *ends[:-1]]
    return [Example(ids[start:end], labels[start:end]) for start, end in zip(starts, ends)]

"""From a dataset file to tokenised training and validation examples, the same on every rank.

1. :func:`read_records` parses the file: JSONL (one object per line) or Parquet (one row per
   example, recognised by its magic bytes). A bad line or row is reported with its number.
2. :func:`tokenize_records` turns each record into token ids plus labels, following
   ``dataset.format``; loss is taken on the text (``text``), the response (``instruction``) or
   the assistant's replies (``chat``) only.
3. :func:`fit_to_length` truncates or drops examples longer than ``sequenceLength`` (per
   ``dataset.overlong``) and drops examples left with nothing to train on, counting both.
4. :func:`split_train_validation` holds out ``validationSplit`` of the examples (seeded);
   ``validationUri`` names a separate file instead.
:func:`prepare_datasets` runs all four; :mod:`kubetune.trainer.batching` makes the batches.

A problem with the data is a :class:`DataError` (exit 65: permanent, a restart reads the same
file); one with the settings that do not fit the model is a :class:`ConfigError`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kubetune.api.spec import Dataset
from kubetune.trainer.chat import chat_segments
from kubetune.trainer.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kubetune.api.spec import Evaluation

IGNORE_INDEX = -100
"""Label value that torch's cross-entropy (and HF models) skip."""

PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Example:
    """One tokenised training example."""

    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken (e.g. the prompt)."""

    @property
    def trained_tokens(self) -> int:
        """Tokens the model is trained to predict (the first token is never a target)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class Datasets:
    """What :func:`prepare_datasets` returns."""

    train: list[Example]
    validation: list[Example]
    notes: list[str] = field(default_factory=list)
    """Counts worth a log line (truncated or dropped examples), for rank 0 to print."""
    retention: list[Example] = field(default_factory=list)
    """evaluation.retentionUri's examples: plain text, all of it evaluated."""


def prepare_datasets(
    train_path: Path,
    validation_path: Path | None,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    sequence_length: int,
    seed: int,
    *,
    retention_path: Path | None = None,
    evaluation: Evaluation | None = None,
) -> Datasets:
    """Read, tokenise, fit and split; ``validation_path`` is the downloaded ``validationUri``,
    ``retention_path`` the downloaded ``evaluation.retentionUri``."""
    notes: list[str] = []
    examples = _load(train_path, dataset.uri, tokenizer, dataset, sequence_length, notes)
    if validation_path is None:
        train, validation = split_train_validation(examples, dataset.validation_split, seed)
    else:
        train = examples
        validation = _load(validation_path, dataset.validation_uri or str(validation_path), tokenizer,
                           dataset, sequence_length, notes)
    retention: list[Example] = []
    if retention_path is not None and evaluation is not None and evaluation.retention_uri:
        retention = _load(retention_path, evaluation.retention_uri, tokenizer, retention_dataset(evaluation),
                          sequence_length, notes)
    return Datasets(train, validation, notes, retention)


def retention_dataset(evaluation: Evaluation) -> Dataset:
    """How evaluation.retentionUri is read: as text whatever the training format is (general
    text, every token counted)."""
    return Dataset(uri=evaluation.retention_uri, format="text", text_field=evaluation.retention_text_field)


def _load(
    path: Path, source: str, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, sequence_length: int,
    notes: list[str],
) -> list[Example]:
    records, unit = read_records(path, dataset, source=source)
    examples = tokenize_records(records, tokenizer, dataset, source=source, unit=unit)
    fitted, fit_notes = fit_to_length(examples, sequence_length, dataset.overlong, dataset.format, source=source)
    notes += fit_notes
    return fitted


def read_records(path: Path, dataset: Dataset, *, source: str) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """``([(number, record)], "line" | "row")`` from a JSONL or Parquet file."""
    with path.open("rb") as fh:
        magic = fh.read(len(PARQUET_MAGIC))
    if magic == PARQUET_MAGIC:
        return read_parquet(path, _columns(dataset), source=source), "row"
    return read_jsonl(path, source=source), "line"


def read_jsonl(path: Path, *, source: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line; each line must be a JSON object."""
    source = source or path.name
    records = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{source} line {number}: not UTF-8 text (dataset.uri must be JSONL or Parquet)"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{source} line {number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((number, record))
    if not records:
        raise DataError(f"{source}: the dataset has no examples (the file is empty)")
    return records


def read_parquet(path: Path, columns: dict[str, str], *, source: str) -> list[tuple[int, dict[str, Any]]]:
    """``(row number, record)`` per row, reading only ``columns`` ({column: setting naming it})."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        present = parquet.schema_arrow.names
        for column, setting in columns.items():
            if column not in present:
                raise DataError(
                    f"{source}: column {column!r} is missing (set {setting} to the column that holds "
                    f"it; columns in this file: {present})"
                )
        rows = parquet.read(columns=list(columns)).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{source}: not a readable Parquet file ({exc})") from None
    if not rows:
        raise DataError(f"{source}: the dataset has no examples (the Parquet file has no rows)")
    return list(enumerate(rows, start=1))


def _columns(dataset: Dataset) -> dict[str, str]:
    if dataset.format == "text":
        return {dataset.text_field: "dataset.textField"}
    if dataset.format == "instruction":
        return {dataset.prompt_field: "dataset.promptField", dataset.response_field: "dataset.responseField"}
    return {dataset.messages_field: "dataset.messagesField"}


def tokenize_records(
    records: list[tuple[int, dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    source: str = "dataset",
    unit: str = "line",
) -> list[Example]:
    """Tokenise every record per ``dataset.format`` (whole length); errors name the line and field."""
    if dataset.format == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            "dataset.format is chat but the model's tokenizer has no chat template: add "
            "chat_template to tokenizer_config.json in model.uri, or use format text/instruction"
        )
    examples = []
    for number, record in records:
        where = f"{source} {unit} {number}"
        if dataset.format == "text":
            text = _string_field(record, dataset.text_field, where, "dataset.textField")
            examples.append(_text_example(tokenizer, "", text))
        elif dataset.format == "instruction":
            prompt = _string_field(record, dataset.prompt_field, where, "dataset.promptField")
            response = _string_field(record, dataset.response_field, where, "dataset.responseField")
            examples.append(_text_example(tokenizer, prompt, response))
        else:
            messages = _messages_field(record, dataset.messages_field, where)
            examples.append(_segments_example(tokenizer, chat_segments(tokenizer, messages, where)))
    return examples


def fit_to_length(
    examples: list[Example], sequence_length: int, overlong: str, fmt: str = "text", *, source: str = "dataset"
) -> tuple[list[Example], list[str]]:
    """Apply ``dataset.overlong`` (truncate | drop) and drop examples with nothing to train on.

    Returns the kept examples and one log line per kind of change. Raises when none is left.
    """
    total = len(examples)
    notes = []
    longer = sum(1 for example in examples if len(example.input_ids) > sequence_length)
    if overlong == "drop":
        kept = [example for example in examples if len(example.input_ids) <= sequence_length]
    else:
        kept = [
            example if len(example.input_ids) <= sequence_length
            else Example(example.input_ids[:sequence_length], example.labels[:sequence_length])
            for example in examples
        ]
    if longer:
        verb, outcome = ("dropped", "") if overlong == "drop" else ("truncated", f" to their first {sequence_length}")
        notes.append(
            f"{source}: {verb} {longer} of {total} examples longer than {sequence_length} tokens{outcome} "
            f"(dataset.overlong: {overlong})"
        )
    # A truncated prompt can leave no response; a batch of only such examples has loss 0/0.
    trainable = [example for example in kept if example.trained_tokens]
    if len(trainable) < len(kept):
        notes.append(
            f"{source}: dropped {len(kept) - len(trainable)} of {total} examples with no token to train on "
            f"within {sequence_length} tokens ({_what_is_trained(fmt)})"
        )
    if not trainable:
        raise DataError(
            f"{source}: no example left to train on: of {total}, {longer} are longer than "
            f"training.sequenceLength ({sequence_length}, dataset.overlong: {overlong}) and the rest "
            f"have no token to train on ({_what_is_trained(fmt)}); raise training.sequenceLength"
            + (" or set dataset.overlong: truncate" if overlong == "drop" else "")
        )
    return trainable, notes


def _what_is_trained(fmt: str) -> str:
    return {
        "chat": "format chat trains on assistant messages only",
        "instruction": "format instruction trains on the response only",
    }.get(fmt, "format text trains on the whole text")


def split_train_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one when fraction > 0), seeded."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = max(1, int(len(examples) * fraction))
    validation = sorted(order[:held_out])
    train = sorted(order[held_out:])
    return [examples[i] for i in train], [examples[i] for i in validation]


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from the loss.

    No attention mask, on purpose: in a causal LM a token attends only to earlier positions,
    and right padding comes after every real token, so no real token can see padding and its
    output is exactly the unpadded one (positions count from 0 either way). Without a mask
    the attention kernels take their causal fast path instead of applying a dense mask.
    """
    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "labels": labels}


def _text_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> Example:
    """bos + prompt + completion + eos, with loss on the completion (and eos) only."""
    prefix: list[int] = []
    if tokenizer.bos_token_id is not None:
        prefix.append(tokenizer.bos_token_id)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    input_ids = prefix + prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + completion_ids
    return Example(input_ids, labels)


def _segments_example(tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]]) -> Example:
    """Each piece tokenised on its own, so a reply starts on a token boundary, as it does when
    the model generates it after the prompt. The template's own special tokens are in the text."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return Example(input_ids, labels)


def _string_field(record: dict[str, Any], key: str, where: str, setting: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
        raise DataError(
            f"{where}: field {key!r} {problem} (set {setting} to the key that "
            f"holds it; keys present: {sorted(record)})"
        )
    return value


def _messages_field(record: dict[str, Any], key: str, where: str) -> list[dict[str, str]]:
    messages = record.get(key)
    valid = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise DataError(
            f"{where}: field {key!r} must be a non-empty list of "
            f"{{\"role\": ..., \"content\": ...}} objects (set dataset.messagesField to the key "
            f"that holds it; keys present: {sorted(record)})"
        )
    # Parquet gives every struct field to every message, null where unset; templates test
    # for keys (e.g. "tool_calls" in message), so nulls are left out.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]

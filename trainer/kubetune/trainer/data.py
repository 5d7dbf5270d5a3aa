"""From a JSONL file to padded micro-batches, the same on every rank.

1. :func:`read_jsonl` parses the file; a bad line is reported with its line number.
2. :func:`tokenize_records` turns each record into token ids plus labels, following
   ``dataset.format`` (text / chat / instruction), truncated to ``sequenceLength``.
3. :func:`split_train_validation` holds out ``validationSplit`` of the examples (seeded).
4. :func:`rank_batches` groups examples of similar length into micro-batches (less padding),
   shuffles them with ``seed + epoch`` and deals every rank the same number of batches.
5. :func:`collate` pads a micro-batch; padded positions get label -100 so they carry no loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kubetune.trainer.errors import TrainerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kubetune.trainer.config import DatasetConfig

IGNORE_INDEX = -100
"""Label value that torch's cross-entropy (and HF models) skip."""

_LENGTH_GROUP_BATCHES = 32
"""How many micro-batches share one sort-by-length window: wider windows pad less but
shuffle less."""


@dataclass(frozen=True)
class Example:
    """One tokenised training example."""

    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken (e.g. the prompt)."""


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line; each line must be a JSON object."""
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainerError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise TrainerError(
                    f"{path.name} line {number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((number, record))
    if not records:
        raise TrainerError(f"{path.name}: the dataset has no examples")
    return records


def tokenize_records(
    records: list[tuple[int, dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    dataset: DatasetConfig,
    sequence_length: int,
    *,
    source: str = "dataset",
) -> list[Example]:
    """Tokenise every record per ``dataset.format``; errors name the line and the field."""
    if dataset.format == "chat" and not tokenizer.chat_template:
        raise TrainerError(
            "dataset.format is chat but the model's tokenizer has no chat template: add "
            "chat_template to tokenizer_config.json in model.uri, or use format text/instruction"
        )
    examples = []
    for number, record in records:
        if dataset.format == "text":
            text = _string_field(record, dataset.text_field, source, number, "dataset.textField")
            example = _text_example(tokenizer, "", text)
        elif dataset.format == "instruction":
            prompt = _string_field(record, dataset.prompt_field, source, number, "dataset.promptField")
            response = _string_field(record, dataset.response_field, source, number, "dataset.responseField")
            example = _text_example(tokenizer, prompt, response)
        else:
            messages = _messages_field(record, dataset.messages_field, source, number)
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            example = _text_example(tokenizer, "", text, add_special_tokens=False)
        examples.append(
            Example(example.input_ids[:sequence_length], example.labels[:sequence_length])
        )
    return examples


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


def rank_batches(
    examples: list[Example],
    micro_batch_size: int,
    world_size: int,
    rank: int,
    *,
    seed: int,
    epoch: int,
) -> list[list[Example]]:
    """This rank's micro-batches for one epoch: length-grouped, shuffled, equal count per rank.

    Every rank computes the same global order from ``seed + epoch`` and takes every
    ``world_size``-th batch, so no communication is needed. Leftover examples that would give
    ranks unequal work are dropped (they come back in other epochs' shuffles).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = micro_batch_size * _LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order) - micro_batch_size + 1, window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].input_ids))
        for b in range(0, len(chunk) - micro_batch_size + 1, micro_batch_size):
            batches.append([examples[i] for i in chunk[b : b + micro_batch_size]])
    rng.shuffle(batches)
    per_rank = len(batches) // world_size
    return batches[rank::world_size][:per_rank]


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _text_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, add_special_tokens: bool = True
) -> Example:
    """bos + prompt + completion + eos, with loss on the completion (and eos) only.

    ``add_special_tokens=False`` is for text that already has them (a chat template's output).
    """
    prefix: list[int] = []
    if add_special_tokens and tokenizer.bos_token_id is not None:
        prefix.append(tokenizer.bos_token_id)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if add_special_tokens and tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    input_ids = prefix + prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + completion_ids
    return Example(input_ids, labels)


def _string_field(record: dict[str, Any], field: str, source: str, number: int, setting: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
        raise TrainerError(
            f"{source} line {number}: field {field!r} {problem} (set {setting} to the key that "
            f"holds it; keys on this line: {sorted(record)})"
        )
    return value


def _messages_field(record: dict[str, Any], field: str, source: str, number: int) -> list[dict[str, str]]:
    messages = record.get(field)
    valid = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise TrainerError(
            f"{source} line {number}: field {field!r} must be a non-empty list of "
            f"{{\"role\": ..., \"content\": ...}} objects (set dataset.messagesField to the key "
            f"that holds it; keys on this line: {sorted(record)})"
        )
    return messages

"""An epoch's micro-batches for one rank: a pure function of (examples, seed, epoch, rank,
world size), so every rank agrees without talking and a resumed run sees the same batches.

Two ways to batch (``training.packing``):

- padded (default): a seeded shuffle, then examples of similar length share a micro-batch
  (sorted within windows of :data:`LENGTH_GROUP_BATCHES` micro-batches), right-padded to the
  longest; padding is masked from the loss (see :func:`kubetune.trainer.data.collate` for why
  it needs no attention mask).
- packed: examples are packed once (seeded best-fit-decreasing) into rows of at most
  ``sequenceLength`` tokens; each epoch shuffles the rows. A packed batch has ``position_ids``
  that restart at 0 for every example and no ``attention_mask``: that is how HF models
  recognise packed rows and keep each example's attention to itself (varlen flash-attention
  on GPU, a block-diagonal mask with sdpa/eager). The model must run with
  ``use_cache=False``: with a cache HF ignores those boundaries and examples silently attend
  to each other.

Every rank builds the same global list from ``seed`` and ``epoch`` and takes every
``world_size``-th micro-batch, dropping the remainder so ranks run the same count. Padded
micro-batches are dealt in rounds of ``world_size`` neighbours in length: ZeRO reduces
gradients after every micro-batch, so each one costs what the slowest rank's costs, and a
rank given 500-token examples while another has 20-token ones would leave the other idle.
``start=N`` skips the first N micro-batches of the epoch (resuming mid-epoch).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from kubetune.trainer.data import IGNORE_INDEX, Example, collate

LENGTH_GROUP_BATCHES = 64
"""How many micro-batches share one sort-by-length window: wider windows pad less but
shuffle less. On long-tailed lengths (median ~100, up to 512 tokens, batches of 8) 16 pads
8.5% of positions, 32 5.2%, 64 2.5%, 128 1.2%."""

PACK_WINDOW = 4096
"""Examples packed together at most: bounds packing time; wider windows fill rows a little
better."""


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass worth of examples for one rank."""

    rows: tuple[tuple[Example, ...], ...]
    """One example per row when padded; one or more per row when packed."""
    packed: bool

    @property
    def examples(self) -> list[Example]:
        return [example for row in self.rows for example in row]

    @property
    def tokens(self) -> int:
        """Real (not padding) tokens: what tokens/s counts."""
        return sum(len(example.input_ids) for row in self.rows for example in row)

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss is taken on: what a micro-batch weighs in its optimizer step."""
        return sum(example.trained_tokens for example in self.examples)

    def tensors(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The model's keyword arguments (besides ``use_cache=False``)."""
        if not self.packed:
            return collate([row[0] for row in self.rows], pad_token_id)
        return _collate_packed(self.rows, pad_token_id)


def batches_for_epoch(
    examples: list[Example],
    *,
    micro_batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    packing: bool = False,
    sequence_length: int | None = None,
    start: int = 0,
) -> list[MicroBatch]:
    """This rank's micro-batches for ``epoch``, from the ``start``-th on.

    Same count on every rank and in every epoch (for a given example list), so step plans
    and resume positions hold across epochs. ``micro_batch_size`` counts rows: examples when
    padded, packed rows of up to ``sequence_length`` tokens when packing.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if packing:
        if sequence_length is None:
            raise ValueError("packing needs sequence_length")
        rows = pack_rows(examples, sequence_length, seed)
        rng.shuffle(rows)
        batches = [
            MicroBatch(tuple(rows[b : b + micro_batch_size]), packed=True)
            for b in range(0, len(rows) - micro_batch_size + 1, micro_batch_size)
        ]
    else:
        groups = _length_grouped(examples, micro_batch_size, rng)
        # Neighbours in length go to different ranks at the same time (see the module doc).
        rounds = [groups[r : r + world_size] for r in range(0, len(groups) - world_size + 1, world_size)]
        rng.shuffle(rounds)
        batches = [
            MicroBatch(tuple((example,) for example in group), packed=False) for round_ in rounds for group in round_
        ]
    per_rank = len(batches) // world_size
    return batches[rank::world_size][:per_rank][start:]


def pack_rows(examples: list[Example], sequence_length: int, seed: int) -> list[tuple[Example, ...]]:
    """Best-fit-decreasing packing of a seeded shuffle, window by window (see :data:`PACK_WINDOW`).

    Depends on ``seed`` only, not on the epoch, so every epoch has the same number of rows.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[Example, ...]] = []
    for begin in range(0, len(order), PACK_WINDOW):
        # Longest first; sorted() is stable, so equal lengths keep the shuffled order.
        window = sorted(order[begin : begin + PACK_WINDOW], key=lambda i: -len(examples[i].input_ids))
        members: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (room left, row index), ascending
        for i in window:
            size = len(examples[i].input_ids)
            if size > sequence_length:
                raise ValueError(f"example of {size} tokens does not fit a row of {sequence_length}")
            slot = bisect.bisect_left(free, (size, -1))  # the tightest row it fits
            if slot == len(free):
                members.append([i])
                bisect.insort(free, (sequence_length - size, len(members) - 1))
            else:
                room, row = free.pop(slot)
                members[row].append(i)
                bisect.insort(free, (room - size, row))
        rows += [tuple(examples[i] for i in row) for row in members]
    return rows


def _length_grouped(examples: list[Example], micro_batch_size: int, rng: random.Random) -> list[list[Example]]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = micro_batch_size * LENGTH_GROUP_BATCHES
    groups = []
    for begin in range(0, len(order) - micro_batch_size + 1, window):
        chunk = sorted(order[begin : begin + window], key=lambda i: len(examples[i].input_ids))
        for b in range(0, len(chunk) - micro_batch_size + 1, micro_batch_size):
            groups.append([examples[i] for i in chunk[b : b + micro_batch_size]])
    return groups


def _collate_packed(rows: tuple[tuple[Example, ...], ...], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows padded to the fullest; position_ids restart per example and the padding tail is a
    block of its own, so no real token attends to another example or to padding."""
    width = max(sum(len(example.input_ids) for example in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at : at + n] = torch.tensor(example.labels)
            # The label at an example's first token is the target of the previous example's
            # last token: never train one example to predict the next.
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}

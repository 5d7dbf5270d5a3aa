"""Micro-batches: deterministic, resumable, equal shares per rank, padded or packed."""

from __future__ import annotations

import pytest

from kubetune.trainer.batching import MicroBatch, batches_for_epoch, pack_rows
from kubetune.trainer.data import IGNORE_INDEX, Example


def fake_examples(lengths: list[int]) -> list[Example]:
    # Distinct ids per example so equality tells examples apart.
    return [Example([i] * n, [i] * n) for i, n in enumerate(lengths)]


def batches(examples: list[Example], **settings) -> list[MicroBatch]:
    defaults = {"micro_batch_size": 4, "world_size": 1, "rank": 0, "seed": 1, "epoch": 0}
    return batches_for_epoch(examples, **{**defaults, **settings})


def ids(share: list[MicroBatch]) -> list[list[int]]:
    return [[example.input_ids[0] for example in batch.examples] for batch in share]


LENGTHS = [5 + (i * 7) % 40 for i in range(103)]


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_get_equal_disjoint_deterministic_shares(packing: bool) -> None:
    examples = fake_examples(LENGTHS)
    settings = {"world_size": 3, "packing": packing, "sequence_length": 64, "micro_batch_size": 2}
    shares = [batches(examples, rank=rank, **settings) for rank in range(3)]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) > 0
    seen = [i for share in shares for batch in ids(share) for i in batch]
    assert len(seen) == len(set(seen))  # no example twice in one epoch
    assert ids(batches(examples, rank=1, **settings)) == ids(shares[1])
    assert ids(batches(examples, rank=1, epoch=1, **settings)) != ids(shares[1])
    assert ids(batches(examples, rank=1, seed=2, **settings)) != ids(shares[1])


@pytest.mark.parametrize("packing", [False, True])
def test_every_epoch_has_the_same_number_of_batches(packing: bool) -> None:
    # Step plans (and checkpoint positions) are computed once from epoch 0.
    examples = fake_examples(LENGTHS)
    counts = {len(batches(examples, epoch=e, packing=packing, sequence_length=64, world_size=2)) for e in range(6)}
    assert len(counts) == 1


@pytest.mark.parametrize("packing", [False, True])
def test_resuming_at_batch_n_gives_the_rest_of_the_same_epoch(packing: bool) -> None:
    examples = fake_examples(LENGTHS)
    settings = {"packing": packing, "sequence_length": 64, "world_size": 2, "rank": 1, "epoch": 3}
    whole = batches(examples, **settings)
    assert batches(examples, start=5, **settings) == whole[5:]
    assert batches(examples, start=len(whole), **settings) == []


def test_padded_batches_group_similar_lengths_to_limit_padding() -> None:
    examples = fake_examples([(i * 37) % 200 + 1 for i in range(256)])
    share = batches(examples, micro_batch_size=8, seed=0)
    padded = sum(len(b.rows) * max(len(e.input_ids) for e in b.examples) for b in share)
    real = sum(b.tokens for b in share)
    assert padded < 1.2 * real
    assert all(not b.packed and all(len(row) == 1 for row in b.rows) for b in share)


def test_ranks_get_neighbours_in_length_at_the_same_step() -> None:
    # ZeRO reduces gradients after every micro-batch, so a rank with short examples waits for
    # one with long ones: the k-th micro-batches of all ranks should be about as wide.
    examples = fake_examples([(i * 37) % 500 + 1 for i in range(1024)])
    shares = [batches(examples, micro_batch_size=8, world_size=2, rank=rank, seed=0) for rank in range(2)]

    def width(batch: MicroBatch) -> int:
        return max(len(e.input_ids) for e in batch.examples)

    gaps = [abs(width(a) - width(b)) for a, b in zip(*shares)]
    widths = sorted(width(batch) for share in shares for batch in share)
    typical_gap_of_random_pairs = (widths[3 * len(widths) // 4] - widths[len(widths) // 4]) / 2
    assert max(gaps) < 40 < typical_gap_of_random_pairs
    assert sum(gaps) / len(gaps) < 10


def test_packing_fills_rows_without_splitting_or_losing_examples() -> None:
    lengths = [(i * 37) % 200 + 1 for i in range(300)]
    rows = pack_rows(fake_examples(lengths), 256, seed=0)
    assert sorted(e.input_ids[0] for row in rows for e in row) == list(range(300))
    assert all(sum(len(e.input_ids) for e in row) <= 256 for row in rows)
    # Best-fit decreasing leaves little room: far fewer rows than one example per row.
    assert len(rows) * 256 < 1.1 * sum(lengths)


def test_an_example_longer_than_a_row_is_refused() -> None:
    with pytest.raises(ValueError, match="example of 65 tokens does not fit a row of 64"):
        pack_rows(fake_examples([10, 65]), 64, seed=0)


def test_packed_tensors_restart_positions_and_never_predict_across_examples() -> None:
    row_a = (Example([11, 12, 13], [IGNORE_INDEX, 12, 13]), Example([21, 22], [21, 22]))
    row_b = (Example([31, 32], [31, 32]),)
    tensors = MicroBatch((row_a, row_b), packed=True).tensors(pad_token_id=0)
    assert set(tensors) == {"input_ids", "position_ids", "labels"}  # position ids mark the examples; no attention mask
    assert tensors["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 0, 0, 0]]
    assert tensors["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # 21 is the first token of the second example: the last token of the first must not learn it.
    assert tensors["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22],
                                          [IGNORE_INDEX, 32, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert MicroBatch((row_a, row_b), packed=True).tokens == 7


def test_packing_needs_the_row_length() -> None:
    with pytest.raises(ValueError, match="sequence_length"):
        batches(fake_examples([3, 4]), packing=True)

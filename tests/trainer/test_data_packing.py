"""Packing never lets one example attend to another: packed and unpacked give the same logits
and per-example loss on the tiny Llama, and the same comparison catches cross-attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune.trainer.batching import MicroBatch, batches_for_epoch, pack_rows
from kubetune.trainer.data import IGNORE_INDEX, Example

# Lengths that force several examples per row and a padded tail in some rows.
LENGTHS = [23, 5, 40, 1, 17, 31, 9, 12, 2, 28]
ROW = 64


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_assets: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama", attn_implementation=request.param)
    return model.eval()


def examples(vocab: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    result = []
    for n in LENGTHS:
        ids = torch.randint(6, vocab, (n,), generator=generator).tolist()  # 0-5 are special tokens
        result.append(Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]))
    return result


def per_example_alone(model, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and summed loss of one example run by itself (no padding, no neighbours)."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0]
    return logits, _summed_loss(logits, torch.tensor(example.labels))


def per_example_packed(model, batch: MicroBatch, **call) -> list[tuple[Example, torch.Tensor, torch.Tensor]]:
    """(example, its logits slice, its summed loss) for every example of a packed batch."""
    inputs = batch.tensors(pad_token_id=0)
    with torch.no_grad():
        logits = model(**inputs, **call).logits
    found = []
    for r, row in enumerate(batch.rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            piece = logits[r, at : at + n]
            found.append((example, piece, _summed_loss(piece, inputs["labels"][r, at : at + n])))
            at += n
    return found


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # logits[t] predicts labels[t + 1], as in HF's causal-LM loss.
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def largest_difference(model, batches: list[MicroBatch], **call) -> tuple[float, float]:
    logit_gap = loss_gap = 0.0
    for batch in batches:
        for example, logits, loss in per_example_packed(model, batch, **call):
            alone_logits, alone_loss = per_example_alone(model, example)
            logit_gap = max(logit_gap, float((logits - alone_logits).abs().max()))
            loss_gap = max(loss_gap, float((loss - alone_loss).abs()))
    return logit_gap, loss_gap


def packed_batches(data: list[Example]) -> list[MicroBatch]:
    batches = batches_for_epoch(data, micro_batch_size=2, world_size=1, rank=0, seed=0, epoch=0,
                                packing=True, sequence_length=ROW)
    assert any(len(row) > 1 for batch in batches for row in batch.rows)  # really packed
    return batches


def test_packed_examples_give_the_same_logits_and_loss_as_alone(model) -> None:
    batches = packed_batches(examples(model.config.vocab_size))
    logit_gap, loss_gap = largest_difference(model, batches, use_cache=False)
    assert logit_gap < 1e-4 and loss_gap < 1e-4


def test_the_comparison_catches_cross_attention(model) -> None:
    # Negative control: with HF's default use_cache=True the packed examples silently attend
    # to each other (DESIGN.md); the same comparison must fail loudly then.
    batches = packed_batches(examples(model.config.vocab_size))
    model.config.use_cache = True
    try:
        logit_gap, loss_gap = largest_difference(model, batches, use_cache=True)
    finally:
        model.config.use_cache = False
    assert logit_gap > 1e-2 and loss_gap > 1e-2


def test_packed_batch_loss_equals_the_token_mean_of_the_examples_alone(model) -> None:
    # What training optimises: HF's loss on the packed batch is the mean over every trained
    # token, exactly as if each example had been run alone.
    data = examples(model.config.vocab_size)
    [batch] = batches_for_epoch(data, micro_batch_size=len(pack_rows(data, ROW, 0)), world_size=1, rank=0,
                                seed=0, epoch=0, packing=True, sequence_length=ROW)
    with torch.no_grad():
        packed_loss = model(**batch.tensors(pad_token_id=0), use_cache=False).loss
    summed = sum(per_example_alone(model, example)[1] for example in data)
    trained = sum(example.trained_tokens for example in data)
    assert torch.allclose(packed_loss, summed / trained, atol=1e-5)

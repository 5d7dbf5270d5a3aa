"""The training loss, computed only where it is taken.

HF's ``model(..., labels=...).loss`` runs the output layer (hidden x vocab: the largest matmul
of a small model, 15-20% of its FLOPs) and a float32 log-softmax over every position of the
batch: padding, prompts and the last position included, and then throws most of it away.
:func:`next_token_loss` computes the same cross-entropy from the hidden states of the trained
positions only: a forward pre-hook on the output layer selects them, so the model's own
forward (and DeepSpeed's ZeRO-3 hooks) run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kubetune.trainer.data import IGNORE_INDEX


def output_layer(model: Any) -> torch.nn.Module:
    """The hidden-to-vocab projection of a (PEFT-wrapped) causal LM."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (is it a causal LM?)")
    return head


def next_token_loss(model: Any, head: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(next-token cross-entropy summed over the trained tokens, number of trained tokens) for
    one micro-batch. A sum, so the caller can weigh micro-batches by their tokens; the mean is
    sum / count.

    ``inputs`` holds ``labels`` aligned with ``input_ids`` (``IGNORE_INDEX`` where nothing is
    trained) plus the model's other arguments. ``model`` may be the DeepSpeed engine.
    """
    targets = inputs["labels"][:, 1:]
    trained = targets != IGNORE_INDEX  # position t predicts token t + 1

    def trained_positions_only(_module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][:, :-1][trained], *args[1:])

    hook = head.register_forward_pre_hook(trained_positions_only)
    try:
        arguments = {key: value for key, value in inputs.items() if key != "labels"}
        logits = model(**arguments, use_cache=False).logits  # [trained tokens, vocab]
    finally:
        hook.remove()
    # With nothing trained the sum is 0 and still a graph through the model: under ZeRO every
    # rank must run the same backward.
    return F.cross_entropy(logits.float(), targets[trained], reduction="sum"), int(trained.sum())


def trained_tokens_all_ranks(micro_batches: list) -> float:
    """Tokens one optimizer step trains over all ranks, given this rank's micro-batches of the
    step (one small all_reduce): what the step's summed losses are divided by."""
    return step_start_all_ranks(micro_batches, stop=False)[0]


def step_start_all_ranks(micro_batches: list, stop: bool) -> tuple[float, bool]:
    """At the start of an optimizer step, in one small all_reduce: the tokens it trains over
    all ranks (see trained_tokens_all_ranks) and whether any rank asks to ``stop`` (it got
    SIGTERM): every rank learns both, so all of them stop at the same step."""
    tokens = float(sum(batch.trained_tokens for batch in micro_batches))
    totals = torch.tensor([tokens, 1.0 if stop else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    return max(float(totals[0]), 1.0), bool(totals[1] > 0)

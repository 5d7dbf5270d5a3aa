"""The training loss, computed only where it is taken, a chunk of positions at a time.

HF's ``model(..., labels=...).loss`` runs the output layer (hidden x vocab: the largest matmul
of a small model, 15-20% of its FLOPs) and a float32 log-softmax over every position of the
batch: padding, prompts and the last position included, and then throws most of it away.
:func:`next_token_loss` computes the same cross-entropy from the hidden states of the trained
positions only: a forward pre-hook on the output layer selects them, so the model's own
forward (and DeepSpeed's ZeRO-3 hooks) run unchanged.

With a real vocabulary even the trained positions' logits are the largest tensors of a step
(4,096 positions x 128k entries in float32 is 2 GiB, and HF holds three such tensors at once).
For the model types below, the output layer's forward itself becomes the loss
(:class:`ChunkedCrossEntropy`): logits a chunk of positions at a time, the gradient computed
in the same pass (the loss is the graph's last operation, so its gradient is known up to one
scalar), and never more than one chunk's logits alive. Inside the layer's own call, ZeRO-3
has gathered its weight, as it does for any linear layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kubetune.trainer.data import IGNORE_INDEX

# The float32 logits of one chunk: 64 MiB is 128 positions of a 128k vocabulary, 2,048 of an
# 8k one; big enough that each chunk is still one large matmul.
LOSS_CHUNK_BYTES = 64 * 2**20
# Causal LMs whose forward returns the output layer's result untouched. Others change the
# logits after it (Gemma's soft-capping, Cohere's logit_scale, Granite's logits_scaling): for
# them the loss is taken from the logits the model returns.
CHUNKED_MODEL_TYPES = frozenset({
    "gemma", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "smollm3", "starcoder2",
})


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
    chunked = chunks_the_loss(model, head)

    def trained_positions_only(_module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][:, :-1][trained], *args[1:])

    hook = head.register_forward_pre_hook(trained_positions_only)
    if chunked:  # an instance attribute: nn.Module.__call__ (and its hooks) call it instead
        head.forward = lambda hidden: chunked_cross_entropy(hidden, head.weight, head.bias, targets[trained])
    try:
        arguments = {key: value for key, value in inputs.items() if key != "labels"}
        out = model(**arguments, use_cache=False).logits  # the summed loss, or [trained tokens, vocab]
    finally:
        hook.remove()
        head.__dict__.pop("forward", None)
    count = int(trained.sum())
    if chunked:
        return out, count
    # With nothing trained the sum is 0 and still a graph through the model: under ZeRO every
    # rank must run the same backward.
    return F.cross_entropy(out.float(), targets[trained], reduction="sum"), count


def chunks_the_loss(model: Any, head: torch.nn.Module) -> bool:
    """Whether the output layer can become the loss: a plain linear layer (not one LoRA trains)
    of a model type that uses its result as the logits."""
    inner = getattr(model, "module", model)  # the DeepSpeed engine's model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    return type(head) is torch.nn.Linear and model_type in CHUNKED_MODEL_TYPES


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk_bytes: int = LOSS_CHUNK_BYTES) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")``
    holding one chunk's logits at a time. ``hidden`` is [positions, hidden]."""
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    return ChunkedCrossEntropy.apply(hidden, weight, bias, targets, rows, torch.is_grad_enabled())


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``, chunk by chunk. The forward also
    computes the gradients (d loss / d logits is softmax minus one-hot, known once a chunk's
    logits are), so the backward only scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int, grad_enabled: bool) -> torch.Tensor:
        wants = [grad_enabled and needed for needed in ctx.needs_input_grad[:3]]
        grads = [torch.zeros_like(tensor, dtype=torch.float32) if want else None
                 for tensor, want in zip((hidden, weight, bias), wants)]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part, chosen = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(part, weight, bias).float()
            normaliser = torch.logsumexp(logits, dim=-1)
            total += (normaliser - logits.gather(1, chosen[:, None]).squeeze(1)).sum()
            if not any(wants):
                continue
            d_logits = logits.sub_(normaliser[:, None]).exp_()  # softmax, in the logits' memory
            d_logits[torch.arange(len(chosen), device=chosen.device), chosen] -= 1
            if wants[0]:
                grads[0][start:start + rows] = d_logits.to(weight.dtype) @ weight
            if wants[1]:
                grads[1] += d_logits.T @ part.float()
            if wants[2]:
                grads[2] += d_logits.sum(0)
        ctx.grads = [None if grad is None else grad.to(tensor.dtype)
                     for grad, tensor in zip(grads, (hidden, weight, bias))]
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        grads, ctx.grads = ctx.grads, None
        return (*(None if grad is None else grad * grad_total.to(grad.dtype) for grad in grads), None, None, None)


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

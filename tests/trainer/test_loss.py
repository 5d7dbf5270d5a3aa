"""The training loss: the value HF computes, from fewer FLOPs.

- Right-padded batches need no attention mask in a causal LM: every real token's logits equal
  those of its example run alone (and the same comparison catches left padding, where the
  mask would matter).
- ``next_token_loss`` (output layer on trained positions only) equals HF's own loss, for
  padded, prompt-masked and packed batches, and gives the same LoRA gradients.
- The chunked loss equals the unchunked one, gradients included, for any chunk size; the
  peak memory of a step falls; a model that changes its logits after the output layer
  (Gemma 2's soft-capping) keeps HF's loss.
"""

from __future__ import annotations

from pathlib import Path

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer.batching import MicroBatch
from kubetune.trainer.data import IGNORE_INDEX, Example, collate
from kubetune.trainer.loss import chunked_cross_entropy, chunks_the_loss, next_token_loss, output_layer

LENGTHS = [23, 5, 40, 1, 17, 31]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_assets: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama", attn_implementation=request.param)
    return model.eval()


def examples(vocab: int, prompt_fraction: int = 0) -> list[Example]:
    """Random examples; with ``prompt_fraction`` k, the first n // k tokens are an untrained prompt."""
    generator = torch.Generator().manual_seed(0)
    result = []
    for n in LENGTHS:
        ids = torch.randint(6, vocab, (n,), generator=generator).tolist()  # 0-5 are special tokens
        prompt = n // prompt_fraction if prompt_fraction else 1
        result.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return result


def alone(model, example: Example) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]


def test_right_padding_needs_no_attention_mask(model) -> None:
    data = examples(model.config.vocab_size)
    inputs = collate(data, pad_token_id=0)
    assert set(inputs) == {"input_ids", "labels"}
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], use_cache=False).logits
    for row, example in enumerate(data):
        n = len(example.input_ids)
        assert torch.allclose(logits[row, :n], alone(model, example), atol=1e-5)


def test_the_same_check_fails_for_left_padding_without_a_mask(model) -> None:
    # Negative control: with padding BEFORE the tokens (and no mask) real tokens attend to it.
    data = examples(model.config.vocab_size)
    width = max(len(e.input_ids) for e in data)
    ids = torch.zeros((len(data), width), dtype=torch.long)
    for row, example in enumerate(data):
        ids[row, width - len(example.input_ids) :] = torch.tensor(example.input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    short = min(range(len(data)), key=lambda r: len(data[r].input_ids))
    gap = (logits[short, -len(data[short].input_ids) :] - alone(model, data[short])).abs().max()
    assert gap > 1e-2


def hf_loss(model, inputs: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    return model(**inputs, **extra, use_cache=False).loss


def attention_mask(data: list[Example], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mask HF would be given for this right-padded batch: 1 on real tokens."""
    width = inputs["input_ids"].shape[1]
    return (torch.arange(width) < torch.tensor([[len(e.input_ids)] for e in data])).long()


@pytest.mark.parametrize("prompt_fraction", [0, 2], ids=["text", "prompt-masked"])
def test_loss_equals_hf_loss_on_padded_batches(model, prompt_fraction: int) -> None:
    data = examples(model.config.vocab_size, prompt_fraction)
    inputs = collate(data, pad_token_id=0)
    with torch.no_grad():
        summed, count = next_token_loss(model, output_layer(model), inputs)
        expected = hf_loss(model, inputs, attention_mask=attention_mask(data, inputs))
    assert count == sum(e.trained_tokens for e in data)
    assert torch.allclose(summed / count, expected, atol=1e-5)


def test_loss_equals_hf_loss_on_packed_batches(model) -> None:
    data = examples(model.config.vocab_size, 3)
    inputs = MicroBatch((tuple(data[:3]), tuple(data[3:])), packed=True).tensors(pad_token_id=0)
    with torch.no_grad():
        summed, count = next_token_loss(model, output_layer(model), inputs)
        expected = hf_loss(model, inputs)
    assert torch.allclose(summed / count, expected, atol=1e-5)


def test_lora_gradients_equal_those_of_hf_loss(tiny_assets: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    data = examples(model.config.vocab_size, 2)
    inputs = collate(data, pad_token_id=0)

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    summed, count = next_token_loss(model, output_layer(model), inputs)
    ours = gradients(summed / count)
    theirs = gradients(hf_loss(model, inputs, attention_mask=attention_mask(data, inputs)))
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_batch_with_nothing_to_train_gives_zero_loss_that_still_backpropagates(tiny_assets: Path) -> None:
    # Every rank must run the same backward under ZeRO, even on a batch whose labels are all masked.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inputs = collate([Example([7, 8, 9], [IGNORE_INDEX] * 3)], pad_token_id=0)
    loss, count = next_token_loss(model, output_layer(model), inputs)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_hook_is_removed_even_when_the_forward_fails(tiny_assets: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama")
    head = output_layer(model)
    bad = {"input_ids": torch.tensor([[10**6]]), "labels": torch.tensor([[1]])}  # id past the vocabulary
    with pytest.raises(IndexError):
        next_token_loss(model, head, bad)
    assert not head._forward_pre_hooks and "forward" not in vars(head)


@pytest.mark.parametrize("chunk_bytes", [4 * 97 * 1, 4 * 97 * 7, 2**30], ids=["1-row", "7-rows", "one-chunk"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(chunk_bytes: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(45, 16, generator=generator, requires_grad=True)
    weight = torch.randn(97, 16, generator=generator, requires_grad=True)
    bias = torch.randn(97, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 97, (45,), generator=generator)
    leaves = [hidden, weight] + ([bias] if with_bias else [])

    def loss_and_gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss * 0.37, leaves)  # a scale, as the caller's 1 / tokens
        return [loss.detach(), *grads]

    ours = loss_and_gradients(chunked_cross_entropy(hidden, weight, bias, targets, chunk_bytes=chunk_bytes))
    theirs = loss_and_gradients(F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum"))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_chunked_loss_computes_no_gradient_under_no_grad() -> None:
    hidden, weight = torch.randn(8, 4, requires_grad=True), torch.randn(11, 4)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, None, torch.zeros(8, dtype=torch.long))
    assert not loss.requires_grad


PEAK = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from kubetune.trainer.loss import chunked_cross_entropy

    def status(key):  # kB, from the kernel's account of this process
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    torch.manual_seed(0)
    # A micro-batch's trained positions and a 32k vocabulary (Llama 2's): 256 MiB of logits.
    hidden = torch.randn(2048, 64, requires_grad=True)
    weight, targets = torch.randn(32768, 64), torch.randint(0, 32768, (2048,))
    # The peak resident set counts again from here (an earlier peak, such as torch's import,
    # would otherwise hide this one).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    if sys.argv[1] == "chunked":
        loss = chunked_cross_entropy(hidden, weight, None, targets)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    loss.backward()
    print(json.dumps({"loss": loss.item(), "grad": hidden.grad.norm().item(),
                      "peak_kib": status("VmHWM") - before}))
""")


def test_the_chunked_loss_lowers_the_peak_memory_of_a_step() -> None:
    def run(how: str) -> dict:
        done = subprocess.run([sys.executable, "-c", PEAK, how], capture_output=True, text=True, check=True,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        return json.loads(done.stdout.strip().splitlines()[-1])

    chunked, full = run("chunked"), run("full")
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert chunked["grad"] == pytest.approx(full["grad"], rel=1e-5)
    # Unchunked: the logits, their log-softmax and its gradient, 256 MiB each. Chunked: a 64 MiB
    # chunk and the log-sum-exp's temporaries (measured: 775 and 204 MiB).
    assert full["peak_kib"] > 512 * 1024
    assert chunked["peak_kib"] < full["peak_kib"] / 2


def test_a_model_that_changes_its_logits_after_the_output_layer_keeps_hf_loss() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config).eval()
    assert not chunks_the_loss(model, output_layer(model))
    data = examples(config.vocab_size, 2)
    inputs = collate(data, pad_token_id=0)
    with torch.no_grad():
        summed, count = next_token_loss(model, output_layer(model), inputs)
        expected = hf_loss(model, inputs, attention_mask=attention_mask(data, inputs))
    assert torch.allclose(summed / count, expected, atol=1e-5)


def test_the_tiny_llama_takes_the_chunked_path(model) -> None:
    assert chunks_the_loss(model, output_layer(model))

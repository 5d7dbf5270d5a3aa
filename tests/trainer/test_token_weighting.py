"""An optimizer step follows the mean loss over every trained token of its global batch, the
way HF's Trainer weighs tokens: a micro-batch of short examples must not count as much as one
of long examples. Runs the recipe's training loop under a real DeepSpeed engine (ZeRO-2, one
process, two accumulation steps) and compares one SGD step with the reference gradient."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kubetune.api.trainer_config import parse_config
from kubetune.trainer.data import IGNORE_INDEX, Example, collate
from kubetune.trainer.train import LoRAFineTuneRecipe, StepPlan, deepspeed_config

LEARNING_RATE = 0.5


@pytest.fixture
def process_group(monkeypatch: pytest.MonkeyPatch, unused_port):
    import deepspeed

    from kubetune.trainer.train import _without_shm_comm_op

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(unused_port())}.items():
        monkeypatch.setenv(key, value)
    _without_shm_comm_op(deepspeed)  # as the recipe joins its group: else a minute compiling an unused op
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()


def _lora_model(tiny_assets: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama")
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _examples() -> list[Example]:
    # Two short and two long examples: whichever way they are batched, the micro-batches differ
    # a lot in tokens, so the two weightings give clearly different gradients.
    generator = torch.Generator().manual_seed(1)
    result = []
    for n in (4, 5, 60, 64):
        ids = torch.randint(6, 300, (n,), generator=generator).tolist()
        result.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    return result


def _lora(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_one_step_descends_the_token_mean_of_the_global_batch(process_group, tiny_assets: Path) -> None:
    import deepspeed

    from kubetune.trainer.batching import batches_for_epoch

    config = parse_config({
        "schemaVersion": 1,
        "model": {"uri": "s3://models/x/"}, "dataset": {"uri": "s3://data/x.jsonl"}, "output": {"adapterUri": "s3://adapters/x/"},
        "training": {"microBatchSize": 2, "globalBatchSize": 4, "learningRate": LEARNING_RATE, "gradientClipping": 0,
                     "sequenceLength": 64, "logEverySteps": 1, "seed": 5},
        "deepspeed": {"zeroStage": 2},
    })
    data = _examples()
    model = _lora_model(tiny_assets)
    reference = copy.deepcopy(model)
    before = _lora(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config, 1))
    recipe = LoRAFineTuneRecipe(config)  # set up by hand: this engine, these four examples, one step
    recipe.engine, recipe.train_set, recipe.plan, recipe.pad_id = engine, data, StepPlan(1, 1), 0
    recipe.train()
    progress = recipe.progress
    moved = {name: value - before[name] for name, value in _lora(engine.module).items()}

    # The reference: one batch of all four examples, HF's own loss (the mean over all tokens).
    whole = collate(data, pad_token_id=0)
    mask = (torch.arange(whole["input_ids"].shape[1]) < torch.tensor([[len(e.input_ids)] for e in data])).long()
    token_mean = reference(**whole, attention_mask=mask).loss
    token_mean.backward()
    expected = {name: -LEARNING_RATE * p.grad for name, p in reference.named_parameters() if p.requires_grad}
    assert progress.steps == 1 and progress.last_loss == pytest.approx(token_mean.item(), abs=1e-5)
    for name, delta in expected.items():
        assert torch.allclose(moved[name], delta, atol=1e-6), name

    # What the step would have been with each micro-batch's mean weighted equally: different.
    reference.zero_grad()
    micro_batches = batches_for_epoch(data, micro_batch_size=2, world_size=1, rank=0, seed=5, epoch=0)
    mean_of_means = sum(reference(**b.tensors(0)).loss for b in micro_batches) / len(micro_batches)
    mean_of_means.backward()
    gap = max((-LEARNING_RATE * p.grad - expected[name]).abs().max().item()
              for name, p in reference.named_parameters() if p.requires_grad)
    assert gap > 100 * 1e-6

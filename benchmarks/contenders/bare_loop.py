"""Contender: the bare loop. The same work as kubetune's trainer (its batches, its loss, LoRA
under DeepSpeed ZeRO-2, the same schedule) with nothing else: no S3, no config checks, no
metrics, logging, checkpoints or publishing. kubetune's distance to it is its overhead.

Run under torchrun; writes the adapter to ``--out`` and ``{"tokens", "trainSeconds",
"peakMemoryBytes"}`` to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workload import Workload, examples, peak_memory_all_ranks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    w = Workload.from_file(args.workload)

    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from kubetune.trainer.batching import batches_for_epoch
    from kubetune.trainer.loss import next_token_loss, output_layer, trained_tokens_all_ranks
    from kubetune.trainer.schedule import lr_lambda

    deepspeed.init_distributed("gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    accumulation = w.global_batch_size // (w.micro_batch_size * world_size)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = batches_for_epoch(examples(w, tokenizer, args.train), micro_batch_size=w.micro_batch_size, world_size=world_size, rank=rank,
                                seed=w.seed, epoch=0)
    steps = len(batches) // accumulation
    batches = batches[: steps * accumulation]

    set_seed(w.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(w.lora_targets), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=w.learning_rate,
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(w.warmup_steps, steps, w.learning_rate, 0.0))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config={
        "train_batch_size": w.global_batch_size, "train_micro_batch_size_per_gpu": w.micro_batch_size,
        "gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 1 << 30,
    })
    head = output_layer(engine.module)
    pad_id = tokenizer.pad_token_id

    engine.train()
    tokens = positions = 0
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        if index % accumulation == 0:  # tokens of the whole optimizer step, all ranks
            step_tokens = trained_tokens_all_ranks(batches[index : index + accumulation])
        inputs = batch.tensors(pad_id)
        summed, _ = next_token_loss(engine, head, inputs)
        engine.backward(summed * (accumulation * world_size / step_tokens))
        engine.step()
        tokens += batch.tokens
        positions += inputs["input_ids"].numel()
    seconds = time.perf_counter() - started

    totals = torch.tensor([tokens, positions], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    peak = peak_memory_all_ranks()
    if rank == 0:
        engine.module.save_pretrained(args.out)
        args.result.write_text(json.dumps({"tokens": int(totals[0]), "positions": int(totals[1]),
                                           "trainSeconds": seconds, "steps": steps, "peakMemoryBytes": peak}))


if __name__ == "__main__":
    main()

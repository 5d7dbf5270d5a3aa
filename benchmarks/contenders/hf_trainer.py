"""Contender: Hugging Face ``Trainer`` + PEFT LoRA + its DeepSpeed integration (ZeRO-2), the
stack kubetune users would otherwise pick. Run under torchrun, one variant per run:

- ``default``: dynamic padding to the longest example of each batch, random order
  (``DataCollatorForSeq2Seq``: it pads the labels too, which carry the chat workload's mask);
- ``group_by_length``: ``train_sampling_strategy="group_by_length"``, its best stock setting on CPU;
- ``flatten``: padding-free ``DataCollatorWithFlattening`` (examples concatenated, position ids
  restart per example).

Every variant trains on the tokens and labels kubetune's reader makes (``workload.examples``).
Writes the adapter to ``--out`` and ``{"tokens", "trainSeconds", "peakMemoryBytes", ...}`` to
``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# DeepSpeed on a CPU-only host: HF only enables it when accelerate is told to, and the process
# group must be gloo (use_cpu=True would silently turn DeepSpeed off).
os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workload import Workload, examples, peak_memory_all_ranks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["default", "group_by_length", "flatten"], required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--workload", type=Path, required=True, help="workload.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    workload = Workload.from_file(args.workload)

    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments, set_seed)

    from kubetune.trainer.schedule import lr_lambda

    PartialState(backend="gloo")
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    accumulation = workload.global_batch_size // (workload.micro_batch_size * world_size)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    features = [{"input_ids": example.input_ids, "labels": example.labels}
                for example in examples(workload, tokenizer, args.train)]
    set_seed(workload.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    model.config.use_cache = False  # padding-free batches are only isolated per example without a cache
    model = get_peft_model(model, LoraConfig(r=workload.lora_r, lora_alpha=workload.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(workload.lora_targets), task_type="CAUSAL_LM"))

    if args.variant == "flatten":
        collate = DataCollatorWithFlattening()
    else:
        collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    counter = _TokenCounter(collate)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.seconds = time.perf_counter() - self.begin

    clock = Clock()
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=workload.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        learning_rate=workload.learning_rate,
        lr_scheduler_type="cosine",  # not used: SameCurve.create_scheduler below
        warmup_steps=workload.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=workload.seed,
        dataloader_drop_last=True,
        train_sampling_strategy="group_by_length" if args.variant == "group_by_length" else "random",
        disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
        deepspeed={
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        },
    )
    class SameCurve(Trainer):
        """kubetune's learning-rate curve. HF's warm-up starts at 0, so its first step does not
        move; over the chat workload's 8 steps (4 of warm-up) it would take 20% less of the peak
        rate in all, and end 0.2 nats higher for that alone. The eval losses compare trainers."""

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lr_lambda(
                    workload.warmup_steps, num_training_steps, workload.learning_rate, 0.0))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = SameCurve(model=model, args=training_args, train_dataset=features, data_collator=counter,
                        callbacks=[clock])
    trainer.train()

    totals = torch.tensor([counter.tokens, counter.positions], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    peak = peak_memory_all_ranks()
    if rank == 0:
        trainer.model.save_pretrained(args.out)
        args.result.write_text(json.dumps({
            "tokens": int(totals[0]), "positions": int(totals[1]), "trainSeconds": clock.seconds,
            "steps": trainer.state.global_step, "peakMemoryBytes": peak,
        }))


class _TokenCounter:
    """Wraps a collator to count real tokens and token positions (padding included) per rank."""

    def __init__(self, collate) -> None:
        self.collate, self.tokens, self.positions = collate, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.tokens += sum(len(f["input_ids"]) for f in features)
        self.positions += batch["input_ids"].numel()
        return batch


if __name__ == "__main__":
    main()

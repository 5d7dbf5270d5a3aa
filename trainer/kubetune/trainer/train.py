"""LoRA fine-tuning recipe: PEFT LoRA adapters trained with DeepSpeed ZeRO over torchrun.

Every worker pod of a FineTuneJob runs this. Launch commands (the operator renders them):

  one node, P processes (P GPUs, or P CPU processes for tests)::

      torchrun --nnodes=1 --nproc-per-node=P -m kubetune.trainer --config /etc/kubetune/config.yaml

  N nodes (pod K of N; pod 0 hosts the rendezvous)::

      torchrun --nnodes=N --nproc-per-node=P --node-rank=K \\
          --master-addr=<job>-worker-0.<job>-workers --master-port=29500 \\
          -m kubetune.trainer --config /etc/kubetune/config.yaml

The recipe, top to bottom:

  setup    read + check the config (before any network, so mistakes fail fast)
           -> join the process group (gloo on CPU, nccl on GPU)
           -> every node's local rank 0 downloads model + data (pods share no filesystem)
           -> load model and tokenizer, wrap with LoRA -> tokenize -> DeepSpeed engine
           -> with output.checkpointUri: resume from the newest complete checkpoint
              (checkpoint.py: DeepSpeed state, data position, RNG states)
  train    epochs x micro-batches; DeepSpeed accumulates gradients up to globalBatchSize and
           steps the optimizer; stops at maxSteps; rank 0 logs and updates /metrics;
           evaluates at each epoch end; checkpoints every checkpointEverySteps, at epoch ends
           and at the end (uploads in the background)
  gate     final evaluation; above qualityGate.maxEvalLoss every rank exits 1, nothing published
  save     gather the LoRA weights (ZeRO-3 shards them) -> save_pretrained on rank 0
  publish  rank 0 stages adapter + tokenizer beside adapterUri, verifies, copies them in,
           then writes manifest.json last (publish.py)
  cleanup  barrier, leave the process group, remove the downloads

GPU path: with CUDA visible, each process takes ``cuda:LOCAL_RANK``, the backend is nccl and
``precision: auto`` means bf16. It is written to the same DeepSpeed API as the CPU path but
only the CPU path runs in this project's CI (tests marked ``gpu`` cover the rest).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubetune.api.trainer_config import TrainerConfig, load_config
from kubetune.trainer.errors import TrainerError
from kubetune.trainer.metrics import progress_bar

log = logging.getLogger("kubetune.trainer")


@dataclass(frozen=True)
class Topology:
    """Where this process sits, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int
    node_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0


def run(config: TrainerConfig | str | Path) -> dict[str, Any] | None:
    """Train and publish per ``config`` (or the file it names); rank 0 returns the results."""
    # ---- Setup 1: config and topology (no network yet: wrong configs fail in milliseconds)
    if not isinstance(config, TrainerConfig):
        config = load_config(config)
    topo = _topology_from_env()
    _configure_logging(topo)
    accumulation = gradient_accumulation_steps(config, topo.world_size)
    device = _pick_device(topo)
    _check_precision(config, device)
    _respect_omp_num_threads()

    # Imported here, not at the top: it takes seconds and probes for accelerators.
    import deepspeed

    _configure_logging(topo)  # again: importing deepspeed resets its logger to INFO
    metrics = _start_metrics(config, topo)

    # ---- Setup 2: join the process group. nccl for GPUs; gloo is the CPU backend.
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    try:
        results = _train_and_publish(config, topo, device, accumulation, metrics)
    finally:
        # ---- Cleanup: leave the process group even on failure so torchrun sees a clean exit code.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return results


def _train_and_publish(
    config: TrainerConfig, topo: Topology, device: torch.device, accumulation: int, metrics: Any
) -> dict[str, Any] | None:
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    from kubetune.trainer.data import prepare_datasets
    from kubetune.trainer.publish import publish_adapter
    from kubetune.trainer.s3 import make_client

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per rank is noise in pod logs
    workdir = _workdir(config, topo)
    model_dir, data_path = workdir / "model", workdir / "data" / "train.jsonl"
    s3 = make_client(config.storage)

    # ---- Setup 3: download. Pods share no filesystem, so the first process of EVERY node
    # downloads; the others wait at the barrier (which also waits for all nodes).
    if topo.is_node_main:
        _download_inputs(s3, config, model_dir, data_path)
    torch.distributed.barrier()

    # ---- Setup 4: tokenizer and data first: a bad dataset fails before the model loads.
    # Every rank tokenizes the whole file (cheap next to training) and later takes its own
    # share of each epoch's batches.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss anyway
    datasets = prepare_datasets(
        data_path,
        _validation_path(data_path) if config.dataset.validation_uri else None,
        tokenizer,
        config.dataset,
        config.training.sequence_length,
        config.training.seed,
    )
    if topo.is_main:
        for note in datasets.notes:  # truncated / dropped examples, counted
            log.info("%s", note)
    train_set, validation_set = datasets.train, datasets.validation
    plan = _plan_steps(config, topo, train_set, accumulation)

    # ---- Setup 5: model wrapped with LoRA. Same seed everywhere: identical LoRA init.
    set_seed(config.training.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_load_dtype(config, device))
    model.config.use_cache = False  # training never reuses the KV cache
    if config.training.gradient_checkpointing:
        # With the base model frozen no input of a checkpointed block requires grad, and the
        # reentrant variant would then drop the LoRA gradients: non-reentrant, plus embeddings
        # whose output requires grad (PEFT's own recipe).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = config.lora
    try:
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as exc:
        raise TrainerError(f"lora.targetModules {list(lora.target_modules)}: {exc}") from None

    # ---- Setup 6: DeepSpeed engine around the LoRA model with a torch AdamW over the
    # trainable (LoRA) parameters only; linear warm-up then cosine decay. The scheduler goes
    # to deepspeed.initialize so its state is in every checkpoint (resume continues the curve).
    from kubetune.trainer.schedule import lr_lambda

    training = config.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training.warmup_steps, plan.total_steps, training.learning_rate, training.min_learning_rate)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, topo.world_size),
    )
    pad_id = tokenizer.pad_token_id
    if metrics:
        metrics.total_steps.set(plan.total_steps)
    on_upload = metrics.checkpoint_upload_seconds.observe if metrics else None

    # ---- Setup 7: resume from the newest complete checkpoint, if checkpoints are on.
    checkpointer, resumed = None, None
    if config.output.checkpoint_uri:
        from kubetune.trainer.checkpoint import Checkpointer, local_world_size

        checkpointer = Checkpointer(
            s3, config.output.checkpoint_uri, config.output.keep_checkpoints, workdir / "checkpoints",
            topo.rank, topo.local_rank, local_world_size(), on_upload=on_upload,
        )
        resumed = checkpointer.resume(engine)

    if resumed is None:
        initial_eval = _evaluate(engine, validation_set, config, topo, device, pad_id)
    else:
        initial_eval = resumed.trainer_state.get("initialEvalLoss")
    if metrics and initial_eval is not None:
        metrics.eval_loss.set(initial_eval)
    if topo.is_main:
        log.info(
            "start job=%s/%s world_size=%d zero_stage=%d steps=%d accumulation=%d train_examples=%d "
            "validation_examples=%d from_step=%d",
            config.job.namespace, config.job.name, topo.world_size, config.deepspeed.zero_stage,
            plan.total_steps, accumulation, len(train_set), len(validation_set),
            resumed.position.step if resumed else 0,
        )

    # ---- Train (evaluating at each epoch end, checkpointing as configured)
    evaluate = functools.partial(_evaluate, engine, validation_set, config, topo, device, pad_id)
    progress = _train_loop(
        engine, config, topo, device, pad_id, train_set, plan, metrics,
        checkpointer=checkpointer, resumed=resumed, evaluate=evaluate, initial_eval=initial_eval,
    )
    final_eval = evaluate()
    if metrics and final_eval is not None:
        metrics.eval_loss.set(final_eval)
    if checkpointer:
        checkpointer.finish()
    if topo.is_main and final_eval is not None:
        log.info("final eval_loss=%.6f", final_eval)
    _check_quality_gate(config, final_eval)

    # ---- Save: under ZeRO-3 each rank holds a slice of every LoRA tensor; all ranks must
    # enter GatheredParameters (a collective), then rank 0 writes full tensors.
    adapter_dir = workdir / "adapter"
    lora_params = [p for name, p in engine.module.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters(lora_params, enabled=config.deepspeed.zero_stage == 3):
        if any(p.numel() == 0 for p in lora_params):  # would publish an adapter of empty tensors
            raise RuntimeError("LoRA parameters are still partitioned at save time")
        if topo.is_main:
            engine.module.save_pretrained(adapter_dir, safe_serialization=True)
            tokenizer.save_pretrained(adapter_dir)

    # ---- Publish (rank 0): adapter files first, manifest.json last.
    results = None
    if topo.is_main:
        results = {
            "steps": progress.steps,
            "totalSteps": plan.total_steps,
            "epochs": progress.epoch,
            "initialLoss": progress.first_loss,
            "finalLoss": progress.last_loss,
            "initialEvalLoss": initial_eval,
            "evalLoss": final_eval,
            "evalHistory": progress.evals,
            "lossHistory": progress.history,
            "tokens": progress.tokens,
            "positions": progress.positions,
            "trainSeconds": round(progress.seconds, 3),
            "worldSize": topo.world_size,
            "resumedFromStep": resumed.position.step if resumed else None,
        }
        publish_adapter(s3, adapter_dir, config, results)
        log.info(
            "done steps=%d final_loss=%.4f eval_loss=%s adapter=%s",
            progress.steps, progress.last_loss, _fmt(final_eval), config.output.adapter_uri,
        )

    # ---- Cleanup: nobody leaves before the adapter is published, then drop the downloads.
    torch.distributed.barrier()
    if topo.is_node_main:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int


@dataclass
class Progress:
    steps: int = 0
    epoch: float = 0.0
    tokens: int = 0
    positions: int = 0
    """Token positions run through the model, padding included (tokens / positions = how
    much of the compute trained something)."""
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    history: list = field(default_factory=list)
    """[step, mean loss over all ranks since the previous log line] per log line."""
    evals: list = field(default_factory=list)
    """{"epoch", "step", "evalLoss"} at each epoch end."""

    def to_state(self, initial_eval: float | None) -> dict[str, Any]:
        """What a checkpoint keeps so the resumed run reports the whole run."""
        return {"steps": self.steps, "epoch": self.epoch, "tokens": self.tokens, "positions": self.positions,
                "seconds": self.seconds,
                "firstLoss": self.first_loss, "lastLoss": self.last_loss, "history": self.history,
                "evals": self.evals, "initialEvalLoss": initial_eval}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(state["steps"], state["epoch"], state["tokens"], state.get("positions", 0), state["seconds"],
                   state["firstLoss"], state["lastLoss"], list(state["history"]), list(state["evals"]))


def _check_quality_gate(config: TrainerConfig, eval_loss: float | None) -> None:
    """Every rank raises the same error, so every worker exits 1 with the reason."""
    gate = config.quality_gate.max_eval_loss
    if gate is not None and eval_loss is not None and eval_loss > gate:
        raise TrainerError(f"eval loss {eval_loss:.4f} > qualityGate.maxEvalLoss {gate:g}: adapter not published")


def _train_loop(
    engine: Any,
    config: TrainerConfig,
    topo: Topology,
    device: torch.device,
    pad_id: int,
    train_set: list,
    plan: StepPlan,
    metrics: Any,
    *,
    checkpointer: Any = None,
    resumed: Any = None,
    evaluate: Any = lambda: None,
    initial_eval: float | None = None,
) -> Progress:
    from kubetune.trainer.checkpoint import Position
    from kubetune.trainer.loss import next_token_loss, output_layer, trained_tokens_all_ranks

    training = config.training
    head = output_layer(engine.module)
    accumulation = engine.gradient_accumulation_steps()
    every = config.output.checkpoint_every_steps
    fault_step = int(os.environ.get("KUBETUNE_FAULT_AFTER_STEP", "0"))  # tests only: rank 0 dies hard
    progress = Progress.from_state(resumed.trainer_state) if resumed else Progress()
    start = resumed.position if resumed else Position(0, 0, 0)
    # Sums since the last log line: [summed loss, trained tokens, real tokens, token
    # positions incl. padding, examples]. Checkpoints of older trainers kept only 3.
    saved = list(resumed.rank_state["window"]) if resumed else []
    window = torch.tensor(saved + [0.0] * (5 - len(saved)), dtype=torch.float64)
    bar = progress_bar(plan.total_steps, progress.steps, enabled=topo.is_main)
    lr = grad_norm = None
    window_start = started = time.perf_counter()
    seconds_before = progress.seconds
    engine.train()
    for epoch in range(start.epoch, training.epochs):
        if progress.steps >= plan.total_steps:
            break
        # 1. This epoch's micro-batches for this rank: same count on every rank, a multiple
        #    of the accumulation steps so every optimizer step is complete. They depend only
        #    on (seed, epoch), so a resumed run skips to its saved batch index.
        batches = _epoch_batches(config, topo, train_set, epoch)[: plan.steps_per_epoch * accumulation]
        first = start.batch if epoch == start.epoch else 0
        for index in range(first, len(batches)):
            if index % accumulation == 0:  # an optimizer step begins: how many tokens it trains
                step_tokens = trained_tokens_all_ranks(batches[index : index + accumulation])
            inputs = {k: v.to(device) for k, v in batches[index].tensors(pad_id).items()}
            # 2. Forward: summed cross-entropy over the trained tokens, with the output layer
            #    run on those positions only (loss.py). No KV cache: with one, HF ignores packed
            #    rows' position_ids and lets the examples of a row attend to each other.
            summed, trained = next_token_loss(engine, head, inputs)
            boundary = engine.is_gradient_accumulation_boundary()
            # 3. Backward and step: DeepSpeed divides by the accumulation steps and averages
            #    over ranks (ZeRO shards the gradients), so this scale makes the gradient that of
            #    the mean over every token of the global batch: a micro-batch of short examples
            #    weighs what its tokens weigh, as in HF's Trainer. It then clips to
            #    gradientClipping and steps AdamW + the LR schedule at accumulation boundaries.
            engine.backward(summed * (accumulation * topo.world_size / step_tokens))
            if boundary:
                lr = engine.get_lr()[0]  # before step(): the rate this step uses, not the next one's
            engine.step()
            window += torch.tensor(
                [summed.item(), float(trained), float(batches[index].tokens), float(inputs["input_ids"].numel()),
                 float(len(batches[index].examples))],
                dtype=torch.float64,
            )
            if (index + 1) % accumulation:
                continue
            grad_norm = engine.get_global_grad_norm()
            progress.steps += 1
            bar.update(1)
            progress.epoch = epoch + (index + 1) / len(batches)
            last = progress.steps == plan.total_steps
            epoch_end = index + 1 == len(batches)
            # 4. Log every logEverySteps (and at the end): mean loss over all ranks since the
            #    last line. The all_reduce is collective, so every rank takes this branch.
            if progress.steps % training.log_every_steps == 0 or last:
                torch.distributed.all_reduce(window)
                now = time.perf_counter()
                mean_loss = float(window[0] / max(window[1], 1.0))
                elapsed = max(now - window_start, 1e-9)
                tokens_per_second = float(window[2]) / elapsed
                padded_tokens_per_second = float(window[3]) / elapsed
                samples_per_second = float(window[4]) / elapsed
                grad_norm = None if grad_norm is None else float(grad_norm)
                progress.tokens += int(window[2])
                progress.positions += int(window[3])
                progress.first_loss = mean_loss if progress.first_loss is None else progress.first_loss
                progress.last_loss = mean_loss
                progress.history.append([progress.steps, mean_loss])
                if topo.is_main:
                    log.info(
                        "step=%d/%d epoch=%.2f loss=%.4f lr=%.6g grad_norm=%s tokens_per_s=%.1f "
                        "padded_tokens_per_s=%.1f samples_per_s=%.2f",
                        progress.steps, plan.total_steps, progress.epoch, mean_loss, lr,
                        _fmt(grad_norm), tokens_per_second, padded_tokens_per_second, samples_per_second,
                    )
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", refresh=False)
                if metrics:
                    metrics.step.set(progress.steps)
                    metrics.epoch.set(progress.epoch)
                    metrics.loss.set(mean_loss)
                    metrics.learning_rate.set(lr)
                    if grad_norm is not None:
                        metrics.grad_norm.set(grad_norm)
                    metrics.tokens_per_second.set(tokens_per_second)
                    metrics.padded_tokens_per_second.set(padded_tokens_per_second)
                    metrics.samples_per_second.set(samples_per_second)
                    if metrics.gpu_memory_bytes is not None:
                        metrics.gpu_memory_bytes.set(torch.cuda.max_memory_allocated(device))
                window.zero_()
                window_start = now
            # 5. Evaluate at each epoch end (the final evaluation follows the loop).
            if epoch_end and not last:
                eval_loss = evaluate()
                if eval_loss is not None:
                    if metrics:
                        metrics.eval_loss.set(eval_loss)
                    progress.evals.append({"epoch": epoch + 1, "step": progress.steps, "evalLoss": eval_loss})
                    if topo.is_main:
                        log.info("epoch=%d step=%d eval_loss=%.4f", epoch + 1, progress.steps, eval_loss)
            # 6. Checkpoint every checkpointEverySteps, at each epoch end and at the end; the
            #    upload runs in the background.
            if checkpointer and (epoch_end or last or (every and progress.steps % every == 0)):
                progress.seconds = seconds_before + time.perf_counter() - started
                position = Position(progress.steps, epoch + 1, 0) if epoch_end else Position(progress.steps, epoch, index + 1)
                checkpointer.save(engine, position, progress.to_state(initial_eval), {"window": window.tolist()})
            if fault_step and progress.steps == fault_step and topo.is_main:
                log.warning("KUBETUNE_FAULT_AFTER_STEP=%d: rank 0 exits hard now", fault_step)
                logging.shutdown()
                os._exit(3)
            # 7. Stop at maxSteps, possibly mid-epoch.
            if last:
                break
        else:
            continue
        break  # maxSteps reached mid-epoch
    bar.close()
    progress.seconds = seconds_before + time.perf_counter() - started
    return progress


def _evaluate(
    engine: Any, examples: list, config: TrainerConfig, topo: Topology, device: torch.device, pad_id: int
) -> float | None:
    """Token-weighted mean loss over the validation split, computed by all ranks together.

    Ranks with no batch left run batch 0 with weight 0: under ZeRO-3 every forward is a
    collective (parameters are gathered), so all ranks must run the same number of them.
    """
    from kubetune.trainer.data import collate
    from kubetune.trainer.loss import next_token_loss, output_layer

    if not examples:
        return None
    size = config.training.micro_batch_size
    # The token-weighted mean does not depend on the order; sorted by length, batches pad little.
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    totals = torch.zeros(2, dtype=torch.float64)  # [summed loss, tokens]
    head = output_layer(engine.module)
    engine.eval()
    with torch.no_grad():
        for j in range(math.ceil(len(batches) / topo.world_size)):
            index = topo.rank + j * topo.world_size
            real = index < len(batches)
            inputs = {k: v.to(device) for k, v in collate(batches[index if real else 0], pad_id).items()}
            summed, count = next_token_loss(engine, head, inputs)
            if real:
                totals += torch.tensor([summed.item(), float(count)], dtype=torch.float64)
    engine.train()
    torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else None


def gradient_accumulation_steps(config: TrainerConfig, world_size: int) -> int:
    """globalBatchSize / (microBatchSize x world size); it must divide exactly."""
    training = config.training
    per_pass = training.micro_batch_size * world_size
    if training.global_batch_size % per_pass:
        raise TrainerError(
            f"training.globalBatchSize ({training.global_batch_size}) must be a multiple of "
            f"training.microBatchSize ({training.micro_batch_size}) x world size ({world_size}) "
            f"= {per_pass}; change either field or workers.replicas / gpusPerWorker"
        )
    return training.global_batch_size // per_pass


def deepspeed_config(config: TrainerConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``config`` on ``world_size`` processes."""
    from kubetune.trainer.schedule import deep_merge

    training, ds = config.training, config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # The default threshold (1e5 elements) keeps small tensors whole on every rank, so
        # LoRA matrices would never be partitioned; 0 shards every parameter.
        zero["stage3_param_persistence_threshold"] = 0
    precision = _resolved_precision(config, torch.cuda.is_available())
    generated = {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, world_size),
        "gradient_clipping": training.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # We bring torch's AdamW: DeepSpeed calls it "untested" with ZeRO, and with offload
        # would otherwise insist on its own compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # progress lines are ours (rank 0, logEverySteps)
        "wall_clock_breakdown": False,
        # Pods share no filesystem: the first process of every node writes the shared files
        # of a checkpoint to its own disk (each node uploads its part to checkpointUri).
        "checkpoint": {"use_node_local_storage": True},
    }
    # deepspeed.config (experts): merged last; keys kubetune derives were refused when parsing.
    return deep_merge(generated, ds.config) if ds.config else generated


def _epoch_batches(config: TrainerConfig, topo: Topology, train_set: list, epoch: int) -> list:
    """This rank's micro-batches of ``epoch``: a pure function of data, seed, epoch and rank."""
    from kubetune.trainer.batching import batches_for_epoch

    training = config.training
    return batches_for_epoch(
        train_set, micro_batch_size=training.micro_batch_size, world_size=topo.world_size, rank=topo.rank,
        seed=training.seed, epoch=epoch, packing=training.packing, sequence_length=training.sequence_length,
    )


def _plan_steps(config: TrainerConfig, topo: Topology, train_set: list, accumulation: int) -> StepPlan:
    training = config.training
    per_rank = len(_epoch_batches(config, topo, train_set, 0))  # the same count every epoch
    steps_per_epoch = per_rank // accumulation
    if steps_per_epoch == 0:
        packed = (
            " packed into rows of training.sequenceLength tokens (with training.packing, batch "
            "sizes count rows)" if training.packing else ""
        )
        raise TrainerError(
            f"dataset {config.dataset.uri} has {len(train_set)} training examples{packed}, fewer than one "
            f"global batch (training.globalBatchSize = {training.global_batch_size}): add data or "
            "lower training.globalBatchSize"
        )
    total = steps_per_epoch * training.epochs
    if training.max_steps is not None:
        total = min(total, training.max_steps)
    return StepPlan(steps_per_epoch, total)


def _download_inputs(s3: Any, config: TrainerConfig, model_dir: Path, data_path: Path) -> None:
    from kubetune.trainer.s3 import download_file, download_prefix

    started = time.perf_counter()
    shutil.rmtree(model_dir, ignore_errors=True)
    download_prefix(s3, config.model.uri, model_dir)
    download_file(s3, config.dataset.uri, data_path)
    if config.dataset.validation_uri:
        download_file(s3, config.dataset.validation_uri, _validation_path(data_path))
    if not (model_dir / "config.json").is_file():
        raise TrainerError(
            f"{config.model.uri} has no config.json: model.uri must be a folder written by "
            "save_pretrained (config.json, tokenizer files, weights)"
        )
    log.info("downloaded model and dataset in %.1fs", time.perf_counter() - started)


def _validation_path(data_path: Path) -> Path:
    return data_path.with_name("validation")


def _workdir(config: TrainerConfig, topo: Topology) -> Path:
    """Per-node scratch folder (the pod's /tmp emptyDir; KUBETUNE_WORKDIR overrides)."""
    base = Path(os.environ.get("KUBETUNE_WORKDIR") or tempfile.gettempdir())
    return base / "kubetune" / (config.job.uid or config.job.name) / f"node-{topo.node_rank}"


def _topology_from_env() -> Topology:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/GROUP_RANK; plain ``python -m`` is one process."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "GROUP_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    return Topology(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        node_rank=int(os.environ.get("GROUP_RANK", "0")),
    )


def _pick_device(topo: Topology) -> torch.device:
    if torch.cuda.is_available():  # GPU path: one process per GPU
        torch.cuda.set_device(topo.local_rank)
        return torch.device("cuda", topo.local_rank)
    return torch.device("cpu")


def _resolved_precision(config: TrainerConfig, on_gpu: bool) -> str:
    precision = config.training.precision
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def _check_precision(config: TrainerConfig, device: torch.device) -> None:
    if device.type != "cuda" and config.training.precision in ("bf16", "fp16"):
        raise TrainerError(
            f"training.precision {config.training.precision} needs a GPU and this worker has none: "
            "use precision auto or fp32, or set workers.gpusPerWorker"
        )


def _load_dtype(config: TrainerConfig, device: torch.device) -> torch.dtype:
    precision = _resolved_precision(config, device.type == "cuda")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _respect_omp_num_threads() -> None:
    """torch sizes its pool from the core count; in a pod, OMP_NUM_THREADS is the CPU limit."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _start_metrics(config: TrainerConfig, topo: Topology) -> Any:
    """Rank 0 serves /metrics from the start, so a scrape sees the job before step 1."""
    if not topo.is_main or not config.metrics.port:
        return None
    from kubetune.trainer.metrics import TrainMetrics

    metrics = TrainMetrics(gpu=torch.cuda.is_available())
    try:
        metrics.serve(config.metrics.port)
    except OSError as exc:
        raise TrainerError(
            f"metrics.port {config.metrics.port}: cannot listen ({exc.strerror}); pick a free port or 0 to disable"
        ) from None
    return metrics


def _configure_logging(topo: Topology) -> None:
    """Rank 0 logs progress; other ranks only warnings. DeepSpeed's INFO chatter is muted."""
    logging.basicConfig(
        level=logging.INFO if topo.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s rank=" + str(topo.rank) + " %(name)s: %(message)s",
        force=True,
    )
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

"""LoRA fine-tuning recipe: PEFT LoRA adapters trained with DeepSpeed ZeRO over torchrun.

Every worker pod of a FineTuneJob runs this. Launch commands (the operator renders them):

  one node, P processes (P GPUs, or P CPU processes for tests)::

      torchrun --nnodes=1 --nproc-per-node=P -m kubetune.trainer --config /etc/kubetune/config.json

  N nodes (pod K of N; pod 0 hosts the rendezvous)::

      torchrun --nnodes=N --nproc-per-node=P --node-rank=K \\
          --master-addr=<job>-worker-0.<job>-workers --master-port=29500 \\
          -m kubetune.trainer --config /etc/kubetune/config.json

The recipe (``LoRAFineTuneRecipe``, one method per stage, in this order):

  __init__ read + check the config (before any network, so mistakes fail fast)
  setup    every node's local rank 0 downloads model + data (pods share no filesystem), and
              the tokenized examples a run of this job already made, if any (datacache.py),
              in a thread, while every process joins the process group (gloo on CPU, nccl on
              GPU; collectives time out in minutes) and imports transformers and peft
           -> load model and tokenizer, wrap with LoRA -> tokenize -> DeepSpeed engine
           -> with output.checkpointUri: resume from the newest complete checkpoint
              (checkpoint.py: DeepSpeed state, data position, RNG states)
           -> else evaluate the base model: on the retention set (evaluation.retentionUri), and
              on the validation data with evaluation.atStart
  train    epochs x micro-batches; DeepSpeed accumulates gradients up to globalBatchSize and
           steps the optimizer; stops at maxSteps; rank 0 logs and updates /metrics;
           evaluates at each epoch end; checkpoints every checkpointEverySteps, at epoch ends
           and at the end (uploads in the background); on SIGTERM stops at the end of the
           step, after a checkpoint of it is COMPLETE in S3 (exit 143)
  finish_training  final evaluation (and the retention set's); above qualityGate.maxEvalLoss or
           maxRetentionLossIncrease every rank exits 79, nothing published
  save_adapter     gather the LoRA weights (ZeRO-3 shards them) -> save_pretrained on rank 0
  publish  rank 0 stages adapter + tokenizer beside adapterUri, verifies, copies them in,
           then writes manifest.json last (publish.py)
  cleanup  leave the process group, remove the downloads

Rank 0 logs where the time went at the end (timings.py: start-up, download, tokenisation, model
load, evaluation, training, checkpoints, publish) and writes it into the manifest.

``on_step_end`` is called after every optimizer step: the tests' fault injection subclasses it.

SIGTERM: when a worker pod is deleted (suspend, gang restart, job deleted) the kubelet sends
SIGTERM to torchrun, which sends it on to every worker's process group and SIGKILLs them
``--shutdown-timeout`` seconds later (default 30; torch 2.13). During ``train`` a worker only
notes it; at the start of the next optimizer step the ranks agree, in the all_reduce they
already make for the step's token count, whether any rank was signalled, and if so every rank
checkpoints the step just finished, waits for its COMPLETE marker and exits 143 (retryable). A
SIGTERM during the last step is agreed on once after the loop. Without output.checkpointUri
there is nothing to keep and the worker stops at once. Outside ``train`` (downloads, final
evaluation, publishing) SIGTERM keeps its default and ends the process.

GPU path: with CUDA visible, each process takes ``cuda:LOCAL_RANK``, the backend is nccl and
``precision: auto`` means bf16. It is written to the same DeepSpeed API as the CPU path but
only the CPU path runs in this project's CI (tests marked ``gpu`` cover the rest).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from kubetune.api.trainer_config import TrainerConfig, load_config
from kubetune.trainer.errors import ConfigError, DataError, QualityGateError, Stopped, TrainerError
from kubetune.trainer.metrics import progress_bar
from kubetune.trainer.timings import Stopwatch, describe

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


def run(config: TrainerConfig | str | Path, recipe: type[LoRAFineTuneRecipe] | None = None) -> dict[str, Any] | None:
    """Train and publish per ``config`` (or the file it names); rank 0 returns the results.
    ``recipe`` is a subclass to run instead (tests inject faults through its hooks)."""
    if not isinstance(config, TrainerConfig):
        config = load_config(config)
    runner = (recipe or LoRAFineTuneRecipe)(config)
    try:
        runner.setup()
        runner.train()
        runner.finish_training()
        with runner.stopwatch.phase("publish"):
            runner.save_adapter()
            return runner.publish()
    except RuntimeError as error:
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        seconds = int(collective_timeout().total_seconds())
        raise TrainerError(
            f"a collective operation found no answer from the other workers within "
            f"KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS ({seconds}s): another worker died or stopped answering; "
            f"its pod's log says why ({str(error).splitlines()[0][:200]})"
        ) from None
    finally:
        runner.cleanup()


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

    def to_state(self, initial_eval: float | None, retention_before: float | None) -> dict[str, Any]:
        """What a checkpoint keeps so the resumed run reports the whole run (and the base
        model's losses, which a resumed run can no longer measure)."""
        return {"steps": self.steps, "epoch": self.epoch, "tokens": self.tokens, "positions": self.positions,
                "seconds": self.seconds,
                "firstLoss": self.first_loss, "lastLoss": self.last_loss, "history": self.history,
                "evals": self.evals, "initialEvalLoss": initial_eval, "retentionLossBefore": retention_before}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(state["steps"], state["epoch"], state["tokens"], state["positions"], state["seconds"],
                   state["firstLoss"], state["lastLoss"], list(state["history"]), list(state["evals"]))


class LoRAFineTuneRecipe:
    """One process of a LoRA fine-tune: PEFT adapters trained with DeepSpeed ZeRO.

    Read top to bottom, as ``run`` calls it: ``setup`` (process group, downloads, data, model
    with LoRA, DeepSpeed engine, resume), ``train`` (epochs of optimizer steps: log, evaluate at
    epoch ends, checkpoint), ``finish_training`` (final evaluation, quality gate),
    ``save_adapter``, ``publish`` (rank 0), ``cleanup``. Each part is a method of its own; the
    state they share (engine, data, progress) lives on the instance.
    """

    def __init__(self, config: TrainerConfig) -> None:
        # ---- Setup 1: config and topology (no network yet: wrong configs fail in milliseconds)
        self.config = config
        self.stopwatch = Stopwatch()
        self.topo = _topology_from_env()
        _configure_logging(self.topo)
        self.accumulation = gradient_accumulation_steps(config, self.topo.world_size)
        self.device = _pick_device(self.topo)
        _check_precision(config, self.device)
        _respect_omp_num_threads()
        self.workdir = _workdir(config, self.topo)
        self.metrics: Any = None
        """Rank 0's training series (TrainMetrics); None on the other ranks."""
        self.rank_metrics: Any = None
        """The steps this process has begun (RankMetrics), served by the first process of every worker."""
        self.checkpointer: Any = None
        self.resumed: Any = None
        self.validation_set: list = []
        self.retention_set: list = []
        self.initial_eval: float | None = None
        self.final_eval: float | None = None
        self.retention_before: float | None = None
        """Loss of the base model on evaluation.retentionUri; ``retention_after``, of the adapted one."""
        self.retention_after: float | None = None
        self.progress = Progress()
        self.stop_requested = False
        """Set by SIGTERM during ``train``; acted on at the next step boundary all ranks agree on."""
        self.tokenized_upload: threading.Thread | None = None
        """Rank 0 keeping the tokenized examples for restarts (datacache.store), in the background."""

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        from kubetune.trainer.s3 import make_client

        self.s3 = make_client(self.config.storage)
        # Neither needs the other: the downloads run while this process imports DeepSpeed,
        # waits for its peers and imports transformers and peft (~6 s on 2 cores).
        downloads = self._start_downloads()
        self._join_process_group()
        _import_model_libraries()
        self.stopwatch.mark_started_up()
        with self.stopwatch.phase("download"):  # what is left of it
            self._finish_downloads(downloads)
        with self.stopwatch.phase("tokenize"):
            self._load_data()
        with self.stopwatch.phase("modelLoad"):
            self._build_engine(self._load_model())
        self._resume()

    def _join_process_group(self) -> None:
        # Imported here, not at the top: it takes seconds and probes for accelerators.
        import deepspeed

        _configure_logging(self.topo)  # again: importing deepspeed resets its logger to INFO
        self.rank_metrics = _start_metrics(self.config, self.topo)
        self.metrics = self.rank_metrics if self.topo.is_main else None
        _without_shm_comm_op(deepspeed)
        # nccl for GPUs, gloo on CPUs. A timeout of minutes, not torch's half hour: a rank that
        # died leaves the others blocked in a collective, and they should fail while a restart helps.
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=collective_timeout())

    def _start_downloads(self) -> Future | None:
        """Pods share no filesystem, so the first process of EVERY node downloads, in a thread
        of its own; the other processes download nothing."""
        self.model_dir, self.data_path = self.workdir / "model", self.workdir / "data" / "train.jsonl"
        self.retention_path = self.data_path.with_name("retention") if self.config.evaluation.retention_uri else None
        self.tokenized_path, self.tokenized_uri = self.data_path.with_name("tokenized.pt"), None
        if not self.topo.is_node_main:
            return None
        return _in_background(self._download_node_inputs, name="kubetune-download")

    def _download_node_inputs(self) -> None:
        _download_inputs(self.s3, self.config, self.model_dir, self.data_path, self.retention_path)
        self.tokenized_uri = self._fetch_tokenized()

    def _finish_downloads(self, downloads: Future | None) -> None:
        """The download's error, if any, is this process's; every process then waits at the
        barrier until every node has its inputs."""
        if downloads is not None:
            downloads.result()
        torch.distributed.barrier()

    def _fetch_tokenized(self) -> str | None:
        """The examples a run of this job made from the same inputs (with checkpoints on), into
        ``tokenized_path``; returns where they are kept, whether they were there or not."""
        from kubetune.trainer import datacache

        self.tokenized_path.unlink(missing_ok=True)  # a killed run's, in a reused scratch folder
        if not self.config.output.checkpoint_uri:
            return None  # nowhere to keep them: not worth reading the whole dataset for a key
        files = [path for path in (self.data_path, _validation_path(self.data_path), self.retention_path)
                 if path is not None and path.is_file()]
        uri = datacache.cache_uri(self.config, datacache.cache_key(self.config, self.model_dir, files))
        datacache.fetch(self.s3, uri, self.tokenized_path)
        return uri

    def _load_data(self) -> None:
        """Tokenizer and data before the model: a bad dataset fails before the model loads.
        Every rank tokenizes the whole file (cheap next to training) and later takes its own
        share of each epoch's batches."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from kubetune.trainer import datacache
        from kubetune.trainer.data import prepare_datasets

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per rank is noise in pod logs
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is masked out of the loss anyway
        self.pad_id = self.tokenizer.pad_token_id
        config = self.config
        datasets = datacache.load(self.tokenized_path) if self.tokenized_path.is_file() else None
        if datasets is not None and self.topo.is_main:
            log.info("tokenized data from %s (made by an earlier run of this job from the same inputs)",
                     self.tokenized_uri)
        if datasets is None:
            datasets = prepare_datasets(
                self.data_path, _validation_path(self.data_path) if config.dataset.validation_uri else None,
                self.tokenizer, config.dataset, config.training.sequence_length, config.training.seed,
                retention_path=self.retention_path, evaluation=config.evaluation,
            )
            if self.topo.is_main and self.tokenized_uri:
                self.tokenized_upload = datacache.store(self.s3, self.tokenized_uri, datasets, self.workdir / "upload")
        if self.topo.is_main:
            for note in datasets.notes:  # truncated / dropped examples, counted
                log.info("%s", note)
        self.train_set, self.validation_set = datasets.train, datasets.validation
        self.retention_set = datasets.retention
        self.plan = _plan_steps(config, self.topo, self.train_set, self.accumulation)
        if self.metrics:  # "0/150" in `kubectl get ftj` while the model loads
            self.metrics.total_steps.set(self.plan.total_steps)

    def _load_model(self) -> Any:
        """The base model wrapped with LoRA. Same seed everywhere: identical LoRA init."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, set_seed

        config = self.config
        set_seed(config.training.seed)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=_load_dtype(config, self.device))
        model.config.use_cache = False  # training never reuses the KV cache
        if config.training.gradient_checkpointing:
            # With the base model frozen no input of a checkpointed block requires grad, and the
            # reentrant variant would then drop the LoRA gradients: non-reentrant, plus embeddings
            # whose output requires grad (PEFT's own recipe).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = config.lora
        try:
            return get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
            ))
        except ValueError as exc:
            raise ConfigError(f"lora.targetModules {list(lora.target_modules)}: {exc}") from None

    def _build_engine(self, model: Any) -> None:
        """DeepSpeed around the LoRA model, with a torch AdamW over the trainable (LoRA)
        parameters only and linear warm-up then cosine decay. The scheduler goes to
        deepspeed.initialize so its state is in every checkpoint (resume continues the curve)."""
        import deepspeed

        from kubetune.trainer.schedule import lr_lambda

        training = self.config.training
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=training.learning_rate, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
            training.warmup_steps, self.plan.total_steps, training.learning_rate, training.min_learning_rate))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.config, self.topo.world_size),
        )

    def _resume(self) -> None:
        """From the newest complete checkpoint, if checkpoints are on; else evaluate the base."""
        output, topo = self.config.output, self.topo
        if output.checkpoint_uri:
            from kubetune.trainer.checkpoint import Checkpointer, local_world_size

            on_upload = self.metrics.checkpoint_upload_seconds.observe if self.metrics else None
            self.checkpointer = Checkpointer(
                self.s3, output.checkpoint_uri, output.keep_checkpoints, self.workdir / "checkpoints",
                topo.rank, topo.local_rank, local_world_size(), on_upload=on_upload,
            )
            with self.stopwatch.phase("checkpoints"):
                self.resumed = self.checkpointer.resume(self.engine)
        if self.resumed is None:
            self.retention_before = self.evaluate(self.retention_set)
            if self.config.evaluation.at_start:
                self.initial_eval = self.evaluate()
        else:
            state = self.resumed.trainer_state
            self.initial_eval, self.retention_before = state["initialEvalLoss"], state.get("retentionLossBefore")
            self.progress = Progress.from_state(state)
            if self.metrics:
                self.metrics.step.set(self.progress.steps)
                self.metrics.epoch.set(self.progress.epoch)
        if self.metrics and self.initial_eval is not None:
            self.metrics.eval_loss.set(self.initial_eval)
        if topo.is_main:
            log.info(
                "start job=%s/%s world_size=%d zero_stage=%d steps=%d accumulation=%d train_examples=%d "
                "validation_examples=%d from_step=%d",
                self.config.job.namespace, self.config.job.name, topo.world_size, self.config.deepspeed.zero_stage,
                self.plan.total_steps, self.accumulation, len(self.train_set), len(self.validation_set),
                self.progress.steps,
            )

    # ---- train -------------------------------------------------------------------------------
    def train(self) -> None:
        """Epochs of micro-batches; DeepSpeed accumulates them into optimizer steps."""
        from kubetune.trainer.checkpoint import Position

        start = self.resumed.position if self.resumed else Position(0, 0, 0)
        self.position = start  # where the next micro-batch is: what a checkpoint now would record
        # Sums since the last log line: [summed loss, trained tokens, real tokens, token
        # positions incl. padding, examples].
        self.window = torch.tensor(self.resumed.rank_state["window"] if self.resumed else [0.0] * 5,
                                   dtype=torch.float64)
        self.bar = progress_bar(self.plan.total_steps, self.progress.steps, enabled=self.topo.is_main)
        self.lr: float | None = None
        self.window_start = self.started = time.perf_counter()
        self.seconds_before = self.progress.seconds
        self.engine.train()
        previous = _handle_sigterm(self._on_sigterm)
        # The loop's evaluations and checkpoint saves are timed as such; the rest is training.
        elsewhere = self.stopwatch.seconds["evaluation"] + self.stopwatch.seconds["checkpoints"]
        try:
            for epoch in range(start.epoch, self.config.training.epochs):
                if self.progress.steps >= self.plan.total_steps or self._train_epoch(epoch, start):
                    break
            # A SIGTERM during the last step: no next step agrees on it, so agree once here
            # (without checkpoints the handler has stopped the process already).
            if self.checkpointer and _any_rank(self.stop_requested):
                self._stop()
        finally:
            _handle_sigterm(previous)
            self.bar.close()
            self.progress.seconds = self.seconds_before + time.perf_counter() - self.started
            inside = self.stopwatch.seconds["evaluation"] + self.stopwatch.seconds["checkpoints"] - elsewhere
            self.stopwatch.seconds["training"] += time.perf_counter() - self.started - inside

    def _train_epoch(self, epoch: int, start: Any) -> bool:
        """One epoch (from the saved batch, when resuming into it); True when maxSteps is reached."""
        from kubetune.trainer.loss import output_layer, step_start_all_ranks

        # 1. This epoch's micro-batches for this rank: the same count on every rank, a multiple
        #    of the accumulation steps so every optimizer step is complete. They depend only
        #    on (seed, epoch), so a resumed run skips to its saved batch index.
        batches = _epoch_batches(self.config, self.topo, self.train_set, epoch)[
            : self.plan.steps_per_epoch * self.accumulation]
        head = output_layer(self.engine.module)
        for index in range(start.batch if epoch == start.epoch else 0, len(batches)):
            if index % self.accumulation == 0:
                if self.rank_metrics:
                    self.rank_metrics.steps_begun.set(self.progress.steps + 1)
                # An optimizer step begins: how many tokens it trains, and whether any rank got
                # SIGTERM since the last one began (one small all_reduce for both).
                self.step_tokens, stop = step_start_all_ranks(
                    batches[index : index + self.accumulation], self.stop_requested)
                if stop:
                    self._stop()
            self._micro_batch(head, batches[index])
            if (index + 1) % self.accumulation:
                continue
            if self._after_optimizer_step(epoch, index, len(batches)):
                return True
        return False

    def _micro_batch(self, head: Any, batch: Any) -> None:
        from kubetune.trainer.loss import next_token_loss

        inputs = {k: v.to(self.device) for k, v in batch.tensors(self.pad_id).items()}
        # 2. Forward: summed cross-entropy over the trained tokens, with the output layer run on
        #    those positions only (loss.py). No KV cache: with one, HF ignores packed rows'
        #    position_ids and lets the examples of a row attend to each other.
        summed, trained = next_token_loss(self.engine, head, inputs)
        boundary = self.engine.is_gradient_accumulation_boundary()
        # 3. Backward and step: DeepSpeed divides by the accumulation steps and averages over
        #    ranks (ZeRO shards the gradients), so this scale makes the gradient that of the
        #    mean over every token of the global batch: a micro-batch of short examples weighs
        #    what its tokens weigh, as in HF's Trainer. It then clips to gradientClipping and
        #    steps AdamW + the LR schedule at accumulation boundaries.
        self.engine.backward(summed * (self.accumulation * self.topo.world_size / self.step_tokens))
        if boundary:
            self.lr = self.engine.get_lr()[0]  # before step(): the rate this step uses, not the next one's
        self.engine.step()
        self.window += torch.tensor(
            [summed.item(), float(trained), float(batch.tokens), float(inputs["input_ids"].numel()),
             float(len(batch.examples))], dtype=torch.float64,
        )

    def _after_optimizer_step(self, epoch: int, index: int, batches: int) -> bool:
        """Log, evaluate, checkpoint as due after a step; True when it was the last one."""
        from kubetune.trainer.checkpoint import Position

        progress, training, every = self.progress, self.config.training, self.config.output.checkpoint_every_steps
        progress.steps += 1
        self.bar.update(1)
        progress.epoch = epoch + (index + 1) / batches
        last = progress.steps == self.plan.total_steps
        epoch_end = index + 1 == batches
        # 4. Log every logEverySteps (and at the end); the all_reduce is a collective, so every rank logs.
        if progress.steps % training.log_every_steps == 0 or last:
            self._log_window()
        # 5. Evaluate at each epoch end (the final evaluation follows the loop).
        if epoch_end and not last:
            self._evaluate_epoch(epoch)
        # 6. Checkpoint every checkpointEverySteps, at each epoch end and at the end; the
        #    upload runs in the background.
        self.position = Position(progress.steps, epoch + 1, 0) if epoch_end else Position(
            progress.steps, epoch, index + 1)
        if self.checkpointer and (epoch_end or last or (every and progress.steps % every == 0)):
            progress.seconds = self.seconds_before + time.perf_counter() - self.started
            with self.stopwatch.phase("checkpoints"):
                self.checkpointer.save(self.engine, self.position, self._trainer_state(),
                                       {"window": self.window.tolist()})
        self.on_step_end(progress.steps)
        # 7. Stop at maxSteps, possibly mid-epoch.
        return last

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step and its checkpoint; a subclass may act on it."""

    def _trainer_state(self) -> dict[str, Any]:
        return self.progress.to_state(self.initial_eval, self.retention_before)

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        """torchrun passed on the pod's SIGTERM. With checkpoints: only note it (the step ends,
        the ranks agree, ``_stop`` checkpoints). Without: nothing to keep, stop at once."""
        if self.checkpointer is None:
            raise Stopped(self.progress.steps, self.plan.total_steps,
                          "without a checkpoint (no output.checkpointUri): a restart starts over")
        self.stop_requested = True

    def _stop(self) -> None:
        """Every rank, at a step boundary after a SIGTERM: checkpoint the step just finished,
        wait until it is COMPLETE in S3 and raise Stopped, so the restarted gang resumes here."""
        progress = self.progress
        if self.topo.is_main:
            log.warning("SIGTERM: stopping at step %d/%d", progress.steps, self.plan.total_steps)
        progress.seconds = self.seconds_before + time.perf_counter() - self.started
        if progress.steps == 0:
            how = "before its first step ended (nothing to checkpoint): a restart starts over"
        elif self.resumed is not None and progress.steps == self.resumed.position.step:
            how = (f"with a checkpoint ({self.checkpointer.step_uri(progress.steps)}, the one it resumed from): "
                   "a restart resumes from it")
        elif self.checkpointer.save_now(self.engine, self.position, self._trainer_state(),
                                        {"window": self.window.tolist()}):
            how = f"with a checkpoint ({self.checkpointer.step_uri(progress.steps)}): a restart resumes from it"
        else:
            how = ("but its checkpoint could not be completed (see the log): a restart resumes from the newest "
                   "complete one")
        raise Stopped(progress.steps, self.plan.total_steps, how)

    def _log_window(self) -> None:
        """Mean loss over all ranks since the last line, throughput, the metrics."""
        progress, metrics, window = self.progress, self.metrics, self.window
        torch.distributed.all_reduce(window)
        now = time.perf_counter()
        mean_loss = float(window[0] / max(window[1], 1.0))
        elapsed = max(now - self.window_start, 1e-9)
        tokens_per_second = float(window[2]) / elapsed
        padded_tokens_per_second = float(window[3]) / elapsed
        samples_per_second = float(window[4]) / elapsed
        norm = self.engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
        progress.tokens += int(window[2])
        progress.positions += int(window[3])
        progress.first_loss = mean_loss if progress.first_loss is None else progress.first_loss
        progress.last_loss = mean_loss
        progress.history.append([progress.steps, mean_loss])
        if self.topo.is_main:
            log.info(
                "step=%d/%d epoch=%.2f loss=%.4f lr=%.6g grad_norm=%s tokens_per_s=%.1f "
                "padded_tokens_per_s=%.1f samples_per_s=%.2f",
                progress.steps, self.plan.total_steps, progress.epoch, mean_loss, self.lr,
                _fmt(grad_norm), tokens_per_second, padded_tokens_per_second, samples_per_second,
            )
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.lr:.3g}", refresh=False)
        if metrics:
            metrics.step.set(progress.steps)
            metrics.epoch.set(progress.epoch)
            metrics.loss.set(mean_loss)
            metrics.learning_rate.set(self.lr)
            if grad_norm is not None:
                metrics.grad_norm.set(grad_norm)
            metrics.tokens_per_second.set(tokens_per_second)
            metrics.padded_tokens_per_second.set(padded_tokens_per_second)
            metrics.samples_per_second.set(samples_per_second)
            if metrics.gpu_memory_bytes is not None:
                metrics.gpu_memory_bytes.set(torch.cuda.max_memory_allocated(self.device))
        window.zero_()
        self.window_start = now

    def _evaluate_epoch(self, epoch: int) -> None:
        eval_loss = self.evaluate()
        if eval_loss is None:
            return
        if self.metrics:
            self.metrics.eval_loss.set(eval_loss)
        self.progress.evals.append({"epoch": epoch + 1, "step": self.progress.steps, "evalLoss": eval_loss})
        if self.topo.is_main:
            log.info("epoch=%d step=%d eval_loss=%.4f", epoch + 1, self.progress.steps, eval_loss)

    def evaluate(self, examples: list | None = None) -> float | None:
        """Token-weighted mean loss on ``examples`` (the validation set by default), all ranks together."""
        with self.stopwatch.phase("evaluation"):
            return _evaluate(self.engine, self.validation_set if examples is None else examples, self.config,
                             self.topo, self.device, self.pad_id)

    # ---- finish, save, publish -------------------------------------------------------------
    def finish_training(self) -> None:
        """Final evaluations and the quality gate: above it every rank raises the same error,
        so every worker exits 79 with the reason, and nothing is published."""
        self.final_eval = self.evaluate()
        self.retention_after = self.evaluate(self.retention_set)
        if self.metrics and self.final_eval is not None:
            self.metrics.eval_loss.set(self.final_eval)
        if self.checkpointer:
            with self.stopwatch.phase("checkpoints"):
                self.checkpointer.finish()
        if self.topo.is_main and self.final_eval is not None:
            log.info("final eval_loss=%.6f", self.final_eval)
        if self.topo.is_main and self.retention_after is not None:
            log.info("retention loss %s before training, %.6f after", _fmt(self.retention_before),
                     self.retention_after)
        gate = self.config.quality_gate
        if gate.max_eval_loss is not None and self.final_eval is not None and self.final_eval > gate.max_eval_loss:
            raise QualityGateError(f"eval loss {self.final_eval:.4f} > qualityGate.maxEvalLoss "
                                   f"{gate.max_eval_loss:g}: adapter not published")
        self._check_retention(gate.max_retention_loss_increase)

    def _check_retention(self, allowed: float | None) -> None:
        before, after = self.retention_before, self.retention_after
        if allowed is None or after is None:
            return
        if before is None:  # resumed from a checkpoint that predates the retention loss
            if self.topo.is_main:
                log.warning("qualityGate.maxRetentionLossIncrease not checked: the base model's retention loss "
                            "was not recorded by the checkpoint this run resumed from")
            return
        if after - before > allowed:
            raise QualityGateError(
                f"retention loss rose {after - before:.4f} ({before:.4f} before training, {after:.4f} after) > "
                f"qualityGate.maxRetentionLossIncrease {allowed:g}: the adapter forgets what the base model knew "
                f"(try a lower training.learningRate, fewer epochs or a smaller lora.r); adapter not published")

    def save_adapter(self) -> None:
        """Under ZeRO-3 each rank holds a slice of every LoRA tensor: all ranks enter
        GatheredParameters (a collective), then rank 0 writes full tensors."""
        import deepspeed

        self.adapter_dir = self.workdir / "adapter"
        lora_params = [p for name, p in self.engine.module.named_parameters() if "lora_" in name]
        with deepspeed.zero.GatheredParameters(lora_params, enabled=self.config.deepspeed.zero_stage == 3):
            if any(p.numel() == 0 for p in lora_params):  # would publish an adapter of empty tensors
                raise RuntimeError("LoRA parameters are still partitioned at save time")
            if self.topo.is_main:
                self.engine.module.save_pretrained(self.adapter_dir, safe_serialization=True)
                self.tokenizer.save_pretrained(self.adapter_dir)

    def publish(self) -> dict[str, Any] | None:
        """Rank 0: adapter files first, manifest.json last. Nobody leaves before it is done.
        Rank 0 returns the manifest's results plus ``manifestSha256`` (for the termination
        message: which publish is this job's)."""
        from kubetune.trainer.publish import publish_adapter

        results = None
        progress = self.progress
        peak_memory = _peak_memory_all_ranks(self.device)  # a collective: before rank 0 goes on alone
        if self.topo.is_main:
            results = {
                "steps": progress.steps,
                "totalSteps": self.plan.total_steps,
                "epochs": progress.epoch,
                "initialLoss": progress.first_loss,
                "finalLoss": progress.last_loss,
                "initialEvalLoss": self.initial_eval,
                "evalLoss": self.final_eval,
                "retentionLossBefore": self.retention_before,
                "retentionLossAfter": self.retention_after,
                "evalHistory": progress.evals,
                "lossHistory": progress.history,
                "tokens": progress.tokens,
                "positions": progress.positions,
                "trainSeconds": round(progress.seconds, 3),
                "worldSize": self.topo.world_size,
                "peakMemoryBytes": peak_memory,
                "resumedFromStep": self.resumed.position.step if self.resumed else None,
            }
            # The time to adapter goes in as the manifest is written: the publish's own time included.
            published = publish_adapter(self.s3, self.adapter_dir, self.config, results,
                                        on_manifest=lambda manifest: manifest["results"].update(
                                            timeToAdapter=self.stopwatch.summary()))
            results = {**published.manifest["results"], "manifestSha256": published.sha256}
            log.info("done steps=%d final_loss=%.4f eval_loss=%s adapter=%s", progress.steps, progress.last_loss,
                     _fmt(self.final_eval), self.config.output.adapter_uri)
            log.info("%s", describe(results["timeToAdapter"]))
        torch.distributed.barrier()
        return results

    def cleanup(self) -> None:
        """Leave the process group even on failure, so torchrun sees a clean exit code, and
        drop the downloads once done."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.tokenized_upload is not None:
            self.tokenized_upload.join(timeout=60)  # its file is in the scratch folder removed next
        if self.topo.is_node_main:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _without_shm_comm_op(deepspeed: Any) -> None:
    """On CPUs DeepSpeed compiles its shared-memory all-reduce op the first time its comm backend
    starts (a minute, again whenever the environment moves) under a lock file in
    ~/.cache/torch_extensions. Only inference's tensor-parallel all-reduce uses it; training's
    collectives are gloo's. And a worker killed while it holds that lock (a gang restart, a
    suspend) leaves the lock behind, and every later worker sharing the cache waits for it
    forever. So the trainer tells DeepSpeed the op is unavailable, as on a platform without it."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _import_model_libraries() -> None:
    """Imported here while the downloads run, rather than later when the tokenizer and the model
    load and nothing else is left to do."""
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def _in_background(work: Callable[[], None], name: str) -> Future:
    """``work`` in a daemon thread; its result or exception in the future. Not a thread pool:
    its threads are joined at exit, and a process failing elsewhere should not first wait for a
    model download to finish."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def collective_timeout() -> timedelta:
    """How long a collective waits for the other ranks (KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS,
    default 10 minutes: long enough for a node to download its model while the others wait at
    the barrier, short enough that a dead peer ends the survivors in minutes)."""
    seconds = os.environ.get("KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS", "")
    return timedelta(seconds=int(seconds) if seconds.isdigit() and int(seconds) > 0 else 600)


def _handle_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM; returns the one it replaces. Only the main thread may
    (an in-process caller on another thread keeps the default)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


def _peak_memory_all_ranks(device: torch.device) -> int:
    """The most memory any rank held at once: on a GPU what torch allocated there, on a CPU the
    process's peak resident set (what a pod's memory limit is measured against)."""
    import resource

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    found = torch.tensor([float(peak)], dtype=torch.float64)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return int(found.item())


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective)."""
    found = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(found)
    return bool(found.item() > 0)


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
        raise ConfigError(
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
        raise DataError(
            f"dataset {config.dataset.uri} has {len(train_set)} training examples{packed}, fewer than one "
            f"global batch (training.globalBatchSize = {training.global_batch_size}): add data or "
            "lower training.globalBatchSize"
        )
    total = steps_per_epoch * training.epochs
    if training.max_steps is not None:
        total = min(total, training.max_steps)
    return StepPlan(steps_per_epoch, total)


def _download_inputs(s3: Any, config: TrainerConfig, model_dir: Path, data_path: Path,
                     retention_path: Path | None) -> None:
    from kubetune.trainer.s3 import download_file, download_prefix

    started = time.perf_counter()
    shutil.rmtree(model_dir, ignore_errors=True)
    download_prefix(s3, config.model.uri, model_dir)
    download_file(s3, config.dataset.uri, data_path)
    if config.dataset.validation_uri:
        download_file(s3, config.dataset.validation_uri, _validation_path(data_path))
    if retention_path is not None and config.evaluation.retention_uri:
        download_file(s3, config.evaluation.retention_uri, retention_path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
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
        raise ConfigError(
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
    """Rank 0 serves /metrics from the start, so a scrape sees the job before step 1; the first
    process of every other worker serves the steps it has begun (RankMetrics)."""
    if not topo.is_node_main or not config.metrics.port:
        return None
    from kubetune.trainer.metrics import RankMetrics, TrainMetrics

    if topo.is_main:
        metrics = TrainMetrics(gpu=torch.cuda.is_available())
        metrics.describe_run(config.model.uri, config.dataset.uri, config.output.adapter_uri,
                             config.deepspeed.zero_stage)
    else:
        metrics = RankMetrics()
    try:
        metrics.serve(config.metrics.port)
    except OSError as exc:
        # Transient (exit 1): whoever holds the port (another pod on a host network, as in the
        # local cluster without network namespaces) may let go of it before the restart.
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

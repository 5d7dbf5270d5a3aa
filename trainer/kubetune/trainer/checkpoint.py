"""Checkpoints in S3 with exact resume.

Layout under ``output.checkpointUri``::

    step-<N>/step-<N>/...           DeepSpeed's files (each rank's ZeRO shards, model states)
    step-<N>/rank-<R>.pt            per rank: python/numpy/torch RNG states, unlogged loss sums
    step-<N>/COMPLETE               JSON written by rank 0 once EVERY rank's uploads succeeded

Saving (:meth:`Checkpointer.save`) never waits for S3: each rank writes its own files to the
node's scratch disk (``engine.save_checkpoint``, a collective), then uploads its own files in
a background thread (the node's first process also uploads the files every rank reads). The ``COMPLETE`` marker of checkpoint N is written
at the NEXT checkpoint (or at the end, :meth:`Checkpointer.finish`), after an all_reduce of
"my upload of N succeeded" over all ranks; older complete checkpoints are then pruned to
``keepCheckpoints``. A checkpoint without ``COMPLETE`` is never resumed from.
:meth:`Checkpointer.save_now` is the exception: a process stopping on SIGTERM waits until its
checkpoint is COMPLETE before it exits.

Resuming (:meth:`Checkpointer.resume`): the newest complete checkpoint is downloaded (each
node only its own ranks' files) and loaded; if any rank cannot read it, every rank falls back
to the one before and the log says so. Batches are a pure function of (seed, epoch), so the
data position is just (epoch, next micro-batch index).

Only LoRA weights train, so the frozen base model is left out of every checkpoint
(``exclude_frozen_parameters``): checkpoints stay adapter-sized.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kubetune.trainer.errors import TrainerError
from kubetune.trainer.s3 import delete_prefix, download_file, join_uri, list_keys, put_bytes, upload_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("kubetune.trainer")

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)/")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank-)(\d+)[_.]")


@dataclass(frozen=True)
class Position:
    """Where training stands: enough to continue exactly."""

    step: int
    """Optimizer steps done."""
    epoch: int
    """Epoch the next micro-batch belongs to."""
    batch: int
    """Index of the next micro-batch within that epoch's batches for this rank."""


@dataclass
class Resumed:
    position: Position
    trainer_state: dict[str, Any]
    """What rank 0 stored beside the position (loss and eval history, token counts)."""
    rank_state: dict[str, Any]
    """This rank's own extras (unlogged loss sums)."""


def step_name(step: int) -> str:
    return f"step-{step}"


class Checkpointer:
    """Saves and resumes one job's checkpoints; every method is called by every rank."""

    def __init__(
        self, client: S3Client, uri: str, keep: int, scratch: Path, rank: int, local_rank: int,
        local_world_size: int, on_upload: Callable[[float], None] | None = None,
    ) -> None:
        self.client, self.uri, self.keep, self.scratch = client, uri, keep, scratch
        self.rank, self.local_rank, self.local_world_size = rank, local_rank, local_world_size
        self._pending: tuple[int, threading.Thread, list[BaseException]] | None = None
        self._marker: threading.Thread | None = None
        self._marked: int | None = None  # rank 0: the newest step whose COMPLETE marker was written
        self._on_upload = on_upload  # rank 0 reports each upload's seconds to /metrics

    # ---- save ------------------------------------------------------------------------
    def save(self, engine: Any, position: Position, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Write checkpoint ``position.step`` locally (collective) and start uploading it."""
        self._complete_pending()
        name = step_name(position.step)
        local = self.scratch / name
        started = time.perf_counter()
        engine.save_checkpoint(
            str(local), tag=name, save_latest=False, exclude_frozen_parameters=True,
            client_state={"kubetune": {"position": position.__dict__, "trainer": trainer_state}},
        )
        torch.save({"rng": _rng_state(), **rank_state}, local / f"rank-{self.rank}.pt")
        torch.distributed.barrier()  # every rank's files are on disk before anyone lists them
        if self.rank == 0:
            log.info("checkpoint %s written locally in %.2fs; uploading in the background", name,
                     time.perf_counter() - started)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        mine = [p for p in files if _owner(p.name, default=self.rank - self.local_rank) == self.rank]
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=self._upload, args=(local, mine, name, errors, started), name=f"upload-{name}", daemon=True
        )
        thread.start()
        self._pending = (position.step, thread, errors)

    def save_now(self, engine: Any, position: Position, trainer_state: dict[str, Any],
                 rank_state: dict[str, Any]) -> bool:
        """Checkpoint ``position.step`` and wait until it is COMPLETE in S3 (collective): the
        last act of a process stopping on SIGTERM. A checkpoint of this step already uploading
        is waited for, not written again. True when it is complete (as far as this rank knows:
        rank 0 wrote the marker, the others know every rank's upload succeeded)."""
        if self._pending is None or self._pending[0] != position.step:
            self.save(engine, position, trainer_state, rank_state)
        return self.finish()

    def finish(self) -> bool:
        """Wait for the last upload and mark it complete (collective; call before exiting).
        False when that checkpoint could not be completed."""
        step = self._pending[0] if self._pending else None
        ok = self._complete_pending()
        if self._marker is not None:
            self._marker.join()
            self._marker = None
        return ok and (self.rank != 0 or step is None or self._marked == step)

    def _upload(self, local: Path, files: list[Path], name: str, errors: list[BaseException], started: float) -> None:
        upload_started = time.perf_counter()
        try:
            for path in files:
                upload_file(self.client, path, join_uri(join_uri(self.uri, name), path.relative_to(local).as_posix()))
            seconds = time.perf_counter() - started
            log.info("checkpoint %s: rank %d uploaded %d files in %.1fs", name, self.rank, len(files), seconds)
            if self._on_upload:
                self._on_upload(time.perf_counter() - upload_started)
        except BaseException as exc:  # noqa: BLE001 - reported to every rank by _complete_pending
            errors.append(exc)

    def _complete_pending(self) -> bool:
        """Wait for the pending upload; if every rank's succeeded, mark it complete (rank 0, in
        the background). False when an upload failed."""
        if self._marker is not None:
            self._marker.join()
            self._marker = None
        if self._pending is None:
            return True
        step, thread, errors = self._pending
        self._pending = None
        thread.join()
        ok = torch.tensor([0.0 if errors else 1.0])
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if errors:
            log.warning("checkpoint %s: upload failed on rank %d: %s", step_name(step), self.rank, errors[0])
        if self.local_rank == 0:
            shutil.rmtree(self.scratch / step_name(step), ignore_errors=True)
        if not ok.item():
            if self.rank == 0:
                log.warning("checkpoint %s is incomplete (an upload failed); training goes on and the "
                            "next checkpoint will be tried", step_name(step))
            return False
        if self.rank == 0:
            # The marker and the pruning are S3 round trips: rank 0 does them in the background too.
            self._marker = threading.Thread(target=self._mark_complete, args=(step,), daemon=True)
            self._marker.start()
        return True

    def _mark_complete(self, step: int) -> None:
        folder = self._folder(step_name(step))
        try:
            marker = {"step": step, "worldSize": torch.distributed.get_world_size()}
            put_bytes(self.client, json.dumps(marker).encode(), join_uri(folder, COMPLETE))
            self._marked = step
            log.info("checkpoint %s complete", folder)
            complete, incomplete = self._list()
            kept = complete[: self.keep]
            # Incomplete ones older than what is kept are leftovers of a crash mid-upload.
            stale = complete[self.keep :] + [s for s in incomplete if kept and s < kept[-1]]
            for old in stale:
                delete_prefix(self.client, join_uri(self.uri, step_name(old)))
        except TrainerError as exc:
            log.warning("checkpoint %s: could not mark it complete or prune older ones: %s", folder, exc)

    def step_uri(self, step: int) -> str:
        return self._folder(step_name(step))

    def _folder(self, name: str) -> str:
        return join_uri(self.uri, name) + "/"

    def _list(self) -> tuple[list[int], list[int]]:
        """(complete steps, incomplete steps), newest first."""
        keys = list_keys(self.client, self.uri)
        steps = {int(m.group(1)) for key in keys if (m := _STEP_DIR.match(key))}
        done = {step for step in steps if f"{step_name(step)}/{COMPLETE}" in keys}
        return sorted(done, reverse=True), sorted(steps - done, reverse=True)

    # ---- resume ----------------------------------------------------------------------
    def resume(self, engine: Any) -> Resumed | None:
        """Load the newest readable complete checkpoint into ``engine``; None = start afresh."""
        complete = self._list()[0] if self.rank == 0 else []
        complete = _broadcast(complete)
        if not complete:
            if self.rank == 0:
                log.info("no complete checkpoint under %s: starting at step 0", self.uri)
            return None
        for index, step in enumerate(complete):
            name = step_name(step)
            local = self.scratch / name
            problem = None
            try:
                if self.local_rank == 0:
                    self._download(name, local)
            except (TrainerError, OSError) as exc:
                problem = str(exc)
            problem = _agree(problem, "download")
            resumed = None
            if problem is None:
                try:
                    resumed = self._load(engine, local, name)
                except Exception as exc:  # noqa: BLE001 - any unreadable file means "try the one before"
                    problem = f"{type(exc).__name__}: {exc}"
                problem = _agree(problem, "load")
            torch.distributed.barrier()
            if self.local_rank == 0:
                shutil.rmtree(local, ignore_errors=True)
            if problem is None and resumed is not None:
                if self.rank == 0:
                    log.info("resuming from checkpoint %s (epoch %d, batch %d)", self._folder(name),
                             resumed.position.epoch, resumed.position.batch)
                return resumed
            if self.rank == 0:
                before = f"falling back to {step_name(complete[index + 1])}" if index + 1 < len(complete) else "starting at step 0"
                log.warning("checkpoint %s is unreadable (%s): %s", self._folder(name), problem, before)
        return None

    def _download(self, name: str, local: Path) -> None:
        """This node's share: files of its own ranks plus the ones every rank reads."""
        first = self.rank - self.local_rank
        mine = range(first, first + self.local_world_size)
        shutil.rmtree(local, ignore_errors=True)
        for key in list_keys(self.client, join_uri(self.uri, name)):
            if key == COMPLETE or _owner(key.rsplit("/", 1)[-1], default=first) not in mine:
                continue
            download_file(self.client, join_uri(join_uri(self.uri, name), key), local / key)

    def _load(self, engine: Any, local: Path, name: str) -> Resumed:
        path, client_state = engine.load_checkpoint(
            str(local), tag=name, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise TrainerError(f"DeepSpeed found no checkpoint files in {name}")
        ours = client_state["kubetune"]
        rank_file = torch.load(local / f"rank-{self.rank}.pt", weights_only=False)
        _set_rng_state(rank_file.pop("rng"))
        return Resumed(Position(**ours["position"]), ours["trainer"], rank_file)


def _owner(filename: str, *, default: int) -> int:
    """The rank a checkpoint file belongs to; files every rank reads go to ``default``."""
    found = _RANK_FILE.search(filename)
    return int(found.group(1)) if found else default


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _broadcast(value: Any) -> Any:
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _agree(problem: str | None, what: str) -> str | None:
    """Every rank learns whether any rank failed (and rank 0 logs the first reason)."""
    problems = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(problems, problem)
    found = [(rank, p) for rank, p in enumerate(problems) if p]
    if not found:
        return None
    rank, reason = found[0]
    return f"{what} failed on rank {rank}: {reason}"


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

"""A silent stall for chaos row 4, loaded by every Python process of a worker pod whose env has
PYTHONPATH=<this folder>: once ``kubetune.trainer.train`` is imported, the recipe's
``on_step_end`` hook makes rank $FAULT_RANK sleep for good after optimizer step
$FAULT_AFTER_STEP. The process stays alive and its /metrics keeps answering, as a rank stuck
in a dead data source or a deadlocked thread of its own would; only its steps stop."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from typing import Any

TARGET = "kubetune.trainer.train"


def _stall(recipe: Any) -> None:
    after, rank = int(os.environ["FAULT_AFTER_STEP"]), int(os.environ.get("FAULT_RANK", "0"))

    def on_step_end(self: Any, step: int) -> None:
        if step == after and self.topo.rank == rank:
            while True:
                time.sleep(3600)

    recipe.on_step_end = on_step_end


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            _stall(module.LoRAFineTuneRecipe)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("FAULT_AFTER_STEP"):
    sys.meta_path.insert(0, _PatchOnImport())

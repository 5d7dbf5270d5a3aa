"""torchrun entry for the fault tests: the real recipe, with one rank failing right after
optimizer step $FAULT_AFTER_STEP (and its checkpoint):

- FAULT=exit: the rank exits hard, no clean-up, as a SIGKILL'd pod would;
- FAULT=hang: the rank stops answering, as a stopped or deadlocked process would.

$FAULT_RANK picks the rank (default 0).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from kubetune.trainer.__main__ import main
from kubetune.trainer.train import LoRAFineTuneRecipe


class FaultyRecipe(LoRAFineTuneRecipe):
    def on_step_end(self, step: int) -> None:
        if self.topo.rank != int(os.environ.get("FAULT_RANK", "0")) or step != int(os.environ["FAULT_AFTER_STEP"]):
            return
        fault = os.environ.get("FAULT", "exit")
        logging.getLogger("kubetune.trainer").warning("rank %d: fault %s after step %d", self.topo.rank, fault, step)
        if fault == "hang":
            while True:
                time.sleep(3600)
        logging.shutdown()
        os._exit(3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], recipe=FaultyRecipe))

"""GPUs of the local node: counted for the Node's capacity, handed to the pods that ask.

The scheduler decides which pods fit (``nvidia.com/gpu`` in their limits); the node agent then
gives each such pod its own device indices, as the NVIDIA device plugin does, and hides the GPUs
from every other container (``CUDA_VISIBLE_DEVICES``), as the NVIDIA container runtime does.
"""

from __future__ import annotations

import re
from pathlib import Path

RESOURCE = "nvidia.com/gpu"
_DEVICE = re.compile(r"^nvidia\d+$")


def count_gpus(dev: Path = Path("/dev")) -> int:
    try:
        return sum(1 for entry in dev.iterdir() if _DEVICE.match(entry.name))
    except OSError:
        return 0


class GPUs:
    def __init__(self, count: int) -> None:
        self.count = count
        self._free = list(range(count))
        self._held: dict[str, list[int]] = {}

    def allocate(self, owner: str, wanted: int) -> list[int]:
        if wanted <= 0:
            return []
        given, self._free = self._free[:wanted], self._free[wanted:]
        self._held[owner] = given
        return given

    def release(self, owner: str) -> None:
        self._free = sorted(self._free + self._held.pop(owner, []))

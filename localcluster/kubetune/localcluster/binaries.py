"""Where the control plane's binaries are: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built by `make install` from the Go modules pinned in ``localcluster/controlplane``.

``$KUBETUNE_CONTROL_PLANE_BIN`` names a folder of prebuilt binaries instead (a machine that has
them, a CI cache); otherwise they are looked up beside this Python, where `make` puts them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = "KUBETUNE_CONTROL_PLANE_BIN"
NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class MissingBinaries(RuntimeError):
    """A control plane binary is not where it should be; the message says how to get it."""


@dataclass(frozen=True)
class ControlPlaneBinaries:
    etcd: Path
    apiserver: Path
    controller_manager: Path
    scheduler: Path


def find() -> ControlPlaneBinaries:
    folder = Path(os.environ[ENV]) if os.environ.get(ENV) else Path(sys.executable).parent
    paths = [folder / name for name in NAMES]
    missing = [p.name for p in paths if not os.access(p, os.X_OK)]
    if missing:
        source = f"${ENV}={folder}" if os.environ.get(ENV) else str(folder)
        raise MissingBinaries(
            f"{', '.join(missing)} not found in {source}: run `make install` in the kubetune checkout "
            f"(it builds the control plane from its Go modules), or set {ENV} to a folder holding "
            f"{', '.join(NAMES)}"
        )
    return ControlPlaneBinaries(*paths)

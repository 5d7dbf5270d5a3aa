"""The operator image stays slim and the builders stay pure: checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after_import(*names: str) -> set[str]:
    code = "import json, sys\n" + "".join(f"import {name}\n" for name in names) + "print(json.dumps(list(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(result.stdout))


def test_operator_never_imports_torch_trainer_or_local_cluster() -> None:
    loaded = _modules_after_import("kubetune.operator.handlers", "kubetune.operator.main")
    assert {"torch", "deepspeed", "kubetune.trainer", "kubetune.localcluster"} & loaded == set()


@pytest.mark.parametrize(
    "module",
    ["kubetune.operator.manifests", "kubetune.operator.status", "kubetune.api", "kubetune.api.crd"],
)
def test_pure_builders_import_neither_kopf_nor_an_api_client(module: str) -> None:
    assert {"kopf", "kubernetes"} & _modules_after_import(module) == set()

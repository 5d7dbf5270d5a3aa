"""Who may import whom, checked for every side in one place.

- kubetune.api is pure: none of the other sides, no kopf, torch or Kubernetes client;
- the trainer runs in a pod: never the operator or the local cluster;
- the operator talks to the world through the Kubernetes API: never the local cluster or torch;
- the local cluster is a Kubernetes, nothing more: never the operator or the trainer;
- the job commands (`kubectl kubetune`, kubetune.cli.jobs) are a client: kubetune.api, kubectl and
  boto3, never the operator, the trainer, the local cluster or kopf;
- the operator's pure parts (builders, status, reconciler, progress) import neither kopf nor an
  API client.

Read from the source (every import statement, lazy ones inside functions too), and, for the
operator, proven in a fresh interpreter: importing its entry point loads no torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "transformers", "peft", "accelerate")
RULES = {
    "api/kubetune/api": ("kubetune.operator", "kubetune.trainer", "kubetune.localcluster", "kubetune.cli",
                         "kopf", "kubernetes", "aiohttp", *HEAVY),
    "trainer/kubetune/trainer": ("kubetune.operator", "kubetune.localcluster", "kubetune.cli", "kopf", "kubernetes"),
    "operator/kubetune/operator": ("kubetune.trainer", "kubetune.localcluster", "kubetune.cli", *HEAVY),
    "localcluster/kubetune/localcluster": ("kubetune.operator", "kubetune.trainer", "kubetune.cli", "kopf", *HEAVY),
    "cli/kubetune/cli/jobs": ("kubetune.operator", "kubetune.trainer", "kubetune.localcluster", "kubetune.cli.demo",
                              "kopf", "kubernetes", "aiohttp", *HEAVY),
}
PURE = ("manifests.py", "status.py", "reconcile.py", "progress.py", "settings.py")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _breaks(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names for bad in forbidden if name == bad or name.startswith(bad + "."))


@pytest.mark.parametrize("root", sorted(RULES))
def test_each_side_imports_only_what_it_may(root: str) -> None:
    found = {
        str(path.relative_to(REPO)): broken
        for path in sorted((REPO / root).rglob("*.py"))
        if (broken := _breaks(_imports(path), RULES[root]))
    }
    assert found == {}


def test_the_operators_pure_parts_use_no_kopf_and_no_api_client() -> None:
    operator = REPO / "operator/kubetune/operator"
    found = {name: broken for name in PURE if (broken := _breaks(_imports(operator / name), ("kopf", "kubernetes")))}
    assert found == {}


def test_a_rule_catches_what_it_forbids(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef later():\n    from kubetune.trainer.train import run\n    import torch.nn\n")
    assert _breaks(_imports(sample), RULES["operator/kubetune/operator"]) == ["kubetune.trainer.train", "torch.nn"]


def test_the_operator_entry_point_loads_no_torch_at_run_time() -> None:
    code = ("import json, sys\nimport kubetune.operator.handlers, kubetune.operator.main\n"
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = set(json.loads(result.stdout))
    assert {*HEAVY, "kubetune.trainer", "kubetune.localcluster"} & loaded == set()


def test_the_kubectl_plugin_loads_no_component_and_no_boto3_until_s3_is_read() -> None:
    code = ("import json, sys\nimport kubetune.cli.jobs\nkubetune.cli.jobs.parser()\n"
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = set(json.loads(result.stdout))
    assert {*HEAVY, "kopf", "boto3", "kubetune.operator", "kubetune.trainer", "kubetune.localcluster"} & loaded == set()

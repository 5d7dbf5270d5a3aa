"""`pip install 'kubetune[operator]'` gives a slim operator: into an empty virtualenv it installs
without torch, DeepSpeed or transformers, and its entry point starts and works a job against
the real control plane. The other commands say which extra they need."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.cli.demo import Kubectl, install_crd
from kubetune.localcluster.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "transformers", "peft")
KUBECTL = str(Path(sys.executable).parent / "kubectl")


@pytest.fixture(scope="module")
def operator_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = str(Path(sys.executable).parent / "uv")
    venv = tmp_path_factory.mktemp("operator-image") / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    f"{REPO}[operator]"], check=True, timeout=600)
    return venv


def test_the_operator_extra_brings_no_training_stack(operator_venv: Path) -> None:
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))"
    found = subprocess.run([str(operator_venv / "bin" / "python"), "-c", probe, *HEAVY],
                           capture_output=True, text=True, check=True).stdout.split()
    assert found == []


def test_other_commands_name_the_extra_they_need(operator_venv: Path) -> None:
    result = subprocess.run([str(operator_venv / "bin" / "kubetune"), "local", "up"], capture_output=True, text=True)
    assert result.returncode == 2 and "pip install 'kubetune[local]'" in result.stderr


def test_the_slim_operator_runs_a_job_on_the_real_api(operator_venv: Path, tmp_path: Path) -> None:
    with LocalCluster(state_dir=tmp_path / "cluster", node=False) as cluster:
        kubectl = [KUBECTL, "--kubeconfig", str(cluster.kubeconfig)]
        install_crd(Kubectl(str(cluster.kubeconfig)), REPO)
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUBETUNE_METRICS_PORT": "0"}
        log = tmp_path / "operator.log"
        with open(log, "wb") as sink:
            operator = subprocess.Popen([str(operator_venv / "bin" / "kubetune"), "operator"], env=env,
                                        stdout=sink, stderr=subprocess.STDOUT)
        try:
            subprocess.run([*kubectl, "apply", "-f", str(REPO / "examples" / "quickstart.yaml")], check=True,
                           capture_output=True)
            deadline = time.monotonic() + 60
            pods = ""
            while time.monotonic() < deadline and "pod/quickstart-preflight" not in pods:
                assert operator.poll() is None, log.read_text()
                pods = subprocess.run([*kubectl, "get", "pods", "-o", "name"], capture_output=True, text=True).stdout
                time.sleep(0.5)
            assert "pod/quickstart-preflight" in pods, log.read_text()  # the job's first child: its preflight
        finally:
            operator.terminate()
            operator.wait(30)

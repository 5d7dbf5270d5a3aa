"""Fixtures for the embedded cluster: an API server on a free port, a kubeconfig, and real kubectl."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from apiserver_harness import RunningAPIServer, start_apiserver, stop_apiserver
# The kubelet tests' module-scoped cluster fixture, offered to every test in this folder.
from conftest_kubelet import cluster  # noqa: F401


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[RunningAPIServer]:
    running, thread = start_apiserver(tmp_path)
    try:
        yield running
    finally:
        stop_apiserver(running, thread)

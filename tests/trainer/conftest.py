"""Fixtures for the trainer tests: a real moto S3 server and the tiny demo assets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
import requests
from botocore.config import Config

ACCESS_KEY, SECRET_KEY = "kubetune-test", "kubetune-test-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def unused_port() -> Callable[[], int]:
    """Returns a function giving a free loopback port each call."""
    return free_port


@contextmanager
def moto_server(log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A moto S3 server on a free loopback port (``env`` added to its environment, e.g.
    INITIAL_NO_AUTH_ACTION_COUNT=0 to check credentials); killed on exit even if tests fail."""
    port = free_port()
    log = log_path.open("w")
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(endpoint, timeout=1)
                break
            except (requests.ConnectionError, requests.Timeout):  # a busy machine may accept and not answer yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server shared by the session's tests."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def strict_moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server that checks credentials (moto's IAM auth on): unknown keys get a 403."""
    with moto_server(tmp_path_factory.mktemp("moto-auth") / "moto.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        yield endpoint


@pytest.fixture
def own_moto_endpoint(tmp_path: Path) -> Iterator[str]:
    """A moto server of the test's own, for a test that changes server-wide settings (such as
    turning on moto's IAM checks through /moto-api/reset-auth)."""
    with moto_server(tmp_path / "own-moto.log") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_env(moto_endpoint: str) -> dict[str, str]:
    """Environment a trainer process needs to reach the test S3."""
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    return env


@pytest.fixture
def s3_client(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    return boto3.client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model + datasets written once per session."""
    from kubetune.trainer.tiny import write_demo_assets

    root = tmp_path_factory.mktemp("tiny")
    write_demo_assets(root)
    return root


@pytest.fixture(scope="session")
def uploaded_assets(moto_endpoint: str, tiny_assets: Path) -> dict[str, str]:
    from kubetune.trainer.tiny import upload_demo_assets

    return upload_demo_assets(moto_endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, assets_dir=tiny_assets)

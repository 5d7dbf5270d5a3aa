"""The trainer's termination message: how a worker tells the operator how it ended.

Each trainer writes one JSON object to its container's termination message file
(``/dev/termination-log``), which the kubelet puts into the pod's
``status.containerStatuses[].state.terminated.message``; the operator reads it into the job's
``status.results`` or, for a failure, its ``status.message``. Kubernetes keeps at most 4096
bytes, so an overlong error is cut rather than the JSON left unparsable.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import ConfigDict, ValidationError

from kubetune.api.model import ApiModel

MAX_BYTES = 4096
DEFAULT_PATH = "/dev/termination-log"


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
    tokens: int | None = None
    """Real (non-padding) tokens trained on."""
    adapter_uri: str | None = None
    """Where the adapter was published."""
    error: str | None = None
    """The one-line error of a failed run."""

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
    def failed(cls, error: str) -> TerminationMessage:
        return cls(outcome="Failed", error=" ".join(str(error).split()))  # one line, whatever it held

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

"""The exception types the trainer raises for problems a user can fix, each with its exit code.

``python -m kubetune.trainer`` prints one as a single line on stderr (no traceback), exits with
its ``exit_code`` and writes both into the termination message. torchrun exits 1 whatever its
ranks did, so the operator reads the code from the termination message: a code in
``kubetune.api.termination.PERMANENT_EXIT_CODES`` (bad input) fails the job at once, any
other restarts the gang from the newest checkpoint.

When in doubt a problem is transient (plain :class:`TrainerError`, exit 1): a wrong
"permanent" fails a job a restart would have cured, a wrong "transient" costs only retries.
"""

from __future__ import annotations

from kubetune.api.termination import ExitCode

STOPPED_ON_SIGTERM = ExitCode.STOPPED
"""143, as a shell reports a process ended by SIGTERM: the pod is going away; not bad input."""


class TrainerError(Exception):
    """A problem the message explains in one line; the subclasses say whether a restart helps.

    A plain TrainerError is transient (ExitCode.FAILED: a lost peer, an unreachable or busy S3
    endpoint): the operator restarts the gang.
    """

    exit_code: int = ExitCode.FAILED


class ConfigError(TrainerError):
    """The trainer config (the job's spec) cannot run as written."""

    exit_code = ExitCode.INVALID_CONFIG


class DataError(TrainerError):
    """The dataset cannot be used as written (a bad line, too few examples)."""

    exit_code = ExitCode.INVALID_DATA


class AccessError(TrainerError):
    """S3 refused the credentials, or a bucket or an input object does not exist."""

    exit_code = ExitCode.NO_ACCESS


class QualityGateError(TrainerError):
    """The adapter missed qualityGate; it was not published."""

    exit_code = ExitCode.QUALITY_GATE


class Stopped(TrainerError):
    """The process got SIGTERM (the pod is deleted: suspend, gang restart, job deleted) and
    stopped at an optimizer step boundary, with a checkpoint of that step where it could."""

    exit_code = STOPPED_ON_SIGTERM

    def __init__(self, step: int, total_steps: int | None, how: str) -> None:
        super().__init__(f"stopped on SIGTERM at step {step} {how}")
        self.step, self.total_steps = step, total_steps

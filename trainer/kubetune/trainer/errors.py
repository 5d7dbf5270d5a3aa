"""The one exception type the trainer raises for problems a user can fix."""


class TrainerError(Exception):
    """A config, data or storage problem; the message names what to fix.

    ``python -m kubetune.trainer`` prints it as a single line on stderr (no traceback)
    and exits 1, so it shows up verbatim in the pod's logs and termination message.
    """

"""The FineTuneJob resource: its group, version and names, and the rules on its name."""

from __future__ import annotations

import re

from kubetune.api.model import InvalidObjectError, Rule

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CRD_NAME = f"{PLURAL}.{GROUP}"

MAX_NAME_LENGTH = 52
"""Pods are named ``<job>-worker-<index>`` (index < 64) and their hostnames must be DNS labels
(63 characters at most)."""
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

NAME_RULES = (
    Rule(
        cel="self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        message=(
            "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter "
            "and ending with a letter or digit) because it names the job's Service <name>-workers; for example "
            "support-bot."
        ),
        check=lambda name: bool(_DNS_1035_LABEL.match(name)),
    ),
    Rule(
        cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        message=(
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters so that worker pod names "
            "(<name>-worker-<index>) stay valid DNS labels; choose a shorter name."
        ),
        check=lambda name: len(name) <= MAX_NAME_LENGTH,
    ),
)
NAME_CHECKS = tuple(rule for rule in NAME_RULES if rule.check is not None)


def check_job_name(name: str) -> None:
    """The admission rules on metadata.name, for a job no API server checked."""
    broken = [rule.message for rule in NAME_CHECKS if not rule.check(name)]  # type: ignore[misc]
    if broken:
        raise InvalidObjectError(f"metadata.name {name!r}: " + " ".join(broken))

"""The base of every kubetune API type, and the cross-field rules declared beside the fields.

A type's field docstrings are its documentation: they become the CRD's descriptions (what
``kubectl explain`` prints) and the trainer config's reference. A ``Rule`` is written once as
CEL, which the API server evaluates at admission (the CRD's ``x-kubernetes-validations``), with
the same check in Python for objects that never met an API server (a trainer config file, a
test); ``tests/api`` evaluates both on the same objects so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: ``cel`` for the API server, ``check`` for Python; both refuse with
    ``message``, which names the fields (as a user writes them) and the fix. A rule without
    ``check`` compares an update with the stored object (``oldSelf``): only the API server,
    which sees both, can enforce it. ``message_expression``: CEL for a message that says more
    than ``message`` can (which of the fields changed); the API server falls back to
    ``message`` when it fails."""

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    message_expression: str | None = None


class ApiModel(BaseModel):
    """camelCase keys as in the manifest; unknown keys are errors (a typo must never be silently
    ignored); immutable; field docstrings are the field descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        use_attribute_docstrings=True,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules_hold(self) -> ApiModel:
        broken = [rule.message for rule in type(self).rules if rule.check is not None and not rule.check(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self


class InvalidObjectError(ValueError):
    """An object cannot be used as written; the message names each field and the fix."""


def describe(error: ValidationError, prefix: str = "") -> str:
    """One clause per problem, each naming the field as a user writes it (``spec.a.b``)."""
    clauses = []
    for problem in error.errors(include_url=False):
        if problem["type"] == "value_error":
            # Rules and field validators name their fields themselves.
            clauses.append(str(problem["ctx"]["error"]))
            continue
        where = ".".join(str(part) for part in ((prefix,) if prefix else ()) + tuple(problem["loc"]))
        where = where or "(top level)"
        if problem["type"] == "extra_forbidden":
            clauses.append(f"{where}: unknown field (check its spelling against `kubectl explain finetunejobs.spec`)")
        elif problem["type"] == "missing":
            clauses.append(f"{where}: required field is missing")
        else:
            clauses.append(f"{where}: {problem['msg']}")
    return "; ".join(clauses)

"""Label and field selectors as `kubectl get -l` / `--field-selector` send them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import bad_request

_SET_TERM = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\((.*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|!=|=)\s*([A-Za-z0-9_./-]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value sets."""
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current)
    return [t for t in terms if t.strip()]


Matcher = Callable[[dict[str, str]], bool]


def _label_term(term: str) -> Matcher:
    if match := _SET_TERM.match(term):
        key, op, values_text = match.groups()
        values = {v.strip() for v in values_text.split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQ_TERM.match(term):
        key, op, value = match.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS_TERM.match(term):
        negate, key = match.groups()
        if negate:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise bad_request(f"unable to parse requirement: invalid label selector term {term.strip()!r}")


@dataclass(frozen=True)
class LabelSelector:
    matchers: tuple[Matcher, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "LabelSelector":
        if not text:
            return cls()
        return cls(tuple(_label_term(term) for term in _split_terms(text)))

    def matches(self, obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(matcher(labels) for matcher in self.matchers)


def field_value(obj: dict[str, Any], path: str) -> str:
    """Value of a dotted field path as a selector compares it (missing -> empty string)."""
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "FieldSelector":
        if not text:
            return cls()
        terms = []
        for term in _split_terms(text):
            match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(==|!=|=)\s*(.*?)\s*$", term)
            if not match:
                raise bad_request(f"invalid field selector term {term.strip()!r}: expected field=value or field!=value")
            terms.append(match.groups())
        return cls(tuple(terms))

    def matches(self, obj: dict[str, Any]) -> bool:
        for path, op, value in self.terms:
            actual = field_value(obj, path)
            if (actual == value) != (op != "!="):
                return False
        return True


@dataclass(frozen=True)
class Selector:
    labels: LabelSelector
    fields: FieldSelector

    @classmethod
    def parse(cls, label_selector: str | None, field_selector: str | None) -> "Selector":
        return cls(LabelSelector.parse(label_selector), FieldSelector.parse(field_selector))

    def matches(self, obj: dict[str, Any]) -> bool:
        return self.labels.matches(obj) and self.fields.matches(obj)

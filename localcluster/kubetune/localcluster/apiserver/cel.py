"""``x-kubernetes-validations`` (CEL) for custom objects, evaluated with cel-python.

Mirrors apiextensions-apiserver schema/cel/validation.go: rules of every schema level run
against ``self`` (the value at that level), transition rules (those naming ``oldSelf``) run
only on update when an old value exists (with ``optionalOldSelf: true`` also on create, with
``oldSelf`` an optional: ``hasValue()``, ``value()``, ``orValue(x)``), and a failed rule becomes a field error worded as
kube-apiserver 1.35+ words it: the rule's message (or ``messageExpression``, or
``failed rule: <rule>``), with the value shown for scalars and left out for objects and lists.

cel-python only parses at compile time (no type checker), so unknown variables or functions
surface when a rule runs, as an evaluation error.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import celpy
import celpy.celtypes as celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

from kubetune.localcluster.apiserver.schema import (
    FIELD_VALUE_DUPLICATE,
    FIELD_VALUE_FORBIDDEN,
    FIELD_VALUE_INVALID,
    FIELD_VALUE_REQUIRED,
    OMITTED,
    FieldError,
)

_ENV = celpy.Environment()
_OLD_SELF = re.compile(r"\boldSelf\b")
_STRING_LITERAL = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")


def _lower_ascii(text: Any) -> Any:
    return celtypes.StringType(str(text).lower())


def _upper_ascii(text: Any) -> Any:
    return celtypes.StringType(str(text).upper())


def _trim(text: Any) -> Any:
    return celtypes.StringType(str(text).strip())


def _split(text: Any, separator: Any) -> Any:
    return celtypes.ListType([celtypes.StringType(part) for part in str(text).split(str(separator))])


def _join(items: Any, separator: Any = "") -> Any:
    return celtypes.StringType(str(separator).join(str(item) for item in items))


def _index_of(text: Any, needle: Any) -> Any:
    return celtypes.IntType(str(text).find(str(needle)))


class OptionalValue:
    """CEL ``optional`` for ``optionalOldSelf`` rules (cel-python has no optional type)."""

    def __init__(self, value: Any = None, present: bool = False) -> None:
        self.inner, self.present = value, present


def _has_value(optional: OptionalValue) -> Any:
    return celtypes.BoolType(optional.present)


def _value(optional: OptionalValue) -> Any:
    if not optional.present:
        raise ValueError("optional.none() dereference")
    return optional.inner


def _or_value(optional: OptionalValue, fallback: Any) -> Any:
    return optional.inner if optional.present else fallback


# A few of the Kubernetes CEL string library functions that CRD authors commonly use, and the
# optional methods optionalOldSelf rules call on oldSelf.
_EXTRA_FUNCTIONS = {
    "lowerAscii": _lower_ascii,
    "upperAscii": _upper_ascii,
    "trim": _trim,
    "split": _split,
    "join": _join,
    "indexOf": _index_of,
    "hasValue": _has_value,
    "value": _value,
    "orValue": _or_value,
}


class RuleCompileError(ValueError):
    """A CEL expression that does not parse."""


@functools.lru_cache(maxsize=4096)
def compile_rule(expression: str) -> Any:
    """Parse and prepare one CEL expression once; raises RuleCompileError with cel's message."""
    try:
        ast = _ENV.compile(expression)
    except CELParseError as exc:
        raise RuleCompileError(str(exc).strip()) from exc
    return _ENV.program(ast, functions=_EXTRA_FUNCTIONS)


def uses_old_self(expression: str) -> bool:
    """Whether a rule is a transition rule (names ``oldSelf`` outside string literals)."""
    return bool(_OLD_SELF.search(_STRING_LITERAL.sub("''", expression)))


# ---------------------------------------------------------------------------------------------
# JSON -> CEL values, typed by the schema (integer vs double matters in CEL: 1 != 1.0)


def to_cel(value: Any, schema: dict[str, Any] | None) -> Any:
    schema = schema or {}
    declared = schema.get("type")
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, (int, float)):
        if declared == "number":
            return celtypes.DoubleType(float(value))
        if declared == "integer" or schema.get("x-kubernetes-int-or-string"):
            return celtypes.IntType(int(value))
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else None
        return celtypes.ListType([to_cel(item, items) for item in value])
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
    return celtypes.MapType({
        celtypes.StringType(key): to_cel(item, properties.get(key, extra))
        for key, item in value.items()
    })


# ---------------------------------------------------------------------------------------------
# Evaluation


def validate_rules(schema: dict[str, Any], obj: Any, old: Any = None, path: str = "") -> list[FieldError]:
    """Evaluate every ``x-kubernetes-validations`` rule in ``schema`` against ``obj``.

    Walks like the API server: the rules of a node, then its list items (``[i]``), map values
    (``[key]``) and properties (``.name``). ``old`` is the stored object on update; it follows
    the new value through properties, granular maps and list-type=map lists (by key).
    """
    errors: list[FieldError] = []
    _walk(schema, obj, old, path, errors)
    return errors


def _walk(schema: dict[str, Any] | None, value: Any, old: Any, path: str, errors: list[FieldError]) -> None:
    if not isinstance(schema, dict) or value is None:
        return
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        errors.extend(_evaluate_node(schema, rules, value, old, path))
    for nested in schema.get("allOf") or []:
        if isinstance(nested, dict) and nested.get("x-kubernetes-validations"):
            merged = {**schema, "x-kubernetes-validations": nested["x-kubernetes-validations"]}
            errors.extend(_evaluate_node(merged, merged["x-kubernetes-validations"], value, old, path))
    if isinstance(value, list):
        items = schema.get("items")
        old_items = _correlate_list(schema, value, old)
        for index, item in enumerate(value):
            _walk(items, item, old_items[index], f"{path}[{index}]", errors)
    elif isinstance(value, dict):
        extra = schema.get("additionalProperties")
        properties = schema.get("properties") or {}
        old_map = old if isinstance(old, dict) and schema.get("x-kubernetes-map-type") != "atomic" else {}
        if isinstance(extra, dict):
            for key, item in value.items():
                _walk(extra, item, old_map.get(key), f"{path}[{key}]", errors)
        for key, item in value.items():
            if key in properties:
                _walk(properties[key], item, old_map.get(key), f"{path}.{key}" if path else key, errors)


def _correlate_list(schema: dict[str, Any], value: list[Any], old: Any) -> list[Any]:
    """Old element for each new element: only list-type=map (by keys) and set (by value) correlate."""
    if not isinstance(old, list):
        return [None] * len(value)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []

        def key_of(item: Any) -> Any:
            return tuple(json.dumps(item.get(k), sort_keys=True) for k in keys) if isinstance(item, dict) else None

        by_key = {key_of(item): item for item in old}
        return [by_key.get(key_of(item)) for item in value]
    if list_type == "set":
        present = {json.dumps(item, sort_keys=True) for item in old}
        return [item if json.dumps(item, sort_keys=True) in present else None for item in value]
    return [None] * len(value)


def _rule_text(rule: dict[str, Any]) -> str:
    """ruleErrorString: the message when there is one, else the rule."""
    message = str(rule.get("message") or "").strip()
    return message or str(rule.get("rule") or "").strip()


def _node_type(schema: dict[str, Any]) -> str:
    return schema.get("type") or ("integer,string" if schema.get("x-kubernetes-int-or-string") else "")


def _evaluate_node(schema: dict[str, Any], rules: list[dict[str, Any]], value: Any, old: Any,
                   path: str) -> list[FieldError]:
    errors = []
    self_value = to_cel(value, schema)
    old_value = to_cel(old, schema) if old is not None else None
    for rule in rules:
        expression = str(rule.get("rule") or "")
        transition = uses_old_self(expression)
        optional_old = bool(rule.get("optionalOldSelf")) and transition
        if transition and old is None and not optional_old:
            continue  # transition rules only judge updates, unless optionalOldSelf asks otherwise
        activation: dict[str, Any] = {"self": self_value}
        if optional_old:
            activation["oldSelf"] = OptionalValue(old_value, old is not None)
        elif transition:
            activation["oldSelf"] = old_value
        try:
            program = compile_rule(expression)
        except RuleCompileError as exc:
            errors.append(FieldError(path, FIELD_VALUE_INVALID, _node_type(schema), f"rule compile error: compilation failed: {exc}"))
            continue
        try:
            result = program.evaluate(activation)
        except CELEvalError as exc:
            errors.append(_evaluation_error(schema, path, exc, rule))
            continue
        except Exception as exc:  # cel-python raises plain Python errors for some misuse
            errors.append(FieldError(path, FIELD_VALUE_INVALID, _node_type(schema),
                                     f"{exc} evaluating rule: {_rule_text(rule)}"))
            continue
        if isinstance(result, CELEvalError):
            errors.append(_evaluation_error(schema, path, result, rule))
            continue
        if not isinstance(result, celtypes.BoolType):
            errors.append(FieldError(path, FIELD_VALUE_INVALID, _node_type(schema),
                                     f"cel expression must evaluate to a bool evaluating rule: {_rule_text(rule)}"))
            continue
        if result:
            continue
        errors.append(_rule_failure(schema, rule, value, activation, _with_field_path(path, rule)))
    return errors


def _evaluation_error(schema: dict[str, Any], path: str, exc: CELEvalError, rule: dict[str, Any]) -> FieldError:
    text = _describe_eval_error(exc)
    if text.startswith("no such overload"):
        detail = (f"'{text}': call arguments did not match a supported operator, function or macro "
                  f"signature for rule: {_rule_text(rule)}")
    else:
        detail = f"{text} evaluating rule: {_rule_text(rule)}"
    return FieldError(path, FIELD_VALUE_INVALID, _node_type(schema), detail)


def _describe_eval_error(exc: CELEvalError) -> str:
    """cel-go's wording for the common runtime errors, from cel-python's (message, type, args)."""
    message, kind = (exc.args + (None, None))[:2]
    message = str(message)
    if kind is KeyError:
        missing = re.search(r"'([^']*)'", message)
        name = missing.group(1) if missing else message
        if message.startswith("undeclared reference"):
            return f"undeclared reference to '{name}'"
        return f"no such key: {name}"
    if kind is TypeError and "no matching overload" in message:
        return "no such overload"
    if kind is ZeroDivisionError:
        # cel-go says "modulus by zero" for %; cel-python reports both operators alike
        return "division by zero"
    return message


def _with_field_path(path: str, rule: dict[str, Any]) -> str:
    """Append a rule's ``fieldPath`` (".a.b" or "['a']") to the node path."""
    field_path = str(rule.get("fieldPath") or "").strip()
    if not field_path:
        return path
    parts = re.findall(r"\.([^.\[\]]+)|\['((?:\\.|[^'])*)'\]", field_path)
    relative = ".".join(name or key for name, key in parts)
    return f"{path}.{relative}" if path else relative


def _rule_failure(schema: dict[str, Any], rule: dict[str, Any], value: Any, activation: dict[str, Any],
                  path: str) -> FieldError:
    detail = _message_expression(rule, activation)
    if detail is None:
        message = str(rule.get("message") or "").strip()
        detail = message or f"failed rule: {str(rule.get('rule') or '').strip()}"
    # kube-apiserver 1.35+ omits the value of objects and lists (it used to print "object")
    shown = OMITTED if schema.get("type") in ("object", "array") else value
    reason = rule.get("reason")
    if reason == FIELD_VALUE_FORBIDDEN:
        return FieldError(path, FIELD_VALUE_FORBIDDEN, "", detail)
    if reason == FIELD_VALUE_REQUIRED:
        return FieldError(path, FIELD_VALUE_REQUIRED, "", detail)
    if reason == FIELD_VALUE_DUPLICATE:
        return FieldError(path, FIELD_VALUE_DUPLICATE, shown, "")
    return FieldError(path, FIELD_VALUE_INVALID, shown, detail)


def _message_expression(rule: dict[str, Any], activation: dict[str, Any]) -> str | None:
    """The evaluated messageExpression, or None when absent or unusable (Kubernetes falls back)."""
    expression = str(rule.get("messageExpression") or "").strip()
    if not expression:
        return None
    try:
        result = compile_rule(expression).evaluate(activation)
    except Exception:
        return None
    if not isinstance(result, str):
        return None
    text = str(result).strip()
    if not text or "\n" in text:
        return None
    return text


# ---------------------------------------------------------------------------------------------
# CRD creation checks


def compile_errors(schema: dict[str, Any], root: str = "") -> list[str]:
    """Every rule or messageExpression in ``schema`` that does not compile, worded like Kubernetes."""
    problems: list[str] = []
    _collect_compile_errors(schema, root, problems)
    return problems


def _schema_path(base: str, suffix: str) -> str:
    return f"{base}.{suffix}" if base else suffix


def _collect_compile_errors(schema: Any, path: str, problems: list[str]) -> None:
    if not isinstance(schema, dict):
        return
    for index, rule in enumerate(schema.get("x-kubernetes-validations") or []):
        if not isinstance(rule, dict):
            continue
        rule_path = _schema_path(path, f"x-kubernetes-validations[{index}]")
        shown = json.dumps(rule, separators=(",", ":"))
        for key, label in (("rule", "compilation failed"), ("messageExpression", "messageExpression compilation failed")):
            expression = str(rule.get(key) or "").strip()
            if not expression:
                continue
            try:
                compile_rule(expression)
            except RuleCompileError as exc:
                problems.append(f"{rule_path}.{key}: Invalid value: {shown}: {label}: {exc}")
        if rule.get("optionalOldSelf") is not None and not uses_old_self(str(rule.get("rule") or "")):
            problems.append(f"{rule_path}.optionalOldSelf: Invalid value: "
                            f"{json.dumps(rule['optionalOldSelf'])}: may not be set if oldSelf is not used in rule")
    for name, prop in (schema.get("properties") or {}).items():
        _collect_compile_errors(prop, _schema_path(path, f"properties[{name}]"), problems)
    if isinstance(schema.get("items"), dict):
        _collect_compile_errors(schema["items"], _schema_path(path, "items"), problems)
    if isinstance(schema.get("additionalProperties"), dict):
        _collect_compile_errors(schema["additionalProperties"], _schema_path(path, "additionalProperties"), problems)
    for index, nested in enumerate(schema.get("allOf") or []):
        _collect_compile_errors(nested, _schema_path(path, f"allOf[{index}]"), problems)

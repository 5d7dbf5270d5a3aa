"""CustomResourceDefinition structural-schema semantics: pruning, defaulting and validation.

Pure functions over JSON-like data, mirroring what kube-apiserver does to a custom object:
``prune_unknown`` (apiextensions pruning/algorithm.go), ``apply_defaults``
(defaulting/algorithm.go + prunenulls.go), ``validate`` (kube-openapi validate/* turned into
field errors by apiextensions validation.go, then ``x-kubernetes-validations`` via cel.py) and
``check_structural`` (schema/validation.go) for refusing a CRD.

Error texts are Kubernetes' own (k8s.io/apimachinery util/validation/field ErrorBody and
kube-openapi errors/schema.go), so clients and humans see what a real cluster would print.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

FIELD_VALUE_INVALID = "FieldValueInvalid"
FIELD_VALUE_REQUIRED = "FieldValueRequired"
FIELD_VALUE_NOT_SUPPORTED = "FieldValueNotSupported"
FIELD_VALUE_TYPE_INVALID = "FieldValueTypeInvalid"
FIELD_VALUE_FORBIDDEN = "FieldValueForbidden"
FIELD_VALUE_TOO_LONG = "FieldValueTooLong"
FIELD_VALUE_TOO_MANY = "FieldValueTooMany"
FIELD_VALUE_DUPLICATE = "FieldValueDuplicate"

_TYPE_TEXT = {
    FIELD_VALUE_INVALID: "Invalid value",
    FIELD_VALUE_REQUIRED: "Required value",
    FIELD_VALUE_NOT_SUPPORTED: "Unsupported value",
    FIELD_VALUE_TYPE_INVALID: "Invalid value",
    FIELD_VALUE_FORBIDDEN: "Forbidden",
    FIELD_VALUE_TOO_LONG: "Too long",
    FIELD_VALUE_TOO_MANY: "Too many",
    FIELD_VALUE_DUPLICATE: "Duplicate value",
}
# Kubernetes prints these without the offending value (field.Error.ErrorBody).
_VALUELESS_TYPES = {FIELD_VALUE_REQUIRED, FIELD_VALUE_FORBIDDEN, FIELD_VALUE_TOO_LONG}

# The errors after which kube-apiserver skips CEL rules (customresource strategy hasBlockingErr):
# the object does not have the shape the rules were written for.
BLOCKING_TYPES = {FIELD_VALUE_NOT_SUPPORTED, FIELD_VALUE_REQUIRED, FIELD_VALUE_TOO_LONG,
                  FIELD_VALUE_TOO_MANY, FIELD_VALUE_TYPE_INVALID}
CEL_SKIPPED_DETAIL = ("some validation rules were not checked because the object was invalid; "
                      "correct the existing errors to complete validation")


ROOT_FIELD = "<nil>"  # how field.Path prints the path of the whole object


class _Omitted:
    """Marks a field error whose value Kubernetes leaves out of the message (field.OmitValueType)."""

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED: Any = _Omitted()


def go_float(value: float) -> str:
    """Go's ``%v`` for a float64: shortest round-trip digits, exponent form below 1e-4 and from 1e6.

    (fmt's %v is strconv 'g' with the shortest precision, which switches to an exponent when it
    is < -4 or >= 6: Go prints 1e6 as "1e+06" and 123456.0 as "123456".)
    """
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == 0:
        return "0"
    sign, digit_tuple, exponent = Decimal(repr(value)).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent += len(digit_tuple) - 1  # decimal exponent of the first digit
    prefix = "-" if sign else ""
    if exponent < -4 or exponent >= 6:
        head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{prefix}{head}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if exponent < 0:
        return f"{prefix}0.{'0' * (-exponent - 1)}{digits}"
    if len(digits) <= exponent + 1:
        return prefix + digits + "0" * (exponent + 1 - len(digits))
    return f"{prefix}{digits[:exponent + 1]}.{digits[exponent + 1:]}"


def go_value(value: Any) -> str:
    """Render a bad value the way field.Error.ErrorBody does (%v, %q or JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class FieldError:
    """One field-level validation error, as kube-apiserver reports it in Status causes.

    ``field`` is the path ("spec.workers.replicas", "spec.lora.targetModules[0]"); the object
    root is ``<nil>`` (an empty field is normalised to it), as in Kubernetes' Status causes.
    """

    field: str
    type: str
    value: Any
    detail: str

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", ROOT_FIELD)

    @property
    def reason(self) -> str:
        """The Status cause ``reason`` (Kubernetes uses the error type itself)."""
        return self.type

    @property
    def body(self) -> str:
        """The message without the field path (field.Error.ErrorBody)."""
        text = _TYPE_TEXT.get(self.type, self.type)
        if self.type not in _VALUELESS_TYPES and self.value is not OMITTED:
            text = f"{text}: {go_value(self.value)}"
        if self.detail:
            text = f"{text}: {self.detail}"
        return text

    @property
    def message(self) -> str:
        return f"{self.field}: {self.body}"


# ---------------------------------------------------------------------------------------------
# Schema helpers


def _types(schema: dict[str, Any]) -> list[str]:
    if schema.get("x-kubernetes-int-or-string"):
        return ["integer", "string"]
    declared = schema.get("type")
    return [declared] if declared else []


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _additional_schema(schema: dict[str, Any]) -> dict[str, Any] | None:
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _child_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---------------------------------------------------------------------------------------------
# Pruning


def prune_unknown(schema: dict[str, Any] | None, obj: Any) -> tuple[Any, list[str]]:
    """Drop fields the structural schema does not declare; returns (pruned copy, sorted paths).

    Like kube-apiserver the root is an embedded resource, so apiVersion, kind and metadata are
    kept at the root (metadata is ObjectMeta, handled elsewhere), and inside any
    ``x-kubernetes-embedded-resource`` node. ``x-kubernetes-preserve-unknown-fields`` keeps
    unknown fields but still prunes inside known properties.
    """
    pruned = copy.deepcopy(obj)
    root = dict(schema or {})
    root["x-kubernetes-embedded-resource"] = True
    unknown: list[str] = []
    _prune(pruned, root, "", unknown)
    return pruned, sorted(unknown)


_META_FIELDS = {"apiVersion", "kind", "metadata"}


def _prune(value: Any, schema: dict[str, Any] | None, path: str, unknown: list[str]) -> None:
    if schema is not None and schema.get("x-kubernetes-preserve-unknown-fields"):
        _prune_preserving(value, schema, path, unknown)
        return
    if isinstance(value, dict):
        if schema is None:
            for key in list(value):
                unknown.append(_child_path(path, key))
                del value[key]
            return
        properties = schema.get("properties") or {}
        for key in list(value):
            if schema.get("x-kubernetes-embedded-resource") and key in _META_FIELDS:
                continue
            if key in properties:
                _prune(value[key], properties[key], _child_path(path, key), unknown)
            elif "additionalProperties" in schema and schema["additionalProperties"] is not False:
                _prune(value[key], _additional_schema(schema), _child_path(path, key), unknown)
            else:
                if key not in _META_FIELDS or path:
                    unknown.append(_child_path(path, key))
                del value[key]
    elif isinstance(value, list):
        items = schema.get("items") if schema is not None else None
        for index, item in enumerate(value):
            _prune(item, items, f"{path}[{index}]", unknown)


def _prune_preserving(value: Any, schema: dict[str, Any], path: str, unknown: list[str]) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key in list(value):
            if schema.get("x-kubernetes-embedded-resource") and key in _META_FIELDS:
                continue
            if key in properties:
                _prune(value[key], properties[key], _child_path(path, key), unknown)
            elif _additional_schema(schema) is not None:
                _prune(value[key], _additional_schema(schema), _child_path(path, key), unknown)
    elif isinstance(value, list):
        items = schema.get("items")
        if items is not None:
            for index, item in enumerate(value):
                _prune_preserving(item, items, f"{path}[{index}]", unknown)


# ---------------------------------------------------------------------------------------------
# Defaulting


def apply_defaults(schema: dict[str, Any] | None, obj: Any) -> Any:
    """Return a defaulted deep copy, as kube-apiserver defaults a custom object.

    A ``default`` fills a property that is absent, or null when the property is not nullable;
    defaults inside an object apply only when that object exists (defaults are not
    materialised from nothing). Afterwards nulls of non-nullable fields without a default are
    dropped, as the API server does when decoding.
    """
    result = copy.deepcopy(obj)
    _default(result, schema)
    _prune_nulls(result, schema)
    return result


def _non_nullable_null(value: Any, schema: dict[str, Any] | None) -> bool:
    return value is None and schema is not None and not schema.get("nullable", False)


def _default(value: Any, schema: dict[str, Any] | None) -> None:
    if schema is None:
        return
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, prop in properties.items():
            if "default" not in prop:
                continue
            if key not in value or _non_nullable_null(value[key], prop):
                value[key] = copy.deepcopy(prop["default"])
        extra = _additional_schema(schema)
        for key in list(value):
            if key in properties:
                _default(value[key], properties[key])
            elif extra is not None:
                if _non_nullable_null(value[key], extra) and "default" in extra:
                    value[key] = copy.deepcopy(extra["default"])
                _default(value[key], extra)
    elif isinstance(value, list):
        items = schema.get("items")
        for index in range(len(value)):
            if items is not None and _non_nullable_null(value[index], items) and "default" in items:
                value[index] = copy.deepcopy(items["default"])
            _default(value[index], items)


def _field_schema(key: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    if schema is None:
        return None
    properties = schema.get("properties") or {}
    if key in properties:
        return properties[key]
    return _additional_schema(schema)


def _prune_nulls(value: Any, schema: dict[str, Any] | None) -> None:
    if isinstance(value, dict):
        for key in list(value):
            sub = _field_schema(key, schema)
            if _non_nullable_null(value[key], sub) and "default" not in (sub or {}):
                del value[key]
            else:
                _prune_nulls(value[key], sub)
    elif isinstance(value, list):
        items = schema.get("items") if schema is not None else None
        for item in value:
            _prune_nulls(item, items)


# ---------------------------------------------------------------------------------------------
# Validation (kube-openapi SchemaValidator, then apiextensions' conversion to field errors)


def validate(schema: dict[str, Any] | None, obj: Any, old: Any = None) -> list[FieldError]:
    """All validation errors of ``obj`` against a CRD's openAPIV3Schema, in the API server's order.

    Schema errors come first (per node: type, string, format, number, array, enum, object),
    then the ``x-kubernetes-validations`` CEL rules of every level, unless a blocking schema
    error (type, required, enum, too long, too many) makes the rules meaningless; then a single
    error says so, as kube-apiserver does. ``old`` enables transition rules (``oldSelf``).
    """
    if not schema:
        return []
    errors = list(_validate_node(schema, obj, ""))
    if any(error.type in BLOCKING_TYPES for error in errors):
        errors.append(FieldError("", FIELD_VALUE_INVALID, None, CEL_SKIPPED_DETAIL))
        return errors
    from kubetune.localcluster.apiserver import cel

    errors.extend(cel.validate_rules(schema, obj, old))
    return errors


def _validate_node(schema: dict[str, Any], value: Any, path: str) -> Iterator[FieldError]:
    types = _types(schema)
    type_error = _check_type(schema, types, value, path)
    if type_error is not None:
        yield type_error
    if value is None:
        # kube-openapi runs only the type and enum checks on null; a nullable null passes both
        if not schema.get("nullable"):
            yield from _check_enum(schema, value, path)
        return
    if isinstance(value, str):
        yield from _check_string(schema, value, path)
        yield from _check_format(schema, value, path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield from _check_number(schema, value, path)
    if isinstance(value, list):
        yield from _check_array(schema, value, path)
    yield from _check_enum(schema, value, path)
    if isinstance(value, dict):
        yield from _check_object(schema, value, path)


def _type_invalid(path: str, type_name: str, found: str) -> FieldError:
    detail = f"{path} in body must be of type {type_name}: {json.dumps(found)}"
    return FieldError(path, FIELD_VALUE_TYPE_INVALID, found, detail)


def _check_type(schema: dict[str, Any], types: list[str], value: Any, path: str) -> FieldError | None:
    if not types:
        return None
    found = _json_type(value)
    if value is None:
        if schema.get("nullable"):
            return None
        return _type_invalid(path, ",".join(types), "null")
    numeric = {"number", "integer"} & set(types)
    if schema.get("format") and not numeric and isinstance(value, (str, list)):
        return None  # kube-openapi leaves formatted strings/lists to the format validator
    float_int = found == "number" and float(value).is_integer() and "integer" in types
    int_float = found == "integer" and "number" in types
    if found in types or float_int or int_float:
        return None
    return _type_invalid(path, ",".join(types), found)


def _invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, FIELD_VALUE_INVALID, value, detail)


def _ecma_to_python(pattern: str) -> str:
    # ECMA-262 and Python agree on everything CRD patterns use in practice; \d and \w in Go's
    # RE2 (what kube-apiserver really runs) are ASCII-only, so match that.
    return "(?a)" + pattern


def _check_string(schema: dict[str, Any], value: str, path: str) -> Iterator[FieldError]:
    length = len(value)
    if "maxLength" in schema and length > schema["maxLength"]:
        maximum = int(schema["maxLength"])
        unit = "byte" if maximum == 1 else "bytes"
        yield FieldError(path, FIELD_VALUE_TOO_LONG, value, f"may not be more than {maximum} {unit}")
    if "minLength" in schema and length < schema["minLength"]:
        yield _invalid(path, value, f"{path} in body should be at least {int(schema['minLength'])} chars long")
    pattern = schema.get("pattern")
    if pattern:
        try:
            matched = re.search(_ecma_to_python(pattern), value) is not None
        except re.error:
            matched = True  # an invalid pattern is refused at CRD creation (check_structural)
        if not matched:
            yield _invalid(path, value, f"{path} in body should match '{pattern}'")


_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _valid_format(fmt: str, value: str) -> bool:
    try:
        if fmt == "date-time":
            if not _DATE_TIME.match(value):
                return False
            datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
        elif fmt == "date":
            date.fromisoformat(value)
        elif fmt == "byte":
            base64.b64decode(value, validate=True)
        elif fmt == "uuid":
            uuid.UUID(value)
        elif fmt == "ipv4":
            ipaddress.IPv4Address(value)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(value)
        elif fmt == "cidr":
            ipaddress.ip_network(value, strict=False)
    except (ValueError, binascii.Error):
        return False
    return True


def _check_format(schema: dict[str, Any], value: str, path: str) -> Iterator[FieldError]:
    fmt = schema.get("format")
    if fmt and not _valid_format(fmt, value):
        yield FieldError(path, FIELD_VALUE_TYPE_INVALID, value,
                         f"{path} in body must be of type {fmt}: {json.dumps(value)}")


def _bound_text(bound: float, value: int | float) -> tuple[float, str]:
    # kube-openapi compares an integer value with the bound truncated to int64 and prints it so
    if isinstance(value, int):
        return int(bound), str(int(bound))
    return float(bound), go_float(float(bound))


def _check_number(schema: dict[str, Any], value: int | float, path: str) -> Iterator[FieldError]:
    name = path  # kube-openapi names the field in its messages: "<path> in body should ..."
    factor = schema.get("multipleOf")
    if factor:
        quotient = value / factor
        if not math.isclose(quotient, round(quotient), rel_tol=0, abs_tol=1e-9):
            shown = go_value(factor)
            yield _invalid(path, value, f"{name} in body should be a multiple of {shown}")
    if "maximum" in schema:
        bound, shown = _bound_text(schema["maximum"], value)
        if schema.get("exclusiveMaximum") and value >= bound:
            yield _invalid(path, value, f"{name} in body should be less than {shown}")
        elif value > bound:
            yield _invalid(path, value, f"{name} in body should be less than or equal to {shown}")
    if "minimum" in schema:
        bound, shown = _bound_text(schema["minimum"], value)
        if schema.get("exclusiveMinimum") and value <= bound:
            yield _invalid(path, value, f"{name} in body should be greater than {shown}")
        elif value < bound:
            yield _invalid(path, value, f"{name} in body should be greater than or equal to {shown}")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_array(schema: dict[str, Any], value: list[Any], path: str) -> Iterator[FieldError]:
    items = schema.get("items")
    if isinstance(items, dict):
        for index, item in enumerate(value):
            yield from _validate_node(items, item, f"{path}[{index}]")
    size = len(value)
    if "minItems" in schema and size < schema["minItems"]:
        yield _invalid(path, size, f"{path} in body should have at least {int(schema['minItems'])} items")
    if "maxItems" in schema and size > schema["maxItems"]:
        maximum = int(schema["maxItems"])
        yield FieldError(path, FIELD_VALUE_TOO_MANY, size, f"must have at most {maximum} {'item' if maximum == 1 else 'items'}")
    if schema.get("uniqueItems"):
        seen = [_canonical(item) for item in value]
        if len(set(seen)) != len(seen):
            yield _invalid(path, "", f"{path} in body shouldn't contain duplicates")


def _enum_matches(candidate: Any, value: Any) -> bool:
    if isinstance(candidate, bool) or isinstance(value, bool):
        return isinstance(candidate, bool) and isinstance(value, bool) and candidate == value
    if isinstance(candidate, (int, float)) and isinstance(value, (int, float)):
        return candidate == value
    return type(candidate) is type(value) and candidate == value


def _check_enum(schema: dict[str, Any], value: Any, path: str) -> Iterator[FieldError]:
    allowed = schema.get("enum")
    if not allowed or any(_enum_matches(candidate, value) for candidate in allowed):
        return
    shown = ", ".join(json.dumps(c if isinstance(c, str) else json.dumps(c, separators=(",", ":")))
                      for c in allowed)
    yield FieldError(path, FIELD_VALUE_NOT_SUPPORTED, value, f"supported values: {shown}")


def _check_object(schema: dict[str, Any], value: dict[str, Any], path: str) -> Iterator[FieldError]:
    size = len(value)
    if "minProperties" in schema and size < schema["minProperties"]:
        yield _invalid(path, size, f"{path} in body should have at least {int(schema['minProperties'])} properties")
    if "maxProperties" in schema and size > schema["maxProperties"]:
        maximum = int(schema["maxProperties"])
        yield FieldError(path, FIELD_VALUE_TOO_MANY, size, f"must have at most {maximum} {'item' if maximum == 1 else 'items'}")
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    if extra is False:
        for key in value:
            if key not in properties:
                yield _invalid(path, key, f"{_child_path(path, key)} in body is a forbidden property")
    elif isinstance(extra, dict):
        for key, item in value.items():
            if key not in properties:
                yield from _validate_node(extra, item, _child_path(path, key))
    for key, prop in properties.items():
        if key in value:
            yield from _validate_node(prop, value[key], _child_path(path, key))
    for key in schema.get("required") or []:
        if key not in value:
            yield FieldError(_child_path(path, key), FIELD_VALUE_REQUIRED, "", "")


# ---------------------------------------------------------------------------------------------
# Structural schema checks for CRD creation (apiextensions schema/validation.go, the main ones)


class _Path:
    """field.Path rendering: Child -> ".name", Key -> "[key]", Index -> "[i]"."""

    def __init__(self, text: str = "") -> None:
        self.text = text

    def child(self, name: str) -> _Path:
        return _Path(f"{self.text}.{name}" if self.text else name)

    def key(self, key: str) -> _Path:
        return _Path(f"{self.text}[{key}]")

    def index(self, index: int) -> _Path:
        return _Path(f"{self.text}[{index}]")


_LEVEL_TEXT = {
    "root": "must not be empty at the root",
    "item": "must not be empty for specified array items",
    "field": "must not be empty for specified object fields",
}
_NESTED_FORBIDDEN = [
    ("type", "must be empty to be structural"),
    ("default", "must be undefined to be structural"),
    ("title", "must be empty to be structural"),
    ("description", "must be empty to be structural"),
    ("nullable", "must be false to be structural"),
    ("x-kubernetes-preserve-unknown-fields", "must be false to be structural"),
    ("x-kubernetes-embedded-resource", "must be false to be structural"),
    ("x-kubernetes-int-or-string", "must be false to be structural"),
    ("x-kubernetes-list-map-keys", "must be empty to be structural"),
    ("x-kubernetes-list-type", "must be undefined to be structural"),
    ("x-kubernetes-map-type", "must be undefined to be structural"),
    ("x-kubernetes-validations", "must be empty to be structural"),
]
_SUPPORTED_RULE_REASONS = ["FieldValueDuplicate", "FieldValueForbidden", "FieldValueInvalid", "FieldValueRequired"]


def check_structural(schema: dict[str, Any], root: str = "") -> list[str]:
    """Why ``schema`` is not a usable structural schema, as Kubernetes words it (sorted).

    Each string is ``<path>: <error body>``, the path relative to ``root`` (e.g. pass
    ``spec.versions[0].schema.openAPIV3Schema`` for full CRD paths). Covers missing types,
    arrays without items, misplaced additionalProperties, metadata restrictions, forbidden
    keywords inside allOf/anyOf/oneOf/not, invalid patterns, defaults that fail their own
    schema, malformed x-kubernetes-validations entries and CEL rules that do not compile.
    """
    errors: list[FieldError] = []
    _check_invariants(schema, "root", _Path(root), errors)
    problems = sorted({error.message for error in errors})
    from kubetune.localcluster.apiserver import cel

    problems.extend(cel.compile_errors(schema, root))
    return problems


def _forbidden(path: _Path, detail: str) -> FieldError:
    return FieldError(path.text, FIELD_VALUE_FORBIDDEN, "", detail)


def _required(path: _Path, detail: str) -> FieldError:
    return FieldError(path.text, FIELD_VALUE_REQUIRED, "", detail)


def _check_invariants(schema: dict[str, Any], level: str, path: _Path, errors: list[FieldError]) -> None:
    if not isinstance(schema, dict):
        errors.append(_invalid(path.text, schema, "must be a schema object"))
        return
    declared = schema.get("type", "")
    if declared == "array" and "items" not in schema:
        errors.append(_required(path.child("items"), "must be specified"))
    if isinstance(schema.get("items"), dict):
        _check_invariants(schema["items"], "item", path.child("items"), errors)
    elif isinstance(schema.get("items"), list):
        errors.append(_forbidden(path.child("items"), "items must be a schema object and not an array"))
    properties = schema.get("properties") or {}
    for name, prop in properties.items():
        _check_invariants(prop, "field", path.child("properties").key(name), errors)
    if "additionalProperties" in schema:
        if level == "root":
            errors.append(_forbidden(path.child("additionalProperties"), "must not be used at the root"))
        if properties and schema["additionalProperties"] is not False:
            errors.append(_forbidden(path.child("additionalProperties"),
                                     "additionalProperties and properties are mutual exclusive"))
        if isinstance(schema["additionalProperties"], dict):
            _check_invariants(schema["additionalProperties"], "field", path.child("additionalProperties"), errors)
    if schema.get("x-kubernetes-int-or-string") and schema.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(_invalid(path.child("x-kubernetes-preserve-unknown-fields").text, True,
                               "must be false if x-kubernetes-int-or-string is true"))
    for keyword in ("allOf", "anyOf", "oneOf"):
        for index, nested in enumerate(schema.get(keyword) or []):
            if keyword == "anyOf" and _is_int_or_string_any_of(schema["anyOf"]):
                break  # the int-or-string idiom is the one place types may appear nested
            if keyword == "allOf" and index == 0 and _is_int_or_string_any_of(nested.get("anyOf")):
                nested = {k: v for k, v in nested.items() if k != "anyOf"}
            _check_nested(nested, path.child(keyword).index(index), errors)
    if isinstance(schema.get("not"), dict):
        _check_nested(schema["not"], path.child("not"), errors)
    pattern = schema.get("pattern")
    if pattern:
        try:
            re.compile(_ecma_to_python(pattern))
        except re.error as exc:
            errors.append(_invalid(path.child("pattern").text, pattern,
                                   f"must be a valid regular expression, but isn't: {exc}"))
    embedded = schema.get("x-kubernetes-embedded-resource")
    if embedded and declared != "object":
        if not declared:
            errors.append(_required(path.child("type"), "must be object if x-kubernetes-embedded-resource is true"))
        else:
            errors.append(_invalid(path.child("type").text, declared, "must be object if x-kubernetes-embedded-resource is true"))
    elif not declared and not schema.get("x-kubernetes-int-or-string") and not schema.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(_required(path.child("type"), _LEVEL_TEXT[level]))
    if level == "root" and declared and declared != "object":
        errors.append(_invalid(path.child("type").text, declared, "must be object at the root"))
    if "metadata" in properties and (level == "root" or embedded):
        metadata = properties["metadata"]
        meta_path = path.child("properties").key("metadata")
        if isinstance(metadata, dict) and metadata.get("type") not in (None, "object"):
            errors.append(_invalid(meta_path.child("type").text, metadata.get("type"), "must be object"))
        if level == "root" and isinstance(metadata, dict):
            extra_keys = set(metadata) - {"type", "properties", "description"}
            extra_props = set(metadata.get("properties") or {}) - {"name", "generateName"}
            if extra_keys or extra_props:
                errors.append(_forbidden(meta_path, "must not specify anything other than name and generateName, "
                                                    "but metadata is implicitly specified"))
    if "default" in schema and level != "root":
        # like defaulting/validation.go: the default is validated as a document of its own
        default_path = path.child("default")
        for problem in _validate_node(schema, schema["default"], ""):
            where = default_path if problem.field == ROOT_FIELD else default_path.child(problem.field)
            errors.append(FieldError(where.text, problem.type, problem.value, problem.detail))
    for index, rule in enumerate(schema.get("x-kubernetes-validations") or []):
        errors.extend(_check_rule_entry(rule, path.child("x-kubernetes-validations").index(index)))


def _is_int_or_string_any_of(any_of: Any) -> bool:
    return any_of == [{"type": "integer"}, {"type": "string"}]


def _check_nested(nested: Any, path: _Path, errors: list[FieldError]) -> None:
    if not isinstance(nested, dict):
        return
    for keyword, detail in _NESTED_FORBIDDEN:
        if nested.get(keyword) not in (None, False, "", [], {}):
            errors.append(_forbidden(path.child(keyword), detail))
    if isinstance(nested.get("additionalProperties"), (dict, bool)):
        errors.append(_forbidden(path.child("additionalProperties"), "must be undefined to be structural"))
    if "metadata" in (nested.get("properties") or {}):
        errors.append(_forbidden(path.child("properties").key("metadata"), "must not be specified in a nested context"))
    for name, prop in (nested.get("properties") or {}).items():
        _check_nested(prop, path.child("properties").key(name), errors)
    if isinstance(nested.get("items"), dict):
        _check_nested(nested["items"], path.child("items"), errors)
    for keyword in ("allOf", "anyOf", "oneOf"):
        for index, inner in enumerate(nested.get(keyword) or []):
            _check_nested(inner, path.child(keyword).index(index), errors)


def _check_rule_entry(rule: Any, path: _Path) -> list[FieldError]:
    if not isinstance(rule, dict):
        return [_invalid(path.text, rule, "must be an object with a rule")]
    problems = []
    text = str(rule.get("rule") or "").strip()
    message = rule.get("message")
    if not text:
        problems.append(_required(path.child("rule"), "rule is not specified"))
    elif message is not None and message != "" and not str(message).strip():
        problems.append(_invalid(path.child("message").text, message, "must be non-empty if specified"))
    elif message and "\n" in str(message).strip():
        problems.append(_invalid(path.child("message").text, message, "must not contain line breaks"))
    elif "\n" in text and not str(message or "").strip():
        problems.append(_required(path.child("message"), "message must be specified if rule contains line breaks"))
    reason = rule.get("reason")
    if reason is not None and reason not in _SUPPORTED_RULE_REASONS:
        problems.append(FieldError(path.child("reason").text, FIELD_VALUE_NOT_SUPPORTED, reason,
                                   "supported values: " + ", ".join(json.dumps(r) for r in _SUPPORTED_RULE_REASONS)))
    return problems

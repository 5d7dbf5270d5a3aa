"""Decode the few Kubernetes protobuf bodies kubectl's imperative commands send.

`kubectl create namespace|configmap|secret|serviceaccount` use client-go's typed clients, which
POST `application/vnd.kubernetes.protobuf` and do not fall back to JSON. Everything else kubectl
sends (apply, patch, create -f, ...) is JSON, so a hand-written decoder for these kinds is enough;
other kinds get a 415 that says to use `kubectl apply -f`.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Iterator

from .errors import APIError

MAGIC = b"k8s\x00"


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, offset
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs; length-delimited values are bytes, varints ints."""
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, offset = _varint(data, offset)
        elif wire_type == 2:
            length, offset = _varint(data, offset)
            value, offset = data[offset:offset + length], offset + length
        elif wire_type == 1:
            value, offset = data[offset:offset + 8], offset + 8
        elif wire_type == 5:
            value, offset = data[offset:offset + 4], offset + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, value


def _map_entry(data: bytes) -> tuple[str, bytes]:
    entry = dict(_fields(data))
    return entry.get(1, b"").decode(), entry.get(2, b"")


def _object_meta(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    names = {1: "name", 2: "generateName", 3: "namespace"}
    for number, value in _fields(data):
        if number in names:
            meta[names[number]] = value.decode()
        elif number in (11, 12):
            key, item = _map_entry(value)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = item.decode()
        elif number == 14:
            meta.setdefault("finalizers", []).append(value.decode())
    return meta


def _configmap(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, value in _fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            key, item = _map_entry(value)
            obj.setdefault("data", {})[key] = item.decode()
        elif number == 3:
            key, item = _map_entry(value)
            obj.setdefault("binaryData", {})[key] = base64.b64encode(item).decode()
        elif number == 4:
            obj["immutable"] = bool(value)
    return obj


def _secret(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, value in _fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            key, item = _map_entry(value)
            obj.setdefault("data", {})[key] = base64.b64encode(item).decode()
        elif number == 3:
            obj["type"] = value.decode()
        elif number == 4:
            key, item = _map_entry(value)
            obj.setdefault("stringData", {})[key] = item.decode()
        elif number == 5:
            obj["immutable"] = bool(value)
    return obj


def _namespace(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, value in _fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
    return obj


def _service_account(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, value in _fields(data):
        if number == 1:
            obj["metadata"] = _object_meta(value)
        elif number == 4:
            obj["automountServiceAccountToken"] = bool(value)
    return obj


DECODERS: dict[tuple[str, str], Callable[[bytes], dict[str, Any]]] = {
    ("v1", "ConfigMap"): _configmap,
    ("v1", "Secret"): _secret,
    ("v1", "Namespace"): _namespace,
    ("v1", "ServiceAccount"): _service_account,
}


def decode(body: bytes) -> dict[str, Any]:
    """A JSON-shaped object from a protobuf request body, or a 415 naming the way out."""
    if not body.startswith(MAGIC):
        raise APIError(415, "UnsupportedMediaType", "protobuf body without the k8s\\x00 envelope")
    envelope = dict(_fields(body[len(MAGIC):]))
    type_meta = dict(_fields(envelope.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    decoder = DECODERS.get((api_version, kind))
    if decoder is None:
        raise APIError(415, "UnsupportedMediaType",
                       f"this embedded API server reads protobuf only for {', '.join(k for _, k in DECODERS)}; "
                       f"send {kind or 'the object'} as JSON instead (for example `kubectl apply -f`)")
    return {"apiVersion": api_version, "kind": kind, **decoder(envelope.get(2, b""))}

"""Kubernetes `Status` error bodies, shaped exactly like kube-apiserver's so clients react as they would."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client as a `v1 Status` with the given HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(group: str, resource: str, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return details


def qualified(group: str, resource: str) -> str:
    """`finetunejobs.kubetune.dev` or `pods`: how Kubernetes names a resource in messages."""
    return f"{resource}.{group}" if group else resource


def not_found(group: str, resource: str, name: str) -> APIError:
    return APIError(404, "NotFound", f'{qualified(group, resource)} "{name}" not found',
                    _details(group, resource, name))


def already_exists(group: str, resource: str, name: str) -> APIError:
    return APIError(409, "AlreadyExists", f'{qualified(group, resource)} "{name}" already exists',
                    _details(group, resource, name))


def conflict(group: str, resource: str, name: str) -> APIError:
    return APIError(
        409, "Conflict",
        f'Operation cannot be fulfilled on {qualified(group, resource)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(group, resource, name))


def invalid(group: str, kind: str, name: str, causes: list[dict[str, Any]]) -> APIError:
    """422 Invalid; `causes` are {reason, message, field}; the message joins them like Kubernetes."""
    texts = [f"{c.get('field') or '<nil>'}: {c['message']}" for c in causes]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    qualified_kind = f"{kind}.{group}" if group else kind
    details = {"name": name, "kind": kind, "causes": causes}
    if group:
        details["group"] = group
    return APIError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {joined}', details)


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def expired(message: str) -> APIError:
    return APIError(410, "Expired", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> APIError:
    return APIError(405, "MethodNotAllowed", message)


def unauthorized() -> APIError:
    return APIError(401, "Unauthorized", "Unauthorized")


def route_not_found() -> APIError:
    return APIError(404, "NotFound", "the server could not find the requested resource", {})

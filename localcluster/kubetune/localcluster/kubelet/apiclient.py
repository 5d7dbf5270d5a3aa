"""A small Kubernetes API client over aiohttp: just what the node agent needs.

It authenticates with the node's client certificate (``system:node:<name>`` in
``system:nodes``), so the API server's Node authorizer and NodeRestriction admission limit it
exactly as they limit a real kubelet.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: str, path: str) -> None:
        super().__init__(f"{status} for {path}: {body[:300]}")
        self.status = status


class Gone(ApiError):
    """The watch resourceVersion is too old (410): relist."""


def client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


class ApiClient:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._headers = {"Accept": "application/json", "User-Agent": "kubetune-node-agent", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(ssl=self._ssl)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method, self.base_url + path, data=data, headers=headers, params=params,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                cls = Gone if resp.status == 410 else ApiError
                raise cls(resp.status, text, path)
            return json.loads(text) if text else {}

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.get(path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body)

    async def patch(self, path: str, body: dict[str, Any], content_type: str = STRATEGIC_MERGE) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type)

    async def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.request("DELETE", path, body)

    async def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 300,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events until the server closes the stream; ``Gone`` on 410."""
        query = {
            **(params or {}),
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        async with self.session.get(
            self.base_url + path, params=query,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30),
        ) as resp:
            if resp.status >= 400:
                text = await resp.text()
                cls = Gone if resp.status == 410 else ApiError
                raise cls(resp.status, text, path)
            # Split lines ourselves: aiohttp's line reader refuses lines over 64 KiB, and one
            # event carries a whole object.
            pending = b""
            async for chunk in resp.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        code = (event.get("object") or {}).get("code", 500)
                        cls = Gone if code == 410 else ApiError
                        raise cls(code, json.dumps(event.get("object")), path)
                    yield event

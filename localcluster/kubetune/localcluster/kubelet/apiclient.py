"""A small Kubernetes API client over aiohttp: just what the kubelet needs."""

from __future__ import annotations

import json
import ssl
from typing import Any, AsyncIterator

import aiohttp


class ApiError(Exception):
    def __init__(self, status: int, body: str, path: str) -> None:
        super().__init__(f"{status} for {path}: {body[:300]}")
        self.status = status


class Gone(ApiError):
    """The watch resourceVersion is too old (410): relist."""


class ApiClient:
    def __init__(self, base_url: str, token: str, ca_data: bytes | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # The embedded API server's self-signed certificate is the only CA we trust.
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cadata=ca_data.decode()) if ca_data else True
        )
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
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

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body, "application/merge-patch+json")

    async def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 300
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events until the server closes the stream; ``Gone`` on 410."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        async with self.session.get(
            self.base_url + path, params=params,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30),
        ) as resp:
            if resp.status >= 400:
                text = await resp.text()
                cls = Gone if resp.status == 410 else ApiError
                raise cls(resp.status, text, path)
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    code = (event.get("object") or {}).get("code", 500)
                    cls = Gone if code == 410 else ApiError
                    raise cls(code, json.dumps(event.get("object")), path)
                yield event

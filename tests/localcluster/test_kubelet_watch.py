"""The node agent's API client turns an expired watch (410) into `Gone`, so it relists."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from kubetune.localcluster.kubelet.apiclient import ApiClient, Gone


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/pods", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("mode", ["status", "error-event"])
def test_expired_watch_raises_gone_after_delivering_earlier_events(mode: str) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if mode == "status":
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired"}, status=410)
        response = web.StreamResponse()
        await response.prepare(request)
        added = {"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "7"}}}
        expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
        await response.write((json.dumps(added) + "\n" + json.dumps(expired) + "\n").encode())
        return response

    async def scenario() -> list[str]:
        runner, url = await _serve(handler)
        client = ApiClient(url)
        seen: list[str] = []
        try:
            with pytest.raises(Gone):
                async for event in client.watch("/api/v1/pods", "5"):
                    seen.append(event["object"]["metadata"]["name"])
        finally:
            await client.close()
            await runner.cleanup()
        return seen

    seen = asyncio.run(scenario())
    assert seen == ([] if mode == "status" else ["p"])

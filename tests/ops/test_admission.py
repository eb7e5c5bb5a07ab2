"""Admission control with real WebSocket and SSE connections: the per-token cap (429), the
process cap (503), both with Retry-After, counted in /metrics, readiness turning false near
the process cap, and slots coming back when connections end."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from livecount.server.admission import Admission, default_max_streams, is_stream
from tests.server.stream_support import (
    StreamClient,
    eventually,
    gateway_of,
    stream_server,
    stream_settings,
)
from tests.server.support import LiveServer, create_tenant

from .support import samples

pytestmark = pytest.mark.anyio


async def ws_refusal(server: LiveServer, workspace_id: int, token: str
                     ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A WebSocket handshake that must be refused: its HTTP status, headers and JSON body."""
    url = f"{server.ws_url}/api/workspaces/{workspace_id}/ws?token={token}"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(url, proxy=None, open_timeout=5):
            pass
    response = refused.value.response
    return response.status_code, dict(response.headers), json.loads(response.body or b"{}")


async def sse_refusal(http: httpx.AsyncClient, workspace_id: int, token: str
                      ) -> httpx.Response:
    response = await http.get(f"/api/workspaces/{workspace_id}/stream",
                              headers={"Authorization": f"Bearer {token}"})
    assert response.status_code != 200
    return response


async def test_stream_caps_with_real_connections(tmp_path: Path) -> None:
    settings = stream_settings(tmp_path, max_streams=4, max_streams_per_token=2)
    async with stream_server(settings) as server, server.client() as http, \
            contextlib.AsyncExitStack() as streams:
        tenant = await create_tenant(http, server.admin_token)
        ann, bob, cat = tenant.people
        admission: Admission = server.app.state.admission
        assert admission.max_streams == 4

        async def open_stream(kind: str, token: str) -> StreamClient:
            client = await streams.enter_async_context(
                StreamClient(server, kind, tenant.id, token))
            await client.wait_for(lambda m: m.seq >= 0, what="the snapshot")
            return client

        # the per-token cap: Ann's third stream is refused, on either transport
        await open_stream("ws", ann.token)
        await open_stream("sse", ann.token)
        status, headers, body = await ws_refusal(server, tenant.id, ann.token)
        assert status == 429 and headers["retry-after"] == "5"
        assert body["error"]["code"] == "too_many_requests"
        assert "2 stream connections" in body["error"]["message"]
        response = await sse_refusal(http, tenant.id, ann.token)
        assert response.status_code == 429 and response.headers["Retry-After"] == "5"
        assert (await http.get("/readyz")).status_code == 200  # 2 of 4: ready

        # near the process cap (90% of 4 = 3 streams), readiness turns false ...
        await open_stream("ws", bob.token)
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "near the cap of 4" in ready.json()["error"]["message"]
        # ... and past it every token gets 503, whatever its own count
        async with StreamClient(server, "sse", tenant.id, bob.token) as bob_sse:
            await bob_sse.wait_for(lambda m: m.seq >= 0, what="the snapshot")
            status, headers, body = await ws_refusal(server, tenant.id, cat.token)
            assert status == 503 and headers["retry-after"] == "2"
            assert body["error"]["code"] == "unavailable"
            response = await sse_refusal(http, tenant.id, cat.token)
            assert response.status_code == 503 and response.headers["Retry-After"] == "2"
            assert gateway_of(server).connections == 4

            metrics = samples((await http.get("/metrics")).text)
            assert metrics[("livecount_stream_refused_total", (("reason", "token"),))] == 2
            assert metrics[("livecount_stream_refused_total", (("reason", "process"),))] == 2
            assert metrics[("livecount_stream_connections_limit", ())] == 4
            assert metrics[("livecount_ready", ())] == 0
            # a refused stream is not an API request (no <unmatched> 429/503 series for it)
            assert not any(name == "livecount_http_requests_total"
                           and dict(labels)["status"] in ("429", "503")
                           and dict(labels)["route"] != "/readyz" for name, labels in metrics)

        # a stream that ends gives its slot back
        await eventually(lambda: admission.active == 3, 5, "the slot to come back")
        await open_stream("sse", cat.token)
        assert admission.by_token  # held as hashes, not tokens
        assert all(isinstance(k, bytes) and len(k) == 16 for k in admission.by_token)
    assert admission.active == 0 and admission.by_token == {}


async def test_refused_tokens_and_failed_handshakes_release_their_slot(tmp_path: Path) -> None:
    settings = stream_settings(tmp_path, max_streams=2, max_streams_per_token=1)
    async with stream_server(settings) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        admission: Admission = server.app.state.admission
        for _ in range(5):  # unknown tokens: 401 each time, never a slot kept
            assert (await sse_refusal(http, tenant.id, "nope")).status_code == 401
            status, _, _ = await ws_refusal(server, tenant.id, "nope")
            assert status == 401
        assert admission.active == 0 and admission.by_token == {}
        assert admission.refused == {"process": 0, "token": 0}


def test_default_cap_stays_below_the_fd_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = default_max_streams()
    assert 16 <= cap < soft
    assert soft - cap >= 64
    assert Admission().max_streams == cap


def test_what_counts_as_a_stream() -> None:
    assert is_stream({"type": "websocket", "path": "/api/workspaces/1/ws"})
    assert is_stream({"type": "http", "method": "GET", "path": "/api/workspaces/1/stream"})
    assert not is_stream({"type": "http", "method": "POST", "path": "/api/workspaces/1/stream"})
    assert not is_stream({"type": "http", "method": "GET", "path": "/api/workspaces/1/counts"})
    assert not is_stream({"type": "lifespan"})

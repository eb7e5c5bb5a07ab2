"""Operations endpoints (liveness, readiness, metrics), the 500 path, and ``livecount serve``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from livecount.server import create_app

from .support import ADMIN_TOKEN, LiveServer, Tenant, live_server, server_settings
from .test_api import assert_error

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_healthz_and_readyz(live_server: LiveServer, client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})
    live_server.app.state.draining = True
    try:
        message = assert_error(await client.get("/readyz"), 503, "unavailable")
        assert "draining" in message
        # liveness is not readiness: a draining process is still alive
        assert (await client.get("/healthz")).status_code == 200
    finally:
        live_server.app.state.draining = False
    assert (await client.get("/readyz")).status_code == 200


async def test_readyz_sheds_load_above_the_soft_watermark(tmp_path: Path) -> None:
    async with live_server(server_settings(tmp_path, soft_memory_bytes=1 << 20)) as server, \
            server.client() as client:
        message = assert_error(await client.get("/readyz"), 503, "unavailable")
        assert "soft watermark" in message
        assert (await client.get("/healthz")).status_code == 200


async def test_metrics(live_server: LiveServer, client: httpx.AsyncClient,
                       tenant: Tenant) -> None:
    ann = tenant.people[0]
    created = []
    for _ in range(3):
        response = await client.post(tenant.url("/conversations"), json={},
                                     headers=ann.headers)
        created.append(response.json()["id"])
    for conversation in created:  # three ids, one route label
        await client.get(tenant.url(f"/conversations/{conversation}"), headers=ann.headers)
    for path in ("/nope/1", "/nope/2", "/x"):  # unknown paths share one label
        await client.get(path)
    await client.get(tenant.url("/counts"))  # a 401
    await live_server.service.relay.sync()

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    conversation = "/api/workspaces/{workspace_id}/conversations/{conversation_id}"
    assert value("livecount_http_requests_total", route=conversation, method="GET",
                 status="200") == 3
    assert value("livecount_http_requests_total", route="/api/workspaces/{workspace_id}"
                 "/conversations", method="POST", status="201") == 3
    assert value("livecount_http_requests_total", route="<unmatched>", method="GET",
                 status="404") == 3
    assert value("livecount_http_requests_total", route="/api/workspaces/{workspace_id}"
                 "/counts", method="GET", status="401") == 1
    routes = {dict(labels)["route"] for name, labels in found
              if name == "livecount_http_requests_total"}
    assert not any(re.search(r"/\d", route) for route in routes), routes
    assert value("livecount_http_request_duration_seconds_count", route=conversation,
                 method="GET") == 3
    assert value("livecount_http_request_duration_seconds_bucket", route=conversation,
                 method="GET", le="+Inf") == 3
    assert value("livecount_relay_entries_applied_total") >= 3
    assert value("livecount_outbox_lag_entries") == 0
    assert value("livecount_drift_repaired_total") == 0
    assert value("livecount_stream_connections") == 0
    assert value("livecount_stream_opened_total") == 0
    assert value("livecount_stream_slow_clients_total") == 0
    assert value("livecount_process_threads") >= 1
    assert value("livecount_process_resident_memory_bytes") > 10 << 20
    assert value("livecount_process_open_fds") > 3
    assert value("livecount_asyncio_tasks") >= 2
    assert value("livecount_draining") == 0


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    """Two apps in one process: no duplicate-metric error, no shared counts, nothing in the
    global registry."""
    first = create_app(server_settings(tmp_path))
    second = create_app(server_settings(tmp_path))
    first.state.metrics.requests.labels("/x", "GET", "200").inc()
    assert b'route="/x"' in first.state.metrics.render()
    assert b'route="/x"' not in second.state.metrics.render()
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("livecount") for name in names)


async def test_a_bug_answers_500_json_and_is_counted(live_server: LiveServer,
                                                     client: httpx.AsyncClient) -> None:
    """The last resort works (so the fixture's check that nothing reached it means
    something): JSON error shape, counted, the server stays up."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    live_server.app.router.routes.append(Route("/broken", broken))
    try:
        response = await client.get("/broken")
        assert_error(response, 500, "internal")
        assert "a bug" not in response.text
        assert live_server.internal_errors == 1
        assert (await client.get("/healthz")).status_code == 200
        metrics = samples((await client.get("/metrics")).text)
        key = ("livecount_http_requests_total",
               (("method", "GET"), ("route", "/broken"), ("status", "500")))
        assert metrics[key] == 1
    finally:
        live_server.app.router.routes.pop()
        live_server.app.state.internal_errors = 0


async def test_livecount_serve(tmp_path: Path) -> None:
    """``livecount serve`` answers on its port and stops cleanly on SIGTERM."""
    env = {**os.environ, "LIVECOUNT_ADMIN_TOKEN": ADMIN_TOKEN}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livecount", "serve", "--port", "0",
        "--store", f"sqlite:///{tmp_path}/serve.db", "--flush-interval", "0.02",
        env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    assert process.stderr is not None
    try:
        port = None
        async with asyncio.timeout(20):
            while port is None:
                line = (await process.stderr.readline()).decode()
                assert line, "the server exited before listening"
                if match := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                    port = int(match.group(1))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            response = await client.post("/api/workspaces", json={"name": "Served"},
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert response.status_code == 201
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            rest = (await process.stderr.read()).decode()
            # uvicorn shuts down gracefully, then re-raises the signal for the supervisor
            assert await process.wait() in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in rest, rest
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def test_metrics_count_open_streams(live_server: LiveServer, client: httpx.AsyncClient,
                                          tenant: Tenant) -> None:
    if live_server.app.state.gateway is None:
        pytest.skip("no stream gateway")
    url = tenant.url("/stream")
    async with client.stream("GET", url, headers=tenant.people[0].headers) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                break  # the snapshot: the stream is open
        found = samples((await client.get("/metrics")).text)
        assert found[("livecount_stream_connections", ())] == 1
        assert found[("livecount_stream_opened_total", ())] == 1

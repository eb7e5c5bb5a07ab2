"""Counting a new view is off the hot path: creating a view over 200,000 conversations
neither stalls the event loop nor delays the streams of another workspace.

The old relay took the snapshot and counted it synchronously, under the relay lock, on the
event loop: every stream of the process stalled for the whole count.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livecount.domain import now_us
from livecount.server.app import tune_gc
from livecount.service import Settings
from livecount.store import open_store
from tests.server.stream_support import StreamClient, stream_server, stream_settings
from tests.server.support import create_tenant

pytestmark = pytest.mark.anyio

BIG = int(os.environ.get("LIVECOUNT_TEST_BIG_WORKSPACE", "200000"))
CLIENTS = 50
WRITES_PER_SECOND = 100


async def seed(url: str, conversations: int) -> int:
    """A workspace with ``conversations`` open conversations, written straight into the
    tables (the API would take minutes), then the store's own schema is trusted as is."""
    store = open_store(url)
    await store.open()
    try:
        workspace = await store.create_workspace("big")
    finally:
        await store.close()
    now = now_us()
    rng = random.Random(1)
    rows = [(workspace.id, 1, rng.choice(["open", "open", "closed"]), None, None, None,
             rng.random() < 0.3, "chat", now, now, None, None) for _ in range(conversations)]
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
        db.executemany(
            "INSERT INTO conversations (workspace_id, version, state, assignee_id, team_id, "
            "author_id, priority, channel, created_at, updated_at, waiting_since, "
            "snoozed_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return workspace.id


@contextlib.contextmanager
def served_gc() -> Iterator[list[float]]:
    """The collector as ``livecount serve`` sets it (:func:`~livecount.server.app.tune_gc`:
    what is alive at start-up frozen out of its sight): without it, a full collection here
    walks every object the test session has accumulated — a pause of the test process, not
    of the server, seen as a 0.2 s stall in CI. Yields the pauses of the collections that
    still run (reported with the figures)."""
    pauses: list[float] = []
    started = 0.0

    def timed(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started)

    threshold = gc.get_threshold()
    tune_gc()
    gc.callbacks.append(timed)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(timed)
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_a_big_view_count_blocks_neither_the_loop_nor_other_streams(
        tmp_path: Path) -> None:
    settings = stream_settings(tmp_path, reconcile_every=None, flush_interval=0.05)
    big = await seed(settings.store_url, BIG)
    with served_gc() as gc_pauses:
        await _count_a_big_view_while_streaming(settings, big, gc_pauses)


async def _count_a_big_view_while_streaming(settings: Settings, big: int,
                                            gc_pauses: list[float]) -> None:
    async with stream_server(settings) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        person = tenant.people[0]
        all_view = next(v.id for v in server.service.relay.views(tenant.id) if v.name == "All")
        seen: list[list[tuple[float, int]]] = [[] for _ in range(CLIENTS)]
        stack = contextlib.AsyncExitStack()
        async with stack:
            clients = []
            for i in range(CLIENTS):
                client = await stack.enter_async_context(
                    StreamClient(server, "ws", tenant.id, person.token, teammate=person.id))
                clients.append(client)
                _record(client, seen[i], str(all_view))
            for client in clients:
                await client.wait_for(lambda m: m.seq >= 0, what="the snapshot")

            stalls: list[float] = []
            sent: list[tuple[float, int]] = []  # (send time, the All count it makes)
            counting = asyncio.Event()
            done = asyncio.Event()

            async def lag_monitor() -> None:
                while not done.is_set():
                    started = time.monotonic()
                    await asyncio.sleep(0.005)
                    if counting.is_set():
                        stalls.append(time.monotonic() - started - 0.005)

            async def writer() -> None:
                n = 0
                while not done.is_set():
                    n += 1
                    sent.append((time.monotonic(), n))
                    response = await http.post(tenant.url("/conversations"), json={},
                                               headers=person.headers)
                    assert response.status_code == 201
                    await asyncio.sleep(1 / WRITES_PER_SECOND)

            async with asyncio.TaskGroup() as tg:
                tg.create_task(lag_monitor())
                tg.create_task(writer())
                await asyncio.sleep(0.5)  # warm
                counting.set()
                began = time.monotonic()
                view = await http.post(f"/api/workspaces/{big}/views", headers=server.admin,
                                       json={"name": "urgent", "filter": {
                                           "field": "priority", "operator": "=",
                                           "value": True}})
                assert view.status_code == 201, view.text
                view_id = view.json()["id"]
                await server.service.relay.sync()  # (the create waits for it, up to 2 s)
                assert view_id in {v.id for v in server.service.relay.views(big)}
                ended = time.monotonic()
                counting.clear()
                await asyncio.sleep(0.5)  # the last writes reach everyone
                done.set()

        latencies = sorted(
            _first_reaching(seen[i], n) - at
            for at, n in sent if began <= at <= ended for i in range(CLIENTS))
        assert latencies, "no write happened while the view was counted"
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        print(f"\ncounted {BIG} conversations in {ended - began:.2f} s; during it "
              f"{len(latencies) // CLIENTS} writes, commit→client p99 {p99 * 1000:.1f} ms, "
              f"longest loop stall {max(stalls) * 1000:.1f} ms, longest collection "
              f"{max(gc_pauses, default=0) * 1000:.1f} ms")
        assert p99 < 0.25
        assert max(stalls) < 0.15
        counts = (await server.service.state.snapshot(big)).counts
        with contextlib.closing(sqlite3.connect(
                settings.store_url.removeprefix("sqlite:///"))) as db:
            expected = db.execute("SELECT count(*) FROM conversations WHERE workspace_id = ? "
                                  "AND priority", (big,)).fetchone()[0]
        assert counts[(view_id, None, None)] == expected


def _record(client: StreamClient, out: list[tuple[float, int]], key: str) -> None:
    """Timestamp every value of the "All" counter this client applies."""
    model = client.model
    apply = model.apply

    def recording(message: dict[str, Any]) -> None:
        apply(message)
        value = model.counts.get(key)
        if isinstance(value, int):
            out.append((time.monotonic(), value))

    model.apply = recording  # type: ignore[method-assign]


def _first_reaching(seen: list[tuple[float, int]], value: int) -> float:
    base = seen[0][1] if seen else 0
    for at, count in seen:
        if count - base >= value:
            return at
    return float("inf")

"""Resume across a crash: a real ``livecount serve`` process, killed with SIGKILL and started
again on the same SQLite file and port.

A client that resumes with ``?epoch=<old>&since=<old seq>`` (or SSE ``Last-Event-ID:
<old>:<seq>``) from the process that died must get the view list and a snapshot of the new
process's epoch, never a delta numbered by either epoch as if the numberings were one, even
when the new process's seq has caught up with the old one. Its counts (snapshot, then deltas)
then equal ``GET /counts?after=P`` for the last write, and a SQL recount of the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from livecount.domain import now_us
from livecount.store import open_store
from livecount.views import render_counts, visible_views
from tests.server.stream_support import Model
from tests.server.support import Tenant, auth, create_tenant

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "lc_admin_restart-test-token"
LIVECOUNT = str(Path(sys.executable).with_name("livecount"))
#: how long a started server may take to answer /healthz
START_WITHIN = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serve(store_url: str, port: int, log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``livecount serve`` in a child process; killed (if still running) and reaped on exit."""
    env = {**os.environ, "LIVECOUNT_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = subprocess.Popen(
        [LIVECOUNT, "serve", "--store", store_url, "--port", str(port), "--log-level", "warning"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def wait_healthy(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + START_WITHIN
    async with httpx.AsyncClient(base_url=base_url, timeout=2, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"livecount serve exited with {proc.returncode}:\n{_text(log)}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/healthz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"livecount serve did not answer /healthz within {START_WITHIN} s:"
                            f"\n{_text(log)}")
            await asyncio.sleep(0.05)


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def ws_client(port: int, tenant: Tenant, token: str, query: str = ""
                    ) -> AsyncIterator[ClientConnection]:
    url = f"ws://127.0.0.1:{port}/api/workspaces/{tenant.id}/ws?{query}{'&' if query else ''}"
    async with connect(url + f"token={token}", proxy=None, compression=None, max_size=None,
                       open_timeout=5, close_timeout=2) as conn:
        yield conn


async def receive_until(conn: ClientConnection, model: Model, done: Any,
                        within: float = 10.0) -> None:
    """Apply messages to ``model`` until ``done(model)``; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while not done(model):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"timed out; the client holds {model.counts} at "
                        f"{model.epoch}:{model.seq}, errors {model.errors}")
        try:
            raw = await asyncio.wait_for(conn.recv(), remaining)
        except TimeoutError:
            continue
        assert isinstance(raw, str), "binary frame"
        model.apply(json.loads(raw))


async def write(client: httpx.AsyncClient, method: str, path: str, token: str,
                body: dict[str, Any]) -> int:
    """A write; the outbox position it committed at (``Livecount-Position``)."""
    response = await client.request(method, path, json=body, headers=auth(token))
    assert response.status_code in (200, 201), response.text
    position = response.headers.get("Livecount-Position")
    assert position is not None and position.isdigit(), dict(response.headers)
    return int(position)


async def counts_after(client: httpx.AsyncClient, tenant: Tenant, token: str,
                       position: int) -> dict[str, Any]:
    response = await client.get(tenant.url("/counts"), params={"after": position},
                                headers=auth(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def sql_recount(store_url: str, workspace_id: int, teammate: int) -> dict[str, Any]:
    """Every view the teammate sees, recounted in SQL from the file (not the server's state)."""
    store = open_store(store_url)
    await store.open()
    try:
        views = await store.list_views(workspace_id)
        recount = await store.recount(workspace_id, views, now_us())
    finally:
        await store.close()
    rendered: dict[str, Any] = render_counts(visible_views(views, teammate), recount.counts,
                                             teammate)
    return rendered


def conversation(i: int, tenant: Tenant) -> dict[str, Any]:
    people, teams = tenant.people, tenant.teams
    return {"assignee_id": people[i % len(people)].id if i % 3 else None,
            "team_id": teams[i % len(teams)]["id"], "priority": i % 4 == 0,
            "tags": ["vip"] if i % 2 else [], "state": "closed" if i % 5 == 4 else "open"}


async def test_a_resume_across_a_crash_gets_a_snapshot_of_the_new_epoch(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/x.db"
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("ab") as log, contextlib.ExitStack() as procs:
        http = httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False)
        async with http:
            # -- the first process: a tenant, conversations, a stream ------------------------
            first = procs.enter_context(serve(store_url, port, log))
            await wait_healthy(first, base_url, log_path)
            tenant = await create_tenant(http, ADMIN_TOKEN, name="Crash", teammates=3, teams=2)
            me = tenant.people[0]
            path = tenant.url("/conversations")
            ids = []
            for i in range(8):
                response = await http.post(path, json=conversation(i, tenant),
                                           headers=me.headers)
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])

            model = Model()
            async with ws_client(port, tenant, me.token) as conn:
                await receive_until(conn, model, lambda m: bool(m.of("snapshot")))
                old_epoch = model.epoch
                position = 0
                for i in range(8, 14):
                    position = await write(http, "POST", path, me.token,
                                           conversation(i, tenant))
                position = await write(http, "PATCH", f"{path}/{ids[1]}", me.token,
                                       {"state": "closed"})
                expected = await counts_after(http, tenant, me.token, position)
                # (the counts may match before the last seq arrives: wait for both)
                await receive_until(conn, model, lambda m: m.seq >= expected["seq"]
                                    and m.counts == expected["counts"])
                assert model.of("delta"), "no delta reached the client before the crash"
                assert model.epoch == old_epoch and model.seq == expected["seq"]
                old_seq = model.seq

                # -- the crash: the stream ends without a reconnect message ---------------
                sigkill(first)
                with pytest.raises(websockets.ConnectionClosed):
                    await receive_until(conn, model, lambda m: False, within=5)
            assert not model.of("reconnect"), "SIGKILL leaves no time for a reconnect"
            assert model.errors == []

            # -- the second process: same file, same port, a new epoch ------------------------
            second = procs.enter_context(serve(store_url, port, log))
            await wait_healthy(second, base_url, log_path)
            # writes while the client is away, until the new numbering has caught up with the
            # old one: a server comparing seqs across epochs would now answer a delta
            i = 14
            while True:
                position = await write(http, "POST", path, me.token, conversation(i, tenant))
                i += 1
                now = await counts_after(http, tenant, me.token, position)
                if now["seq"] >= old_seq or i > 14 + 4 * old_seq + 10:
                    break
            assert now["seq"] >= old_seq, (now["seq"], old_seq)

            received_before = len(model.messages)
            query = f"epoch={old_epoch}&since={old_seq}"
            async with ws_client(port, tenant, me.token, query) as conn:
                await receive_until(conn, model, lambda m: bool(m.of("snapshot")[1:]))
                resumed = model.messages[received_before:]
                assert [m["type"] for m in resumed[:2]] == ["views", "snapshot"], resumed[:2]
                new_epoch = resumed[1]["epoch"]
                assert new_epoch != old_epoch
                assert model.seq >= now["seq"] and model.counts == now["counts"]

                # the new numbering goes on: more writes reach the client as deltas
                for j in range(3):
                    position = await write(http, "PATCH", f"{path}/{ids[2 + j]}", me.token,
                                           {"state": "closed", "tags": ["vip", "after"]})
                position = await write(http, "POST", path, me.token, conversation(i, tenant))
                expected = await counts_after(http, tenant, me.token, position)
                await receive_until(conn, model, lambda m: m.seq >= expected["seq"]
                                    and m.counts == expected["counts"])
                after_resume = model.messages[received_before:]
                stamped = [m for m in after_resume if m["type"] in ("snapshot", "delta")]
                assert all(m["epoch"] == new_epoch for m in stamped), stamped
                assert any(m["type"] == "delta" for m in stamped), after_resume
                assert model.errors == []
                recount = await sql_recount(store_url, tenant.id, me.id)
                assert model.counts == expected["counts"] == recount

            # -- SSE: Last-Event-ID of the dead process's numbering -------------------------
            events = await sse_events(http, tenant, me.token, f"{old_epoch}:{old_seq}", 2)
            assert [e["data"]["type"] for e in events] == ["views", "snapshot"], events
            snapshot = events[1]
            assert snapshot["data"]["epoch"] == new_epoch
            assert snapshot["id"] == f"{new_epoch}:{snapshot['data']['seq']}"
            assert snapshot["data"]["counts"] == expected["counts"]
            sigkill(second)


async def sse_events(http: httpx.AsyncClient, tenant: Tenant, token: str, last_event_id: str,
                     count: int) -> list[dict[str, Any]]:
    """The first ``count`` events of an SSE stream resumed with ``Last-Event-ID``."""
    events: list[dict[str, Any]] = []
    headers = {**auth(token), "Last-Event-ID": last_event_id, "Accept": "text/event-stream"}
    async with asyncio.timeout(10), http.stream("GET", tenant.url("/stream"),
                                                headers=headers) as response:
        assert response.status_code == 200
        data: list[str] = []
        event_id: str | None = None
        async for line in response.aiter_lines():
            if line == "" and data:
                events.append({"id": event_id, "data": json.loads("\n".join(data))})
                data, event_id = [], None
                if len(events) == count:
                    break
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif line.startswith("id:"):
                event_id = line[3:].strip()
    return events

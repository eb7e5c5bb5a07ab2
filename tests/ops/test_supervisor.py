"""The supervisor (``livecount serve --workers N``, livecount.supervisor) with real worker
processes: a killed worker is replaced and its clients resume exactly; the canary, leaking a
thread and 1 MiB per request, is recycled at the hard watermark (replacement first, then
drain with ``reconnect``) while its clients keep exact counts; ``--max-requests`` recycles;
SIGHUP rolls every worker under a steady write load without losing an update; SIGTERM drains
all; /metrics shows every worker and the supervisor.

Each worker serves its own SQLite + memory stack over one file (tests.ops.serve calls the
supervisor directly, to run the canary app too). A client that moves to another worker gets
that worker's snapshot (another epoch), then its deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.support import Tenant, create_tenant

from .support import (
    PYTHON,
    ResumingClient,
    exact,
    free_port,
    metric,
    open_log,
    process,
    samples,
    tail,
    wait_ready,
    worker_pids,
    worker_serving,
)

pytestmark = pytest.mark.anyio

ADMIN = "lc_admin_supervisor-test"
MiB = 1 << 20


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    store: str
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def text(self) -> str:
        return tail(self.log, 20000)


async def until(check: Any, within: float, what: str, running: Running) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}\n"
                                 f"{running.text()[-5000:]}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def supervisor(tmp_path: Path, *args: str, workers: int = 2,
                     env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    port = free_port()
    store = f"sqlite:///{tmp_path}/livecount.db"
    log_path = tmp_path / "supervisor.log"
    command = [PYTHON, "-m", "tests.ops.serve", "--port", str(port), "--store", store,
               "--workers", str(workers), "--admin-token", ADMIN, *args]
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open_log(log_path))
        proc = stack.enter_context(process(command, log, env))
        running = Running(proc, port, store, log_path)
        await wait_ready(proc, running.base, log_path)
        await until(lambda: workers_ready(running, workers), 30, f"{workers} workers", running)
        yield running


async def workers_ready(running: Running, n: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return await metric(running.base, "livecount_workers_ready") == n
    return False


async def post(http: httpx.AsyncClient, tenant: Tenant, i: int) -> None:
    """A write that retries across worker changes (a refused or cut connection, a 503)."""
    person = tenant.people[i % len(tenant.people)]
    body = {"assignee_id": person.id if i % 3 else None, "tags": ["vip"] if i % 2 else [],
            "priority": i % 4 == 0, "team_id": tenant.teams[i % 2]["id"]}
    for _ in range(100):
        try:
            response = await http.post(tenant.url("/conversations"), json=body,
                                       headers=person.headers)
        except httpx.TransportError:
            await asyncio.sleep(0.05)
            continue
        if response.status_code == 503:
            await asyncio.sleep(0.05)
            continue
        assert response.status_code == 201, response.text
        return
    raise AssertionError("a write kept failing")


async def test_serve_with_several_workers_on_the_embedded_default_is_exact(
        tmp_path: Path) -> None:
    """``livecount serve --workers 2`` on SQLite + memory://: each worker counts on its own
    over the one store, so whichever worker answers, ``GET /counts?after=P`` shows the write
    that committed at P (a write through the other worker reaches it by its 50 ms poll)."""
    port = free_port()
    store = f"sqlite:///{tmp_path}/livecount.db"
    log_path = tmp_path / "serve.log"
    command = [PYTHON, "-m", "livecount", "serve", "--workers", "2", "--port", str(port),
               "--store", store, "--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open_log(log_path))
        proc = stack.enter_context(process(command, log, {"LIVECOUNT_ADMIN_TOKEN": ADMIN}))
        running = Running(proc, port, store, log_path)
        await wait_ready(proc, running.base, log_path)
        await until(lambda: workers_ready(running, 2), 30, "2 workers", running)
        async with httpx.AsyncClient(base_url=running.base, timeout=10,
                                     trust_env=False) as http:
            tenant = await create_tenant(http, ADMIN)
            person = tenant.people[0]
            for i in range(1, 31):
                # a new connection each time, so both workers answer some of them
                async with httpx.AsyncClient(base_url=running.base, timeout=10,
                                             trust_env=False) as one:
                    response = await one.post(tenant.url("/conversations"), json={},
                                              headers=person.headers)
                    assert response.status_code == 201, response.text
                    position = response.headers["Livecount-Position"]
                async with httpx.AsyncClient(base_url=running.base, timeout=10,
                                             trust_env=False) as other:
                    counts = await other.get(tenant.url(f"/counts?after={position}"),
                                             headers=person.headers)
                    assert counts.status_code == 200, counts.text
                    views = (await other.get(tenant.url("/views"),
                                             headers=person.headers)).json()["views"]
                all_view = next(v["id"] for v in views if v["name"] == "All")
                assert counts.json()["counts"][str(all_view)] == i
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, running.text()


@pytest.mark.postgres
@pytest.mark.redis
async def test_serve_with_workers_on_postgres_and_redis_shares_one_count(
        tmp_path: Path, postgres_url: str, request: pytest.FixtureRequest) -> None:
    """The production shape on one host: ``livecount serve --workers 2 --counter-workers 1
    --store postgresql://… --broker redis://…``. The two gateways count nothing; the one
    counter worker holds every shard; whichever gateway answers, ``GET /counts?after=P``
    shows the write at P; an admin reconcile through a gateway runs on the worker; SIGTERM
    exits 0 and gives the leases back."""
    import redis

    from tests.state.redis_support import delete_prefix, prefix_of, scratch_url

    broker = scratch_url(request.config)
    prefix = prefix_of(broker)
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [PYTHON, "-m", "livecount", "serve", "--workers", "2", "--counter-workers", "1",
               "--port", str(port), "--store", postgres_url, "--broker", broker,
               "--lease-ttl", "3", "--log-level", "warning"]
    try:
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(open_log(log_path))
            proc = stack.enter_context(process(command, log, {"LIVECOUNT_ADMIN_TOKEN": ADMIN}))
            running = Running(proc, port, postgres_url, log_path)
            await wait_ready(proc, running.base, log_path)
            await until(lambda: workers_ready(running, 2), 30, "2 gateways", running)
            async with httpx.AsyncClient(base_url=running.base, timeout=10,
                                         trust_env=False) as http:
                tenant = await create_tenant(http, ADMIN)
                person = tenant.people[0]
                for i in range(1, 21):
                    async with httpx.AsyncClient(base_url=running.base, timeout=10,
                                                 trust_env=False) as one:
                        response = await one.post(tenant.url("/conversations"), json={},
                                                  headers=person.headers)
                        assert response.status_code == 201, response.text
                        position = response.headers["Livecount-Position"]
                    async with httpx.AsyncClient(base_url=running.base, timeout=10,
                                                 trust_env=False) as other:
                        counts = await other.get(tenant.url(f"/counts?after={position}"),
                                                 headers=person.headers)
                        assert counts.status_code == 200, counts.text
                        views = (await other.get(tenant.url("/views"),
                                                 headers=person.headers)).json()["views"]
                    all_view = next(v["id"] for v in views if v["name"] == "All")
                    assert counts.json()["counts"][str(all_view)] == i
                reconciled = await http.post(tenant.url("/reconcile"),
                                             headers={"Authorization": f"Bearer {ADMIN}"})
                assert reconciled.status_code == 200, reconciled.text
                assert reconciled.json()["drift"] == []
                assert reconciled.json()["position"] >= int(position)
            with redis.Redis.from_url(broker.split("?")[0]) as client:
                leases = client.keys(f"{prefix}{{leases}}:shard:*")
            assert len(leases) == 64  # the one counter worker holds every shard
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0, running.text()
            with redis.Redis.from_url(broker.split("?")[0]) as client:
                assert client.keys(f"{prefix}{{leases}}:shard:*") == []  # given back
    finally:
        delete_prefix(prefix)


async def test_a_killed_worker_is_replaced_and_its_clients_resume_exactly(
        tmp_path: Path) -> None:
    async with supervisor(tmp_path, workers=2) as running, \
            httpx.AsyncClient(base_url=running.base, timeout=10, trust_env=False) as http:
        # one scrape shows every worker and the supervisor (once each worker has spooled
        # its series: half a second after it starts, then every two seconds)
        async def every_worker() -> dict[Any, float] | None:
            scraped = samples((await http.get("/metrics")).text)
            workers = {dict(labels).get("worker") for name, labels in scraped
                       if name == "livecount_process_threads"}
            return scraped if workers == {"0", "1"} else None

        found = await until(every_worker, 10, "both workers' series in one scrape", running)
        assert found[("livecount_workers", ())] == 2
        assert found[("livecount_worker_restarts_total", ())] == 0

        tenant = await create_tenant(http, ADMIN)
        me = tenant.people[0]
        for i in range(6):
            await post(http, tenant, i)
        clients = [ResumingClient(running.ws, tenant.id, me.token, f"c{i}") for i in range(3)]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            for client in clients:
                await exact(client, running.store, tenant.id, me.id)

            before = worker_pids(running.proc.pid)
            assert len(before) == 2
            victim = worker_serving(before, running.port, clients[0].local_port)
            assert victim is not None
            os.kill(victim, signal.SIGKILL)

            await until(lambda: metric(running.base, "livecount_worker_restarts_total"),
                        20, "a restart", running)
            await until(lambda: workers_ready(running, 2), 30, "2 workers again", running)
            after = worker_pids(running.proc.pid)
            assert victim not in after and len(after) == 2
            for i in range(6, 12):
                await post(http, tenant, i)
            for client in clients:
                await exact(client, running.store, tenant.id, me.id)
            # the victim's client lost its connection without a reconnect message (SIGKILL)
            # and came back, resuming (to a snapshot: another worker, another epoch)
            assert clients[0].connections >= 2 and clients[0].resumes >= 1
            assert not clients[0].reconnects
        assert "worker 0" in running.text() or "worker 1" in running.text()
        assert f"[{victim}] died (exit code -9)" in running.text()
        assert await metric(running.base, "livecount_worker_restarts_total") == 1


async def test_the_canary_is_recycled_at_the_hard_watermark_and_clients_stay_exact(
        tmp_path: Path) -> None:
    """The incident's bug, survived: the worker leaks a thread and 1 MiB per request; past the
    hard watermark the supervisor starts a replacement, then drains the leaking worker, whose
    clients are told to reconnect and resume on the replacement with exact counts."""
    args = ("--app", "tests.ops.canary:create_app", "--soft-memory", str(150 * MiB),
            "--hard-memory", str(160 * MiB))
    async with supervisor(tmp_path, *args, workers=1,
                          env={"LIVECOUNT_CANARY_BALLAST": str(MiB)}) as running, \
            httpx.AsyncClient(base_url=running.base, timeout=10, trust_env=False) as http:
        tenant = await create_tenant(http, ADMIN)
        me, other = tenant.people[0], tenant.people[1]
        (leaker,) = worker_pids(running.proc.pid)
        clients = [ResumingClient(running.ws, tenant.id, me.token, "me"),
                   ResumingClient(running.ws, tenant.id, other.token, "other")]
        async with clients[0], clients[1]:
            for client in clients:
                await client.wait_for(lambda m: m.seq >= 0, what="a snapshot")
            recycled = None
            for i in range(400):
                await post(http, tenant, i)
                if i % 10 == 9:
                    recycled = await metric(running.base, "livecount_worker_recycles_total",
                                            reason="memory")
                    if recycled:
                        break
            assert recycled == 1, running.text()[-4000:]
            await until(lambda: leaker not in worker_pids(running.proc.pid), 30,
                        "the leaking worker to exit", running)
            for i in range(400, 405):
                await post(http, tenant, i)
            await exact(clients[0], running.store, tenant.id, me.id)
            await exact(clients[1], running.store, tenant.id, other.id)
            for client in clients:
                assert client.reconnects, f"{client.name} was not told to reconnect"
                assert client.reconnects[0]["reason"] == "server shutting down"
                assert 1000 <= client.reconnects[0]["retry_ms"] <= 2000
                assert 1012 in client.close_codes and client.resumes >= 1
        text = running.text()
        # noticed by the worker itself or by the supervisor reading its RSS, whichever first
        assert re.search(r"resident memory \d+ bytes is above the hard watermark", text)
        assert "starting its replacement first" in text
        # the replacement was serving before the leaking worker was told to drain
        assert text.index("starting its replacement first") < text.index("retiring worker 0")
        assert await metric(running.base, "livecount_worker_restarts_total") == 0


async def test_max_requests_recycles_with_the_replacement_first(tmp_path: Path) -> None:
    async with supervisor(tmp_path, "--max-requests", "40", workers=1) as running, \
            httpx.AsyncClient(base_url=running.base, timeout=10, trust_env=False) as http:
        (first,) = worker_pids(running.proc.pid)
        for _ in range(45):
            assert (await http.get("/healthz")).status_code == 200
        await until(lambda: metric(running.base, "livecount_worker_recycles_total",
                                   reason="max_requests"), 20, "a recycle", running)
        await until(lambda: first not in worker_pids(running.proc.pid), 20,
                    "the old worker to exit", running)
        assert (await http.get("/healthz")).status_code == 200
        text = running.text()
        assert re.search(r"served \d+ requests \(limit 40\): asking to be recycled", text)
        assert text.index("starting its replacement first") < text.index("retiring worker 0")


async def test_sighup_rolls_every_worker_under_load_without_losing_an_update(
        tmp_path: Path) -> None:
    async with supervisor(tmp_path, workers=2) as running, \
            httpx.AsyncClient(base_url=running.base, timeout=10, trust_env=False) as http:
        tenant = await create_tenant(http, ADMIN)
        me = tenant.people[0]
        clients = [ResumingClient(running.ws, tenant.id, me.token, f"c{i}") for i in range(3)]
        writes = 0
        stop = asyncio.Event()

        async def writer() -> None:
            nonlocal writes
            while not stop.is_set():
                await post(http, tenant, writes)
                writes += 1
                await asyncio.sleep(0.01)

        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            for client in clients:
                await client.wait_for(lambda m: m.seq >= 0, what="a snapshot")
            before = worker_pids(running.proc.pid)
            task = asyncio.create_task(writer())
            try:
                await asyncio.sleep(0.5)
                os.kill(running.proc.pid, signal.SIGHUP)
                async def rolled() -> bool:
                    return await metric(running.base, "livecount_worker_recycles_total",
                                        reason="restart") == 2

                await until(rolled, 60, "2 recycles", running)
                await until(lambda: not (worker_pids(running.proc.pid) & before), 30,
                            "the old workers to exit", running)
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await task
            assert writes > 20
            for client in clients:
                await exact(client, running.store, tenant.id, me.id)
                assert client.reconnects and 1012 in client.close_codes

            # SIGTERM: every worker drains (clients are told to reconnect), then it exits
            told = [len(c.reconnects) for c in clients]
            for client in clients:
                client.follow = False
            running.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(running.proc.wait, 30)
            assert code == 0, running.text()[-3000:]
            assert [len(c.reconnects) for c in clients] == [n + 1 for n in told]
        assert await asyncio.to_thread(running.text) and "Stopping livecount supervisor" in \
            running.text()
        assert not worker_pids_alive(before)


def worker_pids_alive(pids: set[int]) -> bool:
    import psutil

    return any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
               for pid in pids)

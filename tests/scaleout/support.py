"""The pieces of the scale-out tests: a cluster of real processes, stream clients that move
between gateways, writers, and the ground truth (a SQL recount of the store).

**The cluster** (:class:`Cluster`): a PostgreSQL database of its own, a ``redis-server`` of
its own (on a free port, no persistence, in a temporary directory: restarting it disturbs
nobody else), :data:`GATEWAYS` ``livecount serve --counter-workers 0`` gateway processes on
their own ports and :data:`WORKERS` ``livecount worker`` processes (``--lease-ttl``
:data:`LEASE_TTL`, ``--reconcile-every 0``: every repair in these tests must come from the
counting itself, never from a periodic reconcile). Each process writes to its own log file;
:meth:`Cluster.heal` restarts whatever a test killed (or SIGCONTs what it stopped) and waits
until the workers split the shards again; :meth:`Cluster.close` stops everything.

**The truth** (:class:`Truth`): for each teammate, every view it sees counted by SQL
(``Store.recount``) in the store, rendered as the API renders counts. Nothing of any
livecount process's state is involved.

**Clients** (:class:`Client`): a WebSocket or SSE client applying every message to a
:class:`~tests.server.stream_support.Model` (which also checks the protocol). When its
connection ends it comes back, resuming with ``?epoch=E&since=S`` (WebSocket) or
``Last-Event-ID: E:S`` (SSE): to the same gateway first, to the next one when that one
refuses. Each connection is recorded (gateway, resumed or not, its first message).

**Writers** (:class:`Writer`): creates and PATCHes through one gateway each, retried on a 503
or a broken connection (then through the next gateway).

Each test makes a workspace of its own (:func:`make_tenant`), so tests share the cluster but
not their data.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import psutil
import psycopg
import redis
import sqlalchemy as sa
import websockets
from psycopg import sql
from websockets.asyncio.client import connect

from livecount.domain import now_us
from livecount.store import open_store
from livecount.store.base import Store
from livecount.views import render_counts, visible_views
from tests.ops.support import PYTHON, ROOT, free_port, samples
from tests.server.stream_support import Model
from tests.server.support import Tenant, auth, create_tenant

__all__ = [
    "ADMIN",
    "GATEWAYS",
    "LEASE_TTL",
    "SHARDS",
    "TEST_APPLICATION",
    "WORKERS",
    "Backend",
    "Client",
    "Cluster",
    "Link",
    "Managed",
    "Truth",
    "Writer",
    "api_counts",
    "converge",
    "eventually",
    "listening",
    "make_tenant",
    "metric_value",
    "metrics",
    "nontrivial",
    "notifications",
    "silent_store",
    "spread_clients",
    "streaming",
    "teammates_of",
    "token_of",
    "writes_made",
    "writing",
]

ADMIN: Final = "lc_admin_scaleout-test"
GATEWAYS: Final = 3
WORKERS: Final = 2
SHARDS: Final = 16
LEASE_TTL: Final = 1.5
#: The application_name of the tests' own connections (the truth, the silent store), which
#: the "terminate every backend" fault leaves alone: it is about the livecount processes.
TEST_APPLICATION: Final = "livecount_scaleout_test"


async def eventually(check: Callable[[], Any], within: float, what: str,
                     every: float = 0.05) -> Any:
    """Wait until ``check()`` (awaited when a coroutine) is truthy; its value. Fails after
    ``within`` seconds, naming ``what``."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)


# -- processes ------------------------------------------------------------------------------


_ALL: set[Managed] = set()


def _kill_leftovers() -> None:  # pragma: no cover - only when the run ends abnormally
    for managed in list(_ALL):
        managed.kill()


atexit.register(_kill_leftovers)


class Managed:
    """One child process of the cluster: started from the repository root in a session of
    its own, output appended to ``log``. :meth:`start` may be called again after it died."""

    def __init__(self, name: str, command: list[str], log: Path, port: int,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.port = port
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped by a test
        self.starts = 0

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} port={self.port}>"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert not self.alive, f"{self.name} is running"
        with self.log.open("ab") as log:
            log.write(f"\n===== {self.name} start #{self.starts + 1} at "
                      f"{time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})
        self.starts += 1
        self.stopped = False
        _ALL.add(self)

    def signal(self, signum: int) -> None:
        assert self.proc is not None and self.alive, f"{self.name} is not running"
        os.kill(self.proc.pid, signum)
        if signum == signal.SIGSTOP:
            self.stopped = True
        elif signum == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """SIGKILL (its whole process group) and reap: what a crash looks like."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.stopped = False
        _ALL.discard(self)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after a SIGCONT, in case a test stopped it), SIGKILL past ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int, limit: int = 12000) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return text if len(text) <= limit else f"[…]\n{text[-limit:]}"


def _http_ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=2, trust_env=False) as c:
        return c.get(url).status_code == 200
    return False


def _metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as client:
        return samples(client.get("/metrics").text)


async def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as client:
        response = await client.get("/metrics")
        assert response.status_code == 200, response.text
        return samples(response.text)


def metric_value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
                 ) -> float:
    """A label-less sample (a counter's ``_total`` or the bare name)."""
    for key in ((f"{name}_total", ()), (name, ())):
        if key in found:
            return found[key]
    raise KeyError(f"{name} not in {sorted({n for n, _ in found})}")


# -- the cluster ------------------------------------------------------------------------------


def _admin_connect(admin_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(admin_url, autocommit=True, connect_timeout=5)


def _with_database(url: str, database: str) -> str:
    return sa.make_url(url).set(database=database).render_as_string(hide_password=False)


@dataclass
class Cluster:
    """Everything the scale-out tests run against; see the module docstring."""

    root: Path
    admin_url: str  # a PostgreSQL URL to create and drop the database with
    database: str = field(init=False)
    store_url: str = field(init=False)
    redis_port: int = field(init=False)
    broker: str = field(init=False)
    redis_server: Managed = field(init=False)
    gateways: list[Managed] = field(init=False)
    workers: list[Managed] = field(init=False)
    marks: dict[str, int] = field(default_factory=dict)  # log offsets at a test's start

    def __post_init__(self) -> None:
        self.database = f"livecount_scaleout_{os.getpid()}"
        self.store_url = _with_database(self.admin_url, self.database)
        self.redis_port = free_port()
        self.broker = f"redis://127.0.0.1:{self.redis_port}/0?prefix=lcso:"
        redis_dir = self.root / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        server = shutil.which("redis-server") or "redis-server"
        self.redis_server = Managed("redis", [server, "--port", str(self.redis_port), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no",
                                       "--dir", str(redis_dir), "--loglevel", "warning"],
                             self.root / "redis.log", self.redis_port)
        env = {"LIVECOUNT_ADMIN_TOKEN": ADMIN}
        common = ["--store", self.store_url, "--broker", self.broker, "--shards", str(SHARDS),
                  "--reconcile-every", "0"]
        self.gateways = []
        for i in range(GATEWAYS):
            port = free_port()
            self.gateways.append(Managed(
                f"gateway-{i}", [PYTHON, "-m", "livecount", "serve", *common,
                                 "--counter-workers", "0", "--port", str(port),
                                 "--drain-timeout", "2", "--log-level", "warning"],
                self.root / f"gateway-{i}.log", port, env))
        self.workers = []
        for i in range(WORKERS):
            port = free_port()
            self.workers.append(Managed(
                f"worker-{i}", [PYTHON, "-m", "livecount", "worker", *common,
                                "--lease-ttl", str(LEASE_TTL), "--port", str(port)],
                self.root / f"worker-{i}.log", port, env))

    @property
    def processes(self) -> list[Managed]:
        return [self.redis_server, *self.gateways, *self.workers]

    # -- life cycle ------------------------------------------------------------------------

    def create_database(self) -> None:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(self.database))
        with _admin_connect(self.admin_url) as conn:
            conn.execute(drop)  # a run with the same pid that died before its cleanup
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        subprocess.run([PYTHON, "-m", "livecount", "migrate", "--store", self.store_url],
                       cwd=ROOT, check=True, capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})

    def drop_database(self) -> None:
        with _admin_connect(self.admin_url) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.database)))

    def start(self) -> None:
        self.create_database()
        self.redis_server.start()
        self.wait_redis(10)
        for managed in [*self.workers, *self.gateways]:
            managed.start()
        self.wait_ready(60)

    def close(self) -> None:
        """SIGTERM every livecount process at once, then wait for each (SIGKILL past 10 s),
        then Redis."""
        for managed in [*self.gateways, *self.workers]:
            if managed.alive:
                managed.signal(signal.SIGCONT)
                managed.signal(signal.SIGTERM)
        for managed in [*self.gateways, *self.workers, self.redis_server]:
            managed.stop(timeout=10)

    def heal(self, within: float = 40.0) -> None:
        """Restart what died, continue what was stopped, wait until all is ready again."""
        for managed in self.processes:
            if managed.alive and managed.stopped:
                managed.signal(signal.SIGCONT)
        if not self.redis_server.alive:
            self.redis_server.start()
            self.wait_redis(10)
        for managed in [*self.workers, *self.gateways]:
            if not managed.alive:
                managed.kill()  # reap
                managed.start()
        self.wait_ready(within)

    def ready_problems(self) -> list[str]:
        """What is not ready yet (empty: every process answers, every worker holds its fair
        share of the shards)."""
        problems = []
        for managed in self.processes:
            if not managed.alive:
                code = managed.proc and managed.proc.poll()
                problems.append(f"{managed.name} exited with {code}")
        if problems:
            return problems
        for gateway in self.gateways:
            if not _http_ok(f"{gateway.base}/readyz"):
                problems.append(f"{gateway.name} not ready")
        held = []
        for worker in self.workers:
            if not _http_ok(f"{worker.base}/healthz"):
                problems.append(f"{worker.name} not healthy")
                continue
            try:
                held.append(metric_value(_metrics(worker.base), "livecount_shards_owned"))
            except (httpx.HTTPError, KeyError) as exc:
                problems.append(f"{worker.name}: no metrics ({exc!r})")
        fair = SHARDS // WORKERS
        if not problems and held != [fair] * WORKERS:
            problems.append(f"shards not split evenly yet: {held}")
        return problems

    def wait_ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        while problems := self.ready_problems():
            for managed in self.processes:
                if not managed.alive:
                    raise AssertionError(f"{managed.name} died:\n{managed.log_since(0)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster was not ready within {within} s: "
                                     f"{problems}")
            time.sleep(0.1)

    def redis_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_connect_timeout=1,
                           socket_timeout=5)

    def redis_ok(self) -> bool:
        with contextlib.suppress(redis.RedisError), self.redis_client() as client:
            return bool(client.ping())
        return False

    def wait_redis(self, within: float) -> None:
        deadline = time.monotonic() + within
        while not self.redis_ok():
            if time.monotonic() > deadline:
                raise AssertionError(f"redis did not answer:\n{self.redis_server.log_since(0)}")
            time.sleep(0.02)

    async def restart_redis(self) -> None:
        """Kill the Redis server and start an empty one on the same port."""
        self.redis_server.kill()
        await asyncio.sleep(0.3)  # let every process notice
        self.redis_server.start()
        await eventually(self.redis_ok, 10, "redis to answer again")

    # -- who owns what ------------------------------------------------------------------------

    def owner(self, workspace_id: int) -> Managed | None:
        """The worker process holding the lease on the workspace's shard (from Redis: the
        lease's value is ``<hostname>-<pid>-<random> <fence>``)."""
        with self.redis_client() as client:
            value = client.get(f"lcso:{{leases}}:shard:{workspace_id % SHARDS}")
        if value is None:
            return None
        pid = int(value.decode().split(" ")[0].rsplit("-", 2)[1])
        return next((w for w in self.workers if w.pid == pid), None)

    def fence(self, workspace_id: int) -> int | None:
        with self.redis_client() as client:
            value = client.get(f"lcso:{{leases}}:shard:{workspace_id % SHARDS}")
        return None if value is None else int(value.decode().split(" ")[1])

    def epoch(self, workspace_id: int) -> str | None:
        """The counter state's epoch of the workspace, straight from Redis."""
        with self.redis_client() as client:
            value = client.hget(f"lcso:{{ws:{workspace_id}}}:state", "_epoch")
        return None if value is None else value.decode()

    # -- logs -----------------------------------------------------------------------------------

    def mark_logs(self) -> None:
        self.marks = {m.name: m.log_size() for m in self.processes}

    def logs_since_mark(self) -> list[tuple[str, str]]:
        return [(m.name, m.log_since(self.marks.get(m.name, 0))) for m in self.processes]

    def log_since_mark(self, managed: Managed) -> str:
        return managed.log_since(self.marks.get(managed.name, 0), limit=1 << 30)

    # -- terminating database connections -------------------------------------------------------

    def terminate_backends(self) -> list[Backend]:
        """``pg_terminate_backend`` on every backend of the cluster's database but this
        connection's and the tests' own (``TEST_APPLICATION``); each one named with the
        cluster process whose connection it served (by the client's TCP port)."""
        owners: dict[int, str] = {}
        for managed in [*self.gateways, *self.workers]:
            if managed.pid is None or not managed.alive:
                continue
            with contextlib.suppress(psutil.Error):
                for c in psutil.Process(managed.pid).net_connections(kind="tcp"):
                    if c.laddr and c.raddr and c.raddr.port == self._pg_port:
                        owners[c.laddr.port] = managed.name
        with _admin_connect(self.store_url) as conn:
            rows = conn.execute(
                "SELECT pid, client_port, query FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name <> %s", (TEST_APPLICATION,)).fetchall()
            for pid, _, _ in rows:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return [Backend(pid, owners.get(port or -1, "?"), query) for pid, port, query in rows]

    @property
    def _pg_port(self) -> int:
        return sa.make_url(self.store_url).port or 5432


@dataclass(frozen=True)
class Backend:
    """A PostgreSQL backend a test terminated: its pid, the cluster process it served
    ("?" when unknown) and its last query."""

    pid: int
    process: str
    query: str


# -- the truth ------------------------------------------------------------------------------------


Teammate = int | None  # None: the admin


class Truth:
    """Counts by SQL in the store (its own connections, ``application_name`` of the tests):
    every view each teammate sees, rendered as the API renders them."""

    def __init__(self, store_url: str) -> None:
        self.store = open_store(f"{store_url}?application_name={TEST_APPLICATION}")

    async def __aenter__(self) -> Truth:
        await self.store.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()

    async def counts(self, workspace_id: int, teammates: list[Teammate]
                     ) -> dict[Teammate, dict[str, Any]]:
        for attempt in range(5):  # its connection may be one a test just terminated
            try:
                views = await self.store.list_views(workspace_id)
                recount = await self.store.recount(workspace_id, views, now_us())
                break
            except Exception:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1)
        return {t: dict(render_counts(visible_views(views, t), recount.counts, t))
                for t in teammates}


# -- the workspace under test ------------------------------------------------------------------


async def make_tenant(cluster: Cluster, name: str) -> Tenant:
    """A workspace with 4 teammates, 2 teams, the folders (``$me`` and grouped ones among
    them), a shared view grouped by tag and a personal view of teammate 0."""
    async with httpx.AsyncClient(base_url=cluster.gateways[0].base, timeout=30,
                                 trust_env=False) as client:
        tenant = await create_tenant(client, ADMIN, name=name, teammates=4, teams=2)
        views = [
            ({"name": "Tagged", "group_by": "tags",
              "filter": {"field": "state", "operator": "=", "value": "open"}}, ADMIN),
            ({"name": "Unread by me", "personal": True, "group_by": "priority",
              "filter": {"field": "unread_by", "operator": "contains", "value": "$me"}},
             tenant.people[0].token),
        ]
        for body, token in views:
            response = await client.post(tenant.url("/views"), json=body, headers=auth(token))
            assert response.status_code == 201, response.text
    return tenant


def teammates_of(tenant: Tenant) -> list[Teammate]:
    return [p.id for p in tenant.people] + [None]


def token_of(tenant: Tenant, teammate: Teammate) -> str:
    if teammate is None:
        return ADMIN
    return next(p.token for p in tenant.people if p.id == teammate)


# -- writers ------------------------------------------------------------------------------------

_TAGS: Final = ("vip", "bug", "billing", "urgent")


def _fields(rng: random.Random, tenant: Tenant) -> dict[str, Any]:
    people = [p.id for p in tenant.people]
    teams = [t["id"] for t in tenant.teams]
    return {
        "assignee_id": rng.choice([None, *people]),
        "team_id": rng.choice([None, *teams]),
        "tags": rng.sample(_TAGS, rng.randint(0, 2)),
        "mentions": rng.sample(people, rng.randint(0, 2)),
        "unread_by": rng.sample(people, rng.randint(0, 2)),
        "priority": rng.random() < 0.3,
        "state": rng.choice(["open", "open", "closed"]),
    }


@dataclass
class Writer:
    """Creates and PATCHes conversations through ``gateways[start]`` (the next one after a
    broken connection), as random teammates; a 503 or a broken connection is retried."""

    cluster: Cluster
    tenant: Tenant
    start: int
    seed: int
    ids: list[int]  # conversation ids, shared by the writers of a test
    done: int = 0
    retried: int = 0
    failovers: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    last_position: int = 0
    task: asyncio.Task[None] | None = None  # while it runs under writing()

    async def run(self, ops: int | None = None, stop: asyncio.Event | None = None,
                  pause: float = 0.0) -> None:
        rng = random.Random(self.seed)
        index = self.start
        clients: dict[int, httpx.AsyncClient] = {}
        try:
            while (ops is None or self.done < ops) and not (stop is not None and stop.is_set()):
                person = rng.choice(self.tenant.people)
                if len(self.ids) < 8 or rng.random() < 0.35:
                    method, path = "POST", self.tenant.url("/conversations")
                    body = _fields(rng, self.tenant)
                else:
                    method = "PATCH"
                    path = self.tenant.url(f"/conversations/{rng.choice(self.ids)}")
                    every = _fields(rng, self.tenant)
                    body = {k: every[k] for k in rng.sample(sorted(every), rng.randint(1, 3))}
                for attempt in range(400):
                    gateway = self.cluster.gateways[index]
                    client = clients.get(index)
                    if client is None:
                        client = clients[index] = httpx.AsyncClient(
                            base_url=gateway.base, timeout=10, trust_env=False)
                    try:
                        response = await client.request(method, path, json=body,
                                                        headers=auth(person.token))
                    except httpx.TransportError:
                        self.retried += 1
                        self.failovers += 1
                        index = (index + 1) % len(self.cluster.gateways)
                        await asyncio.sleep(0.05)
                        continue
                    self.statuses[response.status_code] = self.statuses.get(
                        response.status_code, 0) + 1
                    if response.status_code == 503:
                        self.retried += 1
                        await asyncio.sleep(0.05)
                        continue
                    assert response.status_code in (200, 201), (attempt, response.text)
                    if method == "POST":
                        self.ids.append(response.json()["id"])
                    # a PATCH that changes nothing writes nothing: no position then
                    position = response.headers.get("Livecount-Position")
                    if position is not None:
                        self.last_position = max(self.last_position, int(position))
                    break
                else:
                    raise AssertionError(f"a {method} kept failing: {self.statuses}")
                self.done += 1
                if pause:
                    await asyncio.sleep(pause)
        finally:
            for client in clients.values():
                await client.aclose()


def writes_made(writers: list[Writer]) -> int:
    """How many writes the writers have made; raises the failure of one that failed."""
    for writer in writers:
        task = writer.task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            task.result()
    return sum(w.done for w in writers)


@contextlib.asynccontextmanager
async def writing(writers: list[Writer], *, ops: int | None = None, pause: float = 0.0
                  ) -> Any:
    """Run the writers as tasks for the block; at its end they stop (or finish their ``ops``)
    and their failures are raised."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(ops, stop, pause), name=f"writer-{i}")
             for i, w in enumerate(writers)]
    for writer, task in zip(writers, tasks, strict=True):
        writer.task = task
    try:
        yield stop
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if ops is None:
        stop.set()
    await asyncio.gather(*tasks)


# -- stream clients ------------------------------------------------------------------------------


@dataclass
class Link:
    """One connection of a client."""

    gateway: int
    resumed_from: tuple[str, int] | None  # the epoch and seq it named
    first: dict[str, Any] | None = None  # its first snapshot or delta
    messages: int = 0
    ended: str = ""  # why it ended ("" while open)


class _Refused(Exception):
    pass


class Client:
    """A WebSocket ("ws") or SSE ("sse") client of the cluster; one task (``async with``)."""

    def __init__(self, cluster: Cluster, kind: str, workspace_id: int, token: str,
                 teammate: Teammate, start: int, name: str) -> None:
        assert kind in ("ws", "sse")
        self.cluster = cluster
        self.kind = kind
        self.workspace_id = workspace_id
        self.token = token
        self.teammate = teammate
        self.gateway = start
        self.name = name
        self.model = Model()
        self.connections: list[Link] = []  # every connection made, in order
        self.refusals: list[str] = []
        self.open = False  # a connection is open now
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (f"<{self.name} {self.kind} teammate={self.teammate} gateway={self.gateway} "
                f"open={self.open} at {self.model.epoch}:{self.model.seq}>")

    async def __aenter__(self) -> Client:
        self._task = asyncio.create_task(self._run(), name=f"scaleout-client-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _apply(self, conn: Link, message: dict[str, Any]) -> None:
        conn.messages += 1
        if conn.first is None and message.get("type") in ("snapshot", "delta"):
            conn.first = message
        self.model.apply(message)

    async def _run(self) -> None:
        gateways = self.cluster.gateways
        while True:
            resume = (self.model.epoch, self.model.seq) if self.model.epoch else None
            conn = Link(self.gateway, resume)
            delay = 0.1
            try:
                if self.kind == "ws":
                    delay = await self._ws(conn)
                else:
                    delay = await self._sse(conn)
                conn.ended = conn.ended or "closed"
            except (OSError, TimeoutError, websockets.WebSocketException, httpx.HTTPError,
                    _Refused) as exc:
                conn.ended = f"{type(exc).__name__}: {exc}"[:200]
            except Exception as exc:  # a bug here or a malformed message: fail the test
                conn.ended = f"{type(exc).__name__}: {exc}"[:200]
                self.model.errors.append(f"client failure: {conn.ended}")
            self.open = False
            if not conn.messages:  # refused or unreachable: try the next gateway
                self.refusals.append(f"{gateways[self.gateway].name}: {conn.ended}")
                self.gateway = (self.gateway + 1) % len(gateways)
            await asyncio.sleep(delay)

    def _url(self, conn: Link) -> str:
        gateway = self.cluster.gateways[conn.gateway]
        path = "ws" if self.kind == "ws" else "stream"
        base = gateway.base.replace("http://", "ws://") if self.kind == "ws" else gateway.base
        url = f"{base}/api/workspaces/{self.workspace_id}/{path}?token={self.token}"
        if self.kind == "ws" and conn.resumed_from is not None:
            epoch, seq = conn.resumed_from
            url += f"&epoch={epoch}&since={seq}"
        return url

    async def _ws(self, conn: Link) -> float:
        delay = 0.1
        async with connect(self._url(conn), proxy=None, compression=None, max_size=None,
                           open_timeout=5, close_timeout=1) as ws:
            self.connections.append(conn)
            self.open = True
            async for raw in ws:
                message = json.loads(raw)
                self._apply(conn, message)
                if message.get("type") == "reconnect":
                    delay = message["retry_ms"] / 1000
        return delay

    async def _sse(self, conn: Link) -> float:
        delay = 0.1
        headers = {}
        if conn.resumed_from is not None:
            headers["Last-Event-ID"] = "{}:{}".format(*conn.resumed_from)
        timeout = httpx.Timeout(5, read=None)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client, \
                client.stream("GET", self._url(conn), headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise _Refused(f"{response.status_code}: {response.text[:200]}")
            self.connections.append(conn)
            self.open = True
            data: list[str] = []
            event_id: str | None = None
            async for line in response.aiter_lines():
                if line == "":
                    if data:
                        message = json.loads("\n".join(data))
                        if message.get("type") in ("snapshot", "delta"):
                            wanted = f"{message.get('epoch')}:{message.get('seq')}"
                            if event_id != wanted:
                                self.model.errors.append(f"SSE id {event_id} for {wanted}")
                        self._apply(conn, message)
                        if message.get("type") == "reconnect":
                            delay = message["retry_ms"] / 1000
                    data, event_id = [], None
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    elif name == "id":
                        event_id = value
        return delay


def spread_clients(cluster: Cluster, tenant: Tenant, n: int) -> list[Client]:
    """``n`` clients: WebSocket and SSE alternately, over every gateway and every teammate
    (the admin too)."""
    teammates = teammates_of(tenant)
    clients = []
    for i in range(n):
        teammate = teammates[i % len(teammates)]
        kind = "ws" if (i // len(teammates)) % 2 == 0 else "sse"
        gateway = i % len(cluster.gateways)
        clients.append(Client(cluster, kind, tenant.id, token_of(tenant, teammate), teammate,
                              gateway, f"c{i}-{kind}-g{gateway}-t{teammate}"))
    return clients


@contextlib.asynccontextmanager
async def streaming(clients: list[Client], within: float = 15.0) -> Any:
    """Run the clients for the block, once every one of them holds a snapshot."""
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        await eventually(lambda: all(c.open and c.model.epoch for c in clients), within,
                         "every client's first snapshot")
        yield clients


# -- comparing ------------------------------------------------------------------------------------


async def api_counts(cluster: Cluster, tenant: Tenant, teammates: list[Teammate]
                     ) -> dict[tuple[str, Teammate], dict[str, Any] | str]:
    """``GET /counts`` on every live gateway, for every teammate."""
    out: dict[tuple[str, Teammate], dict[str, Any] | str] = {}
    for gateway in cluster.gateways:
        if not gateway.alive or gateway.stopped:
            continue
        async with httpx.AsyncClient(base_url=gateway.base, timeout=10,
                                     trust_env=False) as client:
            for teammate in teammates:
                try:
                    response = await client.get(tenant.url("/counts"),
                                                headers=auth(token_of(tenant, teammate)))
                except httpx.HTTPError as exc:
                    out[gateway.name, teammate] = f"{type(exc).__name__}"
                    continue
                if response.status_code == 200:
                    out[gateway.name, teammate] = response.json()["counts"]
                else:
                    out[gateway.name, teammate] = f"{response.status_code} {response.text}"
    return out


def nontrivial(expected: dict[Teammate, dict[str, Any]], tenant: Tenant) -> None:
    """The comparison must mean something: grouped views with several groups, ``$me`` views
    whose counts differ between teammates."""
    some = expected[tenant.people[0].id]
    grouped = [v for v in some.values() if isinstance(v, dict)]
    assert grouped and max(len(v) for v in grouped) >= 2, some
    personal = {json.dumps(expected[p.id], sort_keys=True) for p in tenant.people}
    assert len(personal) >= 2, "every teammate sees the same counts: no $me view moved"


async def converge(cluster: Cluster, tenant: Tenant, clients: list[Client], truth: Truth,
                   within: float = 20.0) -> dict[Teammate, dict[str, Any]]:
    """Wait until every client's counts and ``GET /counts`` on every gateway equal the SQL
    counts, for every teammate; then check no client saw a protocol error and every client
    is connected. Returns the truth."""
    teammates = teammates_of(tenant)
    deadline = time.monotonic() + within
    while True:
        expected = await truth.counts(tenant.id, teammates)
        problems = [f"{c.name} holds {c.model.counts} at {c.model.epoch}:{c.model.seq}, "
                    f"SQL says {expected[c.teammate]}"
                    for c in clients if c.model.counts != expected[c.teammate]]
        problems += [f"{c.name} is not connected ({c.connections[-1:]})" for c in clients
                     if not c.open]
        if not problems:
            served = await api_counts(cluster, tenant, teammates)
            problems += [f"GET /counts on {g} for teammate {t}: {got}, SQL says {expected[t]}"
                         for (g, t), got in served.items() if got != expected[t]]
        if not problems:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"not exact after {within} s ({len(problems)} problems):\n"
                                 + "\n".join(problems[:12]))
        await asyncio.sleep(0.2)
    errors = {c.name: c.model.errors for c in clients if c.model.errors}
    assert not errors, errors
    nontrivial(expected, tenant)
    return expected


# -- a store that does not notify ----------------------------------------------------------------


SILENT_SCHEMA: Final = "lc_silent"


@contextlib.asynccontextmanager
async def silent_store(store_url: str) -> AsyncIterator[Store]:
    """An opened store whose commits send no NOTIFY: its connections resolve ``pg_notify``
    to a no-op function in a schema of their own, searched before ``pg_catalog``. Nothing
    of the store's code changes (so this keeps up with it); its writes reach the counter
    workers by their poll only, which is what a lost notification looks like."""
    with _admin_connect(store_url) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
            sql.Identifier(SILENT_SCHEMA)))
        conn.execute(sql.SQL("CREATE OR REPLACE FUNCTION {}.pg_notify(text, text) RETURNS "
                             "void LANGUAGE plpgsql AS $$ BEGIN END $$").format(
            sql.Identifier(SILENT_SCHEMA)))
    path = quote(f"-c search_path={SILENT_SCHEMA},pg_catalog,public", safe="")
    store = open_store(f"{store_url}?options={path}&application_name={TEST_APPLICATION}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.contextmanager
def listening(store_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection LISTENing on the outbox channel (to see which commits notify)."""
    conn = psycopg.connect(store_url, autocommit=True, connect_timeout=5,
                           application_name=TEST_APPLICATION)
    try:
        conn.execute("LISTEN livecount_outbox")
        yield conn
    finally:
        conn.close()


async def notifications(conn: psycopg.Connection[Any], within: float, *,
                        first: bool = False) -> list[str]:
    """The payloads that arrived on ``conn`` within ``within`` seconds (with ``first``: as
    soon as one did)."""
    payloads: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not (first and payloads):
        payloads += [n.payload for n in conn.notifies(timeout=0, stop_after=100)]
        await asyncio.sleep(0.02)
    return payloads

"""Machinery of ``bench/scale.py``: processes, a private Redis and PostgreSQL database, seeding,
the HTTP writer (a child process: ``python bench/_cluster.py writer CONFIG``), the WebSocket
clients (in the benchmark's own process) and the latency analysis.

Nothing here is a benchmark by itself; see ``bench/scale.py`` for what is measured and how.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import ctypes
import json
import os
import random
import resource
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
ADMIN_TOKEN = "lc_admin_" + secrets.token_urlsafe(16)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_HOST = "postgres@127.0.0.1:5432"


# -- processes --------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die_with_parent() -> None:  # preexec_fn: the child gets SIGTERM if the benchmark dies
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ChildError(RuntimeError):
    pass


class Proc:
    """A child process (asyncio), its output in a log file; ``pipe``: JSON lines both ways."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self._log_file: Any = None

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path, *, pipe: bool = False,
                    env: dict[str, str] | None = None) -> Proc:
        self = cls(name, log)
        self._log_file = log.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if pipe else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipe else self._log_file, stderr=self._log_file,
            env=env, preexec_fn=_die_with_parent, limit=1 << 26)
        RUNNING.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, lines: int = 15) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return ("\n  " + "\n  ".join(text)) if text else ""

    async def call(self, message: dict[str, Any], wait: float = 120.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(wait):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise ChildError(f"{self.name}: no answer within {wait:.0f} s{self.tail()}"
                             ) from None
        if not line:
            await asyncio.sleep(0.2)
            raise ChildError(f"{self.name} exited ({self.proc.returncode}){self.tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self, grace: float = 15.0) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING: list[Proc] = []


async def stop_all() -> None:
    """Stop the livecount processes (and the writer) first, Redis last: a counter worker
    gives its leases back to Redis as it stops."""
    first = [p for p in RUNNING if p.name != "redis-server"]
    await asyncio.gather(*(p.stop(grace=10.0) for p in first), return_exceptions=True)
    await asyncio.gather(*(p.stop(grace=10.0) for p in list(RUNNING)), return_exceptions=True)


def kill_all_now() -> None:
    """Last resort (a synchronous exit path): SIGKILL every child still running."""
    for p in list(RUNNING):
        if p.proc is not None and p.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()


async def wait_http(port: int, proc: Proc, path: str = "/healthz", within: float = 60.0
                    ) -> None:
    import httpx

    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ChildError(f"{proc.name} exited{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{port}{path}")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise ChildError(f"{proc.name} did not become healthy{proc.tail()}")


async def start_redis(tmp: Path, log: Path) -> tuple[Proc, int]:
    """A private redis-server (no persistence) on a free port."""
    port = free_port()
    proc = await Proc.start("redis-server", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "no"], log)
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            with contextlib.suppress(Exception):
                if await client.ping():
                    return proc, port
            if not proc.alive():
                break
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise ChildError(f"redis-server did not start{proc.tail()}")


# -- PostgreSQL -------------------------------------------------------------------------------


def create_database() -> str:
    """A fresh database on the local PostgreSQL; its name."""
    import psycopg

    name = f"livecount_scale_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url(name: str, **query: str) -> str:
    tail = "&".join(f"{k}={v}" for k, v in query.items())
    return f"postgresql://{PG_HOST}/{name}" + (f"?{tail}" if tail else "")


class PgWireCounter:
    """A TCP proxy in front of PostgreSQL that counts what clients send, by protocol message:
    ``Q`` (a simple query: one round trip), ``S`` (Sync: ends an extended-protocol exchange,
    one round trip), ``E`` (Execute: one statement run through the extended protocol), ``P``
    (Parse). So round trips and statements per write are counted whatever the client library
    does (SQLAlchemy, a raw cursor, pipelines). Connect with ``sslmode=disable`` and
    ``gssencmode=disable`` (it reads plain protocol only)."""

    def __init__(self) -> None:
        self.port = 0
        self.counts: dict[str, int] = {}
        self.bytes_sent = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def reset(self) -> None:
        self.counts = {}
        self.bytes_sent = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)

        async def downstream() -> None:
            with contextlib.suppress(Exception):
                while chunk := await up_reader.read(1 << 16):
                    writer.write(chunk)
                    await writer.drain()
            writer.close()

        task = asyncio.create_task(downstream())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            head = await reader.readexactly(4)  # the startup message: no type byte
            body = await reader.readexactly(int.from_bytes(head, "big") - 4)
            up_writer.write(head + body)
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
                kind = chr(head[0])
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self.bytes_sent += 5 + len(body)
                up_writer.write(head + body)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def summary(self, writes: int) -> dict[str, float]:
        c = self.counts
        return {"round_trips": (c.get("Q", 0) + c.get("S", 0)) / writes,
                "statements": (c.get("Q", 0) + c.get("E", 0)) / writes,
                "parses": c.get("P", 0) / writes, "bytes_sent": self.bytes_sent / writes,
                "messages": {k: v / writes for k, v in sorted(c.items())}}


def table_writes(db: str) -> dict[str, tuple[int, int, int]]:
    """table → (rows inserted, updated, deleted) so far (pg_stat_user_tables)."""
    import psycopg

    with psycopg.connect(pg_url(db), autocommit=True) as conn:
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")}


# -- the world: seeded workspaces -------------------------------------------------------------


@dataclass
class SeededWorkspace:
    id: int
    all_view: int
    tokens: list[str]  # one per teammate
    teammates: list[int]
    teams: list[dict[str, Any]]
    pool: list[int]  # closed conversations a write may reopen
    views: list[dict[str, Any]]  # every view (id, filter, group_by, owner_id)


def extra_views(rng: random.Random, teams: Sequence[Any], count: int) -> list[dict[str, Any]]:
    """Custom shared views of the DESIGN §7 shapes, drawn over this workspace's teams, tags
    and channels (so a teammate sees 7 folders + 6 demo views + ``count``)."""
    from livecount.demo.seed import CHANNELS, TAGS

    tags, channels = list(TAGS), list(CHANNELS)

    def eq(f: str, value: Any, op: str = "=") -> dict[str, Any]:
        return {"field": f, "operator": op, "value": value}

    out = []
    for i in range(count):
        state = eq("state", rng.choice(("open", "open", "snoozed", "closed")))
        roll = rng.random()
        if roll < 0.4:
            parts = [state, eq("team_id", rng.choice(teams).id),
                     eq("channel", rng.choice(channels), "!=")]
        elif roll < 0.7:
            parts = [state, eq("tags", rng.choice(tags), "contains"),
                     eq("priority", rng.random() < 0.5)]
        elif roll < 0.9:
            parts = [state, {"operator": "OR", "value": [
                eq("team_id", rng.choice(teams).id), eq("tags", rng.choice(tags), "contains")]}]
        else:
            parts = [state, eq("channel", rng.choice(channels)),
                     eq("custom.seats", rng.randint(1, 100), ">=")]
        out.append({"name": f"custom {i}", "filter": {"operator": "AND", "value": parts}})
    return out


async def seed_world(store_url: str, plan: list[tuple[str, int, int]], extra: int,
                     seed: int) -> list[SeededWorkspace]:
    """One workspace per (name, open conversations, closed pool): the demo's teammates (12),
    teams (3) and views (7 folders, 6 custom, 2 personal) plus ``extra`` custom views, written
    through the Store API; then the conversations, bulk-inserted in one transaction per
    workspace (:func:`bulk_conversations`; the relays count them from their snapshot)."""
    from livecount.demo.seed import conversation_body, seed_workspace
    from livecount.domain import now_us
    from livecount.store import open_store

    rng = random.Random(seed)
    store = open_store(store_url)
    await store.open()
    made = []
    try:
        for ws_name, _, _ in plan:
            demo = await seed_workspace(store, conversations=0, name=ws_name)
            for spec in extra_views(rng, demo.teams, extra):
                await store.create_view(demo.id, spec["name"], spec["filter"], None, None)
            views = await store.list_views(demo.id)
            made.append((demo, views))
    finally:
        await store.close()
    out = []
    now = now_us()
    for (_, opened, closed), (demo, views) in zip(plan, made, strict=True):
        items: list[tuple[int, dict[str, Any], int | None]] = []
        for i in range(opened + closed):
            body = conversation_body(rng, demo.teams, now)
            body.pop("snoozed_until", None)  # nothing may reopen by itself
            body["state"] = "open" if i < opened else "closed"
            if i >= opened:
                body.pop("waiting_since", None)
            items.append((demo.id, body,
                          rng.choice(demo.teammate_ids) if rng.random() < 0.25 else None))
        ids = bulk_conversations(store_url, items, now)
        all_view = next(v.id for v in views if v.name == "All" and v.owner_id is None)
        out.append(SeededWorkspace(
            id=demo.id, all_view=all_view, tokens=[login.token for login in demo.logins],
            teammates=[login.teammate.id for login in demo.logins],
            teams=[{"id": t.id, "member_ids": list(t.member_ids)} for t in demo.teams],
            pool=ids[opened:],
            views=[{"id": v.id, "filter": v.filter, "group_by": v.group_by,
                    "owner_id": v.owner_id, "name": v.name} for v in views]))
    if store_url.startswith("postgres"):
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("ANALYZE")
    return out


def sa_url(store_url: str) -> str:
    return ("postgresql+psycopg://" + store_url.split("://", 1)[1]
            if store_url.startswith("postgres") else store_url)


def bulk_conversations(store_url: str, items: list[tuple[int, dict[str, Any], int | None]],
                       now: int) -> list[int]:
    """Insert conversations ``(workspace, create body, author)`` (validated like the API's
    creates, the same rows) in one transaction, without outbox rows: seeding only, before
    any relay starts (a relay counts them from its snapshot). Their ids, in order."""
    import sqlalchemy as sa

    from livecount import conversations as convs
    from livecount.store.rows import _custom_row
    from livecount.store.schema import (
        conversation_custom,
        conversation_people,
        conversation_tags,
        conversations,
    )

    engine = sa.create_engine(sa_url(store_url))
    try:
        with engine.begin() as conn:
            n = len(items)
            if engine.dialect.name == "postgresql":
                ids = list(conn.scalars(sa.text(
                    "SELECT nextval(pg_get_serial_sequence('conversations', 'id')) "
                    "FROM generate_series(1, :n)"), {"n": n}))
            else:
                top = conn.scalar(sa.select(sa.func.max(conversations.c.id))) or 0
                ids = list(range(top + 1, top + 1 + n))
            main: list[dict[str, Any]] = []
            tags: list[dict[str, Any]] = []
            people: list[dict[str, Any]] = []
            custom: list[dict[str, Any]] = []
            scalars = ("workspace_id", "version", "state", "assignee_id", "team_id",
                       "author_id", "priority", "channel", "created_at", "updated_at",
                       "waiting_since", "snoozed_until")
            for cid, (workspace_id, body, author) in zip(ids, items, strict=True):
                image = convs.new_image(cid, workspace_id,
                                        convs.validate_body(body, patch=False), author, now)
                main.append({"id": cid, **{k: getattr(image, k) for k in scalars}})
                tags += [{"conversation_id": cid, "tag": t} for t in image.tags]
                for f in ("mentions", "unread_by"):
                    people += [{"conversation_id": cid, "field": f, "teammate_id": t}
                               for t in getattr(image, f)]
                custom += [_custom_row(cid, k, v) for k, v in image.custom.items()]
            for table, rows in ((conversations, main), (conversation_tags, tags),
                                (conversation_people, people), (conversation_custom, custom)):
                for lo in range(0, len(rows), 20_000):
                    conn.execute(table.insert(), rows[lo:lo + 20_000])
            return ids
    finally:
        engine.dispose()


def read_commits(store_url: str, after: int) -> list[tuple[int, int, int]]:
    """(position, workspace, committed_at µs) of the conversation entries after ``after``."""
    import sqlalchemy as sa

    engine = sa.create_engine(sa_url(store_url))
    try:
        with engine.connect() as conn:
            return [(int(p), int(w), int(c)) for p, w, c in conn.execute(sa.text(
                "SELECT id, workspace_id, committed_at FROM outbox WHERE id > :p AND "
                "kind = 'conversation' ORDER BY id"), {"p": after})]
    finally:
        engine.dispose()


def outbox_position(store_url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(sa_url(store_url))
    try:
        with engine.connect() as conn:
            return int(conn.scalar(sa.text("SELECT COALESCE(MAX(id), 0) FROM outbox")) or 0)
    finally:
        engine.dispose()


# -- sampling CPU and memory ------------------------------------------------------------------


class Sampler:
    """CPU seconds and RSS of named processes, and of the PostgreSQL backends serving one
    database, every ``period`` s in a thread."""

    def __init__(self, pids: dict[str, int], pg_database: str | None = None,
                 period: float = 0.5) -> None:
        import psutil

        self.processes = {n: psutil.Process(p) for n, p in pids.items()}
        self.pg_database = pg_database
        self.period = period
        self.samples: dict[str, list[tuple[float, float, int]]] = {n: [] for n in pids}
        self.pg: list[tuple[float, dict[int, float]]] = []  # (t, backend pid → cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        conn = None
        if self.pg_database:
            import psycopg

            with contextlib.suppress(Exception):
                conn = psycopg.connect(PG_ADMIN, autocommit=True)
        backends: dict[int, Any] = {}
        try:
            while not self._stop.is_set():
                now = time.time()
                for name, process in self.processes.items():
                    with contextlib.suppress(Exception):
                        cpu = process.cpu_times()
                        self.samples[name].append((now, cpu.user + cpu.system,
                                                   process.memory_info().rss))
                if conn is not None:
                    with contextlib.suppress(Exception):
                        pids = [r[0] for r in conn.execute(
                            "SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (self.pg_database,))]
                        seen: dict[int, float] = {}
                        for pid in pids:
                            with contextlib.suppress(Exception):
                                proc = backends.get(pid) or psutil.Process(pid)
                                backends[pid] = proc
                                times = proc.cpu_times()
                                seen[pid] = times.user + times.system
                        self.pg.append((now, seen))
                self._stop.wait(self.period)
        finally:
            if conn is not None:
                conn.close()

    def cpu(self, name: str, lo: float, hi: float) -> float:
        """Cores used (1.0 = one core) between the first and last sample in [lo, hi]."""
        inside = [s for s in self.samples.get(name, []) if lo <= s[0] <= hi]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def cpu_seconds(self, name: str, lo: float, hi: float) -> float:
        inside = [s for s in self.samples.get(name, []) if lo <= s[0] <= hi]
        return inside[-1][1] - inside[0][1] if len(inside) >= 2 else float("nan")

    def pg_cpu_seconds(self, lo: float, hi: float) -> tuple[float, float]:
        """(CPU seconds of the database's backends over [lo, hi], seconds covered): each
        backend from its first to its last sample inside the window."""
        inside = [s for s in self.pg if lo <= s[0] <= hi]
        if len(inside) < 2:
            return float("nan"), 0.0
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for _, seen in inside:
            for pid, cpu in seen.items():
                first.setdefault(pid, cpu)
                last[pid] = cpu
        return sum(last[p] - first[p] for p in last), inside[-1][0] - inside[0][0]

    def rss(self, name: str) -> int:
        samples = self.samples.get(name) or []
        return samples[-1][2] if samples else 0


# -- the WebSocket clients (in the benchmark's process) ---------------------------------------


class _Message(msgspec.Struct):
    type: str
    seq: int = 0
    epoch: str = ""
    counts: dict[str, Any] = {}


_decode = msgspec.json.Decoder(_Message).decode


@dataclass
class ClientSpec:
    port: int
    path: str  # /api/workspaces/{ws}/ws?token=…
    ws: int  # workspace index in the run (not the id)
    teammate: int  # index of the teammate in the workspace's list
    key: str  # the tracked counter ("All")


class ClientPool:
    """Many WebSocket clients (the raw-asyncio client of ``bench/stream_clients.py``), each
    keeping the full counts it was sent (snapshot, then deltas applied) and, while recording,
    (client, tracked counter value, receive time) for every message that carries it."""

    def __init__(self, specs: list[ClientSpec], host: str = "127.0.0.1") -> None:
        self.host = host
        self.specs = specs
        n = len(specs)
        self.keys = [s.key for s in specs]
        self.clients: list[Any] = [None] * n
        self.counts: list[dict[str, Any] | None] = [None] * n
        self.seq = [0] * n
        self.epoch = [""] * n
        self.value = [-1] * n
        self.recording = False
        self.rec_idx = array.array("i")
        self.rec_val = array.array("q")
        self.rec_t = array.array("d")
        self.errors: dict[str, int] = {}
        self.messages: dict[str, int] = {}
        self.open_count = 0
        self.lost_unexpectedly = 0
        self.close_codes: dict[str, int] = {}

    # called by stream_clients.WsClient
    def note_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def on_message(self, client: Any, payload: bytes, now: float) -> None:
        message = _decode(payload)
        kind = message.type
        self.messages[kind] = self.messages.get(kind, 0) + 1
        i = client.idx
        if kind == "snapshot":
            self.counts[i] = message.counts
            self.seq[i], self.epoch[i] = message.seq, message.epoch
            if not client.ready.done():
                self.open_count += 1
                client.ready.set_result(None)
        elif kind == "delta":
            counts = self.counts[i]
            if counts is None:
                self.note_error("delta before snapshot")
                return
            for key, value in message.counts.items():
                if isinstance(value, dict):
                    groups = counts.get(key)
                    if not isinstance(groups, dict):
                        groups = counts[key] = {}
                    for group, n in value.items():
                        if n:
                            groups[group] = n
                        else:
                            groups.pop(group, None)
                else:
                    counts[key] = value
            self.seq[i], self.epoch[i] = message.seq, message.epoch
        else:
            return
        value = message.counts.get(self.keys[i])
        if value is not None:
            self.value[i] = value
            if self.recording:
                self.rec_idx.append(i)
                self.rec_val.append(value)
                self.rec_t.append(now)

    def on_lost(self, client: Any) -> None:
        if client.ready.done() and not client.ready.exception():
            self.open_count -= 1
            if not client.we_close:
                self.lost_unexpectedly += 1
                code = str(client.close_code or "no close frame")
                self.close_codes[code] = self.close_codes.get(code, 0) + 1

    async def connect(self, concurrency: int = 64, each: float = 30.0,
                      progress: Any = None) -> dict[str, Any]:
        sys.path.insert(0, str(HERE))
        from stream_clients import WsClient

        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            spec = self.specs[i]
            key = base64.b64encode(os.urandom(16))
            request = (f"GET {spec.path} HTTP/1.1\r\nHost: {self.host}:{spec.port}\r\n"
                       "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
                       "\r\n").encode()
            async with limit:
                try:
                    async with asyncio.timeout(each):
                        _, client = await loop.create_connection(
                            lambda: WsClient(self, i, request, key), self.host, spec.port)
                        self.clients[i] = client
                        await client.ready
                except (OSError, TimeoutError, ConnectionError) as exc:
                    failed += 1
                    self.note_error(f"connect: {type(exc).__name__}: {str(exc)[:60]}")
                    client = self.clients[i]
                    if client is not None and client.transport is not None:
                        client.transport.abort()
                if progress is not None:
                    progress()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(self.specs))))
        return {"connected": len(self.specs) - failed, "failed": failed,
                "seconds": time.perf_counter() - started, "errors": dict(self.errors)}

    def mark(self) -> list[int]:
        """Start recording; the tracked value of every client now."""
        self.rec_idx, self.rec_val, self.rec_t = (array.array("i"), array.array("q"),
                                                  array.array("d"))
        self.recording = True
        return list(self.value)

    def stop(self) -> tuple[Any, Any, Any]:
        import numpy as np

        self.recording = False
        return (np.frombuffer(self.rec_idx, np.int32).copy(),
                np.frombuffer(self.rec_val, np.int64).copy(),
                np.frombuffer(self.rec_t, np.float64).copy())

    async def close(self, grace: float = 5.0) -> None:
        live = [c for c in self.clients if c is not None and c.transport is not None]
        for client in live:
            client.close()
        if live:
            await asyncio.wait([c.gone for c in live], timeout=grace)
        for client in live:
            if client.transport is not None:
                client.transport.abort()


# -- analysis ---------------------------------------------------------------------------------


def analyze(records: tuple[Any, Any, Any], ws_of: Sequence[int], start_values: Sequence[int],
            commits: list[list[float]], lo_t: float, hi_t: float) -> dict[str, Any]:
    """Commit → client latency samples: one per (write, client of its workspace).

    Every benchmark write raises its workspace's "All" folder by exactly one and nothing
    else changes it, so after the k-th commit of a workspace (outbox position order) "All"
    is base + k: a client that receives "All" = v has seen writes 1..v − base. Write k's
    latency at a client is the receive time of its first message with "All" ≥ base + k minus
    the write's ``committed_at`` (the store's clock inside the write transaction). Samples
    count for writes committed in [lo_t, hi_t]."""
    import numpy as np

    idx, val, t = records
    ws_of_a = np.asarray(ws_of, np.int64)
    start = np.asarray(start_values, np.int64)
    n_ws = len(commits)
    connected = start >= 0
    bases = np.full(n_ws, -1, np.int64)
    base_mismatch = 0
    for w in range(n_ws):
        values = start[(ws_of_a == w) & connected]
        if len(values):
            uniq, counts = np.unique(values, return_counts=True)
            bases[w] = uniq[np.argmax(counts)]
            base_mismatch += int(len(values) - counts.max())
    arrays = [np.asarray(c, np.float64) for c in commits]
    offsets = np.zeros(n_ws + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in arrays])
    flat = np.concatenate(arrays) if offsets[-1] else np.zeros(0)
    n_commits = np.diff(offsets)
    order = np.lexsort((t, idx))
    idx, val, t = idx[order], val[order], t[order]
    prev = np.empty_like(val)
    if len(val):
        prev[0] = start[idx[0]]
        prev[1:] = val[:-1]
        first = np.ones(len(val), bool)
        first[1:] = idx[1:] != idx[:-1]
        prev[first] = start[idx[first]]
    ws = ws_of_a[idx]
    base = bases[ws]
    lo = np.clip(prev - base, 0, n_commits[ws])
    hi = np.clip(val - base, 0, n_commits[ws])
    beyond = int(np.count_nonzero(val - base > n_commits[ws]))
    span = np.maximum(hi - lo, 0)
    total = int(span.sum())
    rep = np.repeat(np.arange(len(span)), span)
    within = np.arange(total) - np.repeat(np.cumsum(span) - span, span)
    k = lo[rep] + within
    committed = flat[offsets[ws[rep]] + k]
    latency = t[rep] - committed
    keep = (committed >= lo_t) & (committed <= hi_t)
    latency = latency[keep]
    second = np.floor(committed[keep] - lo_t).astype(np.int64)
    in_window = np.array([np.count_nonzero((c >= lo_t) & (c <= hi_t)) for c in arrays],
                         np.int64)
    clients_per_ws = np.bincount(ws_of_a[connected], minlength=n_ws)[:n_ws]
    expected = int((in_window * clients_per_ws).sum())
    out: dict[str, Any] = {
        "writes_in_window": int(in_window.sum()), "window_s": hi_t - lo_t,
        "samples": len(latency), "expected_samples": expected,
        "missing_samples": expected - len(latency), "base_mismatch": base_mismatch,
        "values_beyond_commits": beyond, "negative_latencies": int((latency < 0).sum()),
        "messages_with_all": len(val),
    }
    if len(latency):
        ms = latency * 1000
        for q in (50, 90, 99):
            out[f"p{q}_ms"] = float(np.percentile(ms, q))
        out["p999_ms"] = float(np.percentile(ms, 99.9))
        out["max_ms"] = float(ms.max())
        out["mean_ms"] = float(ms.mean())
        out["histogram_ms"] = [float(x) for x in np.percentile(ms, list(range(0, 101, 2)))]
        out["by_second"] = [
            {"s": int(sec), "n": int(np.count_nonzero(second == sec)),
             "p50_ms": float(np.percentile(ms[second == sec], 50)),
             "p99_ms": float(np.percentile(ms[second == sec], 99))}
            for sec in np.unique(second)]
    return out


# -- the writer (a child process) -------------------------------------------------------------


class _Http:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, method: str, path: str, token: str, body: bytes
                      ) -> tuple[int, bytes]:
        self.writer.write((f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                           f"{token}\r\nContent-Type: application/json\r\nContent-Length: "
                           f"{len(body)}\r\n\r\n").encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


@dataclass
class _WriterWs:
    id: int
    tokens: list[str]
    teams: list[dict[str, Any]]
    pool: list[int]
    members: list[int] = field(default_factory=list)


TAG_CHOICES = ("vip", "billing", "refund", "bug", "integration", "onboarding", "urgent")
CHANNEL_CHOICES = ("chat", "email", "phone", "social")


def _create_body(rng: random.Random, ws: _WriterWs) -> dict[str, Any]:
    team = rng.choice(ws.teams)
    body: dict[str, Any] = {"state": "open", "channel": rng.choice(CHANNEL_CHOICES),
                            "team_id": team["id"]}
    if rng.random() < 0.3:
        body["assignee_id"] = rng.choice(team["member_ids"])
    if rng.random() < 0.15:
        body["priority"] = True
    body["tags"] = rng.sample(TAG_CHOICES, rng.randint(0, 2))
    body["custom"] = {"plan": rng.choice(("free", "pro", "enterprise")),
                      "seats": rng.randint(1, 200)}
    return body


def _reopen_body(rng: random.Random, ws: _WriterWs) -> dict[str, Any]:
    team = rng.choice(ws.teams)
    return {"state": "open", "team_id": team["id"],
            "assignee_id": rng.choice([*team["member_ids"], None]),
            "priority": rng.random() < 0.2, "tags": rng.sample(TAG_CHOICES, rng.randint(0, 3))}


async def _writer(config: dict[str, Any]) -> None:
    """Writes over HTTP on a schedule: write i at ``start + i / rate`` on a random workspace,
    through target ``i mod len(targets)`` (round robin over the gateways), half creates of
    an open conversation, half reopens of a closed one (each raises "All" by one). Open loop
    with a bounded backlog: a write that could not start within ``shed_after`` s of its time
    (every connection of its gateway busy: the servers are saturated) is dropped and
    counted."""
    rng = random.Random(config.get("seed", 1))
    workspaces = [_WriterWs(w["id"], w["tokens"], w["teams"], list(w["pool"]))
                  for w in config["workspaces"]]
    targets = [tuple(t) for t in config["targets"]]
    pools: list[asyncio.Queue[_Http]] = [asyncio.Queue() for _ in targets]

    async def connect(target: int) -> _Http:
        reader, writer = await asyncio.open_connection(*targets[target])
        return _Http(reader, writer)

    async def reconnect_all() -> None:
        """Fresh connections before each run: the servers close idle keep-alive ones."""
        for pool in pools:
            while not pool.empty():
                pool.get_nowait().writer.close()
        for target, pool in enumerate(pools):
            for _ in range(config["connections"]):
                pool.put_nowait(await connect(target))

    async def run(command: dict[str, Any]) -> dict[str, Any]:
        start, rate, duration = command["start"], command["rate"], command["duration"]
        shed_after = command.get("shed_after", 1.0)
        n = int(rate * duration)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        shed = 0
        kinds = {"create": 0, "reopen": 0}

        async def replace(target: int) -> None:
            with contextlib.suppress(OSError):
                pools[target].put_nowait(await connect(target))

        async def write(i: int, due: float) -> None:
            nonlocal shed
            ws = workspaces[rng.randrange(len(workspaces))]
            target = i % len(pools)
            pool = pools[target]
            try:
                async with asyncio.timeout(max(0.0, due + shed_after - time.time())):
                    connection = await pool.get()
            except TimeoutError:
                shed += 1
                return
            reopen = bool(ws.pool) and rng.random() < 0.5
            conversation = ws.pool.pop() if reopen else None
            body = json.dumps(_reopen_body(rng, ws) if reopen else _create_body(rng, ws))
            token = rng.choice(ws.tokens)
            sent = time.time()
            try:
                if conversation is None:
                    status, _ = await connection.request(
                        "POST", f"/api/workspaces/{ws.id}/conversations", token, body.encode())
                else:
                    status, _ = await connection.request(
                        "PATCH", f"/api/workspaces/{ws.id}/conversations/{conversation}",
                        token, body.encode())
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                connection.writer.close()
                await replace(target)  # a fresh connection in its place
                return
            pool.put_nowait(connection)
            if status in (200, 201):
                latencies.append(time.time() - sent)
                kinds["reopen" if reopen else "create"] += 1
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

        tasks: set[asyncio.Task[None]] = set()
        for i in range(n):
            due = start + i / rate
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(write(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=command.get("grace", 15.0))
        unfinished = len(tasks)
        for task in list(tasks):
            task.cancel()
        latencies.sort()

        def pct(q: float) -> float | None:
            return (latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
                    if latencies else None)

        return {"asked": n, "ok": len(latencies), "errors": errors, "shed": shed,
                "unfinished": unfinished, "kinds": kinds, "http_p50_ms": pct(0.5),
                "http_p99_ms": pct(0.99), "finished_at": time.time(),
                "pool_left": sum(len(w.pool) for w in workspaces)}

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        if command["cmd"] == "run":
            await reconnect_all()
            answer = await run(command)
        else:
            answer = {"closed": True}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if command["cmd"] == "close":
            break
    for pool in pools:
        while not pool.empty():
            pool.get_nowait().writer.close()


def main() -> None:
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode != "writer":
        sys.exit(f"unknown mode {mode!r}")
    raise_fd_limit()
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_writer(json.loads(path.read_text())))


if __name__ == "__main__":
    main()

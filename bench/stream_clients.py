"""The client side of the stream benchmark: many WebSocket clients, and the HTTP writer.

Run by ``bench/stream.py`` as child processes (never by hand), on the core the server does not
use. Each child reads its configuration from a JSON file, then JSON-line commands on stdin and
answers each with one JSON line on stdout; it exits when stdin closes (so it never outlives
the benchmark) or when its deadline passes.

``clients``: a minimal WebSocket client on raw asyncio protocols (RFC 6455 handshake, frame
parser, pong, close) — the same code against livecount and the bare ``websockets`` server. It
costs a few KiB and a few microseconds per message, so one process holds 10,000+ connections
and receives faster than one server core sends. For every stream message after ``mark`` it
records (connection, value of the tracked counter, receive wall time): the tracked counter is
the workspace's "All" folder, which every benchmark write raises by exactly one, so a value
says which writes a client has seen (see ``bench/stream.py``).

``writer``: writes on a schedule (open loop: a write starts at its time whether or not the
previous ones finished), half creates of a new open conversation, half patches reopening (and
reassigning, retagging) a closed one — through livecount's Store API from this process (one
transaction: the conversation and its outbox row; the server's relay finds the outbox rows),
or through the HTTP API of the server under test over keep-alive connections. Records each
write's ``updated_at`` (the store's clock inside the write transaction: the commit time) per
workspace.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["main"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def prepare_process(cpus: list[int] | None, idle: bool = False) -> None:
    """Raise the fd limit to the hard limit and pin to ``cpus`` (when given); ``idle``: run
    under SCHED_IDLE (only on cycles no other process wants; threads started later inherit
    it), so a writer allowed on every core never takes one from the server or the clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    if idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# -- the WebSocket clients --------------------------------------------------------------------


class _Message(msgspec.Struct):
    type: str
    seq: int = 0
    counts: dict[str, Any] = {}


_decode = msgspec.json.Decoder(_Message).decode


class WsClient(asyncio.Protocol):
    """One connection. Handshake, then frames; each text message goes to the pool."""

    __slots__ = ("_buf", "_key", "close_code", "gone", "idx", "init", "last", "open", "pool",
                 "ready", "request", "transport", "we_close")

    def __init__(self, pool: Pool, idx: int, request: bytes, key: bytes) -> None:
        self.pool = pool
        self.idx = idx
        self.request = request
        self._key = key
        self._buf = b""
        self.open = False
        self.we_close = False
        self.close_code = 0
        self.init = -1  # the tracked counter in the first snapshot
        self.last = -1  # the tracked counter as last received
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # the first snapshot came
        self.gone: asyncio.Future[None] = loop.create_future()  # the connection is closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            head, data = data[:end], data[end + 4:]
            if not self._handshake_ok(head):
                line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                self._fail(f"handshake: {line[:60]}")
                return
            self.open = True
        n = len(data)
        i = 0
        now = time.time()
        while n - i >= 2:
            b0 = data[i]
            length = data[i + 1] & 0x7F
            head = 2
            if length == 126:
                if n - i < 4:
                    break
                length = int.from_bytes(data[i + 2:i + 4], "big")
                head = 4
            elif length == 127:
                if n - i < 10:
                    break
                length = int.from_bytes(data[i + 2:i + 10], "big")
                head = 10
            if n - i < head + length:
                break
            payload = data[i + head:i + head + length]
            i += head + length
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2:
                self.pool.on_message(self, payload, now)
            elif opcode == 9:
                self._send_frame(0xA, payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.we_close:
                    self._send_frame(0x8, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return
            elif opcode == 0:
                self._fail("fragmented message (not expected from these servers)")
                return
        if i < n:
            self._buf = data[i:]

    def _handshake_ok(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            return False
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-accept":
                return value.strip() == accept
        return False

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _fail(self, reason: str) -> None:
        self.pool.note_error(reason)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Start a clean close (close frame 1000); the server closes the TCP connection."""
        self.we_close = True
        if self.open and self.close_code == 0:
            self._send_frame(0x8, (1000).to_bytes(2, "big"))
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.gone.done():
            self.gone.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before the snapshot ({exc})"))
        self.pool.on_lost(self)


class SseClient(WsClient):
    """One Server-Sent Events connection (``GET …/stream``, chunked): each ``data:`` line of
    an event goes to the pool as a message, like a WebSocket text frame."""

    __slots__ = ("_body",)

    def __init__(self, pool: Pool, idx: int, request: bytes, key: bytes) -> None:
        super().__init__(pool, idx, request, key)
        self._body = b""  # de-chunked bytes not yet split into events

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            head, data = data[:end], data[end + 4:]
            if not head.startswith(b"HTTP/1.1 200"):
                line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                self._fail(f"handshake: {line[:60]}")
                return
            self.open = True
        # the chunked body: <hex size>\r\n<bytes>\r\n … 0\r\n\r\n
        i, n = 0, len(data)
        body = self._body
        while i < n:
            line_end = data.find(b"\r\n", i)
            if line_end < 0:
                break
            size = int(data[i:line_end].split(b";", 1)[0], 16)
            if size == 0:
                if self.transport is not None:
                    self.transport.close()
                return
            start = line_end + 2
            if n - start < size + 2:
                break
            body += data[start:start + size]
            i = start + size + 2
        if i < n:
            self._buf = data[i:]
        now = time.time()
        while (end := body.find(b"\n\n")) >= 0:
            event, body = body[:end], body[end + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    self.pool.on_message(self, line[6:], now)
        self._body = body

    def close(self) -> None:
        self.we_close = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class Spec:
    path: str  # /api/workspaces/{ws}/ws?token=...
    ws: int  # workspace index in the benchmark (not the id)
    key: str  # the tracked counter's key in ``counts`` (the "All" view id)


class Pool:
    """Every connection of this process, and what they received."""

    def __init__(self, host: str, port: int, specs: list[Spec], sources: list[str]) -> None:
        self.host = host
        self.port = port
        self.specs = specs
        self.sources = sources
        self.clients: list[WsClient | None] = [None] * len(specs)
        self.keys = [s.key for s in specs]
        self.recording = False
        self.rec_idx = array.array("i")
        self.rec_val = array.array("q")
        self.rec_t = array.array("d")
        self.errors: dict[str, int] = {}
        self.snapshot_bytes = 0
        self.snapshots = 0
        self.reset()
        self.lost_unexpectedly = 0
        self.close_codes: dict[str, int] = {}
        self.open_count = 0

    def reset(self) -> None:
        self.messages: dict[str, int] = {}
        self.delta_bytes = 0
        self.samples: list[str] = []
        self.rec_idx = array.array("i")
        self.rec_val = array.array("q")
        self.rec_t = array.array("d")
        self.deltas_per_conn = array.array("i", bytes(4 * len(self.specs)))

    def note_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def on_message(self, client: WsClient, payload: bytes, now: float) -> None:
        message = _decode(payload)
        kind = message.type
        self.messages[kind] = self.messages.get(kind, 0) + 1
        value = message.counts.get(self.keys[client.idx])
        if kind == "snapshot":
            self.snapshots += 1
            self.snapshot_bytes += len(payload)
            value = 0 if value is None else value
            if client.init < 0:
                client.init = value
            if not client.ready.done():
                self.open_count += 1
                client.ready.set_result(None)
        elif kind == "delta":
            self.deltas_per_conn[client.idx] += 1
            self.delta_bytes += len(payload)
            if len(self.samples) < 20 and self.recording:
                self.samples.append(payload.decode())
        if value is not None and kind in ("snapshot", "delta"):
            client.last = value
            if self.recording:
                self.rec_idx.append(client.idx)
                self.rec_val.append(value)
                self.rec_t.append(now)

    def on_lost(self, client: WsClient) -> None:
        if client.ready.done() and not client.ready.exception():
            self.open_count -= 1
            if not client.we_close:
                self.lost_unexpectedly += 1
                code = str(client.close_code or "no close frame")
                self.close_codes[code] = self.close_codes.get(code, 0) + 1

    async def connect(self, indices: range, concurrency: int, each: float) -> dict[str, Any]:
        """Open ``indices`` (``concurrency`` handshakes at a time, ``each`` s at most for a
        connection to reach its first snapshot)."""
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            spec = self.specs[i]
            key = base64.b64encode(os.urandom(16))
            sse = "/stream?" in spec.path
            kind = SseClient if sse else WsClient
            if sse:
                request = (f"GET {spec.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           "Accept: text/event-stream\r\n\r\n").encode()
            else:
                request = (f"GET {spec.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key.decode()}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode()
            source = self.sources[i % len(self.sources)]
            async with limit:
                try:
                    async with asyncio.timeout(each):
                        _, client = await loop.create_connection(
                            lambda: kind(self, i, request, key), self.host, self.port,
                            local_addr=(source, 0))
                        self.clients[i] = client
                        await client.ready
                except (OSError, TimeoutError, ConnectionError) as exc:
                    failed += 1
                    self.note_error(f"connect: {type(exc).__name__}: {str(exc)[:60]}")
                    client = self.clients[i]
                    if client is not None and client.transport is not None:
                        client.transport.abort()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in indices))
        return {"connected": len(indices) - failed, "failed": failed,
                "seconds": time.perf_counter() - started, "open": self.open_count,
                "errors": dict(self.errors)}

    async def close_all(self, grace: float) -> int:
        """Close every connection cleanly; abort what is still open after ``grace`` s."""
        live = [c for c in self.clients if c is not None and c.transport is not None]
        for client in live:
            client.close()
        if live:
            await asyncio.wait([c.gone for c in live], timeout=grace)
        left = [c for c in live if c.transport is not None]
        for client in left:
            assert client.transport is not None
            client.transport.abort()
        return len(left)

    def report(self, out: Path) -> dict[str, Any]:
        """Write the records (numpy arrays) to ``out``; a summary for the JSON line."""
        import numpy as np

        inits = np.array([c.init if c is not None else -1 for c in self.clients], np.int64)
        lasts = np.array([c.last if c is not None else -1 for c in self.clients], np.int64)
        np.savez(out, idx=np.frombuffer(self.rec_idx, np.int32).copy(),
                 val=np.frombuffer(self.rec_val, np.int64).copy(),
                 t=np.frombuffer(self.rec_t, np.float64).copy(),
                 ws=np.array([s.ws for s in self.specs], np.int32), init=inits, last=lasts,
                 deltas=np.frombuffer(self.deltas_per_conn, np.int32).copy())
        deltas = self.messages.get("delta", 0)
        return {"messages": dict(self.messages), "records": len(self.rec_idx),
                "delta_bytes_avg": self.delta_bytes / deltas if deltas else 0.0,
                "samples": self.samples[:5], "open": self.open_count,
                "snapshot_bytes_avg": self.snapshot_bytes / max(self.snapshots, 1),
                "lost_unexpectedly": self.lost_unexpectedly, "close_codes": self.close_codes,
                "errors": dict(self.errors)}


async def run_clients(config: dict[str, Any]) -> None:
    specs = [Spec(**s) for s in config["specs"]]
    pool = Pool(config["host"], config["port"], specs, config["sources"])
    done = 0
    async for command in commands(config["deadline"]):
        name = command["cmd"]
        if name == "connect":
            upto = min(len(specs), command.get("upto", len(specs)))
            result = await pool.connect(range(done, upto), command.get("concurrency", 100),
                                        command.get("timeout", 60.0))
            done = upto
            reply(result)
        elif name == "mark":
            pool.reset()
            pool.recording = True
            reply({"ok": True, "t": time.time(), "open": pool.open_count})
        elif name == "status":
            reply({"open": pool.open_count, "lost_unexpectedly": pool.lost_unexpectedly,
                   "messages": dict(pool.messages)})
        elif name == "report":
            pool.recording = False
            reply(pool.report(Path(command["out"])))
        elif name == "close":
            left = await pool.close_all(command.get("timeout", 5.0))
            reply({"closed": True, "aborted": left})
            return
    await pool.close_all(2.0)


# -- the writer -------------------------------------------------------------------------------


@dataclass
class TeamSpec:
    id: int
    member_ids: list[int]


@dataclass
class WorkspaceSpec:
    id: int
    token: str
    teams: list[TeamSpec]
    pool: list[int]  # closed conversations a PATCH may reopen
    author: int  # the teammate a store create names as author (HTTP: the token's)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection (requests one at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, method: str, path: str, token: str, body: bytes
                      ) -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


def _parse_us(stamp: str) -> int:
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


TAGS = ("vip", "billing", "refund", "bug", "integration", "onboarding", "urgent")
CHANNELS = ("chat", "email", "phone", "social")


def _create_body(rng: random.Random, ws: WorkspaceSpec) -> dict[str, Any]:
    team = rng.choice(ws.teams)
    body: dict[str, Any] = {"state": "open", "channel": rng.choice(CHANNELS),
                            "team_id": team.id}
    if rng.random() < 0.3:
        body["assignee_id"] = rng.choice(team.member_ids)
    if rng.random() < 0.15:
        body["priority"] = True
    body["tags"] = rng.sample(TAGS, rng.randint(0, 2))
    body["custom"] = {"plan": rng.choice(("free", "pro", "enterprise")),
                      "seats": rng.randint(1, 200)}
    return body


def _reopen_body(rng: random.Random, ws: WorkspaceSpec) -> dict[str, Any]:
    team = rng.choice(ws.teams)
    return {"state": "open", "team_id": team.id,
            "assignee_id": rng.choice([*team.member_ids, None]),
            "priority": rng.random() < 0.2, "tags": rng.sample(TAGS, rng.randint(0, 3))}


class HttpBackend:
    """Writes through the HTTP API, over keep-alive connections."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port, self.size = host, port, connections
        self.pool: asyncio.Queue[HttpConnection] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.pool.put_nowait(HttpConnection(reader, writer))

    async def close(self) -> None:
        while not self.pool.empty():
            self.pool.get_nowait().writer.close()

    async def write(self, ws: WorkspaceSpec, conversation: int | None, body: dict[str, Any]
                    ) -> int:
        """Create (``conversation`` None) or patch; the written ``updated_at`` (µs)."""
        if conversation is None:
            method, path = "POST", f"/api/workspaces/{ws.id}/conversations"
        else:
            method, path = "PATCH", f"/api/workspaces/{ws.id}/conversations/{conversation}"
        connection = await self.pool.get()
        status, answer = await connection.request(method, path, ws.token,
                                                  json.dumps(body).encode())
        self.pool.put_nowait(connection)  # not on error: a broken connection is dropped
        if status not in (200, 201):
            raise WriteError(str(status))
        return _parse_us(json.loads(answer)["updated_at"])


class StoreBackend:
    """Writes through livecount's Store API (the same calls the HTTP handlers make: one
    transaction with the conversation and its outbox row) from this process."""

    def __init__(self, url: str, concurrency: int) -> None:
        from livecount.store import open_store

        self.store = open_store(url)
        self.limit = asyncio.Semaphore(concurrency)

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    async def write(self, ws: WorkspaceSpec, conversation: int | None, body: dict[str, Any]
                    ) -> int:
        async with self.limit:
            if conversation is None:
                image = await self.store.create_conversation(ws.id, body, ws.author)
            else:
                image = await self.store.update_conversation(ws.id, conversation, body, None)
        return int(image.updated_at)


class WriteError(Exception):
    pass


async def run_writer(config: dict[str, Any]) -> None:
    workspaces = [WorkspaceSpec(id=w["id"], token=w["token"], pool=list(w["pool"]),
                                teams=[TeamSpec(**t) for t in w["teams"]], author=w["author"])
                  for w in config["workspaces"]]
    rng = random.Random(config.get("seed", 1))
    backend: HttpBackend | StoreBackend
    if config.get("store_url"):
        backend = StoreBackend(config["store_url"], config.get("connections", 16))
    else:
        backend = HttpBackend(config["host"], config["port"], config.get("connections", 32))
    await backend.open()
    try:
        async for command in commands(config["deadline"]):
            if command["cmd"] == "run":
                reply(await _write_schedule(command, workspaces, rng, backend))
            elif command["cmd"] == "close":
                reply({"closed": True})
                return
    finally:
        await backend.close()


async def _write_schedule(command: dict[str, Any], workspaces: list[WorkspaceSpec],
                          rng: random.Random, backend: HttpBackend | StoreBackend
                          ) -> dict[str, Any]:
    """Run one schedule: write i starts at ``start + offsets[i]`` on workspace ``targets[i]``."""
    start: float = command["start"]
    offsets: list[float] = command["offsets"]
    targets: list[int] = command["targets"]
    commits: list[list[int]] = [[] for _ in workspaces]
    latencies: list[float] = []
    lags: list[float] = []
    errors: dict[str, int] = {}
    kinds = {"create": 0, "reopen": 0}

    async def write(target: int) -> None:
        ws = workspaces[target]
        reopen = bool(ws.pool) and rng.random() < 0.5
        conversation = ws.pool.pop() if reopen else None
        body = _reopen_body(rng, ws) if reopen else _create_body(rng, ws)
        sent = time.time()
        try:
            updated_at = await backend.write(ws, conversation, body)
        except (OSError, asyncio.IncompleteReadError, WriteError) as exc:
            name = str(exc) if isinstance(exc, WriteError) else type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            return
        except Exception as exc:  # a store error: counted, and the run goes on
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        latencies.append(time.time() - sent)
        kinds["reopen" if reopen else "create"] += 1
        commits[target].append(updated_at)

    tasks: set[asyncio.Task[None]] = set()
    for offset, target in zip(offsets, targets, strict=True):
        delay = start + offset - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lags.append(-delay)
        task = asyncio.create_task(write(target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    finished = time.time()
    if tasks:
        await asyncio.wait(tasks, timeout=command.get("grace", 10.0))
    unfinished = len(tasks)
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"commits": commits, "errors": errors, "kinds": kinds, "written": len(latencies),
            "write_p50": pct(0.5), "write_p99": pct(0.99), "late": len(lags),
            "late_max": max(lags, default=0.0), "unfinished": unfinished,
            "pools": [ws.pool for ws in workspaces],
            "schedule_done_at": finished, "finished_at": time.time()}


# -- plumbing ---------------------------------------------------------------------------------


async def commands(deadline: float) -> Any:
    """JSON commands from stdin until EOF or the deadline (wall time)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            return
        try:
            async with asyncio.timeout(remaining):
                line = await reader.readline()
        except TimeoutError:
            return
        if not line:
            return
        yield json.loads(line)


def main() -> None:
    mode, config_path = sys.argv[1], Path(sys.argv[2])
    config = json.loads(config_path.read_text())
    prepare_process(config.get("cpus"), config.get("sched_idle", False))
    import uvloop

    runner = {"clients": run_clients, "writer": run_writer}[mode]
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(runner(config))


if __name__ == "__main__":
    main()

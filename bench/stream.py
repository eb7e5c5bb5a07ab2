"""The stream benchmark (DESIGN §7): livecount's gateway against a bare ``websockets`` server.

    .venv/bin/python bench/stream.py            # full run (about 7 minutes)
    .venv/bin/python bench/stream.py --quick    # every scenario scaled down (about a minute)
    .venv/bin/python bench/stream.py --profile DIR   # + py-spy of the server, logs kept in DIR

Each scenario runs against livecount (the app ``livecount serve`` runs: ``create_app`` under
uvicorn with the gateway's options, SQLite in a temporary directory) and against a bare server
(the ``websockets`` asyncio server and ``websockets.broadcast()``, compression off), one after
the other, each in a fresh process pinned to one core, both on uvloop (what uvicorn picks).
The clients (``bench/stream_clients.py``: one raw-asyncio WebSocket client, the same code
against both servers) run in another process on the other core.

1. **spread**: 5,000 clients over 100 workspaces (50 each, 12 teammates per workspace), 500
   writes/s. Commit → client latency, deltas delivered per second.
2. **hot**: one workspace, 2,000 clients, 200 writes/s: latency, clients dropped, server RSS.
3. **fan-out**: 5,000 clients of one workspace, both servers pushed to saturation: deltas
   delivered per second.
4. **idle**: memory per idle connected client, then as many clients as the fd limit allows.

Writes: half create an open conversation, half reopen (and reassign, retag) a closed one from
a pool seeded for the purpose, through livecount's Store API — the calls the HTTP handlers
make: the conversation and its outbox row in one transaction — from a separate writer
process, so the server's core does what is measured: relay (outbox → engine → state → bus),
hubs and fan-out. The relay learns of another process's commits by polling the outbox, every
``RELAY_POLL`` = 10 ms here (production's PostgreSQL wakes it with LISTEN/NOTIFY); that adds
5 ms on average. A store write costs ~1.5 ms of CPU, too much to share the clients' core at
500/s, so that writer may use both cores under SCHED_IDLE: it only gets cycles the server and
the clients leave (it is given fewer than it asks when both are busy: the table shows the
commit rate reached). One more run, "spread, writes over HTTP", sends the same writes to the
server's own HTTP API: the embedded single-process deployment, where the write path shares the
core with the fan-out.

Matching a delivery to the commit that caused it: every benchmark write raises the
workspace's "All" folder (``state = open``) by exactly one, and nothing else changes it (no
snoozed conversations are seeded, so nothing reopens by itself). The writer records each
write's ``updated_at``: the store's clock (``time.time_ns``, the clock the clients read) taken
inside the write transaction, with writes serialized by SQLite's write lock, so sorting a
workspace's writes by it gives their commit order, and after the k-th commit "All" is base +
k. A client that receives "All" = v has seen every write k ≤ v − base: the latency of write k
at that client is the receive time of the first message with "All" ≥ base + k minus the
write's commit time. Conflation folds several writes into one message; each of them still
gets its own sample. A write a client never saw is a missing sample (the table counts them).

The bare baseline does the same with the least machinery: a driver in the bare server
replays the very same (time, workspace) schedule; each event raises the workspace's value,
records the time (its "commit") and marks the workspace; a ticker per workspace broadcasts
the latest value (padded to livecount's average delta size) and sleeps ``flush_interval`` —
livecount's conflation, so both send about the same number of messages and the comparison is
of cost, not of semantics. In the fan-out scenario both are pushed to saturation: livecount by
writes on every flush tick (its tick shortened to 10 ms there, so the tick does not cap its
deliveries; 120 writes/s, a normal-priority writer on the clients' core), the bare
server by back-to-back ``broadcast()`` calls (pausing if sampled write buffers pass 64 KiB,
so it never measures its own buffering).

Figures are taken over [start + warmup, end] of each run. The livecount server's runner logs
every garbage collection of 20 ms or more (``gc.callbacks``; the results list those in the
window) and dumps what the GC tracks on SIGUSR1 (with PYTHONTRACEMALLOC set, what grew): a
measurement hook only. Writes bench/results/stream.json and stream.png (stream-quick.* with
--quick).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLIENTS = HERE / "stream_clients.py"
FLUSH_INTERVAL = 0.05
#: The fan-out run's tick: short enough that the deliveries livecount reaches are bounded by
#: its CPU, not by the tick (5,000 clients × 100 ticks/s = 500,000/s possible), as the bare
#: server's back-to-back broadcasts are.
FANOUT_FLUSH = 0.01
RELAY_POLL = 0.01
HEARTBEAT = 15.0
ADMIN_TOKEN = "lc_admin_" + secrets.token_urlsafe(16)


# -- scale ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    spread_workspaces: int = 100
    spread_per_workspace: int = 50
    spread_rate: float = 500.0
    hot_clients: int = 2000
    hot_rate: float = 200.0
    fanout_clients: int = 5000
    fanout_rate: float = 120.0
    idle_clients: int = 10_000
    idle_max: int = 18_000  # the probe of how many one process holds (fd hard limit 20,000)
    duration: float = 30.0  # measured seconds of the spread and hot runs
    fanout_duration: float = 15.0
    warmup: float = 3.0  # seconds at the start of each run left out of the figures
    open_per_workspace: int = 30
    hot_open: int = 300
    settle: float = 2.0  # seconds to let RSS settle, and for the last deliveries to land


FULL = Scale()
QUICK = Scale(spread_workspaces=10, spread_per_workspace=50, spread_rate=50.0, hot_clients=500,
              hot_rate=100.0, fanout_clients=2000, fanout_rate=120.0, idle_clients=1000,
              idle_max=1500, duration=3.5, fanout_duration=3.5, warmup=0.5,
              open_per_workspace=20, hot_open=100, settle=1.0)


# -- child processes --------------------------------------------------------------------------


def prepare_process(cpus: set[int] | None) -> None:
    """Raise RLIMIT_NOFILE to its hard limit, pin to ``cpus``, and die with the parent."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChildError(RuntimeError):
    pass


class Child:
    """A child process; JSON lines to its stdin, one JSON line back per command."""

    def __init__(self, name: str, argv: list[str], log: Path, *, pipe: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self._log_file, stderr=self._log_file,
            start_new_session=True, env=env)
        self._buf = b""
        CHILDREN.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.name}: no answer within {timeout:.0f} s{self.tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise ChildError(f"{self.name} exited ({self.proc.poll()}){self.tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, message: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        self.send(message)
        return self.recv(timeout)

    def tail(self) -> str:
        self._log_file.flush()
        text = self.log.read_text(errors="replace").strip().splitlines()[-15:]
        return ("\n  " + "\n  ".join(text)) if text else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2.0 if self.proc.stdin is not None else 0.0)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log_file.close()
        if self in CHILDREN:
            CHILDREN.remove(self)


CHILDREN: list[Child] = []


def stop_all_children() -> None:
    for child in reversed(list(CHILDREN)):
        with contextlib.suppress(Exception):
            child.stop(timeout=5.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Sampler:
    """RSS and CPU seconds of some processes every ``period`` s, in a thread, while the block
    runs (CPU use over any window comes from two samples)."""

    def __init__(self, pids: dict[str, int], period: float = 0.5) -> None:
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.period = period
        self.samples: dict[str, list[tuple[float, int, float]]] = {n: [] for n in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                with contextlib.suppress(Exception):
                    cpu = process.cpu_times()
                    self.samples[name].append((time.time(), process.memory_info().rss,
                                               cpu.user + cpu.system))
            self._stop.wait(self.period)

    def window(self, name: str, lo: float, hi: float) -> list[tuple[float, int, float]]:
        return [x for x in self.samples[name] if lo <= x[0] <= hi]

    def cpu(self, name: str, lo: float, hi: float) -> float:
        """CPU use (1.0 = one core) between the first and last sample in [lo, hi]."""
        inside = self.window(name, lo, hi)
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0])


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


# -- the world: seeded workspaces -------------------------------------------------------------


@dataclass
class SeededWorkspace:
    id: int
    all_view: int
    tokens: list[str]
    teammates: list[int]
    teams: list[dict[str, Any]]
    pool: list[int]


async def _seed(store_url: str, plan: list[tuple[str, int, int]], seed: int
                ) -> list[SeededWorkspace]:
    """Create one workspace per (name, open conversations, closed pool size) through the store
    (the demo's teammates, teams and views; conversations drawn like the demo's)."""
    from livecount.demo.seed import conversation_body, seed_workspace
    from livecount.domain import now_us
    from livecount.store import open_store

    rng = random.Random(seed)
    store = open_store(store_url)
    await store.open()
    try:
        out = []
        for name, opened, closed in plan:
            demo = await seed_workspace(store, conversations=0, name=name)
            now = now_us()
            bodies = []
            for i in range(opened + closed):
                body = conversation_body(rng, demo.teams, now)
                # nothing may reopen by itself: "All" moves only with the benchmark's writes
                body.pop("snoozed_until", None)
                body["state"] = "open" if i < opened else "closed"
                if i >= opened:
                    body.pop("waiting_since", None)
                bodies.append(body)
            ids = await _create_all(store, demo.id, bodies)
            views = await store.list_views(demo.id)
            all_view = next(v.id for v in views if v.name == "All" and v.owner_id is None)
            out.append(SeededWorkspace(
                id=demo.id, all_view=all_view, tokens=[login.token for login in demo.logins],
                teammates=[login.teammate.id for login in demo.logins],
                teams=[{"id": t.id, "member_ids": list(t.member_ids)} for t in demo.teams],
                pool=ids[opened:]))
        return out
    finally:
        await store.close()


async def _create_all(store: Any, workspace_id: int, bodies: list[dict[str, Any]]) -> list[int]:
    ids = [0] * len(bodies)
    limit = asyncio.Semaphore(8)

    async def create(i: int) -> None:
        async with limit:
            ids[i] = (await store.create_conversation(workspace_id, bodies[i], None)).id

    await asyncio.gather(*(create(i) for i in range(len(bodies))))
    return ids


@dataclass
class World:
    store_url: str
    spread: list[SeededWorkspace]
    hot: SeededWorkspace
    fanout: SeededWorkspace


def seed_world(tmp: Path, scale: Scale) -> World:
    spread_writes = scale.spread_rate * (scale.duration + 2) / scale.spread_workspaces
    spread_pool = int(spread_writes * 1.1) + 5  # two livecount runs (Store, then HTTP)
    hot_pool = int(scale.hot_rate * (scale.duration + 2) * 0.6) + 5
    fanout_pool = int(scale.fanout_rate * (scale.fanout_duration + 2) * 0.6) + 5
    plan = [(f"spread {i}", scale.open_per_workspace, spread_pool)
            for i in range(scale.spread_workspaces)]
    plan += [("hot", scale.hot_open, hot_pool), ("fanout", scale.hot_open, fanout_pool)]
    url = f"sqlite:///{tmp}/livecount.db"
    seeded = asyncio.run(_seed(url, plan, seed=7))
    return World(store_url=url, spread=seeded[:-2], hot=seeded[-2], fanout=seeded[-1])


# -- servers ----------------------------------------------------------------------------------


def _wait_http(port: int, child: Child, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise ChildError(f"{child.name} exited ({child.proc.returncode}){child.tail()}")
        with (contextlib.suppress(OSError),
              urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise ChildError(f"{child.name} did not become healthy{child.tail()}")


class Run:
    """One benchmark run's processes, logs and CPU plan."""

    def __init__(self, tmp: Path, world: World, scale: Scale) -> None:
        self.tmp = tmp
        self.world = world
        self.scale = scale
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        self.all_cpus = cpus
        self.server_cpus = {cpus[0]}
        self.client_cpus = set(cpus[1:]) or {cpus[0]}
        self.shared_core = len(cpus) < 2
        self._launches = 0
        self._source = 10
        self.profile: Path | None = None
        self.server_env: dict[str, str] = {}

    def log(self, name: str) -> Path:
        self._launches += 1
        return (self.profile or self.tmp) / f"{self._launches:02d}-{name}.log"

    def sources(self, count: int) -> list[str]:
        """Fresh 127.0.0.x source addresses (no TIME_WAIT left over from an earlier run)."""
        per = 20_000
        out = []
        for _ in range(max(1, -(-count // per))):
            self._source = self._source + 1 if self._source < 250 else 10
            out.append(f"127.0.0.{self._source}")
        return out

    def livecount(self, flush: float = FLUSH_INTERVAL) -> tuple[Child, int]:
        port = free_port()
        env = dict(os.environ, LIVECOUNT_ADMIN_TOKEN=ADMIN_TOKEN)
        env.update(self.server_env)
        config = {"port": port, "cpus": sorted(self.server_cpus),
                  "store_url": self.world.store_url, "flush_interval": flush}
        path = self.tmp / f"livecount-{port}.json"
        path.write_text(json.dumps(config))
        argv = [sys.executable, str(Path(__file__).resolve()), "_livecount", str(path)]
        child = Child("livecount server", argv, self.log("livecount"), pipe=False, env=env)
        _wait_http(port, child)
        return child, port

    def bare(self, workspaces: list[tuple[int, str]], snapshot_bytes: int) -> tuple[Child, int]:
        port = free_port()
        config = {"port": port, "cpus": sorted(self.server_cpus), "flush": FLUSH_INTERVAL,
                  "workspaces": [{"id": i, "key": k} for i, k in workspaces],
                  "snapshot_bytes": snapshot_bytes, "deadline": time.time() + 900}
        path = self.tmp / f"bare-{port}.json"
        path.write_text(json.dumps(config))
        argv = [sys.executable, str(Path(__file__).resolve()), "_bare", str(path)]
        child = Child("bare server", argv, self.log("bare"))
        child.recv(30.0)  # {"listening": port}
        return child, port

    def clients(self, port: int, specs: list[dict[str, Any]]) -> Child:
        config = {"host": "127.0.0.1", "port": port, "specs": specs,
                  "sources": self.sources(len(specs)), "cpus": sorted(self.client_cpus),
                  "deadline": time.time() + 900}
        path = self.tmp / f"clients-{self._launches}.json"
        path.write_text(json.dumps(config))
        return Child("clients", [sys.executable, str(CLIENTS), "clients", str(path)],
                     self.log("clients"))

    def writer(self, port: int, workspaces: list[SeededWorkspace], http: bool,
               idle: bool = True) -> Child:
        """Writes over HTTP to the server under test (``http``), or through the Store API
        from the writer's own process (the server's relay finds them in the outbox).

        Store writes cost ~1.5 ms of CPU each: too much to share the clients' core at 500/s.
        So by default (``idle``) the Store writer may use every core but runs under
        SCHED_IDLE: it gets only the cycles neither the server nor the clients want, and never
        delays them. When both cores are saturated (fan-out) it would starve: there it runs
        at normal priority on the clients' core instead."""
        sched_idle = idle and not http
        config = {"host": "127.0.0.1", "port": port,
                  "cpus": self.all_cpus if sched_idle else sorted(self.client_cpus),
                  "sched_idle": sched_idle,
                  "connections": 48 if http else 16, "seed": 3, "deadline": time.time() + 900,
                  "store_url": None if http else self.world.store_url,
                  "workspaces": [{"id": w.id, "token": w.tokens[0], "author": w.teammates[0],
                                  "teams": w.teams, "pool": w.pool} for w in workspaces]}
        path = self.tmp / f"writer-{self._launches}.json"
        path.write_text(json.dumps(config))
        return Child("writer", [sys.executable, str(CLIENTS), "writer", str(path)],
                     self.log("writer"))


def client_specs(workspaces: list[SeededWorkspace], per_workspace: int,
                 index: list[int] | None = None, transport: str = "ws"
                 ) -> list[dict[str, Any]]:
    """``per_workspace`` clients per workspace, the workspace's teammates in turn
    (``transport``: "ws", or "stream" for Server-Sent Events)."""
    specs = []
    for n, ws in enumerate(workspaces):
        for j in range(per_workspace):
            token = ws.tokens[j % len(ws.tokens)]
            specs.append({"path": f"/api/workspaces/{ws.id}/{transport}?token={token}",
                          "ws": index[n] if index else n, "key": str(ws.all_view)})
    return specs


# -- analysis ---------------------------------------------------------------------------------


def analyze(npz: Path, commits: list[list[float]], start: float, end: float,
            warmup: float) -> dict[str, Any]:
    """Latency samples (one per write per client of its workspace) and delivery rates within
    the window [start + warmup, end] (see the module docstring for the matching)."""
    import numpy as np

    data = np.load(npz)
    idx, val, t = data["idx"], data["val"], data["t"]
    ws_of, init = data["ws"], data["init"]
    lo_t, hi_t = start + warmup, end
    window = hi_t - lo_t
    if not any(commits):  # nothing to match (bare fan-out): deliveries only
        delivered = int(np.count_nonzero((t >= lo_t) & (t <= hi_t)))
        return {"writes": 0, "writes_in_window": 0, "window_s": window,
                "deliveries": delivered, "deliveries_per_s": delivered / window,
                "write_deliveries_per_s": 0.0, "missing_write_deliveries": 0}
    connected = init >= 0
    # the base of each workspace: the value every client had in its snapshot
    bases = np.full(len(commits), -1, np.int64)
    base_mismatch = 0
    for w in range(len(commits)):
        inits = init[(ws_of == w) & connected]
        if len(inits):
            values, counts = np.unique(inits, return_counts=True)
            bases[w] = values[np.argmax(counts)]
            base_mismatch += int(len(inits) - counts.max())
    sorted_commits = [np.sort(np.asarray(c, np.float64)) for c in commits]
    offsets = np.zeros(len(commits) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in sorted_commits])
    flat = np.concatenate(sorted_commits) if offsets[-1] else np.zeros(0)
    n_commits = np.diff(offsets)

    deliveries = int(np.count_nonzero((t >= lo_t) & (t <= hi_t)))
    keep = val >= 0
    idx, val, t = idx[keep], val[keep], t[keep]
    order = np.lexsort((t, idx))
    idx, val, t = idx[order], val[order], t[order]
    prev = np.empty_like(val)
    if len(val):
        prev[0] = init[idx[0]]
        prev[1:] = val[:-1]
        first = np.ones(len(val), bool)
        first[1:] = idx[1:] != idx[:-1]
        prev[first] = init[idx[first]]
    ws = ws_of[idx]
    base = bases[ws]
    lo = np.maximum(prev - base, 0)
    hi = np.minimum(val - base, n_commits[ws])
    beyond = int(np.count_nonzero(val - base > n_commits[ws]))
    span = np.maximum(hi - lo, 0)
    total = int(span.sum())
    rep = np.repeat(np.arange(len(span)), span)
    within = np.arange(total) - np.repeat(np.cumsum(span) - span, span)
    k = lo[rep] + within  # 0-based index of the write in its workspace's commit order
    committed = flat[offsets[ws[rep]] + k]
    latency = t[rep] - committed
    in_window = (committed >= lo_t) & (committed <= hi_t)
    latency = latency[in_window]
    # every client of a workspace should see each of its writes of the window once
    writes_in_window = np.array([np.count_nonzero((c >= lo_t) & (c <= hi_t))
                                 for c in sorted_commits], np.int64)
    clients_per_ws = np.bincount(ws_of[connected], minlength=len(commits))
    expected = int((writes_in_window * clients_per_ws[: len(commits)]).sum())
    last = data["last"]
    short = int(np.count_nonzero(connected & (last - bases[ws_of] < n_commits[ws_of])))
    result: dict[str, Any] = {
        "writes": int(offsets[-1]), "writes_in_window": int(writes_in_window.sum()),
        "window_s": window, "deliveries": deliveries, "deliveries_per_s": deliveries / window,
        "write_deliveries_per_s": len(latency) / window, "expected_write_deliveries":
        expected, "missing_write_deliveries": expected - len(latency),
        "clients_short_at_end": short, "base_mismatch": base_mismatch,
        "values_beyond_commits": beyond, "negative_latencies": int((latency < 0).sum()),
    }
    if len(latency):
        ms = latency * 1000
        result.update({f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)})
        result["p999_ms"] = float(np.percentile(ms, 99.9))
        result["max_ms"] = float(ms.max())
        result["mean_ms"] = float(ms.mean())
    return result


# -- scenarios --------------------------------------------------------------------------------


def schedule(rate: float, duration: float, workspaces: int, seed: int
             ) -> tuple[list[float], list[int]]:
    """Evenly spaced writes at ``rate`` for ``duration``, each on a random workspace."""
    rng = random.Random(seed)
    n = int(rate * duration)
    return [i / rate for i in range(n)], [rng.randrange(workspaces) for _ in range(n)]


def connect(clients: Child, total: int, say: Any) -> dict[str, Any]:
    answer = clients.call({"cmd": "connect", "concurrency": 64, "timeout": 20.0},
                          timeout=max(300.0, total / 20))
    say(f"    {answer['connected']:,}/{total:,} connected in {answer['seconds']:.1f} s"
        + (f", errors {answer['errors']}" if answer["errors"] else ""))
    return answer


def measured_run(run: Run, server: Child, clients: Child, drive: Any, duration: float,
                 warmup: float, tag: str, writer: Child | None = None) -> dict[str, Any]:
    """Mark the clients, ``drive(start)`` the load, wait for the tail, collect the records.
    RSS and CPU figures are over the measured window [start + warmup, start + duration]."""
    mark = clients.call({"cmd": "mark"})
    start = time.time() + 0.5
    lo, hi = start + warmup, start + duration
    profiler = None
    if run.profile is not None and "livecount" in tag:
        profiler = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(server.pid),
             "-d", str(int(duration)), "-r", "200", "-f", "raw", "--gil", "--threads",
             "--nonblocking", "-o", str(run.profile / f"{tag}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids = {"server": server.pid, "clients": clients.pid}
    if writer is not None:
        pids["writer"] = writer.pid
    with Sampler(pids, period=0.25) as sampler:
        driven = drive(start)
        # the last deliveries: of the window's writes, and of any the writer finished later
        time.sleep(max(hi + run.scale.settle - time.time(), run.scale.settle))
    if profiler is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(30)
        if profiler.poll() is None:
            profiler.kill()
            profiler.wait()
    npz = run.tmp / f"{tag}.npz"
    report = clients.call({"cmd": "report", "out": str(npz)}, timeout=120)
    window = sampler.window("server", lo, hi)
    return {"start": start, "end": hi, "npz": npz, "driven": driven, "report": report,
            "mark": mark, "rss": [(t, r) for t, r, _ in sampler.samples["server"]],
            "rss_window": (window[0][1], window[-1][1]) if window else (0, 0),
            "server_cpu": sampler.cpu("server", lo, hi),
            "clients_cpu": sampler.cpu("clients", lo, hi),
            "writer_cpu": sampler.cpu("writer", lo, hi) if writer is not None else 0.0}


def livecount_latency(run: Run, name: str, workspaces: list[SeededWorkspace],
                      per_workspace: int, rate: float, http: bool, say: Any) -> dict[str, Any]:
    """Clients on livecount while the writer runs the schedule; the analysed records."""
    scale = run.scale
    offsets, targets = schedule(rate, scale.duration, len(workspaces), seed=11)
    specs = client_specs(workspaces, per_workspace)
    how = "over HTTP to the same process" if http else "through the Store, another process"
    say(f"  {name}: livecount, {len(specs):,} clients, {rate:g} writes/s ({how})")
    server, port = run.livecount()
    try:
        writer = run.writer(port, workspaces, http)
        clients = run.clients(port, specs)
        connected = connect(clients, len(specs), say)

        def drive_writes(start: float) -> dict[str, Any]:
            return writer.call({"cmd": "run", "start": start, "offsets": offsets,
                                "targets": targets, "grace": 10.0},
                               timeout=scale.duration + 60)

        m = measured_run(run, server, clients, drive_writes, scale.duration, scale.warmup,
                         f"{name}-livecount{'-http' if http else ''}", writer)
        clients.call({"cmd": "close"}, timeout=60)
        writer.call({"cmd": "close"})
    finally:
        stop_all_children()
    driven = m["driven"]
    for ws, pool in zip(workspaces, driven["pools"], strict=True):
        ws.pool = pool  # what is left for the next run (a reopened one is open now)
    commits = [[us / 1e6 for us in c] for c in driven["commits"]]
    lc = analyze(m["npz"], commits, m["start"], m["end"], scale.warmup)
    lc.update(_common(m, connected))
    lc.update(gc_pauses(server.log, m["start"] + scale.warmup, m["end"]))
    lc["writer"] = {k: driven[k] for k in ("errors", "kinds", "written", "write_p50",
                                            "write_p99", "late", "late_max", "unfinished")}
    lc["writer"]["via"] = "http" if http else "store"
    lc["writer"]["asked"] = len(offsets)
    lc["commits_per_s"] = lc["writes_in_window"] / lc["window_s"]
    say(f"    p50 {lc.get('p50_ms', 0):.1f} ms  p99 {lc.get('p99_ms', 0):.1f} ms  "
        f"{lc['deliveries_per_s']:,.0f} deltas/s  {lc['commits_per_s']:.0f} commits/s  "
        f"CPU: server {lc['server_cpu']:.0%}, clients {lc['clients_cpu']:.0%}, writer "
        f"{lc['writer_cpu']:.0%}; {lc['gc_full_count']} full GC pauses, longest "
        f"{lc['gc_full_max_ms']:.0f} ms")
    return lc


def bare_latency(run: Run, name: str, workspaces: list[SeededWorkspace], per_workspace: int,
                 rate: float, delta_bytes: float, snapshot_bytes: float, say: Any
                 ) -> dict[str, Any]:
    """The same clients and schedule on the bare server (conflated like livecount)."""
    scale = run.scale
    offsets, targets = schedule(rate, scale.duration, len(workspaces), seed=11)
    specs = client_specs(workspaces, per_workspace)
    say(f"  {name}: bare websockets, same clients and schedule")
    keys = [(w.id, str(w.all_view)) for w in workspaces]
    server, port = run.bare(keys, int(snapshot_bytes) or 600)
    try:
        clients = run.clients(port, specs)
        connected = connect(clients, len(specs), say)
        size = int(delta_bytes) or 120

        def drive_bare(start: float) -> dict[str, Any]:
            return server.call({"cmd": "schedule", "start": start, "offsets": offsets,
                                "targets": targets, "size": size},
                               timeout=scale.duration + 90)

        m = measured_run(run, server, clients, drive_bare, scale.duration, scale.warmup,
                         f"{name}-bare")
        clients.call({"cmd": "close"}, timeout=60)
    finally:
        stop_all_children()
    bare = analyze(m["npz"], m["driven"]["commits"], m["start"], m["end"], scale.warmup)
    bare.update(_common(m, connected))
    bare.update(gc_pauses(server.log, m["start"] + scale.warmup, m["end"]))
    say(f"    p50 {bare.get('p50_ms', 0):.1f} ms  p99 {bare.get('p99_ms', 0):.1f} ms  "
        f"{bare['deliveries_per_s']:,.0f} deltas/s  server CPU {bare['server_cpu']:.0%}")
    return bare


def latency_pair(run: Run, name: str, workspaces: list[SeededWorkspace], per_workspace: int,
                 rate: float, say: Any) -> dict[str, Any]:
    """Livecount then the bare server, same clients, same write schedule."""
    lc = livecount_latency(run, name, workspaces, per_workspace, rate, False, say)
    bare = bare_latency(run, name, workspaces, per_workspace, rate, lc["delta_bytes_avg"],
                        lc["snapshot_bytes_avg"], say)
    return {"clients": lc["connected"], "workspaces": len(workspaces), "writes_per_s": rate,
            "duration_s": run.scale.duration, "livecount": lc, "bare": bare,
            "deliveries_ratio": lc["deliveries_per_s"] / max(bare["deliveries_per_s"], 1e-9)}


def gc_pauses(log: Path, lo: float, hi: float) -> dict[str, Any]:
    """The garbage collections of 20 ms or more the server logged within [lo, hi]."""
    pauses = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("gc: generation "):
                continue
            words = line.split()
            at, ms, generation = float(words[7]), float(words[4]), int(words[2])
            if lo <= at <= hi:
                pauses.append((round(at - lo, 2), generation, ms))
    full = [ms for _, g, ms in pauses if g == 2]
    return {"gc_pauses": pauses, "gc_full_count": len(full),
            "gc_full_max_ms": max(full, default=0.0),
            "gc_paused_ms": sum(ms for _, _, ms in pauses)}


def _common(m: dict[str, Any], connected: dict[str, Any]) -> dict[str, Any]:
    report = m["report"]
    rss0, rss1 = m["rss_window"]
    return {"connected": connected["connected"], "connect_failed": connected["failed"],
            "connect_s": connected["seconds"], "dropped": report["lost_unexpectedly"],
            "close_codes": report["close_codes"], "open_at_end": report["open"],
            "messages": report["messages"], "delta_bytes_avg": report["delta_bytes_avg"],
            "snapshot_bytes_avg": report["snapshot_bytes_avg"],
            "sample_delta": (report["samples"] or [None])[0],
            "server_cpu": m["server_cpu"], "clients_cpu": m["clients_cpu"],
            "writer_cpu": m["writer_cpu"],
            "rss_start_mib": rss0 / 2**20, "rss_end_mib": rss1 / 2**20,
            "rss_growth": (rss1 - rss0) / rss0 if rss0 else 0.0,
            "rss_series": [(round(t - m["start"], 2), round(r / 2**20, 1))
                           for t, r in m["rss"]]}


def fanout(run: Run, say: Any) -> dict[str, Any]:
    """Both servers at saturation: deltas delivered per second to the same clients."""
    scale = run.scale
    ws = run.world.fanout
    specs = client_specs([ws], scale.fanout_clients)
    duration = scale.fanout_duration
    out: dict[str, Any] = {"clients": len(specs), "duration_s": duration,
                           "livecount_writes_per_s": scale.fanout_rate}
    offsets, targets = schedule(scale.fanout_rate, duration, 1, seed=13)

    say(f"  fan-out: livecount, {len(specs):,} clients of one workspace, "
        f"{scale.fanout_rate:g} writes/s (a change on every {FANOUT_FLUSH * 1000:.0f} ms tick)")
    server, port = run.livecount(flush=FANOUT_FLUSH)
    try:
        writer = run.writer(port, [ws], http=False, idle=False)
        clients = run.clients(port, specs)
        connected = connect(clients, len(specs), say)

        def drive_writes(start: float) -> dict[str, Any]:
            return writer.call({"cmd": "run", "start": start, "offsets": offsets,
                                "targets": targets, "grace": 10.0}, timeout=duration + 60)

        m = measured_run(run, server, clients, drive_writes, duration, scale.warmup,
                         "fanout-livecount", writer)
        clients.call({"cmd": "close"}, timeout=60)
        writer.call({"cmd": "close"})
    finally:
        stop_all_children()
    ws.pool = m["driven"]["pools"][0]
    commits = [[us / 1e6 for us in c] for c in m["driven"]["commits"]]
    lc = analyze(m["npz"], commits, m["start"], m["end"], scale.warmup)
    lc.update(_common(m, connected))
    lc.update(gc_pauses(server.log, m["start"] + scale.warmup, m["end"]))
    lc["writer"] = {k: m["driven"][k] for k in ("errors", "written", "write_p50", "write_p99",
                                                 "late", "unfinished")}
    lc["commits_per_s"] = lc["writes_in_window"] / lc["window_s"]
    out["livecount"] = lc
    say(f"    {lc['deliveries_per_s']:,.0f} deltas/s (server CPU {lc['server_cpu']:.0%}, "
        f"clients CPU {lc['clients_cpu']:.0%}), p99 {lc.get('p99_ms', 0):.0f} ms")

    say("  fan-out: bare websockets.broadcast(), back to back")
    server, port = run.bare([(ws.id, str(ws.all_view))], 600)
    try:
        clients = run.clients(port, specs)
        connected = connect(clients, len(specs), say)
        size = int(lc["delta_bytes_avg"]) or 120

        def drive_bare(start: float) -> dict[str, Any]:
            return server.call({"cmd": "saturate", "start": start, "duration": duration,
                                "workspace": ws.id, "size": size}, timeout=duration + 90)

        m = measured_run(run, server, clients, drive_bare, duration, scale.warmup,
                         "fanout-bare")
        clients.call({"cmd": "close"}, timeout=60)
    finally:
        stop_all_children()
    bare = analyze(m["npz"], [[]], m["start"], m["end"], scale.warmup)
    bare.update(_common(m, connected))
    bare.update(gc_pauses(server.log, m["start"] + scale.warmup, m["end"]))
    bare["server_sent_per_s"] = m["driven"]["sent"] / m["driven"]["seconds"]
    bare["backpressure_paused_s"] = m["driven"]["paused"]
    out["bare"] = bare
    say(f"    {bare['deliveries_per_s']:,.0f} deltas/s (server CPU {bare['server_cpu']:.0%}, "
        f"clients CPU {bare['clients_cpu']:.0%}; server sent "
        f"{bare['server_sent_per_s']:,.0f}/s, paused on full buffers "
        f"{bare['backpressure_paused_s']:.1f} s)")
    out["ratio"] = lc["deliveries_per_s"] / max(bare["deliveries_per_s"], 1e-9)
    return out


def idle(run: Run, say: Any) -> dict[str, Any]:
    """Memory per idle client: RSS after N more clients minus before, over N; then more
    clients, up to what the fd limit allows, to see how many one process holds."""
    scale = run.scale
    spread = run.world.spread
    per = max(1, scale.idle_clients // len(spread))
    out: dict[str, Any] = {"compression": "off on both (permessage-deflate not negotiated)"}
    for name in ("livecount", "bare", "livecount_sse"):
        transport = "stream" if name == "livecount_sse" else "ws"
        warm = client_specs(spread, 1, transport=transport)
        measured = client_specs(spread, per, transport=transport)
        extra_per = max(0, (scale.idle_max - len(warm) - len(measured)) // len(spread))
        specs = warm + measured + client_specs(spread, extra_per, transport=transport)
        n = len(measured)
        out.update({"clients": n, "probe": len(specs) - len(warm)})
        say(f"  idle: {name}, {n:,} {'SSE' if transport == 'stream' else 'WebSocket'} clients "
            f"(after {len(warm)} warm-up clients, one per workspace)")
        if name != "bare":
            server, port = run.livecount()
        else:
            server, port = run.bare([(w.id, str(w.all_view)) for w in spread], 600)
        try:
            clients = run.clients(port, specs)
            first = clients.call({"cmd": "connect", "upto": len(warm), "concurrency": 32})
            time.sleep(scale.settle)
            before = rss(server.pid)
            answer = clients.call({"cmd": "connect", "upto": len(warm) + n, "concurrency": 64,
                                   "timeout": 20.0}, timeout=600)
            time.sleep(scale.settle * 1.5)
            after = rss(server.pid)
            say(f"    {answer['connected']:,}/{n:,} connected in {answer['seconds']:.1f} s: "
                f"{(after - before) / max(answer['connected'], 1) / 1024:.1f} KiB each "
                f"(RSS {before / 2**20:.0f} → {after / 2**20:.0f} MiB)")
            probe = clients.call({"cmd": "connect", "concurrency": 64, "timeout": 20.0},
                                 timeout=600)
            time.sleep(scale.settle * 1.5)  # still held a little later?
            status = clients.call({"cmd": "status"})
            peak = rss(server.pid)
            fds = _fds(server.pid)
            clients.call({"cmd": "close"}, timeout=60)
        finally:
            stop_all_children()
        held = status["open"] - first["connected"]
        per_client = (after - before) / max(answer["connected"], 1)
        out[name] = {"connected": answer["connected"], "failed": answer["failed"],
                     "connect_s": answer["seconds"], "held": held,
                     "probe_failed": probe["failed"], "probe_errors": probe["errors"],
                     "dropped": status["lost_unexpectedly"],
                     "rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
                     "rss_peak_mib": peak / 2**20, "per_client_kib": per_client / 1024,
                     "server_fds": fds}
        say(f"    held {held:,} of {len(specs) - len(warm):,} at once (RSS {peak / 2**20:.0f} "
            f"MiB, {fds:,} fds; the fd hard limit here is {_fd_limit():,})")
    out["ratio"] = out["livecount"]["per_client_kib"] / max(out["bare"]["per_client_kib"], 1e-9)
    out["sse_ratio"] = (out["livecount_sse"]["per_client_kib"]
                        / max(out["bare"]["per_client_kib"], 1e-9))
    return out


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _fds(pid: int) -> int:
    import psutil

    with contextlib.suppress(Exception):
        return int(psutil.Process(pid).num_fds())
    return -1


# -- the bare server (a child mode of this script) --------------------------------------------


def _filler(size: int, head: str) -> str:
    """Extra counters so a message reaches ``size`` bytes (livecount's average)."""
    parts = []
    n = 0
    while len(head) + sum(len(p) for p in parts) + 3 < size:
        parts.append(f',"{90000 + n}":{(n * 37) % 500}')
        n += 1
    return "".join(parts)


async def _bare_main(config: dict[str, Any]) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    sys.path.insert(0, str(HERE))
    from stream_clients import commands, reply

    flush: float = config["flush"]
    keys = {w["id"]: w["key"] for w in config["workspaces"]}
    groups: dict[int, set[ServerConnection]] = {w: set() for w in keys}
    values = dict.fromkeys(keys, 1000)
    snapshots = {}
    for w, key in keys.items():
        head = f'{{"type":"snapshot","seq":0,"counts":{{"{key}":{values[w]}'
        snapshots[w] = head + _filler(config["snapshot_bytes"], head) + "}}"

    async def handler(conn: ServerConnection) -> None:
        path = conn.request.path if conn.request is not None else ""
        parts = path.split("/")
        ws = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else -1
        group = groups.get(ws)
        if group is None:
            await conn.close(4404, "unknown workspace")
            return
        group.add(conn)
        try:
            await conn.send(snapshots[ws])
            await conn.wait_closed()
        finally:
            group.discard(conn)

    seqs = dict.fromkeys(keys, 0)

    def payload(ws: int, size: int) -> str:
        seqs[ws] += 1
        head = f'{{"type":"delta","seq":{seqs[ws]},"counts":{{"{keys[ws]}":{values[ws]}'
        return head + _filler(size, head) + "}}"

    async def run_schedule(command: dict[str, Any]) -> dict[str, Any]:
        """The same schedule as the livecount writer; conflated like livecount's hubs."""
        size = command["size"]
        order = list(keys)
        times: list[list[float]] = [[] for _ in order]
        dirty = {w: asyncio.Event() for w in order}

        async def ticker(ws: int) -> None:
            while True:
                await dirty[ws].wait()
                dirty[ws].clear()
                broadcast(groups[ws], payload(ws, size))
                await asyncio.sleep(flush)

        async with asyncio.TaskGroup() as tg:
            tickers = [tg.create_task(ticker(w)) for w in order]
            start = command["start"]
            for offset, target in zip(command["offsets"], command["targets"], strict=True):
                delay = start + offset - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                ws = order[target]
                values[ws] += 1
                times[target].append(time.time())
                dirty[ws].set()
            await asyncio.sleep(1.0)
            for task in tickers:
                task.cancel()
        return {"commits": times}

    async def saturate(command: dict[str, Any]) -> dict[str, Any]:
        ws, size = command["workspace"], command["size"]
        conns = groups[ws]
        delay = command["start"] - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sample = list(conns)[:50]
        sent = 0
        paused = 0.0
        began = time.perf_counter()
        end = command["start"] + command["duration"]
        while time.time() < end:
            values[ws] += 1
            broadcast(conns, payload(ws, size))
            sent += len(conns)
            await asyncio.sleep(0)
            t0 = time.perf_counter()
            for _ in range(int(command["duration"] * 1000)):  # wait for the sample to drain
                if (time.time() >= end
                        or all(c.transport.get_write_buffer_size() <= 65536 for c in sample)):
                    break
                await asyncio.sleep(0.001)
            paused += time.perf_counter() - t0
        return {"sent": sent, "seconds": time.perf_counter() - began, "paused": paused}

    _watch_gc()
    async with serve(handler, "127.0.0.1", config["port"], compression=None,
                     ping_interval=HEARTBEAT, ping_timeout=HEARTBEAT, max_size=64 * 1024,
                     backlog=4096):
        reply({"listening": config["port"]})
        async for command in commands(config["deadline"]):
            if command["cmd"] == "schedule":
                reply(await run_schedule(command))
            elif command["cmd"] == "saturate":
                reply(await saturate(command))


def _watch_gc() -> None:
    """Log every garbage collection that stops the process for 20 ms or more (stderr, the
    server's log): a measurement hook, it changes nothing the server does."""
    import gc

    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took >= 0.02:
            print(f"gc: generation {info['generation']} took {took * 1000:.0f} ms at "
                  f"{time.time():.3f} ({info['collected']} collected)", file=sys.stderr,
                  flush=True)

    gc.callbacks.append(callback)

    def census(*_: object) -> None:
        from collections import Counter

        def name(o: object) -> str:
            kind = type(o).__qualname__
            if kind in ("coroutine", "function", "method", "generator", "cell"):
                inner = o
                if kind == "cell":
                    try:
                        inner = o.cell_contents  # type: ignore[attr-defined]
                    except ValueError:
                        return "cell:empty"
                return f"{kind}:{getattr(inner, '__qualname__', type(inner).__qualname__)}"
            return kind

        objects = gc.get_objects()
        kinds = Counter(name(o) for o in objects)
        print(f"census: {len(objects)} objects tracked by the GC; "
              + ", ".join(f"{k} {n}" for k, n in kinds.most_common(90)), file=sys.stderr,
              flush=True)
        del objects
        import tracemalloc

        if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=N: what grew since the last census
            snapshot = tracemalloc.take_snapshot()
            if snapshots:
                stats = snapshot.compare_to(snapshots[-1], "lineno")
                total = sum(stat.size_diff for stat in stats)
                print(f"tracemalloc: {total / 2**20:.1f} MiB more; "
                      + "; ".join(f"{stat.size_diff / 1024:.0f} KiB {stat.count_diff:+d} "
                                  f"{stat.traceback[0].filename.split('site-packages/')[-1]}"
                                  f":{stat.traceback[0].lineno}" for stat in stats[:45]),
                      file=sys.stderr, flush=True)
            snapshots[:] = [snapshot]

    snapshots: list[Any] = []

    signal.signal(signal.SIGUSR1, census)  # kill -USR1 <server pid>: what the GC traverses


def _serve_livecount(config: dict[str, Any]) -> None:
    """``livecount serve`` (what :func:`livecount.cli._serve` does), with the relay polling the
    outbox every ``RELAY_POLL`` s: writes committed by another process have no in-process
    commit callback to wake it (PostgreSQL's LISTEN/NOTIFY plays that part in production)."""
    import uvicorn

    from livecount.server.app import Server, create_app, server_options
    from livecount.service import Settings

    _watch_gc()
    # the benchmark's clients share a few tokens: no per-token stream cap here
    settings = Settings(store_url=config["store_url"],
                        flush_interval=config.get("flush_interval", FLUSH_INTERVAL),
                        max_streams_per_token=0,
                        relay_poll_interval=RELAY_POLL)
    app = create_app(settings)
    uvicorn_config = uvicorn.Config(app, host="127.0.0.1", port=config["port"], lifespan="on",
                                    log_level="warning", timeout_graceful_shutdown=10,
                                    **server_options(settings))
    Server(uvicorn_config, app, tune_gc=True).run()


def _child_main(argv: list[str]) -> None:
    config = json.loads(Path(argv[1]).read_text())
    prepare_process(set(config["cpus"]))
    if argv[0] == "_livecount":
        _serve_livecount(config)
        return
    import uvloop  # what uvicorn runs livecount on: the same loop for the baseline

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_bare_main(config))


# -- report -----------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:{spec}}{unit}"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: (scenario, figure, livecount, bare, ratio, target, met)."""
    s, sh, h, f, i = (results[k] for k in ("spread", "spread_http", "hot", "fanout", "idle"))
    out = []

    def add(scenario: str, figure: str, lc: str, bare: str = "—", ratio: str = "",
            target: str = "", met: bool | None = None) -> None:
        out.append({"scenario": scenario, "figure": figure, "livecount": lc, "bare": bare,
                    "ratio": ratio, "target": target,
                    "met": None if results["quick"] else met})  # targets are for full scale

    def ms(run: dict[str, Any], key: str) -> str:
        return _fmt(run.get(key), ".1f", " ms")

    def gc(run: dict[str, Any]) -> str:
        return (f"{run['gc_full_count']} (longest {run['gc_full_max_ms']:.0f} ms)"
                if run["gc_full_count"] else "0")

    slc, sb = s["livecount"], s["bare"]
    name = f"spread: {s['clients']:,} clients / {s['workspaces']} ws"
    add(name, f"writes committed /s (asked {s['writes_per_s']:g})",
        _fmt(slc["commits_per_s"]), _fmt(sb["writes_in_window"] / sb["window_s"]))
    add(name, "commit → client p50", ms(slc, "p50_ms"), ms(sb, "p50_ms"))
    add(name, "commit → client p99", ms(slc, "p99_ms"), ms(sb, "p99_ms"),
        f"{slc.get('p99_ms', 0) / max(sb.get('p99_ms', 1e-9), 1e-9):.1f}×", "≤ 100 ms",
        slc.get("p99_ms", 1e9) <= 100)
    add(name, "deltas delivered /s", _fmt(slc["deliveries_per_s"]),
        _fmt(sb["deliveries_per_s"]), f"{s['deliveries_ratio']:.0%}")
    add(name, "write deliveries missed", _fmt(slc["missing_write_deliveries"]),
        _fmt(sb["missing_write_deliveries"]), "", "0", slc["missing_write_deliveries"] == 0)
    add(name, "server CPU (1 core)", f"{slc['server_cpu']:.0%}", f"{sb['server_cpu']:.0%}")
    add(name, "full GC pauses in the window", gc(slc), gc(sb))
    asked = s["writes_per_s"]
    add("spread, writes over HTTP", f"writes committed /s (asked {asked:g})",
        _fmt(sh["commits_per_s"]), "", "", f"≥ {asked * 0.95:g}",
        sh["commits_per_s"] >= asked * 0.95)
    add("spread, writes over HTTP", "commit → client p99", ms(sh, "p99_ms"), "", "",
        "≤ 100 ms", sh.get("p99_ms", 1e9) <= 100)
    add("spread, writes over HTTP", "server CPU (1 core: API + relay + fan-out)",
        f"{sh['server_cpu']:.0%}")
    hlc, hb = h["livecount"], h["bare"]
    name = f"hot: {h['clients']:,} clients / 1 ws"
    add(name, f"writes committed /s (asked {h['writes_per_s']:g})",
        _fmt(hlc["commits_per_s"]), _fmt(hb["writes_in_window"] / hb["window_s"]))
    add(name, "commit → client p50", ms(hlc, "p50_ms"), ms(hb, "p50_ms"))
    add(name, "commit → client p99", ms(hlc, "p99_ms"), ms(hb, "p99_ms"),
        f"{hlc.get('p99_ms', 0) / max(hb.get('p99_ms', 1e-9), 1e-9):.1f}×", "≤ 250 ms",
        hlc.get("p99_ms", 1e9) <= 250)
    add(name, "deltas delivered /s", _fmt(hlc["deliveries_per_s"]),
        _fmt(hb["deliveries_per_s"]), f"{h['deliveries_ratio']:.0%}")
    add(name, "clients dropped", _fmt(hlc["dropped"]), _fmt(hb["dropped"]), "", "0",
        hlc["dropped"] == 0)
    add(name, "server RSS, window start → end",
        f"{hlc['rss_start_mib']:.0f} → {hlc['rss_end_mib']:.0f} MiB ({hlc['rss_growth']:+.1%})",
        f"{hb['rss_start_mib']:.0f} → {hb['rss_end_mib']:.0f} MiB ({hb['rss_growth']:+.1%})",
        "", "flat (≤ 5%)", abs(hlc["rss_growth"]) <= 0.05)
    add(name, "full GC pauses in the window", gc(hlc), gc(hb))
    flc, fb = f["livecount"], f["bare"]
    name = f"fan-out: {f['clients']:,} clients, saturated"
    add(name, "deltas delivered /s", _fmt(flc["deliveries_per_s"]),
        _fmt(fb["deliveries_per_s"]), f"{f['ratio']:.0%}", "≥ 70% of bare", f["ratio"] >= 0.7)
    add(name, "server / clients CPU", f"{flc['server_cpu']:.0%} / {flc['clients_cpu']:.0%}",
        f"{fb['server_cpu']:.0%} / {fb['clients_cpu']:.0%}")
    ilc, ib = i["livecount"], i["bare"]
    name = f"idle: {i['clients']:,} clients"
    add(name, "RSS per idle client", _fmt(ilc["per_client_kib"], ".1f", " KiB"),
        _fmt(ib["per_client_kib"], ".1f", " KiB"), f"{i['ratio']:.2f}×", "≤ 16 KiB",
        ilc["per_client_kib"] <= 16)
    add(name, f"clients held by one process (tried {i['probe']:,})", _fmt(ilc["held"]),
        _fmt(ib["held"]), "", "≥ 10,000", ilc["held"] >= 10_000)
    isse = i.get("livecount_sse")
    if isse is not None:
        add(name, "RSS per idle client, SSE (bare: WebSocket)",
            _fmt(isse["per_client_kib"], ".1f", " KiB"), _fmt(ib["per_client_kib"], ".1f", " KiB"),
            f"{i['sse_ratio']:.2f}×", "≤ 16 KiB", isse["per_client_kib"] <= 16)
    return out


def print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"stream benchmark{' (--quick: scaled down)' if results['quick'] else ''}"
                  f" — livecount vs bare websockets, server on one core")
    for name in ("scenario", "figure", "livecount", "bare websockets", "ratio", "target", ""):
        table.add_column(name, justify="left" if name in ("scenario", "figure") else "right")
    for row in results["rows"]:
        met = "" if row["met"] is None else ("[green]met[/]" if row["met"] else "[red]missed[/]")
        table.add_row(row["scenario"], row["figure"], row["livecount"], row["bare"],
                      row["ratio"], row["target"], met)
    console.print(table)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blue, grey, red = "#2f80ed", "#9aa5b1", "#eb5757"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    s, h, f, i = (results[k] for k in ("spread", "hot", "fanout", "idle"))

    ax = axes[0][0]
    labels = ["spread p50", "spread p99", "hot p50", "hot p99"]
    lcv = [s["livecount"].get("p50_ms", 0), s["livecount"].get("p99_ms", 0),
           h["livecount"].get("p50_ms", 0), h["livecount"].get("p99_ms", 0)]
    bv = [s["bare"].get("p50_ms", 0), s["bare"].get("p99_ms", 0), h["bare"].get("p50_ms", 0),
          h["bare"].get("p99_ms", 0)]
    ax.set_yscale("log")
    x = range(len(labels))
    ax.bar([j - 0.2 for j in x], lcv, 0.4, color=blue, label="livecount")
    ax.bar([j + 0.2 for j in x], bv, 0.4, color=grey, label="bare websockets (conflated)")
    for j, v in enumerate(lcv):
        ax.text(j - 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    for y, (x0, x1) in ((100, (0.55, 1.45)), (250, (2.55, 3.45))):
        ax.plot([x0, x1], [y, y], color=red, linestyle="--", linewidth=1)
        ax.text(x1, y, f" {y} ms", color=red, fontsize=7, va="center")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("commit → client latency (ms, log)")
    ax.set_ylim(top=max([*lcv, *bv, 250]) * 12)  # room for the legend above the bars
    ax.set_title(f"latency: spread {s['clients']:,} clients / {s['writes_per_s']:g} w/s, "
                 f"hot {h['clients']:,} / {h['writes_per_s']:g} w/s", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    labels = ["spread", "hot", "fan-out (saturated)"]
    lcv = [s["livecount"]["deliveries_per_s"], h["livecount"]["deliveries_per_s"],
           f["livecount"]["deliveries_per_s"]]
    bv = [s["bare"]["deliveries_per_s"], h["bare"]["deliveries_per_s"],
          f["bare"]["deliveries_per_s"]]
    x = range(len(labels))
    ax.bar([j - 0.2 for j in x], lcv, 0.4, color=blue, label="livecount")
    ax.bar([j + 0.2 for j in x], bv, 0.4, color=grey, label="bare websockets")
    for j, (a, b) in enumerate(zip(lcv, bv, strict=True)):
        ax.text(j - 0.2, a, f"{a / 1000:.1f}k\n{a / max(b, 1):.0%}", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("deltas delivered per second")
    ax.set_title("fan-out (target: ≥ 70% of bare when saturated)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for name, color in (("livecount", blue), ("bare", grey)):
        series = h[name]["rss_series"]
        ax.plot([p[0] for p in series], [p[1] for p in series], color=color,
                label=f"{name} (hot)")
    ax.set_xlabel("seconds into the hot run")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"hot workspace: server RSS, {h['livecount']['dropped']} clients dropped",
                 fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    vals = [i["livecount"]["per_client_kib"], i["bare"]["per_client_kib"]]
    bars = ax.bar(["livecount", "bare websockets"], vals, color=[blue, grey])
    for bar, v in zip(bars, vals, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f} KiB", ha="center",
                va="bottom", fontsize=8)
    ax.axhline(16, color=red, linestyle="--", linewidth=1)
    ax.set_ylabel("RSS per idle client (KiB)")
    ax.set_title(f"idle: {i['clients']:,} clients, compression off", fontsize=9)

    fig.suptitle("livecount stream gateway vs bare websockets, server pinned to one core"
                 + (" (--quick)" if results["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_livecount", "_bare"):
        _child_main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every scenario scaled down")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=["spread", "hot", "fanout", "idle"], action="append",
                        help="run only these scenarios (no table/chart unless all ran)")
    parser.add_argument("--replot", action="store_true",
                        help="print the table and redraw the chart from the JSON; run nothing")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy record the livecount server during each measured run "
                             "(collapsed stacks in DIR; pip install py-spy)")
    args = parser.parse_args()
    import shutil

    from rich.console import Console

    console = Console(width=max(130, shutil.get_terminal_size().columns))
    if args.replot:
        suffix = "-quick" if args.quick else ""
        results = json.loads((args.output / f"stream{suffix}.json").read_text())
        results["rows"] = rows(results)
        print_table(results, console)
        chart(results, args.output / f"stream{suffix}.png")
        return
    scale = QUICK if args.quick else FULL
    prepare_process(None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleans up like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    started = time.perf_counter()

    def say(text: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/] {text}", highlight=False)

    if args.quick:
        say("[yellow]--quick: every scenario scaled down (see 'scale' in the JSON); the "
            "figures are a smoke test, not the benchmark[/]")
    only = set(args.only or ("spread", "hot", "fanout", "idle"))
    results: dict[str, Any] = {"quick": args.quick, "scale": asdict(scale),
                               "flush_interval_s": FLUSH_INTERVAL}
    try:
        with tempfile.TemporaryDirectory(prefix="livecount-stream-bench-") as tmp:
            say("seeding the workspaces (SQLite, through the store)…")
            world = seed_world(Path(tmp), scale)
            run = Run(Path(tmp), world, scale)
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                run.profile = args.profile
            run_cpus = sorted(run.client_cpus)
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, set(run_cpus))
            say(f"server on CPU {sorted(run.server_cpus)}, clients/writer on CPU {run_cpus}"
                + (" [red](one core: shared!)[/]" if run.shared_core else ""))
            if "spread" in only:
                results["spread"] = latency_pair(run, "spread", world.spread,
                                                 scale.spread_per_workspace,
                                                 scale.spread_rate, say)
            if "spread" in only:
                results["spread_http"] = livecount_latency(
                    run, "spread", world.spread, scale.spread_per_workspace, scale.spread_rate,
                    True, say)
            if "hot" in only:
                results["hot"] = latency_pair(run, "hot", [world.hot], scale.hot_clients,
                                              scale.hot_rate, say)
            if "fanout" in only:
                results["fanout"] = fanout(run, say)
            if "idle" in only:
                results["idle"] = idle(run, say)
    finally:
        stop_all_children()
    results["seconds"] = time.perf_counter() - started
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "platform": sys.platform}
    suffix = "-quick" if args.quick else ""
    args.output.mkdir(parents=True, exist_ok=True)
    if only == {"spread", "hot", "fanout", "idle"}:
        results["rows"] = rows(results)
        print_table(results, console)
        chart(results, args.output / f"stream{suffix}.png")
        (args.output / f"stream{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
        say(f"wrote {args.output / f'stream{suffix}.json'} and stream{suffix}.png")
    else:
        out = args.output / f"stream{suffix}-partial-{'-'.join(sorted(only))}.json"
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        say(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the children are stopped by then (main's finally)
        sys.exit("interrupted: every process the benchmark started has been stopped")

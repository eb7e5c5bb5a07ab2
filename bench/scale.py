"""The scale benchmark (issue 7): the production shape end to end, against the embedded default.

    .venv/bin/python bench/scale.py            # full run (about 7 minutes)
    .venv/bin/python bench/scale.py --quick    # everything scaled down (under a minute)

Scenarios, all in one run (baselines measured in the same run):

1. **distributed**: PostgreSQL + Redis, 3 gateway processes (``livecount serve --counter-workers
   0``) and 2 counter workers (``livecount worker``), as the README's production shape. A
   fresh PostgreSQL database and a private ``redis-server`` on a free port per run (dropped at
   the end). 2,000 WebSocket clients over 20 workspaces (100 each, the workspace's 12
   teammates in turn, spread round robin over the 3 gateways); a writer process sends creates
   and PATCHes over HTTP through the gateways (round robin) at each asked rate of a sweep.
   Figures: writes committed per second (from the outbox), commit → client latency p50/p99,
   whether every client ends exact (its counts, snapshot + deltas applied, equal
   ``GET /counts?after=P`` for its teammate), CPU of every process.
2. **embedded**: the same workload (same seed, same clients, same writer) on ``livecount
   serve`` with its defaults: SQLite + memory state and bus, one process.
3. **PostgreSQL cost per write**: what one write costs the database, measured on the same
   database with the Store a gateway runs: round trips and statements (counted by a proxy
   that reads the PostgreSQL protocol: whatever the client library does), rows written per
   table (``pg_stat_user_tables``), wall time and the backend's CPU (psutil), one write at a
   time and 16 in flight; and the database's CPU per write over the distributed runs,
   everything included (the writes, both workers reading the outbox, LISTEN/NOTIFY). Against
   what a helpdesk that refetches counts pays per write event: every connected client of the
   workspace re-runs one COUNT per view it sees (one GROUP BY per grouped view, ``$me`` bound
   to its teammate; the SQL compilation of the views' filters), measured per client on the
   same data (their answers are checked equal to livecount's counts) and multiplied by the
   clients of the workspace. (The refetching helpdesk also pays the write itself, without
   the outbox row: left out of its column.)
4. **idle workspaces**: in one process (SQLite, memory state and bus, the Relay as ``livecount
   serve`` runs it), 10 active workspaces alone and then with 10,000 idle ones (created
   through ``Store.create_workspace``: folders and 3 conversations each): relay start, CPU
   with no writes, then writes at a fixed rate to the active ones: commit → bus latency
   (``BusMessage.committed_at``), relay step time, CPU per write net of the no-write CPU.
   Twice: with the scheduled reconcile (the default, every workspace every 300 s), and with
   it stopped, which separates its cost (proportional to the workspaces) from the write
   path's (which should not be).

**Commit → client latency.** Every benchmark write raises its workspace's "All" folder by
exactly one (a create of an open conversation, or a reopen of a closed one from a pool seeded
for it) and nothing else changes it, so after the k-th commit of a workspace (outbox position
order) "All" is base + k. A client that receives "All" = v has seen writes 1..v − base; write
k's latency at that client = the receive time of the first message with "All" ≥ base + k minus
the write's ``committed_at`` (the store's wall clock inside the write transaction, right after
the outbox lock; read back from the outbox after the run). One sample per (write, client of
its workspace), conflation included; a pair never seen is "missing". Figures over the writes
committed in [start + warmup, start + duration].

**The machine.** Everything shares 2 cores: PostgreSQL, Redis, the 5 livecount processes, the
writer and the 2,000 clients (one asyncio process: this one). The load generator competes
with the servers, so the rates reached are a floor for the servers on their own hardware.
The load average before the start is recorded: above 1, other work (tests) was running too.

Writes bench/results/scale.json and scale.png (scale-quick.* with --quick) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _cluster as C  # noqa: E402

RESULTS = HERE / "results"
SCENARIOS = {"distributed", "embedded", "idle"}
#: Timed refetches per sampled teammate (after one untimed, warming plans and pages).
REFETCH_REPEAT = 5
#: --profile DIR: py-spy of the servers during each measured run (collapsed stacks)
PROFILE: Path | None = None


@dataclass(frozen=True)
class Scale:
    workspaces: int = 20
    clients: int = 2000
    gateways: int = 3
    workers: int = 2
    open_per_ws: int = 500
    closed_per_ws: int = 1000  # the pool reopens draw from
    extra_views: int = 27  # + 7 folders + 6 demo views = 40 shared views per workspace
    rates: tuple[float, ...] = (100.0, 250.0, 1000.0)
    duration: float = 20.0
    warmup: float = 3.0
    settle: float = 2.0
    connections_per_gateway: int = 16
    lease_ttl: float = 10.0
    refetch_workspaces: int = 5
    refetch_teammates: int = 4
    probe_writes: int = 400
    idle_active: int = 10
    idle_count: int = 10_000
    idle_active_open: int = 300
    idle_active_closed: int = 300
    idle_rate: float = 200.0
    idle_duration: float = 10.0
    idle_quiet: float = 8.0


FULL = Scale()
QUICK = Scale(workspaces=4, clients=200, open_per_ws=100, closed_per_ws=200, rates=(100.0,),
              duration=5.0, warmup=1.0, settle=1.5, connections_per_gateway=8, lease_ttl=3.0,
              refetch_workspaces=2, refetch_teammates=2, probe_writes=60, idle_count=500,
              idle_active_open=100, idle_active_closed=100, idle_rate=100.0,
              idle_duration=2.0, idle_quiet=1.0)


class UI:
    """A rich progress bar over the phases, and timestamped lines."""

    def __init__(self, console: Any, phases: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.started = time.perf_counter()
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                 transient=False)
        self.overall = self.progress.add_task("scale benchmark", total=phases)
        self.step: Any = None

    def __enter__(self) -> UI:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def say(self, text: str) -> None:
        self.progress.console.print(
            f"[dim]{time.perf_counter() - self.started:6.1f}s[/] {text}", highlight=False)

    def begin(self, description: str, total: float | None = None) -> None:
        self.end()
        self.step = self.progress.add_task(f"  {description}", total=total)

    def advance(self, amount: float = 1.0) -> None:
        if self.step is not None:
            self.progress.advance(self.step, amount)

    def update(self, **kwargs: Any) -> None:
        if self.step is not None:
            self.progress.update(self.step, **kwargs)

    def end(self) -> None:
        if self.step is not None:
            self.progress.remove_task(self.step)
            self.step = None

    def phase_done(self) -> None:
        self.end()
        self.progress.advance(self.overall)


# -- scenarios 1 and 2: a deployment under load -----------------------------------------------


async def deployment(kind: str, scale: Scale, tmp: Path, ui: UI) -> dict[str, Any]:
    """Seed, start the servers, connect the clients, run the sweep; scenario 3 too on the
    distributed deployment (while its data is there)."""
    import httpx

    distributed = kind == "distributed"
    db: str | None = None
    logs = tmp / kind
    logs.mkdir()
    out: dict[str, Any] = {"kind": kind}
    try:
        if distributed:
            db = C.create_database()
            store_url = C.pg_url(db)
            redis, redis_port = await C.start_redis(logs, logs / "redis.log")
            broker = f"redis://127.0.0.1:{redis_port}/0?prefix=lcscale:"
            out["store"] = f"PostgreSQL database {db} (dropped at the end)"
            out["broker"] = f"private redis-server on port {redis_port}"
        else:
            store_url = f"sqlite:///{tmp / 'embedded.db'}"
            out["store"] = "SQLite (temporary file)"
            out["broker"] = "memory://"
        per_ws = scale.clients // scale.workspaces
        ui.say(f"[b]{kind}[/]: seeding {scale.workspaces} workspaces ({scale.open_per_ws} open + "
               f"{scale.closed_per_ws} closed conversations, 40 shared views each)…")
        t0 = time.perf_counter()
        world = await C.seed_world(
            store_url, [(f"ws {i}", scale.open_per_ws, scale.closed_per_ws)
                        for i in range(scale.workspaces)], scale.extra_views, seed=7)
        out["seed_s"] = time.perf_counter() - t0

        env = dict(os.environ, LIVECOUNT_ADMIN_TOKEN=C.ADMIN_TOKEN)
        lc = [sys.executable, "-m", "livecount"]
        procs: dict[str, C.Proc] = {}
        gateway_ports: list[int] = []
        starts = []
        if distributed:
            for i in range(scale.workers):
                port = C.free_port()
                argv = [*lc, "worker", "--store", store_url, "--broker", broker, "--port",
                        str(port), "--lease-ttl", str(scale.lease_ttl)]
                procs[f"worker {i}"] = await C.Proc.start(f"worker {i}", argv,
                                                          logs / f"worker{i}.log", env=env)
                starts.append((port, procs[f"worker {i}"]))
            for i in range(scale.gateways):
                port = C.free_port()
                argv = [*lc, "serve", "--store", store_url, "--broker", broker,
                        "--counter-workers", "0", "--port", str(port), "--log-level", "warning"]
                procs[f"gateway {i}"] = await C.Proc.start(f"gateway {i}", argv,
                                                           logs / f"gateway{i}.log", env=env)
                gateway_ports.append(port)
                starts.append((port, procs[f"gateway {i}"]))
        else:
            port = C.free_port()
            argv = [*lc, "serve", "--store", store_url, "--port", str(port), "--log-level",
                    "warning"]
            procs["server"] = await C.Proc.start("server", argv, logs / "server.log", env=env)
            gateway_ports.append(port)
            starts.append((port, procs["server"]))
        ui.say(f"  starting {', '.join(procs)}…")
        await asyncio.gather(*(C.wait_http(p, proc) for p, proc in starts))
        if distributed:
            out["leases"] = await wait_leases(redis_port, world, scale, ui)
        await wait_counted(gateway_ports[0], world)

        specs = []
        for w, ws in enumerate(world):
            for j in range(per_ws):
                t = j % len(ws.tokens)
                specs.append(C.ClientSpec(
                    port=gateway_ports[(w * per_ws + j) % len(gateway_ports)],
                    path=f"/api/workspaces/{ws.id}/ws?token={ws.tokens[t]}", ws=w, teammate=t,
                    key=str(ws.all_view)))
        pool = C.ClientPool(specs)
        ui.begin(f"{kind}: connecting {len(specs):,} WebSocket clients", total=len(specs))
        connected = await pool.connect(concurrency=64, progress=ui.advance)
        ui.end()
        ui.say(f"  {connected['connected']:,}/{len(specs):,} clients connected in "
               f"{connected['seconds']:.1f} s over {len(gateway_ports)} "
               f"{'gateways' if distributed else 'process'}"
               + (f" [red]errors {connected['errors']}[/]" if connected["errors"] else ""))
        out["clients"] = {"asked": len(specs), **connected,
                          "per_workspace": per_ws, "workspaces": len(world)}

        config = {"targets": [["127.0.0.1", p] for p in gateway_ports],
                  "connections": scale.connections_per_gateway * (
                      1 if distributed else scale.gateways),
                  "seed": 3, "workspaces": [{"id": w.id, "tokens": w.tokens, "teams": w.teams,
                                             "pool": w.pool} for w in world]}
        cfg = tmp / f"{kind}-writer.json"
        cfg.write_text(json.dumps(config))
        writer = await C.Proc.start("writer", [sys.executable, str(HERE / "_cluster.py"),
                                               "writer", str(cfg)], logs / "writer.log",
                                    pipe=True)
        pids = {name: p.pid for name, p in procs.items()}
        pids["writer"] = writer.pid
        pids["bench (clients)"] = os.getpid()
        if distributed:
            pids["redis"] = redis.pid
        runs = []
        async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(
                max_connections=32)) as http:
            with C.Sampler(pids, pg_database=db, period=0.5) as sampler:
                for rate in scale.rates:
                    runs.append(await measured_run(kind, rate, scale, store_url, world, pool,
                                                   writer, sampler, http, gateway_ports, ui))
                    await asyncio.sleep(1.0)
                if distributed:
                    assert db is not None
                    out["pg_cost"] = await pg_cost(db, store_url, world, scale, per_ws,
                                                   gateway_ports, http, ui)
        out["runs"] = runs
        out["lost_unexpectedly"] = pool.lost_unexpectedly
        out["close_codes"] = pool.close_codes
        out["client_errors"] = pool.errors
        await writer.call({"cmd": "close"}, wait=30)
        await pool.close()
        for name, proc in procs.items():
            if not proc.alive():
                out.setdefault("died", []).append(f"{name}: {proc.tail()}")
    finally:
        await C.stop_all()
        if db is not None:
            with contextlib.suppress(Exception):
                C.drop_database(db)
        out["server_log_warnings"] = await asyncio.to_thread(_log_warnings, logs)
    return out


def _log_warnings(logs: Path) -> dict[str, Any]:
    """Warnings, errors and tracebacks the servers logged: how many, and the first few (a
    traceback as its exception line)."""
    found: dict[str, Any] = {}
    for log in sorted(logs.glob("*.log")):
        events: list[str] = []
        in_traceback = False
        for line in log.read_text(errors="replace").splitlines():
            if in_traceback:
                if line and not line.startswith((" ", "\t", "Traceback", "During handling",
                                                 "The above exception")):
                    events[-1] += f" → {line.strip()[:200]}"
                    in_traceback = False
                continue
            if line.startswith("Traceback"):
                if events:
                    in_traceback = True
                else:
                    events.append("traceback")
                    in_traceback = True
            elif (any(w in line for w in ("WARNING", "ERROR", "CRITICAL"))
                  and "Memory overcommit" not in line):  # redis-server's, about the host
                events.append(line[:300])
        if events:
            found[log.stem] = {"count": len(events), "first": events[:8]}
    return found


async def wait_leases(redis_port: int, world: list[C.SeededWorkspace], scale: Scale, ui: UI
                      ) -> dict[str, Any]:
    """Wait until the workers split the shards (each near its fair share); who counts which
    workspace."""
    import redis.asyncio as aioredis

    from livecount.leases.base import shard_of

    client = aioredis.Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
    shards = 64
    owners: dict[int, str] = {}
    started = time.monotonic()
    try:
        ui.begin("waiting for the counter workers to split the shards")
        while time.monotonic() - started < 6 * scale.lease_ttl:
            owners = {}
            for s in range(shards):
                value = await client.get(f"lcscale:{{leases}}:shard:{s}")
                if value:
                    owners[s] = value.split()[0]
            per = {w: sum(1 for o in owners.values() if o == w) for w in set(owners.values())}
            if len(per) == scale.workers and min(per.values()) >= shards // scale.workers - 1:
                break
            await asyncio.sleep(0.25)
    finally:
        await client.aclose()
    names = sorted(set(owners.values()))
    per_worker = {f"worker {names.index(o)}": 0 for o in names}
    for ws in world:
        owner = owners.get(shard_of(ws.id, shards))
        if owner is not None:
            per_worker[f"worker {names.index(owner)}"] += 1
    shards_held = {f"worker {names.index(o)}": sum(1 for v in owners.values() if v == o)
                   for o in names}
    ui.say(f"  shards held {shards_held}, workspaces counted {per_worker} after "
           f"{time.monotonic() - started:.1f} s")
    return {"shards_held": shards_held, "workspaces_counted": per_worker,
            "seconds": time.monotonic() - started}


async def wait_counted(port: int, world: list[C.SeededWorkspace], within: float = 60.0
                       ) -> None:
    """Until every workspace has counts (its relay counted it from the snapshot)."""
    import httpx

    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5.0) as http:
        for ws in world:
            while True:
                r = await http.get(f"http://127.0.0.1:{port}/api/workspaces/{ws.id}/counts",
                                   headers={"Authorization": f"Bearer {C.ADMIN_TOKEN}"})
                if r.status_code == 200 and str(ws.all_view) in r.json()["counts"] and \
                        r.json()["counts"][str(ws.all_view)] > 0:
                    break
                if time.monotonic() > deadline:
                    raise C.ChildError(f"workspace {ws.id} was never counted: {r.text[:200]}")
                await asyncio.sleep(0.2)


async def measured_run(kind: str, rate: float, scale: Scale, store_url: str,
                       world: list[C.SeededWorkspace], pool: C.ClientPool, writer: C.Proc,
                       sampler: C.Sampler, http: Any, gateway_ports: list[int], ui: UI
                       ) -> dict[str, Any]:
    position0 = await asyncio.to_thread(C.outbox_position, store_url)
    start_values = pool.mark()
    start = time.time() + 0.5
    lo, hi = start + scale.warmup, start + scale.duration
    ui.begin(f"{kind}: {rate:g} writes/s asked, {scale.duration:g} s", total=scale.duration)

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.25)
            ui.update(completed=min(scale.duration, max(0.0, time.time() - start)))

    ticker = asyncio.create_task(tick())
    spies = []
    if PROFILE is not None:
        for name in [n for n in sampler.processes if n.split()[0] in ("gateway", "worker",
                                                                      "server")][:3]:
            out = PROFILE / f"{kind}-{rate:g}-{name.replace(' ', '')}.txt"
            spies.append(await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "py-spy"), "record", "-p",
                str(sampler.processes[name].pid), "-d", str(int(scale.duration)), "-r", "100",
                "-f", "raw", "--nonblocking", "-o", str(out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
    try:
        driven = await writer.call({"cmd": "run", "start": start, "rate": rate,
                                    "duration": scale.duration, "shed_after": 1.0,
                                    "grace": 15.0}, wait=scale.duration + 60)
    finally:
        ticker.cancel()
    await asyncio.sleep(scale.settle)
    for spy in spies:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await spy.wait()
    ui.end()
    rows = await asyncio.to_thread(C.read_commits, store_url, position0)
    index = {ws.id: w for w, ws in enumerate(world)}
    commits: list[list[float]] = [[] for _ in world]
    last_position: dict[int, int] = {}
    for position, workspace, committed in rows:
        commits[index[workspace]].append(committed / 1e6)
        last_position[workspace] = position
    # still recording: a delivery that comes while the check waits is a sample, not a miss
    exact = await check_exact(world, pool, http, gateway_ports, last_position)
    records = pool.stop()
    latency = C.analyze(records, [s.ws for s in pool.specs], start_values, commits, lo, hi)
    window = hi - lo
    result: dict[str, Any] = {
        "asked_per_s": rate, "committed_per_s": latency["writes_in_window"] / window,
        "writer": driven, "latency": latency, "exact": exact,
        "cpu": {name: sampler.cpu(name, lo, hi) for name in sampler.processes},
        "rss_mib": {name: sampler.rss(name) / 2**20 for name in sampler.processes},
    }
    rate_in = result["committed_per_s"]
    own = {"gateways": sum(v for k, v in result["cpu"].items() if k.startswith("gateway")),
           "workers": sum(v for k, v in result["cpu"].items() if k.startswith("worker")),
           "server": result["cpu"].get("server", 0.0)}
    result["cpu_ms_per_write"] = {k: v / rate_in * 1000 for k, v in own.items()
                                  if v and rate_in}
    if sampler.pg_database:
        seconds, covered = sampler.pg_cpu_seconds(lo, hi)
        result["cpu"]["postgres (backends of this db)"] = seconds / covered if covered else None
        writes = latency["writes_in_window"] * covered / window if window else 0
        result["pg_cpu_ms_per_write"] = seconds / writes * 1000 if writes else None
    lat = latency
    ui.say(f"  {kind} @ {rate:g}/s asked: {result['committed_per_s']:,.0f} writes/s committed, "
           f"commit → client p50 {lat.get('p50_ms', float('nan')):.0f} ms, p99 "
           f"{lat.get('p99_ms', float('nan')):.0f} ms ({lat['samples']:,} samples, "
           f"{lat['missing_samples']:,} missing); exact {exact['exact']:,}/{exact['clients']:,}"
           + (f"; writer shed {driven['shed']:,}, errors {driven['errors']}"
              if driven["shed"] or driven["errors"] else ""))
    return result


async def check_exact(world: list[C.SeededWorkspace], pool: C.ClientPool, http: Any,
                      gateway_ports: list[int], last_position: dict[int, int]
                      ) -> dict[str, Any]:
    """Every client's counts against ``GET /counts`` for its teammate at the same seq: first
    ``?after=P`` (P: the workspace's last write), and again (without ``after``) for the
    teammates some client is past (time-dependent views keep moving the counts: a "waiting
    longer than an hour" view grows as time passes). A client is compared once it is at the
    seq of the answer; one still short of it after 15 s is "behind"."""
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    sem = asyncio.Semaphore(16)

    async def fetch(w: int, t: int, after: bool) -> None:
        ws = world[w]
        position = last_position.get(ws.id) if after else None
        url = (f"http://127.0.0.1:{gateway_ports[(w + t) % len(gateway_ports)]}"
               f"/api/workspaces/{ws.id}/counts" + (f"?after={position}" if position else ""))
        for _ in range(12):  # 503 while the counts do not reflect P yet (5 s each)
            async with sem:
                r = await http.get(url, headers={"Authorization": f"Bearer {ws.tokens[t]}"})
            if r.status_code != 503:
                break
        r.raise_for_status()
        expected[w, t] = r.json()

    await asyncio.gather(*(fetch(w, t, True)
                           for w, t in sorted({(s.ws, s.teammate) for s in pool.specs})))
    pending = {i for i, c in enumerate(pool.counts) if c is not None}
    connected = len(pending)
    exact, wrong, samples, refetched = 0, 0, [], 0
    deadline = time.monotonic() + 15.0
    while pending and time.monotonic() < deadline:
        again: set[tuple[int, int]] = set()
        for i in list(pending):
            spec = pool.specs[i]
            want = expected[spec.ws, spec.teammate]
            if pool.seq[i] == want["seq"]:
                pending.discard(i)
                if pool.counts[i] == want["counts"]:
                    exact += 1
                else:
                    wrong += 1
                    if len(samples) < 3:
                        have = pool.counts[i] or {}
                        samples.append({k: (have.get(k), v) for k, v in want["counts"].items()
                                        if have.get(k) != v})
            elif pool.seq[i] > want["seq"]:
                again.add((spec.ws, spec.teammate))
        if again:
            refetched += len(again)
            await asyncio.gather(*(fetch(w, t, False) for w, t in again))
        else:
            await asyncio.sleep(0.1)
    return {"clients": len(pool.specs), "exact": exact, "wrong": wrong,
            "behind": len(pending), "disconnected": len(pool.specs) - connected,
            "wrong_samples": samples, "refetched_for_newer_seq": refetched}


# -- scenario 3: PostgreSQL cost per write ----------------------------------------------------


def _refetch_queries(ws: C.SeededWorkspace, teammate: int, now: int) -> list[tuple[str, Any, Any]]:
    """(view id, group_by, SELECT) for every view ``teammate`` sees: one COUNT per plain view,
    one GROUP BY per grouped view, ``$me`` bound to the teammate."""
    import sqlalchemy as sa

    from livecount.filters.parse import parse_filter
    from livecount.filters.sql import compile_sql
    from livecount.filters.tree import bind_me
    from livecount.store.queries import _group_source
    from livecount.store.schema import conversations

    out = []
    for view in ws.views:
        if view["owner_id"] is not None and view["owner_id"] != teammate:
            continue
        node = bind_me(parse_filter(view["filter"]), teammate)
        where = sa.and_(conversations.c.workspace_id == ws.id, compile_sql(node, teammate, now))
        source, columns = _group_source(view["group_by"])
        if view["group_by"] is None:
            query = sa.select(sa.func.count()).select_from(conversations).where(where)
        else:
            query = (sa.select(*columns, sa.func.count()).select_from(source).where(where)
                     .group_by(*columns))
        out.append((str(view["id"]), view["group_by"], query))
    return out


def _refetch(conn: Any, queries: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    from livecount.store.queries import _group_text

    counts: dict[str, Any] = {}
    with conn.begin():
        for vid, group_by, query in queries:
            if group_by is None:
                counts[vid] = int(conn.execute(query).scalar_one())
            else:
                groups: dict[str, int] = {}
                for *values, n in conn.execute(query):
                    text = _group_text(group_by, values)
                    if text is not None:
                        groups[text] = groups.get(text, 0) + int(n)
                counts[vid] = {g: n for g, n in groups.items() if n}
    return counts


def _measure_refetch(store_url: str, world: list[C.SeededWorkspace], scale: Scale,
                     expected: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
    """Time (wall, and the backend's CPU) of one client's refetch of every count it sees."""
    import psutil
    import sqlalchemy as sa

    from livecount.domain import now_us

    engine = sa.create_engine(C.sa_url(store_url), connect_args={"options": "-c jit=off"})
    try:
        with engine.connect() as conn:
            backend = psutil.Process(int(conn.scalar(sa.text("SELECT pg_backend_pid()"))))
            conn.commit()
            samples, matches, mismatches = [], 0, []
            cpu_total, refetches = 0.0, 0
            for (w, t), want in sorted(expected.items()):
                ws = world[w]
                queries = _refetch_queries(ws, ws.teammates[t], now_us())
                _refetch(conn, queries)  # warm: plans and pages cached, like a busy server
                cpu0 = sum(backend.cpu_times()[:2])
                for _ in range(REFETCH_REPEAT):
                    t0 = time.perf_counter()
                    counts = _refetch(conn, queries)
                    samples.append({"workspace": ws.id, "teammate": ws.teammates[t],
                                    "views": len(queries),
                                    "wall_s": time.perf_counter() - t0})
                # CPU times tick every 10 ms: summed over the repeats, not per refetch
                cpu_total += sum(backend.cpu_times()[:2]) - cpu0
                refetches += REFETCH_REPEAT
                if counts == want["counts"]:
                    matches += 1
                elif len(mismatches) < 3:
                    mismatches.append({k: (counts.get(k), v) for k, v in want["counts"].items()
                                       if counts.get(k) != v})
    finally:
        engine.dispose()
    return {"samples": samples, "matches_livecount": matches, "compared": len(expected),
            "mismatch_samples": mismatches, "pg_cpu_s_per_refetch": cpu_total / refetches}


async def _probe_pass(db: str, world: list[C.SeededWorkspace], n: int, concurrency: int,
                      proxy: C.PgWireCounter | None, seed: int) -> dict[str, Any]:
    """``n`` writes through the PostgresStore a gateway runs (half creates, half PATCHes of
    assignee/tags/priority), ``concurrency`` in flight, through ``proxy`` (counting the
    protocol) or straight to PostgreSQL (timing: wall, the backends' CPU, rows by table)."""
    import psutil
    import psycopg

    from livecount.store import open_store

    name = f"lcscale_probe_{seed}"
    options = {"application_name": name, "sslmode": "disable", "gssencmode": "disable"}
    url = C.pg_url(db, **options)
    if proxy is not None:
        url = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    store = open_store(url)
    await store.open()
    rng = random.Random(seed)

    async def write(i: int) -> None:
        ws = world[i % len(world)]
        team = rng.choice(ws.teams)
        if i % 2 == 0:
            await store.create_conversation(ws.id, {
                "state": "open", "team_id": team["id"], "channel": "email",
                "tags": rng.sample(list(C.TAG_CHOICES), 2),
                "custom": {"plan": "pro", "seats": rng.randint(1, 90)}}, ws.teammates[0])
        else:
            await store.update_conversation(ws.id, rng.choice(ws.pool), {
                "assignee_id": rng.choice(team["member_ids"]),
                "tags": rng.sample(list(C.TAG_CHOICES), 2),
                "priority": rng.random() < 0.5}, None)

    walls: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def timed(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await write(i)
            walls.append(time.perf_counter() - t0)

    warm = 8
    before = await asyncio.to_thread(C.table_writes, db)
    try:
        await asyncio.gather(*(write(i) for i in range(warm)))  # warm: pool, prepared stmts
        with psycopg.connect(C.PG_ADMIN, autocommit=True) as admin:
            procs = [psutil.Process(r[0]) for r in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))]
        if proxy is not None:
            proxy.reset()
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        t0 = time.perf_counter()
        await asyncio.gather(*(timed(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        counted = proxy.summary(n) if proxy is not None else None
    finally:
        await store.close()
    await asyncio.sleep(1.0)  # a backend's table statistics are flushed when it exits
    after = await asyncio.to_thread(C.table_writes, db)
    # the warm-up's rows are in these too: a backend's statistics are flushed at its exit
    by_table = {t: [(a - b) / (n + warm) for a, b in zip(after[t], before.get(t, (0, 0, 0)),
                                                strict=True)]
                for t in after if after[t] != before.get(t)}
    out: dict[str, Any] = {"writes": n, "concurrency": concurrency,
                           "writes_per_s": n / elapsed,
                           "wall_ms_p50": statistics.median(walls) * 1000,
                           "wall_ms_mean": statistics.fmean(walls) * 1000,
                           "pg_cpu_ms_per_write": cpu / n * 1000, "backends": len(procs),
                           "rows_per_write_by_table": {t: dict(zip(("ins", "upd", "del"), v,
                                                                   strict=True))
                                                       for t, v in sorted(by_table.items())},
                           "rows_written_per_write": sum(sum(v) for v in by_table.values())}
    if counted is not None:
        out["protocol_per_write"] = counted
    return out


async def _probe_writes(db: str, world: list[C.SeededWorkspace], n: int) -> dict[str, Any]:
    """The write's cost to PostgreSQL, one at a time and 16 in flight: protocol messages
    through :class:`~_cluster.PgWireCounter` (round trips, statements), then timings straight
    to the server."""
    proxy = C.PgWireCounter()
    await proxy.start()
    try:
        counted_1 = await _probe_pass(db, world, n // 2, 1, proxy, 1)
        counted_16 = await _probe_pass(db, world, n // 2, 16, proxy, 2)
    finally:
        await proxy.close()
    timed_1 = await _probe_pass(db, world, n, 1, None, 3)
    timed_16 = await _probe_pass(db, world, n, 16, None, 4)
    return {"one_at_a_time": {**timed_1, "protocol_per_write":
                              counted_1["protocol_per_write"]},
            "16_in_flight": {**timed_16, "protocol_per_write":
                             counted_16["protocol_per_write"]},
            # the headline figures: one write alone (what each write costs at least)
            "round_trips_per_write": counted_1["protocol_per_write"]["round_trips"],
            "statements_per_write": counted_1["protocol_per_write"]["statements"],
            "rows_written_per_write": timed_1["rows_written_per_write"],
            "wall_ms_p50": timed_1["wall_ms_p50"],
            "pg_cpu_ms_per_write": timed_1["pg_cpu_ms_per_write"]}


async def pg_cost(db: str, store_url: str, world: list[C.SeededWorkspace], scale: Scale,
                  per_ws: int, gateway_ports: list[int], http: Any, ui: UI) -> dict[str, Any]:
    ui.say("[b]PostgreSQL cost per write[/] (same database, the cluster idle)…")
    ui.begin("refetch: one COUNT per view per client (sampled teammates)")
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    for w in range(min(scale.refetch_workspaces, len(world))):
        ws = world[w]
        for t in range(min(scale.refetch_teammates, len(ws.tokens))):
            r = await http.get(f"http://127.0.0.1:{gateway_ports[0]}/api/workspaces/{ws.id}"
                               "/counts", headers={"Authorization": f"Bearer {ws.tokens[t]}"})
            r.raise_for_status()
            expected[w, t] = r.json()
    refetch = await asyncio.to_thread(_measure_refetch, store_url, world, scale, expected)
    ui.begin(f"livecount: {scale.probe_writes} writes through the Store, one at a time")
    probe = await _probe_writes(db, world, scale.probe_writes)
    ui.end()
    walls = [s["wall_s"] for s in refetch["samples"]]
    views = statistics.fmean(s["views"] for s in refetch["samples"])
    one_wall = statistics.median(walls)
    one_cpu = refetch["pg_cpu_s_per_refetch"]
    event = {"clients_per_workspace": per_ws, "views_per_client": views,
             "count_queries": per_ws * views,
             "wall_ms": one_wall * per_ws * 1000, "pg_cpu_ms": one_cpu * per_ws * 1000}
    out = {"refetch": {**refetch, "one_client_wall_ms": one_wall * 1000,
                       "one_client_pg_cpu_ms": one_cpu * 1000,
                       "per_count_ms": one_wall / views * 1000},
           "refetch_per_write_event": event, "livecount_write": probe,
           "ratio_wall": event["wall_ms"] / probe["wall_ms_p50"],
           "ratio_pg_cpu": event["pg_cpu_ms"] / probe["pg_cpu_ms_per_write"]
           if probe["pg_cpu_ms_per_write"] > 0 else None}
    many = probe["16_in_flight"]
    ui.say(f"  livecount write: {probe['round_trips_per_write']:.1f} round trips, "
           f"{probe['statements_per_write']:.1f} statements, "
           f"{probe['rows_written_per_write']:.1f} rows written, {probe['wall_ms_p50']:.2f} ms, "
           f"PG CPU {probe['pg_cpu_ms_per_write']:.2f} ms (16 in flight: "
           f"{many['protocol_per_write']['round_trips']:.1f} round trips, "
           f"{many['pg_cpu_ms_per_write']:.2f} ms PG CPU, {many['writes_per_s']:.0f}/s); "
           "refetch per write event: "
           f"{event['count_queries']:,.0f} COUNTs, {event['wall_ms']:,.0f} ms, PG CPU "
           f"{event['pg_cpu_ms']:,.0f} ms (counts match livecount: "
           f"{refetch['matches_livecount']}/{refetch['compared']})")
    return out


# -- scenario 4: idle workspaces --------------------------------------------------------------


async def idle_workspaces(scale: Scale, tmp: Path, ui: UI) -> dict[str, Any]:
    out: dict[str, Any] = {"active": scale.idle_active, "idle": scale.idle_count,
                           "rate": scale.idle_rate, "duration_s": scale.idle_duration}
    for label, idle in (("active only", 0), ("with idle", scale.idle_count)):
        out[label] = await _idle_case(scale, tmp / f"idle-{idle}.db", idle, ui)
    a, b = out["active only"], out["with idle"]
    keys = ("bus_p50_ms", "bus_p99_ms", "step_p50_ms", "step_p99_ms", "cpu_ms_per_write",
            "net_cpu_ms_per_write", "quiet_cpu")
    out["ratios"] = {k: (b[k] / a[k] if a.get(k) and b.get(k) is not None else None)
                     for k in keys}
    out["ratios_reconcile_off"] = {
        k: (b["reconcile_off"][k] / a["reconcile_off"][k]
            if a["reconcile_off"].get(k) and b["reconcile_off"].get(k) is not None else None)
        for k in keys}
    return out


async def _idle_case(scale: Scale, path: Path, idle: int, ui: UI) -> dict[str, Any]:
    import psutil

    from livecount.bus import MemoryBus
    from livecount.domain import now_us
    from livecount.relay import Relay
    from livecount.state import MemoryState
    from livecount.store import open_store

    url = f"sqlite:///{path}"
    name = f"{scale.idle_active} active" + (f" + {idle:,} idle" if idle else "")
    ui.say(f"[b]idle workspaces[/]: {name} (one process: SQLite, memory state and bus, Relay)")
    world = await C.seed_world(url, [(f"active {i}", scale.idle_active_open,
                                      scale.idle_active_closed)
                                     for i in range(scale.idle_active)], scale.extra_views, 11)
    store = open_store(url)
    await store.open()
    result: dict[str, Any] = {"workspaces": scale.idle_active + idle}
    bus = MemoryBus()
    relay: Relay | None = None
    try:
        if idle:
            ui.begin(f"creating {idle:,} workspaces through Store.create_workspace", total=idle)
            sem = asyncio.Semaphore(16)

            async def make(i: int) -> int:
                async with sem:
                    ws = await store.create_workspace(f"idle {i}")
                ui.advance()
                return ws.id

            t0 = time.perf_counter()
            ids = await asyncio.gather(*(make(i) for i in range(idle)))
            took = time.perf_counter() - t0
            result["create_workspaces_s"] = took
            result["create_workspaces_per_s"] = idle / took
            rng = random.Random(2)
            items = [(i, {"state": rng.choice(("open", "closed")), "channel": "chat"}, None)
                     for i in ids for _ in range(3)]
            await asyncio.to_thread(C.bulk_conversations, url, items, now_us())
            ui.end()
            ui.say(f"  created {idle:,} workspaces in {took:.1f} s ({idle / took:,.0f}/s), "
                   "3 conversations each")
        me = psutil.Process()
        rss0 = me.memory_info().rss
        relay = Relay(store, MemoryState(), bus, poll_interval=1.0, reconcile_every=300.0,
                      outbox_retention=86_400.0)
        ui.begin(f"relay start: counting {scale.idle_active + idle:,} workspaces")
        t0 = time.perf_counter()
        await relay.start()
        result["relay_start_s"] = time.perf_counter() - t0
        result["rss_growth_mib"] = (me.memory_info().rss - rss0) / 2**20
        steps: list[float] = []
        real_step = relay.step

        async def timed_step() -> bool:
            t = time.perf_counter()
            try:
                return await real_step()
            finally:
                steps.append(time.perf_counter() - t)

        relay.step = timed_step  # type: ignore[method-assign]
        latencies: list[float] = []

        async def listen(workspace_id: int) -> None:
            async for message in bus.subscribe(workspace_id, maxsize=100_000):
                if message.committed_at:
                    latencies.append(time.time() - message.committed_at / 1e6)

        listeners = [asyncio.create_task(listen(ws.id)) for ws in world]
        rng = random.Random(9)
        pools = [list(ws.pool) for ws in world]
        errors = 0

        async def write(w: int) -> None:
            nonlocal errors
            ws = world[w]
            team = rng.choice(ws.teams)
            try:
                if pools[w] and rng.random() < 0.5:
                    await store.update_conversation(ws.id, pools[w].pop(), {
                        "state": "open", "assignee_id": rng.choice(team["member_ids"])}, None)
                else:
                    await store.create_conversation(ws.id, {
                        "state": "open", "team_id": team["id"],
                        "tags": rng.sample(list(C.TAG_CHOICES), 1)}, None)
            except Exception:
                errors += 1
            ui.advance()

        async def window(tag: str) -> dict[str, Any]:
            """No writes for a while, then writes at the rate: what each costs."""
            assert relay is not None
            out: dict[str, Any] = {}
            ui.begin(f"{tag}: no writes for {scale.idle_quiet:g} s")
            await asyncio.sleep(0.5)
            reconciles0 = relay.reconciles
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(scale.idle_quiet)
            took = time.perf_counter() - t0
            out["quiet_cpu"] = (time.process_time() - cpu0) / took
            out["quiet_reconciles_per_s"] = (relay.reconciles - reconciles0) / took
            steps.clear()
            latencies.clear()
            n = int(scale.idle_rate * scale.idle_duration)
            ui.begin(f"{tag}: {scale.idle_rate:g} writes/s for {scale.idle_duration:g} s",
                     total=n)
            tasks: set[asyncio.Task[None]] = set()
            reconciles0 = relay.reconciles
            cpu0, start = time.process_time(), time.perf_counter()
            for i in range(n):
                delay = start + i / scale.idle_rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(write(rng.randrange(len(world))))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=30)
            await relay.sync()
            await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            ui.end()
            out.update({
                "writes": n, "writes_per_s": n / elapsed, "cpu_ms_per_write": cpu / n * 1000,
                "cpu_while_writing": cpu / elapsed,
                # the process's CPU while writing less its CPU with no writes, per write
                "net_cpu_ms_per_write": max(0.0, cpu / elapsed - out["quiet_cpu"])
                / (n / elapsed) * 1000,
                "reconciles_while_writing": relay.reconciles - reconciles0,
                "bus_messages": len(latencies), "steps": len(steps)})
            if latencies:
                ms = sorted(x * 1000 for x in latencies)
                out["bus_p50_ms"] = ms[len(ms) // 2]
                out["bus_p99_ms"] = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            if steps:
                st = sorted(x * 1000 for x in steps)
                out["step_p50_ms"] = st[len(st) // 2]
                out["step_p99_ms"] = st[min(len(st) - 1, int(len(st) * 0.99))]
            ui.say(f"  {tag}: no writes: CPU {out['quiet_cpu']:.1%} "
                   f"({out['quiet_reconciles_per_s']:.1f} reconciles/s); writes: commit → bus "
                   f"p50 {out.get('bus_p50_ms', 0):.1f} ms, p99 {out.get('bus_p99_ms', 0):.1f}"
                   f" ms, step p50 {out.get('step_p50_ms', 0):.2f} ms, CPU "
                   f"{out['cpu_ms_per_write']:.2f} ms per write "
                   f"({out['net_cpu_ms_per_write']:.2f} net of the background)")
            return out

        result.update(await window("scheduled reconcile on (default, every 300 s)"))
        # the same relay without its scheduled reconcile: what is left of the idle ones' cost
        for task in list(relay._tasks):  # the bench's hand on the relay's tasks
            if task.get_name() == "livecount-reconciler":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        result["reconcile_off"] = await window("scheduled reconcile off")
        result["errors"] = errors
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        ui.say(f"  relay start {result['relay_start_s']:.1f} s")
    finally:
        if relay is not None:
            await relay.stop()
        await bus.close()
        await store.close()
    return result


# -- report -----------------------------------------------------------------------------------


def _f(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:{spec}}{unit}"


def _ratio(a: Any, b: Any, spec: str = ".2f") -> str:
    if not a or not b or a != a or b != b:
        return ""
    return f"{a / b:{spec}}×"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """(scenario, figure, measured, baseline, ratio)."""
    out: list[list[str]] = []
    dist, emb = results["distributed"], results["embedded"]
    for d, e in zip(dist["runs"], emb["runs"], strict=True):
        name = f"{d['asked_per_s']:g} writes/s asked"
        dl, el = d["latency"], e["latency"]
        out.append([name, "writes committed /s", _f(d["committed_per_s"]),
                    _f(e["committed_per_s"]), _ratio(d["committed_per_s"],
                                                     e["committed_per_s"])])
        out.append([name, "commit → client p50", _f(dl.get("p50_ms"), ".0f", " ms"),
                    _f(el.get("p50_ms"), ".0f", " ms"), _ratio(dl.get("p50_ms"),
                                                              el.get("p50_ms"), ".1f")])
        out.append([name, "commit → client p99", _f(dl.get("p99_ms"), ".0f", " ms"),
                    _f(el.get("p99_ms"), ".0f", " ms"), _ratio(dl.get("p99_ms"),
                                                              el.get("p99_ms"), ".1f")])
        out.append([name, "deliveries missed / samples",
                    f"{dl['missing_samples']:,} / {dl['samples']:,}",
                    f"{el['missing_samples']:,} / {el['samples']:,}", ""])
        out.append([name, "clients exact at the end",
                    f"{d['exact']['exact']:,}/{d['exact']['clients']:,}",
                    f"{e['exact']['exact']:,}/{e['exact']['clients']:,}", ""])
        out.append([name, "write over HTTP p50 / p99",
                    f"{_f(d['writer']['http_p50_ms'], '.0f')} / "
                    f"{_f(d['writer']['http_p99_ms'], '.0f')} ms",
                    f"{_f(e['writer']['http_p50_ms'], '.0f')} / "
                    f"{_f(e['writer']['http_p99_ms'], '.0f')} ms", ""])
        cpu = d["cpu"]
        gw = sum(v for k, v in cpu.items() if k.startswith("gateway") and v == v)
        wk = sum(v for k, v in cpu.items() if k.startswith("worker") and v == v)
        pg = cpu.get("postgres (backends of this db)") or 0.0
        dc, ec = d.get("cpu_ms_per_write", {}), e.get("cpu_ms_per_write", {})
        out.append([name, "livecount CPU per write (incl. fan-out)",
                    f"{dc.get('gateways', 0) + dc.get('workers', 0):.1f} ms (gw "
                    f"{dc.get('gateways', 0):.1f}, wk {dc.get('workers', 0):.1f})",
                    f"{ec.get('server', 0):.1f} ms", ""])
        out.append([name, "CPU (cores): livecount / PG / Redis / load gen.",
                    f"{gw + wk:.2f} (gw {gw:.2f}, wk {wk:.2f}) / {pg:.2f} / "
                    f"{cpu.get('redis', 0):.2f} / "
                    f"{cpu.get('bench (clients)', 0) + cpu.get('writer', 0):.2f}",
                    f"{e['cpu'].get('server', 0):.2f} / — / — / "
                    f"{e['cpu'].get('bench (clients)', 0) + e['cpu'].get('writer', 0):.2f}",
                    ""])
    def logged(data: dict[str, Any]) -> str:
        found = data.get("server_log_warnings") or {}
        return (", ".join(f"{k}: {v['count']}" for k, v in found.items()) or "0")

    out.append(["servers' logs", "warnings, errors, tracebacks logged", logged(dist),
                logged(emb), ""])
    leases = dist.get("leases")
    if leases:
        out.append(["distributed", "workspaces counted per worker (shards held)",
                    ", ".join(f"{k}: {v} ({leases['shards_held'].get(k, 0)})"
                              for k, v in sorted(leases["workspaces_counted"].items())),
                    "", ""])
    pgc = dist.get("pg_cost")
    if pgc:
        lw, ev, rf = pgc["livecount_write"], pgc["refetch_per_write_event"], pgc["refetch"]
        name = "PostgreSQL per write"
        many = lw["16_in_flight"]
        out.append([name, "COUNT queries per write (livecount | refetch)", "0",
                    f"{ev['count_queries']:,.0f}", ""])
        out.append([name, "round trips / statements per write",
                    f"{lw['round_trips_per_write']:.1f} / {lw['statements_per_write']:.1f}",
                    f"{ev['count_queries']:,.0f} / {ev['count_queries']:,.0f}",
                    pgc_ratio(ev["count_queries"] / lw["round_trips_per_write"])])
        out.append([name, "rows written per write (all tables)",
                    f"{lw['rows_written_per_write']:.1f}", "0", ""])
        out.append([name, "time per write (wall, one at a time)",
                    f"{lw['wall_ms_p50']:.2f} ms", f"{ev['wall_ms']:,.0f} ms",
                    pgc_ratio(pgc["ratio_wall"])])
        out.append([name, "PostgreSQL CPU per write",
                    f"{lw['pg_cpu_ms_per_write']:.2f} ms", f"{ev['pg_cpu_ms']:,.0f} ms",
                    pgc_ratio(pgc["ratio_pg_cpu"])])
        out.append([name, "16 writes in flight (one Store): writes/s; round trips, PG CPU",
                    f"{many['writes_per_s']:,.0f}/s; "
                    f"{many['protocol_per_write']['round_trips']:.1f}, "
                    f"{many['pg_cpu_ms_per_write']:.2f} ms", "", ""])
        e2e = [r.get("pg_cpu_ms_per_write") for r in dist["runs"]]
        out.append([name, "PG CPU per write, end to end (per run)",
                    " / ".join(_f(x, ".2f") for x in e2e) + " ms", "", ""])
        out.append([name, "one client's refetch (views; per COUNT)",
                    f"{rf['one_client_wall_ms']:.1f} ms ({ev['views_per_client']:.0f}; "
                    f"{rf['per_count_ms']:.2f})", "", ""])
        out.append([name, "refetched counts equal livecount's",
                    f"{rf['matches_livecount']}/{rf['compared']}", "", ""])
    idle = results.get("idle")
    if idle:
        a, b = idle["active only"], idle["with idle"]
        for label, x, y in (("reconcile on", b, a),
                            ("reconcile off", b["reconcile_off"], a["reconcile_off"])):
            name = f"idle: {idle['active']} active (+ {idle['idle']:,} idle), {label}"
            out.append([name, f"commit → bus p50 / p99 @ {idle['rate']:g} writes/s",
                        f"{_f(x.get('bus_p50_ms'), '.2f')} / {_f(x.get('bus_p99_ms'), '.1f')} ms",
                        f"{_f(y.get('bus_p50_ms'), '.2f')} / {_f(y.get('bus_p99_ms'), '.1f')} ms",
                        _ratio(x.get("bus_p50_ms"), y.get("bus_p50_ms"))])
            out.append([name, "relay step p50 / p99",
                        f"{_f(x.get('step_p50_ms'), '.2f')} / {_f(x.get('step_p99_ms'), '.1f')}"
                        " ms",
                        f"{_f(y.get('step_p50_ms'), '.2f')} / {_f(y.get('step_p99_ms'), '.1f')}"
                        " ms", _ratio(x.get("step_p50_ms"), y.get("step_p50_ms"))])
            out.append([name, "CPU per write, net of the no-write CPU",
                        _f(x["net_cpu_ms_per_write"], ".2f", " ms"),
                        _f(y["net_cpu_ms_per_write"], ".2f", " ms"),
                        _ratio(x["net_cpu_ms_per_write"], y["net_cpu_ms_per_write"])])
            out.append([name, "CPU with no writes (reconciles/s)",
                        f"{x['quiet_cpu']:.1%} ({x['quiet_reconciles_per_s']:.1f})",
                        f"{y['quiet_cpu']:.1%} ({y['quiet_reconciles_per_s']:.1f})", ""])
        name = f"idle: {idle['active']} active (+ {idle['idle']:,} idle)"
        extra = b["quiet_cpu"] - a["quiet_cpu"]
        per = (extra / b["quiet_reconciles_per_s"] * 1000
               if b["quiet_reconciles_per_s"] else None)
        out.append([name, "scheduled reconcile of an idle workspace",
                    _f(per, ".1f", " ms CPU each") + f", {extra:.1%} of a core in all", "", ""])
        out.append([name, "RSS of the counting process per idle workspace",
                    f"{(b['rss_growth_mib'] - a['rss_growth_mib']) * 1024 / idle['idle']:.1f} "
                    "KiB", "", ""])
        out.append([name, "relay start (count every workspace)", f"{b['relay_start_s']:.1f} s",
                    f"{a['relay_start_s']:.2f} s", _ratio(b["relay_start_s"],
                                                          a["relay_start_s"], ",.0f")])
        out.append([name, f"create {idle['idle']:,} workspaces (Store API, SQLite)",
                    f"{b['create_workspaces_s']:.1f} s ({b['create_workspaces_per_s']:,.0f}/s)",
                    "", ""])
    return out


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be taken) as null, so the JSON is strict."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def pgc_ratio(value: Any) -> str:
    return f"{value:,.0f}×" if value else ""


def print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    load = results["load_before"]
    title = ("scale benchmark" + (" (--quick: scaled down, a smoke test)" if results["quick"]
                                  else "")
             + f" — 2 cores shared by servers, PostgreSQL, Redis and the load generator; "
               f"load average before: {load[0]:.2f}"
             + (" (other work was running)" if load[0] > 1 else ""))
    table = Table(title=title)
    headers = ("scenario", "figure", "distributed / measured", "embedded / baseline", "ratio")
    for name in headers:
        table.add_column(name, justify="left" if name in ("scenario", "figure") else "right")
    for row in results["rows"]:
        table.add_row(*row)
    console.print(table)
    dist = results["distributed"]
    console.print(
        f"distributed: {dist['clients']['connected']:,} clients over 3 gateways, 2 counter "
        f"workers ({dist.get('leases', {}).get('workspaces_counted')} workspaces each); "
        f"embedded: one `livecount serve` process (SQLite + memory). "
        f"Refetch baseline: every client of the workspace re-runs one COUNT per view it sees "
        f"after each write. Ratio: third column ÷ fourth, except the PostgreSQL rows "
        f"(refetch ÷ livecount).", highlight=False)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blue, grey, red, green = "#2f80ed", "#9aa5b1", "#eb5757", "#27ae60"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    dist, emb = results["distributed"], results["embedded"]

    ax = axes[0][0]
    for data, color, label in ((dist, blue, "distributed (PG + Redis, 3 gw + 2 workers)"),
                               (emb, grey, "embedded (SQLite + memory, 1 process)")):
        x = [r["committed_per_s"] for r in data["runs"]]
        for q, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
            y = [r["latency"].get(q, float("nan")) for r in data["runs"]]
            ax.plot(x, y, style, color=color, label=f"{label} {q[:3]}")
            for xi, yi in zip(x, y, strict=True):
                ax.annotate(f"{yi:.0f}", (xi, yi), fontsize=7, textcoords="offset points",
                            xytext=(3, 3))
    ax.set_yscale("log")
    ax.set_xlabel("writes committed per second")
    ax.set_ylabel("commit → client latency (ms, log)")
    ax.set_title(f"{dist['clients']['connected']:,} WebSocket clients, "
                 f"{dist['clients']['workspaces']} workspaces", fontsize=9)
    ax.legend(fontsize=6.5)

    ax = axes[0][1]
    asked = [r["asked_per_s"] for r in dist["runs"]]
    x = range(len(asked))
    dv = [r["committed_per_s"] for r in dist["runs"]]
    ev = [r["committed_per_s"] for r in emb["runs"]]
    ax.bar([j - 0.2 for j in x], dv, 0.4, color=blue, label="distributed")
    ax.bar([j + 0.2 for j in x], ev, 0.4, color=grey, label="embedded")
    for j, (a, b) in enumerate(zip(dv, ev, strict=True)):
        ax.text(j - 0.2, a, f"{a:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(j + 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=8)
        ax.plot([j - 0.45, j + 0.45], [asked[j], asked[j]], color=red, linestyle="--",
                linewidth=1)
    ax.set_xticks(list(x), [f"{a:g}/s asked" for a in asked])
    ax.set_ylabel("writes committed per second")
    ax.set_title("throughput (red: asked; 2 cores shared with the load generator)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1][0]
    pgc = dist.get("pg_cost")
    if pgc:
        lw, ev2 = pgc["livecount_write"], pgc["refetch_per_write_event"]
        labels = ["wall time", "PostgreSQL CPU"]
        lv = [lw["wall_ms_p50"], lw["pg_cpu_ms_per_write"]]
        rv = [ev2["wall_ms"], ev2["pg_cpu_ms"]]
        x = range(2)
        ax.bar([j - 0.2 for j in x], lv, 0.4, color=blue, label="livecount: the write")
        ax.bar([j + 0.2 for j in x], rv, 0.4, color=grey,
               label=f"refetch: {ev2['count_queries']:,.0f} COUNTs "
                     f"({ev2['clients_per_workspace']} clients × {ev2['views_per_client']:.0f} "
                     "views)")
        for j, (a, b) in enumerate(zip(lv, rv, strict=True)):
            ax.text(j - 0.2, a, f"{a:.2f} ms", ha="center", va="bottom", fontsize=8)
            ax.text(j + 0.2, b, f"{b:,.0f} ms\n({b / a:,.0f}×)" if a else f"{b:,.0f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels)
        ax.set_ylim(top=max(rv) * 30)
        ax.set_ylabel("ms of PostgreSQL per write event (log)")
        ax.set_title("database work per write vs 'every client refetches its counts'",
                     fontsize=9)
        ax.legend(fontsize=7)

    ax = axes[1][1]
    idle = results.get("idle")
    if idle:
        a, b = idle["active only"], idle["with idle"]
        labels = ["commit→bus p50", "commit→bus p99", "step p50", "CPU/write (net)"]
        keys = ["bus_p50_ms", "bus_p99_ms", "step_p50_ms", "net_cpu_ms_per_write"]
        av = [a.get(k, 0) for k in keys]
        bv = [b.get(k, 0) for k in keys]
        x = range(len(keys))
        ax.bar([j - 0.2 for j in x], av, 0.4, color=green, label=f"{idle['active']} active")
        ax.bar([j + 0.2 for j in x], bv, 0.4, color=blue,
               label=f"{idle['active']} active + {idle['idle']:,} idle")
        for j, (p, q) in enumerate(zip(av, bv, strict=True)):
            ax.text(j - 0.2, p, f"{p:.2f}", ha="center", va="bottom", fontsize=7)
            ax.text(j + 0.2, q, f"{q:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"idle workspaces: {idle['rate']:g} writes/s in one process "
                     f"(no writes: CPU {a['quiet_cpu']:.1%} vs {b['quiet_cpu']:.1%})",
                     fontsize=9)
        ax.legend(fontsize=8)
    load = results["load_before"][0]
    fig.suptitle("livecount at scale: PostgreSQL + Redis + 3 gateways + 2 workers vs embedded"
                 + (" (--quick)" if results["quick"] else "")
                 + f" — 2 cores, load before {load:.2f}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


async def run_all(scale: Scale, quick: bool, ui: UI, only: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "scale": asdict(scale)}
    with tempfile.TemporaryDirectory(prefix="livecount-scale-") as name:
        tmp = Path(name)
        try:
            if "distributed" in only:
                results["distributed"] = await deployment("distributed", scale, tmp, ui)
            ui.phase_done()
            if "embedded" in only:
                results["embedded"] = await deployment("embedded", scale, tmp, ui)
            ui.phase_done()
            if "idle" in only:
                results["idle"] = await idle_workspaces(scale, tmp, ui)
            ui.phase_done()
        except BaseException:
            keep = Path(tempfile.mkdtemp(prefix="livecount-scale-logs-"))

            def copy_logs() -> None:
                for log in tmp.rglob("*.log"):
                    shutil.copy(log, keep / f"{log.parent.name}-{log.name}")

            await asyncio.to_thread(copy_logs)
            ui.say(f"[red]failed; the servers' logs are in {keep}[/]")
            raise
        finally:
            await C.stop_all()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="everything scaled down (≤ 60 s)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy record the servers during each measured run (raw "
                             "collapsed stacks in DIR)")
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append",
                        help="run only these scenarios (writes scale-partial.json in --output, "
                             "no table or chart)")
    parser.add_argument("--replot", action="store_true",
                        help="print the table and redraw the chart from the JSON; run nothing")
    args = parser.parse_args()
    from rich.console import Console

    console = Console(width=max(140, shutil.get_terminal_size().columns))
    suffix = "-quick" if args.quick else ""
    json_path = args.output / f"scale{suffix}.json"
    if args.replot:
        results = json.loads(json_path.read_text())
        results["rows"] = rows(results)
        print_table(results, console)
        chart(results, args.output / f"scale{suffix}.png")
        json_path.write_text(json.dumps(_finite(results), indent=2, default=str) + "\n")
        return
    global PROFILE
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE = args.profile
    load = os.getloadavg()
    scale = QUICK if args.quick else FULL
    C.raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    import uvloop

    with UI(console, phases=3) as ui:
        if load[0] > 1:
            ui.say(f"[yellow]load average {load[0]:.2f} before the start: other work is "
                   "running on this machine; the figures are lower than on a quiet one[/]")
        if args.quick:
            ui.say("[yellow]--quick: scaled down (see 'scale' in the JSON): a smoke test[/]")
        try:
            only = set(args.only or SCENARIOS)
            results = uvloop.run(run_all(scale, args.quick, ui, only))
        finally:
            C.kill_all_now()
    results["load_before"] = list(load)
    results["load_after"] = list(os.getloadavg())
    results["other_work_running"] = load[0] > 1
    results["seconds"] = time.perf_counter() - started
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    results["command"] = "python bench/scale.py" + (" --quick" if args.quick else "")
    results["notes"] = [
        "2 cores shared by PostgreSQL, Redis, the livecount processes, the writer and the "
        "WebSocket clients (this process): the load generator competes with the servers.",
        "commit → client: receive time minus the outbox entry's committed_at (store clock "
        "inside the write transaction), one sample per (write, client of its workspace).",
        "writes committed /s: outbox entries committed in the measured window / window.",
        "PostgreSQL CPU: psutil CPU time of the backend processes (pg_stat_activity) of the "
        "benchmark's database (10 ms ticks: summed over many writes). Round trips and "
        "statements per write: counted by a proxy reading the PostgreSQL protocol (Q and S "
        "messages are round trips; Q and E are statements, BEGIN and COMMIT included); rows "
        "per write: pg_stat_user_tables.",
        "refetch: for each write, every client of the workspace runs one COUNT per plain "
        "view and one GROUP BY per grouped view it sees ($me bound to its teammate), "
        "measured per client on the same data and multiplied by the clients per workspace.",
    ] + (["load average above 1 before the start: other tests were running on the machine"]
         if load[0] > 1 else [])
    args.output.mkdir(parents=True, exist_ok=True)
    if only != SCENARIOS:
        partial = args.output / "scale-partial.json"
        partial.write_text(json.dumps(_finite(results), indent=2, default=str) + "\n")
        console.print(f"wrote {partial}")
        return
    results["rows"] = rows(results)
    print_table(results, console)
    json_path.write_text(json.dumps(_finite(results), indent=2, default=str) + "\n")
    chart(results, args.output / f"scale{suffix}.png")
    console.print(f"wrote {json_path} and scale{suffix}.png in {results['seconds']:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: every process the benchmark started has been stopped")

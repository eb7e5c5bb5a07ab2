"""API writes per process (DESIGN §7): PATCH through a real ``livecount serve`` over HTTP,
against a trivial endpoint of the same app and the same transaction in a raw driver loop.

    .venv/bin/python bench/writes.py            # SQLite and PostgreSQL, 3 rounds (~3 min)
    .venv/bin/python bench/writes.py --quick    # shorter rounds, one store each (≤ 60 s)
    .venv/bin/python bench/writes.py --store sqlite --store postgresql://postgres@host/db
    .venv/bin/python bench/writes.py --profile  # + py-spy of the server during one PATCH run

DESIGN §7: "API writes (PATCH) per process, embedded default, load from another process:
≥ 27% of a trivial endpoint of the same app (≈ 3,000/s here)".

For each store (``sqlite``: a fresh file in a temporary directory; ``postgresql://…``: a fresh
database ``livecount_bench_writes_<pid>`` created on that server and dropped at the end):

1. ``livecount serve --store URL --log-level warning`` (the embedded default: one process,
   memory counter state and bus, the relay counting every write; access log off) starts in
   a subprocess pinned to one core; the load generator runs pinned to the other core.
2. Through the API: a workspace, a teammate, ``--conversations`` conversations (200).
3. Rounds, alternating (so both figures see the same machine): ``GET /healthz`` — the
   trivial endpoint, through the same middleware stack — then ``PATCH
   /api/workspaces/{ws}/conversations/{id}`` with a teammate token, 16 connections, for
   ``--duration`` seconds each. Every PATCH changes the conversation (each load thread owns
   a share of the conversations and flips their ``state`` open ⇄ closed), so every write
   commits a row and an outbox entry; the bench checks afterwards that the outbox grew by
   exactly the number of 200s. One more PATCH run on ONE connection gives the unloaded
   latency. p50/p99 are the load generator's (wrk's latency distribution).
4. The server's CPU use over each run (psutil): the server should hold its core; writes per
   server-CPU-second are shown too, a figure a busy machine disturbs less than writes/s.
5. After the server stopped: the same write transaction in a raw driver loop (sqlite3 or
   psycopg, no pool, no ORM, no HTTP) on the same database, pinned to the server's core:
   BEGIN (IMMEDIATE), read the row and its three side tables, UPDATE the row, INSERT the
   outbox row with the before/after images as JSON (PostgreSQL: FOR UPDATE and the outbox
   advisory lock + NOTIFY too), COMMIT.

The load generator is ``wrk`` (apt-get install wrk) when it is on the PATH, else a built-in
asyncio HTTP/1.1 client (two processes of keep-alive connections; slower, so the healthz
figure is then the client's limit, which the table says).

Writes bench/results/writes.json and writes.png (writes-quick.* with --quick) and prints a
table; ``--profile`` also writes writes-profile.svg (py-spy flamegraph of the server during
a PATCH run) and writes-profile.txt (the same samples summarized).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ADMIN_TOKEN = "lc_admin_bench_writes_0123456789"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_SHARE = 0.27
TARGET_WRITES = 3000.0


# -- processes ---------------------------------------------------------------------------------


def cpus() -> tuple[set[int], set[int]]:
    """(server core, load core): the first allowed CPU for the server, the rest for load."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return {allowed[0]}, set(allowed[1:]) or {allowed[0]}


def pinned(cpu_set: set[int]) -> Any:
    def pin() -> None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpu_set)
    return pin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``livecount serve`` in a subprocess on the server core."""

    def __init__(self, store_url: str, log: Path, core: set[int]) -> None:
        self.port = free_port()
        self.log = log
        env = dict(os.environ, LIVECOUNT_ADMIN_TOKEN=ADMIN_TOKEN)
        argv = [sys.executable, "-m", "livecount", "serve", "--host", "127.0.0.1",
                "--port", str(self.port), "--store", store_url, "--log-level", "warning"]
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env, preexec_fn=pinned(core), start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"{self.url}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{self.tail()}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


# -- the workspace -----------------------------------------------------------------------------


def seed(url: str, conversations: int) -> dict[str, Any]:
    import httpx

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        def ok(response: httpx.Response) -> dict[str, Any]:
            response.raise_for_status()
            body: dict[str, Any] = response.json()
            return body

        workspace = ok(client.post("/api/workspaces", json={"name": "writes"}, headers=admin))
        mate = ok(client.post(f"/api/workspaces/{workspace['id']}/teammates",
                              json={"name": "Ann", "email": "ann@writes.test"}, headers=admin))
        headers = {"Authorization": f"Bearer {mate['token']}"}
        ids = [ok(client.post(f"/api/workspaces/{workspace['id']}/conversations", json={},
                              headers=headers))["id"] for _ in range(conversations)]
    return {"workspace": workspace["id"], "token": mate["token"], "ids": ids,
            "states": {i: "open" for i in ids}}


def current_states(url: str, world: dict[str, Any]) -> None:
    """Read every conversation's state into ``world`` (a PATCH run starts from them, so each
    of its writes changes the state)."""
    import httpx

    headers = {"Authorization": f"Bearer {world['token']}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in world["ids"]:
            answer = client.get(f"/api/workspaces/{world['workspace']}/conversations/{i}",
                                headers=headers)
            answer.raise_for_status()
            world["states"][i] = answer.json()["state"]


# -- load: wrk ---------------------------------------------------------------------------------

_WRK_DONE = """
done = function(summary, latency, requests)
  local out = {requests = summary.requests, duration_us = summary.duration,
    errors_connect = summary.errors.connect, errors_read = summary.errors.read,
    errors_write = summary.errors.write, errors_status = summary.errors.status,
    errors_timeout = summary.errors.timeout, p50_us = latency:percentile(50),
    p90_us = latency:percentile(90), p99_us = latency:percentile(99),
    max_us = latency.max, mean_us = latency.mean}
  local parts = {}
  for k, v in pairs(out) do parts[#parts + 1] = string.format('"%s": %s', k, v) end
  io.write("WRKJSON {" .. table.concat(parts, ", ") .. "}\\n")
end
"""

_WRK_PATCH = """
local ws = %(workspace)d
local token = "%(token)s"
local ids = {%(ids)s}
local start = {%(states)s}
local created = 0
function setup(thread)
  thread:set("index", created)
  thread:set("nthreads", %(threads)d)
  created = created + 1
end
function init(args)
  own = {}
  for i = 1, #ids do
    if (i - 1) %% nthreads == index then own[#own + 1] = ids[i] end
  end
  state = {}
  for i = 1, #ids do state[ids[i]] = start[i] end
  next_one = 1
end
request = function()
  local id = own[next_one]
  next_one = next_one %% #own + 1
  local now = state[id] == "closed" and "open" or "closed"
  state[id] = now
  return wrk.format("PATCH", "/api/workspaces/" .. ws .. "/conversations/" .. id,
    {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"},
    '{"state": "' .. now .. '"}')
end
"""


def wrk_script(path: Path, world: dict[str, Any] | None, threads: int) -> Path:
    text = _WRK_DONE
    if world is not None:
        text = _WRK_PATCH % {"workspace": world["workspace"], "token": world["token"],
                             "ids": ", ".join(map(str, world["ids"])),
                             "states": ", ".join(f'"{world["states"][i]}"'
                                                 for i in world["ids"]),
                             "threads": threads} + text
    path.write_text(text)
    return path


def run_wrk(url: str, script: Path, connections: int, threads: int, seconds: float,
            core: set[int]) -> dict[str, Any]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pinned(core),
                          check=False)
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON "):])
            break
    else:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    seconds_run = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    return {"requests": raw["requests"], "seconds": seconds_run,
            "per_s": raw["requests"] / seconds_run, "non_2xx": raw["errors_status"],
            "errors": errors, "ok": raw["requests"] - raw["errors_status"],
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "max_ms": raw["max_us"] / 1000}


# -- load: the built-in client (no wrk) --------------------------------------------------------


async def _client_main(config: dict[str, Any]) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 connections, one request in flight each, for ``seconds``."""
    host, port = config["host"], config["port"]
    world = config.get("world")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    stop_at = time.perf_counter() + config["seconds"]
    own = config.get("ids", [])

    def requests(k: int) -> Any:
        if world is None:
            line = f"GET {config['path']} HTTP/1.1\r\nHost: b\r\n\r\n".encode()
            while True:
                yield line
        mine = own[k::config["connections"]] or own
        state = {i: world["states"][str(i)] for i in mine}
        while True:
            for cid in mine:
                state[cid] = now = "closed" if state[cid] == "open" else "open"
                body = f'{{"state": "{now}"}}'.encode()
                yield (f"PATCH /api/workspaces/{world['workspace']}/conversations/{cid} "
                       f"HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {world['token']}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                       "\r\n").encode() + body

    async def connection(k: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for request in requests(k):
                if time.perf_counter() >= stop_at:
                    return
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                statuses[int(head[9:12])] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(k) for k in range(config["connections"])))
    return {"latencies": latencies, "statuses": dict(statuses),
            "seconds": time.perf_counter() - started}


def run_builtin(url: str, world: dict[str, Any] | None, connections: int, seconds: float,
                core: set[int], tmp: Path) -> dict[str, Any]:
    processes = 2
    port = int(url.rsplit(":", 1)[1])
    children = []
    for p in range(processes):
        share = (world or {}).get("ids", [])[p::processes]
        config = {"host": "127.0.0.1", "port": port, "path": "/healthz", "world": world,
                  "ids": share, "connections": max(1, connections // processes),
                  "seconds": seconds}
        path = tmp / f"client-{p}.json"
        path.write_text(json.dumps(config))
        children.append(subprocess.Popen(
            [sys.executable, __file__, "_client", str(path)], stdout=subprocess.PIPE,
            preexec_fn=pinned(core)))
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    run_seconds = 0.0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        part = json.loads(out)
        latencies += part["latencies"]
        statuses.update({int(k): v for k, v in part["statuses"].items()})
        run_seconds = max(run_seconds, part["seconds"])
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    total = sum(statuses.values())
    ok = sum(v for k, v in statuses.items() if 200 <= k < 400)
    return {"requests": total, "seconds": run_seconds, "per_s": total / run_seconds,
            "non_2xx": total - ok, "errors": total - ok, "ok": ok, "p50_ms": pct(0.5),
            "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": latencies[-1] * 1000}


# -- the raw driver loop -----------------------------------------------------------------------

_COLUMNS = ("id, workspace_id, version, state, assignee_id, team_id, author_id, priority, "
            "channel, created_at, updated_at, waiting_since, snoozed_until")


def raw_loop(store_url: str, workspace: int, ids: list[int], seconds: float) -> dict[str, Any]:
    """The write transaction of a PATCH {"state": …} on the bare driver, one per loop."""
    import msgspec

    postgres = store_url.startswith("postgres")
    if postgres:
        import psycopg

        from livecount.store.postgres import OUTBOX_CHANNEL, OUTBOX_LOCK_KEY

        conn: Any = psycopg.connect(store_url.replace("postgresql+psycopg", "postgresql"))
        mark, begin, lock = "%s", None, " FOR UPDATE"
    else:
        import sqlite3

        conn = sqlite3.connect(store_url.split("///", 1)[1], isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        mark, begin, lock = "?", "BEGIN IMMEDIATE", ""
    q = {
        "row": f"SELECT {_COLUMNS} FROM conversations WHERE id = {mark} AND "
               f"workspace_id = {mark}{lock}",
        "tags": f"SELECT tag FROM conversation_tags WHERE conversation_id = {mark}",
        "people": f"SELECT field, teammate_id FROM conversation_people WHERE "
                  f"conversation_id = {mark}",
        "custom": f"SELECT key, text_value, num_value, bool_value FROM conversation_custom "
                  f"WHERE conversation_id = {mark}",
        "update": f"UPDATE conversations SET state = {mark}, version = {mark}, "
                  f"updated_at = {mark} WHERE id = {mark} AND version = {mark}",
        "outbox": f"INSERT INTO outbox (workspace_id, kind, entity_id, version, before, after, "
                  f"committed_at) VALUES ({', '.join([mark] * 7)})",
    }
    names = _COLUMNS.split(", ")
    encode = msgspec.json.encode
    cursor = conn.cursor()
    rng = random.Random(5)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            for _ in range(50):
                cid = rng.choice(ids)
                if begin:
                    cursor.execute(begin)
                cursor.execute(q["row"], (cid, workspace))
                row = cursor.fetchone()
                image = dict(zip(names, row, strict=True))
                cursor.execute(q["tags"], (cid,))
                image["tags"] = sorted(t for (t,) in cursor.fetchall())
                cursor.execute(q["people"], (cid,))
                people = cursor.fetchall()
                image["mentions"] = sorted(t for f, t in people if f == "mentions")
                image["unread_by"] = sorted(t for f, t in people if f == "unread_by")
                cursor.execute(q["custom"], (cid,))
                image["custom"] = {k: next(v for v in rest if v is not None)
                                   for k, *rest in cursor.fetchall()}
                now = time.time_ns() // 1000
                after = dict(image, state="closed" if image["state"] == "open" else "open",
                             version=image["version"] + 1, updated_at=now)
                cursor.execute(q["update"], (after["state"], after["version"], now, cid,
                                             image["version"]))
                if postgres:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s), pg_notify(%s, %s)",
                                   (OUTBOX_LOCK_KEY, OUTBOX_CHANNEL, "bench"))
                cursor.execute(q["outbox"], (workspace, "conversation", cid, after["version"],
                                             encode(image).decode(), encode(after).decode(),
                                             now))
                conn.commit() if postgres else cursor.execute("COMMIT")
                count += 1
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    return {"transactions": count, "seconds": elapsed, "per_s": count / elapsed,
            "us_each": elapsed / count * 1e6}


def outbox_size(store_url: str) -> int:
    if store_url.startswith("postgres"):
        import psycopg

        with psycopg.connect(store_url) as conn:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    else:
        import sqlite3

        conn2 = sqlite3.connect(store_url.split("///", 1)[1])
        try:
            row = conn2.execute("SELECT count(*) FROM outbox").fetchone()
        finally:
            conn2.close()
    assert row is not None
    return int(row[0])


# -- PostgreSQL: a fresh database ----------------------------------------------------------------


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Any:
    import psycopg
    from psycopg import sql

    name = f"livecount_bench_writes_{os.getpid()}"
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = admin_url.partition("?")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(drop)


def postgres_error(url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3):
            return None
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# -- one store -----------------------------------------------------------------------------------


def profile(server: Server, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy the server for ``seconds``: flamegraph SVG + collapsed stacks summarized."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = out.with_suffix(".raw")
    subprocess.run([spy, "record", "-p", str(server.proc.pid), "-d", str(round(seconds)),
                    "-r", "250", "-f", "raw", "-o", str(raw), "--threads"], check=True,
                   capture_output=True)
    return {"raw": str(raw)}


#: Innermost frames of a thread that is waiting, not working (py-spy's own idle detection
#: does not work in every VM, so idle samples are recorded and dropped here): a worker
#: waiting for work, the event loop in epoll, threads waiting on a lock, an event or a
#: selector (PostgreSQL's LISTEN thread).
IDLE_FRAMES = ("_worker (concurrent/futures/thread.py:81)", "Runner.run (asyncio/runners.py:",
               "Condition.wait (threading.py", "Event.wait (threading.py",
               ".select (selectors.py", "_wait_for_tstate_lock (threading.py")


def summarize_profile(raw: Path, svg: Path, txt: Path, title: str) -> None:
    """The collapsed stacks, idle samples dropped: shares per thread and function as text,
    and an icicle graph as SVG. (``Runner.run`` as the innermost frame is uvloop's C code:
    waiting in epoll, or parsing HTTP; counted as idle, so the loop's share is a floor.)"""
    stacks: list[tuple[list[str], int]] = []
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if frames[0].startswith("thread ("):  # "thread (0x7f..): name" → the name
            frames[0] = "thread " + frames[0].rpartition(": ")[2]
        if any(marker in frames[-1] for marker in IDLE_FRAMES):
            idle += int(count)
            continue
        stacks.append((frames, int(count)))
    total = sum(n for _, n in stacks) or 1
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, n in stacks:
        threads[frames[0]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{title}: {total} busy samples (py-spy, 250 Hz, --threads; {idle} idle samples "
             "dropped); shares of the busy samples", "", "threads:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    lines += ["", "inclusive (a function and everything it calls), top 90:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(90)]
    lines += ["", "self (the innermost frame), top 40:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(40)]
    txt.write_text("\n".join(lines) + "\n")
    _flamegraph(stacks, svg, title)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _flamegraph(stacks: list[tuple[list[str], int]], path: Path, title: str) -> None:
    """A minimal icicle SVG of collapsed stacks (root on top), no external tools."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for frames, n in stacks:
        node = tree
        node["n"] += n
        for frame in frames:
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += n
    width, row = 1600.0, 16
    rects: list[str] = []
    depth_max = 0

    def walk(node: dict[str, Any], name: str, x: float, depth: int) -> None:
        nonlocal depth_max
        w = width * node["n"] / max(tree["n"], 1)
        if w < 0.5:
            return
        depth_max = max(depth_max, depth)
        y = 30 + depth * row
        hue = 20 + sum(map(ord, name.split(" (")[0])) % 40  # stable across runs
        share = node["n"] / max(tree["n"], 1)
        shown = name if w > 7 * len(name) else name[: max(0, int(w / 7) - 2)]
        rects.append(f'<g><title>{_xml(name)} ({share:.1%})</title><rect x="{x:.1f}" '
                     f'y="{y}" width="{w:.1f}" height="{row - 1}" fill="hsl({hue},80%,60%)"/>'
                     f'<text x="{x + 2:.1f}" y="{y + 12}" font-size="11">{_xml(shown)}</text>'
                     '</g>')
        for kid_name, kid in sorted(node["kids"].items()):
            walk(kid, kid_name, x, depth + 1)
            x += width * kid["n"] / max(tree["n"], 1)

    x = 0.0
    for name, kid in sorted(tree["kids"].items()):
        walk(kid, name, x, 0)
        x += width * kid["n"] / max(tree["n"], 1)
    height = 40 + (depth_max + 1) * row
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace"><text x="4" y="18" font-size="13">{_xml(title)} — hover '
        f'for shares</text>{"".join(rects)}</svg>\n')


def bench_store(label: str, store_url: str, args: argparse.Namespace, tmp: Path,
                console: Any, progress: Any) -> dict[str, Any]:
    server_core, load_core = cpus()
    load_threads = 2
    use_wrk = shutil.which("wrk") is not None and not args.builtin_client
    server = Server(store_url, tmp / f"server-{label}.log", server_core)
    result: dict[str, Any] = {"store": label, "rounds": []}
    try:
        with console.status(f"{label}: seeding {args.conversations} conversations over HTTP…"):
            world = seed(server.url, args.conversations)
        patch_url = server.url

        def load(world_or_none: dict[str, Any] | None, connections: int, seconds: float,
                 what: str, on_start: Any = None) -> dict[str, Any]:
            if world_or_none is not None:
                current_states(server.url, world_or_none)
            if on_start is not None:
                on_start()
            task = progress.add_task(f"{label}: {what}", total=seconds)
            cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
            done = False

            def tick() -> None:
                while not done:
                    progress.update(task, completed=min(seconds, time.perf_counter() - wall0))
                    time.sleep(0.2)

            import threading

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
            try:
                if use_wrk:
                    threads = min(load_threads, connections)
                    script = wrk_script(tmp / f"{what.split()[0]}-{connections}.lua",
                                        world_or_none, threads)
                    url = patch_url if world_or_none is not None else f"{server.url}/healthz"
                    out = run_wrk(url, script, connections, threads, seconds, load_core)
                else:
                    out = run_builtin(server.url, world_or_none, connections, seconds,
                                      load_core, tmp)
            finally:
                done = True
                ticker.join()
                progress.update(task, completed=seconds, visible=False)
            out["server_cpu"] = (server.cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
            out["per_cpu_s"] = out["ok"] / max(out["server_cpu"] * out["seconds"], 1e-9)
            return out

        load(world, args.connections, min(3.0, args.duration), "warm-up PATCH")
        load(None, args.connections, 1.0, "warm-up healthz")
        before = outbox_size(store_url)
        ok_writes = 0
        for r in range(args.rounds):
            health = load(None, args.connections, args.duration, f"healthz round {r + 1}")
            writes = load(world, args.connections, args.duration, f"PATCH round {r + 1}")
            ok_writes += writes["ok"]
            result["rounds"].append({"healthz": health, "patch": writes})
        single = load(world, 1, max(2.0, args.duration / 2), "PATCH on one connection")
        ok_writes += single["ok"]
        result["single"] = single
        if args.profile:
            import threading

            spied: dict[str, Any] = {}
            spy = threading.Thread(target=lambda: spied.update(
                profile(server, args.duration - 1, tmp / f"profile-{label}")))

            def start_spy() -> None:
                spy.start()
                time.sleep(0.5)  # py-spy attaches

            spied_run = load(world, args.connections, args.duration, "PATCH (profiled)",
                             start_spy)
            spy.join()
            ok_writes += spied_run["ok"]
            result["profiled_run"] = spied_run
            result["profile_raw"] = spied["raw"]
    finally:
        server.stop()
    after = outbox_size(store_url)
    result["outbox_rows_added"] = after - before
    result["writes_ok"] = ok_writes
    runs = 2 + args.rounds + (1 if args.profile else 0)
    result["in_flight_max"] = runs * args.connections
    ids = world["ids"]
    with console.status(f"{label}: the same transaction in a raw driver loop…"):
        here = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if here is not None:
            os.sched_setaffinity(0, server_core)
        try:
            result["raw"] = raw_loop(store_url, world["workspace"], ids, args.raw_seconds)
        finally:
            if here is not None:
                os.sched_setaffinity(0, here)
    result["load_generator"] = "wrk" if use_wrk else "built-in asyncio client (2 processes)"
    rounds = result["rounds"]
    result["healthz_per_s"] = statistics.median(r["healthz"]["per_s"] for r in rounds)
    result["patch_per_s"] = statistics.median(r["patch"]["per_s"] for r in rounds)
    result["ratios"] = [r["patch"]["per_s"] / r["healthz"]["per_s"] for r in rounds]
    result["ratio"] = statistics.median(result["ratios"])
    best = sorted(rounds, key=lambda r: r["patch"]["per_s"])[len(rounds) // 2]["patch"]
    result["patch_median_round"] = best
    result["raw_ratio"] = result["patch_per_s"] / result["raw"]["per_s"]
    return result


# -- output --------------------------------------------------------------------------------------


def table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    quick = " (--quick)" if results["quick"] else ""
    t = Table(title=f"API writes per process{quick}: PATCH over HTTP vs GET /healthz vs raw "
                    f"driver loop — server on one core, load on the other")
    for name in ("store", "figure", "per s", "ratio", "p50", "p99", "server CPU", "target", ""):
        t.add_column(name, justify="left" if name in ("store", "figure") else "right")
    for r in results["stores"]:
        best = r["patch_median_round"]
        health = statistics.median(x["healthz"]["p50_ms"] for x in r["rounds"])
        health99 = statistics.median(x["healthz"]["p99_ms"] for x in r["rounds"])
        cpu_h = statistics.median(x["healthz"]["server_cpu"] for x in r["rounds"])
        met = r["ratio"] >= TARGET_SHARE and r["patch_per_s"] >= TARGET_WRITES * (
            0 if results["quick"] else 1)
        mark = "[green]met[/]" if met else "[red]missed[/]"
        rounds = " / ".join(f"{x['patch']['per_s']:,.0f}" for x in r["rounds"])
        t.add_row(r["store"], f"PATCH, {results['connections']} connections (rounds: "
                              f"{rounds})", f"[b]{r['patch_per_s']:,.0f}[/b]",
                  f"{r['ratio']:.0%} of healthz", f"{best['p50_ms']:.1f} ms",
                  f"{best['p99_ms']:.1f} ms", f"{best['server_cpu']:.0%}",
                  f"≥ {TARGET_SHARE:.0%}, ≥ {TARGET_WRITES:,.0f}/s",
                  mark if r["store"] == "sqlite" else "")
        t.add_row("", "  per server-CPU-second", f"{best['per_cpu_s']:,.0f}", "", "", "", "",
                  "", "")
        s = r["single"]
        t.add_row("", "PATCH, 1 connection (unloaded latency)", f"{s['per_s']:,.0f}", "",
                  f"{s['p50_ms']:.2f} ms", f"{s['p99_ms']:.2f} ms", f"{s['server_cpu']:.0%}",
                  "", "")
        t.add_row("", "GET /healthz (trivial endpoint, same app)",
                  f"{r['healthz_per_s']:,.0f}", "1", f"{health:.1f} ms", f"{health99:.1f} ms",
                  f"{cpu_h:.0%}", "", "")
        t.add_row("", "the same transaction, raw driver loop", f"{r['raw']['per_s']:,.0f}",
                  f"PATCH = {r['raw_ratio']:.0%}", f"{r['raw']['us_each']:.0f} µs each", "",
                  "", "", "")
        check = r["writes_ok"] <= r["outbox_rows_added"] <= r["writes_ok"] + r["in_flight_max"]
        t.add_row("", "outbox rows added ≈ 200 answers (+ in flight at the end of a run)",
                  f"{r['outbox_rows_added']:,} ≈ {r['writes_ok']:,}",
                  "[green]✓[/]" if check else "[red]✗[/]", "", "", "", "", "")
    console.print(t)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = results["stores"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    labels = ["GET /healthz", "PATCH (HTTP)", "raw driver loop"]
    colors = ["#9aa5b1", "#2f80ed", "#56ccf2"]
    width = 0.8 / max(len(stores), 1)
    for i, r in enumerate(stores):
        values = [r["healthz_per_s"], r["patch_per_s"], r["raw"]["per_s"]]
        xs = [j + (i - (len(stores) - 1) / 2) * width for j in range(3)]
        bars = ax.bar(xs, values, width, color=colors, edgecolor="black",
                      hatch="" if i == 0 else "//", label=r["store"])
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v / 1000:.1f}k", ha="center",
                    va="bottom", fontsize=7)
    ax.axhline(TARGET_WRITES, color="#eb5757", linestyle="--", linewidth=1)
    ax.text(2.4, TARGET_WRITES, " 3,000/s", color="#eb5757", fontsize=7, va="bottom")
    ax.set_yscale("log")
    ax.set_xticks(range(3), labels)
    ax.set_ylabel("per second (log)")
    ax.set_title("throughput (hatched: PostgreSQL)" if len(stores) > 1 else "throughput",
                 fontsize=9)
    ax = axes[1]
    names = []
    p50, p99 = [], []
    for r in stores:
        for what, run in (("16 conn", r["patch_median_round"]), ("1 conn", r["single"])):
            names.append(f"{r['store']}\n{what}")
            p50.append(run["p50_ms"])
            p99.append(run["p99_ms"])
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, color="#2f80ed", label="p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, color="#eb5757", label="p99")
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("PATCH latency (ms)")
    ax.set_title("write latency at the load generator", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle("livecount API writes per process" + (" (--quick)" if results["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_client":
        config = json.loads(Path(sys.argv[2]).read_text())
        try:
            import uvloop

            out = uvloop.run(_client_main(config))
        except ImportError:
            out = asyncio.run(_client_main(config))
        sys.stdout.write(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ≤ 60 s smoke run")
    parser.add_argument("--store", action="append", default=None,
                        help="'sqlite' or a postgresql:// URL of a server to create a fresh "
                             "database on (repeatable; default: sqlite and "
                             f"{DEFAULT_POSTGRES} when reachable)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--raw-seconds", type=float, default=None)
    parser.add_argument("--builtin-client", action="store_true",
                        help="use the built-in asyncio client even when wrk is installed")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the server during one more PATCH run (pip install "
                             "py-spy); writes writes-profile.svg/.txt")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.raw_seconds = args.raw_seconds or (2.0 if args.quick else 5.0)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(width=max(150, shutil.get_terminal_size().columns))
    stores = args.store or ["sqlite", DEFAULT_POSTGRES]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "writes", "quick": args.quick,
        "command": "python bench/writes.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "connections": args.connections, "conversations": args.conversations,
        "duration_s": args.duration, "rounds": args.rounds,
        "target": "API writes (PATCH) per process, embedded default: ≥ 27% of a trivial "
                  "endpoint of the same app (≈ 3,000/s) (DESIGN §7)",
        "stores": [], "skipped": {}}
    server_core, load_core = cpus()
    generator = "wrk" if shutil.which("wrk") and not args.builtin_client else "built-in"
    console.print(f"server on CPU {sorted(server_core)}, load on CPU {sorted(load_core)}; "
                  f"load generator: {generator}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="livecount-writes-bench-") as tmp_name, \
            Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                     console=console, transient=True) as progress:
        tmp = Path(tmp_name)
        for store in stores:
            if store == "sqlite":
                results["stores"].append(bench_store(
                    "sqlite", f"sqlite:///{tmp}/writes.db", args, tmp, console, progress))
            elif store.startswith(("postgresql://", "postgres://")):
                problem = postgres_error(store)
                if problem is not None:
                    console.print(f"[yellow]PostgreSQL skipped: {problem}[/]")
                    results["skipped"]["postgresql"] = problem
                    continue
                with fresh_postgres(store) as url:
                    results["stores"].append(bench_store("postgresql", url, args, tmp, console,
                                                         progress))
            else:
                parser.error(f"--store {store!r}: expected 'sqlite' or a postgresql:// URL")
            r = results["stores"][-1]
            console.print(f"{r['store']}: PATCH {r['patch_per_s']:,.0f}/s, healthz "
                          f"{r['healthz_per_s']:,.0f}/s ({r['ratio']:.0%}), raw loop "
                          f"{r['raw']['per_s']:,.0f}/s")
            if args.profile and "profile_raw" in r:
                suffix = "" if r["store"] == "sqlite" else f"-{r['store']}"
                raw = Path(r.pop("profile_raw"))
                summarize_profile(raw, args.output / f"writes-profile{suffix}.svg",
                                  args.output / f"writes-profile{suffix}.txt",
                                  f"livecount serve ({r['store']}) during PATCH load")
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()[0]
    table(results, console)
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.output / f"writes{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.output / f"writes{suffix}.png")
    console.print(f"wrote {args.output}/writes{suffix}.json and writes{suffix}.png "
                  f"in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()

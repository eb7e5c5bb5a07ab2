"""Outbox appends across processes on PostgreSQL: what the lock that keeps positions in commit
order costs, with a group commit's appends made at each write (the old way) or deferred to one
statement right before COMMIT (the default), beside the same writes with no lock at all (an
upper bound: unsafe, a reader could skip an entry) and the lock's bare ceiling.

    .venv/bin/python bench/appends.py             # 3 rounds of 5 s per configuration (~4 min)
    .venv/bin/python bench/appends.py --quick     # 1 round of 3 s (~1 min)

Each writer process opens its own store (its own pool and writer thread, as a gateway does)
and patches conversations of its own (so writers contend on nothing but the outbox) with
``--in-flight`` calls at once (16: a gateway under load; the calls of one event-loop turn form
one group commit), for ``--seconds``. Configurations, each from 1 and from 3 processes:

- ``deferred``: the store as shipped (``defer_appends``): the group's rows in one INSERT after
  its last write, the outbox lock taken right before it, held to COMMIT;
- ``at each write``: the same with ``defer_appends`` off: each write appends as it goes, so the
  lock is held from the group's first append over every later write's round trips;
- ``no lock``: ``serialize_appends`` off, deferred: what the writes cost without the lock;
- ``lock only``: processes that only take the lock, notify, insert one row and commit (psycopg,
  no livecount code): the ceiling the lock itself puts on commits/s.

Rounds alternate between configurations (a noisy neighbour hurts them alike); the table shows
the median of each and its ratio to ``no lock`` from as many processes, in the same run.
Writes bench/results/appends.json and appends.png (appends-quick.* with --quick).
PostgreSQL: a scratch database ``livecount_bench_appends_<pid>`` on ``$LIVECOUNT_TEST_POSTGRES``'s
server (default ``postgresql://postgres@127.0.0.1:5432/test``), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from livecount.store import open_store
from livecount.store.postgres import OUTBOX_CHANNEL, OUTBOX_LOCK_KEY, PostgresStore

ADMIN_URL = os.environ.get("LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).with_name("results")
#: label → (serialize_appends, defer_appends, raw)
MODES: dict[str, tuple[bool, bool, bool]] = {
    "deferred": (True, True, False),
    "at each write": (True, False, False),
    "no lock": (False, True, False),
    "lock only": (True, True, True),
}
PROCESSES = (1, 3)

Job = tuple[str, str, list[int], int, float, float, int]


async def _writer(url: str, mode: str, conversations: list[int], workspace: int,
                  seconds: float, start_at: float, in_flight: int) -> int:
    serialize, defer, _ = MODES[mode]
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    store.serialize_appends = serialize
    store.defer_appends = defer
    await store.open()
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + seconds
        done = 0

        async def lane(conversation: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < deadline:
                n += 1
                await store.update_conversation(workspace, conversation,
                                                {"custom": {"n": n}}, None)
                done += 1

        await asyncio.gather(*(lane(conversations[i % len(conversations)])
                               for i in range(in_flight)))
        return done
    finally:
        await store.close()


def _process(job: Job) -> int:
    url, mode, conversations, workspace, seconds, start_at, in_flight = job
    if MODES[mode][2]:
        return _lock_only(url, workspace, seconds, start_at)
    return asyncio.run(_writer(url, mode, conversations, workspace, seconds, start_at,
                               in_flight))


def _lock_only(url: str, workspace: int, seconds: float, start_at: float) -> int:
    with psycopg.connect(url) as conn:
        time.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + seconds
        done = 0
        while time.monotonic() < deadline:
            conn.execute("SELECT pg_advisory_xact_lock(%s), pg_notify(%s, 'bench')",
                         (OUTBOX_LOCK_KEY, OUTBOX_CHANNEL))
            conn.execute("INSERT INTO outbox (workspace_id, kind, entity_id, version, before, "
                         "after, committed_at) VALUES (%s, 'conversation', 1, 1, NULL, '{}', 0)",
                         (workspace,))
            conn.commit()
            done += 1
    return done


async def _setup(url: str, processes: int, per_process: int) -> tuple[int, list[list[int]]]:
    store = open_store(url)
    await store.open()
    try:
        workspace = await store.create_workspace("bench")
        owned = [[(await store.create_conversation(workspace.id, {}, None)).id
                  for _ in range(per_process)] for _ in range(processes)]
        return workspace.id, owned
    finally:
        await store.close()


def measure(url: str, mode: str, processes: int, seconds: float, in_flight: int) -> float:
    """Writes (appends) per second committed by ``processes`` writer processes together."""
    workspace, owned = asyncio.run(_setup(url, processes, in_flight))
    start_at = time.time() + 2.0  # every process has opened its store by then
    jobs: list[Job] = [(url, mode, conversations, workspace, seconds, start_at, in_flight)
                       for conversations in owned]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        counts = pool.map(_process, jobs)
    return sum(counts) / seconds


def table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"outbox appends/s on PostgreSQL, {results['in_flight']} writes in flight "
                    f"per process (median of {results['rounds']} rounds of "
                    f"{results['seconds']:g} s)")
    t.add_column("configuration")
    for n in PROCESSES:
        t.add_column(f"{n} process{'es' if n > 1 else ''}", justify="right")
        t.add_column(f"vs no lock ×{n}", justify="right")
    for mode in MODES:
        cells: list[str] = [mode]
        for n in PROCESSES:
            rate = results["median"][mode][str(n)]
            cells += [f"{rate:,.0f}", f"{rate / results['median']['no lock'][str(n)]:.0%}"]
        t.add_row(*cells)
    Console().print(t)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        rates = [results["median"][mode][str(n)] for n in PROCESSES]
        xs = [j + (i - (len(MODES) - 1) / 2) * width for j in range(len(PROCESSES))]
        bars = ax.bar(xs, rates, width, label=mode)
        ax.bar_label(bars, [f"{r:,.0f}" for r in rates], fontsize=7)
    ax.set_xticks(range(len(PROCESSES)),
                  [f"{n} writer process{'es' if n > 1 else ''}" for n in PROCESSES])
    ax.set_ylabel("appends (writes) committed per second")
    ax.set_title(f"PostgreSQL outbox appends, {results['in_flight']} writes in flight per "
                 f"process ({platform.node()}, {os.cpu_count()} CPUs)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 3.0, 1
    database = f"livecount_bench_appends_{os.getpid()}"
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    runs: dict[str, dict[str, list[float]]] = {m: {str(n): [] for n in PROCESSES} for m in MODES}
    try:
        for round_ in range(args.rounds):
            for n in PROCESSES:
                for mode in MODES:
                    rate = measure(url, mode, n, args.seconds, args.in_flight)
                    runs[mode][str(n)].append(rate)
                    print(f"round {round_ + 1}: {mode:<14} ×{n} {rate:8,.0f} appends/s",
                          flush=True)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(database)))
    results: dict[str, Any] = {
        "seconds": args.seconds, "rounds": args.rounds, "in_flight": args.in_flight,
        "load_average": os.getloadavg()[0], "cpus": os.cpu_count(), "runs": runs,
        "median": {m: {n: statistics.median(r) for n, r in by.items()} for m, by in runs.items()},
    }
    results["ratios_to_no_lock"] = {
        m: {n: results["median"][m][n] / results["median"]["no lock"][n] for n in by}
        for m, by in results["median"].items()}
    results["deferred_vs_at_each_write"] = {
        n: results["median"]["deferred"][n] / results["median"]["at each write"][n]
        for n in results["median"]["deferred"]}
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"appends{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, RESULTS / f"appends{suffix}.png")
    table(results)
    print("deferred vs at each write: " + ", ".join(
        f"×{n} {v:.2f}×" for n, v in results["deferred_vs_at_each_write"].items()))


if __name__ == "__main__":
    main()

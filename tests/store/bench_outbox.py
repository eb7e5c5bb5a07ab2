"""Outbox append throughput: PostgreSQL with and without the advisory lock that keeps
positions in commit order, and SQLite, from 1 and from 4 writer processes.

    .venv/bin/python -m tests.store.bench_outbox [--seconds 5] [--rounds 3]

Each writer process opens its own store (its own pool and writer thread, as a gateway would)
and patches a conversation of its own (so writers contend on nothing but the outbox) with 4
calls in flight, for ``--seconds``. The ``raw`` rows measure the serialized section alone:
processes that only append (psycopg, no livecount code: lock, notify, insert one outbox row,
commit), i.e. the ceiling the lock puts on appends/s across all processes. Prints appends/s
per configuration (median of the rounds, which alternate between configurations so a noisy
neighbour hurts all of them alike).
PostgreSQL: a scratch database ``livecount_bench_<pid>`` on ``$LIVECOUNT_TEST_POSTGRES``'s
server, dropped at the end. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time

import psycopg
from psycopg import sql

from livecount.store import open_store
from livecount.store.postgres import OUTBOX_CHANNEL, OUTBOX_LOCK_KEY, PostgresStore
from livecount.store.sqlstore import SQLStore

ADMIN_URL = os.environ.get("LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


async def _writer(url: str, lock: bool, conversation: int, workspace: int, seconds: float,
                  start_at: float) -> int:
    store = open_store(url)
    assert isinstance(store, SQLStore)
    if isinstance(store, PostgresStore):
        store.serialize_appends = lock
    await store.open()
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + seconds
        done = 0

        async def loop(lane: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < deadline:
                n += 1
                await store.update_conversation(workspace, conversation,
                                                {"custom": {f"k{lane}": n}}, None)
                done += 1

        await asyncio.gather(*(loop(lane) for lane in range(4)))
        return done
    finally:
        await store.close()


def _process(args: tuple[str, bool, int, int, float, float]) -> int:
    return asyncio.run(_writer(*args))


def _raw(args: tuple[str, bool, int, int, float, float]) -> int:
    url, lock, _, workspace, seconds, start_at = args
    statement = ("SELECT pg_advisory_xact_lock(%(key)s), pg_notify(%(channel)s, 'bench')"
                 if lock else "SELECT pg_notify(%(channel)s, 'bench')")
    with psycopg.connect(url) as conn:
        time.sleep(max(0.0, start_at - time.time()))
        deadline = time.monotonic() + seconds
        done = 0
        while time.monotonic() < deadline:
            conn.execute(statement, {"key": OUTBOX_LOCK_KEY, "channel": OUTBOX_CHANNEL})
            conn.execute("INSERT INTO outbox (workspace_id, kind, entity_id, version, before, "
                         "after, committed_at) VALUES (%s, 'conversation', 1, 1, NULL, '{}', 0)",
                         (workspace,))
            conn.commit()
            done += 1
    return done


async def _setup(url: str, writers: int) -> tuple[int, list[int]]:
    store = open_store(url)
    await store.open()
    try:
        workspace = await store.create_workspace("bench")
        ids = [(await store.create_conversation(workspace.id, {}, None)).id
               for _ in range(writers)]
        return workspace.id, ids
    finally:
        await store.close()


def run(url: str, writers: int, lock: bool, seconds: float, raw: bool = False) -> float:
    workspace, ids = asyncio.run(_setup(url, writers))
    start_at = time.time() + 1.5  # every process opened its store by then
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        counts = pool.map(_raw if raw else _process,
                          [(url, lock, cid, workspace, seconds, start_at) for cid in ids])
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    database = f"livecount_bench_{os.getpid()}"
    pg_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    results: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            configs: list[tuple[str, str, int, bool]] = [
                (f"{backend} {'' if lock or backend == 'SQLite' else 'NO LOCK '}x{n}",
                 backend, n, lock)
                for n in (1, 4)
                for backend, lock in (("PostgreSQL", True), ("PostgreSQL", False),
                                      ("SQLite", True), ("raw", True), ("raw", False))]
            for round_ in range(args.rounds):
                for label, backend, n, lock in configs:
                    url = (f"sqlite:///{tmp}/bench-{round_}-{n}.db" if backend == "SQLite"
                           else pg_url)
                    rate = run(url, n, lock, args.seconds, raw=backend == "raw")
                    results.setdefault(label, []).append(rate)
                    print(f"round {round_ + 1}: {label:<24} {rate:8.0f} appends/s", flush=True)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(database)))
    print(f"\nmedian of {args.rounds} rounds of {args.seconds:g} s, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:")
    for label, rates in results.items():
        print(f"  {label:<24} {statistics.median(rates):8.0f} appends/s")


if __name__ == "__main__":
    main()

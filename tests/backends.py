"""The production combinations of a store and a counter state + bus, for the relay's
differential suites (tests/test_faults.py, tests/test_relay.py, tests/test_relay_redis.py):
each test or hypothesis example gets them fresh from :func:`open_backends`.

- ``sqlite+memory``: a new SQLite file, the in-process state and bus (one process);
- ``postgres+memory``: PostgreSQL, the in-process state and bus (one process per store);
- ``postgres+redis``: PostgreSQL, the Redis state and Redis Streams bus (scale-out).

``sqlite+redis`` works too (tests about Redis alone use it: it is the cheapest way to a Redis
state), but it is no production combination, so the parametrized suites leave it out.

**PostgreSQL**: one database per test session for these suites, ``livecount_relay_<pid>``
(apart from tests/store's ``livecount_test_<pid>``, whose fixture drops and recreates its own
on first use), created on first use and dropped at the end of the session. Before every test
and every hypothesis example its ``public`` schema is emptied by tests/store's
``reset_postgres`` (every row deleted, every sequence restarted): an example never sees
another's rows, and ids and outbox positions start at 1 as on a new SQLite file. The store of
the example before must be closed by then (:func:`open_backends` closes it); a leaked one is
cut off by the reset.

**Redis**: a key prefix of its own per test or example (tests/state/redis_support.py),
deleted when it ends.

When a server does not answer, the cases that need it skip with the reason; with ``CI=true``
they fail instead (CI starts both, so they must run).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from livecount.bus import Bus, MemoryBus
from livecount.bus.redis import RedisBus
from livecount.state import CounterState, MemoryState
from livecount.state.redis import RedisState
from livecount.store import open_store
from livecount.store.sqlstore import SQLStore
from tests.state.redis_support import delete_prefix, prefix_of, scratch_url
from tests.store.conftest import (
    APPLICATION_NAME,
    POSTGRES_ADMIN_URL,
    _admin_connect,
    _unreachable,
    reset_postgres,
    with_database,
)

__all__ = ["COMBOS", "POSTGRES_COMBOS", "POSTGRES_MEMORY", "POSTGRES_REDIS", "SQLITE_COMBOS",
           "SQLITE_MEMORY", "Backends", "fresh_store_url", "open_backends"]

#: Each combination as a ``pytest.param`` marked with the servers it needs.
SQLITE_MEMORY = pytest.param("sqlite+memory", id="sqlite+memory")
POSTGRES_MEMORY = pytest.param("postgres+memory", id="postgres+memory",
                               marks=pytest.mark.postgres)
POSTGRES_REDIS = pytest.param("postgres+redis", id="postgres+redis",
                              marks=[pytest.mark.postgres, pytest.mark.redis])

#: The three production combinations, for ``pytest.mark.parametrize``.
COMBOS = [SQLITE_MEMORY, POSTGRES_MEMORY, POSTGRES_REDIS]
#: Split by store, for hypothesis tests that run fewer examples on PostgreSQL (hypothesis has
#: one ``max_examples`` per test function, whatever its parameters).
SQLITE_COMBOS = [SQLITE_MEMORY]
POSTGRES_COMBOS = [POSTGRES_MEMORY, POSTGRES_REDIS]

_files = itertools.count(1)
_database: str | None = None
_probe: str | None = None  # None: not probed yet; "": reachable; else the error


def _split(combo: str) -> tuple[str, str]:
    store, _, broker = combo.partition("+")
    if store not in ("sqlite", "postgres") or broker not in ("memory", "redis"):
        raise ValueError(f"unknown combination {combo!r}")
    return store, broker


def _require_postgres(config: pytest.Config) -> str:
    """This session's database for the suites (see the module); skips (fails with
    ``CI=true``) when PostgreSQL does not answer. The first call creates it and registers
    its deletion at the end of the session."""
    global _database, _probe
    if _probe is None:
        try:
            with _admin_connect() as conn:
                conn.execute("SELECT 1")
            _probe = ""
        except psycopg.Error as exc:
            text = str(exc).strip().splitlines()
            _probe = f"{type(exc).__name__}: {text[0] if text else ''}"
    if _probe:
        _unreachable(_probe)
    if _database is None:
        name = f"livecount_relay_{os.getpid()}"
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with _admin_connect() as conn:
            conn.execute(drop)  # a previous run with the same pid that died before its cleanup
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

        def cleanup() -> None:
            global _database
            _database = None
            with _admin_connect() as conn:
                conn.execute(drop)

        config.add_cleanup(cleanup)
        _database = name
    return with_database(POSTGRES_ADMIN_URL, _database)


def fresh_store_url(store: str, config: pytest.Config, tmp_path: Path) -> str:
    """The URL of an empty store (``sqlite`` or ``postgres``): a new SQLite file under
    ``tmp_path``, or this session's PostgreSQL database emptied (see the module)."""
    if store == "sqlite":
        return f"sqlite:///{tmp_path}/store-{next(_files)}.db"
    if store != "postgres":
        raise ValueError(f"unknown store {store!r}")
    url = _require_postgres(config)
    reset_postgres(url)
    return f"{url}?application_name={APPLICATION_NAME}"


@dataclass
class Backends:
    """An opened store, counter state and bus of one combination."""

    combo: str
    store: SQLStore
    state: CounterState
    bus: Bus
    #: the Redis URL (with its key prefix) of a Redis state and bus, else None
    broker_url: str | None

    def fresh_state(self) -> CounterState:
        """What a restarted process finds of the counter state: an empty memory state, or
        the same Redis state (a new client of it; the caller closes it)."""
        if self.broker_url is None:
            return MemoryState()
        return RedisState(self.broker_url)


@contextlib.asynccontextmanager
async def open_backends(combo: str, config: pytest.Config,
                        tmp_path: Path) -> AsyncIterator[Backends]:
    """A fresh empty store, state and bus of ``combo`` (``"postgres+redis"``, ...), closed
    (and the Redis keys deleted) when the block ends."""
    store_kind, broker = _split(combo)
    store_url = fresh_store_url(store_kind, config, tmp_path)
    url = scratch_url(config) if broker == "redis" else None  # (skips, or fails in CI)
    state: CounterState
    bus: Bus
    if url is not None:
        state, bus = RedisState(url), RedisBus(url)
    else:
        state, bus = MemoryState(), MemoryBus()
    try:
        store = open_store(store_url)
        assert isinstance(store, SQLStore)
        await store.open()
        try:
            yield Backends(combo, store, state, bus, url)
        finally:
            await store.close()
    finally:
        await bus.close()
        await state.close()
        if url is not None:
            delete_prefix(prefix_of(url))

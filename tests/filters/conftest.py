"""The ``db`` fixture: a SQLAlchemy engine with the schema, on SQLite and on PostgreSQL.

SQLite gets a fresh file per test. PostgreSQL gets one schema per session (``lc_test_<hex>``,
dropped at the end), emptied before each test. Every engine is disposed, so no connection
outlives its test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from livecount.filters.sql import register_sqlite_functions
from livecount.store.schema import metadata, workspaces

_POSTGRES = os.environ.get("LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _engine_url(url: str) -> str:
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def sqlite_engine(path: Path) -> sa.Engine:
    """An engine on ``path`` with livecount's SQL functions on every connection."""
    engine = sa.create_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        register_sqlite_functions(dbapi_connection)

    return engine


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    """A fresh schema holding livecount's tables for this session, dropped at the end."""
    try:
        with psycopg.connect(_POSTGRES, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        where = _POSTGRES.split("@")[-1].split("/")[0]
        message = f"PostgreSQL not reachable at {where}: {str(exc).strip()[:200]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    schema = f"lc_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_POSTGRES, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        engine = postgres_engine(schema)
        try:
            metadata.create_all(engine)
        finally:
            engine.dispose()
        yield schema
    finally:
        with psycopg.connect(_POSTGRES, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def postgres_engine(schema: str) -> sa.Engine:
    # JIT off: compiling the many EXISTS subplans of a test query costs ~100 ms a query and
    # changes no answer.
    return sa.create_engine(
        _engine_url(_POSTGRES),
        connect_args={"options": f"-csearch_path={schema} -cjit=off",
                      "application_name": schema})


def _clear(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An empty database with the schema and workspaces 1 and 2."""
    if request.param == "sqlite":
        engine = sqlite_engine(tmp_path / "filters.db")
        metadata.create_all(engine)
    else:
        engine = postgres_engine(request.getfixturevalue("postgres_schema"))
        _clear(engine)
    try:
        with engine.begin() as conn:
            conn.execute(workspaces.insert(), [{"id": 1, "name": "one", "created_at": 0},
                                               {"id": 2, "name": "two", "created_at": 0}])
        yield engine
    finally:
        engine.dispose()

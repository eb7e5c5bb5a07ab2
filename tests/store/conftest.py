"""Fixtures for the store tests: an opened SQLite store on a temporary file, and two tenants."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from livecount.store.base import Team, Teammate, Workspace
from livecount.store.schema import metadata
from livecount.store.sqlite import SQLiteStore


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(db_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@dataclass
class Tenant:
    workspace: Workspace
    people: list[Teammate]
    team: Team

    @property
    def id(self) -> int:
        return self.workspace.id


@dataclass
class World:
    """Two workspaces, each with two teammates and a team: ``home`` is the one under test,
    ``away`` supplies ids that exist but belong to another tenant."""

    home: Tenant
    away: Tenant


async def make_tenant(store: SQLiteStore, name: str) -> Tenant:
    workspace = await store.create_workspace(name)
    people = [
        (await store.create_teammate(workspace.id, who, f"{who}@{name}.test"))[0]
        for who in ("ann", "bob")
    ]
    team = await store.create_team(workspace.id, "support", [people[0].id])
    return Tenant(workspace, people, team)


@pytest.fixture
async def world(store: SQLiteStore) -> World:
    return World(home=await make_tenant(store, "home"), away=await make_tenant(store, "away"))


def dump_tables(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order: compare two dumps to prove nothing moved."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in metadata.sorted_tables:
        out[table.name] = [
            tuple(row)
            for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
        ]
    out["sqlite_sequence"] = [
        tuple(row)
        for row in conn.execute(sa.text("SELECT name, seq FROM sqlite_sequence ORDER BY name"))
    ]
    return out


async def dump(store: SQLiteStore) -> dict[str, list[tuple[Any, ...]]]:
    return await store._read(dump_tables)

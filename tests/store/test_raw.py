"""The hot path's statements (:class:`~livecount.store.raw.RawTx`) against the SQLAlchemy Core
helpers of :mod:`~livecount.store.rows`: the same rows written, the same images read back.

Images are compared as JSON with sorted keys (``true`` is not ``1``, ``2.0`` is not ``2``) and
rows by their ``repr`` (an ``int`` is not a ``float``). SQLite in memory here; the group-commit
property (``test_group_commit.py``) compares the two paths end to end on both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount import conversations as convs
from livecount.domain import Image
from livecount.store import rows
from livecount.store.raw import RawTx, SQLText
from livecount.store.schema import (
    conversation_custom,
    conversation_people,
    conversation_tags,
    conversations,
    metadata,
    workspaces,
)
from tests.strategies import images, patches

SIDE = (conversation_custom, conversation_people, conversation_tags)


@pytest.fixture(scope="module")
def db() -> Iterator[sa.Engine]:
    engine = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(workspaces.insert().values(id=1, name="a", created_at=0))
    try:
        yield engine
    finally:
        engine.dispose()


def strict(image: Image | None) -> bytes:
    assert image is not None
    return msgspec.json.encode(convs.to_wire(image), order="sorted")


def table_rows(conn: sa.Connection) -> list[str]:
    out = []
    for table in (conversations, *SIDE):
        out += [repr(tuple(row)) for row in
                conn.execute(sa.select(table).order_by(*table.primary_key.columns))]
    return out


def emptied(conn: sa.Connection) -> None:
    for table in (*SIDE, conversations):
        conn.execute(table.delete())


def raw_tx(conn: sa.Connection) -> RawTx:
    return RawTx(conn.connection.dbapi_connection, SQLText("sqlite"))


settings_ = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(image=images(conversation_id=7))
def test_raw_reads_what_core_wrote_and_writes_what_core_writes(
        db: sa.Engine, image: Image) -> None:
    with db.begin() as conn:
        emptied(conn)
        rows.insert_image(conn, image)
        core_rows = table_rows(conn)
        loaded = raw_tx(conn).load_conversation(1, image.id)
        assert strict(loaded) == strict(image) == strict(rows.load_images(conn)[0])
        assert raw_tx(conn).load_conversation(2, image.id) is None  # another workspace's
        emptied(conn)
        raw_tx(conn).insert_image(image)
        assert table_rows(conn) == core_rows


@settings_
@given(image=images(conversation_id=7), patch=patches(), stale=st.booleans())
def test_raw_updates_exactly_as_core_updates(db: sa.Engine, image: Image,
                                             patch: dict[str, Any], stale: bool) -> None:
    after = convs.apply_patch(image, convs.validate_body(patch, patch=True), image.updated_at + 1)
    before = msgspec.structs.replace(image, version=image.version + 1) if stale else image
    outcome = []
    for path in ("core", "raw"):
        with db.begin() as conn:
            emptied(conn)
            rows.insert_image(conn, image)
            target: Any = conn if path == "core" else raw_tx(conn)
            done = rows.update_image(target, before, after)
            outcome.append((done, table_rows(conn)))
            if done:
                assert strict(raw_tx(conn).load_conversation(1, image.id)) == strict(after)
    assert outcome[0] == outcome[1]
    assert outcome[0][0] is not stale  # a stale version changes nothing


def test_missing_finds_ids_of_other_workspaces_and_none(db: sa.Engine) -> None:
    from livecount.store.schema import teammates

    with db.begin() as conn:
        conn.execute(workspaces.insert().values(id=2, name="b", created_at=0))
        conn.execute(teammates.insert(), [
            {"id": i, "workspace_id": 1 + i % 2, "name": "t", "email": f"{i}@x",
             "token_hash": f"{i:064d}"} for i in range(1, 7)])
        tx = raw_tx(conn)
        assert tx.missing("teammates", 1, {1, 2, 3, 5, 99}) == {1, 3, 5, 99}
        assert tx.missing("teammates", 2, {1, 2, 3}) == {2}
        assert tx.missing("teams", 1, {1}) == {1}
        conn.rollback()

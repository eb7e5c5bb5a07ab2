"""``rows.load_images`` reads back exactly the images ``rows.insert_image`` wrote, whichever
way it reads them: id ranges or id lists, several windows, chunked builds, GC paused or not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.domain import Image
from livecount.store import rows
from livecount.store.schema import (
    conversation_custom,
    conversation_people,
    conversation_tags,
    conversations,
    metadata,
    workspaces,
)
from tests.strategies import image_lists


@pytest.fixture(scope="module")
def db() -> Iterator[sa.Engine]:
    engine = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(workspaces.insert(), [{"id": 1, "name": "a", "created_at": 0},
                                           {"id": 2, "name": "b", "created_at": 0}])
    try:
        yield engine
    finally:
        engine.dispose()


def put(engine: sa.Engine, images: list[Image]) -> None:
    with engine.begin() as conn:
        for table in (conversation_custom, conversation_people, conversation_tags,
                      conversations):
            conn.execute(table.delete())
        for image in images:
            rows.insert_image(conn, image)


@st.composite
def workspace_images(draw: st.DrawFn) -> list[Image]:
    """Images of two workspaces, their ids gappy or consecutive (interleaved either way)."""
    images = draw(image_lists(max_size=14))
    if draw(st.booleans()):
        base = draw(st.integers(1, 1000))
        images = [msgspec.structs.replace(image, id=base + i) for i, image in
                  enumerate(images)]
    return [msgspec.structs.replace(image, workspace_id=draw(st.sampled_from((1, 1, 2))))
            for image in images]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None, max_examples=200)
@given(images=workspace_images(), window=st.sampled_from((1, 2, 3, 50_000)),
       in_chunk=st.sampled_from((1, 2, 500)), build_chunk=st.sampled_from((1, 3, 4096)),
       pause_at=st.sampled_from((0, 10_000)), data=st.data())
def test_load_images_reads_back_what_was_written(db: sa.Engine, images: list[Image],
                                                window: int, in_chunk: int,
                                                build_chunk: int, pause_at: int,
                                                data: st.DataObject) -> None:
    put(db, images)
    saved = {name: getattr(rows, name)
             for name in ("_WINDOW", "_IN_CHUNK", "_BUILD_CHUNK", "_PAUSE_GC_AT")}
    try:
        rows._WINDOW, rows._IN_CHUNK = window, in_chunk  # type: ignore[misc]
        rows._BUILD_CHUNK, rows._PAUSE_GC_AT = build_chunk, pause_at  # type: ignore[misc]
        with db.connect() as conn:
            for workspace in (1, 2):
                expected = sorted((i for i in images if i.workspace_id == workspace),
                                  key=lambda i: i.id)
                loaded = rows.load_images(conn, conversations.c.workspace_id == workspace,
                                          bulk=True)
                assert loaded == rows.load_images(conn,
                                                  conversations.c.workspace_id == workspace)
                assert loaded == expected
                assert all(type(a.priority) is bool for a in loaded)
                assert [_typed(a.custom) for a in loaded] == [_typed(e.custom)
                                                             for e in expected]
            ids = data.draw(st.lists(st.sampled_from([i.id for i in images] or [1]),
                                     unique=True))
            assert rows.load_images(conn, conversations.c.id.in_(ids)) == sorted(
                (i for i in images if i.id in ids), key=lambda i: i.id)
            newest = sorted(images, key=lambda i: -i.id)[:3]
            assert rows.load_images(conn, order_by=(conversations.c.id.desc(),),
                                    limit=3) == newest
    finally:
        for name, value in saved.items():
            setattr(rows, name, value)


def _typed(custom: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    """A custom map with each value's type, so 1, 1.0 and True never compare equal."""
    return {key: (type(value), value) for key, value in custom.items()}


def test_load_images_of_nothing(db: sa.Engine) -> None:
    put(db, [])
    with db.connect() as conn:
        assert rows.load_images(conn) == []
        assert rows.load_images(conn, conversations.c.workspace_id == 1) == []

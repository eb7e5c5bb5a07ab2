"""Conversation writes over HTTP under concurrency: every answer is its own write's.

Many PATCHes and POSTs at once reach the store's group commit together; each 200/201 must
carry the ``Livecount-Position`` of its own outbox entry (and the ETag of its own version),
each refusal its own status and no position. Also: the conversation response renders exactly
what the generic JSON response did, timestamps included.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livecount.conversations import to_wire, wire_timestamp
from livecount.domain import format_timestamp
from livecount.server.api import ConversationResponse
from livecount.server.errors import JSONResponse
from livecount.store.base import written_position
from tests.strategies import images

from .support import create_tenant, live_server, server_settings

pytestmark = pytest.mark.anyio


async def test_concurrent_writes_each_answer_with_their_own_position(tmp_path: Path) -> None:
    async with live_server(server_settings(tmp_path)) as server, server.client() as client:
        home = await create_tenant(client, server.admin_token, "Home", teammates=2, teams=1)
        away = await create_tenant(client, server.admin_token, "Away", teammates=1, teams=1)
        ann = home.people[0]
        ids = []
        for _ in range(6):
            response = await client.post(home.url("/conversations"), json={},
                                         headers=ann.headers)
            assert response.status_code == 201
            ids.append(response.json()["id"])
        start = await server.service.store.outbox_position()

        def patch(cid: int, body: Any, if_match: str | None = None) -> Any:
            headers = dict(ann.headers)
            if if_match is not None:
                headers["If-Match"] = if_match
            return client.patch(home.url(f"/conversations/{cid}"), json=body, headers=headers)

        requests = [
            *(patch(cid, {"state": "closed", "tags": [f"t{i}"]}) for i, cid in enumerate(ids)),
            *(client.post(home.url("/conversations"), json={"priority": True},
                          headers=ann.headers) for _ in range(4)),
            patch(ids[0], {"priority": True}, '"7"'),  # 412
            patch(10**12, {"priority": True}),  # 404
            patch(ids[1], {"assignee_id": away.people[0].id}),  # 400: another tenant's
            patch(ids[2], {"version": 9}),  # 400: read-only
            patch(ids[3], {"priority": True}, "*"),
        ]
        answers: list[httpx.Response] = list(await asyncio.gather(*requests))
        statuses = [a.status_code for a in answers]
        assert statuses == [200] * 6 + [201] * 4 + [412, 404, 400, 400] + [200], statuses
        entries = await server.service.store.read_outbox(start, 1000)
        by_position = {e.position: e for e in entries}
        written = [a for a in answers if a.status_code in (200, 201)]
        positions = [int(a.headers["Livecount-Position"]) for a in written]
        assert sorted(positions) == [e.position for e in entries]  # one entry each
        for answer, position in zip(written, positions, strict=True):
            body = answer.json()
            entry = by_position[position]
            assert (entry.entity_id, entry.version) == (body["id"], body["version"])
            assert answer.headers["ETag"] == f'"{body["version"]}"'
            assert entry.after is not None and to_wire(entry.after) == body  # type: ignore[arg-type]
        for answer in answers:
            if answer.status_code >= 400:
                assert "Livecount-Position" not in answer.headers
                assert answer.json()["error"]["code"]
        assert server.internal_errors == 0


def test_the_conversation_response_is_the_json_response_it_replaced() -> None:
    @given(image=images(conversation_id=12, workspace_id=3),
           position=st.one_of(st.just(0), st.integers(1, 2**40)),
           status=st.sampled_from((200, 201)))
    def check(image: Any, position: int, status: int) -> None:
        token = written_position.set(position)
        try:
            fast = ConversationResponse(image, status)
            headers = {"ETag": f'"{image.version}"'}
            if position:
                headers["Livecount-Position"] = str(position)
            plain = JSONResponse(to_wire(image), status_code=status, headers=headers)
        finally:
            written_position.reset(token)
        assert fast.status_code == plain.status_code
        assert fast.body == plain.body
        assert msgspec.json.decode(fast.body)["created_at"] == format_timestamp(image.created_at)
        assert sorted(fast.raw_headers) == sorted(plain.raw_headers)

    check()


@given(st.one_of(st.integers(0, 253_402_300_799_999_999),
                 st.integers(0, 253_402_300_799).map(lambda s: s * 1_000_000),
                 st.none()))
def test_wire_timestamps_are_format_timestamp(us: int | None) -> None:
    assert wire_timestamp(us) == format_timestamp(us)


def test_wire_timestamps_outside_its_range_are_format_timestamps_too() -> None:
    """Before 1970 or from year 10000 on (never stored: parse_timestamp refuses them) the
    answer, or the error, is format_timestamp's own."""
    for us in (-1, -86_400_000_001, 253_402_300_800_000_000):
        try:
            expected: Any = format_timestamp(us)
        except (ValueError, OverflowError, OSError) as exc:
            expected = type(exc)
        try:
            got: Any = wire_timestamp(us)
        except (ValueError, OverflowError, OSError) as exc:
            got = type(exc)
        assert got == expected

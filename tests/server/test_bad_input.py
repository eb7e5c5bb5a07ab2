"""Guarantee 5: no input reaches a 500 or changes state unless it is a valid write.

Each test takes a fingerprint (every row of every table of the SQLite file, and every
caller's ``GET /counts``) before and after the bad requests, and compares them; the
``live_server`` fixture fails any test in which a request reached the 500 handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import LiveServer, Tenant, dump_tables, read_all
from .test_api import assert_error

pytestmark = pytest.mark.anyio

SQL = "'; DROP TABLE conversations; --"
ERROR_STATUSES = {400, 401, 403, 404, 405, 409, 412, 413}


async def fingerprint(server: LiveServer, client: httpx.AsyncClient, tenant: Tenant
                      ) -> tuple[Any, ...]:
    await server.service.relay.sync()
    counts = [(await client.get(tenant.url("/counts"), headers=who)).json()
              for who in [server.admin, *(p.headers for p in tenant.people)]]
    return dump_tables(server.store_url), counts


class Targets:
    """One existing conversation and view of the tenant, for the id-taking endpoints."""

    def __init__(self, tenant: Tenant, conversation: int, view: int) -> None:
        self.tenant = tenant
        self.conversation = conversation
        self.view = view

    def writes(self) -> list[tuple[str, str, bool]]:
        """(method, path, admin only) of every endpoint that takes a body."""
        t = self.tenant
        return [("POST", "/api/workspaces", True), ("POST", t.url("/teammates"), True),
                ("POST", t.url("/teams"), True), ("POST", t.url("/conversations"), False),
                ("PATCH", t.url(f"/conversations/{self.conversation}"), False),
                ("POST", t.url("/views"), False), ("PUT", t.url(f"/views/{self.view}"), False)]

    def everything(self) -> list[tuple[str, str]]:
        t = self.tenant
        return [(m, p) for m, p, _ in self.writes()] + [
            ("GET", t.url("/me")), ("GET", t.url("/teammates")), ("GET", t.url("/teams")),
            ("GET", t.url(f"/conversations/{self.conversation}")), ("GET", t.url("/views")),
            ("DELETE", t.url(f"/views/{self.view}")), ("GET", t.url("/counts")),
            ("GET", t.url(f"/views/{self.view}/conversations"))]


@pytest.fixture
async def targets(live_server: LiveServer, client: httpx.AsyncClient,
                  tenant: Tenant) -> AsyncIterator[Targets]:
    ann = tenant.people[0]
    conversation = (await client.post(tenant.url("/conversations"), headers=ann.headers,
                                      json={"tags": ["vip"]})).json()
    view = (await client.post(tenant.url("/views"), headers=ann.headers, json={
        "name": "VIP", "filter": {"field": "tags", "operator": "contains",
                                  "value": "vip"}})).json()
    yield Targets(tenant, conversation["id"], view["id"])


def _headers(server: LiveServer, tenant: Tenant, admin_only: bool) -> dict[str, str]:
    return server.admin if admin_only else tenant.people[0].headers


MALFORMED = [
    b"", b"   ", b"{", b'{"name": }', b"[1,", b"nul", b"\xff\xfe", b'{"a": NaN}',
    b'{"a": Infinity}', b"'single'", b'{"name": "\\ud800"}', b'"\xed\xa0\x80"',
    b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b"[" * 100_000, b"1e400", b'{"name": "x"} trailing', b"\x00", b'{"name": "x",}',
]


async def test_malformed_json_changes_nothing(live_server: LiveServer,
                                              client: httpx.AsyncClient,
                                              targets: Targets) -> None:
    before = await fingerprint(live_server, client, targets.tenant)
    for method, path, admin_only in targets.writes():
        headers = {**_headers(live_server, targets.tenant, admin_only), **{
            "Content-Type": "application/json"}}
        for body in MALFORMED:
            response = await client.request(method, path, content=body, headers=headers)
            assert_error(response, 400, "invalid_json")
    assert await fingerprint(live_server, client, targets.tenant) == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
FIELDS = ["name", "email", "member_ids", "filter", "group_by", "personal", "position", "state",
          "assignee_id", "team_id", "author_id", "priority", "channel", "tags", "mentions",
          "unread_by", "created_at", "waiting_since", "snoozed_until", "custom", "id",
          "version", "field", "operator", "value"]
bodies = json_values | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5)


async def test_random_bodies_are_refused_or_written_never_500(
        live_server: LiveServer, client: httpx.AsyncClient, targets: Targets) -> None:
    """Random JSON (mostly wrong types, unknown or read-only fields) to every endpoint that
    takes a body: a documented status every time, and a refusal changes nothing."""
    writes = targets.writes()
    tenant = targets.tenant
    seen: set[int] = set()
    written = [0]  # the outbox position of the last accepted write (read-your-writes)

    def run() -> None:
        with httpx.Client(base_url=live_server.base_url, timeout=10) as sync:
            def state() -> tuple[Any, ...]:
                response = sync.get(tenant.url(f"/counts?after={written[0]}"),
                                    headers=live_server.admin)
                assert response.status_code == 200, response.text
                return dump_tables(live_server.store_url), response.json()["counts"]

            @settings(max_examples=120, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(st.sampled_from(writes), bodies)
            def check(target: tuple[str, str, bool], body: Any) -> None:
                method, path, admin_only = target
                before = state()
                response = sync.request(method, path, json=body,
                                        headers=_headers(live_server, tenant, admin_only))
                seen.add(response.status_code)
                assert response.status_code in ERROR_STATUSES | {200, 201}, response.text
                if "Livecount-Position" in response.headers:
                    written[0] = max(written[0], int(response.headers["Livecount-Position"]))
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"code", "message"}
                    assert state() == before, (method, path, body, response.text)

            check()

    await anyio.to_thread.run_sync(run)
    assert 400 in seen


async def test_huge_bodies_are_refused(live_server: LiveServer, client: httpx.AsyncClient,
                                       targets: Targets) -> None:
    limit = 1 << 20
    tenant = targets.tenant
    before = await fingerprint(live_server, client, tenant)
    headers = {**tenant.people[0].headers, "Content-Type": "application/json"}
    too_big = b'{"tags": ["' + b"x" * limit + b'"]}'

    def chunks(data: bytes, size: int = 50_000) -> Iterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start:start + size]

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for chunk in chunks(data):
            yield chunk

    for method, path, admin_only in targets.writes():
        headers = {**_headers(live_server, tenant, admin_only),
                   "Content-Type": "application/json"}
        for body in (too_big, b" " * (limit + 1), b"[" * (8 * limit)):
            response = await client.request(method, path, content=body, headers=headers)
            assert_error(response, 413, "payload_too_large")
            response = await client.request(method, path, content=chunked(body),
                                            headers=headers)
            assert "content-length" not in response.request.headers
            assert_error(response, 413, "payload_too_large")
    # a Content-Length that lies low does not get more bytes through: the server reads
    # only what it declares, so the rest is not a body at all (and nothing is written)
    assert await fingerprint(live_server, client, tenant) == before

    # exactly at the limit is fine
    at_limit = b"{}" + b" " * (limit - 2)
    headers = {**tenant.people[0].headers, "Content-Type": "application/json"}
    response = await client.post(tenant.url("/conversations"), content=at_limit,
                                 headers=headers)
    assert response.status_code == 201, response.text
    response = await client.post(tenant.url("/conversations"), content=chunked(at_limit),
                                 headers=headers)
    assert response.status_code == 201, response.text


async def test_unknown_ids_are_404_and_change_nothing(live_server: LiveServer,
                                                      client: httpx.AsyncClient,
                                                      targets: Targets) -> None:
    tenant = targets.tenant
    before = await fingerprint(live_server, client, tenant)
    view_body = {"name": "x", "filter": {"field": "state", "operator": "=", "value": "open"}}
    for who in (tenant.people[0].headers, live_server.admin):
        for unknown in (0, 987654321, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**40):
            calls = [("GET", f"/conversations/{unknown}", None),
                     ("PATCH", f"/conversations/{unknown}", {"priority": True}),
                     ("PUT", f"/views/{unknown}", view_body),
                     ("DELETE", f"/views/{unknown}", None),
                     ("GET", f"/views/{unknown}/conversations", None)]
            for method, path, body in calls:
                response = await client.request(method, tenant.url(path), json=body,
                                                headers=who)
                assert_error(response, 404, "not_found")
            response = await client.get(f"/api/workspaces/{unknown}/counts",
                                        headers=live_server.admin)
            assert_error(response, 404, "not_found")
    # ids of people and teams that do not exist, as references
    for body in ({"assignee_id": 987654}, {"mentions": [2**62]}, {"team_id": 10**15},
                 {"unread_by": [987654]}):
        response = await client.post(tenant.url("/conversations"), json=body,
                                     headers=tenant.people[0].headers)
        assert_error(response, 400)
    assert await fingerprint(live_server, client, tenant) == before


async def test_sql_looking_strings_are_stored_verbatim(live_server: LiveServer,
                                                       client: httpx.AsyncClient,
                                                       tenant: Tenant) -> None:
    tables = set(dump_tables(live_server.store_url))
    admin, ann = live_server.admin, tenant.people[0]
    response = await client.post("/api/workspaces", json={"name": SQL}, headers=admin)
    assert response.status_code == 201 and response.json()["name"] == SQL
    response = await client.post(tenant.url("/teammates"), headers=admin,
                                 json={"name": SQL, "email": f"{SQL}@x.example"})
    assert response.status_code == 201
    assert (response.json()["name"], response.json()["email"]) == (SQL, f"{SQL}@x.example")
    response = await client.post(tenant.url("/teams"), headers=admin,
                                 json={"name": SQL, "member_ids": [ann.id]})
    assert response.status_code == 201 and response.json()["name"] == SQL
    body = {"tags": [SQL, "x' OR '1'='1"], "channel": SQL, "custom": {"note": SQL, "n": 1}}
    created = (await client.post(tenant.url("/conversations"), json=body,
                                 headers=ann.headers)).json()
    assert created["tags"] == sorted(body["tags"]) and created["channel"] == SQL
    assert created["custom"] == {"note": SQL, "n": 1}
    fetched = (await client.get(tenant.url(f"/conversations/{created['id']}"),
                                headers=ann.headers)).json()
    assert fetched == created
    other = await client.post(tenant.url("/conversations"), json={"tags": ["plain"]},
                              headers=ann.headers)
    assert other.status_code == 201

    sql_filter = {"operator": "OR", "value": [
        {"field": "tags", "operator": "contains", "value": SQL},
        {"field": "channel", "operator": "~", "value": "DROP TABLE"},
        {"field": "custom.note", "operator": "=", "value": SQL}]}
    response = await client.post(tenant.url("/views"), headers=ann.headers, json={
        "name": SQL, "filter": sql_filter, "group_by": "tags"})
    assert response.status_code == 201
    view = response.json()
    assert (view["name"], view["filter"]) == (SQL, sql_filter)
    await live_server.service.relay.sync()
    counts = (await client.get(tenant.url("/counts"), headers=ann.headers)).json()["counts"]
    assert counts[str(view["id"])] == {SQL: 1, "x' OR '1'='1": 1}
    listed = await read_all(client, tenant, ann.headers, view["id"], group=SQL)
    assert [c["id"] for c in listed] == [created["id"]]
    response = await client.get(tenant.url(f"/views/{view['id']}/conversations"),
                                params={"cursor": SQL}, headers=ann.headers)
    assert_error(response, 400)
    # nothing was dropped: the same tables, with the rows written above in them
    dump = dump_tables(live_server.store_url)
    assert set(dump) == tables
    assert SQL in str(dump["conversations"]) or SQL in str(dump)
    everyone = await read_all(client, tenant, ann.headers,
                              next(v["id"] for v in (await client.get(
                                  tenant.url("/views"), headers=ann.headers)).json()["views"]
                                   if v["name"] == "All"))
    assert len(everyone) == 2


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"field": "state", "operator": "=", "value": "open"}
    for i in range(depth - 1):
        node = {"operator": "NOT" if i % 2 else "AND", "value": node if i % 2 else [node]}
    return node


async def test_deep_and_large_filters_are_refused(live_server: LiveServer,
                                                  client: httpx.AsyncClient,
                                                  targets: Targets) -> None:
    tenant = targets.tenant
    ann = tenant.people[0]
    before = await fingerprint(live_server, client, tenant)
    message = assert_error(await client.post(tenant.url("/views"), headers=ann.headers,
                                             json={"name": "deep", "filter": _nested(9)}),
                           400, "limit_exceeded")
    assert "nesting" in message and "8" in message
    many = {"operator": "OR", "value": [
        {"field": "tags", "operator": "contains", "value": f"t{i}"} for i in range(101)]}
    message = assert_error(await client.post(tenant.url("/views"), headers=ann.headers,
                                             json={"name": "wide", "filter": many}),
                           400, "limit_exceeded")
    assert "100" in message
    deep_value: Any = "x"
    for _ in range(500):
        deep_value = [deep_value]
    for bad_filter in (deep_value, {"field": "tags", "operator": "contains",
                                    "value": deep_value}):
        response = await client.post(tenant.url("/views"), headers=ann.headers,
                                     json={"name": "deep value", "filter": bad_filter})
        assert_error(response, 400)
        response = await client.put(tenant.url(f"/views/{targets.view}"), headers=ann.headers,
                                    json={"name": "deep value", "filter": bad_filter})
        assert_error(response, 400)
    arrays = b'{"name": "arrays", "filter": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    response = await client.post(tenant.url("/views"), content=arrays,
                                 headers={**ann.headers, "Content-Type": "application/json"})
    assert_error(response, 400)
    assert await fingerprint(live_server, client, tenant) == before
    # the limit itself is allowed
    response = await client.post(tenant.url("/views"), headers=ann.headers,
                                 json={"name": "eight", "filter": _nested(8)})
    assert response.status_code == 201, response.text


async def test_wrong_tokens_are_401_and_change_nothing(live_server: LiveServer,
                                                       client: httpx.AsyncClient,
                                                       targets: Targets) -> None:
    tenant = targets.tenant
    before = await fingerprint(live_server, client, tenant)
    valid = tenant.people[0].token
    wrong = [{}, {"Authorization": ""}, {"Authorization": "Bearer"},
             {"Authorization": "Token " + valid},
             {"Authorization": "Basic " + valid}, {"Authorization": "Bearer lc_" + "A" * 43},
             {"Authorization": "Bearer " + valid[:-1]}, {"Authorization": "Bearer " + valid + "x"},
             {"Authorization": "Bearer " + "x" * 10_000},
             {"Authorization": "Bearer lc_\xe9t\xe9".encode("latin-1")},
             {"Authorization": f"Bearer {live_server.admin_token}x"},
             {"Authorization": f"Bearer {valid} {valid}"}]
    for method, path in targets.everything():
        for headers in wrong:
            response = await client.request(method, path, json={"name": "x"}, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
    # the token in the query string counts only on the streams
    response = await client.get(tenant.url("/counts"), params={"token": valid})
    assert_error(response, 401)
    # the scheme is case-insensitive (RFC 7235)
    response = await client.get(tenant.url("/counts"), headers={"Authorization": f"bearer {valid}"})
    assert response.status_code == 200
    assert await fingerprint(live_server, client, tenant) == before


async def test_replayed_versions_change_nothing(live_server: LiveServer,
                                               client: httpx.AsyncClient,
                                               targets: Targets) -> None:
    tenant = targets.tenant
    url = tenant.url(f"/conversations/{targets.conversation}")
    ann = tenant.people[0].headers
    response = await client.patch(url, json={"priority": True}, headers={**ann, "If-Match": "1"})
    assert response.status_code == 200
    before = await fingerprint(live_server, client, tenant)
    for version in ("1", '"1"', 'W/"1"', "0", "3"):
        response = await client.patch(url, json={"state": "closed", "priority": False},
                                      headers={**ann, "If-Match": version})
        assert_error(response, 412, "version_mismatch")
    # the same change twice: the second is a no-op (no new version, no outbox entry)
    response = await client.patch(url, json={"priority": True}, headers=ann)
    assert response.status_code == 200 and response.json()["version"] == 2
    assert await fingerprint(live_server, client, tenant) == before


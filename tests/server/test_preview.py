"""``POST /views/preview``: the count a view would get, validated like a view, nothing saved.

- For random filters (the shared hypothesis strategies: every field and operator, nested
  AND/OR/NOT, ``$me``) with and without ``group_by``, over a workspace of random
  conversations: the preview each teammate (and the admin) gets equals the count the view
  gets once it is saved, as a shared view and as the caller's personal view, and the length
  of its list.
- Bad filters and bad ``group_by`` get exactly the 400 (status, code, message) that creating
  the view gets, and random JSON gets the same verdict from both.
- Nothing is written: every row of every table, the outbox position and every caller's counts
  are unchanged by any number of previews, valid or not.
- Rate limit per token: 429 with ``Retry-After`` past the budget; other tokens unaffected.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.domain import GROUPABLE
from livecount.server.preview import PREVIEW_BURST, RateLimiter
from tests.filters.test_parse import LIMITS, MALFORMED
from tests.strategies import CUSTOM_KEYS, TEAMMATES, TEAMS, conversation_bodies, filters

from .support import LiveServer, Tenant, auth, create_tenant, dump_tables
from .test_api import assert_error
from .test_bad_input import json_values

pytestmark = pytest.mark.anyio

GOOD = {"field": "state", "operator": "=", "value": "open"}
#: Filters that certainly use $me (the shared strategy draws it only now and then).
ME_FILTERS = st.builds(
    lambda rest, me: {"operator": "AND", "value": [rest, me]}, filters(max_depth=3),
    st.sampled_from([{"field": "assignee_id", "operator": "=", "value": "$me"},
                     {"field": "mentions", "operator": "contains", "value": "$me"},
                     {"field": "author_id", "operator": "IN", "value": [2, "$me"]},
                     {"field": "unread_by", "operator": "contains", "value": "$me"}]))
GROUP_BY = st.none() | st.sampled_from((*sorted(GROUPABLE), *(f"custom.{k}" for k in CUSTOM_KEYS)))


class Unlimited(RateLimiter):
    """No budget: the property tests send thousands of previews from one token."""

    def acquire(self, key: bytes) -> float:
        return 0.0


def unlimited(server: LiveServer) -> None:
    server.app.state.preview_limiter = Unlimited()


async def big_tenant(server: LiveServer, client: httpx.AsyncClient) -> Tenant:
    """Six teammates and three teams whose ids are the strategies' (1..6, 1..3), so random
    conversations and filters name them."""
    tenant = await create_tenant(client, server.admin_token, teammates=len(TEAMMATES),
                                 teams=len(TEAMS))
    assert tuple(p.id for p in tenant.people) == TEAMMATES
    assert tuple(t["id"] for t in tenant.teams) == TEAMS
    return tenant


def _seeded_bodies(n: int) -> list[dict[str, Any]]:
    """``n`` random create bodies from the shared strategy, the same ones every run."""
    found: list[dict[str, Any]] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(conversation_bodies())
    def collect(body: dict[str, Any]) -> None:
        found.append(body)

    collect()
    return found[:n]


def _settled(body: dict[str, Any]) -> dict[str, Any]:
    """A body whose snooze does not end during the test (a past ``snoozed_until`` reopens the
    conversation by itself: a write of the relay's, racing the comparison)."""
    if body.get("state") == "snoozed":
        return {**body, "snoozed_until": "2999-01-01T00:00:00Z"}
    return body


def _value(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == 1 and set(body) <= {"count", "counts"}, body
    return body.get("count", body.get("counts"))


# -- the preview is the saved view's count ---------------------------------------------------


async def test_preview_equals_the_saved_views_count(live_server: LiveServer,
                                                    client: httpx.AsyncClient) -> None:
    unlimited(live_server)
    tenant = await big_tenant(live_server, client)
    people = tenant.people
    for i, body in enumerate(_seeded_bodies(60)):
        response = await client.post(tenant.url("/conversations"), json=_settled(body),
                                     headers=people[i % len(people)].headers)
        assert response.status_code == 201, response.text
    callers = [*(p.headers for p in people[:4]), live_server.admin]
    stats = {"nonzero": 0, "grouped": 0, "me": 0, "examples": 0}

    def run() -> None:
        with httpx.Client(base_url=live_server.base_url, timeout=10) as sync:

            def counts(who: dict[str, str], view_id: int) -> Any:
                deadline = time.monotonic() + 5
                while True:  # the view is installed by the time its create answers; be sure
                    got = sync.get(tenant.url("/counts"), headers=who).json()["counts"]
                    if str(view_id) in got or time.monotonic() > deadline:
                        return got[str(view_id)]
                    time.sleep(0.01)

            @settings(max_examples=80, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(filters() | ME_FILTERS, GROUP_BY, st.sampled_from(range(4)),
                   conversation_bodies())
            def check(filter_: dict[str, Any], group_by: str | None, owner: int,
                      extra: dict[str, Any]) -> None:
                # the workspace keeps changing between examples
                response = sync.post(tenant.url("/conversations"), json=_settled(extra),
                                     headers=people[owner].headers)
                assert response.status_code == 201, response.text
                preview = {"filter": filter_, "group_by": group_by}
                previews = [_value(sync.post(tenant.url("/views/preview"), json=preview,
                                             headers=who)) for who in callers]
                # shared: what each caller sees of it
                response = sync.post(tenant.url("/views"), headers=people[owner].headers,
                                     json={"name": "shared", **preview})
                assert response.status_code == 201, response.text
                shared = response.json()["id"]
                saved = [counts(who, shared) for who in callers]
                assert previews == saved, (filter_, group_by, previews, saved)
                if group_by is None:
                    for who, n in zip(callers, previews, strict=True):
                        assert len(read_all_sync(sync, tenant, who, shared)) == n
                # personal: the owner's own ($me bound to them)
                response = sync.post(tenant.url("/views"), headers=people[owner].headers,
                                     json={"name": "mine", "personal": True, **preview})
                assert response.status_code == 201, response.text
                personal = response.json()["id"]
                assert counts(people[owner].headers, personal) == previews[owner]
                for view_id in (shared, personal):
                    response = sync.delete(tenant.url(f"/views/{view_id}"),
                                           headers=people[owner].headers)
                    assert response.status_code == 204, response.text
                stats["examples"] += 1
                stats["nonzero"] += any(previews)
                stats["grouped"] += group_by is not None
                stats["me"] += '"$me"' in json.dumps(filter_)

            check()

    await anyio.to_thread.run_sync(run)
    print(f"preview == saved count: {stats}")
    assert stats["nonzero"] >= stats["examples"] // 4, stats  # the data meets the filters
    assert stats["grouped"] > 0 and stats["me"] > 0, stats


def read_all_sync(client: httpx.Client, tenant: Tenant, headers: dict[str, str],
                  view_id: int) -> list[int]:
    ids: list[int] = []
    params: dict[str, Any] = {"limit": 200}
    while True:
        response = client.get(tenant.url(f"/views/{view_id}/conversations"), params=params,
                              headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [c["id"] for c in page["conversations"]]
        if page["next_cursor"] is None:
            return ids
        params["cursor"] = page["next_cursor"]


async def test_me_is_the_caller_and_groups_are_rendered_for_them(
        live_server: LiveServer, client: httpx.AsyncClient, tenant: Tenant) -> None:
    """A hand-checked case: "open and assigned to me" and "mentions me, by team", per caller."""
    unlimited(live_server)
    ann, bob, cid = tenant.people
    team_a, team_b = (t["id"] for t in tenant.teams)
    for who, body in [(ann, {"assignee_id": ann.id, "team_id": team_a, "mentions": [bob.id]}),
                      (ann, {"assignee_id": ann.id, "team_id": team_b}),
                      (bob, {"assignee_id": bob.id, "team_id": team_a, "mentions": [bob.id]}),
                      (bob, {"assignee_id": ann.id, "state": "closed"}),
                      (cid, {"mentions": [bob.id, cid.id]})]:
        response = await client.post(tenant.url("/conversations"), json=body,
                                     headers=who.headers)
        assert response.status_code == 201, response.text
    mine = {"operator": "AND", "value": [GOOD, {"field": "assignee_id", "operator": "=",
                                                "value": "$me"}]}
    mentioned = {"field": "mentions", "operator": "contains", "value": "$me"}
    expected = [(ann, 2, {}), (bob, 1, {str(team_a): 2}), (cid, 0, {}),
                (None, 0, {})]
    for who, count, groups in expected:
        headers = who.headers if who else live_server.admin
        response = await client.post(tenant.url("/views/preview"), headers=headers,
                                     json={"filter": mine})
        assert response.json() == {"count": count}, (who, response.text)
        response = await client.post(tenant.url("/views/preview"), headers=headers,
                                     json={"filter": mentioned, "group_by": "team_id"})
        assert response.json() == {"counts": groups}, (who, response.text)
    # cid is mentioned in a conversation without a team: no group for it
    response = await client.post(tenant.url("/views/preview"), headers=cid.headers,
                                 json={"filter": mentioned})
    assert response.json() == {"count": 1}


# -- validated exactly like a view -----------------------------------------------------------


BAD_GROUP_BY: list[Any] = ["created_at", "nope", 5, True, ["tags"], {}, "custom.", "custom.a-b",
                           "custom." + "k" * 65]


def _same_refusal(created: httpx.Response, previewed: httpx.Response) -> None:
    assert created.status_code == 400, created.text
    assert previewed.status_code == 400, previewed.text
    assert previewed.json() == created.json()
    assert previewed.headers["content-type"] == created.headers["content-type"]


async def test_bad_filters_get_the_same_400s_as_a_view(live_server: LiveServer,
                                                       client: httpx.AsyncClient,
                                                       tenant: Tenant) -> None:
    unlimited(live_server)
    headers = tenant.people[0].headers
    before = dump_tables(live_server.store_url)
    cases: list[tuple[Any, Any]] = [
        (raw, None) for raw, _, _ in (*MALFORMED, *LIMITS)
        if not (isinstance(raw, dict) and raw.get("field") == "custom.score")  # inf: not JSON
    ]
    cases += [(GOOD, group_by) for group_by in BAD_GROUP_BY]
    cases += [({"field": "nope", "operator": "=", "value": 1}, "created_at")]  # filter first
    for raw, group_by in cases:
        body: dict[str, Any] = {"filter": raw}
        if group_by is not None:
            body["group_by"] = group_by
        created = await client.post(tenant.url("/views"), json={"name": "x", **body},
                                    headers=headers)
        previewed = await client.post(tenant.url("/views/preview"), json=body,
                                      headers=headers)
        _same_refusal(created, previewed)
        message = previewed.json()["error"]["message"]
        if group_by is None:
            assert message.startswith("filter"), message
    # bodies: missing filter, unknown fields (a preview takes no name or personal)
    message = assert_error(await client.post(tenant.url("/views/preview"), json={},
                                             headers=headers), 400)
    assert message.startswith("filter")
    for extra in ({"name": "x"}, {"personal": True}, {"position": 1}):
        message = assert_error(await client.post(tenant.url("/views/preview"),
                                                 json={"filter": GOOD, **extra},
                                                 headers=headers), 400)
        assert message.startswith(next(iter(extra))), message
    for raw_body in (b"", b"{", b"[1]", b'"x"'):
        response = await client.post(tenant.url("/views/preview"), content=raw_body,
                                     headers={**headers, "Content-Type": "application/json"})
        assert_error(response, 400)
    assert dump_tables(live_server.store_url) == before


async def test_random_json_gets_the_same_verdict(live_server: LiveServer,
                                                 client: httpx.AsyncClient,
                                                 tenant: Tenant) -> None:
    """Random JSON as the filter (and random group_by): a 400 from creating the view is the
    same 400 from the preview; a view that could be created previews with 200."""
    unlimited(live_server)
    headers = tenant.people[0].headers
    outcomes: set[int] = set()
    filter_like = json_values | filters(max_depth=3) | st.fixed_dictionaries(
        {"field": st.sampled_from(["state", "tags", "assignee_id", "custom.plan", "nope"]),
         "operator": st.sampled_from(["=", "IN", "contains", "~", "is null", "older_than"]),
         "value": json_values})
    group_by = st.none() | st.sampled_from([*sorted(GROUPABLE), *BAD_GROUP_BY]) | json_values

    def run() -> None:
        with httpx.Client(base_url=live_server.base_url, timeout=10, headers=headers) as sync:
            @settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(filter_like, group_by)
            def check(raw: Any, grouping: Any) -> None:
                body = {"filter": raw, "group_by": grouping}
                previewed = sync.post(tenant.url("/views/preview"), json=body)
                created = sync.post(tenant.url("/views"), json={"name": "x", **body})
                outcomes.add(created.status_code)
                if created.status_code == 201:
                    assert previewed.status_code == 200, previewed.text
                    response = sync.delete(tenant.url(f"/views/{created.json()['id']}"))
                    assert response.status_code == 204
                else:
                    _same_refusal(created, previewed)

            check()

    await anyio.to_thread.run_sync(run)
    assert outcomes == {201, 400}, outcomes


# -- nothing is written ----------------------------------------------------------------------


async def test_previews_write_nothing(live_server: LiveServer, client: httpx.AsyncClient,
                                     tenant: Tenant) -> None:
    unlimited(live_server)
    people = tenant.people
    for i in range(12):
        response = await client.post(tenant.url("/conversations"), headers=people[i % 3].headers,
                                     json={"tags": ["vip"] if i % 2 else [],
                                           "assignee_id": people[i % 3].id,
                                           "team_id": tenant.teams[i % 2]["id"]})
        assert response.status_code == 201, response.text
        position = int(response.headers["Livecount-Position"])
    callers = [*(p.headers for p in people), live_server.admin]

    async def fingerprint() -> tuple[Any, ...]:
        counts = []
        for who in callers:
            response = await client.get(tenant.url("/counts"), params={"after": position},
                                        headers=who)
            assert response.status_code == 200, response.text
            counts.append(response.json())
        return (dump_tables(live_server.store_url),
                await live_server.service.store.outbox_position(), counts,
                [v.version for v in live_server.service.relay.views(tenant.id)])

    before = await fingerprint()
    bodies: list[dict[str, Any]] = [
        {"filter": GOOD}, {"filter": GOOD, "group_by": "tags"},
        {"filter": {"field": "assignee_id", "operator": "=", "value": "$me"},
         "group_by": "team_id"},
        {"filter": {"field": "waiting_since", "operator": "older_than", "value": 60}},
        {"filter": {"field": "state", "operator": "between", "value": 1}},
        {"filter": GOOD, "group_by": "created_at"},
    ]
    for _ in range(5):
        for who in callers:
            for body in bodies:
                response = await client.post(tenant.url("/views/preview"), json=body,
                                             headers=who)
                assert response.status_code in (200, 400), response.text
                assert "Livecount-Position" not in response.headers
    await live_server.service.relay.sync()
    assert await fingerprint() == before


# -- tenancy and the rate limit --------------------------------------------------------------


async def test_tenancy(live_server: LiveServer, client: httpx.AsyncClient,
                       tenant: Tenant) -> None:
    other = await create_tenant(client, live_server.admin_token, name="Other")
    body = {"filter": GOOD}
    assert_error(await client.post(tenant.url("/views/preview"), json=body), 401)
    assert_error(await client.post(tenant.url("/views/preview"), json=body,
                                   headers=auth("lc_nope")), 401)
    assert_error(await client.post(other.url("/views/preview"), json=body,
                                   headers=tenant.people[0].headers), 403)
    assert_error(await client.post("/api/workspaces/999/views/preview", json=body,
                                   headers=live_server.admin), 404)
    response = await client.get(tenant.url("/views/preview"), headers=tenant.people[0].headers)
    assert_error(response, 405)
    # another workspace's conversations never count
    await client.post(other.url("/conversations"), json={},
                      headers=other.people[0].headers)
    response = await client.post(tenant.url("/views/preview"), json=body,
                                 headers=tenant.people[0].headers)
    assert response.json() == {"count": 0}


async def test_the_rate_limit_is_per_token(live_server: LiveServer, client: httpx.AsyncClient,
                                           tenant: Tenant) -> None:
    now = [100.0]
    live_server.app.state.preview_limiter = RateLimiter(rate=2.0, burst=3,
                                                        clock=lambda: now[0])
    ann, bob = tenant.people[:2]
    url = tenant.url("/views/preview")
    for _ in range(3):
        assert (await client.post(url, json={"filter": GOOD}, headers=ann.headers)
                ).status_code == 200
    refused = await client.post(url, json={"filter": GOOD}, headers=ann.headers)
    message = assert_error(refused, 429, "too_many_requests")
    assert "preview" in message
    assert refused.headers["Retry-After"] == "1"
    # a refused request costs nothing; bad filters count like good ones
    assert_error(await client.post(url, json={"filter": GOOD}, headers=ann.headers), 429)
    assert (await client.post(url, json={"filter": GOOD}, headers=bob.headers)).status_code == 200
    assert (await client.post(url, json={"filter": GOOD}, headers=live_server.admin)
            ).status_code == 200
    now[0] += 0.5  # one preview regained
    assert (await client.post(url, json={"filter": {}}, headers=ann.headers)).status_code == 400
    assert_error(await client.post(url, json={"filter": GOOD}, headers=ann.headers), 429)
    now[0] += 10  # full again, never more than the burst
    statuses = [(await client.post(url, json={"filter": GOOD}, headers=ann.headers)).status_code
                for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    # authentication comes first: a wrong token is 401, never 429
    assert_error(await client.post(url, json={"filter": GOOD}, headers=auth("lc_x")), 401)


async def test_the_default_budget(live_server: LiveServer, client: httpx.AsyncClient,
                                  tenant: Tenant) -> None:
    """The limiter a server starts with: a burst of PREVIEW_BURST, then 429 + Retry-After."""
    url = tenant.url("/views/preview")
    headers = tenant.people[0].headers
    statuses: list[int] = []
    retry = None
    for _ in range(PREVIEW_BURST * 3):
        response = await client.post(url, json={"filter": GOOD}, headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry = response.headers["Retry-After"]
    assert statuses[:PREVIEW_BURST] == [200] * PREVIEW_BURST
    assert 429 in statuses and set(statuses) == {200, 429}
    assert retry is not None and retry.isdigit() and int(retry) >= 1


def test_the_limiter_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=100, clock=lambda: now[0])
    for i in range(1000):
        assert limiter.acquire(i.to_bytes(4, "big")) == 0.0
    assert len(limiter) == 100
    key = b"k"
    assert [limiter.acquire(key) for _ in range(2)] == [0.0, 0.0]
    wait = limiter.acquire(key)
    assert math.isclose(wait, 1.0)
    now[0] += 0.25
    assert math.isclose(limiter.acquire(key), 0.75)
    with pytest.raises(ValueError):
        RateLimiter(rate=0)

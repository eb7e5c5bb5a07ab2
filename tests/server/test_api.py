"""Contract tests of the JSON API (DESIGN §5) against a live server over real sockets.

Every endpoint, every documented error status, tenancy between two workspaces, and the
guarantee that a view's list, paged to the end, numbers exactly the view's count for every
caller.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from livecount.store.seed import FOLDERS

from .support import LiveServer, Tenant, auth, create_tenant, read_all

pytestmark = pytest.mark.anyio

JSON = {"Content-Type": "application/json"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """The response is the documented error shape with ``status`` (and ``code``)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    return message


# -- admin endpoints ------------------------------------------------------------------------


async def test_admin_creates_workspace_teammates_and_teams(live_server: LiveServer,
                                                           client: httpx.AsyncClient) -> None:
    admin = live_server.admin
    response = await client.post("/api/workspaces", json={"name": "Acme"}, headers=admin)
    assert response.status_code == 201
    workspace = response.json()
    assert set(workspace) == {"id", "name"} and workspace["name"] == "Acme"
    ws = f"/api/workspaces/{workspace['id']}"

    response = await client.post(f"{ws}/teammates", headers=admin,
                                 json={"name": "Ann", "email": "ann@acme.test"})
    assert response.status_code == 201
    ann = response.json()
    assert set(ann) == {"id", "name", "email", "token"}
    assert (ann["name"], ann["email"]) == ("Ann", "ann@acme.test")
    response = await client.post(f"{ws}/teammates", headers=admin,
                                 json={"name": "Bob", "email": "bob@acme.test"})
    bob = response.json()

    response = await client.post(f"{ws}/teams", headers=admin,
                                 json={"name": "Billing", "member_ids": [bob["id"], ann["id"]]})
    assert response.status_code == 201
    team = response.json()
    assert team == {"id": team["id"], "name": "Billing",
                    "member_ids": sorted([ann["id"], bob["id"]])}

    # the folders are seeded, in sidebar order, and the teammate's token works at once
    response = await client.get(f"{ws}/views", headers=auth(ann["token"]))
    assert response.status_code == 200
    assert [v["name"] for v in response.json()["views"]] == [f.name for f in FOLDERS]

    # who is who
    response = await client.get(f"{ws}/teammates", headers=auth(bob["token"]))
    assert response.json() == {"teammates": [
        {"id": ann["id"], "name": "Ann", "email": "ann@acme.test"},
        {"id": bob["id"], "name": "Bob", "email": "bob@acme.test"}]}
    response = await client.get(f"{ws}/teams", headers=admin)
    assert response.json() == {"teams": [team]}
    response = await client.get(f"{ws}/me", headers=auth(ann["token"]))
    assert response.json() == {"admin": False, "id": ann["id"], "name": "Ann",
                               "email": "ann@acme.test", "workspace_id": workspace["id"]}
    response = await client.get(f"{ws}/me", headers=admin)
    assert response.json() == {"admin": True}


async def test_admin_endpoints_refuse_teammates_and_strangers(
        client: httpx.AsyncClient, tenant: Tenant) -> None:
    mate = tenant.people[0].headers
    calls = [("/api/workspaces", {"name": "Mine"}),
             (tenant.url("/teammates"), {"name": "Eve", "email": "eve@acme.test"}),
             (tenant.url("/teams"), {"name": "Mine", "member_ids": []})]
    for path, body in calls:
        assert_error(await client.post(path, json=body, headers=mate), 403, "forbidden")
        response = await client.post(path, json=body)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        for wrong in ("Bearer nope", "Bearer lc_nope", "Basic YWRtaW46YWRtaW4=", "Bearer",
                      "lc_admin_test-token"):
            response = await client.post(path, json=body, headers={"Authorization": wrong})
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
    response = await client.get(tenant.url("/teammates"), headers=mate)
    assert len(response.json()["teammates"]) == len(tenant.people)


async def test_duplicate_teammate_email_is_a_conflict(live_server: LiveServer,
                                                      client: httpx.AsyncClient,
                                                      tenant: Tenant) -> None:
    taken = tenant.people[0].email
    response = await client.post(tenant.url("/teammates"), headers=live_server.admin,
                                 json={"name": "Again", "email": taken})
    assert_error(response, 409, "conflict")
    response = await client.get(tenant.url("/teammates"), headers=live_server.admin)
    assert [t["email"] for t in response.json()["teammates"]].count(taken) == 1


async def test_admin_bodies_are_validated(live_server: LiveServer, client: httpx.AsyncClient,
                                          tenant: Tenant) -> None:
    admin = live_server.admin
    bad = [("/api/workspaces", {}), ("/api/workspaces", {"name": ""}),
           ("/api/workspaces", {"name": 3}), ("/api/workspaces", {"name": "x", "extra": 1}),
           ("/api/workspaces", ["name"]),
           (tenant.url("/teammates"), {"name": "No mail"}),
           (tenant.url("/teammates"), {"name": "x", "email": "not-an-address"}),
           (tenant.url("/teams"), {"name": "t", "member_ids": "all"}),
           (tenant.url("/teams"), {"name": "t", "member_ids": [10**6]})]
    for path, body in bad:
        assert_error(await client.post(path, json=body, headers=admin), 400)
    assert_error(await client.post("/api/workspaces/999/teammates", headers=admin,
                                   json={"name": "x", "email": "x@y.z"}), 404, "not_found")


# -- conversations ---------------------------------------------------------------------------


async def test_conversation_create_get_patch(client: httpx.AsyncClient, tenant: Tenant) -> None:
    ann, bob = tenant.people[0], tenant.people[1]
    response = await client.post(tenant.url("/conversations"), json={}, headers=ann.headers)
    assert response.status_code == 201
    created = response.json()
    assert response.headers["etag"] == '"1"'
    assert created["version"] == 1 and created["workspace_id"] == tenant.id
    assert (created["state"], created["priority"], created["channel"]) == ("open", False, "chat")
    assert created["tags"] == created["mentions"] == created["unread_by"] == []
    assert created["author_id"] == ann.id and created["assignee_id"] is None
    assert created["custom"] == {}
    url = tenant.url(f"/conversations/{created['id']}")

    response = await client.get(url, headers=bob.headers)
    assert response.status_code == 200 and response.json() == created

    patch = {"assignee_id": bob.id, "tags": ["vip", "billing"], "custom": {"plan": "pro",
                                                                           "seats": 5}}
    response = await client.patch(url, json=patch, headers=bob.headers)
    assert response.status_code == 200
    patched = response.json()
    assert patched["version"] == 2 and response.headers["etag"] == '"2"'
    assert patched["assignee_id"] == bob.id and patched["tags"] == ["billing", "vip"]
    assert patched["custom"] == {"plan": "pro", "seats": 5}
    assert patched["created_at"] == created["created_at"]

    # merge patch: custom merges key by key, null removes a key or clears a field
    response = await client.patch(url, headers={**bob.headers,
                                                "Content-Type": "application/merge-patch+json"},
                                  content=b'{"custom": {"seats": null, "tier": 2},'
                                          b' "assignee_id": null, "tags": ["x"]}')
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["custom"] == {"plan": "pro", "tier": 2}
    assert patched["assignee_id"] is None and patched["tags"] == ["x"]
    assert patched["version"] == 3

    # If-Match: 3, "3" and W/"3" are the same version; a stale one is a 412
    for i, header in enumerate(['3', '"4"', 'W/"5"']):
        response = await client.patch(url, json={"priority": i % 2 == 0},
                                      headers={**ann.headers, "If-Match": header})
        assert response.status_code == 200, (header, response.text)
    current = (await client.get(url, headers=ann.headers)).json()
    assert current["version"] == 6
    for stale in ("5", '"1"', 'W/"7"'):
        response = await client.patch(url, json={"state": "closed"},
                                      headers={**ann.headers, "If-Match": stale})
        assert_error(response, 412, "version_mismatch")
    for nonsense in ("abc", '"3', "3.0", "-1", "W/abc", "1" * 30):
        response = await client.patch(url, json={"state": "closed"},
                                      headers={**ann.headers, "If-Match": nonsense})
        assert_error(response, 400)
    assert (await client.get(url, headers=ann.headers)).json() == current


async def test_conversation_bodies_are_validated(live_server: LiveServer,
                                                 client: httpx.AsyncClient,
                                                 tenant: Tenant) -> None:
    ann = tenant.people[0]
    created = (await client.post(tenant.url("/conversations"), json={},
                                 headers=ann.headers)).json()
    url = tenant.url(f"/conversations/{created['id']}")
    bad_creates: list[Any] = [
        {"id": 5}, {"version": 3}, {"created_at": "2024-01-01T00:00:00Z"}, {"color": "red"},
        {"state": "pending"}, {"state": None}, {"priority": "yes"}, {"tags": "vip"},
        {"tags": [1]}, {"mentions": ["ann"]}, {"assignee_id": 10**9}, {"team_id": -1},
        {"waiting_since": "yesterday"}, {"custom": {"bad key": 1}}, {"custom": {"k": [1]}},
        [], "conversation", 7, None,
    ]
    for body in bad_creates:
        response = await client.post(tenant.url("/conversations"), json=body,
                                     headers=ann.headers)
        assert_error(response, 400)
    for body in [{"author_id": ann.id}, {"version": 9}, {"updated_at": None}, {"nope": 1},
                 {"state": 1}, []]:
        assert_error(await client.patch(url, json=body, headers=ann.headers), 400)
    assert (await client.get(url, headers=ann.headers)).json() == created
    assert_error(await client.get(tenant.url("/conversations/987654"), headers=ann.headers),
                 404, "not_found")
    assert_error(await client.patch(tenant.url("/conversations/987654"), json={},
                                    headers=ann.headers), 404, "not_found")
    # the admin may write conversations too (with no author)
    response = await client.post(tenant.url("/conversations"), json={"priority": True},
                                 headers=live_server.admin)
    assert response.status_code == 201 and response.json()["author_id"] is None


# -- views -------------------------------------------------------------------------------------


async def test_views_create_replace_delete(live_server: LiveServer, client: httpx.AsyncClient,
                                           tenant: Tenant) -> None:
    ann, bob = tenant.people[0], tenant.people[1]
    vip = {"field": "tags", "operator": "contains", "value": "vip"}
    response = await client.post(tenant.url("/views"), headers=ann.headers,
                                 json={"name": "VIP", "filter": vip, "group_by": "priority"})
    assert response.status_code == 201, response.text
    view = response.json()
    assert view == {"id": view["id"], "name": "VIP", "filter": vip, "group_by": "priority",
                    "owner_id": None, "personal": False, "position": len(FOLDERS),
                    "version": 1}
    await client.post(tenant.url("/conversations"), headers=ann.headers,
                      json={"tags": ["vip"], "priority": True})
    await live_server.service.relay.sync()

    # everyone sees a shared view, with its count, at once
    for who in (ann.headers, bob.headers, live_server.admin):
        listed = (await client.get(tenant.url("/views"), headers=who)).json()
        mine = [v for v in listed["views"] if v["id"] == view["id"]]
        assert mine == [{**view, "count": {"true": 1}}]
        assert isinstance(listed["seq"], int)

    # a personal view: its owner only; others get the same 404 as for a missing view
    response = await client.post(tenant.url("/views"), headers=bob.headers, json={
        "name": "Mine", "filter": {"field": "assignee_id", "operator": "=", "value": "$me"},
        "personal": True})
    assert response.status_code == 201
    personal = response.json()
    assert personal["owner_id"] == bob.id and personal["personal"] is True
    for who in (ann.headers, live_server.admin):
        ids = [v["id"] for v in (await client.get(tenant.url("/views"),
                                                  headers=who)).json()["views"]]
        assert personal["id"] not in ids
        counts = (await client.get(tenant.url("/counts"), headers=who)).json()["counts"]
        assert str(personal["id"]) not in counts
        for method, suffix in (("PUT", ""), ("DELETE", ""), ("GET", "/conversations")):
            body = {"name": "x", "filter": vip} if method == "PUT" else None
            hidden = await client.request(method, tenant.url(f"/views/{personal['id']}{suffix}"),
                                          json=body, headers=who)
            missing = await client.request(method, tenant.url(f"/views/987654{suffix}"),
                                           json=body, headers=who)
            assert (assert_error(hidden, 404, "not_found").replace(str(personal["id"]), "N")
                    == assert_error(missing, 404, "not_found").replace("987654", "N"))
    response = await client.post(tenant.url("/views"), headers=live_server.admin, json={
        "name": "Admin's", "filter": vip, "personal": True})
    assert_error(response, 400)

    # PUT replaces name, filter and grouping (an omitted group_by is none), and may move it
    closed = {"field": "state", "operator": "=", "value": "closed"}
    response = await client.put(tenant.url(f"/views/{view['id']}"), headers=bob.headers,
                                json={"name": "Closed", "filter": closed, "position": 0})
    assert response.status_code == 200, response.text
    replaced = response.json()
    assert replaced == {**view, "name": "Closed", "filter": closed, "group_by": None,
                        "position": 0, "version": 2}
    counts = (await client.get(tenant.url("/counts"), headers=ann.headers)).json()["counts"]
    assert counts[str(view["id"])] == 0
    listed = (await client.get(tenant.url("/views"), headers=ann.headers)).json()["views"]
    assert [v["position"] for v in listed] == sorted(v["position"] for v in listed)

    # DELETE: 204, gone everywhere; a second DELETE is a 404
    response = await client.delete(tenant.url(f"/views/{view['id']}"), headers=ann.headers)
    assert response.status_code == 204 and response.content == b""
    listed = (await client.get(tenant.url("/views"), headers=ann.headers)).json()["views"]
    assert view["id"] not in [v["id"] for v in listed]
    counts = (await client.get(tenant.url("/counts"), headers=ann.headers)).json()["counts"]
    assert str(view["id"]) not in counts
    assert_error(await client.delete(tenant.url(f"/views/{view['id']}"), headers=ann.headers),
                 404, "not_found")
    # the owner can delete a personal view
    response = await client.delete(tenant.url(f"/views/{personal['id']}"), headers=bob.headers)
    assert response.status_code == 204


async def test_view_bodies_are_validated(client: httpx.AsyncClient, tenant: Tenant) -> None:
    ann = tenant.people[0]
    good = {"field": "state", "operator": "=", "value": "open"}
    bad: list[tuple[Any, str]] = [
        ({"filter": good}, "name"),
        ({"name": "x"}, "filter"),
        ({"name": "x", "filter": good, "owner_id": 1}, "owner_id"),
        ({"name": "x", "filter": good, "personal": "yes"}, "personal"),
        ({"name": "x", "filter": good, "group_by": "created_at"}, "group_by"),
        ({"name": "x", "filter": {"field": "state", "operator": "between", "value": 1}},
         "filter.operator: 'between' is not an operator"),
        ({"name": "x", "filter": {"operator": "AND", "value": [good, {
            "field": "nope", "operator": "=", "value": 1}]}}, "filter.value[1].field"),
        ({"name": "x", "filter": {"operator": "NOT", "value": {
            "field": "assignee_id", "operator": "=", "value": "$me"}}}, "$me"),
    ]
    for body, named in bad:
        message = assert_error(await client.post(tenant.url("/views"), json=body,
                                                 headers=ann.headers), 400)
        assert named in message, (body, message)
    folder = (await client.get(tenant.url("/views"), headers=ann.headers)).json()["views"][0]
    for body in [{"name": "x"}, {"name": "x", "filter": good, "position": -1},
                 {"name": "x", "filter": good, "personal": True}]:
        response = await client.put(tenant.url(f"/views/{folder['id']}"), json=body,
                                    headers=ann.headers)
        assert_error(response, 400)
    after = (await client.get(tenant.url("/views"), headers=ann.headers)).json()["views"][0]
    assert after == folder


# -- lists and counts ------------------------------------------------------------------------


async def _populate(client: httpx.AsyncClient, tenant: Tenant, n: int, seed: int) -> None:
    rng = random.Random(seed)
    people = [p.id for p in tenant.people]
    teams = [t["id"] for t in tenant.teams]
    for _ in range(n):
        author = rng.choice(tenant.people)
        body: dict[str, Any] = {
            "assignee_id": rng.choice([None, *people]),
            "team_id": rng.choice([None, *teams]),
            "priority": rng.random() < 0.3,
            "tags": rng.sample(["vip", "billing", "bug", "'; DROP TABLE views; --"],
                               rng.randint(0, 2)),
            "mentions": rng.sample(people, rng.randint(0, 2)),
            "channel": rng.choice(["chat", "email"]),
        }
        response = await client.post(tenant.url("/conversations"), json=body,
                                     headers=author.headers)
        assert response.status_code == 201, response.text
        conversation = response.json()
        if rng.random() < 0.4:
            state = rng.choice(["closed", "snoozed"])
            extra = {"snoozed_until": "2999-01-01T00:00:00Z"} if state == "snoozed" else {}
            response = await client.patch(tenant.url(f"/conversations/{conversation['id']}"),
                                          json={"state": state, **extra},
                                          headers=author.headers)
            assert response.status_code == 200, response.text


async def test_every_list_numbers_exactly_its_count(live_server: LiveServer,
                                                    client: httpx.AsyncClient,
                                                    tenant: Tenant) -> None:
    """Guarantee 1 through the API: for every caller, every view (and every group of a
    grouped view), the list paged to the end has exactly the count's items, newest first,
    with no duplicates."""
    ann = tenant.people[0]
    await client.post(tenant.url("/views"), headers=ann.headers, json={
        "name": "By tag", "filter": {"field": "state", "operator": "!=", "value": "closed"},
        "group_by": "tags"})
    await client.post(tenant.url("/views"), headers=ann.headers, json={
        "name": "Mine, VIP", "personal": True, "filter": {"operator": "AND", "value": [
            {"field": "assignee_id", "operator": "=", "value": "$me"},
            {"field": "tags", "operator": "contains", "value": "vip"}]}})
    await _populate(client, tenant, 45, seed=7)
    await live_server.service.relay.sync()
    callers = [p.headers for p in tenant.people] + [live_server.admin]
    totals = 0
    for who in callers:
        counts_body = (await client.get(tenant.url("/counts"), headers=who)).json()
        views_body = (await client.get(tenant.url("/views"), headers=who)).json()
        assert views_body["seq"] == counts_body["seq"]
        counts = counts_body["counts"]
        assert {str(v["id"]): v["count"] for v in views_body["views"]} == counts
        for view in views_body["views"]:
            count = counts[str(view["id"])]
            everything = await read_all(client, tenant, who, view["id"])
            ids = [c["id"] for c in everything]
            assert ids == sorted(set(ids), reverse=True), "newest first, no duplicates"
            if view["group_by"] is None:
                assert len(ids) == count, view["name"]
                totals += count
                continue
            assert isinstance(count, dict)
            assert all(n > 0 for n in count.values()), "a snapshot omits empty groups"
            seen: set[int] = set()
            groups = set(count) | {str(t["id"]) for t in tenant.teams} | {
                str(p.id) for p in tenant.people}
            for group in groups:
                listed = await read_all(client, tenant, who, view["id"], group, limit=4)
                group_ids = [c["id"] for c in listed]
                assert len(group_ids) == len(set(group_ids)) == count.get(group, 0), (
                    view["name"], group)
                seen.update(group_ids)
                totals += len(group_ids)
            assert seen <= set(ids)
    assert totals > 100, "the data must exercise the lists"


async def test_list_parameters(live_server: LiveServer, client: httpx.AsyncClient,
                               tenant: Tenant) -> None:
    ann = tenant.people[0]
    for _ in range(3):
        await client.post(tenant.url("/conversations"), json={}, headers=ann.headers)
    views = (await client.get(tenant.url("/views"), headers=ann.headers)).json()["views"]
    everything = next(v for v in views if v["name"] == "All")
    url = tenant.url(f"/views/{everything['id']}/conversations")
    page = (await client.get(url, params={"limit": 2}, headers=ann.headers)).json()
    assert len(page["conversations"]) == 2 and isinstance(page["next_cursor"], str)
    rest = (await client.get(url, params={"cursor": page["next_cursor"]},
                             headers=ann.headers)).json()
    assert len(rest["conversations"]) == 1 and rest["next_cursor"] is None
    for params in ({"limit": "ten"}, {"limit": "0"}, {"limit": "-1"}, {"limit": "201"},
                   {"limit": "1.5"}, {"limit": ""}, {"cursor": "abc"}, {"cursor": "-4"},
                   {"cursor": "9" * 40}, {"group": "vip"}):
        assert_error(await client.get(url, params=params, headers=ann.headers), 400)
    assert_error(await client.get(tenant.url("/views/987654/conversations"),
                                  headers=ann.headers), 404, "not_found")
    grouped = next(v for v in views if v["group_by"] == "team_id")
    response = await client.get(tenant.url(f"/views/{grouped['id']}/conversations"),
                                params={"group": "no such team"}, headers=ann.headers)
    assert response.json() == {"conversations": [], "next_cursor": None}


# -- routing errors ----------------------------------------------------------------------------


async def test_routing_errors_have_the_error_shape(client: httpx.AsyncClient,
                                                   tenant: Tenant) -> None:
    ann = tenant.people[0].headers
    for path in ("/nope", "/api/workspaces/abc/views", "/api/workspaces/-1/views",
                 tenant.url("/conversations/x"), tenant.url("/views/1/nope"), "/api"):
        assert_error(await client.get(path, headers=ann), 404, "not_found")
    response = await client.delete(tenant.url("/views"), headers=ann)
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    response = await client.get(tenant.url("/views/1"), headers=ann)
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"PUT", "DELETE"}
    assert_error(await client.get("/api/workspaces", headers=ann), 405)
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x"):
        response = await client.post(tenant.url("/conversations"), content=b"{}",
                                     headers={**ann, "Content-Type": content_type})
        assert_error(response, 400, "unsupported_media_type")
    response = await client.post(tenant.url("/conversations"), content=b"{}",
                                 headers={**ann, "Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 201


# -- tenancy -----------------------------------------------------------------------------------


async def test_tenants_never_see_each_other(live_server: LiveServer,
                                            client: httpx.AsyncClient) -> None:
    home = await create_tenant(client, live_server.admin_token, "Home", teammates=2, teams=1)
    away = await create_tenant(client, live_server.admin_token, "Away", teammates=2, teams=1)
    me, stranger = home.people[0], away.people[0]
    conversation = (await client.post(home.url("/conversations"), headers=me.headers, json={
        "tags": ["home-secret"], "assignee_id": me.id})).json()
    view = (await client.post(home.url("/views"), headers=me.headers, json={
        "name": "Home secret view", "filter": {"field": "tags", "operator": "contains",
                                               "value": "home-secret"}})).json()
    theirs = (await client.post(away.url("/conversations"), headers=stranger.headers,
                                json={})).json()
    their_view = (await client.post(away.url("/views"), headers=stranger.headers, json={
        "name": "Away view", "filter": {"field": "state", "operator": "=",
                                        "value": "open"}})).json()
    await live_server.service.relay.sync()
    secrets = [me.email, me.name, "home-secret", "Home secret view", home.teams[0]["name"]]

    body = {"name": "x", "filter": {"field": "state", "operator": "=", "value": "open"}}
    every_endpoint = [
        ("GET", "/me", None), ("GET", "/teammates", None), ("GET", "/teams", None),
        ("POST", "/conversations", {}), ("GET", f"/conversations/{conversation['id']}", None),
        ("PATCH", f"/conversations/{conversation['id']}", {"state": "closed"}),
        ("GET", "/views", None), ("POST", "/views", body),
        ("PUT", f"/views/{view['id']}", body), ("DELETE", f"/views/{view['id']}", None),
        ("GET", f"/views/{view['id']}/conversations", None), ("GET", "/counts", None),
    ]
    before = (await client.get(home.url("/counts"), headers=me.headers)).json()
    # another workspace's token on this workspace's paths: 403, and nothing of ours
    for method, path, payload in every_endpoint:
        response = await client.request(method, home.url(path), json=payload,
                                        headers=stranger.headers)
        assert_error(response, 403, "forbidden")
        assert not any(secret in response.text for secret in secrets)
    # ... also where the workspace does not exist (a 404 would tell which ids exist)
    for method, path, payload in every_endpoint:
        response = await client.request(method, f"/api/workspaces/98765{path}", json=payload,
                                        headers=stranger.headers)
        assert_error(response, 403, "forbidden")
        response = await client.request(method, f"/api/workspaces/98765{path}", json=payload,
                                        headers=live_server.admin)
        assert_error(response, 404, "not_found")
    assert (await client.get(home.url("/counts"), headers=me.headers)).json() == before

    # another workspace's ids inside our own path: the same 404 as ids that do not exist
    foreign = [("GET", f"/conversations/{theirs['id']}", None, "/conversations/987654"),
               ("PATCH", f"/conversations/{theirs['id']}", {"priority": True},
                "/conversations/987654"),
               ("PUT", f"/views/{their_view['id']}", body, "/views/987654"),
               ("DELETE", f"/views/{their_view['id']}", None, "/views/987654"),
               ("GET", f"/views/{their_view['id']}/conversations", None,
                "/views/987654/conversations")]
    for who in (me.headers, live_server.admin):
        for method, path, payload, missing in foreign:
            response = await client.request(method, home.url(path), json=payload, headers=who)
            message = assert_error(response, 404, "not_found")
            other = await client.request(method, home.url(missing), json=payload, headers=who)
            assert (message.replace(str(theirs["id"]), "N").replace(str(their_view["id"]), "N")
                    == assert_error(other, 404).replace("987654", "N"))
            assert "Away" not in response.text
    # ... and as references in bodies: refused, never linked
    for payload in ({"assignee_id": stranger.id}, {"mentions": [stranger.id]},
                    {"team_id": away.teams[0]["id"]}, {"author_id": stranger.id}):
        response = await client.post(home.url("/conversations"), json=payload,
                                     headers=me.headers)
        assert_error(response, 400)
    response = await client.post(home.url("/teams"), headers=live_server.admin,
                                 json={"name": "mixed", "member_ids": [me.id, stranger.id]})
    assert_error(response, 400)
    # their data is untouched
    response = await client.get(away.url(f"/conversations/{theirs['id']}"),
                                headers=stranger.headers)
    assert response.json() == theirs
    listed = (await client.get(away.url("/views"), headers=stranger.headers)).json()["views"]
    assert their_view["id"] in [v["id"] for v in listed]
    assert "Home secret view" not in str(listed)

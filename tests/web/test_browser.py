"""The inbox page in a real browser (Debian's Chromium through Playwright) against a real
server: live counts across teammates, reconnect after a restart, the view form, and
personal views staying personal.

What the page shows is checked against the server's own answers (``GET /counts``, the
lists) and against the seeded data, never against itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from livecount.store import open_store
from tests.server.stream_support import Model

from .conftest import PERSONAL_VIEW, Inbox, WebServer, auth

pytestmark = [pytest.mark.browser, pytest.mark.anyio]

ADA, GRACE = "Ada Lovelace", "Grace Hopper"
#: the page must show a change made elsewhere within this many seconds (measured)
LIVE_WITHIN = 1.0


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
async def pages(browser: Any) -> AsyncIterator[Callable[[str], Awaitable[Any]]]:
    """Open the inbox as one teammate in a fresh browser context (own sessionStorage)."""
    contexts: list[Any] = []

    async def open_page(url: str) -> Any:
        context = await browser.new_context(viewport={"width": 1360, "height": 860})
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(10_000)
        await page.goto(url)
        await expect_live(page)
        return page

    try:
        yield open_page
    finally:
        for context in contexts:
            await context.close()


async def expect_live(page: Any, within_ms: float = 10_000) -> None:
    from playwright.async_api import expect

    status = page.get_by_test_id("conn-status")
    await expect(status).to_have_attribute("data-state", "live", timeout=within_ms)
    await expect(status).to_have_text("live")
    # the snapshot has arrived: no badge is pending any more
    await expect(page.locator("#sidebar .badge-pending")).to_have_count(0, timeout=within_ms)


async def badges(page: Any) -> dict[str, str]:
    """Every count badge of the sidebar: data-testid → text."""
    result: dict[str, str] = await page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll(
               '#sidebar [data-testid^="count-"]')].map(e => [e.dataset.testid, e.textContent]))""")
    return result


def mismatches(shown: dict[str, str], counts: dict[str, Any]) -> list[str]:
    """How the badges differ from the server's counts (``GET /counts``): every plain view's
    badge shows its integer, every nonzero group its integer, any other group row 0, and no
    badge belongs to a view the server did not count."""
    problems: list[str] = []
    for view_id, value in counts.items():
        if isinstance(value, int):
            got = shown.get(f"count-{view_id}")
            if got != str(value):
                problems.append(f"view {view_id}: page {got!r}, server {value}")
            continue
        if f"count-{view_id}" in shown:
            problems.append(f"grouped view {view_id} has a plain badge")
        for group, n in value.items():
            got = shown.get(f"count-{view_id}-{group}")
            if got != str(n):
                problems.append(f"view {view_id} group {group!r}: page {got!r}, server {n}")
        prefix = f"count-{view_id}-"
        for key, text in shown.items():
            if key.startswith(prefix) and key[len(prefix):] not in value and text != "0":
                problems.append(f"view {view_id} group {key[len(prefix):]!r}: page {text!r}, "
                                "server has no such group")
    for key in shown:
        if key.split("-")[1] not in counts:
            problems.append(f"badge {key} for a view the server does not count")
    return problems


async def server_counts(server: WebServer, inbox: Inbox, mate: str) -> dict[str, Any]:
    async with server.client(inbox.mates[mate].token) as client:
        response = await client.get(f"/api/workspaces/{inbox.ws}/counts")
        assert response.status_code == 200, response.text
        counts: dict[str, Any] = response.json()["counts"]
        return counts


async def assert_counts_match(page: Any, server: WebServer, inbox: Inbox, mate: str,
                              within: float = 5.0) -> dict[str, Any]:
    """Wait (up to ``within`` seconds) until the page's badges equal ``GET /counts``; fail with the
    differences otherwise."""
    deadline = time.monotonic() + within
    while True:
        counts = await server_counts(server, inbox, mate)
        problems = mismatches(await badges(page), counts)
        if not problems:
            return counts
        if time.monotonic() > deadline:
            pytest.fail(f"{mate}'s page disagrees with GET /counts: {problems}")
        await asyncio.sleep(0.1)


async def count_shown(page: Any, testid: str) -> int:
    text = await page.get_by_test_id(testid).text_content()
    assert text is not None and text.isdigit(), f"{testid} shows {text!r}"
    return int(text)


async def seconds_until(page: Any, testid: str, text: str, started: float) -> float:
    """Seconds from ``started`` (time.monotonic) until the element shows ``text``."""
    await page.wait_for_function(
        "([id, text]) => document.querySelector(`[data-testid='${id}']`)?.textContent === text",
        arg=[testid, text], polling="raf", timeout=5_000)
    return time.monotonic() - started


async def listed_ids(page: Any) -> list[int]:
    ids: list[int] = await page.evaluate(
        """() => [...document.querySelectorAll('#list-body > tr')]
                 .map(tr => Number(tr.dataset.testid.slice('conv-'.length)))""")
    return ids


async def wait_list_settled(page: Any, view_count_testid: str) -> list[int]:
    """The list once it agrees with the view's count (the page refetches it after a count
    change); fails if it never does."""
    deadline = time.monotonic() + 5
    while True:
        count = await count_shown(page, view_count_testid)
        header = await count_shown(page, "list-count")
        ids = await listed_ids(page)
        if count == header == len(ids):
            return ids
        if time.monotonic() > deadline:
            pytest.fail(f"the list shows {len(ids)} rows, its header {header}, "
                        f"the sidebar {count}")
        await asyncio.sleep(0.05)


# -- 1. live counts across teammates -----------------------------------------------------------


async def test_closing_a_conversation_updates_every_teammates_count_within_a_second(
        web_server: WebServer, inbox: Inbox, pages: Any) -> None:
    from playwright.async_api import expect

    everything = inbox.views["All"]
    ada = await pages(inbox.page_url(web_server, ADA))
    grace = await pages(inbox.page_url(web_server, GRACE))
    # the token left the address bar as soon as the page read it
    assert "token=" not in ada.url and f"ws={inbox.ws}" in ada.url
    await assert_counts_match(ada, web_server, inbox, ADA)
    await assert_counts_match(grace, web_server, inbox, GRACE)

    for page in (ada, grace):
        await page.get_by_test_id(f"view-{everything}").click()
        await expect(page.get_by_test_id("list-title")).to_have_text("All")
    before = await count_shown(ada, f"count-{everything}")
    expected_open = sum(1 for c in inbox.conversations if c["state"] == "open")
    assert before == await count_shown(grace, f"count-{everything}") == expected_open > 0
    ids = await wait_list_settled(ada, f"count-{everything}")
    assert sorted(ids) == sorted(c["id"] for c in inbox.conversations if c["state"] == "open")
    await wait_list_settled(grace, f"count-{everything}")

    target = ids[0]
    row = ada.get_by_test_id(f"conv-{target}")
    started = time.monotonic()
    await row.get_by_test_id("action-close").click()
    latency_ada, latency_grace = await asyncio.gather(
        seconds_until(ada, f"count-{everything}", str(before - 1), started),
        seconds_until(grace, f"count-{everything}", str(before - 1), started))
    print(f"close → count on screen: Ada {latency_ada * 1000:.0f} ms, "
          f"Grace {latency_grace * 1000:.0f} ms")
    assert latency_ada <= LIVE_WITHIN, f"Ada's count changed after {latency_ada:.3f} s"
    assert latency_grace <= LIVE_WITHIN, f"Grace's count changed after {latency_grace:.3f} s"

    # both lists drop the closed conversation and agree with their counts again
    for page in (ada, grace):
        await expect(page.get_by_test_id(f"conv-{target}")).to_have_count(0)
        ids_after = await wait_list_settled(page, f"count-{everything}")
        assert target not in ids_after and len(ids_after) == before - 1
    await expect(ada.get_by_test_id("notice")).to_contain_text(f"#{target} closed")
    async with web_server.client(inbox.mates[GRACE].token) as client:
        response = await client.get(f"/api/workspaces/{inbox.ws}/conversations/{target}")
        assert response.json()["state"] == "closed"
    await assert_counts_match(ada, web_server, inbox, ADA)
    await assert_counts_match(grace, web_server, inbox, GRACE)

    if path := os.environ.get("LIVECOUNT_SCREENSHOT"):  # docs/inbox.png
        await ada.locator("#list-body > tr").nth(1).hover()
        await ada.screenshot(path=path, animations="disabled")


async def test_a_stale_version_is_reported_and_reloaded(
        web_server: WebServer, inbox: Inbox, pages: Any) -> None:
    from playwright.async_api import expect

    everything = inbox.views["All"]
    ada = await pages(inbox.page_url(web_server, ADA))
    await ada.get_by_test_id(f"view-{everything}").click()
    ids = await wait_list_settled(ada, f"count-{everything}")
    target = ids[0]
    row = ada.get_by_test_id(f"conv-{target}")
    version = int(await row.get_attribute("data-version") or 0)
    # someone else tags it meanwhile (no count changes, so the page's row stays stale)
    async with web_server.client(inbox.mates[GRACE].token) as client:
        response = await client.patch(f"/api/workspaces/{inbox.ws}/conversations/{target}",
                                      json={"custom": {"note": "grace was here"}})
        assert response.status_code == 200, response.text
        assert response.json()["version"] == version + 1
    await row.get_by_test_id("action-tag").click()
    await row.get_by_test_id("tag-input").fill("needs-reply")
    await row.get_by_test_id("tag-input").press("Enter")
    await expect(ada.get_by_test_id("notice")).to_contain_text("changed by someone else")
    await expect(ada.get_by_test_id(f"conv-{target}")).to_have_attribute(
        "data-version", str(version + 1))
    async with web_server.client(inbox.mates[ADA].token) as client:
        current = (await client.get(f"/api/workspaces/{inbox.ws}/conversations/{target}")).json()
    assert "needs-reply" not in current["tags"] and current["version"] == version + 1
    # with the fresh version the same action goes through
    row = ada.get_by_test_id(f"conv-{target}")
    await row.get_by_test_id("action-tag").click()
    await row.get_by_test_id("tag-input").fill("needs-reply")
    await row.get_by_test_id("tag-input").press("Enter")
    await expect(row.get_by_test_id("tag")).to_contain_text(["needs-reply"])
    async with web_server.client(inbox.mates[ADA].token) as client:
        current = (await client.get(f"/api/workspaces/{inbox.ws}/conversations/{target}")).json()
    assert "needs-reply" in current["tags"] and current["version"] == version + 2


# -- 2. reconnect after a restart --------------------------------------------------------------


async def test_the_page_reconnects_after_a_server_restart_with_correct_counts(
        web_server: WebServer, inbox: Inbox, pages: Any) -> None:
    from playwright.async_api import expect

    everything = inbox.views["All"]
    ada = await pages(inbox.page_url(web_server, ADA))
    before = await assert_counts_match(ada, web_server, inbox, ADA)
    status = ada.get_by_test_id("conn-status")

    await web_server.stop()
    await expect(status).to_have_attribute("data-state", "reconnecting", timeout=5_000)
    await expect(status).to_have_text("reconnecting…")
    # a write while no server runs: only the SQLite file knows it
    store = open_store(web_server.settings.store_url)
    await store.open()
    try:
        await store.create_conversation(inbox.ws, {"team_id": inbox.teams["Billing"],
                                                   "tags": ["vip"]}, inbox.mates[ADA].id)
    finally:
        await store.close()

    await web_server.start()
    await expect_live(ada, within_ms=15_000)
    after = await assert_counts_match(ada, web_server, inbox, ADA)
    assert after[str(everything)] == before[str(everything)] + 1
    assert after[str(inbox.views["VIP waiting"])] == before[str(inbox.views["VIP waiting"])] + 1
    assert await count_shown(ada, f"count-{everything}") == before[str(everything)] + 1

    # the new server's stream reaches the page too
    ids = [c["id"] for c in inbox.conversations if c["state"] == "open"]
    async with web_server.client(inbox.mates[GRACE].token) as client:
        response = await client.patch(f"/api/workspaces/{inbox.ws}/conversations/{ids[0]}",
                                      json={"state": "closed"})
        assert response.status_code == 200, response.text
    await expect(ada.get_by_test_id(f"count-{everything}")).to_have_text(
        str(before[str(everything)]), timeout=2_000)
    await assert_counts_match(ada, web_server, inbox, ADA)


# -- 2b. resume: ?epoch=E&since=S --------------------------------------------------------------


@dataclass
class Socket:
    """One WebSocket the page opened, as Playwright saw it: its URL and the JSON it got."""

    url: str
    frames: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.url).query).items()}

    @property
    def counted(self) -> list[dict[str, Any]]:
        """Its snapshots and deltas."""
        return [f for f in self.frames if f.get("type") in ("snapshot", "delta")]


async def open_watched(browser: Any, url: str, contexts: list[Any]) -> tuple[Any, list[Socket]]:
    """The page at ``url`` (live, its snapshot shown) and every WebSocket it opens, in order,
    recorded from before its first one."""
    context = await browser.new_context(viewport={"width": 1360, "height": 860})
    contexts.append(context)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    sockets: list[Socket] = []

    def opened(ws: Any) -> None:
        sock = Socket(ws.url)
        sockets.append(sock)
        ws.on("framereceived", lambda payload: sock.frames.append(json.loads(payload)))
        ws.on("close", lambda _ws: setattr(sock, "closed", True))

    page.on("websocket", opened)
    await page.goto(url)
    await expect_live(page)
    return page, sockets


def last_applied(sockets: list[Socket]) -> tuple[str, int]:
    """The (epoch, seq) of the last snapshot or delta the page received."""
    counted = [f for s in sockets for f in s.counted]
    assert counted, "no snapshot or delta reached the page"
    return counted[-1]["epoch"], counted[-1]["seq"]


async def write(client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]) -> int:
    """A write through the API; the outbox position it committed at (Livecount-Position)."""
    response = await client.request(method, path, json=body)
    assert response.status_code in (200, 201), response.text
    position = response.headers.get("Livecount-Position")
    assert position is not None and position.isdigit(), dict(response.headers)
    return int(position)


async def counts_after(server: WebServer, inbox: Inbox, mate: str, position: int
                       ) -> dict[str, Any]:
    """``GET /counts?after=P``: the counts once they reflect the write at ``position``."""
    async with server.client(inbox.mates[mate].token) as client:
        response = await client.get(f"/api/workspaces/{inbox.ws}/counts",
                                    params={"after": position})
        assert response.status_code == 200, response.text
        counts: dict[str, Any] = response.json()["counts"]
        return counts


async def test_the_page_resumes_its_stream_after_a_drop_and_a_restart(
        web_server: WebServer, inbox: Inbox, browser: Any) -> None:
    """A drop from the server (the drain's reconnect message, same process): the page comes
    back with ?epoch=E&since=S of what it applied and gets ONE delta of that epoch with what
    it missed. A restart (a new epoch): the same resume request gets the view list and a
    snapshot of the new epoch, never a delta of the old numbering."""
    from playwright.async_api import expect

    from livecount.server.hub import Payload

    everything = inbox.views["All"]
    open_ids = [c["id"] for c in inbox.conversations if c["state"] == "open"]
    contexts: list[Any] = []
    try:
        ada, sockets = await open_watched(browser, inbox.page_url(web_server, ADA), contexts)
        await assert_counts_match(ada, web_server, inbox, ADA)
        first = sockets[0]
        assert "epoch" not in first.query and "since" not in first.query, first.url
        assert first.frames[0]["type"] == "snapshot", first.frames[:1]
        epoch = first.frames[0]["epoch"]

        # 1. the server drops the page's stream (as a drain does), and writes go on meanwhile
        assert web_server.app is not None
        hub = web_server.app.state.gateway.hub(inbox.ws)
        assert hub is not None and len(hub.streams) == 1
        dropped_at = last_applied(sockets)
        for stream in list(hub.streams):
            stream.close(Payload({"type": "reconnect", "reason": "test drop",
                                  "retry_ms": 2000}, retry=2000))
        await expect(ada.get_by_test_id("conn-status")).to_have_attribute(
            "data-state", "reconnecting", timeout=5_000)
        assert first.frames[-1]["type"] == "reconnect"
        async with web_server.client(inbox.mates[GRACE].token) as grace:
            path = f"/api/workspaces/{inbox.ws}/conversations"
            for target in open_ids[:2]:  # "All" goes down by one in the end
                await write(grace, "PATCH", f"{path}/{target}", {"state": "closed"})
            position = await write(grace, "POST", path, {"tags": ["vip"]})
        expected = await counts_after(web_server, inbox, ADA, position)
        assert len(sockets) == 1, "the page came back before the writes: retry_ms too short"

        await expect_live(ada)
        await eventually_true(lambda: len(sockets) >= 2 and bool(sockets[1].counted))
        resumed = sockets[1]
        assert resumed.query.get("epoch") == dropped_at[0] == epoch, resumed.url
        assert resumed.query.get("since") == str(dropped_at[1]), resumed.url
        assert "token" in resumed.query
        answer = resumed.counted[0]
        assert resumed.frames[0] is answer, f"a resume within the epoch: {resumed.frames[:2]}"
        assert answer["type"] == "delta" and answer["epoch"] == epoch, answer
        assert answer["seq"] > dropped_at[1]
        # the one delta carries what the page missed, at its current value: applied to what
        # the page held, it gives the server's counts
        held = Model()
        for frame in first.frames[:-1]:
            held.apply(frame)
        assert held.counts != expected and str(everything) in answer["counts"], answer
        held.apply(answer)
        assert held.errors == [] and held.counts == expected, (held.counts, expected)
        await assert_counts_match(ada, web_server, inbox, ADA)
        assert await count_shown(ada, f"count-{everything}") == expected[str(everything)]

        # 2. a restart: a new process state, so a new epoch
        before_restart = len(sockets)
        restart_from = last_applied(sockets)
        await web_server.stop()
        await expect(ada.get_by_test_id("conn-status")).to_have_attribute(
            "data-state", "reconnecting", timeout=5_000)
        await web_server.start()
        await expect_live(ada, within_ms=15_000)
        await eventually_true(lambda: any(s.counted for s in sockets[before_restart:]))
        later = sockets[before_restart:]
        for sock in later:  # every attempt asked to resume from what the page held
            assert sock.query.get("epoch") == restart_from[0], sock.url
            assert sock.query.get("since") == str(restart_from[1]), sock.url
        served = next(s for s in later if s.frames)
        kinds = [f["type"] for f in served.frames]
        assert kinds[:2] == ["views", "snapshot"], kinds
        new_epoch = served.frames[1]["epoch"]
        assert new_epoch != epoch
        assert all(f["epoch"] == new_epoch for s in later for f in s.counted), [
            f for s in later for f in s.counted]
        await assert_counts_match(ada, web_server, inbox, ADA)

        # the new numbering goes on live
        async with web_server.client(inbox.mates[GRACE].token) as grace:
            position = await write(grace, "PATCH", f"/api/workspaces/{inbox.ws}/conversations/"
                                   f"{open_ids[2]}", {"state": "closed"})
        expected = await counts_after(web_server, inbox, ADA, position)
        await expect(ada.get_by_test_id(f"count-{everything}")).to_have_text(
            str(expected[str(everything)]), timeout=2_000)
        await assert_counts_match(ada, web_server, inbox, ADA)
        assert served.counted[-1]["epoch"] == new_epoch
    finally:
        for context in contexts:
            await context.close()


async def test_a_delta_of_another_epoch_is_never_applied(
        web_server: WebServer, inbox: Inbox, browser: Any) -> None:
    """A delta whose epoch is not the snapshot's (injected between the server and the page):
    the page does not show its counts; it drops the connection and starts over with a
    snapshot (a connect without epoch/since), then agrees with GET /counts again."""
    everything = inbox.views["All"]
    forged = 987_654
    urls: list[str] = []
    routes: list[Any] = []

    def route(ws: Any) -> None:  # a transparent proxy to the real server
        urls.append(ws.url)
        routes.append(ws)
        ws.connect_to_server()

    context = await browser.new_context(viewport={"width": 1360, "height": 860})
    try:
        page = await context.new_page()
        page.set_default_timeout(10_000)
        await page.route_web_socket(lambda url: "/ws?" in url, route)
        await page.goto(inbox.page_url(web_server, ADA))
        await expect_live(page)
        await assert_counts_match(page, web_server, inbox, ADA)
        # every number any badge shows from now on
        await page.evaluate("""() => {
            window.__badges = [];
            new MutationObserver(() => document.querySelectorAll('#sidebar .badge')
                .forEach((b) => window.__badges.push(b.textContent)))
              .observe(document.getElementById('sidebar'),
                       {subtree: true, childList: true, characterData: true});
        }""")
        held = await server_counts(web_server, inbox, ADA)
        assert len(routes) == 1
        routes[0].send(json.dumps({"type": "delta", "epoch": "someone-else", "seq": 10**9,
                                   "counts": {str(everything): forged}}))
        await eventually_true(lambda: len(urls) >= 2)
        query = {k: v[0] for k, v in parse_qs(urlsplit(urls[1]).query).items()}
        assert "epoch" not in query and "since" not in query, urls[1]
        await expect_live(page)
        await assert_counts_match(page, web_server, inbox, ADA)
        assert await count_shown(page, f"count-{everything}") == held[str(everything)]
        seen: list[str] = await page.evaluate("() => window.__badges")
        assert str(forged) not in seen
    finally:
        await context.close()


async def eventually_true(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the page's WebSockets")
        await asyncio.sleep(0.02)


# -- 3. the view form --------------------------------------------------------------------------


async def open_view_form(page: Any, tab: str = "json") -> None:
    """Open the new-view dialog on its JSON tab (the builder: tests/web/test_view_builder.py)."""
    from playwright.async_api import expect

    await page.get_by_test_id("new-view").click()
    await expect(page.get_by_test_id("view-dialog")).to_be_visible()
    await page.get_by_test_id(f"tab-{tab}").click()
    await expect(page.get_by_test_id(f"panel-{tab}")).to_be_visible()


async def test_a_view_created_in_the_form_appears_with_its_count(
        web_server: WebServer, inbox: Inbox, pages: Any) -> None:
    from playwright.async_api import expect

    ada = await pages(inbox.page_url(web_server, ADA))
    name = 'Refunds <b>open</b> & "co"'  # shown as text, never as markup
    filter_ = {"operator": "AND", "value": [
        {"field": "state", "operator": "=", "value": "open"},
        {"field": "tags", "operator": "contains", "value": "refund"}]}
    expected = sum(1 for c in inbox.conversations
                   if c["state"] == "open" and "refund" in c["tags"])
    assert expected > 0, "the seed should give this view something to count"

    await open_view_form(ada)
    prefilled = json.loads(await ada.get_by_test_id("view-filter").input_value())
    assert prefilled == {"operator": "AND", "value": []}  # the empty builder, as JSON
    await ada.get_by_test_id("view-name").fill(name)
    await ada.get_by_test_id("view-filter").fill(json.dumps(filter_))
    await ada.get_by_test_id("view-submit").click()
    await expect(ada.get_by_test_id("view-dialog")).to_be_hidden()

    async with web_server.client(inbox.mates[ADA].token) as client:
        listed = (await client.get(f"/api/workspaces/{inbox.ws}/views")).json()["views"]
    created = [v for v in listed if v["name"] == name]
    assert len(created) == 1 and created[0]["personal"] is False
    view_id = created[0]["id"]
    row = ada.get_by_test_id(f"view-{view_id}")
    await expect(row.locator(".nav-label")).to_have_text(name)
    await expect(ada.locator("#sidebar b")).to_have_count(0)
    await expect(ada.get_by_test_id(f"count-{view_id}")).to_have_text(str(expected))
    # the new view is selected, its list agrees with its count
    await expect(ada.get_by_test_id("list-title")).to_have_text(name)
    ids = await wait_list_settled(ada, f"count-{view_id}")
    assert sorted(ids) == sorted(c["id"] for c in inbox.conversations
                                 if c["state"] == "open" and "refund" in c["tags"])
    await assert_counts_match(ada, web_server, inbox, ADA)

    # an invalid filter: the server's message, naming the path, shown in the form
    await open_view_form(ada)
    await ada.get_by_test_id("view-name").fill("Broken")
    await ada.get_by_test_id("view-filter").fill(json.dumps({"operator": "AND", "value": [
        {"field": "state", "operator": "=", "value": "open"},
        {"field": "priority", "operator": "between", "value": 1}]}))
    await ada.get_by_test_id("view-submit").click()
    error = ada.get_by_test_id("view-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("value[1].operator")
    await expect(error).to_contain_text("between")
    await expect(ada.get_by_test_id("view-dialog")).to_be_visible()
    # not JSON at all: said in the form too, before anything is sent
    await ada.get_by_test_id("view-filter").fill('{"operator": ')
    await ada.get_by_test_id("view-submit").click()
    await expect(error).to_contain_text("filter: not valid JSON")
    await ada.get_by_role("button", name="Cancel").first.click()
    await expect(ada.get_by_test_id("view-dialog")).to_be_hidden()
    async with web_server.client(inbox.mates[ADA].token) as client:
        again = (await client.get(f"/api/workspaces/{inbox.ws}/views")).json()["views"]
    assert [v["id"] for v in again] == [v["id"] for v in listed], "no half-saved view"
    await expect(ada.locator("#sidebar .nav-label", has_text="Broken")).to_have_count(0)


# -- 4. personal views stay personal -----------------------------------------------------------


async def test_a_personal_view_never_reaches_another_teammate(
        web_server: WebServer, inbox: Inbox, pages: Any) -> None:
    from playwright.async_api import expect

    ada = await pages(inbox.page_url(web_server, ADA))
    grace = await pages(inbox.page_url(web_server, GRACE))
    # every frame Grace's stream brings, and everything her sidebar ever shows
    frames: list[str | bytes] = []

    def record(frame: str | bytes) -> None:
        frames.append(frame)

    grace.on("websocket", lambda ws: ws.on("framereceived", record))
    await grace.reload()  # the stream after this point is recorded
    await expect_live(grace)
    await grace.evaluate("""() => {
        window.__seen = new Set();
        const record = () => document.querySelectorAll('#sidebar .nav-label')
            .forEach(e => window.__seen.add(e.textContent));
        record();
        new MutationObserver(record).observe(document.getElementById('sidebar'),
            {childList: true, subtree: true, characterData: true});
    }""")

    secret = "Ada's follow-ups"
    await open_view_form(ada)
    await ada.get_by_test_id("view-name").fill(secret)
    await ada.get_by_test_id("view-filter").fill(json.dumps(
        {"field": "state", "operator": "=", "value": "open"}))
    await ada.get_by_test_id("view-personal").check()
    await ada.get_by_test_id("view-submit").click()
    await expect(ada.get_by_test_id("view-dialog")).to_be_hidden()
    async with web_server.client(inbox.mates[ADA].token) as client:
        mine = [v for v in (await client.get(f"/api/workspaces/{inbox.ws}/views")).json()["views"]
                if v["name"] == secret]
    assert len(mine) == 1 and mine[0]["personal"] is True
    personal = mine[0]["id"]
    await expect(ada.get_by_test_id(f"personal-{personal}")).to_be_visible()
    await expect(ada.get_by_test_id(f"count-{personal}")).to_have_text(
        str(sum(1 for c in inbox.conversations if c["state"] == "open")))

    # a shared view made afterwards reaches Grace: her page has seen every update since
    async with web_server.client(inbox.mates[ADA].token) as client:
        response = await client.post(f"/api/workspaces/{inbox.ws}/views", json={
            "name": "Shared afterwards",
            "filter": {"field": "channel", "operator": "=", "value": "email"}})
        assert response.status_code == 201, response.text
        shared = response.json()["id"]
    await expect(grace.get_by_test_id(f"view-{shared}")).to_be_visible()
    await expect(ada.get_by_test_id(f"view-{shared}")).to_be_visible()

    seen: list[str] = await grace.evaluate("() => [...window.__seen]")
    assert "Shared afterwards" in seen
    assert secret not in seen and PERSONAL_VIEW not in seen
    seeded = inbox.views[PERSONAL_VIEW]  # Ada's from the start
    await expect(ada.get_by_test_id(f"personal-{seeded}")).to_be_visible()
    for hidden in (personal, seeded):
        await expect(grace.get_by_test_id(f"view-{hidden}")).to_have_count(0)
    assert frames, "Grace's stream was not recorded"
    for frame in frames:
        message = json.loads(frame)
        for hidden in (personal, seeded):
            assert str(hidden) not in message.get("counts", {}), message
            assert all(v["id"] != hidden for v in message.get("views", [])), message
    await assert_counts_match(grace, web_server, inbox, GRACE)

    # and through the API, Grace cannot see it either
    async with httpx.AsyncClient(base_url=web_server.base_url, timeout=10,
                                 headers=auth(inbox.mates[GRACE].token)) as client:
        views = (await client.get(f"/api/workspaces/{inbox.ws}/views")).json()["views"]
        assert not {personal, seeded} & {v["id"] for v in views}
        for hidden in (personal, seeded):
            response = await client.get(
                f"/api/workspaces/{inbox.ws}/views/{hidden}/conversations")
            assert response.status_code == 404
    await grace.reload()
    await expect_live(grace)
    await expect(grace.get_by_test_id(f"view-{shared}")).to_be_visible()
    await expect(grace.get_by_test_id(f"view-{personal}")).to_have_count(0)


# -- sign-in -----------------------------------------------------------------------------------


async def test_without_credentials_the_page_asks_for_them(
        web_server: WebServer, inbox: Inbox, browser: Any) -> None:
    from playwright.async_api import expect

    context = await browser.new_context()
    try:
        page = await context.new_page()
        response = await page.goto(web_server.base_url + "/")
        assert response is not None and response.status == 200
        assert "default-src 'self'" in (await response.all_headers())["content-security-policy"]
        await expect(page.get_by_test_id("login-form")).to_be_visible()
        await page.get_by_test_id("login-ws").fill(str(inbox.ws))
        await page.get_by_test_id("login-token").fill("not-a-token")
        await page.get_by_test_id("login-submit").click()
        await expect(page.get_by_test_id("login-error")).to_contain_text("not accepted")
        await page.get_by_test_id("login-token").fill(inbox.mates[GRACE].token)
        await page.get_by_test_id("login-submit").click()
        await expect_live(page)
        await expect(page.get_by_test_id("me-name")).to_have_text(GRACE)
        await assert_counts_match(page, web_server, inbox, GRACE)
    finally:
        await context.close()

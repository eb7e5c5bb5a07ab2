"""The view builder in a real browser (Debian's Chromium through Playwright): building a view
by clicks with a live preview count, saving it, watching it move live in two teammates'
pages, editing it (the filter round-trips exactly), renaming, reordering and deleting it; the
operators and pickers each field offers; validation messages and the nesting limit; keyboard
use, accessible names and the layout at 1280×800 and on a narrow window.

What the page shows is checked against the seeded data and the API, never against itself.
Set ``LIVECOUNT_DOCS=docs`` to write the README's screenshots of the builder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from livecount.domain import FIELDS, FieldKind
from livecount.filters.parse import MAX_DEPTH, OPS_BY_KIND
from tests.strategies import filters

from .conftest import PERSONAL_VIEW, Inbox, WebServer
from .test_browser import expect_live

pytestmark = [pytest.mark.browser, pytest.mark.anyio]

ADA, GRACE = "Ada Lovelace", "Grace Hopper"
ME_LABEL = "Me (whoever views it)"
OPEN = {"field": "state", "operator": "=", "value": "open"}


# -- helpers -----------------------------------------------------------------------------------


def screenshot_path(name: str) -> str | None:
    folder = os.environ.get("LIVECOUNT_DOCS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(Path(folder) / name)


async def open_page(browser: Any, contexts: list[Any], server: WebServer, inbox: Inbox,
                    mate: str, width: int = 1280, height: int = 800) -> Any:
    context = await browser.new_context(viewport={"width": width, "height": height})
    contexts.append(context)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # checked at the end of each test
    await page.goto(inbox.page_url(server, mate))
    await expect_live(page)
    return page


@pytest.fixture
async def contexts(browser: Any) -> Any:
    opened: list[Any] = []
    try:
        yield opened
    finally:
        for context in opened:
            await context.close()


async def open_new_view(page: Any) -> Any:
    from playwright.async_api import expect

    await page.get_by_test_id("new-view").click()
    await expect(page.get_by_test_id("view-dialog")).to_be_visible()
    await expect(page.get_by_test_id("panel-builder")).to_be_visible()
    return page.get_by_test_id("builder")


def groups(builder: Any) -> Any:
    return builder.get_by_test_id("group")


def own(group: Any, testid: str) -> Any:
    """A control of this group itself, not of a group nested in it."""
    return group.locator(f":scope > .group-foot > [data-testid={testid}], "
                         f":scope > .group-head > [data-testid={testid}]")


async def add_condition(group: Any) -> Any:
    """Click "+ Condition" of ``group``; the new row (the group's last direct condition)."""
    await own(group, "add-cond").click()
    return group.locator(":scope > .group-body > li.cond").last


async def set_condition(cond: Any, field: str, op: str | None = None, value: str | None = None,
                        *, suggestion: str | None = None) -> None:
    """Pick a field, an operator and a value by their labels (clicks on the pickers)."""
    await cond.get_by_test_id("cond-field").select_option(label=field)
    if op is not None:
        await cond.get_by_test_id("cond-op").select_option(label=op)
    if value is not None:
        await cond.get_by_test_id("value-select").select_option(label=value)
    if suggestion is not None:
        await cond.get_by_test_id("suggestion").filter(has_text=suggestion).first.click()


async def json_tab(page: Any) -> Any:
    """The filter as the JSON tab shows it (and back to the builder)."""
    await page.get_by_test_id("tab-json").click()
    text = await page.get_by_test_id("view-filter").input_value()
    await page.get_by_test_id("tab-builder").click()
    return json.loads(text)


async def views_of(server: WebServer, inbox: Inbox, mate: str) -> list[dict[str, Any]]:
    async with server.client(inbox.mates[mate].token) as client:
        response = await client.get(f"/api/workspaces/{inbox.ws}/views")
        assert response.status_code == 200, response.text
        views: list[dict[str, Any]] = response.json()["views"]
        return views


async def sidebar_order(page: Any) -> list[int]:
    """The custom views in the order the sidebar shows them (ids)."""
    ids: list[int] = await page.evaluate(
        """() => [...document.querySelectorAll('[data-testid=section-views] .row-menu')]
                 .map(b => Number(b.dataset.testid.slice('view-menu-'.length)))""")
    return ids


async def menu_action(page: Any, view_id: int, action: str) -> None:
    from playwright.async_api import expect

    await page.get_by_test_id(f"view-menu-{view_id}").click()
    await expect(page.get_by_test_id("view-menu")).to_be_visible()
    await page.get_by_test_id(f"menu-{action}").click()


def matches(conversation: dict[str, Any], me: int) -> bool:
    """state is open AND (tags contains vip OR priority is true) AND assignee is me"""
    return (conversation["state"] == "open"
            and ("vip" in conversation["tags"] or conversation["priority"])
            and conversation["assignee_id"] == me)


# -- 1. build, preview, save, live, edit, rename, reorder, delete -----------------------------


async def test_build_a_view_by_clicks_preview_save_and_manage_it(
        web_server: WebServer, inbox: Inbox, browser: Any, contexts: list[Any]) -> None:
    from playwright.async_api import expect

    ada_id, grace_id = inbox.mates[ADA].id, inbox.mates[GRACE].id
    # two conversations that certainly match, one for each of them
    extra = []
    async with web_server.client(inbox.mates[GRACE].token) as client:
        for body in ({"tags": ["vip"], "assignee_id": ada_id},
                     {"priority": True, "assignee_id": grace_id, "tags": ["bug"]}):
            response = await client.post(f"/api/workspaces/{inbox.ws}/conversations", json=body)
            assert response.status_code == 201, response.text
            extra.append(response.json())
    conversations = inbox.conversations + extra
    expected_ada = sum(matches(c, ada_id) for c in conversations)
    expected_grace = sum(matches(c, grace_id) for c in conversations)
    assert expected_ada > 0 and expected_grace > 0

    ada = await open_page(browser, contexts, web_server, inbox, ADA)
    grace = await open_page(browser, contexts, web_server, inbox, GRACE)
    requests: list[str] = []
    ada.on("request", lambda r: requests.append(r.url) if "/views/preview" in r.url else None)

    builder = await open_new_view(ada)
    if path := screenshot_path("builder-empty.png"):
        await ada.screenshot(path=path, animations="disabled")
    await ada.get_by_test_id("view-name").fill("VIP or priority, mine")
    root = groups(builder).first
    # state is open
    await set_condition(await add_condition(root), "State", "is", "open")
    # (tags contains vip OR priority is true)
    await own(root, "add-group").click()
    nested = groups(builder).nth(1)
    await own(nested, "group-op").select_option(label="any of")
    await set_condition(nested.get_by_test_id("cond").first, "Tags", "includes",
                        suggestion="vip")
    await set_condition(await add_condition(nested), "Priority", "is", "Yes")
    # assignee is me
    await set_condition(await add_condition(root), "Assignee", "is", ME_LABEL)

    built = {"operator": "AND", "value": [
        OPEN,
        {"operator": "OR", "value": [
            {"field": "tags", "operator": "contains", "value": "vip"},
            {"field": "priority", "operator": "=", "value": True}]},
        {"field": "assignee_id", "operator": "=", "value": "$me"}]}
    await expect(ada.get_by_test_id("preview-count")).to_have_text(str(expected_ada))
    assert await json_tab(ada) == built
    assert requests, "the preview asked the server"
    if path := screenshot_path("builder-nested.png"):
        await ada.screenshot(path=path, animations="disabled")

    await ada.get_by_test_id("view-submit").click()
    await expect(ada.get_by_test_id("view-dialog")).to_be_hidden()
    [saved] = [v for v in await views_of(web_server, inbox, ADA)
               if v["name"] == "VIP or priority, mine"]
    view_id = saved["id"]
    assert saved["filter"] == built and saved["group_by"] is None and not saved["personal"]
    # the sidebar count is the preview's, and Grace's page shows the view with her count
    await expect(ada.get_by_test_id(f"count-{view_id}")).to_have_text(str(expected_ada))
    await expect(ada.get_by_test_id("list-title")).to_have_text("VIP or priority, mine")
    await expect(grace.get_by_test_id(f"count-{view_id}")).to_have_text(str(expected_grace))

    # a change through the API moves it live in both pages
    async with web_server.client(inbox.mates[GRACE].token) as client:
        response = await client.patch(
            f"/api/workspaces/{inbox.ws}/conversations/{extra[0]['id']}",
            json={"assignee_id": grace_id})
        assert response.status_code == 200, response.text
    await expect(ada.get_by_test_id(f"count-{view_id}")).to_have_text(str(expected_ada - 1))
    await expect(grace.get_by_test_id(f"count-{view_id}")).to_have_text(str(expected_grace + 1))
    expected_ada -= 1
    expected_grace += 1

    # edit: the saved filter loads into the builder exactly
    await menu_action(ada, view_id, "edit")
    await expect(ada.get_by_test_id("view-dialog-title")).to_contain_text("Edit view")
    await expect(builder.get_by_test_id("cond")).to_have_count(4)
    await expect(ada.get_by_test_id("view-name")).to_have_value("VIP or priority, mine")
    assert await json_tab(ada) == built
    await expect(ada.get_by_test_id("view-personal")).to_be_disabled()
    await expect(ada.get_by_test_id("preview-count")).to_have_text(str(expected_ada))
    # drop "priority is true": open, vip and mine
    await builder.get_by_test_id("cond").nth(2).get_by_test_id("remove-cond").click()
    edited = {"operator": "AND", "value": [
        OPEN, {"operator": "OR", "value": [
            {"field": "tags", "operator": "contains", "value": "vip"}]},
        {"field": "assignee_id", "operator": "=", "value": "$me"}]}
    assert await json_tab(ada) == edited
    now = [*inbox.conversations, {**extra[0], "assignee_id": grace_id}, extra[1]]
    vip_ada = sum(c["state"] == "open" and "vip" in c["tags"] and c["assignee_id"] == ada_id
                  for c in now)
    vip_grace = sum(c["state"] == "open" and "vip" in c["tags"] and c["assignee_id"] == grace_id
                    for c in now)
    await expect(ada.get_by_test_id("preview-count")).to_have_text(str(vip_ada))
    await ada.get_by_test_id("view-submit").click()
    await expect(ada.get_by_test_id("view-dialog")).to_be_hidden()
    [saved] = [v for v in await views_of(web_server, inbox, ADA) if v["id"] == view_id]
    assert saved["filter"] == edited
    await expect(ada.get_by_test_id(f"count-{view_id}")).to_have_text(str(vip_ada))
    await expect(grace.get_by_test_id(f"count-{view_id}")).to_have_text(str(vip_grace))

    # rename (Enter saves), seen by Grace too
    await menu_action(ada, view_id, "rename")
    await expect(ada.get_by_test_id("rename-dialog")).to_be_visible()
    await ada.get_by_test_id("rename-name").fill("Mine: VIP")
    await ada.get_by_test_id("rename-name").press("Enter")
    await expect(ada.get_by_test_id("rename-dialog")).to_be_hidden()
    for page in (ada, grace):
        await expect(page.get_by_test_id(f"view-{view_id}").locator(".nav-label")).to_have_text(
            "Mine: VIP")

    # reorder: up once by keyboard, once by clicks; persisted, and Grace's page follows
    vip, by_channel, mine = (inbox.views[n] for n in ("VIP waiting", "Priority by channel",
                                                      PERSONAL_VIEW))
    assert await sidebar_order(ada) == [vip, by_channel, mine, view_id]
    await ada.get_by_test_id(f"view-menu-{view_id}").focus()
    await ada.keyboard.press("Enter")
    await expect(ada.get_by_test_id("menu-edit")).to_be_focused()
    await ada.keyboard.press("ArrowDown")
    await ada.keyboard.press("ArrowDown")
    await expect(ada.get_by_test_id("menu-up")).to_be_focused()
    await ada.keyboard.press("Enter")
    await expect(ada.get_by_test_id("view-menu")).to_be_hidden()
    await expect(ada.get_by_test_id(f"view-menu-{view_id}")).to_be_focused()
    await wait_order(ada, [vip, by_channel, view_id, mine])
    await menu_action(ada, view_id, "up")
    await wait_order(ada, [vip, view_id, by_channel, mine])
    await wait_order(grace, [vip, view_id, by_channel])
    listed = await views_of(web_server, inbox, ADA)
    assert [v["id"] for v in listed if v["id"] in (vip, view_id, by_channel, mine)] == [
        vip, view_id, by_channel, mine]
    await ada.reload()
    await expect_live(ada)
    await wait_order(ada, [vip, view_id, by_channel, mine])

    # delete: Escape keeps it, confirming removes it everywhere
    await menu_action(ada, view_id, "delete")
    dialog = ada.get_by_test_id("delete-dialog")
    await expect(dialog).to_be_visible()
    await expect(ada.get_by_test_id("delete-title")).to_contain_text("Mine: VIP")
    await expect(ada.get_by_test_id("delete-cancel")).to_be_focused()
    await ada.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    assert any(v["id"] == view_id for v in await views_of(web_server, inbox, ADA))
    await menu_action(ada, view_id, "delete")
    await ada.get_by_test_id("delete-confirm").click()
    await expect(dialog).to_be_hidden()
    for page in (ada, grace):
        await expect(page.get_by_test_id(f"view-{view_id}")).to_have_count(0)
    assert all(v["id"] != view_id for v in await views_of(web_server, inbox, ADA))
    assert ada.errors == [] and grace.errors == []


async def wait_order(page: Any, wanted: list[int], within: float = 5.0) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + within
    while (order := await sidebar_order(page)) != wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"sidebar order {order}, wanted {wanted}")
        await asyncio.sleep(0.05)


# -- 2. operators and pickers --------------------------------------------------------------


async def test_each_field_offers_exactly_the_operators_the_language_allows(
        web_server: WebServer, inbox: Inbox, browser: Any, contexts: list[Any]) -> None:
    from playwright.async_api import expect

    ada = await open_page(browser, contexts, web_server, inbox, ADA)
    builder = await open_new_view(ada)
    root = groups(builder).first
    cond = await add_condition(root)
    field_select = cond.get_by_test_id("cond-field")
    offered = await field_select.evaluate(
        "s => [...s.options].map(o => o.value).filter(v => v)")
    assert offered == [*FIELDS, "custom"]
    wanted = {name: list(OPS_BY_KIND[field.kind]) for name, field in FIELDS.items()}
    wanted["custom"] = list(OPS_BY_KIND[FieldKind.CUSTOM])
    for name, ops in wanted.items():
        await field_select.select_option(name)
        shown = await cond.get_by_test_id("cond-op").evaluate(
            "s => [...s.options].map(o => o.value)")
        assert shown == ops, name
    await expect(cond.get_by_test_id("cond-key")).to_be_visible()  # custom.<key>: a free key
    table = await ada.evaluate("() => window.LivecountBuilder.OPS_BY_KIND")
    assert table == {kind.value: list(ops) for kind, ops in OPS_BY_KIND.items()}

    async def choices(testid: str = "value-select") -> list[str]:
        labels: list[str] = await cond.get_by_test_id(testid).evaluate(
            "s => [...s.options].filter(o => o.value !== '').map(o => o.textContent)")
        return labels

    people = sorted(inbox.mates)
    named = [f"{n} (you)" if n == ADA else n for n in people]
    # teammate fields: names, and "me" only with =, IN, contains (never negated)
    await set_condition(cond, "Assignee", "is")
    assert await choices() == [ME_LABEL, *named]
    for op in ("is not", "is less than", "is at least"):
        await cond.get_by_test_id("cond-op").select_option(label=op)
        assert await choices() == named, op
    await cond.get_by_test_id("cond-op").select_option(label="is any of")
    assert await choices("value-add") == [ME_LABEL, *named]
    await cond.get_by_test_id("value-add").select_option(label="Grace Hopper")
    await cond.get_by_test_id("value-add").select_option(label=ME_LABEL)
    await expect(cond.get_by_test_id("value-chip")).to_have_text(["Grace Hopper×", f"{ME_LABEL}×"])
    await cond.get_by_test_id("cond-op").select_option(label="is none of")  # $me leaves
    await expect(cond.get_by_test_id("value-chip")).to_have_text(["Grace Hopper×"])
    assert await choices("value-add") == [n for n in named if n != GRACE]
    await set_condition(cond, "Mentions", "includes")
    assert await choices() == [ME_LABEL, *named]
    await cond.get_by_test_id("cond-op").select_option(label="does not include")
    assert await choices() == named
    await set_condition(cond, "Team", "is")
    assert await choices() == sorted(inbox.teams)
    await set_condition(cond, "State", "is")
    assert await choices() == ["open", "snoozed", "closed"]
    await set_condition(cond, "Priority", "is")
    assert await choices() == ["Yes", "No"]
    # under NOT there is no "me"
    await set_condition(cond, "Assignee", "is")
    await own(root, "group-op").select_option(label="not all of")
    assert await choices() == named
    # durations: a number and a unit
    await set_condition(cond, "Waiting since", "is more than … ago")
    await cond.get_by_test_id("value-span").fill("2")
    await cond.get_by_test_id("value-unit").select_option(label="days")
    await own(root, "group-op").select_option(label="all of")
    assert await json_tab(ada) == {"field": "waiting_since", "operator": "older_than",
                                   "value": 2 * 86400}
    # custom attributes: a free key, a typed value
    await cond.get_by_test_id("cond-field").select_option("custom")
    await cond.get_by_test_id("cond-key").fill("seats")
    await cond.get_by_test_id("cond-op").select_option(label="is at least")
    await cond.get_by_test_id("value-type").select_option(label="number")
    await cond.get_by_test_id("value-number").fill("10")
    assert await json_tab(ada) == {"field": "custom.seats", "operator": ">=", "value": 10}
    await expect(ada.get_by_test_id("preview-count")).to_be_visible()
    assert ada.errors == []


# -- 3. the builder and the JSON tab round-trip exactly -----------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = OPEN
    for i in range(depth - 1):
        node = {"operator": "OR" if i % 2 else "AND", "value": [node]}
    return node


TRICKY: list[tuple[dict[str, Any], str | None]] = [
    (OPEN, None),
    ({"operator": "AND", "value": [OPEN]}, None),
    ({"operator": "NOT", "value": {"field": "priority", "operator": "=", "value": True}}, None),
    ({"operator": "NOT", "value": [{"field": "priority", "operator": "=", "value": True}]},
     "channel"),
    ({"operator": "NOT", "value": {"operator": "NOT", "value": [{"operator": "OR", "value": [
        OPEN, {"field": "tags", "operator": "is null"}]}]}}, None),
    ({"field": "assignee_id", "operator": "IN", "value": [3, "$me", 99]}, "team_id"),
    ({"field": "waiting_since", "operator": "older_than", "value": 3600.000001}, None),
    ({"field": "created_at", "operator": "<", "value": "2024-03-10T12:00:00.5+02:00"}, None),
    ({"field": "updated_at", "operator": ">=", "value": "2024-03-10T12:00:00Z"}, None),
    ({"field": "custom.seats", "operator": ">=", "value": 1e20}, "custom.plan"),
    ({"field": "custom.plan", "operator": "IN", "value": ["pro", 5, True, 2.5]}, "tags"),
    ({"field": "channel", "operator": "~", "value": "Straße"}, None),
    (_nested(MAX_DEPTH), "assignee_id"),
]


def _random_filters(n: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(filters(max_depth=5))
    def collect(filter_: dict[str, Any]) -> None:
        found.append(filter_)

    collect()
    return found[:n]


async def test_any_filter_goes_through_the_builder_unchanged(
        web_server: WebServer, inbox: Inbox, browser: Any, contexts: list[Any]) -> None:
    """JSON tab → builder → JSON tab, for hand-picked awkward filters and random ones from
    the shared strategies (every field and operator, nested AND/OR/NOT, $me): equal."""
    from playwright.async_api import expect

    ada = await open_page(browser, contexts, web_server, inbox, ADA)
    await open_new_view(ada)
    textarea = ada.get_by_test_id("view-filter")
    samples = [f for f, _ in TRICKY] + _random_filters(40)
    for filter_ in samples:
        await ada.get_by_test_id("tab-json").click()
        await textarea.fill(json.dumps(filter_))
        await ada.get_by_test_id("tab-builder").click()
        await expect(ada.get_by_test_id("builder-stale")).to_be_hidden()
        assert await ada.get_by_test_id("builder").get_by_test_id("cond").count() > 0
        await ada.get_by_test_id("tab-json").click()
        assert json.loads(await textarea.input_value()) == filter_, filter_
    # what the builder cannot show stays in the JSON tab, said so, and is still previewed
    await textarea.fill(json.dumps({"field": "subject", "operator": "=", "value": "x"}))
    await ada.get_by_test_id("tab-builder").click()
    await expect(ada.get_by_test_id("builder-stale")).to_contain_text("cannot show")
    await expect(ada.get_by_test_id("preview-error")).to_contain_text("'subject' is not a field")
    assert ada.errors == []


async def test_editing_a_saved_view_without_changes_keeps_it_exactly(
        web_server: WebServer, inbox: Inbox, browser: Any, contexts: list[Any]) -> None:
    from playwright.async_api import expect

    created: dict[int, tuple[dict[str, Any], str | None]] = {}
    async with web_server.client(inbox.mates[ADA].token) as client:
        for i, (filter_, group_by) in enumerate(TRICKY):
            response = await client.post(f"/api/workspaces/{inbox.ws}/views", json={
                "name": f"Tricky {i}", "filter": filter_, "group_by": group_by})
            assert response.status_code == 201, response.text
            created[response.json()["id"]] = (filter_, group_by)
    ada = await open_page(browser, contexts, web_server, inbox, ADA)
    for view_id in created:
        await menu_action(ada, view_id, "edit")
        await expect(ada.get_by_test_id("view-dialog")).to_be_visible()
        await expect(ada.get_by_test_id("builder-stale")).to_be_hidden()
        await ada.get_by_test_id("view-submit").click()
        await expect(ada.get_by_test_id("view-dialog")).to_be_hidden()
    listed = {v["id"]: v for v in await views_of(web_server, inbox, ADA)}
    for view_id, (filter_, group_by) in created.items():
        assert listed[view_id]["filter"] == filter_
        assert listed[view_id]["group_by"] == group_by
        assert listed[view_id]["version"] == 2  # it was saved, unchanged
    assert ada.errors == []


# -- 4. validation messages, the nesting limit, debouncing ------------------------------------


async def test_validation_messages_limits_and_debounce(
        web_server: WebServer, inbox: Inbox, browser: Any, contexts: list[Any]) -> None:
    from playwright.async_api import expect

    ada = await open_page(browser, contexts, web_server, inbox, ADA)
    previews: list[str] = []
    ada.on("request", lambda r: previews.append(r.post_data or "")
           if r.url.endswith("/views/preview") else None)
    builder = await open_new_view(ada)
    root = groups(builder).first
    preview = ada.get_by_test_id("preview")
    await expect(ada.get_by_test_id("preview-error")).to_have_text("Add a condition to start.")
    assert previews == [], "nothing to count: nothing asked"

    # an unfinished row: said locally, not sent
    cond = await add_condition(root)
    await expect(ada.get_by_test_id("preview-error")).to_have_text("Condition 1: choose a field.")
    await ada.get_by_test_id("view-name").fill("Checked")
    await ada.get_by_test_id("view-submit").click()
    await expect(ada.get_by_test_id("view-error")).to_have_text("Condition 1: choose a field.")
    await expect(cond.get_by_test_id("cond-field")).to_be_focused()
    assert previews == []

    # debounced: typing a tag letter by letter asks once or twice, not per key
    await set_condition(cond, "Tags", "includes")
    text = cond.get_by_test_id("value-text")
    await text.click()
    await ada.keyboard.type("refund", delay=40)
    refunds = sum(1 for c in inbox.conversations if "refund" in c["tags"])
    await expect(ada.get_by_test_id("preview-count")).to_have_text(str(refunds))
    assert 1 <= len(previews) <= 2, previews

    # a server-side refusal: $me under NOT, with the row it names
    second = await add_condition(root)
    await set_condition(second, "Assignee", "is", ME_LABEL)
    await expect(ada.get_by_test_id("preview-count")).to_be_visible()
    await own(root, "group-op").select_option(label="none of")
    await expect(preview).to_have_attribute("data-state", "invalid")
    await expect(ada.get_by_test_id("preview-error")).to_contain_text(
        "filter.value.value[1].value: $me is not allowed under NOT")
    await expect(second).to_have_attribute("aria-invalid", "true")
    if path := screenshot_path("builder-invalid.png"):
        await ada.screenshot(path=path, animations="disabled")
    await ada.get_by_test_id("view-submit").click()
    await expect(ada.get_by_test_id("view-error")).to_contain_text("$me is not allowed under NOT")
    await own(root, "group-op").select_option(label="all of")
    await expect(preview).to_have_attribute("data-state", "ok")
    await expect(second).not_to_have_attribute("aria-invalid", "true")

    # an empty group, then nesting to the language's limit and no further
    await own(root, "add-group").click()
    await expect(ada.get_by_test_id("preview-error")).to_have_text(
        "Condition 3.1: choose a field.")
    group = groups(builder).nth(1)
    await group.get_by_test_id("remove-cond").click()
    await expect(ada.get_by_test_id("preview-error")).to_have_text(
        "Group 3 is empty: add a condition or remove the group.")
    await own(group, "remove-group").click()
    await expect(groups(builder)).to_have_count(1)
    await expect(preview).to_have_attribute("data-state", "ok")
    deepest = root
    made = 0
    while await own(deepest, "add-group").is_enabled():
        await own(deepest, "add-group").click()
        made += 1
        deepest = groups(builder).nth(made)
        await set_condition(deepest.get_by_test_id("cond").first, "State", "is", "open")
    assert made == MAX_DEPTH - 2  # the root, 6 nested groups, conditions at level 8
    filter_ = await json_tab(ada)
    assert depth(filter_) == MAX_DEPTH
    await expect(deepest.locator(":scope > .group-foot")).to_contain_text("Nesting limit")
    # negating the deepest group would pass the limit: not offered
    disabled = await own(deepest, "group-op").evaluate(
        "s => [...s.options].filter(o => o.disabled).map(o => o.textContent)")
    assert disabled == ["not all of", "none of"]
    await expect(preview).to_have_attribute("data-state", "ok")
    assert ada.errors == []


def depth(node: Any) -> int:
    if isinstance(node, dict) and node.get("operator") in ("AND", "OR", "NOT"):
        children = node["value"] if isinstance(node["value"], list) else [node["value"]]
        return 1 + max((depth(c) for c in children), default=0)
    return 1


# -- 5. keyboard, accessible names, layouts -------------------------------------------------


ACCESSIBLE_NAMES = """(root) => [...root.querySelectorAll('button, select, input, textarea')]
    .filter((el) => el.offsetParent !== null || el.type === 'radio')
    .filter((el) => {
        const label = el.getAttribute('aria-label')
            || [...(el.labels || [])].map((l) => l.textContent.trim()).join(' ')
            || (el.getAttribute('aria-labelledby') || '').split(' ')
                .map((id) => document.getElementById(id)?.textContent || '').join(' ').trim()
            || (el.tagName === 'BUTTON' ? el.textContent.trim() : '');
        return !label;
    }).map((el) => el.outerHTML.slice(0, 120))"""


async def test_keyboard_names_and_layouts(web_server: WebServer, inbox: Inbox, browser: Any,
                                          contexts: list[Any]) -> None:
    from playwright.async_api import expect

    for width, height in ((1280, 800), (390, 800)):
        ada = await open_page(browser, contexts, web_server, inbox, ADA, width, height)
        builder = await open_new_view(ada)
        dialog = ada.get_by_test_id("view-dialog")
        # focus order: name, the tab, the builder's controls, group by, visibility, buttons
        await expect(ada.get_by_test_id("view-name")).to_be_focused()
        order = []
        for _ in range(8):
            await ada.keyboard.press("Tab")
            order.append(await ada.evaluate("() => document.activeElement.dataset.testid"))
        assert order == ["tab-builder", "group-op", "add-cond", "add-group", "view-group-by",
                         "view-shared", None, "view-submit"], order  # None: Cancel
        # tabs: arrow keys
        await ada.get_by_test_id("tab-builder").focus()
        await ada.keyboard.press("ArrowRight")
        await expect(ada.get_by_test_id("tab-json")).to_be_focused()
        await expect(ada.get_by_test_id("panel-json")).to_be_visible()
        await ada.keyboard.press("ArrowLeft")
        await expect(ada.get_by_test_id("panel-builder")).to_be_visible()
        # Escape closes, nothing saved
        await ada.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        await expect(ada.get_by_test_id("new-view")).to_be_focused()
        # build something nested; every control has a name; it all fits the window
        builder = await open_new_view(ada)
        root = groups(builder).first
        await set_condition(await add_condition(root), "State", "is", "open")
        await own(root, "add-group").click()
        nested = groups(builder).nth(1)
        await set_condition(nested.get_by_test_id("cond").first, "Tags", "includes",
                            suggestion="vip")
        await set_condition(await add_condition(nested), "Team", "is any of")
        await nested.get_by_test_id("value-add").select_option(label="Billing")
        await set_condition(await add_condition(root), "Waiting since", "is more than … ago")
        unnamed = await ada.evaluate(ACCESSIBLE_NAMES, await dialog.element_handle())
        assert unnamed == [], unnamed
        fits = await ada.evaluate("""() => {
            const d = document.getElementById('view-dialog').getBoundingClientRect();
            const s = document.querySelector('#view-dialog .dialog-scroll');
            const submit = document.querySelector('[data-testid=view-submit]')
                .getBoundingClientRect();
            return {inside: d.left >= 0 && d.top >= 0 && d.right <= innerWidth + 0.5
                            && d.bottom <= innerHeight + 0.5,
                    noScrollX: s.scrollWidth <= s.clientWidth + 1,
                    submit: submit.bottom <= innerHeight && submit.right <= innerWidth}; }""")
        assert fits == {"inside": True, "noScrollX": True, "submit": True}, (width, fits)
        await expect(ada.get_by_test_id("preview-count")).to_be_visible()
        await expect(ada.get_by_test_id("preview-count")).to_be_in_viewport()
        # Enter in the name saves
        await ada.get_by_test_id("view-name").fill(f"Keyboard {width}")
        await ada.get_by_test_id("view-name").press("Enter")
        await expect(dialog).to_be_hidden()
        views = await views_of(web_server, inbox, ADA)
        assert any(v["name"] == f"Keyboard {width}" for v in views)
        # the page itself does not overflow sideways, and the row menus have names
        overflow = await ada.evaluate(
            "() => document.documentElement.scrollWidth <= innerWidth + 1")
        assert overflow, width
        unnamed = await ada.evaluate(ACCESSIBLE_NAMES, await ada.locator("#app").element_handle())
        assert unnamed == [], unnamed
        assert ada.errors == []


async def test_the_preview_is_rate_limited_politely(
        web_server: WebServer, inbox: Inbox, browser: Any, contexts: list[Any]) -> None:
    """Past the budget the page says so and counts again once Retry-After has passed."""
    from playwright.async_api import expect

    from livecount.server.preview import RateLimiter

    assert web_server.app is not None
    web_server.app.state.preview_limiter = RateLimiter(rate=0.5, burst=1)
    ada = await open_page(browser, contexts, web_server, inbox, ADA)
    builder = await open_new_view(ada)
    root = groups(builder).first
    cond = await add_condition(root)
    await set_condition(cond, "State", "is", "open")
    opened = sum(1 for c in inbox.conversations if c["state"] == "open")
    await expect(ada.get_by_test_id("preview-count")).to_have_text(str(opened))
    await cond.get_by_test_id("value-select").select_option(label="closed")
    await expect(ada.get_by_test_id("preview")).to_have_attribute("data-state", "limited")
    await expect(ada.get_by_test_id("preview-error")).to_contain_text("too many previews")
    closed = sum(1 for c in inbox.conversations if c["state"] == "closed")
    await expect(ada.get_by_test_id("preview-count")).to_have_text(str(closed), timeout=6_000)
    assert ada.errors == []

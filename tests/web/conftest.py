"""Fixtures of the browser tests: a restartable server on a fixed port, Chromium, and an inbox
seeded with realistic data.

The server runs as a ``uvicorn.Server`` task in the test's event loop (no thread), like
``tests/server/support.live_server``, but keeps its port across a stop and a start so a page
can reconnect to "the same server after a restart" on the same SQLite file. Chromium is
Debian's (``/usr/bin/chromium``), driven by Playwright; no browser is ever downloaded.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from livecount.server import create_app
from livecount.server.gateway import uvicorn_options
from livecount.service import Settings

__all__: list[str] = []

ADMIN_TOKEN = "lc_admin_web-test-token"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def web_settings(tmp_path: Path) -> Settings:
    """A SQLite file in ``tmp_path``; the stream's default flush interval, a quick relay."""
    return Settings(store_url=f"sqlite:///{tmp_path}/livecount.db", admin_token=ADMIN_TOKEN,
                    relay_poll_interval=0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class WebServer:
    """A livecount server on a fixed port that a test can stop and start again."""

    settings: Settings
    port: int = field(default_factory=_free_port)
    app: Starlette | None = None
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None
    internal_errors: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        assert self._task is None, "already running"
        self.app = create_app(self.settings)  # serves the page at / too
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="on",
                                log_level="warning", log_config=None,
                                timeout_graceful_shutdown=5,
                                **uvicorn_options(self.settings))
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(), name=f"uvicorn-web-test-{self.port}")
        self._server, self._task = server, task
        while not server.started:
            if task.done():
                self._server = self._task = None
                task.result()  # raises what stopped the start-up
                raise RuntimeError("the server stopped during start-up")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop serving (connections closed, lifespan shut down); the store file stays."""
        if self._server is None or self._task is None:
            return
        server, task = self._server, self._task
        server.should_exit = True
        try:
            await task
        finally:
            self._server = self._task = None
            assert self.app is not None
            self.internal_errors += int(getattr(self.app.state, "internal_errors", 0))

    def client(self, token: str = ADMIN_TOKEN) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=auth(token), timeout=10)


@pytest.fixture
async def web_server(tmp_path: Path) -> AsyncIterator[WebServer]:
    server = WebServer(web_settings(tmp_path))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert server.internal_errors == 0, "a request reached the 500 handler"


# -- the browser -------------------------------------------------------------------------------


def _chromium_missing() -> str | None:
    if not os.path.exists(CHROMIUM) or shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, headless; skipped without it, except in CI (``CI=true``) where the
    browser tests must run."""
    missing = _chromium_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI=true, so the browser tests must run", pytrace=False)
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    playwright = await async_playwright().start()
    try:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()
    finally:
        await playwright.stop()


# -- a realistic inbox -------------------------------------------------------------------------


@dataclass
class Mate:
    id: int
    name: str
    token: str


@dataclass
class Inbox:
    """A seeded workspace: people, teams, conversations as created, and the shared views."""

    ws: int
    mates: dict[str, Mate]
    teams: dict[str, int]
    conversations: list[dict[str, Any]]
    views: dict[str, int]  # view name -> id (Ada sees them all)

    def page_url(self, server: WebServer, mate: str) -> str:
        return f"{server.base_url}/?ws={self.ws}&token={self.mates[mate].token}"


PEOPLE = ("Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson")
TEAMS = {"Billing": (0, 1), "Support": (1, 2, 3), "Sales": (0, 3)}
TAGS = ("vip", "refund", "bug", "onboarding", "churn-risk", "invoice")
CHANNELS = ("chat", "email", "phone")
PERSONAL_VIEW = "Still mine"  # Ada's


async def seed_inbox(server: WebServer, conversations: int = 36, seed: int = 7) -> Inbox:
    """A workspace "Acme Support" with four teammates, three teams, ``conversations``
    conversations of every state, two shared custom views and a personal one of Ada's."""
    rng = random.Random(seed)
    async with server.client() as admin:
        response = await admin.post("/api/workspaces", json={"name": "Acme Support"})
        assert response.status_code == 201, response.text
        ws = response.json()["id"]
        mates: dict[str, Mate] = {}
        for name in PEOPLE:
            email = name.lower().replace(" ", ".") + "@acme.example"
            response = await admin.post(f"/api/workspaces/{ws}/teammates",
                                        json={"name": name, "email": email})
            assert response.status_code == 201, response.text
            body = response.json()
            mates[name] = Mate(body["id"], name, body["token"])
        ids = [m.id for m in mates.values()]
        teams: dict[str, int] = {}
        for name, members in TEAMS.items():
            response = await admin.post(f"/api/workspaces/{ws}/teams", json={
                "name": name, "member_ids": [ids[i] for i in members]})
            assert response.status_code == 201, response.text
            teams[name] = response.json()["id"]
    created: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    async with server.client() as client:
        for i in range(conversations):
            author = mates[PEOPLE[i % len(PEOPLE)]]
            body: dict[str, Any] = {
                "state": rng.choices(("open", "snoozed", "closed"), (7, 1, 2))[0],
                "assignee_id": rng.choice([None, None, *ids]),
                "team_id": rng.choice([None, *teams.values()]),
                "priority": rng.random() < 0.25,
                "channel": rng.choice(CHANNELS),
                "tags": rng.sample(TAGS, rng.choice((0, 1, 1, 2))),
                "mentions": rng.sample(ids, rng.choice((0, 0, 1))),
                "waiting_since": (now - timedelta(minutes=rng.randint(1, 600))).isoformat(),
                "custom": {"plan": rng.choice(("free", "pro", "enterprise"))},
            }
            if body["state"] == "snoozed":
                body["snoozed_until"] = (now + timedelta(hours=rng.randint(1, 48))).isoformat()
            response = await client.post(f"/api/workspaces/{ws}/conversations", json=body,
                                         headers=auth(author.token))
            assert response.status_code == 201, response.text
            created.append(response.json())
    views: dict[str, int] = {}
    async with server.client(mates[PEOPLE[0]].token) as client:
        for name, filter_, group_by in (
            ("VIP waiting", {"operator": "AND", "value": [
                {"field": "state", "operator": "=", "value": "open"},
                {"field": "tags", "operator": "contains", "value": "vip"}]}, None),
            ("Priority by channel", {"operator": "AND", "value": [
                {"field": "state", "operator": "=", "value": "open"},
                {"field": "priority", "operator": "=", "value": True}]}, "channel"),
            (PERSONAL_VIEW, {"operator": "AND", "value": [
                {"field": "state", "operator": "!=", "value": "closed"},
                {"field": "assignee_id", "operator": "=", "value": "$me"}]}, None),
        ):
            response = await client.post(f"/api/workspaces/{ws}/views", json={
                "name": name, "filter": filter_, "group_by": group_by,
                "personal": name == PERSONAL_VIEW})
            assert response.status_code == 201, response.text
            views[name] = response.json()["id"]
        response = await client.get(f"/api/workspaces/{ws}/views")
        assert response.status_code == 200, response.text
        for view in response.json()["views"]:
            views.setdefault(view["name"], view["id"])
    return Inbox(ws=ws, mates=mates, teams=teams, conversations=created, views=views)


@pytest.fixture
async def inbox(web_server: WebServer) -> Inbox:
    return await seed_inbox(web_server)

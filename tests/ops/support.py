"""Shared pieces of the operations tests: the repository root, tools that must exist in CI,
scraping /metrics, and processes started from the tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def missing(tool: str, why: str) -> NoReturn:
    """Skip locally; in CI (``CI=true``) the tool must be installed, so fail instead."""
    message = f"{tool} is not installed ({why})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so .ci/run must have installed it", pytrace=False)
    pytest.skip(message)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool", "Debian: apt-get install prometheus")
    return path


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def process(args: list[str], log: IO[bytes], env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process started from the repository root (so ``tests.*`` imports), stopped
    with SIGTERM if it is still running at the end (its process group SIGKILLed if that
    takes over 15 s), and reaped."""
    proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:  # SIGTERM first: a supervisor cleans up its spool directory
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # the workers of a supervisor are in its process group: none may outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path,
                     within: float = 30.0, path: str = "/readyz") -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=base, timeout=2, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(path)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within {within} s:\n{tail(log)}")
            await asyncio.sleep(0.05)


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


PYTHON = sys.executable


class ResumingClient:
    """A WebSocket client that behaves like the inbox page: applies every message to a
    :class:`~tests.server.stream_support.Model`, and when its connection ends (a
    ``reconnect`` message, a killed worker, a refused handshake) comes back after the delay
    it was told (or 0.2 s), resuming with ``?epoch=E&since=S``. Runs as one task; ``stop()``
    ends it."""

    def __init__(self, ws_url: str, workspace_id: int, token: str, name: str = "") -> None:
        from tests.server.stream_support import Model

        self.url = f"{ws_url}/api/workspaces/{workspace_id}/ws?token={token}"
        self.name = name
        self.model = Model()
        self.connections = 0
        self.reconnects: list[dict[str, Any]] = []  # reconnect messages received
        self.close_codes: list[int | None] = []
        self.resumes = 0  # connections that named an epoch and seq
        self.follow = True  # come back after the connection ends
        self.local_port = 0  # of the current (or last) connection
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResumingClient:
        self._task = asyncio.create_task(self._run(), name=f"resuming-client-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self.follow = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def done(self) -> bool:
        return self._task is None or self._task.done()

    async def _run(self) -> None:
        import json

        import websockets
        from websockets.asyncio.client import connect

        while True:
            url = self.url
            if self.model.epoch:
                url += f"&epoch={self.model.epoch}&since={self.model.seq}"
                self.resumes += 1
            delay = 0.2
            try:
                async with connect(url, proxy=None, compression=None, max_size=None,
                                   open_timeout=5, close_timeout=2) as conn:
                    self.connections += 1
                    self.local_port = conn.local_address[1]
                    try:
                        async for raw in conn:
                            message = json.loads(raw)
                            self.model.apply(message)
                            if message.get("type") == "reconnect":
                                self.reconnects.append(message)
                                delay = message["retry_ms"] / 1000
                    finally:
                        self.close_codes.append(conn.close_code)
            except (OSError, TimeoutError, websockets.WebSocketException):
                pass
            if not self.follow:
                return
            await asyncio.sleep(delay)

    async def wait_for(self, check: Any, within: float = 15.0, what: str = "") -> None:
        deadline = time.monotonic() + within
        while True:
            result = check(self.model)
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out waiting for {what}; holds "
                                     f"{self.model.counts} at {self.model.epoch}:"
                                     f"{self.model.seq}, errors {self.model.errors}")
            await asyncio.sleep(0.05)


async def sql_counts(store_url: str, workspace_id: int, teammate: int) -> dict[str, Any]:
    """Every view the teammate sees, recounted by SQL from the file (not any server's state)."""
    from livecount.domain import now_us
    from livecount.store import open_store
    from livecount.views import render_counts, visible_views

    store = open_store(store_url)
    await store.open()
    try:
        views = await store.list_views(workspace_id)
        recount = await store.recount(workspace_id, views, now_us())
    finally:
        await store.close()
    rendered: dict[str, Any] = render_counts(visible_views(views, teammate), recount.counts,
                                             teammate)
    return rendered


async def exact(client: ResumingClient, store_url: str, workspace_id: int, teammate: int,
                within: float = 20.0) -> None:
    """Wait until the client's counts equal a SQL recount of the store (both may move)."""
    deadline = time.monotonic() + within
    while True:
        expected = await sql_counts(store_url, workspace_id, teammate)
        if client.model.counts == expected:
            assert client.model.errors == [], client.model.errors
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{client.name} holds {client.model.counts}, SQL says "
                                 f"{expected} (errors {client.model.errors})")
        await asyncio.sleep(0.1)


def worker_serving(pids: set[int], port: int, client_port: int) -> int | None:
    """Which of the worker ``pids`` holds the connection from local port ``client_port``."""
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == port and conn.raddr \
                        and conn.raddr.port == client_port:
                    return pid
    return None


def open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def worker_pids(supervisor: int) -> set[int]:
    """The worker processes of a supervisor (its spawned children, not the resource
    tracker)."""
    import psutil

    pids = set()
    for child in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):
            if any("spawn_main" in part for part in child.cmdline()):
                pids.add(child.pid)
    return pids


async def metric(base: str, name: str, **labels: str) -> float | None:
    async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as client:
        text = (await client.get("/metrics")).text
    return samples(text).get((name, tuple(sorted(labels.items()))))


__all__: list[Any] = []

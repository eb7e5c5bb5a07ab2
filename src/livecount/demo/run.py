"""The body of ``livecount demo``: seed, serve, simulate, show a status line, stop cleanly.

One event loop runs everything: the uvicorn server (with the real app), the simulator task
and the status refresh. The demo owns SIGINT/SIGTERM itself (uvicorn's own signal capture is
switched off), so Ctrl-C stops the simulator first, then the server gracefully (its lifespan
stops the service), and the temporary directory goes last, after every file in it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import uvicorn
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from ..exceptions import LivecountError
from ..server.app import Server, create_app, server_options
from ..server.logs import install_redaction
from ..service import Service, Settings
from ..store import open_store
from .seed import DemoWorkspace, seed_workspace
from .simulator import Simulator

__all__ = ["DemoOptions", "StatusBoard", "run_demo"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds between status refreshes on a terminal; elsewhere (a pipe, a log file) a plain
#: status line is printed every ``_LOG_EVERY`` seconds instead.
_REFRESH = 0.5
_LOG_EVERY = 10.0
_GRACEFUL_SHUTDOWN = 5  # seconds uvicorn waits for requests in flight after the drain


@dataclass(frozen=True)
class DemoOptions:
    """The command's arguments; ``store`` None means a SQLite file in a temporary directory."""

    store: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    rate: float = 5.0
    conversations: int = 2000
    seed: int = 1
    duration: float | None = None
    keep: bool = False


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo to the end (Ctrl-C or ``duration``); the process exit status."""
    console = console or Console(highlight=False)
    if options.rate <= 0 or options.conversations < 0:
        console.print("livecount demo: --rate must be positive and --conversations >= 0")
        return 2
    directory: str | None = None
    url = options.store
    if url is None:
        directory = tempfile.mkdtemp(prefix="livecount-demo-")
        url = "sqlite:///" + os.path.join(directory, "livecount.db")
    try:
        return asyncio.run(_demo(options, url, directory, console))
    finally:
        if directory is not None:
            if options.keep:
                console.print(f"Kept the database: {escape(url)}", soft_wrap=True)
            else:
                shutil.rmtree(directory, ignore_errors=True)
                console.print(f"Removed {escape(directory)}", soft_wrap=True)
        stray = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if stray:
            log.warning("threads still running at exit: %s", ", ".join(stray))


class _Server(Server):
    """The app's server (which drains streams before uvicorn's shutdown waits for them) minus
    uvicorn's signal capture: the demo handles SIGINT/SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front: errors surface here, and port 0 is known at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _until(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when ``stop`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopped):
            if not pending.done():
                pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
        if not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> Iterator[None]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _demo(options: DemoOptions, url: str, directory: str | None,
                console: Console) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server: _Server | None = None

    def on_signal() -> None:
        if stop.is_set() and server is not None:
            server.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        stop.set()

    with _signals(loop, on_signal):
        where = "temporary, removed at exit" if directory and not options.keep else "kept"
        console.print(f"[bold]livecount demo[/bold] · store {escape(url)} ({where})",
                      soft_wrap=True)
        try:
            sock = _listen(options.host, options.port)
        except OSError as exc:
            console.print(f"livecount demo: cannot listen on {options.host}:{options.port}: "
                          f"{exc.strerror or exc}")
            return 1
        try:
            demo = await _until(stop, _seed(url, options, console))
            if demo is None:
                return 0
            admin_token = "lc_admin_" + secrets.token_urlsafe(24)
            settings = Settings(store_url=url, admin_token=admin_token)
            app = create_app(settings)
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
                                    **server_options(settings))
            install_redaction()  # the login URLs carry ?token=: keep them out of the logs
            server = _Server(config, app, tune_gc=True)
            gateway = getattr(app.state, "gateway", None)
            return await _serve(server, sock, app.state.service, gateway, demo, admin_token,
                                options, stop, console)
        except LivecountError as exc:
            console.print(f"livecount demo: {escape(exc.message)}")
            return 1
        finally:
            sock.close()


async def _seed(url: str, options: DemoOptions, console: Console) -> DemoWorkspace:
    store = open_store(url)
    await store.open()
    try:
        started = time.perf_counter()
        console.print(f"Seeding {options.conversations:,} conversations…")
        demo = await seed_workspace(store, conversations=options.conversations,
                                    seed=options.seed)
        console.print(f"Seeded workspace {demo.id} “{escape(demo.workspace.name)}”: "
                      f"{len(demo.teams)} teams, {len(demo.logins)} teammates, "
                      f"{len(demo.conversation_ids):,} conversations, {len(demo.views)} custom "
                      f"views in {time.perf_counter() - started:.1f} s", soft_wrap=True)
        return demo
    finally:
        await store.close()


async def _serve(server: _Server, sock: socket.socket, service: Service, gateway: Any,
                 demo: DemoWorkspace, admin_token: str, options: DemoOptions,
                 stop: asyncio.Event, console: Console) -> int:
    """Run the server and the simulator until ``stop`` (or ``duration``); stop both."""

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits when the lifespan startup fails
            raise LivecountError(f"the server failed to start (exit status {exc.code})") from None

    serving = asyncio.create_task(serve(), name="livecount-demo-server")
    simulator: Simulator | None = None
    try:
        # uvicorn offers a flag, not an event, for "started"
        while not server.started and not serving.done() and not stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if serving.done():
            serving.result()  # raises why it ended
            return 1
        if stop.is_set():
            return 0
        _print_logins(console, sock, demo, admin_token, options)
        simulator = Simulator(service.store, demo, rate=options.rate, seed=options.seed)
        simulator.start()
        board = StatusBoard(service, simulator, gateway)
        await _watch(board, simulator, serving, stop, options.duration, console)
        if serving.done():
            serving.result()
            console.print("livecount demo: the server stopped unexpectedly")
            return 1
        task = simulator.task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            console.print(f"livecount demo: the simulator failed: {task.exception()!r}")
            return 1
        console.print(board.line(await board.sample()), soft_wrap=True)
        return 0
    finally:
        if simulator is not None:
            await simulator.stop()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        if server.force_exit and server.started:
            # A second Ctrl-C made uvicorn skip the app's shutdown too: run it here, so the
            # service still stops (relay, store) instead of being cancelled at loop close.
            await server.lifespan.shutdown()


def _print_logins(console: Console, sock: socket.socket, demo: DemoWorkspace,
                  admin_token: str, options: DemoOptions) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    console.print(f"\nServing on {base} (port {port})\n", soft_wrap=True)
    console.print("Open the inbox as a teammate:")
    width = max(len(f"{login.teammate.name} ({login.team.name})") for login in demo.logins)
    for login in demo.logins:
        who = f"{login.teammate.name} ({login.team.name})"
        console.print(f"  {escape(who):<{width}}  {base}/?ws={demo.id}&token={login.token}",
                      soft_wrap=True)
    console.print(f"\nAdmin token: {admin_token}", soft_wrap=True)
    console.print(f"  curl -H 'Authorization: Bearer {admin_token}' "
                  f"{base}/api/workspaces/{demo.id}/counts", soft_wrap=True)
    until = (f"for {options.duration:g} s" if options.duration is not None
             else "until you press Ctrl-C")
    console.print(f"\nSimulating a team at work: {options.rate:g} changes/s, {until}.\n",
                  soft_wrap=True)


async def _watch(board: StatusBoard, simulator: Simulator, serving: asyncio.Task[None],
                 stop: asyncio.Event, duration: float | None, console: Console) -> None:
    """Refresh the status until stop, the deadline, or the server or simulator ending."""
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    live = Live(console=console, auto_refresh=False, transient=True) if console.is_terminal \
        else None
    last_logged = loop.time()

    def finished() -> bool:
        task = simulator.task
        return (stop.is_set() or serving.done() or task is None or task.done()
                or (deadline is not None and loop.time() >= deadline))

    with live if live is not None else contextlib.nullcontext():
        while not finished():
            wait = _REFRESH if deadline is None else min(_REFRESH, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait)):
                    await stop.wait()
            if live is not None:
                line = Text(board.line(await board.sample()), no_wrap=True, overflow="ellipsis")
                live.update(line, refresh=True)
            elif loop.time() - last_logged >= _LOG_EVERY:
                last_logged = loop.time()
                console.print(board.line(await board.sample()), soft_wrap=True)


@dataclass(frozen=True)
class Status:
    uptime: float
    changes: int
    rate: float
    applied: int
    lag: int | None
    connections: int | None
    rss: int


class StatusBoard:
    """Samples what the status line shows; the change rate is over the last few seconds."""

    WINDOW = 5.0

    def __init__(self, service: Service, simulator: Simulator, gateway: Any = None) -> None:
        self.service = service
        self.simulator = simulator
        self.gateway = gateway
        self.started = time.monotonic()
        self._process = psutil.Process()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    async def sample(self) -> Status:
        now = time.monotonic()
        changes = self.simulator.changes
        self._samples.append((now, changes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
            self._samples.popleft()
        first_at, first = self._samples[0]
        rate = (changes - first) / (now - first_at) if now > first_at else 0.0
        relay = self.service.relay
        assert relay is not None  # the demo runs the embedded shape: it counts
        try:
            lag: int | None = await relay.lag()
        except LivecountError:  # the store is closing
            lag = None
        return Status(now - self.started, changes, rate, relay.entries_applied,
                      lag, self._connections(), self._process.memory_info().rss)

    def _connections(self) -> int | None:
        connections = getattr(self.gateway, "connections", None)
        if connections is None:
            return None
        if isinstance(connections, int):
            return connections
        try:
            return len(connections)
        except TypeError:
            return None

    @staticmethod
    def line(status: Status) -> str:
        minutes, seconds = divmod(int(status.uptime), 60)
        hours, minutes = divmod(minutes, 60)
        parts = [
            f"up {hours:d}:{minutes:02d}:{seconds:02d}",
            f"{status.changes:,} changes ({status.rate:.1f}/s)",
            f"relay {status.applied:,}",
            f"lag {'?' if status.lag is None else status.lag}",
            f"streams {'-' if status.connections is None else status.connections}",
            f"RSS {status.rss / (1 << 20):.0f} MiB",
        ]
        return " · ".join(parts)

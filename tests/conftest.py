"""Shared fixtures, hypothesis profiles and the leak guard every test runs under.

The leak guard exists because of the outage DESIGN.md §1 describes: a counter that started
threads per request and never stopped them. Every test fails (as an error at teardown) if it
leaves behind, compared with just before it started and after a grace period for things that
are still winding down:

- a thread (``threading.enumerate()``);
- an asyncio task still pending on the test's event loop (async tests under anyio);
- a socket (TCP, UDP or UNIX: a database, Redis or HTTP connection, a listener, the
  self-pipe of an event loop nobody closed);
- an open SQLite file (``*.db``, ``*.db-wal``, ``*.sqlite*``, ...).

Resources owned by module- or session-scoped fixtures exist before the per-test snapshot, so
they are not blamed on the test; the session-end check catches those instead. Mark a test
``@pytest.mark.allow_leaks`` to exempt it; only the guard's own tests should need to. Set
``LIVECOUNT_LEAK_GRACE`` (seconds) to change the grace period.

This file must stay self-contained (tests/test_leak_guard.py copies it into throw-away test
directories), so it imports nothing from the tests package.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import psutil
import pytest
from hypothesis import settings

__all__: list[str] = []

# -- hypothesis profiles -----------------------------------------------------------------------

settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci",
    # Hypothesis's built-in "ci" profile: no example database, no too_slow health check.
    settings.get_profile("ci"),
    max_examples=200,
    deadline=None,
    print_blob=True,
    derandomize=False,
)
settings.register_profile("slow", max_examples=2000, deadline=None)


def _hypothesis_profile(config: pytest.Config) -> str:
    if config.getoption("--slow"):
        return "slow"
    if profile := os.environ.get("HYPOTHESIS_PROFILE"):
        return profile
    if os.environ.get("CI") == "true":
        return "ci"
    return "dev"


# -- configuration -----------------------------------------------------------------------------

_MARKERS = {
    "allow_leaks": "exempt a test from the leak guard (only for testing the guard itself)",
    "slow": "long-running; run with --slow",
    "postgres": "needs the PostgreSQL server",
    "redis": "needs the Redis server",
    "browser": "drives Debian's chromium through Playwright",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="run tests marked slow, and use the 'slow' hypothesis profile",
    )


def pytest_configure(config: pytest.Config) -> None:
    registered = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, text in _MARKERS.items():
        if name not in registered:
            config.addinivalue_line("markers", f"{name}: {text}")
    # An explicit --hypothesis-profile (hypothesis's own option) wins.
    if not config.getoption("--hypothesis-profile", default=None):
        settings.load_profile(_hypothesis_profile(config))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"leak guard: on, {_grace_seconds()} s grace (LIVECOUNT_LEAK_GRACE)"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


# -- leak guard: what is open ------------------------------------------------------------------

_DB_FILE = re.compile(r"\.(?:db|sqlite\w*)(?:-wal|-shm|-journal)?$")
_KNOWN_PORTS = {5432: "PostgreSQL", 6379: "Redis"}

_SocketKey = tuple[int, int, int, Any, Any]  # fd, family, type, laddr, raddr


def _grace_seconds() -> float:
    return float(os.environ.get("LIVECOUNT_LEAK_GRACE", "1.5"))


def _open_sockets(proc: psutil.Process) -> dict[_SocketKey, Any]:
    connections = getattr(proc, "net_connections", None) or proc.connections
    return {(c.fd, c.family, c.type, c.laddr, c.raddr): c for c in connections(kind="all")}


def _open_db_files(proc: psutil.Process) -> dict[tuple[int, str], Any]:
    return {(f.fd, f.path): f for f in proc.open_files() if _DB_FILE.search(f.path)}


@dataclass(frozen=True)
class _Resources:
    """A snapshot of the process's threads, sockets and database files."""

    threads: frozenset[threading.Thread]
    sockets: dict[_SocketKey, Any]
    db_files: dict[tuple[int, str], Any]

    @classmethod
    def take(cls) -> _Resources:
        proc = psutil.Process()
        return cls(frozenset(threading.enumerate()), _open_sockets(proc), _open_db_files(proc))

    def new_since(self, before: _Resources) -> _Resources:
        return _Resources(
            frozenset(t for t in self.threads if t not in before.threads and t.is_alive()),
            {k: v for k, v in self.sockets.items() if k not in before.sockets},
            {k: v for k, v in self.db_files.items() if k not in before.db_files},
        )

    def __bool__(self) -> bool:
        return bool(self.threads or self.sockets or self.db_files)

    def describe(self) -> list[str]:
        lines = [_describe_thread(t) for t in sorted(self.threads, key=lambda t: t.name)]
        loops = _unclosed_loops_by_fd() if self.sockets else {}
        loop_fds: dict[int, list[int]] = {}  # id(loop) -> its leaked self-pipe fds
        for conn in sorted(self.sockets.values(), key=lambda c: c.fd):
            if conn.fd in loops:
                loop_fds.setdefault(id(loops[conn.fd]), []).append(conn.fd)
            else:
                lines.append(_describe_socket(conn))
        for fds in loop_fds.values():
            fd_list = ", ".join(map(str, sorted(fds)))
            lines.append(f"unclosed event loop {loops[fds[0]]!r} (self-pipe fds {fd_list})")
        files = sorted(self.db_files.values(), key=lambda f: f.fd)
        lines += [f"open database file {f.path} (fd {f.fd})" for f in files]
        return lines


def _wait_for_leaks(before: _Resources) -> _Resources:
    """What is still new since ``before``, polling for up to the grace period."""
    deadline = time.monotonic() + _grace_seconds()
    while True:
        leaked = _Resources.take().new_since(before)
        if not leaked or time.monotonic() >= deadline:
            return leaked
        time.sleep(0.02)


def _describe_thread(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)
    where = f", target {getattr(target, '__qualname__', repr(target))}" if target else ""
    return f"thread {thread.name!r} (daemon={thread.daemon}, ident={thread.ident}{where})"


def _describe_socket(conn: Any) -> str:
    if conn.family == socket.AF_UNIX:
        name = conn.laddr or conn.raddr or "unnamed"
        return f"unix socket {name} (fd {conn.fd})"
    proto = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
    local = f"{conn.laddr.ip}:{conn.laddr.port}" if conn.laddr else "?"
    if not conn.raddr:
        state = "listening" if conn.status == psutil.CONN_LISTEN else "unconnected"
        return f"{proto} socket {state} on {local} (fd {conn.fd})"
    service = _KNOWN_PORTS.get(conn.raddr.port)
    what = f"{service} connection" if service else f"{proto} connection"
    return f"{what} {local} -> {conn.raddr.ip}:{conn.raddr.port} {conn.status} (fd {conn.fd})"


def _unclosed_loops_by_fd() -> dict[int, asyncio.AbstractEventLoop]:
    """Map self-pipe fds to the unclosed selector event loops owning them (failure path only)."""
    loops: dict[int, asyncio.AbstractEventLoop] = {}
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.BaseEventLoop) and not obj.is_closed():
            for attr in ("_ssock", "_csock"):
                sock = getattr(obj, attr, None)
                if sock is not None and sock.fileno() >= 0:
                    loops[sock.fileno()] = obj
    return loops


def _format_leaks(header: str, lines: Iterable[str]) -> str:
    return "\n".join([header, *(f"  - {line}" for line in lines)])


# -- leak guard: fixtures ----------------------------------------------------------------------


@dataclass
class _TestLeaks:
    tasks: list[str] = field(default_factory=list)


_test_leaks = pytest.StashKey[_TestLeaks]()


def _is_asyncio(anyio_backend: Any) -> bool:
    return (anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]) == "asyncio"


@pytest.fixture(autouse=True)
def _leak_guard(request: pytest.FixtureRequest) -> None:
    """Fail the test if it leaves threads, tasks, sockets or database files behind.

    Not a yield fixture on purpose: the check is registered as a finalizer of the test item
    *before* the asyncio task guard is set up, and item finalizers run last-in first-out, so
    it runs after that guard has finished and after anyio has closed the test's event loop
    (and joined the loop's executor threads).
    """
    if request.node.get_closest_marker("allow_leaks") is not None:
        return
    leaks = _TestLeaks()
    request.node.stash[_test_leaks] = leaks
    before = _Resources.take()

    def check() -> None:
        leaked = _wait_for_leaks(before)
        lines = [*leaks.tasks, *leaked.describe()]
        if lines:
            grace = _grace_seconds()
            header = f"leak guard: the test left {len(lines)} resource(s) behind ({grace} s grace):"
            pytest.fail(_format_leaks(header, lines), pytrace=False)

    request.node.addfinalizer(check)
    # Hypothesis tests are checked per example instead (see pytest_pyfunc_call below).
    if "anyio_backend" in request.fixturenames and not _is_hypothesis_test(request.node):
        request.getfixturevalue("_asyncio_task_guard")


def _is_hypothesis_test(item: Any) -> bool:
    return hasattr(getattr(item, "obj", None), "hypothesis")


def _runner_plumbing(task: asyncio.Task[Any]) -> bool:
    """The task anyio's test runner wraps each fixture/test step in (not the test's)."""
    coro = task.get_coro()
    return getattr(coro, "__qualname__", "").endswith("TestRunner._call_in_runner_task")


async def _reap_leaked_tasks(before: set[asyncio.Task[Any]], leaks: _TestLeaks) -> None:
    """Record, then cancel, tasks created since ``before`` that are still pending."""
    me = asyncio.current_task()
    deadline = time.monotonic() + _grace_seconds()
    while True:
        leaked = [
            t
            for t in asyncio.all_tasks()
            if t not in before and t is not me and not _runner_plumbing(t)
        ]
        if not leaked or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    if leaked:
        leaks.tasks += [f"asyncio task {t!r}" for t in leaked]
        for task in leaked:
            task.cancel()
        await asyncio.wait(leaked, timeout=_grace_seconds())


@pytest.fixture
async def _asyncio_task_guard(
    anyio_backend: Any, request: pytest.FixtureRequest
) -> AsyncIterator[None]:
    """Reap tasks still pending on the test's loop once the test and its fixtures are done.

    Requested by ``_leak_guard`` before the test's own fixtures, so it holds anyio's runner
    (one event loop) open across them and tears down after all of them, in that loop.
    """
    if not _is_asyncio(anyio_backend):
        yield
        return
    before = asyncio.all_tasks()
    yield
    await _reap_leaked_tasks(before, request.node.stash[_test_leaks])


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """Check each example of an async hypothesis test for tasks it leaves pending.

    Such tests cannot use ``_asyncio_task_guard``: while any async fixture holds anyio's
    runner open, a hypothesis ``StopTest`` (a BaseException, raised when an example runs out
    of data) kills the runner's task and every later example fails with
    ``ClosedResourceError``. Without one, anyio runs each example on a fresh loop; this
    wraps the example so the check runs on that loop before it closes.
    """
    hypothesis = getattr(pyfuncitem.obj, "hypothesis", None)
    leaks = pyfuncitem.stash.get(_test_leaks, None)
    backend = pyfuncitem.funcargs.get("anyio_backend")
    if hypothesis is None or leaks is None or backend is None or not _is_asyncio(backend):
        return (yield)
    inner = hypothesis.inner_test
    original = getattr(inner, "_anyio_original_func", inner)  # anyio's wrapper, if any
    original = getattr(original, "_leak_guard_original", original)  # ours, from a rerun
    if not inspect.iscoroutinefunction(original):
        return (yield)

    async def checked(*args: Any, **kwargs: Any) -> None:
        before = asyncio.all_tasks()
        await original(*args, **kwargs)
        if not leaks.tasks:  # one report per test; later examples would only repeat it
            await _reap_leaked_tasks(before, leaks)

    checked._leak_guard_original = original  # type: ignore[attr-defined]
    hypothesis.inner_test = checked
    try:
        return (yield)
    finally:
        hypothesis.inner_test = inner


# -- leak guard: whole session -----------------------------------------------------------------

_session_start = pytest.StashKey[_Resources]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_session_start] = _Resources.take()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if threads, sockets or database files outlive every fixture."""
    before = session.stash.get(_session_start, None)
    if before is None:
        return
    leaked = _wait_for_leaks(before)
    if not leaked:
        return
    lines = leaked.describe()
    header = (
        f"leak guard: {len(lines)} resource(s) left behind at the end of the session "
        f"(threads: {threading.active_count()} now, {len(before.threads)} at the start):"
    )
    message = _format_leaks(header, lines)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.line("")
        reporter.write_sep("=", "leak guard", red=True)
        reporter.write_line(message, red=True)
    else:  # pragma: no cover - running without the terminal reporter
        print(message)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- shared fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path}/livecount.db"


POSTGRES_URL = os.environ.get(
    "LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("LIVECOUNT_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = 9


def _unreachable(service: str, url: str, error: str) -> NoReturn:
    """Skip locally; in CI (``CI=true``) the service must be there, so fail instead."""
    where = urlsplit(url).netloc.rpartition("@")[2]
    message = f"{service} not reachable at {where} ({error})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so the tests that need it must run", pytrace=False)
    pytest.skip(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@pytest.fixture(scope="session")
def _postgres_error() -> str | None:
    """Probe the server once per session; the error text, or None when it answers."""
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return _first_line(exc)
    return None


def _drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET lock_timeout = '3s'")
        try:
            conn.execute(drop)
        except psycopg.errors.LockNotAvailable:
            # A connection the test leaked still holds locks in the schema: end it (the leak
            # guard reports the leak) so the schema can go and the run does not hang.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (schema,),
            )
            conn.execute(drop)


@pytest.fixture
def postgres_url(_postgres_error: str | None) -> Iterator[str]:
    """A PostgreSQL URL whose connections work in a fresh schema, dropped afterwards.

    ``postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dlc_<hex>&
    application_name=lc_<hex>``: libpq (psycopg) and SQLAlchemy's ``postgresql+psycopg://``
    pass both query parameters through, so every connection's search_path is the schema.
    """
    import psycopg
    from psycopg import sql

    if _postgres_error is not None:
        _unreachable("PostgreSQL", POSTGRES_URL, _postgres_error)
    schema = f"lc_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}&application_name={schema}"
    finally:
        _drop_schema(schema)


@pytest.fixture(scope="session")
def _redis_error() -> str | None:
    """Probe the server once per session; the error text, or None when it answers."""
    import redis

    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3) as client:
            client.ping()
    except redis.RedisError as exc:
        return _first_line(exc)
    return None


def _flush_redis_test_db() -> None:
    import redis

    url = f"{REDIS_URL}/{REDIS_TEST_DB}"
    with redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10) as client:
        client.flushdb()


@pytest.fixture
def redis_url(_redis_error: str | None) -> Iterator[str]:
    """``redis://127.0.0.1:6379/9``: db 9 is the tests' own, flushed before and after."""
    if _redis_error is not None:
        _unreachable("Redis", REDIS_URL, _redis_error)
    _flush_redis_test_db()
    try:
        yield f"{REDIS_URL}/{REDIS_TEST_DB}"
    finally:
        _flush_redis_test_db()

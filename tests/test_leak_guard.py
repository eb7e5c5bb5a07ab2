"""The test harness in tests/conftest.py does what the rest of the suite relies on.

Mostly the leak guard: the tests here write small test files, run them in child pytest
processes under a copy of the project's conftest (so the leaks they provoke die with those
processes and cannot touch this one) and check that each leaking test fails with a message
naming its leak, and that clean tests pass. Then the shared fixtures and profiles.

A child spends seconds starting up (importing hypothesis and the plugins) and little running
its tests, so inner tests that need the same environment share one child run, started by
whichever check needs it first; each check then reads its own inner test's outcome and report
from that run's output.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py").read_text()

# Prepended to every inner test file: leaked threads wait on RELEASE, which a module-scoped
# fixture sets once the per-test checks (which run before module teardown) have seen them, so
# the child process can exit; KEEP holds leaked objects so nothing garbage-collects them before
# those checks, and the same fixture closes them then, so that the end-of-session check of a
# run sharing many leaking tests has nothing left to report either.
PRELUDE = """\
import asyncio
import socket
import sqlite3
import threading
import time

import pytest

RELEASE = threading.Event()
KEEP = []


@pytest.fixture(scope="module", autouse=True)
def _release_leaked_threads():
    yield
    RELEASE.set()
    for leaked in KEEP:  # sockets, connections, loops, engines; tasks (done by now) have neither
        close = getattr(leaked, "close", None) or getattr(leaked, "dispose", None)
        if close is not None:
            close()


"""

GUARD_FAILED = "leak guard: the test left {n} resource(s) behind*"

Env = Mapping[str, str | None]  # None: unset it
RunKey = tuple[str, tuple[str, ...], tuple[tuple[str, str | None], ...]]


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    # Failing tests wait out the grace period; a short one keeps these runs quick.
    monkeypatch.setenv("LIVECOUNT_LEAK_GRACE", "0.5")
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    return pytester


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=PRELUDE + textwrap.dedent(source))
    # --assert=plain: a child would otherwise rewrite the asserts of every module of the
    # hypothesis and schemathesis plugins, about 2 s a run where bytecode is not cached
    # (PYTHONDONTWRITEBYTECODE); no check here reads a rewritten assert's message.
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--assert=plain", *args, timeout=180
    )


@dataclass(frozen=True)
class Child:
    """A finished child run, the directory it ran in, and what it said about each inner test."""

    result: pytest.RunResult
    path: Path

    def outcomes(self, test: str) -> list[str]:
        """What the ``-rA`` summary lists for ``test``: ["PASSED", "ERROR"] after a teardown error.

        It lists skipped tests by location, not by name: [] for them, so check the reason too.
        """
        listed = re.compile(rf"(PASSED|FAILED|ERROR|XFAIL|XPASS) test_inner\.py::{test}(?: |$)")
        return [m[1] for line in self.result.outlines if (m := listed.match(line))]

    def guard_failed(self, test: str, leaks: int, *lines: str) -> None:
        """``test`` passed, then the guard failed its teardown, its own report naming
        ``leaks`` resources and matching ``lines`` (in order, not necessarily adjacent)."""
        assert self.outcomes(test) == ["PASSED", "ERROR"]
        self.error(test).fnmatch_lines([GUARD_FAILED.format(n=leaks), *lines])

    def error(self, test: str, when: str = "teardown") -> pytest.LineMatcher:
        """The lines under ``test``'s own "ERROR at <when> of" header, up to the next header.

        So a check on them cannot be satisfied by another inner test's report.
        """
        header = re.compile(rf"_+ ERROR at {when} of {test} _+")
        lines = self.result.outlines
        starts = [i for i, line in enumerate(lines) if header.fullmatch(line)]
        assert len(starts) == 1, f"{len(starts)} 'ERROR at {when} of {test}' reports, not 1"
        report: list[str] = []
        for line in lines[starts[0] + 1 :]:
            if re.match(r"_{3,} .* _{3,}$|={3,}", line):
                break
            report.append(line)
        return pytest.LineMatcher(report)


@pytest.fixture(scope="module")
def child_runs() -> dict[RunKey, Child]:
    """This module's child runs, by everything they ran with: each starts once, then is shared."""
    return {}


def shared_run(
    runs: dict[RunKey, Child],
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    *args: str,
    env: Env,
) -> Child:
    """``run`` with ``env`` on top of ``inner``'s, or the result of that same run if it was done.

    The key holds all the child gets beyond ``inner``'s fixed setup, so only identical runs are
    shared; the first check to need one runs it in its own pytester directory, which stays.
    """
    key = (source, args, tuple(sorted(env.items())))
    if key not in runs:
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        runs[key] = Child(run(inner, source, *args), inner.path)
    return runs[key]


# -- leaks fail the test -----------------------------------------------------------------------

# One run for all of these: each inner test leaks something of its own, and the guard compares
# with a snapshot taken just before each test, so what earlier tests left (threads waiting on
# RELEASE, objects in KEEP) is no later test's leak; each report must list exactly one test's.
LEAKING_TESTS = """
from pathlib import Path

import psycopg
import redis
import sqlalchemy
from hypothesis import given, settings, strategies as st


def test_leaks_a_thread():
    threading.Thread(target=RELEASE.wait, args=(60,), name="leaky-worker").start()


def test_leaks_a_daemon_thread():
    threading.Thread(target=RELEASE.wait, name="leaky-daemon", daemon=True).start()


@pytest.fixture
async def background():
    KEEP.append(asyncio.create_task(asyncio.Event().wait(), name="fixture-task"))
    yield  # never cancels it


@pytest.mark.anyio
async def test_leaks_a_task():
    KEEP.append(asyncio.create_task(asyncio.sleep(60), name="leaky-task"))


@pytest.mark.anyio
async def test_fixture_leaks_a_task(background):
    pass


def test_leaks_a_connection(tmp_path):
    KEEP.append(sqlite3.connect(tmp_path / "leaky.db"))


def test_leaks_an_engine_pool(sqlite_url):
    engine = sqlalchemy.create_engine(sqlite_url)  # never disposed
    KEEP.append(engine)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))


def test_leaks_a_listener_and_a_connection():
    server = socket.create_server(("127.0.0.1", 0))
    KEEP.append(server)
    KEEP.append(socket.create_connection(server.getsockname()))


def test_leaks_a_loop():
    KEEP.append(asyncio.new_event_loop())


def test_leaks_a_connection_inside_a_transaction(postgres_url):
    Path("url.txt").write_text(postgres_url)
    conn = psycopg.connect(postgres_url)
    KEEP.append(conn)
    conn.execute("CREATE TABLE t (x int)")  # uncommitted: holds locks in the schema


def test_leaks_a_client(redis_url):
    client = redis.Redis.from_url(redis_url)  # never closed
    KEEP.append(client)
    client.ping()


@pytest.mark.anyio
@settings(max_examples=50)
@given(st.integers())
async def test_leaks_a_task_per_example(x):
    KEEP.append(asyncio.create_task(asyncio.sleep(60), name="example-task"))
"""


@pytest.fixture
def leaky(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, child_runs: dict[RunKey, Child]
) -> Child:
    """The run of LEAKING_TESTS (0.5 s grace), shared by the checks below."""
    return shared_run(child_runs, inner, monkeypatch, LEAKING_TESTS, "-rA", env={})


def test_leaked_thread_fails_the_test(leaky: Child) -> None:
    leaky.guard_failed(
        "test_leaks_a_thread", 1, "*thread 'leaky-worker' (daemon=False*target Event.wait)"
    )
    # Released at module teardown (and all KEEP holds closed), so the session-end check has
    # nothing to add.
    leaky.result.stdout.no_fnmatch_line("*end of the session*")
    assert leaky.result.ret == pytest.ExitCode.TESTS_FAILED


def test_daemon_thread_counts_as_a_leak_too(leaky: Child) -> None:
    leaky.guard_failed("test_leaks_a_daemon_thread", 1, "*thread 'leaky-daemon' (daemon=True*")


def test_leaked_asyncio_tasks_fail_the_test(leaky: Child) -> None:
    leaky.guard_failed(
        "test_leaks_a_task", 1, "*asyncio task <Task * name='leaky-task' coro=<sleep()*"
    )
    leaky.guard_failed(
        "test_fixture_leaks_a_task",
        1,
        "*asyncio task <Task * name='fixture-task' coro=<Event.wait()*",
    )


def test_leaked_sqlite_connections_fail_the_test(leaky: Child) -> None:
    leaky.guard_failed("test_leaks_a_connection", 1, "*open database file */leaky.db (fd *)")
    leaky.guard_failed("test_leaks_an_engine_pool", 1, "*open database file */livecount.db (fd *)")


def test_leaked_sockets_fail_the_test(leaky: Child) -> None:
    leaky.guard_failed(
        "test_leaks_a_listener_and_a_connection",
        2,
        "*tcp socket listening on 127.0.0.1:* (fd *)",
        "*tcp connection 127.0.0.1:* -> 127.0.0.1:* ESTABLISHED (fd *)",
    )


def test_unclosed_event_loop_fails_the_test(leaky: Child) -> None:
    leaky.guard_failed(
        "test_leaks_a_loop",
        1,
        "*unclosed event loop <_UnixSelectorEventLoop * closed=False *> (self-pipe fds *)",
    )


def test_leaked_postgres_connection_fails_the_test_and_the_schema_still_goes(
    postgres_url: str, leaky: Child
) -> None:
    import psycopg

    # The outer postgres_url only gates this test on the server (skip locally, fail in CI).
    test = "test_leaks_a_connection_inside_a_transaction"
    leaky.guard_failed(test, 1, "*PostgreSQL connection 127.0.0.1:* -> 127.0.0.1:5432 *")
    schema = (leaky.path / "url.txt").read_text().rpartition("application_name=")[2]
    assert schema.startswith("lc_")
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))
        assert row.fetchone() == (0,)


def test_leaked_redis_connection_fails_the_test(redis_url: str, leaky: Child) -> None:
    # The outer redis_url only gates this test on the server (skip locally, fail in CI).
    leaky.guard_failed(
        "test_leaks_a_client", 1, "*Redis connection 127.0.0.1:* -> 127.0.0.1:6379 *"
    )


def test_async_hypothesis_test_leaking_tasks_fails_once(leaky: Child) -> None:
    leaky.guard_failed(
        "test_leaks_a_task_per_example",
        1,
        "*asyncio task <Task * name='example-task' coro=<sleep()*",
    )


# -- clean tests pass --------------------------------------------------------------------------

# One run for all of these, with a grace period long enough for things still winding down.
CLEAN_TESTS = """
import anyio
import sqlalchemy
from hypothesis import HealthCheck, given, settings, strategies as st


def test_thread_still_winding_down():
    threading.Thread(target=time.sleep, args=(0.3,), name="slow-to-stop").start()


def test_joined_thread_and_closed_resources(tmp_path):
    worker = threading.Thread(target=time.sleep, args=(0.01,))
    worker.start()
    worker.join()
    conn = sqlite3.connect(tmp_path / "clean.db")
    conn.execute("CREATE TABLE t (x int)")
    conn.close()
    with socket.create_server(("127.0.0.1", 0)) as server:
        socket.create_connection(server.getsockname()).close()
    loop = asyncio.new_event_loop()
    loop.close()


def test_disposed_engine(sqlite_url):
    engine = sqlalchemy.create_engine(sqlite_url)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))
    engine.dispose()


@pytest.fixture
async def task_group():
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep_forever)
        yield tg
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_awaited_and_cancelled_tasks_and_worker_threads(task_group):
    await asyncio.create_task(asyncio.sleep(0.01))
    task = asyncio.create_task(asyncio.sleep(60))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.to_thread(time.sleep, 0.01)
    await anyio.to_thread.run_sync(time.sleep, 0.01)
    await asyncio.get_running_loop().getaddrinfo("localhost", 80)


@settings(max_examples=20)
@given(st.integers())
def test_property(x):
    assert x == x


@pytest.mark.anyio
@settings(max_examples=20)
@given(st.integers())
async def test_async_property(x):
    await anyio.sleep(0)


@pytest.mark.anyio
@settings(max_examples=200, suppress_health_check=list(HealthCheck))
@given(st.data())
async def test_draws_a_lot(data):
    n = data.draw(st.integers(0, 3000))
    data.draw(st.lists(st.integers(), min_size=n, max_size=n))
    await asyncio.sleep(0)


# Last: its thread lives until module teardown (before-snapshots would hide it from the rest).
@pytest.mark.allow_leaks
def test_leaks_on_purpose():
    threading.Thread(target=RELEASE.wait, args=(60,), name="tolerated").start()
"""


@pytest.fixture
def clean(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, child_runs: dict[RunKey, Child]
) -> Child:
    """The run of CLEAN_TESTS (3 s grace), shared by the checks below."""
    env = {"LIVECOUNT_LEAK_GRACE": "3"}
    return shared_run(child_runs, inner, monkeypatch, CLEAN_TESTS, "-rA", env=env)


def test_thread_that_stops_within_the_grace_period_passes(clean: Child) -> None:
    assert clean.outcomes("test_thread_still_winding_down") == ["PASSED"]
    assert clean.result.ret == pytest.ExitCode.OK


def test_async_hypothesis_examples_that_run_out_of_data_still_pass(clean: Child) -> None:
    # Hypothesis aborts such examples with StopTest, a BaseException that kills anyio's
    # runner task; the guard must not keep that runner alive into the next example.
    assert clean.outcomes("test_draws_a_lot") == ["PASSED"]
    assert clean.result.ret == pytest.ExitCode.OK


def test_tests_that_clean_up_pass(clean: Child) -> None:
    for test in (
        "test_joined_thread_and_closed_resources",
        "test_disposed_engine",
        "test_awaited_and_cancelled_tasks_and_worker_threads",
        "test_property",
        "test_async_property",
    ):
        assert clean.outcomes(test) == ["PASSED"], test
    clean.result.stdout.no_fnmatch_line("*resource(s)*behind*")
    assert clean.result.ret == pytest.ExitCode.OK


def test_allow_leaks_marker_exempts_a_test(clean: Child) -> None:
    assert clean.outcomes("test_leaks_on_purpose") == ["PASSED"]
    assert clean.result.ret == pytest.ExitCode.OK


def test_resources_outliving_the_session_fail_the_run(inner: pytest.Pytester) -> None:
    # A run of its own: what it checks fails the whole run.
    # Set up before the per-test snapshot, so only the end-of-session check can see it.
    inner.makepyfile(
        stopper="""
        import threading

        STOP = threading.Event()


        def pytest_unconfigure(config):
            STOP.set()
        """
    )
    result = run(
        inner,
        """
        import stopper


        @pytest.fixture(scope="session")
        def service():
            threading.Thread(target=stopper.STOP.wait, args=(60,), name="session-leak").start()
            yield  # never stops it


        def test_uses_the_service(service):
            pass
        """,
        "-p",
        "stopper",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*= leak guard =*",
            "leak guard: 1 resource(s) left behind at the end of the session*",
            "*thread 'session-leak' (daemon=False*",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


# -- profiles, --slow, service fixtures --------------------------------------------------------

# Each args/env pair below gets one run of all four probes: the profile is fixed per process.
PROBES = """
from hypothesis import settings


def test_profile():
    current = settings()
    print(f"PROFILE={settings.get_current_profile_name()} max_examples={current.max_examples}"
          f" deadline={current.deadline} print_blob={current.print_blob}")


@pytest.mark.slow
def test_slow():
    pass


def test_needs_postgres(postgres_url):
    pass


def test_needs_redis(redis_url):
    pass
"""

# Nothing listens on port 1: connections are refused at once.
UNREACHABLE = {
    "LIVECOUNT_TEST_POSTGRES": "postgresql://postgres@127.0.0.1:1/test",
    "LIVECOUNT_TEST_REDIS": "redis://127.0.0.1:1",
}


def probe_run(
    runs: dict[RunKey, Child],
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    env: Env,
) -> Child:
    """PROBES run with ``args`` and ``env`` (CI unset unless given), unreachable services."""
    env = {"CI": None, **UNREACHABLE, **env}
    return shared_run(runs, inner, monkeypatch, PROBES, "-s", "-rA", *args, env=env)


@pytest.mark.parametrize(
    ("args", "env", "expected", "slow_runs"),
    [
        ((), {}, "*PROFILE=dev max_examples=100 deadline=None print_blob=False", False),
        (("--slow",), {"CI": "true"}, "*PROFILE=slow max_examples=2000 deadline=None *", True),
        ((), {"CI": "true"}, "*PROFILE=ci max_examples=200 deadline=None print_blob=True", False),
        ((), {"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "*PROFILE=dev max_examples=100 *", False),
    ],
)
def test_hypothesis_profile_and_slow_selection(
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    child_runs: dict[RunKey, Child],
    args: tuple[str, ...],
    env: dict[str, str],
    expected: str,
    slow_runs: bool,
) -> None:
    child = probe_run(child_runs, inner, monkeypatch, args, env)
    child.result.stdout.fnmatch_lines([expected])
    assert child.outcomes("test_profile") == ["PASSED"]
    if slow_runs:
        assert child.outcomes("test_slow") == ["PASSED"]
    else:
        assert child.outcomes("test_slow") == []
        child.result.stdout.fnmatch_lines(["SKIPPED * slow test: run with --slow"])


@pytest.mark.parametrize("ci", [False, True])
def test_unreachable_services_skip_locally_and_fail_in_ci(
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    child_runs: dict[RunKey, Child],
    ci: bool,
) -> None:
    child = probe_run(child_runs, inner, monkeypatch, (), {"CI": "true"} if ci else {})
    if ci:
        assert child.outcomes("test_needs_postgres") == ["ERROR"]
        child.error("test_needs_postgres", "setup").fnmatch_lines(
            ["*PostgreSQL not reachable at 127.0.0.1:1 (*); CI=true, so the tests that need*"]
        )
        assert child.outcomes("test_needs_redis") == ["ERROR"]
        child.error("test_needs_redis", "setup").fnmatch_lines(
            ["*Redis not reachable at 127.0.0.1:1 (*); CI=true, so the tests that need it*"]
        )
    else:
        assert child.outcomes("test_needs_postgres") == []
        assert child.outcomes("test_needs_redis") == []
        child.result.stdout.fnmatch_lines(
            [
                "SKIPPED * PostgreSQL not reachable at 127.0.0.1:1 (*)",
                "SKIPPED * Redis not reachable at 127.0.0.1:1 (*)",
            ],
            consecutive=False,
        )


def test_postgres_url_is_a_fresh_schema_for_psycopg_and_sqlalchemy(postgres_url: str) -> None:
    import psycopg
    import sqlalchemy

    schema = postgres_url.rpartition("application_name=")[2]
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:5432/test?")
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SHOW search_path").fetchone() == (schema,)
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchone()
        assert tables == (0,)
    engine = sqlalchemy.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://")
    )
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE probe (x int)"))
            where = conn.execute(
                sqlalchemy.text("SELECT schemaname FROM pg_tables WHERE tablename = 'probe'")
            ).scalars()
            assert list(where) == [schema]
    finally:
        engine.dispose()


def test_redis_url_is_the_flushed_test_db(redis_url: str) -> None:
    import redis

    assert redis_url == "redis://127.0.0.1:6379/9"
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("livecount:probe", "1")
        assert client.connection_pool.connection_kwargs["db"] == 9


def test_sqlite_url_is_a_file_in_the_test_tmp_path(sqlite_url: str, tmp_path: Path) -> None:
    assert sqlite_url == f"sqlite:///{tmp_path}/livecount.db"


def test_anyio_backend_is_asyncio(anyio_backend: str) -> None:
    assert anyio_backend == "asyncio"

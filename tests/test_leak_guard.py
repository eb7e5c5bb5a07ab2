"""The test harness in tests/conftest.py does what the rest of the suite relies on.

Mostly the leak guard: each test here writes a small test file, runs it in a child pytest
process under a copy of the project's conftest (so the leaks it provokes die with that
process and cannot touch this one) and checks that the leaking test fails with a message
naming the leak, and that a clean test passes. Then the shared fixtures and profiles.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py").read_text()

# Prepended to every inner test file: leaked threads wait on RELEASE, which a module-scoped
# fixture sets once the per-test checks (which run before module teardown) have seen them,
# so the child process can exit; KEEP holds leaked objects so nothing garbage-collects them.
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


"""

GUARD_FAILED = "leak guard: the test left {n} resource(s) behind*"


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    # Failing tests wait out the grace period; a short one keeps these runs quick.
    monkeypatch.setenv("LIVECOUNT_LEAK_GRACE", "0.5")
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    return pytester


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=PRELUDE + textwrap.dedent(source))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


# -- leaks fail the test -----------------------------------------------------------------------


def test_leaked_thread_fails_the_test(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        def test_leaks_a_thread():
            threading.Thread(target=RELEASE.wait, args=(60,), name="leaky-worker").start()
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_thread*",
            GUARD_FAILED.format(n=1),
            "*thread 'leaky-worker' (daemon=False*target Event.wait)",
        ]
    )
    # Released at module teardown, so the session-end check has nothing to add.
    result.stdout.no_fnmatch_line("*end of the session*")
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_daemon_thread_counts_as_a_leak_too(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        def test_leaks_a_daemon_thread():
            threading.Thread(target=RELEASE.wait, name="leaky-daemon", daemon=True).start()
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([GUARD_FAILED.format(n=1), "*thread 'leaky-daemon' (daemon=True*"])


def test_thread_that_stops_within_the_grace_period_passes(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVECOUNT_LEAK_GRACE", "3")
    result = run(
        inner,
        """
        def test_thread_still_winding_down():
            threading.Thread(target=time.sleep, args=(0.3,), name="slow-to-stop").start()
        """,
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_leaked_asyncio_tasks_fail_the_test(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
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
        """,
    )
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_task*",
            GUARD_FAILED.format(n=1),
            "*asyncio task <Task * name='leaky-task' coro=<sleep()*",
            "*ERROR at teardown of test_fixture_leaks_a_task*",
            GUARD_FAILED.format(n=1),
            "*asyncio task <Task * name='fixture-task' coro=<Event.wait()*",
        ]
    )


def test_leaked_sqlite_connections_fail_the_test(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        import sqlalchemy


        def test_leaks_a_connection(tmp_path):
            KEEP.append(sqlite3.connect(tmp_path / "leaky.db"))


        def test_leaks_an_engine_pool(sqlite_url):
            engine = sqlalchemy.create_engine(sqlite_url)  # never disposed
            KEEP.append(engine)
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
        """,
    )
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_connection*",
            GUARD_FAILED.format(n=1),
            "*open database file */leaky.db (fd *)",
            "*ERROR at teardown of test_leaks_an_engine_pool*",
            GUARD_FAILED.format(n=1),
            "*open database file */livecount.db (fd *)",
        ]
    )


def test_leaked_sockets_fail_the_test(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        def test_leaks_a_listener_and_a_connection():
            server = socket.create_server(("127.0.0.1", 0))
            KEEP.append(server)
            KEEP.append(socket.create_connection(server.getsockname()))
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            GUARD_FAILED.format(n=2),
            "*tcp socket listening on 127.0.0.1:* (fd *)",
            "*tcp connection 127.0.0.1:* -> 127.0.0.1:* ESTABLISHED (fd *)",
        ],
        consecutive=False,
    )


def test_unclosed_event_loop_fails_the_test(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        def test_leaks_a_loop():
            KEEP.append(asyncio.new_event_loop())
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            GUARD_FAILED.format(n=1),
            "*unclosed event loop <_UnixSelectorEventLoop * closed=False *> (self-pipe fds *)",
        ]
    )


def test_leaked_postgres_connection_fails_the_test_and_the_schema_still_goes(
    inner: pytest.Pytester, postgres_url: str
) -> None:
    import psycopg

    # The outer postgres_url only gates this test on the server (skip locally, fail in CI).
    result = run(
        inner,
        """
        from pathlib import Path

        import psycopg


        def test_leaks_a_connection_inside_a_transaction(postgres_url):
            Path("url.txt").write_text(postgres_url)
            conn = psycopg.connect(postgres_url)
            KEEP.append(conn)
            conn.execute("CREATE TABLE t (x int)")  # uncommitted: holds locks in the schema
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [GUARD_FAILED.format(n=1), "*PostgreSQL connection 127.0.0.1:* -> 127.0.0.1:5432 *"]
    )
    schema = (inner.path / "url.txt").read_text().rpartition("application_name=")[2]
    assert schema.startswith("lc_")
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))
        assert row.fetchone() == (0,)


def test_leaked_redis_connection_fails_the_test(inner: pytest.Pytester, redis_url: str) -> None:
    result = run(
        inner,
        """
        import redis


        def test_leaks_a_client(redis_url):
            client = redis.Redis.from_url(redis_url)  # never closed
            KEEP.append(client)
            client.ping()
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [GUARD_FAILED.format(n=1), "*Redis connection 127.0.0.1:* -> 127.0.0.1:6379 *"]
    )


def test_async_hypothesis_test_leaking_tasks_fails_once(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        from hypothesis import given, settings, strategies as st


        @pytest.mark.anyio
        @settings(max_examples=50)
        @given(st.integers())
        async def test_leaks_a_task_per_example(x):
            KEEP.append(asyncio.create_task(asyncio.sleep(60), name="example-task"))
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [GUARD_FAILED.format(n=1), "*asyncio task <Task * name='example-task' coro=<sleep()*"]
    )


def test_async_hypothesis_examples_that_run_out_of_data_still_pass(
    inner: pytest.Pytester,
) -> None:
    # Hypothesis aborts such examples with StopTest, a BaseException that kills anyio's
    # runner task; the guard must not keep that runner alive into the next example.
    result = run(
        inner,
        """
        from hypothesis import HealthCheck, given, settings, strategies as st


        @pytest.mark.anyio
        @settings(max_examples=200, suppress_health_check=list(HealthCheck))
        @given(st.data())
        async def test_draws_a_lot(data):
            n = data.draw(st.integers(0, 3000))
            data.draw(st.lists(st.integers(), min_size=n, max_size=n))
            await asyncio.sleep(0)
        """,
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


# -- clean tests pass --------------------------------------------------------------------------


def test_tests_that_clean_up_pass(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVECOUNT_LEAK_GRACE", "3")
    result = run(
        inner,
        """
        import anyio
        import sqlalchemy
        from hypothesis import given, settings, strategies as st


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
        """,
    )
    result.assert_outcomes(passed=5)
    result.stdout.no_fnmatch_line("*resource(s)*behind*")
    assert result.ret == pytest.ExitCode.OK


def test_allow_leaks_marker_exempts_a_test(inner: pytest.Pytester) -> None:
    result = run(
        inner,
        """
        @pytest.mark.allow_leaks
        def test_leaks_on_purpose():
            threading.Thread(target=RELEASE.wait, args=(60,), name="tolerated").start()
        """,
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_resources_outliving_the_session_fail_the_run(inner: pytest.Pytester) -> None:
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

PROFILE_PROBE = """
from hypothesis import settings


def test_profile():
    current = settings()
    print(f"PROFILE={settings.get_current_profile_name()} max_examples={current.max_examples}"
          f" deadline={current.deadline} print_blob={current.print_blob}")


@pytest.mark.slow
def test_slow():
    pass
"""


@pytest.mark.parametrize(
    ("args", "env", "expected", "slow_runs"),
    [
        ((), {}, "*PROFILE=dev max_examples=100 deadline=None print_blob=False", False),
        (("--slow",), {"CI": "true"}, "*PROFILE=slow max_examples=2000 deadline=None *", True),
        ((), {"CI": "true"}, "*PROFILE=ci max_examples=300 deadline=None print_blob=True", False),
        ((), {"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "*PROFILE=dev max_examples=100 *", False),
    ],
)
def test_hypothesis_profile_and_slow_selection(
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    env: dict[str, str],
    expected: str,
    slow_runs: bool,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run(inner, PROFILE_PROBE, "-s", "-rs", *args)
    result.stdout.fnmatch_lines([expected])
    if slow_runs:
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED * slow test: run with --slow"])


@pytest.mark.parametrize("ci", [False, True])
def test_unreachable_services_skip_locally_and_fail_in_ci(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: bool
) -> None:
    # Nothing listens on port 1: connections are refused at once.
    monkeypatch.setenv("LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:1/test")
    monkeypatch.setenv("LIVECOUNT_TEST_REDIS", "redis://127.0.0.1:1")
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    result = run(
        inner,
        """
        def test_needs_postgres(postgres_url):
            pass


        def test_needs_redis(redis_url):
            pass
        """,
        "-rs",
    )
    if ci:
        result.assert_outcomes(errors=2)
        result.stdout.fnmatch_lines(
            [
                "*PostgreSQL not reachable at 127.0.0.1:1 (*); CI=true, so the tests that need*",
                "*Redis not reachable at 127.0.0.1:1 (*); CI=true, so the tests that need it*",
            ],
            consecutive=False,
        )
    else:
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines(
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

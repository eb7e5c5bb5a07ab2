"""The scale-out cluster: started once for the package, healed before each test, stopped (and
its database dropped) at the end, even after a failure. A failed test's report carries what
every process logged during it.

PostgreSQL must answer at ``LIVECOUNT_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``: the cluster's own database is created next to
it) and ``redis-server`` must be installed (the cluster runs its own, on a free port);
otherwise the tests skip, or fail with ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

from .support import Cluster

POSTGRES_ADMIN_URL = os.environ.get(
    "LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(message: str) -> NoReturn:
    """Skip locally; in CI (``CI=true``) these tests must run, so fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so the scale-out tests must run", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="package")
def _cluster(tmp_path_factory: pytest.TempPathFactory,
             _postgres_error: str | None) -> Iterator[Cluster]:
    if _postgres_error is not None:
        where = urlsplit(POSTGRES_ADMIN_URL).netloc.rpartition("@")[2]  # no password
        _unavailable(f"PostgreSQL not reachable at {where} ({_postgres_error})")
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed (the cluster runs a Redis server of its "
                     "own; Debian: apt-get install redis-server)")
    cluster = Cluster(tmp_path_factory.mktemp("scaleout"), POSTGRES_ADMIN_URL)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.close()
        finally:
            cluster.drop_database()


@pytest.fixture
def cluster(_cluster: Cluster) -> Cluster:
    """The cluster, every process running and ready, the workers holding half the shards
    each; its logs are marked, so a failure shows what they wrote during the test."""
    _cluster.heal()
    _cluster.mark_logs()
    return _cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(cluster, Cluster):
        for name, text in cluster.logs_since_mark():
            if text.strip():
                report.sections.append((f"{name} log ({report.when})", text))
    return report

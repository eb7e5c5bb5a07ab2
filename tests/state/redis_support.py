"""Redis for the tests of the Redis state and bus (and the fault harness and relay tests that
run on them): a key prefix per test session, one per test under it, all deleted.

- The server is ``LIVECOUNT_TEST_REDIS`` (default ``redis://127.0.0.1:6379``), database
  ``LIVECOUNT_TEST_REDIS_DB`` (default 10: not the leak guard's db 9, which its ``redis_url``
  fixture flushes before and after each test that uses it). Nothing here flushes a database:
  other sessions may share it.
- When Redis does not answer, the tests that need it skip with the reason; with ``CI=true``
  they fail instead (CI starts Redis, so they must run).
- Every key of a session starts with ``lctest:<random>:`` and is deleted at the end of the
  session; every test (or hypothesis example) gets its own prefix under it, deleted when it
  ends. "Losing the data" (what a FLUSHDB or a restart without persistence does to a
  prefix's keys) is done by deleting every key of the prefix: a real FLUSHDB would wipe the
  keys of concurrent sessions too.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import pytest
import redis

__all__ = ["REDIS_SERVER", "delete_prefix", "lose_data", "prefix_of", "redis_broker",
           "require_redis", "scratch_url"]

REDIS_SERVER = os.environ.get("LIVECOUNT_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = int(os.environ.get("LIVECOUNT_TEST_REDIS_DB", "10"))

_session_prefix: str | None = None
_probe: str | None = None  # None: not probed yet; "": reachable; else the error
_counter = itertools.count(1)


def _client() -> redis.Redis:
    return redis.Redis.from_url(f"{REDIS_SERVER}/{REDIS_DB}", socket_connect_timeout=3,
                                socket_timeout=10)


def require_redis(config: pytest.Config) -> str:
    """This session's key prefix; skips (fails with ``CI=true``) when Redis does not
    answer. The first call registers the deletion of the session's keys at its end."""
    global _probe, _session_prefix
    if _probe is None:
        try:
            with _client() as client:
                client.ping()
            _probe = ""
        except redis.RedisError as exc:
            _probe = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    if _probe:
        message = f"Redis not reachable at {REDIS_SERVER.split('//')[-1]} ({_probe})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true, so the Redis tests must run", pytrace=False)
        pytest.skip(message)
    if _session_prefix is None:
        _session_prefix = f"lctest:{uuid.uuid4().hex[:12]}:"
        config.add_cleanup(lambda prefix=_session_prefix: delete_prefix(prefix))
    return _session_prefix


def scratch_url(config: pytest.Config, **options: object) -> str:
    """A ``redis://`` URL with a fresh key prefix of its own (delete it with
    :func:`delete_prefix` of :func:`prefix_of`)."""
    prefix = f"{require_redis(config)}{next(_counter)}:"
    query = "&".join([f"prefix={prefix}", *(f"{k}={v}" for k, v in options.items())])
    return f"{REDIS_SERVER}/{REDIS_DB}?{query}"


def prefix_of(url: str) -> str:
    return url.split("prefix=", 1)[1].split("&", 1)[0]


def delete_prefix(prefix: str) -> int:
    """Delete every key that starts with ``prefix``; how many there were."""
    deleted = 0
    with _client() as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=_glob(prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) == 500:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    return deleted


def lose_data(url: str) -> int:
    """What a FLUSHDB (or a restart without persistence) does to the keys of ``url``."""
    return delete_prefix(prefix_of(url))


def _glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


@pytest.fixture
def redis_broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL with a key prefix of this test's own, whose keys are deleted after it."""
    url = scratch_url(request.config)
    try:
        yield url
    finally:
        delete_prefix(prefix_of(url))

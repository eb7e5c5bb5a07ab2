"""The token cache: a known token costs no store read until its TTL passes, memory stays
bounded whatever tokens arrive, and the admin token never touches the store or the cache."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from livecount.service import ADMIN, Service, Settings
from livecount.store.base import Teammate
from livecount.tokens import MISSING, TokenCache
from tests.server.support import auth, create_tenant, live_server, server_settings

ADMIN_TOKEN = "lc_admin_token-cache-test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mate(i: int) -> Teammate:
    return Teammate(id=i, workspace_id=1, name=f"mate {i}", email=f"m{i}@x.example")


# -- the cache alone -----------------------------------------------------------------------


def test_answers_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = TokenCache(ttl=10.0, negative_ttl=1.0, clock=clock)
    assert cache.get("lc_ann") is MISSING
    cache.put("lc_ann", mate(1))
    cache.put("lc_wrong", None)
    assert cache.get("lc_ann") == mate(1)
    assert cache.get("lc_wrong") is None  # a cached "unknown", not a miss
    clock.now += 0.999
    assert cache.get("lc_wrong") is None
    clock.now += 0.001
    assert cache.get("lc_wrong") is MISSING  # negative answers live 1 s
    assert cache.get("lc_ann") == mate(1)
    clock.now += 8.999
    assert cache.get("lc_ann") == mate(1)  # a hit does not extend the TTL ...
    clock.now += 0.001
    assert cache.get("lc_ann") is MISSING  # ... which ends 10 s after the lookup
    assert len(cache) == 0  # expired entries are dropped when met


def test_forget_and_clear() -> None:
    cache = TokenCache(clock=Clock())
    cache.put("lc_a", mate(1))
    cache.put("lc_b", mate(2))
    cache.put("lc_c", None)
    cache.forget("lc_a")
    cache.forget("lc_c")
    cache.forget("lc_never_seen")
    assert (cache.get("lc_a"), cache.get("lc_b"), cache.get("lc_c")) == (MISSING, mate(2),
                                                                          MISSING)
    cache.clear()
    assert cache.get("lc_b") is MISSING and len(cache) == 0


def test_a_new_answer_replaces_the_old_one() -> None:
    cache = TokenCache(clock=Clock())
    cache.put("lc_a", None)
    cache.put("lc_a", mate(1))  # the token was created since
    assert cache.get("lc_a") == mate(1) and len(cache) == 1
    cache.put("lc_a", None)
    assert cache.get("lc_a") is None and len(cache) == 1


def test_keys_are_hashes_never_tokens() -> None:
    cache = TokenCache(clock=Clock())
    token = "lc_secret-value-123"
    cache.put(token, mate(1))
    cache.put(token + "x", None)
    keys = [*cache._known, *cache._unknown]
    assert keys == [hashlib.sha256(token.encode()).digest(),
                    hashlib.sha256((token + "x").encode()).digest()]
    assert token not in repr(cache.__dict__)
    assert token.encode() not in b"".join(keys)


def test_the_bound_holds_under_50000_distinct_tokens() -> None:
    cache = TokenCache(max_entries=10_000, clock=Clock())
    assert cache.max_negative == 1_000
    cache.put("lc_regular", mate(0))
    for i in range(50_000):
        cache.put(f"lc_token_{i}", mate(i))
        if i % 1000 == 0:
            assert cache.get("lc_regular") == mate(0)  # used often: never the LRU one
        assert len(cache._known) <= 10_000
    assert len(cache) == 10_000
    assert cache.get("lc_regular") == mate(0)
    assert cache.get("lc_token_0") is MISSING  # the least recently used went first
    assert cache.get("lc_token_40000") is MISSING
    assert cache.get("lc_token_49999") == mate(49_999)
    assert all(cache.get(f"lc_token_{i}") == mate(i) for i in range(40_001, 50_000))


def test_unknown_tokens_cannot_evict_known_ones() -> None:
    cache = TokenCache(max_entries=100, clock=Clock())
    for i in range(100):
        cache.put(f"lc_good_{i}", mate(i))
    for i in range(50_000):  # a brute force: every guess is new
        cache.put(f"lc_guess_{i}", None)
    assert len(cache._unknown) == 10 and len(cache._known) == 100
    assert all(cache.get(f"lc_good_{i}") == mate(i) for i in range(100))


def test_zero_sizes_disable_caching() -> None:
    cache = TokenCache(max_entries=0, clock=Clock())
    cache.put("lc_a", mate(1))
    cache.put("lc_b", None)
    assert cache.get("lc_a") is MISSING and cache.get("lc_b") is MISSING and len(cache) == 0
    with pytest.raises(ValueError):
        TokenCache(ttl=-1)


# -- in the service ------------------------------------------------------------------------


class Counted:
    """Wraps ``store.authenticate`` (the real one, on a real SQLite store) and counts calls."""

    def __init__(self, real: Callable[[str], Awaitable[Teammate | None]]) -> None:
        self.real = real
        self.calls: list[str] = []

    async def __call__(self, token: str) -> Teammate | None:
        self.calls.append(token)
        return await self.real(token)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    started = Service(Settings(store_url=f"sqlite:///{tmp_path}/livecount.db",
                               admin_token=ADMIN_TOKEN, relay_poll_interval=0.05))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.mark.anyio
async def test_a_known_token_is_read_once_per_ttl(service: Service) -> None:
    workspace = await service.store.create_workspace("Acme")
    ann, token = await service.store.create_teammate(workspace.id, "Ann", "ann@acme.example")
    clock = Clock()
    service.tokens = TokenCache(ttl=10.0, negative_ttl=1.0, clock=clock)
    counted = Counted(service.store.authenticate)
    service.store.authenticate = counted  # type: ignore[method-assign]

    for _ in range(100):
        caller = await service.authenticate(token)
        assert caller is not None and caller.teammate == ann and not caller.is_admin
    assert counted.calls == [token]  # one store read for 100 connects

    clock.now += 10.0
    caller = await service.authenticate(token)
    assert caller is not None and caller.teammate == ann
    assert counted.calls == [token, token]  # expired: asked the store again

    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    for _ in range(50):
        assert await service.authenticate(wrong) is None
    assert counted.calls == [token, token, wrong]  # unknown tokens are cached briefly ...
    clock.now += 1.0
    assert await service.authenticate(wrong) is None
    assert counted.calls == [token, token, wrong, wrong]  # ... for a second

    service.tokens.forget(token)
    assert await service.authenticate(token) is not None
    assert counted.calls[-1] == token and len(counted.calls) == 5


@pytest.mark.anyio
async def test_the_admin_token_is_unchanged(service: Service) -> None:
    counted = Counted(service.store.authenticate)
    service.store.authenticate = counted  # type: ignore[method-assign]
    for _ in range(3):
        assert await service.authenticate(ADMIN_TOKEN) is ADMIN
    assert await service.authenticate("") is None
    assert counted.calls == [] and len(service.tokens) == 0  # never stored, never cached
    assert await service.authenticate(ADMIN_TOKEN + "x") is None  # not the admin: the store
    assert counted.calls == [ADMIN_TOKEN + "x"]


@pytest.mark.anyio
async def test_stream_connects_through_the_app_cost_one_store_read(tmp_path: Path) -> None:
    async with live_server(server_settings(tmp_path)) as server, server.client() as client:
        tenant = await create_tenant(client, server.admin_token, teammates=1, teams=1)
        token = tenant.people[0].token
        counted = Counted(server.service.store.authenticate)
        server.service.store.authenticate = counted  # type: ignore[method-assign]
        for i in range(10):  # SSE answers HEAD with the stream's headers, then ends
            if i % 2:
                response = await client.head(tenant.url("/stream"), params={"token": token})
            else:
                response = await client.head(tenant.url("/stream"), headers=auth(token))
            assert response.status_code == 200, response.text
            assert (await client.get(tenant.url("/counts"), headers=auth(token))
                    ).status_code == 200
        assert counted.calls == [token]
        assert server.internal_errors == 0

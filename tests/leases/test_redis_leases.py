"""Leases on shards of workspaces in a real Redis (short ttls, 8 shards): who takes what, the
fair split, fences that only grow, takeover after a worker stops renewing, the local validity
(``fence()`` lapses at 0.8 × ttl after the renewal was sent, whatever Redis says), giving back
(on ``stop()`` and, after the release hook, on a rebalance), ``lost()``; and the Directory:
the owner of a workspace, a call that reaches it, its errors.

Most tests drive ``run_round()`` themselves, so who holds what is deterministic; one runs the
background rounds."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis

from livecount.exceptions import LivecountError, NotFound, Unavailable, ValidationError
from livecount.leases import redis as leases_module
from livecount.leases.redis import Directory, RedisLeases
from livecount.state.redis import parse_redis_url
from tests.state.redis_support import delete_prefix, prefix_of, scratch_url

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SHARDS = 8
ALL = frozenset(range(SHARDS))


class Kit:
    """Workers and directories on one key prefix, all closed at the end, and a plain client
    to look at (and tamper with) the lease keys."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = prefix_of(url)
        self.server = parse_redis_url(url).server_url
        self.workers: list[RedisLeases] = []
        self.directories: list[Directory] = []

    def worker(self, name: str, *, ttl: float = 5.0, shards: int = SHARDS) -> RedisLeases:
        leases = RedisLeases(self.url, shards=shards, ttl=ttl, worker_id=name)
        self.workers.append(leases)
        return leases

    def directory(self, shards: int = SHARDS) -> Directory:
        directory = Directory(self.url, shards=shards)
        self.directories.append(directory)
        return directory

    async def stop(self, leases: RedisLeases) -> None:
        self.workers.remove(leases)
        await leases.stop()

    async def close(self) -> None:
        for leases in self.workers:
            await leases.stop()
        for directory in self.directories:
            await directory.close()
        self.workers.clear()
        self.directories.clear()

    def key(self, name: str) -> str:
        return f"{self.prefix}{{leases}}:{name}"

    def raw(self) -> redis.Redis:
        return redis.Redis.from_url(self.server, decode_responses=True,
                                    socket_connect_timeout=3, socket_timeout=5)

    def value(self, shard: int) -> str | None:
        """What the lease key of ``shard`` holds ("<worker> <fence>"), or None."""
        with self.raw() as client:
            value = client.get(self.key(f"shard:{shard}"))
        return None if value is None else str(value)

    def pttl(self, shard: int) -> int:
        with self.raw() as client:
            return int(client.pttl(self.key(f"shard:{shard}")))

    def delete_leases(self, shards: frozenset[int] = ALL) -> None:
        """A lease that ended in Redis (expired, or deleted by an operator) and the worker
        entries, as if every worker had been gone for a ttl; the workers do not notice."""
        with self.raw() as client:
            client.delete(*(self.key(f"shard:{s}") for s in shards))
            client.delete(self.key("workers"), self.key("positions"))

    def workers_alive(self) -> set[str]:
        with self.raw() as client:
            return {str(w) for w in client.zrange(self.key("workers"), 0, -1)}


@pytest.fixture
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    url = scratch_url(request.config)  # (skips, or fails with CI=true, without Redis)
    made = Kit(url)
    try:
        yield made
    finally:
        await made.close()
        delete_prefix(prefix_of(url))


#: The order in which a worker keeps its shards (bit-reversed over 8 shards).
SPREAD = [0, 4, 2, 6, 1, 5, 3, 7]


def fences(leases: RedisLeases, shards: frozenset[int] | None = None) -> dict[int, int]:
    """shard → the fence ``leases`` writes a workspace of that shard with (shards it holds)."""
    out = {}
    for shard in sorted(ALL if shards is None else shards):
        fence = leases.fence(shard)  # workspace ``shard`` lies in shard ``shard``
        if fence is not None:
            out[shard] = fence
    return out


async def converge(workers: list[RedisLeases], rounds: int) -> int:
    """Rounds of every worker in turn until the shards are split fairly and nothing moved
    for a whole turn; the number of turns it took (fails after ``rounds``)."""
    for turn in range(1, rounds + 1):
        versions = [w.version for w in workers]
        for worker in workers:
            await worker.run_round()
        held = [w.held for w in workers]
        fair = -(-SHARDS // len(workers))
        if (frozenset().union(*held) == ALL and sum(map(len, held)) == SHARDS
                and all(len(h) <= fair for h in held)
                and versions == [w.version for w in workers]):
            return turn
    pytest.fail(f"no fair split after {rounds} turns: {[sorted(w.held) for w in workers]}")


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Wait (polling) until ``condition()``; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# -- taking, sharing, renewing ------------------------------------------------------------------


async def test_one_worker_takes_every_shard(kit: Kit) -> None:
    a = kit.worker("a")
    changes: list[int] = []
    a.watch(lambda: changes.append(a.version), _no_release)
    assert a.held == frozenset() and a.fence(1) is None
    await a.run_round()
    assert a.held == ALL
    taken = fences(a)
    assert len(set(taken.values())) == SHARDS and min(taken.values()) > 0  # one fence each
    assert all(a.fence(shard + SHARDS) == fence for shard, fence in taken.items())
    for shard, fence in taken.items():
        assert kit.value(shard) == f"a {fence}"
        assert 0 < kit.pttl(shard) <= 5000
    assert changes == [1] and a.acquired == SHARDS
    # a second round renews: same fences, nothing changed
    await a.run_round()
    assert fences(a) == taken and changes == [1] and a.acquired == SHARDS
    assert kit.workers_alive() == {"a"}


@pytest.mark.parametrize(("count", "sizes"), [(2, [4, 4]), (3, [2, 3, 3])])
async def test_workers_converge_to_a_fair_split(kit: Kit, count: int, sizes: list[int]) -> None:
    workers = [kit.worker(name) for name in "abc"[:count]]
    first = workers[0]
    await first.run_round()
    assert first.held == ALL
    initial = fences(first)
    turns = await converge(workers, rounds=4)
    assert turns <= 3
    assert sorted(len(w.held) for w in workers) == sizes
    # the first worker kept the first of its shards in bit-reversed order (spread over the
    # range, so neighbouring workspace ids go to different workers) and gave back the rest;
    # the others took those with new fences
    assert first.held == frozenset(SPREAD[:len(first.held)])
    assert fences(first) == {s: initial[s] for s in first.held}
    for other in workers[1:]:
        assert all(f > max(initial.values()) for f in fences(other).values())
    # Redis agrees with every worker, and the split is stable
    for worker in workers:
        for shard, fence in fences(worker).items():
            assert kit.value(shard) == f"{worker.worker_id} {fence}"
    before = [fences(w) for w in workers]
    for _ in range(2):
        for worker in workers:
            await worker.run_round()
    assert [fences(w) for w in workers] == before


async def test_background_rounds_split_the_shards_and_take_over_a_dead_worker(
        kit: Kit) -> None:
    ttl = 1.0  # a round every ~0.33 s
    a, b = kit.worker("a", ttl=ttl), kit.worker("b", ttl=ttl)
    await a.start()
    assert a.held == ALL
    await b.start()

    def split() -> bool:
        return (a.held | b.held == ALL and not a.held & b.held
                and len(a.held) == len(b.held) == SHARDS // 2)

    await until(split, 5 * ttl, "a fair split of two workers")
    before = {**fences(a), **fences(b)}
    held_by_b = b.held
    # b hangs: its rounds stop (the task ends without stop(): nothing is given back)
    assert b._task is not None
    b._task.cancel()
    await asyncio.gather(b._task, return_exceptions=True)
    took = await until(lambda: a.held == ALL, ttl + ttl / 3 + 1.5, "a takes b's shards over")
    assert took > ttl / 3  # not at once: b's leases had to end in Redis first
    assert b.held == frozenset() and all(b.fence(s) is None for s in ALL)
    after = fences(a)
    assert all(after[s] > max(before.values()) for s in held_by_b)  # new, higher fences
    assert all(after[s] == before[s] for s in ALL - held_by_b)  # a kept its own


async def test_fences_only_grow_across_takeovers(kit: Kit) -> None:
    seen: list[int] = []
    holders = [kit.worker(name, ttl=5.0) for name in ("a", "b", "c")]
    for i, leases in enumerate(holders):
        await leases.run_round()
        assert leases.held == ALL, "the previous holder gave everything back"
        taken = fences(leases)
        assert min(taken.values()) > max(seen, default=0)
        seen.extend(sorted(taken.values()))
        if i % 2 == 0:
            await kit.stop(leases)  # given back
        else:
            kit.delete_leases()  # or ended in Redis behind the holder's back
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


async def test_a_worker_that_stops_renewing_loses_its_shards_after_the_ttl(kit: Kit) -> None:
    ttl = 1.0
    a, b = kit.worker("a", ttl=ttl), kit.worker("b", ttl=ttl)
    await a.run_round()
    sent = time.monotonic()
    old = fences(a)
    await b.run_round()  # a holds everything and is alive: nothing for b
    assert b.held == frozenset() and a.held == ALL
    # a stops renewing (no more rounds); locally it stops using its leases first ...
    await asyncio.sleep(max(0.0, sent + 0.8 * ttl + 0.02 - time.monotonic()))
    assert a.held == frozenset() and all(a.fence(s) is None for s in ALL)
    # ... and after the ttl they end in Redis: b takes them, with higher fences
    await asyncio.sleep(max(0.0, sent + ttl + 0.1 - time.monotonic()))
    assert all(kit.value(s) is None for s in ALL)
    await b.run_round()
    assert b.held == ALL
    assert min(fences(b).values()) > max(old.values())
    # a comes back: its leases are not renewed (they are b's now), and it takes nothing
    changes: list[int] = []
    a.watch(lambda: changes.append(a.version), _no_release)
    await a.run_round()
    assert a.held == frozenset() and a.lost_leases == SHARDS and changes == [a.version]
    assert all(kit.value(s) == f"b {f}" for s, f in fences(b).items())


async def test_fence_is_none_once_the_local_validity_passes(
        kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.8 × ttl after the renewal was SENT (a slow reply does not extend it), whatever
    Redis holds: the lease is still a's there, and nobody asked."""
    clock = [1000.0]
    monkeypatch.setattr(leases_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    a = kit.worker("a", ttl=10.0)
    real_round = a._round

    async def slow_round(*args: Any, **kwargs: Any) -> Any:
        reply = await real_round(*args, **kwargs)
        clock[0] += 3.0  # the reply took 3 s to come back
        return reply

    monkeypatch.setattr(a, "_round", slow_round)
    await a.run_round()  # sent at 1000, answered at 1003
    taken = fences(a)
    assert a.held == ALL
    clock[0] = 1007.999
    assert fences(a) == taken and a.held == ALL
    clock[0] = 1008.0  # 1000 + 0.8 × 10
    assert all(a.fence(s) is None for s in ALL) and a.held == frozenset()
    assert all(kit.value(s) == f"a {f}" for s, f in taken.items())  # Redis: still a's
    assert all(kit.pttl(s) > 5000 for s in ALL)
    await a.run_round()  # sent at 1008: renewed, the same fences, valid until 1016
    clock[0] = 1015.9
    assert fences(a) == taken
    clock[0] = 1016.0
    assert a.fence(0) is None


async def test_stop_gives_the_leases_back_so_another_takes_them_at_once(kit: Kit) -> None:
    a, b = kit.worker("a", ttl=30.0), kit.worker("b", ttl=30.0)
    await a.start(position=lambda: 17)
    await b.run_round()
    assert a.held == ALL and b.held == frozenset()
    old = fences(a)
    with kit.raw() as client:
        assert client.hget(kit.key("positions"), "a") == "17"
    await kit.stop(a)
    assert all(kit.value(s) is None for s in ALL)
    assert kit.workers_alive() == {"b"} and a.released == SHARDS
    with kit.raw() as client:
        assert client.hget(kit.key("positions"), "a") is None
    assert all(a.fence(s) is None for s in ALL)
    started = time.monotonic()
    await b.run_round()  # long before a's 30 s ttl
    assert b.held == ALL and time.monotonic() - started < 5
    assert min(fences(b).values()) > max(old.values())


async def test_lost_drops_the_shard_and_bumps_the_version(kit: Kit) -> None:
    a = kit.worker("a")
    await a.run_round()
    changes: list[int] = []
    a.watch(lambda: changes.append(a.version), _no_release)
    version, taken = a.version, fences(a)
    a.lost(3 + SHARDS)  # a write of workspace 11 (shard 3) was fenced
    assert a.version == version + 1 and changes == [version + 1]
    assert a.fence(3) is None and a.fence(3 + SHARDS) is None
    assert a.held == ALL - {3} and a.lost_leases == 1
    assert fences(a) == {s: f for s, f in taken.items() if s != 3}
    a.lost(3)  # already gone: nothing changes
    assert a.version == version + 1 and changes == [version + 1] and a.lost_leases == 1


async def test_the_release_hook_is_awaited_before_the_lease_is_released(kit: Kit) -> None:
    a, b = kit.worker("a"), kit.worker("b")
    await a.run_round()
    taken = fences(a)
    await b.run_round()  # b is alive: a's fair share is 4 now
    calls: list[frozenset[int]] = []
    seen: list[tuple[str, Any]] = []

    async def release(shards: frozenset[int]) -> None:
        calls.append(shards)
        # the relay stops writing them: they are no longer a's to write ...
        seen.append(("fences", [a.fence(s) for s in sorted(shards)]))
        # ... while Redis still holds them for a, until the hook has returned
        seen.append(("before", [kit.value(s) for s in sorted(shards)]))
        await asyncio.sleep(0.1)
        seen.append(("after", [kit.value(s) for s in sorted(shards)]))

    a.watch(lambda: None, release)
    await a.run_round()
    given = frozenset({1, 3, 5, 7})  # it keeps 0, 4, 2, 6: the first half of SPREAD
    assert calls == [given]
    held_values = [f"a {taken[s]}" for s in sorted(given)]
    assert seen == [("fences", [None] * 4), ("before", held_values), ("after", held_values)]
    assert all(kit.value(s) is None for s in given) and a.released == 4
    assert a.held == ALL - given
    await b.run_round()
    assert b.held == given


async def _no_release(shards: frozenset[int]) -> None:
    pass


# -- the directory ------------------------------------------------------------------------------


def answering(name: str) -> Callable[[int], Awaitable[dict[str, Any]]]:
    async def handler(workspace_id: int) -> dict[str, Any]:
        if workspace_id == 3:
            raise NotFound(f"workspace {workspace_id} does not exist")
        if workspace_id == 4:
            raise Unavailable("the relay is behind; retry")
        if workspace_id == 5:
            raise RuntimeError("a bug")
        if workspace_id == 6:
            raise ValidationError("bad", "workspace")
        return {"worker": name, "workspace": workspace_id}

    return handler


async def test_the_directory_finds_the_owner_and_its_answer_comes_back(kit: Kit) -> None:
    a, b = kit.worker("a"), kit.worker("b")
    await converge([a, b], rounds=4)
    a.answer(answering("a"))
    b.answer(answering("b"))
    directory = kit.directory()
    for workspace_id in (0, 1, 7, 9, 12, 15, 23):
        owner = "a" if workspace_id % SHARDS in a.held else "b"
        assert await directory.owner(workspace_id) == owner
        assert await directory.call(workspace_id, wait=5) == {"worker": owner,
                                                              "workspace": workspace_id}


async def test_a_call_fails_with_the_exception_of_the_failure(kit: Kit) -> None:
    a = kit.worker("a")
    await a.run_round()
    a.answer(answering("a"))
    directory = kit.directory()
    with pytest.raises(NotFound, match="workspace 3 does not exist"):
        await directory.call(3, wait=5)
    with pytest.raises(Unavailable, match="the relay is behind"):
        await directory.call(4, wait=5)
    with pytest.raises(Unavailable, match="RuntimeError"):  # a crash: 503, not its text
        await directory.call(5, wait=5)
    with pytest.raises(LivecountError) as other:  # another status: the base error
        await directory.call(6, wait=5)
    assert type(other.value) is LivecountError and "bad" in str(other.value)
    assert await directory.call(1, wait=5) == {"worker": "a", "workspace": 1}


async def test_a_call_without_an_owner_or_an_answer_is_unavailable(kit: Kit) -> None:
    directory = kit.directory()
    assert await directory.owner(1) is None
    with pytest.raises(Unavailable, match="no counter worker owns workspace 1"):
        await directory.call(1, wait=5)
    a = kit.worker("a")
    await a.run_round()  # an owner that does not answer calls
    assert await directory.owner(1) == "a"
    with pytest.raises(Unavailable, match="did not answer"):
        await directory.call(1, wait=0.3)
    await kit.stop(a)  # gone: no owner again
    assert await directory.owner(1) is None
    with pytest.raises(Unavailable, match="no counter worker owns"):
        await directory.call(1, wait=5)

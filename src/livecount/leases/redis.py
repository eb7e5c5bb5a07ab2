"""Leases on shards of workspaces in Redis: how counting processes share the work.

Keys (``P`` the broker URL's prefix; the hash tag ``{leases}`` keeps them in one cluster slot,
so each script below touches one slot)::

    P{leases}:shard:<n>   STRING "<worker id> <fence>", with an expiry of ``ttl``: the lease
    P{leases}:fence       INTEGER, the last fence handed out (INCR, and at least the time
                          in ms: every new lease's fence is higher than every earlier one's,
                          of any shard, even across a loss of Redis's data)
    P{leases}:workers     ZSET worker id → expiry (ms, Redis's clock): who is alive
    P{leases}:positions   HASH worker id → the outbox position it has reached
    P{leases}:calls:<id>  LIST of requests to worker <id> (an admin's reconcile through any
                          gateway goes to the owner of the workspace: :class:`Directory`)

Every ``ttl / 3`` a :class:`RedisLeases` runs one **round**: it says it is alive, renews the
leases it holds (a lease that is no longer its own is dropped at once), and moves towards its
fair share, ``ceil(shards / live workers)``: above it, it releases shards spread over the range
(bit-reversed order: neighbouring workspace ids go to different workers), after the relay
stopped writing their workspaces; below it, it takes free shards, each with a new
fence. A worker that dies stops renewing: its leases expire after ``ttl`` and the next round
of another worker takes them (takeover within ``ttl`` + ``ttl / 3``).

**Safety does not depend on clocks.** A lease is used locally only until ``0.8 × ttl`` after
the renewal was *sent* (so it lapses locally before it can lapse in Redis, unless the clocks
run at very different speeds), and even a write sent after that (a pause between the check
and the write) is refused by the counter state once the new owner, with its higher fence,
has written (see :class:`~livecount.state.base.StateFenced`); before that, the new owner's
first write finds the position moved and recounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ..exceptions import LivecountError, NotFound, Unavailable
from ..state.redis import parse_redis_url, redis_client, unavailable
from .base import ReleaseHook, shard_of

__all__ = ["DEFAULT_SHARDS", "DEFAULT_TTL", "Directory", "RedisLeases"]

log = logging.getLogger("livecount.leases")

DEFAULT_SHARDS: Final = 64
DEFAULT_TTL: Final = 10.0
#: Share of the ttl a lease is used for after its renewal was sent.
SAFE_SHARE: Final = 0.8

# KEYS: workers, positions, then the held shards' keys. ARGV: id, ttl ms, position, then the
# held leases' values. Returns {live workers, lowest position of the live ones, kept...}.
_ROUND: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], w)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local floor = nil
for _, p in ipairs(redis.call('HVALS', KEYS[2])) do
  local v = tonumber(p)
  if floor == nil or v < floor then floor = v end
end
local out = {redis.call('ZCARD', KEYS[1]), floor or 0}
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ttl)
    out[#out + 1] = i - 2
  end
end
return out
"""

# KEYS: the fence counter, then candidate shards' keys. ARGV: id, ttl ms, how many to take.
# Returns {index, fence, index, fence, ...} of the leases taken. A fence is at least Redis's
# clock in milliseconds: if Redis loses its data (the counter, the leases and the states'
# ``_fence`` together), the fences it hands out next are still higher than any handed out
# before, so a worker holding an old one cannot fence the new owner out.
_ACQUIRE: Final = """
local out = {}
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #KEYS do
  if #out >= 2 * want then break end
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local fence = redis.call('INCR', KEYS[1])
    if fence < now then
      fence = now
      redis.call('SET', KEYS[1], fence)
    end
    redis.call('SET', KEYS[i], ARGV[1] .. ' ' .. fence, 'PX', ARGV[2])
    out[#out + 1] = i - 1
    out[#out + 1] = fence
  end
end
return out
"""

# KEYS: shards' keys; ARGV: the values they hold if still ours. Deletes those.
_RELEASE: Final = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""


@dataclass
class _Lease:
    fence: int
    valid_until: float  # monotonic: used no later than this

    def value(self, worker_id: str) -> str:
        return f"{worker_id} {self.fence}"


class RedisLeases:
    """This process's leases; ``start()`` takes its first share, ``stop()`` gives all back
    (so another worker takes over at once instead of after the ttl)."""

    def __init__(self, url: str, *, shards: int = DEFAULT_SHARDS, ttl: float = DEFAULT_TTL,
                 worker_id: str | None = None) -> None:
        if shards < 1:
            raise LivecountError("shards must be at least 1")
        if not ttl > 0:
            raise LivecountError("the lease ttl must be positive")
        self.options = parse_redis_url(url)
        self.shards = shards
        self.ttl = ttl
        self.worker_id = worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}")
        # one connection for the rounds, one for the calls' blocking reads, one to answer
        self._client = redis_client(self.options, max_connections=3)
        self._round = self._client.register_script(_ROUND)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._release = self._client.register_script(_RELEASE)
        self._held: dict[int, _Lease] = {}
        self._version = 0
        self._floor: int | None = None
        self._live = 1
        self._position: Callable[[], int] = lambda: 0
        self._on_change: Callable[[], None] = lambda: None
        self._on_release: ReleaseHook | None = None
        self._task: asyncio.Task[None] | None = None
        self._calls: asyncio.Task[None] | None = None
        #: leases taken, lost (not renewed in time or taken by another) and released
        self.acquired = 0
        self.lost_leases = 0
        self.released = 0
        self.errors = 0

    def _key(self, name: str) -> str:
        return f"{self.options.prefix}{{leases}}:{name}"

    def _shard_key(self, shard: int) -> str:
        return self._key(f"shard:{shard}")

    # -- what the relay asks ------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def fence(self, workspace_id: int) -> int | None:
        lease = self._held.get(shard_of(workspace_id, self.shards))
        if lease is None or time.monotonic() >= lease.valid_until:
            return None
        return lease.fence

    def lost(self, workspace_id: int) -> None:
        shard = shard_of(workspace_id, self.shards)
        if self._held.pop(shard, None) is not None:
            self.lost_leases += 1
            log.warning("worker %s: the lease on shard %d was taken over (a write was "
                        "fenced)", self.worker_id, shard)
            self._changed()

    def floor(self) -> int | None:
        return self._floor if self._live > 1 else None

    def watch(self, on_change: Callable[[], None], on_release: ReleaseHook) -> None:
        self._on_change = on_change
        self._on_release = on_release

    @property
    def held(self) -> frozenset[int]:
        """The shards held now (whose lease is still valid here)."""
        now = time.monotonic()
        return frozenset(s for s, lease in self._held.items() if now < lease.valid_until)

    def _changed(self) -> None:
        self._version += 1
        self._on_change()

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self, position: Callable[[], int] = lambda: 0) -> None:
        """Take this process's first share (so the relay starts with it), then keep renewing
        in a task."""
        self._position = position
        await self.run_round()
        self._task = asyncio.create_task(self._loop(), name="livecount-leases")

    def answer(self, handler: Callable[[int], Awaitable[dict[str, Any]]]) -> None:
        """Answer the calls other processes send this worker (see :class:`Directory`):
        ``await handler(workspace_id)`` gives the reply; a failure is sent back as an error."""
        self._calls = asyncio.create_task(self._answer(handler), name="livecount-lease-calls")

    async def _answer(self, handler: Callable[[int], Awaitable[dict[str, Any]]]) -> None:
        key = self._key(f"calls:{self.worker_id}")
        while True:
            try:
                with unavailable("call read"):
                    item = await self._client.blpop([key], timeout=1)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1)
                continue
            if item is None:
                continue
            try:
                call = msgspec.json.decode(item[1])
                reply_key, workspace_id = str(call["reply"]), int(call["workspace"])
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                log.warning("worker %s: ignoring a malformed call", self.worker_id)
                continue
            try:
                reply: dict[str, Any] = {"ok": await handler(workspace_id)}
            except asyncio.CancelledError:
                raise
            except LivecountError as exc:
                reply = {"error": str(exc), "status": exc.status}
            except Exception as exc:
                log.exception("worker %s: a call failed", self.worker_id)
                reply = {"error": f"{type(exc).__name__}", "status": 503}
            with contextlib.suppress(Exception), unavailable("call reply"):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.rpush(reply_key, msgspec.json.encode(reply))
                    pipe.expire(reply_key, 60)
                    await pipe.execute()

    async def stop(self) -> None:
        """Stop renewing and give every lease back (the relay has stopped writing)."""
        tasks = [t for t in (self._task, self._calls) if t is not None]
        self._task = self._calls = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held, self._held = self._held, {}
        try:
            if held:
                shards = sorted(held)
                with unavailable("lease release"):
                    await self._release(keys=[self._shard_key(s) for s in shards],
                                        args=[held[s].value(self.worker_id) for s in shards])
                self.released += len(held)
            with unavailable("lease release"):
                await self._client.zrem(self._key("workers"), self.worker_id)
                await self._client.hdel(self._key("positions"), self.worker_id)
        except Exception:  # they expire after the ttl anyway
            log.warning("worker %s: could not give the leases back; they expire in %.0f s",
                        self.worker_id, self.ttl, exc_info=True)
        finally:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3 * random.uniform(0.9, 1.1))
            try:
                await self.run_round()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.warning("worker %s: lease round failed; retrying", self.worker_id,
                            exc_info=True)
                self._expire_local()

    def _expire_local(self) -> None:
        """Forget the leases whose local validity ended (their renewal failed)."""
        now = time.monotonic()
        gone = [s for s, lease in self._held.items() if now >= lease.valid_until]
        for shard in gone:
            del self._held[shard]
        if gone:
            self.lost_leases += len(gone)
            log.warning("worker %s: the leases on %d shards lapsed (not renewed in time)",
                        self.worker_id, len(gone))
            self._changed()

    # -- one round ------------------------------------------------------------------------------

    async def run_round(self) -> None:
        """Say it is alive, renew what it holds, then release or take towards the fair
        share."""
        ttl_ms = int(self.ttl * 1000)
        shards = sorted(self._held)
        sent = time.monotonic()
        with unavailable("lease renewal"):
            reply = await self._round(
                keys=[self._key("workers"), self._key("positions"),
                      *(self._shard_key(s) for s in shards)],
                args=[self.worker_id, ttl_ms, int(self._position()),
                      *(self._held[s].value(self.worker_id) for s in shards)])
        self._live, floor = int(reply[0]), int(reply[1])
        self._floor = floor
        kept = {shards[int(i) - 1] for i in reply[2:]}
        valid_until = sent + self.ttl * SAFE_SHARE
        changed = False
        for shard in shards:
            if shard in kept:
                self._held[shard].valid_until = valid_until
            elif self._held.pop(shard, None) is not None:
                self.lost_leases += 1
                changed = True
                log.warning("worker %s: the lease on shard %d was not ours any more",
                            self.worker_id, shard)
        if changed:
            self._changed()
        fair = math.ceil(self.shards / max(1, self._live))
        if len(self._held) > fair:
            order = sorted(self._held, key=lambda shard: _spread(shard, self.shards))
            await self._give_back(sorted(order[fair:]))
        elif len(self._held) < fair:
            await self._take(fair - len(self._held), sent)

    async def _give_back(self, shards: list[int]) -> None:
        leases = {s: self._held.pop(s) for s in shards}
        self._changed()
        if self._on_release is not None:
            await self._on_release(frozenset(shards))  # the relay stops writing them first
        with contextlib.suppress(Exception):  # else they expire after the ttl
            with unavailable("lease release"):
                await self._release(keys=[self._shard_key(s) for s in shards],
                                    args=[leases[s].value(self.worker_id) for s in shards])
            self.released += len(shards)
            log.info("worker %s: released %d shards for other workers", self.worker_id,
                     len(shards))

    async def _take(self, want: int, sent: float) -> None:
        free = [s for s in range(self.shards) if s not in self._held]
        start = random.randrange(len(free)) if free else 0
        candidates = free[start:] + free[:start]
        with unavailable("lease acquire"):
            reply = await self._acquire(
                keys=[self._key("fence"), *(self._shard_key(s) for s in candidates)],
                args=[self.worker_id, int(self.ttl * 1000), want])
        if not reply:
            return
        for i in range(0, len(reply), 2):
            shard = candidates[int(reply[i]) - 1]
            self._held[shard] = _Lease(int(reply[i + 1]), sent + self.ttl * SAFE_SHARE)
        self.acquired += len(reply) // 2
        log.info("worker %s: took %d shards (holds %d of %d)", self.worker_id,
                 len(reply) // 2, len(self._held), self.shards)
        self._changed()


def _spread(shard: int, shards: int) -> int:
    """The order in which a worker keeps its shards: bit-reversed, so what it keeps is
    spread over the shard range (0, 32, 16, 48, … of 64) and workspaces with neighbouring
    ids (tenants created one after another) end up on different workers."""
    bits = max(1, (shards - 1).bit_length())
    return int(format(shard, f"0{bits}b")[::-1], 2)


class Directory:
    """Who owns a workspace, and a call to that worker: how a gateway (which counts
    nothing) has an admin's reconcile run by the one process allowed to repair the counts."""

    def __init__(self, url: str, *, shards: int = DEFAULT_SHARDS) -> None:
        self.options = parse_redis_url(url)
        self.shards = shards
        # a call blocks until the owner answers: a socket timeout longer than any call's
        self._client = redis_client(self.options, max_connections=4, socket_timeout=300.0)

    def _key(self, name: str) -> str:
        return f"{self.options.prefix}{{leases}}:{name}"

    async def owner(self, workspace_id: int) -> str | None:
        """The id of the worker holding the workspace's shard, or None."""
        with unavailable("lease lookup"):
            value = await self._client.get(
                self._key(f"shard:{shard_of(workspace_id, self.shards)}"))
        if value is None:
            return None
        text = value if isinstance(value, str) else value.decode()
        return text.rsplit(" ", 1)[0]

    async def call(self, workspace_id: int, *, wait: float = 60.0) -> dict[str, Any]:
        """Ask the owner of ``workspace_id`` to run its handler; its reply, or
        :class:`Unavailable` (no owner now, or no answer in ``wait`` seconds)."""
        owner = await self.owner(workspace_id)
        if owner is None:
            raise Unavailable(f"no counter worker owns workspace {workspace_id} now; retry",
                              retry_after=2)
        reply_key = self._key(f"reply:{random.getrandbits(64):016x}")
        call = msgspec.json.encode({"workspace": workspace_id, "reply": reply_key})
        with unavailable("call"):
            await self._client.rpush(self._key(f"calls:{owner}"), call)
            await self._client.expire(self._key(f"calls:{owner}"), int(wait) + 60)
            item = await self._client.blpop([reply_key], timeout=wait)
        if item is None:
            raise Unavailable(f"counter worker {owner} did not answer in {wait:.0f} s",
                              retry_after=5)
        reply = msgspec.json.decode(item[1])
        if "error" in reply:
            status = int(reply.get("status", 503))
            kind = {404: NotFound, 503: Unavailable}.get(status, LivecountError)
            raise kind(str(reply["error"]))
        return dict(reply["ok"])

    async def close(self) -> None:
        await self._client.aclose()

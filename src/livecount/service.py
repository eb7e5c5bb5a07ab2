"""The running pieces of one livecount process, wired together: store, state, bus, relay.

The HTTP app and the CLI build one :class:`Service` from :class:`Settings` and bracket its
life with ``start()``/``stop()``; everything it starts (threads in the store, the relay's
task, the lease renewals) ends in ``stop()``.

A process plays one of three **roles**: ``all`` (the API and the counting: the embedded
default, one process), ``gateway`` (the API and the streams only: counts and views come from
the shared counter state and bus) or ``worker`` (counting only: ``livecount worker``). A
process that counts against a shared (Redis) counter state does so under leases on shards of
workspaces (:mod:`livecount.leases`), so any number of them can run.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .bus import Bus, open_bus
from .exceptions import Unavailable, ValidationError
from .leases import open_leases
from .leases.redis import Directory, RedisLeases
from .relay import Relay
from .state import CounterState, open_state
from .store import Store, open_store
from .store.base import Teammate
from .tokens import MISSING, TokenCache

__all__ = ["ADMIN", "Caller", "Service", "Settings", "wait_for_position"]

ADMIN_SETTING = "admin_token_sha256"


@dataclass(frozen=True)
class Settings:
    store_url: str
    broker_url: str = "memory://"
    #: how often a connection's conflated changes are flushed (seconds)
    flush_interval: float = 0.05
    #: a connection that cannot take writes for this long is closed (seconds)
    slow_client_timeout: float = 10.0
    #: WebSocket ping / SSE comment period (seconds)
    heartbeat_interval: float = 15.0
    #: the admin token; None: LIVECOUNT_ADMIN_TOKEN, else generated and printed once
    admin_token: str | None = None
    relay_poll_interval: float = 1.0
    #: seconds between two reconciles of a workspace (spread over workspaces); None: never
    reconcile_every: float | None = 300.0
    #: seconds an applied outbox entry is kept before it is pruned; None: kept forever
    outbox_retention: float | None = 24 * 3600.0
    max_body_bytes: int = 1 << 20
    #: resident memory past which /readyz answers 503 (see livecount.memory)
    soft_memory_bytes: int = 1 << 30
    #: resident memory past which the process is recycled (drain, exit, replaced)
    hard_memory_bytes: int = 2 << 30
    #: the memory limit the watermarks derive from, for /metrics (None: detected)
    memory_limit_bytes: int | None = None
    #: stream connections this process admits at once, past it 503 (None: below the fd
    #: limit, see livecount.server.admission.default_max_streams)
    max_streams: int | None = None
    #: stream connections one token may hold open in this process, past it 429 (0: no cap)
    max_streams_per_token: int = 100
    #: seconds a drain waits for stream clients to take their reconnect message and go
    drain_timeout: float = 10.0
    #: "all" (API + counting), "gateway" (API only) or "worker" (counting only)
    role: str = "all"
    #: shards of workspaces the counting processes share (all of them must agree)
    shards: int | None = None
    #: seconds a counting process's lease lasts without renewal (takeover after a crash)
    lease_ttl: float | None = None


async def wait_for_position(state: CounterState, store: Store, workspace_id: int,
                            position: int, wait: float) -> None:
    """Return once the counts of ``workspace_id`` reflect outbox position ``position``
    (read-your-writes), or raise :class:`~livecount.exceptions.Unavailable` after
    ``wait`` seconds; a position no write has reached yet is a
    :class:`~livecount.exceptions.ValidationError`. Polls the state with a short, growing
    delay: it works the same for every backend, and a write's own position is usually
    reached within milliseconds."""
    if await state.position(workspace_id) >= position:
        return
    if position > await store.outbox_position():
        raise ValidationError(f"position {position} is ahead of every write (use the "
                              "Livecount-Position header of a write response)", "after")
    deadline = time.monotonic() + wait
    delay = 0.002
    while await state.position(workspace_id) < position:
        if time.monotonic() >= deadline:
            raise Unavailable(f"the counts do not reflect position {position} yet; retry",
                              retry_after=1)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


@dataclass(frozen=True)
class Caller:
    """Who is calling: a teammate of one workspace, or the admin (teammate None)."""

    teammate: Teammate | None

    @property
    def is_admin(self) -> bool:
        return self.teammate is None

    @property
    def teammate_id(self) -> int | None:
        return None if self.teammate is None else self.teammate.id


ADMIN = Caller(None)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Service:
    settings: Settings
    store: Store = field(init=False)
    state: CounterState = field(init=False)
    bus: Bus = field(init=False)
    #: the relay, in a process that counts (role "all" or "worker"); None in a gateway
    relay: Relay | None = field(init=False)
    #: this process's leases, when it counts against a shared counter state
    leases: RedisLeases | None = field(init=False)
    #: who counts which workspace, to send an admin's reconcile to it (shared state only)
    directory: Directory | None = field(init=False)
    _admin_hash: str = field(init=False, default="")

    def __post_init__(self) -> None:
        settings = self.settings
        if settings.role not in ("all", "gateway", "worker"):
            raise ValidationError(f"unknown role {settings.role!r}", "role")
        if settings.role != "all" and settings.broker_url.startswith("memory:"):
            raise ValidationError(
                f"a {settings.role} needs a shared counter state and bus (--broker "
                "redis://…): with memory:// nobody else would see its counts", "broker")
        self.store = open_store(settings.store_url)
        self.state = open_state(settings.broker_url)
        self.bus = open_bus(settings.broker_url)
        self.relay = None
        self.leases = None
        self.directory = None
        if settings.role != "worker" and settings.broker_url.startswith(("redis", "rediss")):
            from .leases.redis import DEFAULT_SHARDS

            self.directory = Directory(settings.broker_url,
                                       shards=settings.shards or DEFAULT_SHARDS)
        if settings.role != "gateway":
            self.leases = open_leases(settings.broker_url, shards=settings.shards,
                                      ttl=settings.lease_ttl)
            self.relay = Relay(self.store, self.state, self.bus,
                               poll_interval=settings.relay_poll_interval,
                               reconcile_every=settings.reconcile_every,
                               outbox_retention=settings.outbox_retention,
                               ownership=self.leases)
        #: teammate tokens already looked up (see livecount.tokens: revocation waits a TTL)
        self.tokens: TokenCache = TokenCache()

    async def start(self) -> None:
        await self.store.open()
        try:
            if self.settings.role != "worker":
                await self._admin_token()
            relay = self.relay
            if relay is not None:
                if self.leases is not None:
                    await self.leases.start(position=lambda: relay.position)
                await relay.start()
                if self.leases is not None:
                    self.leases.answer(self._reconcile_here)
        except BaseException:
            await self.stop()  # what started stops; the rest closes without having opened
            raise

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
        if self.leases is not None:  # after the relay: given back once it stopped writing
            await self.leases.stop()
        if self.directory is not None:
            await self.directory.close()
        await self.bus.close()
        await self.state.close()
        await self.store.close()

    async def reconcile(self, workspace_id: int) -> dict[str, Any]:
        """Reconcile a workspace where it is counted: here, or by the counter worker that
        owns it (only the owner may repair its counts); the API's answer."""
        relay = self.relay
        if relay is not None and relay.ownership.fence(workspace_id) is not None:
            return await self._reconcile_here(workspace_id)
        if self.directory is None:
            raise Unavailable("no process here counts this workspace", retry_after=1)
        return await self.directory.call(workspace_id)

    async def _reconcile_here(self, workspace_id: int) -> dict[str, Any]:
        assert self.relay is not None
        return (await self.relay.reconcile(workspace_id)).as_json()

    async def _admin_token(self) -> None:
        token = self.settings.admin_token or os.environ.get("LIVECOUNT_ADMIN_TOKEN")
        if token:
            self._admin_hash = token_hash(token)
            return
        stored = await self.store.get_setting(ADMIN_SETTING)
        if stored is None:
            fresh = "lc_admin_" + secrets.token_urlsafe(24)
            stored = await self.store.set_setting_if_absent(ADMIN_SETTING, token_hash(fresh))
            if stored == token_hash(fresh):
                print(f"livecount: generated admin token (shown once): {fresh}",
                      file=sys.stderr, flush=True)
        self._admin_hash = stored

    async def authenticate(self, token: str) -> Caller | None:
        """The caller a bearer token stands for, or None."""
        if not token:
            return None
        if self._admin_hash and hmac.compare_digest(token_hash(token), self._admin_hash):
            return ADMIN
        teammate = self.tokens.get(token)
        if teammate is MISSING:  # a store read only for a token not seen in the last TTL
            teammate = await self.store.authenticate(token)
            self.tokens.put(token, teammate)
        return None if teammate is None else Caller(teammate)

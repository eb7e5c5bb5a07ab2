"""The running pieces of one livecount process, wired together: store, state, bus, relay.

The HTTP app and the CLI build one :class:`Service` from :class:`Settings` and bracket its
life with ``start()``/``stop()``; everything it starts (threads in the store, the relay's
task) ends in ``stop()``.
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

from .bus import Bus, open_bus
from .exceptions import Unavailable, ValidationError
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
    relay: Relay = field(init=False)
    _admin_hash: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.store = open_store(self.settings.store_url)
        self.state = open_state(self.settings.broker_url)
        self.bus = open_bus(self.settings.broker_url)
        self.relay = Relay(self.store, self.state, self.bus,
                           poll_interval=self.settings.relay_poll_interval,
                           reconcile_every=self.settings.reconcile_every,
                           outbox_retention=self.settings.outbox_retention)
        #: teammate tokens already looked up (see livecount.tokens: revocation waits a TTL)
        self.tokens: TokenCache = TokenCache()

    async def start(self) -> None:
        await self.store.open()
        try:
            await self._admin_token()
            await self.relay.start()
        except BaseException:
            await self.store.close()
            raise

    async def stop(self) -> None:
        await self.relay.stop()
        await self.bus.close()
        await self.state.close()
        await self.store.close()

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

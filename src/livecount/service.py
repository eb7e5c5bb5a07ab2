"""The running pieces of one livecount process, wired together: store, state, bus, relay.

The HTTP app and the CLI build one :class:`Service` from :class:`Settings` and bracket its
life with ``start()``/``stop()``; everything it starts (threads in the store, the relay's
task) ends in ``stop()``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass, field

from .bus import Bus, open_bus
from .relay import Relay
from .state import CounterState, open_state
from .store import Store, open_store
from .store.base import Teammate

__all__ = ["ADMIN", "Caller", "Service", "Settings"]

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
    max_body_bytes: int = 1 << 20
    soft_memory_bytes: int = 1 << 30
    hard_memory_bytes: int = 2 << 30


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
                           poll_interval=self.settings.relay_poll_interval)

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
        teammate = await self.store.authenticate(token)
        return None if teammate is None else Caller(teammate)

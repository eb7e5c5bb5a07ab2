"""In-process bus: a ring buffer per workspace and bounded queues per subscriber."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

from .base import BusMessage, Overflow

__all__ = ["MemoryBus", "MemorySubscription"]


class _Unsubscribes(Protocol):
    def _unsubscribe(self, subscription: Any) -> None: ...


class MemorySubscription:
    """A bounded queue. When it is full the backlog is dropped and the reader gets
    :class:`Overflow` — a slow reader costs at most ``maxsize`` messages of memory. The
    Redis bus's subscriptions are these too (filled by its reader task)."""

    def __init__(self, bus: _Unsubscribes, workspace_id: int, maxsize: int) -> None:
        self._bus = bus
        self.workspace_id = workspace_id
        self._queue: asyncio.Queue[BusMessage | None] = asyncio.Queue(maxsize + 1)
        self._maxsize = maxsize
        self.overflowed = False
        self.closed = False

    def _offer(self, message: BusMessage) -> None:
        if self.overflowed or self.closed:
            return
        if self._queue.qsize() >= self._maxsize:
            self._overflow()
            return
        self._queue.put_nowait(message)

    def _overflow(self) -> None:
        """Drop the backlog: the reader's next message is :class:`Overflow` (resync)."""
        if self.overflowed or self.closed:
            return
        self.overflowed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)  # wake the reader

    def __aiter__(self) -> MemorySubscription:
        return self

    async def __anext__(self) -> BusMessage:
        if self.closed:
            raise StopAsyncIteration
        message = await self._queue.get()
        if message is None:
            if self.overflowed:
                self.overflowed = False
                raise Overflow(f"subscriber fell more than {self._maxsize} messages behind, "
                               "or the bus lost messages")
            raise StopAsyncIteration
        return message

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._unsubscribe(self)
            if self._queue.empty():
                self._queue.put_nowait(None)


class MemoryBus:
    def __init__(self, ring_size: int = 1024) -> None:
        self._ring_size = ring_size
        self._rings: dict[int, deque[BusMessage]] = {}
        self._subscribers: dict[int, set[MemorySubscription]] = {}

    async def publish(self, message: BusMessage) -> None:
        ring = self._rings.get(message.workspace_id)
        if ring is None:
            ring = self._rings[message.workspace_id] = deque(maxlen=self._ring_size)
        if not ring or ring[-1].epoch != message.epoch or ring[-1].seq < message.seq:
            ring.append(message)  # (not a retried publish of a message already there)
        for subscription in list(self._subscribers.get(message.workspace_id, ())):
            subscription._offer(message)

    def subscribe(self, workspace_id: int, maxsize: int = 1024) -> MemorySubscription:
        subscription = MemorySubscription(self, workspace_id, maxsize)
        self._subscribers.setdefault(workspace_id, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: MemorySubscription) -> None:
        subscribers = self._subscribers.get(subscription.workspace_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.workspace_id]

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    async def since(self, workspace_id: int, epoch: str, seq: int) -> list[BusMessage] | None:
        ring = self._rings.get(workspace_id)
        if not ring or ring[-1].epoch != epoch:
            return None
        if seq >= ring[-1].seq:
            return [] if seq == ring[-1].seq else None
        out: list[BusMessage] = []
        expected = seq + 1
        for message in reversed(ring):  # newest first: stop at the first gap or foreign one
            if message.epoch != epoch or message.kind == "reset":
                return None
            if message.seq <= seq:
                break
            out.append(message)
        out.reverse()
        for message in out:
            if message.seq != expected:
                return None  # a message was lost (or collapsed into a reset)
            expected += 1
        return out if out and out[-1].seq == ring[-1].seq else None

    async def close(self) -> None:
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.close()
        self._rings.clear()

"""Bus over Redis Streams: one stream per workspace, read by every gateway on any host.

Key layout (``P`` is the URL's ``prefix``; see :mod:`livecount.state.redis` for the rest)::

    P{ws:N}:stream   STREAM capped with XADD MAXLEN ~ stream_maxlen (default 1024, like the
                     memory ring; "~": Redis trims whole nodes, so it holds a little more)
        e  epoch     s  seq     k  kind ("delta" | "views" | "reset")
        m  the whole message, JSON (msgspec): its fields by name, ``counts`` as
           [[view, group, teammate, value], ...]

**Publish** is one Lua script: it appends the message unless the stream's newest entry
already has the same epoch and a seq at least as high (a publish retried after a lost reply,
the memory ring's rule), so duplicates never reach the stream and ``since`` stays
contiguous (it also skips any duplicate it meets, should one get there another way).

**Since** walks the stream newest first (XREVRANGE, in growing chunks) down to ``seq``, with
the memory bus's rules: messages after ``seq`` of that epoch only when they form a gap-free
run up to the newest, none a reset; else None.

**Reading**: ONE reader task per bus (so per gateway process) and one connection of its own
block on ``XREAD BLOCK`` over the streams of every workspace that has a subscription, from
the last id read of each, and fan the messages out to the subscriptions' bounded queues (a
subscription overflows exactly like :class:`~livecount.bus.memory.MemorySubscription`).
A subscription to a workspace not read yet makes a small waker task send ``CLIENT UNBLOCK``
to the reader's connection, so the reader re-issues its XREAD with the new stream at once
(where CLIENT UNBLOCK is refused, the ``block_ms`` timeout bounds the delay instead).

Where a new workspace's stream starts: ``subscribe`` cannot ask Redis (it is synchronous),
so the subscription records when it was made, and the reader starts that stream at the
Redis clock of that instant (from ``TIME`` and the monotonic clock) minus a margin. So a
subscription gets every message published after ``subscribe()`` returned, and possibly a
few published shortly before (a reader skips them by seq, as a hub does). A subscription to
a workspace already read joins at the reader's position.

**Failures**: a Redis error in the reader is logged and retried with backoff (the reader
never dies while the bus is open). Once it reads again, it checks each stream: a stream
that was trimmed past the reader's position, deleted (FLUSHDB, a restart without
persistence) or recreated behind it may have lost messages, and its subscriptions get
:class:`~livecount.bus.base.Overflow` so their hubs resync from a snapshot. Otherwise
nothing was lost and the reader goes on where it was. (A reader that falls more than
``stream_maxlen`` messages behind while connected skips the trimmed ones: its readers see
the seq gap and resync, as DESIGN §4 has them do.)

Redis Cluster: the publish script and ``since`` touch one key each, in the workspace's slot.
The reader's single XREAD over many streams needs them in one slot, so on a cluster the
reader would have to issue one XREAD per node (not implemented: standalone Redis or one
primary per shard of workspaces).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import msgspec
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from ..exceptions import Unavailable
from ..state.redis import parse_redis_url, redis_client, unavailable
from .base import BusMessage
from .memory import MemorySubscription

__all__ = ["RedisBus", "RedisSubscription"]

log = logging.getLogger("livecount.bus")

#: Entries one XREAD takes per stream.
READ_COUNT: Final = 512
#: How far before a subscription's instant (by the Redis clock) its stream starts, on top of
#: the measured round trip (milliseconds).
START_MARGIN_MS: Final = 50
#: Reader back-off after a Redis error (seconds): first, largest.
BACKOFF: Final = (0.05, 2.0)

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder(dict[str, Any]).decode


def _encode(message: BusMessage) -> bytes:
    """Every field of the message, as JSON; ``counts`` as a list (JSON has no tuple keys).
    JSON rather than msgpack: a view's filter may hold integers beyond 64 bits."""
    fields = msgspec.structs.asdict(message)
    fields["counts"] = [(v, g, t, n) for (v, g, t), n in message.counts.items()]
    return _encode_json(fields)


def _decode(payload: bytes) -> BusMessage:
    fields = _decode_json(payload)
    fields["counts"] = {(v, g, t): n for v, g, t, n in fields["counts"]}
    return msgspec.convert(fields, BusMessage)


_PUBLISH: Final = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local f = last[2]
  local epoch, seq
  for i = 1, #f, 2 do
    if f[i] == 'e' then epoch = f[i + 1] elseif f[i] == 's' then seq = f[i + 1] end
  end
  if epoch == ARGV[1] and tonumber(seq) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
           'e', ARGV[1], 's', ARGV[2], 'k', ARGV[3], 'm', ARGV[5])
return 1
"""


def _id_bytes(entry_id: bytes | str) -> bytes:
    return entry_id if isinstance(entry_id, bytes) else entry_id.encode()


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisSubscription(MemorySubscription):
    """The memory bus's bounded queue, filled by the Redis bus's reader task; ``since``: when
    it subscribed (monotonic), where a new stream starts reading."""

    def __init__(self, bus: RedisBus, workspace_id: int, maxsize: int) -> None:
        super().__init__(bus, workspace_id, maxsize)
        self.since = time.monotonic()


class _Stream:
    """A workspace stream the reader follows, and its subscriptions."""

    __slots__ = ("cursor", "delivered", "key", "since", "subscriptions", "workspace_id")

    def __init__(self, workspace_id: int, key: bytes, since: float) -> None:
        self.workspace_id = workspace_id
        self.key = key
        self.subscriptions: set[RedisSubscription] = set()
        self.since = since  # when the first subscription was made (monotonic)
        self.cursor: bytes | None = None  # the id read up to; None: not started yet
        self.delivered = False  # whether ``cursor`` is an entry read (not a start estimate)


class RedisBus:
    """Streams in Redis; see the module docstring. Tasks start with the first
    :meth:`subscribe`; :meth:`close` ends them and closes every connection."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self.options = parse_redis_url(url)
        self.maxlen = self.options.stream_maxlen
        self.block_ms = self.options.block_ms
        self._client = redis_client(self.options)
        # the reader's own connection: no silent retry (it must see every reconnect) and a
        # read timeout longer than its BLOCK
        self._reader = redis_client(self.options, max_connections=1,
                                    retry=Retry(NoBackoff(), 0),
                                    socket_timeout=self.block_ms / 1000 + 10,
                                    client_name="livecount-bus-reader")
        self._publish = self._client.register_script(_PUBLISH)
        self._streams: dict[int, _Stream] = {}
        self._generation = 0  # bumped when a stream is added
        self._reading: int | None = None  # the generation of the XREAD in flight
        self._reader_id: int | None = None  # CLIENT ID of the reader's connection
        self._can_unblock = True
        self._wake_reader = asyncio.Event()  # wakes an idle reader (no stream to read)
        self._added = asyncio.Event()  # wakes the waker (a stream to add to the XREAD)
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()  # set (and replaced) after each batch is dispatched
        self.closed = False
        #: reader failures and messages skipped as undecodable (for tests and metrics)
        self.errors = 0
        self.overflows = 0

    def key(self, workspace_id: int) -> str:
        return self.options.key(workspace_id, "stream")

    # -- publishing and resuming --------------------------------------------------------------

    async def publish(self, message: BusMessage) -> None:
        args: list[bytes | str] = [message.epoch, str(message.seq), message.kind,
                                   str(self.maxlen), _encode(message)]
        with unavailable("publish"):
            await self._publish(keys=[self.key(message.workspace_id)], args=args)

    async def since(self, workspace_id: int, epoch: str, seq: int) -> list[BusMessage] | None:
        key = self.key(workspace_id)
        wanted = epoch.encode()
        newest: int | None = None
        kept: list[tuple[int, bytes]] = []
        upper: bytes | str = "+"
        count = 64
        with unavailable("since"):
            done = False
            while not done:
                batch: Any = await self._client.xrevrange(key, upper, "-", count=count)
                done = len(batch) < count  # the oldest entry is in this batch
                for _, fields in batch:
                    entry_seq = int(fields[b"s"])
                    if newest is None:
                        if fields[b"e"] != wanted:
                            return None
                        if seq >= entry_seq:
                            return [] if seq == entry_seq else None
                        newest = entry_seq
                    if fields[b"e"] != wanted or fields[b"k"] == b"reset":
                        return None
                    if entry_seq <= seq:
                        done = True
                        break
                    if kept and entry_seq >= kept[-1][0]:
                        continue  # a duplicate (or stray older copy): the first one counts
                    kept.append((entry_seq, fields[b"m"]))
                if batch:
                    upper = b"(" + batch[-1][0]
                    count = min(count * 4, 1024)
        if newest is None:
            return None
        kept.reverse()
        if [s for s, _ in kept] != list(range(seq + 1, newest + 1)):
            return None  # trimmed past ``seq``, or a message was lost (collapsed into a reset)
        return [_decode(payload) for _, payload in kept]

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, workspace_id: int, maxsize: int = 1024) -> RedisSubscription:
        subscription = RedisSubscription(self, workspace_id, maxsize)
        if self.closed:
            subscription.close()
            return subscription
        stream = self._streams.get(workspace_id)
        if stream is None:
            stream = self._streams[workspace_id] = _Stream(
                workspace_id, self.key(workspace_id).encode(), subscription.since)
            self._generation += 1
            self._added.set()
            self._wake_reader.set()
        stream.subscriptions.add(subscription)
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._read_loop(), name="livecount-bus-reader"),
                           asyncio.create_task(self._wake_loop(), name="livecount-bus-waker")]
        return subscription

    def _unsubscribe(self, subscription: RedisSubscription) -> None:
        stream = self._streams.get(subscription.workspace_id)
        if stream is not None:
            stream.subscriptions.discard(subscription)
            if not stream.subscriptions:
                del self._streams[subscription.workspace_id]

    def subscriber_count(self) -> int:
        return sum(len(s.subscriptions) for s in self._streams.values())

    async def sync(self) -> None:
        """Return once the reader has handed out every message published (to a subscribed
        workspace) before the call: tests use it to read a subscription's backlog."""
        streams = list(self._streams.values())
        with unavailable("sync"):
            async with self._client.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xrevrange(stream.key, "+", "-", count=1)
                lasts = await pipe.execute()
        targets = [(stream, _parse_id(last[0][0])) for stream, last in zip(streams, lasts,
                                                                          strict=True) if last]
        while any(self._streams.get(s.workspace_id) is s
                  and (s.cursor is None or _parse_id(s.cursor) < target)
                  for s, target in targets):
            if not self._tasks or self.closed:
                return
            async with asyncio.timeout(self.block_ms / 1000 + 10):
                await self._synced.wait()

    # -- the reader -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = BACKOFF[0]
        failed = False
        while not self.closed:
            if not self._streams:
                self._wake_reader.clear()
                await self._wake_reader.wait()
                continue
            try:
                with unavailable("read"):
                    if self._reader_id is None:
                        self._reader_id = int(await self._reader.client_id())
                    if failed:
                        await self._recover()
                        failed = False
                    if any(s.cursor is None for s in self._streams.values()):
                        await self._start_streams()
                    self._reading = self._generation
                    streams = {s.key: s.cursor for s in self._streams.values()}
                    reply = await self._reader.xread(
                        streams, count=READ_COUNT, block=self.block_ms)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Unavailable, or anything unexpected: never die
                self._reading = self._reader_id = None
                if self.closed:
                    return
                self.errors += 1
                failed = True
                log.warning("reading the Redis bus failed (%s); retrying in %.2fs",
                            exc.__cause__ or exc, backoff, exc_info=not isinstance(
                                exc, Unavailable))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF[1])
                continue
            finally:
                self._reading = None
            backoff = BACKOFF[0]
            if reply:
                self._dispatch(reply)
            self._synced.set()
            self._synced = asyncio.Event()

    def _dispatch(self, reply: Any) -> None:
        by_key = {s.key: s for s in self._streams.values()}
        for key, entries in reply:
            stream = by_key.get(key)
            if stream is None:
                continue  # unsubscribed meanwhile
            for entry_id, fields in entries:
                stream.cursor, stream.delivered = entry_id, True
                try:
                    message = _decode(fields[b"m"])
                except Exception as exc:  # a malformed entry must not stop the reader
                    self.errors += 1
                    log.error("bus entry %s of %s cannot be decoded (%s); its readers resync",
                              entry_id, key, exc)
                    self._overflow(stream)
                    continue
                for subscription in list(stream.subscriptions):
                    subscription._offer(message)

    async def _start_streams(self) -> None:
        """Start the streams not read yet at the Redis clock of their first subscription's
        instant (minus a margin): nothing published after ``subscribe()`` is missed."""
        before = time.monotonic()
        seconds, micros = await self._reader.time()
        after = time.monotonic()
        now_ms = seconds * 1000 + micros // 1000
        for stream in self._streams.values():
            if stream.cursor is None:
                age_ms = (after - stream.since) * 1000 + (after - before) * 1000
                start = max(0, now_ms - int(age_ms) - START_MARGIN_MS)
                stream.cursor = f"{start}-0".encode()

    async def _recover(self) -> None:
        """After a failure: overflow the subscriptions of every stream that may have lost
        messages meanwhile; the others go on from where they were."""
        streams = [s for s in self._streams.values() if s.cursor is not None]
        async with self._reader.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_stream(stream.key)
            replies = await pipe.execute(raise_on_error=False)
        for stream, info in zip(streams, replies, strict=True):
            if isinstance(info, ResponseError):  # no such key
                info = None
            elif isinstance(info, BaseException):
                raise info
            assert stream.cursor is not None
            cursor = _parse_id(stream.cursor)
            if info is None:
                lost = stream.delivered  # a stream that held what we read is gone
            elif stream.delivered and _parse_id(info["last-generated-id"]) < cursor:
                lost = True  # recreated behind us (an undelivered cursor is only a clock
                # estimate, ahead of a quiet stream's last id: nothing was lost there)
            else:
                first = info.get("first-entry")
                trimmed = int(info.get("entries-added", -1)) - int(info.get("length", 0))
                lost = (first is not None and _parse_id(first[0]) > cursor
                        and (trimmed != 0 or stream.delivered))
            if lost:
                log.warning("the Redis bus may have lost messages of %s; its %d readers "
                            "resync", stream.key.decode(), len(stream.subscriptions))
                self._overflow(stream)
                if info is not None:  # they resync from a snapshot: go on from the newest
                    stream.cursor = _id_bytes(info["last-generated-id"])

    def _overflow(self, stream: _Stream) -> None:
        for subscription in list(stream.subscriptions):
            subscription._overflow()
            self.overflows += 1

    async def _wake_loop(self) -> None:
        """Interrupt the reader's XREAD (CLIENT UNBLOCK) when a stream was added, so it
        reads the new one at once."""
        while True:
            await self._added.wait()
            self._added.clear()
            for _ in range(50):
                reading, reader_id = self._reading, self._reader_id
                if (not self._can_unblock or reading is None or reader_id is None
                        or reading == self._generation):
                    break
                try:
                    with unavailable("CLIENT UNBLOCK"):
                        if await self._client.client_unblock(reader_id):
                            break
                except Unavailable as exc:
                    if isinstance(exc.__cause__, ResponseError):
                        self._can_unblock = False
                        log.warning("CLIENT UNBLOCK refused (%s): a new subscription waits up "
                                    "to %d ms for the bus reader", exc.__cause__, self.block_ms)
                    break  # else the reader's own failure handling takes over
                await asyncio.sleep(0.001)  # the XREAD has not reached the server yet

    # -- life cycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        self.closed = True
        for stream in list(self._streams.values()):
            for subscription in list(stream.subscriptions):
                subscription.close()
        self._streams.clear()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=0.05)
            if pending:  # blocked in a read: closing its connection ends the XREAD now
                await self._reader.connection_pool.disconnect()
                _, pending = await asyncio.wait(pending, timeout=5)
                if pending:
                    log.error("the Redis bus reader did not stop: %r", pending)
        try:
            await self._reader.aclose()
        finally:
            await self._client.aclose()

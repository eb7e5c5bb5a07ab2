"""One hub per workspace with live stream connections, and each connection's conflation state.

A hub holds ONE bus subscription and the workspace's current (decomposed) counts and views,
applied from the bus in seq order. It does not push messages to connections: it records, per
connection, *what* changed since that connection's last send, and wakes the connection's own
writer, which renders current values when it gets to send. So whatever the event rate, a
connection costs at most one pending key per counter it can see, one pre-rendered message,
and two flags; a slow client never makes the hub wait or grow.

The common case is cheap: at each tick (at most every ``flush_interval``) the hub renders the
changed counters once per teammate and hands the same encoded message to every connection of
that teammate that has nothing else pending.

Ordering per connection: ``views`` messages come before any delta that mentions a new view;
every delta carries the hub's seq at the moment its values were read, so the seqs one
connection receives never decrease and after applying a message the client holds the hub's
counts at that seq.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import anyio
import msgspec

from ..bus.base import BusMessage, Overflow
from ..service import Service
from ..store.base import Counts, View
from ..views import Rendered, render_counts, render_keys, view_to_wire, visible_views
from .metrics import LagHistogram

__all__ = ["CounterKey", "Hub", "Payload", "Stream"]

log = logging.getLogger("livecount.gateway")

#: (view id, group or None): a counter as a client sees it (base + its own adjustment).
CounterKey = tuple[int, str | None]

#: How long a resync waits for a counter state that lost its data to be recounted.
RECOUNT_WAIT: Final = 30.0
#: Bus messages a hub may have waiting; past it the bus drops the backlog and the hub
#: resyncs every connection from a fresh state snapshot.
SUBSCRIPTION_SIZE: Final = 1024

_encode = msgspec.json.Encoder().encode


class Payload:
    """One encoded stream message, shared by every connection that sends the same bytes.

    The transports ask for the form they need (WebSocket text, SSE event); each is built at
    most once per payload however many connections send it.
    """

    __slots__ = ("_chunk", "_frame", "_sse", "_text", "body", "event_id", "retry")

    def __init__(self, message: dict[str, Any], event_id: str | None = None,
                 retry: int | None = None) -> None:
        self.body = _encode(message)
        self.event_id = event_id  # the SSE ``id:`` (snapshots and deltas): ``epoch:seq``
        self.retry = retry  # the SSE ``retry:`` (reconnect)
        self._text: str | None = None
        self._sse: bytes | None = None
        self._frame: bytes | None = None
        self._chunk: bytes | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.body.decode()
        return self._text

    @property
    def frame(self) -> bytes:
        """The WebSocket text frame carrying it (unmasked: server to client, RFC 6455
        §5.2), written as is to every connection that sends it."""
        if self._frame is None:
            body = self.body
            n = len(body)
            if n < 126:
                head = b"\x81" + bytes((n,))
            elif n < 1 << 16:
                head = b"\x81\x7e" + struct.pack("!H", n)
            else:
                head = b"\x81\x7f" + struct.pack("!Q", n)
            self._frame = head + body
        return self._frame

    @property
    def sse_chunk(self) -> bytes:
        """The SSE event as one HTTP/1.1 chunk (``Transfer-Encoding: chunked``)."""
        if self._chunk is None:
            event = self.sse
            self._chunk = b"%x\r\n" % len(event) + event + b"\r\n"
        return self._chunk

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            head = b""
            if self.event_id is not None:
                head += b"id: " + self.event_id.encode() + b"\n"
            if self.retry is not None:
                head += b"retry: %d\n" % self.retry
            self._sse = head + b"data: " + self.body + b"\n\n"
        return self._sse


class Stream:
    """One connection's place in its hub: what to send next, and the loop that sends it.

    Everything the hub does to it is synchronous (no await), so the state below is always
    consistent when the writer looks at it. Bounded by construction:

    - ``pending``: (view, group) counters changed since the last send that this teammate can
      see — a set, so at most one entry per visible counter whatever the write rate;
    - ``ready``: at most one pre-rendered delta (shared with other connections); a second
      tick before it is sent folds it back into ``pending``;
    - ``new_views``: ids of views this teammate sees that it has not had counts for yet;
    - flags: ``resync`` (send a snapshot), ``views_dirty`` (send the view list; only the
      latest list is ever sent), ``ack`` (send a delta even if empty: a resume's answer).

    The transport subclass implements :meth:`send` (and :meth:`ping` when it has an
    app-level heartbeat).
    """

    __slots__ = ("_hold", "_paused", "_waiter", "ack", "closing", "hub", "lag_since", "new_views",
                 "outcome", "pending", "ready", "ready_keys", "resync", "scope", "sending_since",
                 "teammate", "views_dirty")

    #: seconds between app-level heartbeats when idle; None: the transport has its own
    heartbeat: float | None = None

    def __init__(self, teammate: int | None) -> None:
        self.teammate = teammate
        self.hub: Hub | None = None
        # a future only while the writer waits (lighter than an Event: streams are many)
        self._waiter: asyncio.Future[None] | None = None
        self.pending: set[CounterKey] | None = None
        self.ready: Payload | None = None
        self.ready_keys: frozenset[CounterKey] = frozenset()
        self.new_views: set[int] | None = None
        self.resync = False
        self.views_dirty = False
        self.ack = False
        self._hold = True  # until the stream decides snapshot or resume: collect keys only
        self._paused = False  # a directly written stream whose transport is paused
        self.closing: Payload | None = None
        #: why the stream ended: "disconnected", "slow", "drained", "closed"
        self.outcome = ""
        #: monotonic time the current send started, 0.0 when not sending (the gateway's
        #: watchdog closes connections stuck in a send for ``slow_client_timeout``)
        self.sending_since = 0.0
        #: monotonic time the hub received the oldest change offered and not sent yet (0.0:
        #: none), for the stream delivery histogram
        self.lag_since = 0.0
        self.scope: anyio.CancelScope | None = None

    # -- the transport ----------------------------------------------------------------------

    async def send(self, payload: Payload) -> None:
        raise NotImplementedError

    async def ping(self) -> None:
        """An app-level heartbeat (only called when :attr:`heartbeat` is set)."""

    # -- writing directly (see .direct): no task, the hub's tick writes -----------------------

    def _write(self, payload: Payload) -> None:
        raise NotImplementedError

    def _blocked(self) -> bool:
        """Whether nothing can be written now (paused, closing, ended)."""
        return self._paused

    def write_now(self) -> bool:
        """Write what the hub marked, synchronously, until nothing is left or the transport
        blocks; True when the closing message (a reconnect) went out."""
        since = self.lag_since
        wrote = closed = False
        while not self._blocked():
            payloads = self.take()
            if not payloads:
                break
            for payload in payloads:
                self._write(payload)
            wrote = True
            if self.closing is not None and payloads[-1] is self.closing:
                closed = True
                break
        if wrote:
            self.lag_since = 0.0
            hub = self.hub
            if since and hub is not None and hub.delivery is not None:
                hub.delivery.observe(time.monotonic() - since)
        return closed

    def paused(self) -> None:
        """The transport's buffer is full: keep what is owed (bounded) until it drains."""
        self._paused = True
        self.sending_since = time.monotonic()

    def resumed(self) -> None:
        self._paused = False
        self.sending_since = 0.0
        self.wake()

    def watch(self, now: float) -> None:
        """Called by the gateway's watchdog about once a second (a stream written to
        directly sends its own heartbeats from here)."""

    # -- what the hub does (synchronous) ----------------------------------------------------

    def offer(self, keys: frozenset[CounterKey], payload: Callable[[], Payload]) -> None:
        """Counters this connection sees changed; ``payload()`` renders them once for every
        connection of the same teammate."""
        if self.resync or self.closing is not None:
            return  # the snapshot (or nothing) that comes next covers them
        if (self.ready is None and not self.pending and not self.views_dirty
                and not self._hold and not self.ack):
            self.ready = payload()
            self.ready_keys = keys
        else:
            self._fold()
            if self.pending is None:
                self.pending = set(keys)
            else:
                self.pending |= keys
        self.wake()

    def views_changed(self, new_views: Iterable[int]) -> None:
        """The views this teammate sees changed; ``new_views``: ones it needs full counts of
        (added, or grouped differently)."""
        if self.closing is not None:
            return
        self.views_dirty = True
        if not self.resync:
            self._fold()
            fresh = set(new_views)
            if fresh:
                self.new_views = fresh if self.new_views is None else self.new_views | fresh
        self.wake()

    def start_over(self, views_dirty: bool = False) -> None:
        """Forget what is pending: the next message is a snapshot (after the view list when
        ``views_dirty``)."""
        if self.closing is not None:
            return
        self.resync = True
        self.views_dirty = self.views_dirty or views_dirty
        self._hold = False
        self.ack = False
        self.pending = self.new_views = None
        self.ready = None
        self.ready_keys = frozenset()
        self.wake()

    def resume(self, keys: Iterable[CounterKey]) -> None:
        """Answer a resume: ONE delta with the current value of ``keys`` (and of anything
        that changed meanwhile), sent even when it is empty."""
        self._hold = False
        self.ack = True
        self._fold()
        self.pending = set(keys) if self.pending is None else self.pending.union(keys)
        self.wake()

    def close(self, payload: Payload) -> None:
        """Send ``payload`` (a reconnect) next, then end; nothing else is sent."""
        if self.closing is None:
            self.closing = payload
            self.pending = self.new_views = None
            self.ready = None
            self.wake()

    def kick(self, outcome: str) -> None:
        """End the stream now, from outside its task (slow client, drain timeout)."""
        if not self.outcome:
            self.outcome = outcome
        if self.scope is not None:
            self.scope.cancel()

    def wake(self) -> None:
        """Make the writer look at the state again (it takes everything there is)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fold(self) -> None:
        if self.ready is not None:
            if self.pending is None:
                self.pending = set(self.ready_keys)
            else:
                self.pending |= self.ready_keys
            self.ready = None
            self.ready_keys = frozenset()

    @property
    def buffered(self) -> int:
        """How many things wait to be sent (counters, views, messages): bounded by the
        number of counters this teammate sees plus a few."""
        return (len(self.pending or ()) + len(self.new_views or ()) + (self.ready is not None)
                + self.resync + self.views_dirty + (self.closing is not None))

    # -- the writer -------------------------------------------------------------------------

    def take(self) -> list[Payload]:
        """What to send now, rendered from the hub's current counts (no await: consistent)."""
        if self.closing is not None:
            return [self.closing]
        hub = self.hub
        if hub is None or self._hold:
            return []
        me = self.teammate
        out: list[Payload] = []
        if self.resync:
            if self.views_dirty:
                out.append(hub.views_payload(me))
            out.append(hub.snapshot_payload(me))
            self.resync = self.views_dirty = self.ack = False
            self.pending = self.new_views = None
            self.ready = None
            return out
        if self.views_dirty:
            out.append(hub.views_payload(me))
            self._fold()
        elif self.ready is not None:
            out.append(self.ready)
            self.ready = None
            self.ready_keys = frozenset()
            return out
        if self.pending or self.new_views or self.ack:
            delta = hub.delta_payload(me, self.pending or (), self.new_views or (), self.ack)
            if delta is not None:
                out.append(delta)
        self.views_dirty = self.ack = False
        self.pending = self.new_views = None
        return out

    async def pump(self) -> None:
        """Send what the hub marks, until closed (returns) or cancelled (by the caller's
        task group, the watchdog or a drain timeout)."""
        while True:
            payloads = self.take()
            if not payloads:
                # no await between take() and here: no wake-up can be missed
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    if self.heartbeat is None:
                        await self._waiter
                        continue
                    with anyio.move_on_after(self.heartbeat) as idle:
                        await self._waiter
                finally:
                    self._waiter = None
                if idle.cancelled_caught:
                    await self._timed(self.ping())
                continue
            since, self.lag_since = self.lag_since, 0.0
            for payload in payloads:
                await self._timed(self.send(payload))
            hub = self.hub
            if since and hub is not None and hub.delivery is not None:
                hub.delivery.observe(time.monotonic() - since)
            if self.closing is not None and payloads[-1] is self.closing:
                self.outcome = self.outcome or "drained"
                return

    async def _timed(self, sending: Awaitable[None]) -> None:
        self.sending_since = time.monotonic()
        try:
            await sending
        finally:
            self.sending_since = 0.0


class Hub:
    """The live counts and views of one workspace, fanned out to its streams.

    :meth:`run` is the hub's task (owned by the gateway): it subscribes to the bus, THEN
    reads the state snapshot (messages published in between are queued and skipped by seq),
    and follows the bus; a child task ticks the fan-out at most every ``flush_interval``.
    """

    def __init__(self, service: Service, workspace_id: int, flush_interval: float) -> None:
        self.service = service
        self.workspace_id = workspace_id
        self.flush_interval = flush_interval
        self.streams: set[Stream] = set()
        self.counts: Counts = {}
        self.epoch = ""
        self.seq = 0
        self.views: dict[int, View] = {}
        #: the hub's seq when it last saw the views change (a resume from at or before it
        #: cannot trust the client's view list)
        self.views_seq = -1
        self.task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()
        self.failed: BaseException | None = None
        #: where delivery times go (the gateway's histogram), and the monotonic time the
        #: oldest change not yet handed to the streams was received from the bus
        self.delivery: LagHistogram | None = None
        self._received = 0.0
        self._dirty: set[tuple[int, str | None, int | None]] = set()
        self._tick = asyncio.Event()
        self._advanced = asyncio.Event()  # set (and replaced) each time the seq moves
        self._snapshots: dict[int | None, Payload] = {}
        self._view_lists: dict[int | None, Payload] = {}

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        subscription = self.service.bus.subscribe(self.workspace_id, SUBSCRIPTION_SIZE)
        try:
            try:
                await self._load()
            except Exception as exc:
                self.failed = exc
                log.exception("stream hub of workspace %d could not start", self.workspace_id)
                return
            finally:
                self.loaded.set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ticker)
                while True:
                    try:
                        async for message in subscription:
                            if self._continues(message):
                                self._on_message(message)
                            elif message.epoch != self.epoch or message.seq > self.seq:
                                await self._resync()
                        break  # the bus closed: the service is stopping
                    except Overflow:
                        log.warning("stream hub of workspace %d fell behind the bus; "
                                    "resyncing its %d streams", self.workspace_id,
                                    len(self.streams))
                        await self._resync()
                tg.cancel_scope.cancel()
            self._end("stream unavailable")
        except Exception:
            log.exception("stream hub of workspace %d failed", self.workspace_id)
            self._end("internal error")
        finally:
            subscription.close()

    async def _load(self, *, recounted: bool = False) -> None:
        snapshot = await self.service.state.snapshot(self.workspace_id)
        if recounted:
            # The counter state lost its data (a new epoch, nothing counted in it yet: no
            # views, position 0): keep the streams on the counts they have until a counter
            # worker has recounted, rather than show every view gone (bounded wait).
            delay, deadline = 0.02, time.monotonic() + RECOUNT_WAIT
            while (not snapshot.views and snapshot.position == 0
                   and time.monotonic() < deadline):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                snapshot = await self.service.state.snapshot(self.workspace_id)
        self.counts = dict(snapshot.counts)
        self.epoch = snapshot.epoch
        self._advance(snapshot.seq)
        self.views = {v.id: v for v in snapshot.views}

    def _advance(self, seq: int) -> None:
        self.seq = seq
        self._snapshots.clear()
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _continues(self, message: BusMessage) -> bool:
        """Whether ``message`` follows what the hub holds without a gap: same epoch, the next
        seq (or an older one, already included), and not a reset."""
        return message.epoch == self.epoch and (
            message.seq <= self.seq or (message.seq == self.seq + 1
                                        and message.kind != "reset"))

    @property
    def event_id(self) -> str:
        return f"{self.epoch}:{self.seq}"

    async def reach(self, seq: int, epoch: str | None = None) -> None:
        """Return once the hub has applied the bus up to ``seq`` (of ``epoch``: another
        epoch is never reached)."""
        while self.seq < seq and (epoch is None or epoch == self.epoch):
            await self._advanced.wait()

    async def _resync(self) -> None:
        """After the bus dropped messages: counts from a fresh snapshot, a snapshot (and the
        view list where it changed) to every stream."""
        old = self.views
        await self._load(recounted=bool(old))
        self._dirty.clear()
        self._invalidate(views=True)
        touched = self._touched(old, self.views)
        for stream in self.streams:
            stream.start_over(views_dirty=self._concerns(touched, old, stream.teammate))

    def _end(self, reason: str) -> None:
        payload = Payload({"type": "reconnect", "reason": reason, "retry_ms": 1000}, retry=1000)
        for stream in self.streams:
            stream.close(payload)

    async def _ticker(self) -> None:
        while True:
            await self._tick.wait()
            self._tick.clear()
            self.distribute()
            await anyio.sleep(self.flush_interval)

    # -- applying the bus -------------------------------------------------------------------

    def _on_message(self, message: BusMessage) -> None:
        if message.seq > self.seq:
            for key, value in message.counts.items():
                if value:
                    self.counts[key] = value
                else:
                    self.counts.pop(key, None)
                self._dirty.add(key)
            self._advance(message.seq)
            at = time.monotonic()
            if message.committed_at:  # the commit, on this process's monotonic clock
                at -= max(0.0, time.time() - message.committed_at / 1e6)
            if not self._received or at < self._received:
                self._received = at
            self._tick.set()
        if message.kind == "views" and message.views is not None:
            # also when the seq did not move: a view with no counts changes no counter
            self._reload_views(message.views)

    def _reload_views(self, views: list[View]) -> None:
        old = self.views
        fresh = {v.id: v for v in views}
        touched = self._touched(old, fresh)
        if not touched:
            return
        # what changed before goes out now, under the views the streams know (a direct
        # stream writes it at once): no delta about a new view before the view list
        self.distribute()
        self.views = fresh
        self.views_seq = self.seq
        self._invalidate(views=True)
        regrouped = {vid for vid in touched if vid in fresh and (
            vid not in old or old[vid].group_by != fresh[vid].group_by)}
        per_teammate: dict[int | None, tuple[bool, list[int]]] = {}
        for stream in self.streams:
            me = stream.teammate
            known = per_teammate.get(me)
            if known is None:
                new = [vid for vid in regrouped if _sees(fresh[vid], me)]
                known = per_teammate[me] = (self._concerns(touched, old, me), new)
            if known[0]:
                stream.views_changed(known[1])

    @staticmethod
    def _touched(old: dict[int, View], fresh: dict[int, View]) -> set[int]:
        return {vid for vid in old.keys() | fresh.keys() if old.get(vid) != fresh.get(vid)}

    def _concerns(self, touched: set[int], old: dict[int, View], me: int | None) -> bool:
        """Whether a change of the views ``touched`` changes what ``me`` sees."""
        for vid in touched:
            before, after = old.get(vid), self.views.get(vid)
            if (before is not None and _sees(before, me)) or (
                    after is not None and _sees(after, me)):
                return True
        return False

    def _invalidate(self, views: bool = False) -> None:
        self._snapshots.clear()
        if views:
            self._view_lists.clear()

    # -- fan-out ----------------------------------------------------------------------------

    def distribute(self) -> None:
        """Hand the counters changed since the last tick to the streams that see them."""
        received, self._received = self._received, 0.0
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = set()
        if not self.streams:
            return
        base: list[CounterKey] = []
        adjustments: dict[int, list[CounterKey]] = {}
        for vid, group, who in dirty:
            if who is None:
                base.append((vid, group))
            else:
                adjustments.setdefault(who, []).append((vid, group))
        shares: dict[int | None, _Share] = {}
        for stream in self.streams:
            me = stream.teammate
            share = shares.get(me)
            if share is None:
                mine = adjustments.get(me, ()) if me is not None else ()
                keys = frozenset(k for k in (*base, *mine) if self.shows(k, me))
                share = shares[me] = _Share(self, me, keys)
            if share.keys:
                if received and not stream.lag_since:
                    stream.lag_since = received  # (before the offer: a direct stream sends)
                stream.offer(share.keys, share)

    def shows(self, key: CounterKey, me: int | None) -> bool:
        """Whether ``me`` sees counter ``key`` of the current views (with the right shape:
        a group key for a grouped view, None for a plain one)."""
        view = self.views.get(key[0])
        return view is not None and _sees(view, me) and (key[1] is None) == (
            view.group_by is None)

    def _delta(self, me: int | None, keys: Iterable[CounterKey]) -> Payload:
        counts = render_keys(self.views, self.counts, me, keys)
        return Payload({"type": "delta", "epoch": self.epoch, "seq": self.seq,
                        "counts": counts}, self.event_id)

    # -- what streams send ------------------------------------------------------------------

    def snapshot_payload(self, me: int | None) -> Payload:
        payload = self._snapshots.get(me)
        if payload is None:
            counts = render_counts(self.views.values(), self.counts, me)
            payload = self._snapshots[me] = Payload(
                {"type": "snapshot", "epoch": self.epoch, "seq": self.seq, "counts": counts},
                self.event_id)
        return payload

    def views_payload(self, me: int | None) -> Payload:
        payload = self._view_lists.get(me)
        if payload is None:
            visible = sorted(visible_views(self.views.values(), me),
                             key=lambda v: (v.position, v.id))
            payload = self._view_lists[me] = Payload(
                {"type": "views", "views": [view_to_wire(v) for v in visible]})
        return payload

    def delta_payload(self, me: int | None, keys: Iterable[CounterKey],
                      new_views: Iterable[int], force: bool) -> Payload | None:
        """The current values of ``keys`` plus the full counts of ``new_views``; None when
        that is nothing (unless ``force``)."""
        counts: Rendered = render_keys(self.views, self.counts, me,
                                       [k for k in keys if self.shows(k, me)])
        fresh = [self.views[vid] for vid in new_views if vid in self.views]
        if fresh:
            for key, value in render_counts(fresh, self.counts, me).items():
                known = counts.get(key)
                if isinstance(known, dict) and isinstance(value, dict):
                    known.update(value)
                else:
                    counts[key] = value
        if not counts and not force:
            return None
        return Payload({"type": "delta", "epoch": self.epoch, "seq": self.seq,
                        "counts": counts}, self.event_id)

    def resume_keys(self, messages: Iterable[BusMessage], me: int | None) -> set[CounterKey]:
        """The counters ``me`` sees among those the bus messages changed."""
        return {(vid, group) for message in messages
                for (vid, group, who) in message.counts if who is None or who == me}


def _sees(view: View, me: int | None) -> bool:
    return view.owner_id is None or view.owner_id == me


class _Share:
    """The changed counters one teammate sees at one tick, rendered at most once."""

    __slots__ = ("_payload", "hub", "keys", "me")

    def __init__(self, hub: Hub, me: int | None, keys: frozenset[CounterKey]) -> None:
        self.hub = hub
        self.me = me
        self.keys = keys
        self._payload: Payload | None = None

    def __call__(self) -> Payload:
        if self._payload is None:
            self._payload = self.hub._delta(self.me, self.keys)
        return self._payload

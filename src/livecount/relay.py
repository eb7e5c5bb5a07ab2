"""The relay: outbox (commit order) → engine → counter state → bus.

One asyncio task reads the store's outbox after the position it has reached, turns each
conversation change into count deltas with the workspace's :class:`Engine`, applies them to
the counter state with the position they reflect, and publishes the changed counters on the
bus. It wakes on the store's commit callback and polls as a fallback.

Start-up and new views come from recounts over a consistent snapshot: the snapshot's outbox
position says which entries it already contains (they are skipped), so nothing is counted
twice or missed. A recounted view is installed exactly when the relay reaches the snapshot's
position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .bus.base import Bus, BusMessage
from .domain import Image, now_us
from .engine import Delta, Engine
from .exceptions import LivecountError, NotFound, PreconditionFailed
from .schedule import FlipSchedule, ReopenSchedule, Timer
from .state.base import CounterState
from .store.base import Counts, OutboxEntry, Store, View

__all__ = ["Reconciliation", "Relay"]

log = logging.getLogger("livecount.relay")

#: Most changes a workspace records while a reconcile runs (it then asks for a retry).
HISTORY: Final = 10_000


@dataclass
class _Pending:
    position: int
    view: View
    counts: Counts
    images: list[Image]  # the snapshot's, kept only for a time-dependent view's flips
    counted_at: int  # the clock the counts were evaluated at


@dataclass
class _Workspace:
    """The relay's per-workspace state."""

    engine: Engine
    skip: int  # entries at or below this position are already in the counts
    installed_at: dict[int, int] = field(default_factory=dict)  # view id → position
    pending: dict[int, _Pending] = field(default_factory=dict)  # view id → install
    history: deque[tuple[int, list[Delta]]] = field(default_factory=lambda: deque(
        maxlen=HISTORY))
    floor: int = 0  # position of the newest history record evicted (or not recorded)
    recording: int = 0  # reconciles in progress: history is only kept while one runs
    flips: FlipSchedule = field(default_factory=FlipSchedule)
    timers: tuple[Timer, ...] = ()

    def retime(self) -> None:
        self.timers = tuple((v.id, name, span) for v in self.engine.views.values()
                            for name, span in v.timers)

    def version(self, conversation_id: int) -> int:
        return self.engine.versions.get(conversation_id, 0)

    def remember(self, position: int, deltas: list[Delta]) -> None:
        if not self.recording:
            return
        if len(self.history) == self.history.maxlen:
            self.floor = self.history[0][0]
        self.history.append((position, deltas))


@dataclass(frozen=True)
class Reconciliation:
    """What one reconcile of one workspace found (and repaired)."""

    workspace_id: int
    position: int
    views_checked: int
    views_skipped: int
    counters_checked: int
    drift: Counts  # counter → (SQL count − state count) at ``position``
    seconds: float

    @property
    def drifted(self) -> int:
        return len(self.drift)


class Relay:
    """Owns one task; ``start()``/``stop()`` bracket its life."""

    def __init__(self, store: Store, state: CounterState, bus: Bus, *, batch_size: int = 1000,
                 poll_interval: float = 1.0, clock: Callable[[], int] = now_us) -> None:
        self.store = store
        self.state = state
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.clock = clock
        self.position = 0
        self.lock = asyncio.Lock()
        self.entries_applied = 0
        self.errors = 0
        self.drift_repaired = 0
        self._workspaces: dict[int, _Workspace] = {}
        self._reopens = ReopenSchedule()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild every workspace from a recount, then follow the outbox in a task."""
        if self._task is not None:
            raise LivecountError("relay already started")
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.store.on_commit(self._on_commit)
        async with self.lock:
            self.position = await self.store.outbox_position()
            for workspace in await self.store.list_workspaces():
                await self._rebuild(workspace.id)
        self._task = asyncio.create_task(self._run(), name="livecount-relay")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_commit(self) -> None:
        """Called by the store from its writer thread after each commit."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check
                loop.call_soon_threadsafe(self._wake.set)

    def _next_timeout(self) -> float:
        """Seconds until the next flip or reopen is due, at most the poll interval."""
        instants = [i for ws in self._workspaces.values()
                    if (i := ws.flips.next_instant()) is not None]
        if (reopen := self._reopens.next_instant()) is not None:
            instants.append(reopen)
        if not instants:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, (min(instants) - self.clock()) / 1e6))

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._next_timeout()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                while await self.step():
                    pass
                await self._reopen_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("relay step failed; retrying in %.1fs", self.poll_interval)
                await asyncio.sleep(self.poll_interval)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def sync(self) -> None:
        """Return once everything committed before the call is applied (tests, CLI)."""
        target = await self.store.outbox_position()
        while self.position < target:
            await self.step()

    async def lag(self) -> int:
        """Outbox entries committed but not yet applied."""
        return max(0, await self.store.outbox_position() - self.position)

    # -- one batch --------------------------------------------------------------------------

    async def step(self) -> bool:
        """Apply the next batch of the outbox; True when there may be more."""
        async with self.lock:
            now = self.clock()
            pending_deltas: dict[int, Counts] = {}
            last: dict[int, int] = {}
            self._flip_due(now, pending_deltas)
            entries = await self.store.read_outbox(self.position, self.batch_size)
            if not entries:
                for workspace_id in list(pending_deltas):
                    await self._flush(workspace_id, pending_deltas, last)
                await self._install_due(None)
                return False
            for entry in entries:
                ws = self._workspaces.get(entry.workspace_id)
                if ws is None:
                    ws = await self._rebuild(entry.workspace_id)
                if ws.pending and min(p.position for p in ws.pending.values()) < entry.position:
                    await self._flush(entry.workspace_id, pending_deltas, last)
                    await self._install_due(entry.workspace_id, before=entry.position)
                if entry.position <= ws.skip:
                    continue
                if entry.kind == "conversation":
                    self._apply(ws, entry, now, pending_deltas)
                else:
                    await self._flush(entry.workspace_id, pending_deltas, last)
                    await self._view_changed(ws, entry, now)
                last[entry.workspace_id] = entry.position
                self.entries_applied += 1
            self.position = entries[-1].position
            for workspace_id in list(pending_deltas):
                await self._flush(workspace_id, pending_deltas, last)
            await self._install_due(None)
            return len(entries) == self.batch_size

    def _apply(self, ws: _Workspace, entry: OutboxEntry, now: int,
               pending: dict[int, Counts]) -> None:
        before, after = entry.before, entry.after
        assert before is None or isinstance(before, Image)
        assert after is None or isinstance(after, Image)
        deltas = ws.engine.apply(before, after, now)
        if after is not None and ws.version(after.id) == after.version:
            if ws.timers:
                ws.flips.watch(after, ws.timers, now)
            self._reopens.watch(after)
        if not deltas:
            return
        ws.remember(entry.position, deltas)
        acc = pending.setdefault(entry.workspace_id, {})
        for vid, group, teammate, delta in deltas:
            key = (vid, group, teammate)
            acc[key] = acc.get(key, 0) + delta

    def _flip_due(self, now: int, pending: dict[int, Counts]) -> None:
        """Apply every membership flip the clock has reached (before any entry at ``now``)."""
        for workspace_id, ws in self._workspaces.items():
            if not len(ws.flips):
                continue
            for instant, image, view_ids in ws.flips.due(now, ws.version):
                deltas = ws.engine.clock_deltas(image, instant - 1, instant, view_ids)
                if deltas:
                    ws.remember(self.position, deltas)
                    acc = pending.setdefault(workspace_id, {})
                    for vid, group, teammate, delta in deltas:
                        key = (vid, group, teammate)
                        acc[key] = acc.get(key, 0) + delta
            ws.flips.compact(ws.version)

    async def _reopen_due(self) -> None:
        """Reopen snoozed conversations whose ``snoozed_until`` has passed: a real write."""
        for workspace_id, conversation_id, version in self._reopens.due(self.clock()):
            ws = self._workspaces.get(workspace_id)
            if ws is None or ws.version(conversation_id) != version:
                continue  # changed since it was snoozed; the newer version decides
            with contextlib.suppress(PreconditionFailed, NotFound):
                await self.store.update_conversation(
                    workspace_id, conversation_id, {"state": "open", "snoozed_until": None},
                    if_match=version)

    async def _flush(self, workspace_id: int, pending: dict[int, Counts],
                     last: dict[int, int]) -> None:
        deltas = pending.pop(workspace_id, None)
        if not deltas:
            return
        update = await self.state.apply(workspace_id, deltas, last.get(workspace_id, 0))
        if update.changed:
            await self.bus.publish(BusMessage(workspace_id, update.seq, "delta", update.changed))

    # -- workspaces and views ---------------------------------------------------------------

    async def _rebuild(self, workspace_id: int) -> _Workspace:
        """Count a workspace from scratch over one snapshot; later entries continue it."""
        snapshot = await self.store.snapshot(workspace_id)
        engine = Engine(snapshot.views)
        now = self.clock()
        counts = engine.count(snapshot.conversations, now)
        ws = _Workspace(engine, skip=snapshot.position,
                        installed_at={v.id: snapshot.position for v in snapshot.views})
        ws.retime()
        for image in snapshot.conversations:
            if ws.timers:
                ws.flips.watch(image, ws.timers, now)
            self._reopens.watch(image)
        self._workspaces[workspace_id] = ws
        update = await self.state.replace(workspace_id, counts, snapshot.position)
        await self.bus.publish(BusMessage(workspace_id, update.seq, "views", update.changed))
        return ws

    async def _view_changed(self, ws: _Workspace, entry: OutboxEntry, now: int) -> None:
        view_id = entry.entity_id
        if entry.after is None:  # deleted: nothing to recount
            ws.pending.pop(view_id, None)
            ws.installed_at.pop(view_id, None)
            ws.engine.remove_view(view_id)
            ws.retime()
            await self._replace(entry.workspace_id, ws, {}, entry.position, [view_id])
            return
        known = ws.pending.get(view_id)
        if known is not None and known.position >= entry.position:
            return  # the snapshot taken for it already includes this change
        snapshot = await self.store.snapshot(entry.workspace_id)
        view = next((v for v in snapshot.views if v.id == view_id), None)
        if view is None:  # deleted again before the snapshot; its delete entry follows
            ws.pending.pop(view_id, None)
            return
        scratch = Engine([view])
        counts = scratch.count(snapshot.conversations, now)
        timed = scratch.views[view_id].timed
        ws.pending[view_id] = _Pending(snapshot.position, view, counts,
                                       snapshot.conversations if timed else [], now)

    async def _install_due(self, workspace_id: int | None, before: int | None = None) -> None:
        """Install recounted views whose snapshot position the relay has reached."""
        targets = [workspace_id] if workspace_id is not None else list(self._workspaces)
        for wid in targets:
            ws = self._workspaces[wid]
            for view_id, pending in list(ws.pending.items()):
                due = pending.position < before if before is not None else (
                    pending.position <= self.position)
                if not due:
                    continue
                del ws.pending[view_id]
                compiled = ws.engine.set_view(pending.view)
                ws.installed_at[view_id] = pending.position
                ws.retime()
                timers = [(view_id, name, span) for name, span in compiled.timers]
                for image in pending.images:  # the snapshot is the engine's state right here
                    if ws.version(image.id) == image.version:
                        # flips since the counts were taken are due at once
                        ws.flips.watch(image, timers, pending.counted_at)
                await self._replace(wid, ws, pending.counts, pending.position, [view_id])

    async def _replace(self, workspace_id: int, ws: _Workspace, counts: Counts, position: int,
                       view_ids: list[int]) -> None:
        # The old values are only needed for a reconcile's history: copy the state only then.
        old = (await self.state.snapshot(workspace_id)).counts if ws.recording else {}
        update = await self.state.replace(workspace_id, counts, position, view_ids)
        ws.remember(position, [(k[0], k[1], k[2], v - old.get(k, 0))
                               for k, v in update.changed.items()])
        await self.bus.publish(BusMessage(workspace_id, update.seq, "views", update.changed))

    def views(self, workspace_id: int) -> list[View]:
        """The views whose counts the relay currently maintains for a workspace."""
        ws = self._workspaces.get(workspace_id)
        return [] if ws is None else [v.view for v in ws.engine.views.values()]

    # -- reconcile --------------------------------------------------------------------------

    async def reconcile(self, workspace_id: int, *, repair: bool = True) -> Reconciliation:
        """Recount every view by SQL in one snapshot, compare with the state at the same
        position, and (by default) add the difference to the state."""
        started = time.perf_counter()
        async with self.lock:
            ws = self._workspaces.get(workspace_id)
            if ws is None:
                ws = await self._rebuild(workspace_id)
            compiled = list(ws.engine.views.values())
            if not ws.recording:  # record every change after this point (all are > Q)
                ws.history.clear()
                ws.floor = self.position
            ws.recording += 1
        try:
            return await self._reconcile(workspace_id, ws, compiled, repair, started)
        finally:
            ws.recording -= 1
            if not ws.recording:
                ws.history.clear()

    async def _reconcile(self, workspace_id: int, ws: _Workspace, compiled: list[Any],
                         repair: bool, started: float) -> Reconciliation:
        now = self.clock()
        recount = await self.store.recount(workspace_id, [c.view for c in compiled], now)
        while self.position < recount.position:
            await self.step()
        async with self.lock:
            if ws.floor > recount.position:
                raise LivecountError("the relay moved too far past the recount's snapshot; "
                                     "retry when writes are quieter")
            checked = {c.id for c in compiled
                       if not c.timed and ws.installed_at.get(c.id, 1 << 62) <= recount.position
                       and c.id in ws.engine.views and ws.engine.views[c.id] is c}
            state = (await self.state.snapshot(workspace_id)).counts
            at_position = {k: v for k, v in state.items() if k[0] in checked}
            for position, deltas in ws.history:
                if position > recount.position:
                    for vid, group, teammate, delta in deltas:
                        if vid in checked:
                            key = (vid, group, teammate)
                            at_position[key] = at_position.get(key, 0) - delta
            expected = {k: v for k, v in recount.counts.items() if k[0] in checked}
            drift: Counts = {}
            for key in expected.keys() | at_position.keys():
                difference = expected.get(key, 0) - at_position.get(key, 0)
                if difference:
                    drift[key] = difference
            if drift and repair:
                update = await self.state.apply(workspace_id, drift, self.position)
                ws.remember(self.position, [(*k, d) for k, d in drift.items()])
                self.drift_repaired += len(drift)
                if update.changed:
                    await self.bus.publish(BusMessage(workspace_id, update.seq, "delta",
                                                      update.changed))
                log.warning("reconcile repaired %d drifted counters in workspace %d",
                            len(drift), workspace_id)
        return Reconciliation(workspace_id, recount.position, len(checked),
                              len(compiled) - len(checked), len(expected | at_position), drift,
                              time.perf_counter() - started)

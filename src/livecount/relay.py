"""The relay: outbox (commit order) → engine → counter state → bus.

One asyncio task reads the store's outbox after the position it has reached and, per
workspace, turns the entries into count deltas with the workspace's :class:`Engine`.

**Atomic apply.** Each workspace's share of a step is first computed without changing
anything (a :class:`_Plan`: the deltas of its entries and of the time-driven flips now due,
and the position it leads to), then committed to the counter state in one atomic call that
checks the position the plan was computed against, and only then reflected in the relay's
memory (schedules, the position) by code that cannot fail (no await). So an exception at any
await leaves the engine, the state and the schedules as before the step, and the retry
recomputes the same thing. A plan whose commit raised is kept and sent again as it is: if
the first attempt had landed after all, the state recognises it as a duplicate. Idempotence
is by outbox position (entries are applied in order), so no per-conversation version map is
kept.

**Publishing** happens after the commit; a message the bus refused is retried at the next
step, in order, and a backlog that keeps failing collapses into one ``reset`` message (readers
then reload the state). Readers also reload on a seq gap or another epoch.

**Counting from scratch** (a workspace's first count, a new or changed view, a reconcile) is
one pass of the engine over a snapshot, evaluated at one instant, in slices that yield to the
event loop; the entries committed after the snapshot are then applied to that count (the
*catch-up*) up to the position the live state has reached, and time-dependent views are moved
to the instant the live state reflects. New views are counted by background tasks, off the
relay's hot path, and installed under the relay lock in one atomic step.

**Reopens** (snoozes whose time has come) are written by their own task, retried until they
land, and leave their schedule only once written.

**Ownership.** With a shared counter state several relays (counter workers) split the
workspaces by shard under leases (:mod:`livecount.leases`): a relay applies the entries of the
workspaces it owns only, skips the others', counts a workspace from scratch when it takes its
shard over, forgets it when it gives the shard up, and writes with its lease's fence, so a
relay that lost its lease without knowing cannot overwrite the new owner's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .bus.base import Bus, BusMessage
from .domain import Image, now_us
from .engine import CompiledView, Delta, Engine
from .exceptions import LivecountError, Unavailable
from .leases import Everything, Ownership
from .schedule import DueFlip, FlipSchedule, KeyedHeap, ReopenSchedule, Timer
from .state.base import CounterState, StateConflict, StateFenced, Update
from .store.base import Counts, OutboxEntry, Store, View, relay_lane

__all__ = ["Reconciliation", "Relay"]

log = logging.getLogger("livecount.relay")

#: Images counted between two yields to the event loop (~15 ms of work with 1,000 views).
COUNT_SLICE: Final = 5000
#: Bus messages a workspace may have waiting for a retry before they collapse into a reset.
MAX_UNPUBLISHED: Final = 64
#: Reopens written per batch.
REOPEN_BATCH: Final = 200
#: Background counts (new views) running at once.
MAX_COUNTING: Final = 2


def _accumulate(counts: Counts, deltas: Iterable[Delta]) -> None:
    for vid, group, teammate, delta in deltas:
        key = (vid, group, teammate)
        value = counts.get(key, 0) + delta
        if value:
            counts[key] = value
        else:
            counts.pop(key, None)


class _NotOwned(LivecountError):
    """The relay does not own the workspace (any more): it must not write it."""


@dataclass
class _Plan:
    """One workspace's share of a step, computed without changing anything."""

    expect: int  # the position the state was at when this was computed
    position: int  # the position it leads to
    now: int
    deltas: Counts
    flips: list[DueFlip]
    entries: list[OutboxEntry]
    seq: int  # the state's seq when this was computed
    sent: bool = False  # sent at least once (its outcome may be unknown)


@dataclass
class _Workspace:
    """The relay's per-workspace memory: what the state's counts are a function of."""

    engine: Engine
    applied: int  # outbox position the state's counts reflect
    clock: int  # instant the state's time-dependent counts reflect
    flips: FlipSchedule = field(default_factory=FlipSchedule)
    timers: tuple[Timer, ...] = ()
    inflight: _Plan | None = None  # a plan whose commit raised: sent again first
    seq: int = 0  # the state's seq, as this relay last saw it
    epoch: str = ""  # the state's epoch the counts were built in
    waiting: dict[int, View] = field(default_factory=dict)  # views being counted
    installs: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    def retime(self) -> None:
        self.timers = tuple((v.id, name, span) for v in self.engine.views.values()
                            for name, span in v.timers)


@dataclass(frozen=True)
class Reconciliation:
    """What one reconcile of one workspace found (and repaired)."""

    workspace_id: int
    position: int
    views_checked: int
    views_skipped: int
    counters_checked: int
    seconds: float
    #: counter → (state value, recounted value), for every drifted counter
    values: dict[tuple[int, str | None, int | None], tuple[int, int]] = field(
        default_factory=dict)
    repaired: bool = False

    @property
    def drift(self) -> Counts:
        """counter → (recount − state) at ``position``."""
        return {key: sql - state for key, (state, sql) in self.values.items()}

    @property
    def drifted(self) -> int:
        return len(self.values)

    def as_json(self) -> dict[str, Any]:
        """The API's answer (DESIGN §5): position, views checked, drift, repaired."""
        drift = [{"view": view, "group": group, "teammate": teammate, "state": state,
                  "sql": sql}
                 for (view, group, teammate), (state, sql) in sorted(
                     self.values.items(), key=lambda item: (item[0][0], str(item[0][1]),
                                                            item[0][2] or 0))]
        return {"position": self.position, "views_checked": self.views_checked,
                "drift": drift, "repaired": self.repaired}


class _Count:
    """Counts of some views over one workspace, from a snapshot, brought forward.

    ``run()`` counts the snapshot at one instant ``t0``; ``catch_up(p)`` applies the entries
    of the workspace committed after the snapshot, up to ``p``, evaluated at ``t0`` too;
    ``at(clock)`` gives the counts with time-dependent views evaluated at ``clock``.
    """

    def __init__(self, relay: Relay, workspace_id: int,
                 views: Sequence[View | CompiledView]) -> None:
        self.relay = relay
        self.workspace_id = workspace_id
        self.engine = Engine(views)
        self.counts: Counts = {}
        #: the current images, kept only when a counted view depends on time (``at`` and
        #: the flips of a newly installed view need them; other counts do not)
        self.timed = [v.id for v in self.engine.views.values() if v.timed]
        self.images: dict[int, Image] = {}
        self.position = 0
        self.t0 = 0
        self.views: list[View] = []  # the snapshot's views

    async def run(self) -> None:
        # a long read: on the shared readers, so the relay's own reader stays free for steps
        with relay_lane(False):
            snapshot = await self.relay.store.snapshot(self.workspace_id)
        self.position = snapshot.position
        self.views = snapshot.views
        self.t0 = self.relay._now()
        conversations = snapshot.conversations
        for start in range(0, len(conversations), COUNT_SLICE):
            part = conversations[start:start + COUNT_SLICE]
            self.engine.count_into(self.counts, part, self.t0)
            if self.timed:
                for image in part:
                    self.images[image.id] = image
            await asyncio.sleep(0)

    async def catch_up(self, target: int) -> None:
        store = self.relay.store
        if self.position < target and await store.outbox_floor() > self.position:
            # the entries after the snapshot were pruned meanwhile: count again
            raise Unavailable("the outbox was pruned past the snapshot; recounting")
        while self.position < target:
            entries = await store.read_outbox(self.position, 1000)
            if not entries:
                raise LivecountError(f"the outbox ends before position {target}")
            for entry in entries:
                if entry.position > target:
                    return
                if entry.workspace_id == self.workspace_id and entry.kind == "conversation":
                    before, after = entry.before, entry.after
                    assert before is None or isinstance(before, Image)
                    assert after is None or isinstance(after, Image)
                    _accumulate(self.counts, self.engine.deltas(before, after, self.t0))
                    if self.timed:
                        if after is None:
                            self.images.pop(entry.entity_id, None)
                        else:
                            self.images[after.id] = after
                self.position = entry.position
            await asyncio.sleep(0)

    def at(self, clock: int) -> Counts:
        if not self.timed or clock == self.t0:
            return self.counts
        counts = dict(self.counts)
        for image in self.images.values():
            _accumulate(counts, self.engine.clock_deltas(image, self.t0, clock, self.timed))
        return counts


class Relay:
    """Owns its tasks; ``start()``/``stop()`` bracket their life."""

    def __init__(self, store: Store, state: CounterState, bus: Bus, *, batch_size: int = 1000,
                 poll_interval: float = 1.0, clock: Callable[[], int] = now_us,
                 reconcile_every: float | None = None,
                 outbox_retention: float | None = None,
                 ownership: Ownership | None = None) -> None:
        self.store = store
        self.state = state
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.clock = clock
        self.reconcile_every = reconcile_every
        self.outbox_retention = outbox_retention
        #: which workspaces this relay counts (all of them unless counting is shared)
        self.ownership: Ownership = ownership or Everything()
        self._ownership_seen = self.ownership.version
        self.position = 0
        self.lock = asyncio.Lock()
        self.entries_applied = 0
        self.errors = 0
        self.drift_repaired = 0
        self.reconciles = 0
        self.poison_entries = 0
        self.reopens_written = 0
        self.outbox_pruned = 0
        #: commits refused because the state was not where this relay left it (someone else
        #: wrote the counters); each one costs a recount of the workspace
        self.conflicts = 0
        self._last_now = 0
        self._workspaces: dict[int, _Workspace] = {}
        self._unbuilt: set[int] = set()  # workspaces whose (re)build failed or is due
        self._reopens = ReopenSchedule()
        #: workspace → its next flip instant: the one place a step looks for due flips, so a
        #: step costs what its entries and due flips touch, not the number of workspaces
        self._timers: KeyedHeap[int, None] = KeyedHeap()
        self._inflight: set[int] = set()  # workspaces with a plan to send again
        self._outgoing: dict[int, deque[BusMessage]] = {}
        self._wake = asyncio.Event()
        self._reopen_wake = asyncio.Event()
        self._counting = asyncio.Semaphore(MAX_COUNTING)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._started = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Count every workspace from a snapshot, then follow the outbox in a task (and write
        reopens, reconcile, prune in others). ``background=False`` starts no task: the
        caller drives :meth:`step` and :meth:`reopen_due` (tests that inject faults)."""
        if self._started:
            raise LivecountError("relay already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.store.on_commit(self._on_commit)
        self.ownership.watch(self._wake.set, self._release)
        try:
            with relay_lane():
                await self._build_all()
        except BaseException:
            await self.stop()
            self._started = False
            raise
        if not background:
            return
        self._spawn(self._run, "livecount-relay")
        self._spawn(self._reopen_loop, "livecount-relay-reopens")
        if (every := self.reconcile_every):
            self._spawn(lambda: self._reconcile_loop(every), "livecount-reconciler")
        if (retention := self.outbox_retention) is not None:
            self._spawn(lambda: self._prune_loop(retention), "livecount-outbox-pruner")

    async def _build_all(self) -> None:
        async with self.lock:
            self.position = await self.store.outbox_position()
            self._ownership_seen = self.ownership.version
            for workspace in await self.store.list_workspaces():
                if self.ownership.fence(workspace.id) is not None:
                    self._unbuilt.add(workspace.id)
            for workspace_id in sorted(self._unbuilt):
                try:
                    await self._build(workspace_id)
                except Exception:  # the next step builds it again
                    self.errors += 1
                    log.warning("counting workspace %d at start failed; retrying",
                                workspace_id, exc_info=True)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = list(self._tasks)
        for ws in self._workspaces.values():
            tasks.extend(ws.installs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def _spawn(self, make: Callable[[], Coroutine[Any, Any, None]], name: str
               ) -> asyncio.Task[None]:
        task = asyncio.create_task(_in_relay_lane(make), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_commit(self) -> None:
        """Called by the store from its writer thread after each commit."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check
                loop.call_soon_threadsafe(self._wake.set)

    def _now(self) -> int:
        """The clock, never going backwards (a step must not undo flips it applied)."""
        self._last_now = max(self._last_now, self.clock())
        return self._last_now

    def _next_timeout(self) -> float:
        """Seconds until the next flip is due, at most the poll interval."""
        instant = self._timers.peek()
        if instant is None:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, (instant - self.clock()) / 1e6))

    def _retime(self, workspace_id: int, ws: _Workspace) -> None:
        """Keep the workspace's next flip instant in the global timer heap."""
        instant = ws.flips.next_instant()
        if instant is None:
            self._timers.remove(workspace_id)
        else:
            self._timers.set(workspace_id, instant, None)

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
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("relay step failed; retrying in %.1fs", self.poll_interval)
                await asyncio.sleep(self.poll_interval)

    @property
    def running(self) -> bool:
        return any(t.get_name() == "livecount-relay" and not t.done() for t in self._tasks)

    async def sync(self) -> None:
        """Return once everything committed before the call is applied, views included
        (tests, the CLI, a write that waits to read itself)."""
        while True:
            with relay_lane():
                target = await self.store.outbox_position()
            while self.position < target or self._unbuilt:
                await self.step()
            installs = [t for ws in self._workspaces.values() for t in ws.installs.values()]
            if not installs:
                return
            # a count may wait for entries after ``target``: keep stepping meanwhile
            await asyncio.wait(installs, timeout=0.05)

    def _reached(self, ws: _Workspace) -> int:
        """The outbox position up to which every entry of ``ws`` is in the state: its own
        last one, or the relay's cursor when that is further (no entry of ``ws`` between)."""
        return max(self.position, ws.applied)

    def _fence(self, workspace_id: int) -> int:
        """The fence to write ``workspace_id`` with; :class:`_NotOwned` when not owned."""
        fence = self.ownership.fence(workspace_id)
        if fence is None:
            raise _NotOwned(f"workspace {workspace_id} is not owned by this counter worker")
        return fence

    def _drop(self, workspace_id: int) -> None:
        """Forget a workspace this relay does not own (any more). No await."""
        ws = self._workspaces.pop(workspace_id, None)
        if ws is not None:
            for task in ws.installs.values():
                task.cancel()
        self._timers.remove(workspace_id)
        self._reopens.forget_workspace(workspace_id)
        self._inflight.discard(workspace_id)
        self._outgoing.pop(workspace_id, None)
        self._unbuilt.discard(workspace_id)

    async def _follow_ownership(self) -> None:
        """The owned shards changed: forget the workspaces given up, count the ones taken."""
        version = self.ownership.version
        for workspace_id in [*self._workspaces, *self._unbuilt]:
            if self.ownership.fence(workspace_id) is None:
                self._drop(workspace_id)
        for workspace in await self.store.list_workspaces():
            if (workspace.id not in self._workspaces
                    and self.ownership.fence(workspace.id) is not None):
                self._unbuilt.add(workspace.id)
        self._ownership_seen = version

    async def _release(self, shards: frozenset[int]) -> None:
        """Before shards are given up: stop writing their workspaces (under the lock, so no
        step is writing one of them meanwhile)."""
        async with self.lock:
            for workspace_id in [*self._workspaces, *self._unbuilt]:
                if self.ownership.fence(workspace_id) is None:
                    self._drop(workspace_id)

    @property
    def scheduled(self) -> int:
        """Time-driven entries held: at most one flip entry per timed conversation and one
        reopen per snoozed conversation."""
        return len(self._reopens) + sum(len(ws.flips) for ws in self._workspaces.values())

    async def lag(self) -> int:
        """Outbox entries committed but not yet applied."""
        return max(0, await self.store.outbox_position() - self.position)

    # -- one step ---------------------------------------------------------------------------

    async def step(self) -> bool:
        """Apply the next batch of the outbox and the flips now due; True when there may be
        more. Raises if any part failed: the parts that committed stay committed, the rest is
        retried by the next step."""
        with relay_lane():
            return await self._step()

    async def _step(self) -> bool:
        async with self.lock:
            if self.ownership.version != self._ownership_seen:
                await self._follow_ownership()
            await self._publish_all()
            now = self._now()
            for workspace_id in sorted(self._unbuilt):
                if self.ownership.fence(workspace_id) is None:
                    self._drop(workspace_id)
                    continue
                try:
                    await self._build(workspace_id)
                except (StateFenced, _NotOwned):  # taken over meanwhile: not ours to count
                    self.ownership.lost(workspace_id)
                    self._drop(workspace_id)
            entries = await self.store.read_outbox(self.position, self.batch_size)
            groups: dict[int, list[OutboxEntry]] = {}
            for entry in entries:
                groups.setdefault(entry.workspace_id, []).append(entry)
            for workspace_id in (*self._inflight, *[w for _, w, _ in self._timers.due(now)]):
                if workspace_id not in self._workspaces:
                    self._timers.remove(workspace_id)
                elif workspace_id not in groups:
                    groups[workspace_id] = []
            for workspace_id, group in groups.items():
                if self.ownership.fence(workspace_id) is None:
                    self._drop(workspace_id)  # another relay applies its entries
                    continue
                try:
                    await self._advance(workspace_id, group, now)
                except (StateFenced, _NotOwned):
                    self.ownership.lost(workspace_id)
                    self._drop(workspace_id)
                except StateConflict:
                    self._lost(workspace_id)
                    raise
            if entries:
                self.position = entries[-1].position
            return len(entries) == self.batch_size

    async def _advance(self, workspace_id: int, entries: list[OutboxEntry], now: int) -> None:
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = await self._build(workspace_id)
        if ws.inflight is not None:
            await self._commit(workspace_id, ws, ws.inflight)
        pending = [e for e in entries if e.position > ws.applied]
        flips_done = False
        i = 0
        while True:
            run: list[OutboxEntry] = []
            while (i < len(pending) and pending[i].kind == "conversation"
                   and _poison(pending[i]) is None):
                run.append(pending[i])
                i += 1
            poisoned: tuple[OutboxEntry, str] | None = None
            if run or not flips_done:
                plan, poisoned = self._plan(ws, run, now, flips=not flips_done)
                flips_done = True
                if plan is not None:
                    await self._commit(workspace_id, ws, plan)
            if poisoned is None and i < len(pending):
                entry = pending[i]
                problem = _poison(entry)
                if problem is not None:
                    poisoned = (entry, problem)
                else:
                    i += 1
                    await self._view_entry(workspace_id, ws, entry)
                    continue
            if poisoned is not None:
                await self._poisoned(workspace_id, *poisoned)
                rest = [e for e in entries if e.position > poisoned[0].position]
                await self._advance(workspace_id, rest, now)
                return
            if i >= len(pending):
                return

    def _plan(self, ws: _Workspace, run: list[OutboxEntry], now: int, *, flips: bool
              ) -> tuple[_Plan | None, tuple[OutboxEntry, str] | None]:
        """What committing ``run`` (and the flips due by ``now``) would do; changes nothing.
        An entry the engine cannot evaluate ends the plan before it and is returned."""
        deltas: Counts = {}
        due = ws.flips.due(now) if flips and len(ws.flips) else []
        engine = ws.engine
        for image, instants in due:
            for instant, view_ids in instants:
                _accumulate(deltas, engine.clock_deltas(image, instant - 1, instant, view_ids))
        done: list[OutboxEntry] = []
        poisoned = None
        for entry in run:
            before, after = entry.before, entry.after
            try:
                assert before is None or isinstance(before, Image)
                assert after is None or isinstance(after, Image)
                changes = engine.deltas(before, after, now)
            except Exception as exc:
                poisoned = (entry, f"{type(exc).__name__}: {exc}"[:500])
                break
            _accumulate(deltas, changes)
            done.append(entry)
        if not done and not due:
            return None, poisoned
        position = done[-1].position if done else ws.applied
        return _Plan(ws.applied, position, now, deltas, due, done, ws.seq), poisoned

    async def _commit(self, workspace_id: int, ws: _Workspace, plan: _Plan) -> None:
        if plan.position == plan.expect:
            # Flips alone: the position does not move, so the state cannot tell a re-sent
            # plan from a new one. The seq can: this relay is the workspace's only writer.
            if not plan.deltas:
                self._finish(workspace_id, ws, plan)
                return
            if plan.sent:
                state = await self.state.snapshot(workspace_id)
                if state.epoch != ws.epoch:
                    ws.inflight = None
                    self._inflight.discard(workspace_id)
                    raise StateConflict(workspace_id, state.position, plan.expect)
                if state.seq == plan.seq + 1:  # it landed; its message was never sent
                    ws.inflight = None
                    self._inflight.discard(workspace_id)
                    self._finish(workspace_id, ws, plan)
                    ws.seq = state.seq
                    self._send(BusMessage(workspace_id, state.epoch, state.seq, "reset", {}))
                    await self._publish(workspace_id)
                    return
                if state.seq != plan.seq:
                    ws.inflight = None
                    self._inflight.discard(workspace_id)
                    raise StateConflict(workspace_id, plan.expect, plan.expect)
        plan.sent = True
        ws.inflight = plan
        self._inflight.add(workspace_id)
        try:
            update = await self.state.apply(workspace_id, plan.deltas, plan.position,
                                            plan.expect, fence=self._fence(workspace_id))
        except StateConflict:
            ws.inflight = None
            self._inflight.discard(workspace_id)
            raise  # the step marks the workspace for a recount
        ws.inflight = None
        self._inflight.discard(workspace_id)
        if update.epoch != ws.epoch:  # the state lost its data (it landed in a fresh one)
            raise StateConflict(workspace_id, 0, plan.expect)
        self._finish(workspace_id, ws, plan)
        ws.seq = update.seq
        if update.duplicate:
            if plan.deltas:  # it landed before; its message was never sent
                self._send(BusMessage(workspace_id, update.epoch, update.seq, "reset", {}))
        elif update.changed:
            self._send(BusMessage(workspace_id, update.epoch, update.seq, "delta",
                                  update.changed, committed_at=max(
                                      (e.committed_at for e in plan.entries), default=0)))
        await self._publish(workspace_id)

    def _lost(self, workspace_id: int) -> None:
        """The state is not where this relay left it (another writer, or a backend that lost
        its data): recount the workspace at the next step."""
        self.conflicts += 1
        self._unbuilt.add(workspace_id)
        ws = self._workspaces.get(workspace_id)
        if ws is not None:
            ws.inflight = None
        self._inflight.discard(workspace_id)
        self._wake.set()
        log.warning("counter state of workspace %d is not where the relay left it; "
                    "recounting", workspace_id)

    def _finish(self, workspace_id: int, ws: _Workspace, plan: _Plan) -> None:
        """Reflect a committed plan in memory. No await, nothing that can fail halfway."""
        for image, _ in plan.flips:
            ws.flips.consume(image, plan.now)
        for entry in plan.entries:
            after = entry.after
            if after is None:
                ws.flips.forget(entry.entity_id)
                self._reopens.forget(workspace_id, entry.entity_id)
                continue
            assert isinstance(after, Image)
            if ws.timers or after.id in ws.flips:
                ws.flips.watch(after, ws.timers, plan.now)
            self._reopens.watch(after)
        if plan.entries:
            self._reopen_wake.set()
        ws.applied = plan.position
        ws.clock = max(ws.clock, plan.now)
        self.entries_applied += len(plan.entries)
        self._retime(workspace_id, ws)

    # -- publishing -------------------------------------------------------------------------

    def _send(self, message: BusMessage) -> None:
        queue = self._outgoing.setdefault(message.workspace_id, deque())
        queue.append(message)
        if len(queue) > MAX_UNPUBLISHED:
            queue.clear()
            queue.append(BusMessage(message.workspace_id, message.epoch, message.seq, "reset",
                                    {}))

    async def _publish(self, workspace_id: int) -> None:
        """Publish what waits for ``workspace_id``, in order; a failure keeps it for later."""
        queue = self._outgoing.get(workspace_id)
        try:
            while queue:
                await self.bus.publish(queue[0])
                queue.popleft()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors += 1
            log.warning("publishing to the bus failed for workspace %d; will retry",
                        workspace_id, exc_info=True)
            return
        self._outgoing.pop(workspace_id, None)

    async def _publish_all(self) -> None:
        for workspace_id in list(self._outgoing):
            await self._publish(workspace_id)

    # -- workspaces, views, poison ----------------------------------------------------------

    async def _build(self, workspace_id: int) -> _Workspace:
        """Count a workspace from scratch over one snapshot; later entries continue it."""
        snapshot = await self.store.snapshot(workspace_id)
        engine = Engine(snapshot.views)
        now = self._now()
        counts: Counts = {}
        conversations = snapshot.conversations
        for start in range(0, len(conversations), COUNT_SLICE):
            engine.count_into(counts, conversations[start:start + COUNT_SLICE], now)
            await asyncio.sleep(0)
        update = await self.state.replace(workspace_id, counts, snapshot.position,
                                          views=snapshot.views,
                                          fence=self._fence(workspace_id))
        # committed: now reflect it in memory (no await from here)
        old = self._workspaces.get(workspace_id)
        if old is not None:
            for task in old.installs.values():
                task.cancel()
        ws = _Workspace(engine, applied=snapshot.position, clock=now, seq=update.seq,
                        epoch=update.epoch)
        ws.retime()
        self._reopens.forget_workspace(workspace_id)
        for image in conversations:
            if ws.timers:
                ws.flips.watch(image, ws.timers, now)
            self._reopens.watch(image)
        self._reopen_wake.set()
        self._workspaces[workspace_id] = ws
        self._inflight.discard(workspace_id)
        self._retime(workspace_id, ws)
        self._unbuilt.discard(workspace_id)
        self._outgoing.pop(workspace_id, None)  # superseded by the new counts
        self._send(BusMessage(workspace_id, update.epoch, update.seq, "views", update.changed,
                              self.views(workspace_id)))
        await self._publish(workspace_id)
        return ws

    async def _poisoned(self, workspace_id: int, entry: OutboxEntry, problem: str) -> None:
        """An entry that can never be applied: record it, count it, recount its workspace
        (the recount's snapshot contains whatever the entry changed)."""
        self.poison_entries += 1
        log.error("outbox entry %d (workspace %d) cannot be applied: %s; skipped, recounting "
                  "the workspace", entry.position, workspace_id, problem)
        try:
            await self.store.record_poison(entry.position, workspace_id, problem)
        except Exception:  # the recount matters more than the record
            log.warning("could not record poison entry %d", entry.position, exc_info=True)
        self._unbuilt.add(workspace_id)
        await self._build(workspace_id)

    async def _view_entry(self, workspace_id: int, ws: _Workspace, entry: OutboxEntry) -> None:
        view_id = entry.entity_id
        after = entry.after
        if after is None:  # deleted
            self._cancel_install(ws, view_id)
            update = await self.state.replace(
                workspace_id, {}, entry.position, [view_id],
                views=[v for v in self.views(workspace_id) if v.id != view_id],
                fence=self._fence(workspace_id))
            ws.engine.remove_view(view_id)
            ws.retime()
            self._view_committed(workspace_id, ws, entry.position, update)
            await self._publish(workspace_id)
            return
        assert isinstance(after, View)
        current = ws.engine.views.get(view_id)
        if current is not None and view_id not in ws.waiting and _same_counts(current.view,
                                                                              after):
            # renamed or moved: the counts stand
            update = await self.state.replace(
                workspace_id, {}, entry.position, [],
                views=[after if v.id == view_id else v for v in self.views(workspace_id)],
                fence=self._fence(workspace_id))
            ws.engine.views[view_id].view = after
            self._view_committed(workspace_id, ws, entry.position, update)
            await self._publish(workspace_id)
            return
        # counted in the background, installed when done; the position moves on now
        update = await self.state.apply(workspace_id, {}, entry.position, ws.applied,
                                        fence=self._fence(workspace_id))
        ws.applied = entry.position
        ws.seq = update.seq
        ws.waiting[view_id] = after
        if view_id not in ws.installs:
            ws.installs[view_id] = asyncio.create_task(
                _in_relay_lane(lambda: self._install(workspace_id, view_id)),
                name=f"livecount-count-view-{view_id}")

    def _view_committed(self, workspace_id: int, ws: _Workspace, position: int,
                        update: Update) -> None:
        ws.applied = position
        ws.seq = update.seq
        self._send(BusMessage(workspace_id, update.epoch, update.seq, "views", update.changed,
                              self.views(workspace_id)))

    def _cancel_install(self, ws: _Workspace, view_id: int) -> None:
        ws.waiting.pop(view_id, None)
        task = ws.installs.pop(view_id, None)
        if task is not None:
            task.cancel()

    async def _install(self, workspace_id: int, view_id: int) -> None:
        """Count a new or changed view in the background, then install it; retried until it
        is installed or superseded."""
        backoff = 0.02
        try:
            while True:
                ws = self._workspaces.get(workspace_id)
                view = None if ws is None else ws.waiting.get(view_id)
                if ws is None or view is None:
                    return
                try:
                    async with self._counting:
                        await self._install_once(workspace_id, view)
                    backoff = 0.02
                except asyncio.CancelledError:
                    raise
                except (StateFenced, _NotOwned):
                    self.ownership.lost(workspace_id)  # the next step forgets it
                    self._wake.set()
                    return
                except StateConflict:
                    self._lost(workspace_id)
                    await asyncio.sleep(backoff)
                except Exception:
                    self.errors += 1
                    log.warning("counting view %d of workspace %d failed; retrying", view_id,
                                workspace_id, exc_info=True)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.poll_interval)
        finally:
            ws = self._workspaces.get(workspace_id)
            if ws is not None and ws.installs.get(view_id) is asyncio.current_task():
                del ws.installs[view_id]

    async def _install_once(self, workspace_id: int, view: View) -> None:
        counting = _Count(self, workspace_id, [view])
        await counting.run()
        mine = next((v for v in counting.views if v.id == view.id), None)
        if mine is None or mine.version != view.version:
            # changed or deleted again since: a later outbox entry says what to do
            await self._settle_on(workspace_id, counting.position)
            return
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            return
        await counting.catch_up(self._reached(ws))
        async with self.lock:
            ws = self._workspaces.get(workspace_id)
            if ws is None or ws.waiting.get(view.id) is not view:
                return
            if ws.inflight is not None or self._reached(ws) < counting.position:
                self._wake.set()
                raise Unavailable("the relay is behind the view's snapshot; retrying")
            await counting.catch_up(self._reached(ws))
            counts = counting.at(ws.clock)
            views = [v for v in self.views(workspace_id) if v.id != view.id] + [view]
            update = await self.state.replace(workspace_id, counts, ws.applied, [view.id],
                                              views=views, fence=self._fence(workspace_id))
            # committed: reflect it (no await until the publish)
            ws.seq = update.seq
            del ws.waiting[view.id]
            compiled = ws.engine.set_view(view)
            ws.retime()
            timers = [(view.id, name, span) for name, span in compiled.timers]
            if timers:
                for image in counting.images.values():
                    ws.flips.extend(image, timers, ws.clock)
                self._retime(workspace_id, ws)
                self._wake.set()  # the relay sleeps until the next instant: a new one now
            self._send(BusMessage(workspace_id, update.epoch, update.seq, "views",
                                  update.changed, self.views(workspace_id)))
            await self._publish(workspace_id)

    async def _settle_on(self, workspace_id: int, position: int) -> None:
        """Wait (a little) for the relay to reach ``position``: the entry that superseded a
        count is there, and will cancel or restart it."""
        for _ in range(100):
            ws = self._workspaces.get(workspace_id)
            if ws is None or self._reached(ws) >= position:
                return
            self._wake.set()
            await asyncio.sleep(0.01)

    def views(self, workspace_id: int) -> list[View]:
        """The views whose counts the relay currently maintains for a workspace."""
        ws = self._workspaces.get(workspace_id)
        return [] if ws is None else [v.view for v in ws.engine.views.values()]

    # -- reopens ----------------------------------------------------------------------------

    async def _reopen_loop(self) -> None:
        """Write the reopens that are due, in batches, until each lands."""
        backoff = 0.05
        while True:
            instant = self._reopens.next_instant()
            wait = self.poll_interval if instant is None else max(
                0.0, min(self.poll_interval, (instant - self.clock()) / 1e6))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._reopen_wake.wait()
            self._reopen_wake.clear()
            try:
                await self.reopen_due()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.warning("writing reopens failed; retrying", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.poll_interval)

    async def reopen_due(self) -> int:
        """Write every reopen due now; each leaves the schedule once written (or refused
        because a newer version exists). Returns how many were written."""
        with relay_lane():
            return await self._reopen_due()

    async def _reopen_due(self) -> int:
        written = 0
        while due := self._reopens.due(self.clock(), REOPEN_BATCH):
            results = await self.store.reopen_conversations(due)
            # written, or refused because a newer version exists: either way done
            for (workspace_id, conversation_id, version), landed in zip(due, results,
                                                                        strict=True):
                written += landed
                self._reopens.done(workspace_id, conversation_id, version)
        self.reopens_written += written
        return written

    # -- reconcile --------------------------------------------------------------------------

    async def reconcile(self, workspace_id: int, *, repair: bool = True,
                        attempts: int = 5) -> Reconciliation:
        """Recount every view of a workspace in one pass over a snapshot (time-dependent
        views included, at the instant the live state reflects), compare with the live state
        at the same position, and (by default) repair the difference and publish it.

        Retried (``attempts``) when the relay had not reached the snapshot yet or the
        workspace was recounted meanwhile; then :class:`Unavailable`."""
        for attempt in range(attempts):
            try:
                with relay_lane():
                    return await self._reconcile(workspace_id, repair)
            except Unavailable:
                if attempt == attempts - 1:
                    raise
                self._wake.set()
                await asyncio.sleep(0.02 * 2 ** attempt)
        raise AssertionError("unreachable")

    async def _reconcile(self, workspace_id: int, repair: bool) -> Reconciliation:
        started = time.perf_counter()
        if self.ownership.fence(workspace_id) is None:
            raise Unavailable(f"workspace {workspace_id} is counted by another counter "
                              "worker", retry_after=1)
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            async with self.lock:
                ws = self._workspaces.get(workspace_id) or await self._build(workspace_id)
        compiled = list(ws.engine.views.values())
        counting = _Count(self, workspace_id, compiled)  # (copies: not compiled again)
        await counting.run()
        await counting.catch_up(self._reached(ws))
        async with self.lock:
            if self._workspaces.get(workspace_id) is not ws or ws.inflight is not None:
                raise Unavailable("the workspace was recounted meanwhile; retry")
            await counting.catch_up(self._reached(ws))
            if counting.position != self._reached(ws):
                self._wake.set()
                raise Unavailable("the relay is behind the snapshot; retry")
            checked = {c.id for c in compiled if ws.engine.views.get(c.id) is c}
            expected = {k: v for k, v in counting.at(ws.clock).items() if k[0] in checked}
            state = await self.state.snapshot(workspace_id)
            if state.epoch != ws.epoch or state.position < ws.applied:
                self._lost(workspace_id)  # lost its data: recount (a reconcile then agrees)
                raise Unavailable("the counter state lost its data; recounting, retry")
            if state.position != ws.applied:
                raise Unavailable("the counter state moved meanwhile; retry")
            actual = {k: v for k, v in state.counts.items() if k[0] in checked}
            values = {key: (actual.get(key, 0), expected.get(key, 0))
                      for key in expected.keys() | actual.keys()
                      if expected.get(key, 0) != actual.get(key, 0)}
            repaired = False
            if values and repair:
                try:
                    update = await self.state.assign(
                        workspace_id, {key: sql for key, (_, sql) in values.items()},
                        fence=self._fence(workspace_id))
                except (StateFenced, _NotOwned):
                    self.ownership.lost(workspace_id)  # taken over: the next step forgets it
                    self._wake.set()
                    raise Unavailable(f"workspace {workspace_id} was taken over by another "
                                      "counter worker; retry", retry_after=1) from None
                except Exception:
                    self._lost(workspace_id)  # landed or not, unknown: recount to be sure
                    raise
                ws.seq = update.seq
                repaired = True
                self.drift_repaired += len(values)
                if update.changed:
                    self._send(BusMessage(workspace_id, update.epoch, update.seq, "delta",
                                          update.changed))
                await self._publish(workspace_id)
            if values:
                log.warning("reconcile found %d drifted counters in workspace %d at position "
                            "%d%s", len(values), workspace_id, ws.applied,
                            " (repaired)" if repaired else "")
            self.reconciles += 1
            return Reconciliation(workspace_id, self._reached(ws), len(checked),
                                  len(compiled) - len(checked), len(expected | actual),
                                  time.perf_counter() - started, values, repaired)

    async def _reconcile_loop(self, every: float) -> None:
        """Reconcile every workspace once per ``every`` seconds, spread evenly (and with
        jitter) so that workspaces do not all recount at once."""
        while True:
            workspace_ids = sorted(self._workspaces)
            if not workspace_ids:
                await asyncio.sleep(every)
                continue
            gap = every / len(workspace_ids)
            for workspace_id in workspace_ids:
                await asyncio.sleep(gap * random.uniform(0.5, 1.5))
                if workspace_id not in self._workspaces:
                    continue  # given up meanwhile (another counter worker owns it now)
                try:
                    await self.reconcile(workspace_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.errors += 1
                    log.warning("scheduled reconcile of workspace %d failed", workspace_id,
                                exc_info=True)

    # -- retention --------------------------------------------------------------------------

    async def _prune_loop(self, retention: float) -> None:
        """Prune applied outbox entries older than ``retention`` seconds, now and then."""
        period = max(0.05, min(60.0, retention / 4))
        while True:
            await asyncio.sleep(period)
            try:
                cutoff = now_us() - int(retention * 1_000_000)
                floor = self.ownership.floor()  # other counter workers may be behind
                upto = self.position if floor is None else min(self.position, floor)
                self.outbox_pruned += await self.store.prune_outbox(upto, cutoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.warning("pruning the outbox failed; retrying later", exc_info=True)


async def _in_relay_lane(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``make()`` with its store calls in the relay's lane (made here, so a task
    cancelled before it starts leaves no coroutine that was never awaited)."""
    with relay_lane():
        await make()


def _poison(entry: OutboxEntry) -> str | None:
    """Why ``entry`` can never be applied, or None."""
    if entry.error:
        return entry.error
    if entry.kind == "conversation":
        if not isinstance(entry.before, Image | None) or not isinstance(entry.after,
                                                                       Image | None):
            return "a conversation entry without conversation images"
        if entry.before is None and entry.after is None:
            return "a conversation entry with neither image"
    elif entry.kind == "view" and not isinstance(entry.after, View | None):
        return "a view entry without a view"
    return None


def _same_counts(old: View, new: View) -> bool:
    """Whether two versions of a view count the same (only name or position differ)."""
    return (old.filter == new.filter and old.group_by == new.group_by
            and old.owner_id == new.owner_id)


"""``livecount reconcile --store URL``: check a store offline.

It counts every workspace with the engine's batched pass (what a server's relay would hold)
and compares each view with SQL (one ``COUNT`` per view, the slow independent path) at the
same outbox position, at one instant. A running server reconciles its LIVE state instead:
``POST /api/workspaces/{ws}/reconcile`` and ``--reconcile-every``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .bus.memory import MemoryBus
from .domain import now_us
from .engine.views import compile_view
from .exceptions import Unavailable
from .relay import Reconciliation, Relay
from .state.base import CounterState
from .state.memory import MemoryState
from .store import Store, open_store

__all__ = ["reconcile_store", "render"]


async def reconcile_store(url: str, state: CounterState | None = None,
                          repair: bool = True) -> list[Reconciliation]:
    """Count each workspace with the engine, compare with SQL at the same position."""
    store = open_store(url)
    await store.open()
    bus = MemoryBus()
    counters = state or MemoryState()
    relay = Relay(store, counters, bus, reconcile_every=None, outbox_retention=None)
    try:
        await relay.start(background=False)
        results = []
        for workspace in await store.list_workspaces():
            results.append(await _against_sql(relay, store, counters, workspace.id, repair))
        return results
    finally:
        await relay.stop()
        await bus.close()
        await store.close()


async def _against_sql(relay: Relay, store: Store, state: CounterState, workspace_id: int,
                       repair: bool) -> Reconciliation:
    started = time.perf_counter()
    for _ in range(20):  # a store that is being written to: retry until both agree on one
        await relay.sync()
        async with relay.lock:
            views = relay.views(workspace_id)
            recount = await store.recount(workspace_id, views, now_us())
            if recount.position != relay.position:
                continue
            counts = (await state.snapshot(workspace_id)).counts
        timed = {v.id for v in views if compile_view(v).timed}
        # time-dependent views are left out: the relay's clock is earlier than the recount's
        # (the live reconcile checks them at one instant)
        values = {key: (counts.get(key, 0), recount.counts.get(key, 0))
                  for key in counts.keys() | recount.counts.keys()
                  if key[0] not in timed and counts.get(key, 0) != recount.counts.get(key, 0)}
        if values and repair:
            await state.assign(workspace_id, {k: v[1] for k, v in values.items()})
        return Reconciliation(workspace_id, recount.position, len(views) - len(timed),
                              len(timed), len(counts.keys() | recount.counts.keys()),
                              time.perf_counter() - started, values, bool(values and repair))
    raise Unavailable("the store kept changing; retry when it is quieter")


def render(results: Sequence[Reconciliation], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="livecount reconcile")
    for column in ("workspace", "position", "views", "skipped", "counters", "drifted",
                   "seconds"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r.workspace_id), str(r.position), str(r.views_checked),
                      str(r.views_skipped), str(r.counters_checked),
                      f"[red]{r.drifted}[/red]" if r.drifted else "0", f"{r.seconds:.3f}")
    console.print(table)
    for r in results:
        for (view, group, teammate), delta in sorted(r.drift.items(), key=str)[:50]:
            console.print(f"  drift ws={r.workspace_id} view={view} group={group} "
                          f"teammate={teammate}: {delta:+d} (repaired)")

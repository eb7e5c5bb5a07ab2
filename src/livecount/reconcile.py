"""Run the reconciler once over every workspace of a store and report what it found."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .bus.memory import MemoryBus
from .relay import Reconciliation, Relay
from .state.base import CounterState
from .state.memory import MemoryState
from .store import open_store

__all__ = ["reconcile_store", "render"]


async def reconcile_store(url: str, state: CounterState | None = None,
                          repair: bool = True) -> list[Reconciliation]:
    """Rebuild (or load) the counter state, then reconcile each workspace against SQL."""
    store = open_store(url)
    await store.open()
    bus = MemoryBus()
    relay = Relay(store, state or MemoryState(), bus)
    try:
        await relay.start()
        await relay.sync()
        return [await relay.reconcile(ws.id, repair=repair)
                for ws in await store.list_workspaces()]
    finally:
        await relay.stop()
        await bus.close()
        await store.close()


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

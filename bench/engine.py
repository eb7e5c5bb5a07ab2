"""Engine throughput on the DESIGN §7 workload, against its baselines in the same run.

    .venv/bin/python bench/engine.py            # full run (about 2 minutes)
    .venv/bin/python bench/engine.py --quick    # smaller, for a smoke test

Measures changes/s on one core (the process is pinned to one CPU) for:

1. livecount's engine (necessary-condition index, delta-aware);
2. evaluate-every-view: the same compiled predicates and delta code, every view a candidate;
3. SQL recount per change: write the change to SQLite, then recount every view with the SQL
   compilation (what "recount on every event" costs), on the same workspace.

Writes bench/results/engine.json and bench/results/engine.png and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from livecount.engine import Engine
from livecount.filters.sql import register_sqlite_functions
from livecount.store.queries import recount
from livecount.store.rows import insert_image, update_image
from livecount.store.schema import metadata
from workload import make_workload

RESULTS = Path(__file__).parent / "results"


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def timed_apply(engine: Engine, changes: list[Any], now: int) -> tuple[float, int]:
    gc.collect()
    apply = engine.deltas
    deltas = 0
    started = time.perf_counter()
    for before, after in changes:
        deltas += len(apply(before, after, now))
    return time.perf_counter() - started, deltas


def timed_every_view(engine: Engine, changes: list[Any], now: int) -> tuple[float, int]:
    views = list(engine.views.values())
    deltas_of = engine.deltas
    gc.collect()
    deltas = 0
    started = time.perf_counter()
    for before, after in changes:
        deltas += len(deltas_of(before, after, now, views))
    return time.perf_counter() - started, deltas


def sql_recount_per_change(workload: Any, changes: list[Any], now: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/bench.db")
        sa.event.listen(engine, "connect", lambda conn, _: register_sqlite_functions(conn))
        try:
            metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO workspaces (id, name, created_at) "
                                     "VALUES (1, 'bench', 0)"))
                for image in workload.conversations:
                    insert_image(conn, image)
            started = time.perf_counter()
            for before, after in changes:
                with engine.begin() as conn:
                    if before is None:
                        insert_image(conn, after)
                    else:
                        update_image(conn, before, after)
                    recount(conn, 1, workload.views, now)
            return time.perf_counter() - started
        finally:
            engine.dispose()


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [r["engine"] for r in rows]
    rates = [r["changes_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.barh(names[::-1], rates[::-1], color=["#9aa5b1", "#9aa5b1", "#2f80ed"][-len(rows):])
    ax.set_xscale("log")
    ax.set_xlabel("changes per second, one core (log scale)")
    ax.axvline(100_000, color="#eb5757", linestyle="--", linewidth=1)
    ax.text(100_000, len(rows) - 0.45, " target 100k/s", color="#eb5757", fontsize=8)
    for bar, rate in zip(bars, rates[::-1], strict=True):
        label = f" {rate:,.0f}/s" if rate >= 10 else f" {rate:.2f}/s"
        ax.text(rate, bar.get_y() + bar.get_height() / 2, label, va="center",
                fontsize=8)
    ax.set_title(f"livecount engine, {results['workload']['views']} views, "
                 f"{results['workload']['teammates']} teammates")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run for a smoke test")
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    changes = 20_000 if args.quick else args.changes
    every_view_changes = 2_000 if args.quick else 10_000
    sql_changes = 3 if args.quick else 10
    pin_one_core()
    with console.status("building the workload…"):
        workload = make_workload(changes=changes)
    now = 1_700_000_000_000_000
    rows = []

    with console.status("livecount engine…"):
        engine = Engine(workload.views)
        t0 = time.perf_counter()
        engine.count(workload.conversations, now)
        recount_s = time.perf_counter() - t0
        seconds, deltas = timed_apply(engine, workload.changes, now)
    rows.append({"engine": "livecount (indexed, delta-aware)", "changes": changes,
                 "seconds": seconds, "changes_per_s": changes / seconds,
                 "deltas_per_change": deltas / changes})

    with console.status("evaluate-every-view engine…"):
        naive = Engine(workload.views)
        naive.count(workload.conversations, now)
        subset = workload.changes[:every_view_changes]
        seconds, deltas = timed_every_view(naive, subset, now)
        reference = Engine(workload.views)
        reference.count(workload.conversations, now)
        # Same answers: the indexed engine's deltas equal the evaluate-everything ones.
        for before, after in subset[:2_000]:
            assert sorted(reference.deltas(before, after, now)) == sorted(
                naive.deltas(before, after, now, list(naive.views.values())))
    rows.append({"engine": "evaluate every view", "changes": len(subset), "seconds": seconds,
                 "changes_per_s": len(subset) / seconds,
                 "deltas_per_change": deltas / len(subset)})

    with console.status(f"SQL recount per change ({sql_changes} changes)…"):
        seconds = sql_recount_per_change(workload, workload.changes[:sql_changes], now)
    rows.append({"engine": "SQL recount per change", "changes": sql_changes,
                 "seconds": seconds, "changes_per_s": sql_changes / seconds,
                 "deltas_per_change": None})

    base = rows[0]["changes_per_s"]
    for row in rows:
        row["ratio_to_livecount"] = row["changes_per_s"] / base
    results = {
        "benchmark": "engine",
        "command": "python bench/engine.py" + (" --quick" if args.quick else ""),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, pinned to one",
        "workload": {"views": len(workload.views), "teammates": workload.teammates,
                     "teams": workload.teams, "conversations": len(workload.conversations),
                     "changes": changes,
                     "mix": "30% state, 25% assignee, 15% tags, 10% team, 10% priority, "
                            "10% new"},
        "initial_recount_seconds": recount_s,
        "rows": rows,
    }
    table = Table(title="engine throughput (one core)")
    for column in ("engine", "changes", "changes/s", "× livecount", "deltas/change"):
        table.add_column(column, justify="right")
    for row in rows:
        per = row["deltas_per_change"]
        rate = row["changes_per_s"]
        table.add_row(row["engine"], f"{row['changes']:,}",
                      f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}",
                      f"{row['ratio_to_livecount']:.5f}", "—" if per is None else f"{per:.1f}")
    console.print(table)
    console.print(f"initial recount of {len(workload.conversations):,} conversations × "
                  f"{len(workload.views)} views in the engine: {recount_s:.2f} s")
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.output / f"engine{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.output / f"engine{suffix}.png")
    console.print(f"wrote {args.output}/engine{suffix}.json and engine{suffix}.png")


if __name__ == "__main__":
    main()

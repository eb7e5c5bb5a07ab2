"""Reconcile: count every view of a big workspace from scratch, against SQL COUNT per view.

    .venv/bin/python bench/reconcile.py            # 100k and 1M conversations (~1 min; the
                                                   # first run also builds them, ~30 s)
    .venv/bin/python bench/reconcile.py --quick    # 100k conversations, fewer SQL samples

DESIGN §7: "reconcile 1M conversations, 1,000 views ≤ 10 s". The workspace is the §7 engine
workload (2,000 teammates, 200 teams, 100 tags, 5 channels; 1,000 views = the 7 folders + 943
custom views of the stated shapes + 50 personal ``$me`` views), scaled to ``--conversations``,
in a SQLite store file built once and cached under ``bench/.cache/`` (keyed by the parameters).

Measured, in one process pinned to one core (``--no-pin`` to use all):

1. livecount's from-scratch pass: ``SQLiteStore.snapshot`` (views + every conversation, one
   read transaction) then ``Engine.count`` of all views over the images — what the relay's
   rebuild and a reconcile in the engine cost. Reported as load + count = total, wall clock
   and CPU. Also ``Engine.count_into`` in chunks of 5,000 images (how a caller on the asyncio
   loop runs it, yielding between chunks) and the counts are checked equal;
2. the baseline: ``SQLiteStore.recount`` (one SQL COUNT per view, the SQL compilation of each
   filter, plus one grouped query per ``$me`` view for the per-teammate adjustments). At 1M
   conversations × 1,000 views that takes very long, so it runs on the 7 folders plus a
   random sample of the other views (``--sample``), and the total is extrapolated linearly
   (folders as measured + sample time × other views / sample size). Both counts are compared
   on the sampled views.

Writes bench/results/reconcile.json and bench/results/reconcile.png and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import platform
import random
import resource
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from livecount.engine import Engine
from livecount.store.base import Counts
from livecount.store.schema import metadata
from livecount.store.sqlite import SQLiteStore
from workload import CHANNELS, STATES, _views

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"
#: Bump when the generated rows change, so stale cached databases are not reused.
FORMAT = 1
NOW = 1_700_000_000_000_000
TARGET_S = 10.0
CHUNK = 5_000


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


# -- the workspace --------------------------------------------------------------------------


def _rows(rng: random.Random, conversations: int, teammates: int, teams: int,
          tags: list[str]) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]],
                                            list[tuple[Any, ...]], tuple[Any, ...]]]:
    """One conversation at a time, as rows: drawn like ``workload.make_workload``'s bodies
    (state 6:1:3, 70% assigned, 90% in a team, 20% priority, 0-3 tags, 0-2 mentions,
    custom.seats 1..120, a random author)."""
    people = range(1, teammates + 1)
    for cid in range(1, conversations + 1):
        state = rng.choices(STATES, (6, 1, 3))[0]
        assignee = rng.randint(1, teammates) if rng.random() < 0.7 else None
        team = rng.randint(1, teams) if rng.random() < 0.9 else None
        priority = rng.random() < 0.2
        channel = rng.choice(CHANNELS)
        tag_rows = [(cid, t) for t in rng.sample(tags, rng.choice((0, 1, 1, 2, 3)))]
        mention_rows = [(cid, "mentions", t)
                        for t in rng.sample(people, rng.choice((0, 0, 1, 2)))]
        seats = rng.randint(1, 120)
        author = rng.randint(1, teammates)
        created = NOW - rng.randint(0, 90 * 86_400) * 1_000_000
        yield ((cid, 1, 1, state, assignee, team, author, priority, channel, created, created,
                None, None), tag_rows, mention_rows, (cid, "seats", None, float(seats), None))


def build_database(path: Path, conversations: int, view_count: int, seed: int,
                   teammates: int = 2_000, teams: int = 200, tag_count: int = 100) -> None:
    """Write the workspace into a new SQLite file at ``path`` (through a temporary file, so
    an interrupted build leaves no half-built cache entry)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    engine = sa.create_engine(f"sqlite:///{tmp}")
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    rng = random.Random(seed)
    tags = [f"tag{i}" for i in range(tag_count)]
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1000000")
        # Indexes are rebuilt after the bulk insert (much faster than maintaining them).
        indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                             "AND sql IS NOT NULL").fetchall()
        for name, _ in indexes:
            db.execute(f'DROP INDEX "{name}"')
        db.execute("BEGIN")
        db.execute("INSERT INTO workspaces (id, name, created_at) VALUES (1, 'bench', ?)",
                   (NOW,))
        db.executemany(
            "INSERT INTO teammates (id, workspace_id, name, email, token_hash) "
            "VALUES (?, 1, ?, ?, ?)",
            [(i, f"Teammate {i}", f"t{i}@bench.test",
              hashlib.sha256(f"bench-{seed}-{i}".encode()).hexdigest())
             for i in range(1, teammates + 1)])
        db.executemany("INSERT INTO teams (id, workspace_id, name) VALUES (?, 1, ?)",
                       [(i, f"Team {i}") for i in range(1, teams + 1)])
        db.executemany("INSERT INTO team_members (team_id, teammate_id) VALUES (?, ?)",
                       [(1 + (m - 1) % teams, m) for m in range(1, teammates + 1)])
        batch: tuple[list[Any], list[Any], list[Any], list[Any]] = ([], [], [], [])

        def flush() -> None:
            db.executemany("INSERT INTO conversations (id, workspace_id, version, state, "
                           "assignee_id, team_id, author_id, priority, channel, created_at, "
                           "updated_at, waiting_since, snoozed_until) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch[0])
            db.executemany("INSERT INTO conversation_tags (conversation_id, tag) "
                           "VALUES (?, ?)", batch[1])
            db.executemany("INSERT INTO conversation_people (conversation_id, field, "
                           "teammate_id) VALUES (?, ?, ?)", batch[2])
            db.executemany("INSERT INTO conversation_custom (conversation_id, key, "
                           "text_value, num_value, bool_value) VALUES (?, ?, ?, ?, ?)",
                           batch[3])
            for rows in batch:
                rows.clear()

        for conversation, tag_rows, mention_rows, custom in _rows(rng, conversations,
                                                                  teammates, teams, tags):
            batch[0].append(conversation)
            batch[1].extend(tag_rows)
            batch[2].extend(mention_rows)
            batch[3].append(custom)
            if len(batch[0]) >= 100_000:
                flush()
        flush()
        views = _views(rng, teammates, teams, tags, total=view_count,
                       personal=min(50, max(0, view_count - 7)))
        db.executemany(
            "INSERT INTO views (id, workspace_id, name, filter, group_by, owner_id, position, "
            "version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(v.id, v.workspace_id, v.name, json.dumps(v.filter), v.group_by, v.owner_id,
              v.position, v.version) for v in views])
        db.execute("COMMIT")
        for _, sql in indexes:
            db.execute(sql)
        db.execute("ANALYZE")
    finally:
        db.close()
    tmp.replace(path)


def database(conversations: int, views: int, seed: int, console: Any) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"reconcile-c{conversations}-v{views}-s{seed}-f{FORMAT}.db"
    if not path.exists():
        with console.status(f"building {path.name} ({conversations:,} conversations, "
                            f"{views:,} views)…"):
            started = time.perf_counter()
            build_database(path, conversations, views, seed)
        console.print(f"built {path} in {time.perf_counter() - started:.0f} s "
                      f"({path.stat().st_size / 2**20:,.0f} MiB)")
    return path


# -- measurements ---------------------------------------------------------------------------


class Clock:
    """Wall-clock and CPU seconds of a block."""

    def __enter__(self) -> Clock:
        gc.collect()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def of_views(counts: Counts, view_ids: set[int]) -> Counts:
    return {key: n for key, n in counts.items() if key[0] in view_ids}


async def measure(path: Path, sample: int, seed: int, console: Any) -> dict[str, Any]:
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        # Warm the file into the page cache (both figures then read from memory alike).
        await store.outbox_position()
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
        with console.status("livecount: snapshot (load)…"), Clock() as load:
            snapshot = await store.snapshot(1)
        images = snapshot.conversations
        with console.status("livecount: Engine.count…"), Clock() as count:
            engine = Engine(snapshot.views)
            counts = engine.count(images, NOW)
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with console.status("livecount: Engine.count_into in chunks…"), Clock() as chunked:
            engine2 = Engine(snapshot.views)
            again: Counts = {}
            for start in range(0, len(images), CHUNK):
                engine2.count_into(again, images[start:start + CHUNK], NOW)
        assert again == counts, "count_into in chunks differs from count"

        views = snapshot.views
        folders = [v for v in views if v.id <= 7]
        others = [v for v in views if v.id > 7]
        sampled = random.Random(seed).sample(others, min(sample, len(others)))
        console.print(f"baseline: SQL recount of the {len(folders)} folders and a sample of "
                      f"{len(sampled)} of the other {len(others)} views…")
        per_view: list[dict[str, Any]] = []
        sql_counts: Counts = {}
        for view in [*folders, *sampled]:
            with Clock() as one:
                recount = await store.recount(1, [view], NOW)
            sql_counts.update(recount.counts)
            per_view.append({"view": view.id, "name": view.name, "seconds": one.wall,
                             "folder": view.id <= 7})
        ids = {v.id for v in (*folders, *sampled)}
        assert of_views(counts, ids) == sql_counts, "engine and SQL counts differ"
        folder_s = sum(r["seconds"] for r in per_view if r["folder"])
        sample_s = sum(r["seconds"] for r in per_view if not r["folder"])
        estimate = folder_s + (sample_s * len(others) / len(sampled) if sampled else 0.0)
        del snapshot, images, engine, engine2, counts, again
        gc.collect()
        return {
            "conversations": None,  # filled by the caller
            "views": len(views),
            "load_s": load.wall, "load_cpu_s": load.cpu,
            "count_s": count.wall, "count_cpu_s": count.cpu,
            "total_s": load.wall + count.wall, "total_cpu_s": load.cpu + count.cpu,
            "count_chunked_s": chunked.wall, "chunk": CHUNK,
            "peak_rss_mib": rss_mib,
            "baseline": {
                "method": "SQLiteStore.recount, one view at a time (one SQL COUNT per view, "
                          "one grouped query per $me view); folders measured, other views "
                          "sampled and extrapolated linearly",
                "folders": len(folders), "folders_s": folder_s,
                "sampled": len(sampled), "sampled_s": sample_s, "others": len(others),
                "estimated_s": estimate,
                "per_view": per_view,
            },
            "counts_checked": "engine == SQL on the measured views; count == count_into",
        }
    finally:
        await store.close()


# -- output ---------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        base = run["baseline"]["estimated_s"]
        ax.barh([0], [base], color="#9aa5b1")
        ax.barh([1], [run["load_s"]], color="#56ccf2", label="snapshot load")
        ax.barh([1], [run["count_s"]], left=[run["load_s"]], color="#2f80ed",
                label="Engine.count")
        ax.set_yticks([1, 0], ["livecount\n(load + count)", "SQL COUNT per view\n(extrapolated)"])
        ax.set_xscale("log")
        ax.set_xlim(0.1, max(base, TARGET_S) * 10)
        ax.set_ylim(-0.6, 1.9)
        ax.axvline(TARGET_S, color="#eb5757", linestyle="--", linewidth=1)
        ax.text(TARGET_S, 1.55, " target 10 s", color="#eb5757", fontsize=8)
        ax.text(run["total_s"], 1, f" {run['total_s']:.1f} s", va="center", fontsize=8)
        ax.text(base, 0, f" {base:,.0f} s", va="center", fontsize=8)
        ax.set_xlabel("seconds (log scale)")
        ax.set_title(f"{run['conversations']:,} conversations × {run['views']:,} views",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("reconcile: recount every view from scratch (one core)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100k conversations only, 20 sampled SQL views")
    parser.add_argument("--conversations", type=int, nargs="+",
                        default=[100_000, 1_000_000])
    parser.add_argument("--views", type=int, default=1_000)
    parser.add_argument("--sample", type=int, default=50,
                        help="non-folder views the SQL baseline runs (then extrapolated)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one core")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    sizes = [100_000] if args.quick else args.conversations
    sample = 20 if args.quick else args.sample
    if not args.no_pin:
        pin_one_core()
    runs = []
    for size in sizes:
        path = database(size, args.views, args.seed, console)
        run = asyncio.run(measure(path, sample, args.seed, console))
        run["conversations"] = size
        runs.append(run)
        console.print(f"{size:,}: load {run['load_s']:.2f} s + count {run['count_s']:.2f} s = "
                      f"{run['total_s']:.2f} s; SQL ≈ {run['baseline']['estimated_s']:,.0f} s")

    table = Table(title=f"reconcile: {args.views:,} views recounted from scratch "
                        f"({'one core' if not args.no_pin else 'all cores'})")
    for column in ("conversations", "figure", "seconds", "CPU s", "× baseline time",
                   "≤ 10 s?"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for run in runs:
        size = f"{run['conversations']:,}"
        base = run["baseline"]
        ratio = run["total_s"] / base["estimated_s"]
        met = "✓" if run["total_s"] <= TARGET_S else "✗"
        table.add_row(size, "livecount: snapshot load (SQLiteStore.snapshot)",
                      f"{run['load_s']:.2f}", f"{run['load_cpu_s']:.2f}", "", "")
        table.add_row(size, "livecount: Engine(views) + Engine.count", f"{run['count_s']:.2f}",
                      f"{run['count_cpu_s']:.2f}", "", "")
        table.add_row(size, "[b]livecount: total[/b]", f"[b]{run['total_s']:.2f}[/b]",
                      f"{run['total_cpu_s']:.2f}",
                      f"{ratio:.4f} ({1 / ratio:,.0f}× faster)", met)
        table.add_row(size, f"  (count as Engine.count_into in chunks of {run['chunk']:,})",
                      f"{run['count_chunked_s']:.2f}", "", "", "")
        table.add_row(size, f"SQL COUNT per view (SQLiteStore.recount): extrapolated from "
                            f"{base['folders']} folders + {base['sampled']} sampled of "
                            f"{base['others']} other views",
                      f"{base['estimated_s']:,.1f}", "", "1", "")
    console.print(table)
    results = {
        "benchmark": "reconcile",
        "command": "python bench/reconcile.py" + (" --quick" if args.quick else ""),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{'all cores' if args.no_pin else 'pinned to one'}",
        "target": "reconcile 1M conversations, 1,000 views <= 10 s (DESIGN §7)",
        "workload": {"views": args.views, "teammates": 2_000, "teams": 200, "tags": 100,
                     "channels": len(CHANNELS), "seed": args.seed,
                     "views_mix": "7 folders + custom views (40% state AND team_id AND "
                                  "channel !=, 30% state AND tags contains AND priority, 20% "
                                  "state AND (team_id OR tags contains), 10% state AND "
                                  "channel AND custom.seats >=) + 50 personal $me views"},
        "runs": runs,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.output / f"reconcile{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.output / f"reconcile{suffix}.png")
    console.print(f"wrote {args.output}/reconcile{suffix}.json and reconcile{suffix}.png")


if __name__ == "__main__":
    main()

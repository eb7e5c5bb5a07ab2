"""The ``livecount`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

DEFAULT_STORE = "sqlite:///" + os.path.join(os.getcwd(), "livecount.db")


def _seconds_or_off(text: str) -> float | None:
    """A positive number of seconds, or 0 for off (None)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number, got {text!r}")
    return value or None


def _reconcile(args: argparse.Namespace) -> int:
    from .reconcile import reconcile_store, render

    results = asyncio.run(reconcile_store(args.store, repair=not args.dry_run))
    render(results)
    return 1 if any(r.drifted for r in results) else 0


def _migrate(args: argparse.Namespace) -> int:
    """Bring the store's schema to this version of livecount (idempotent)."""
    from .store.migrations import migrate_store

    before, after = asyncio.run(migrate_store(args.store))
    if before == after:
        print(f"livecount migrate: the schema is at version {after}, nothing to do")
    else:
        print(f"livecount migrate: migrated the schema from version {before} to {after}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Run the HTTP API and the stream gateway under uvicorn: in this process, or in
    ``--workers N`` processes under the supervisor (livecount.supervisor)."""
    from .exceptions import ValidationError
    from .memory import resolve_watermarks
    from .service import Settings
    from .supervisor import WorkerSpec, run_single, run_supervisor

    workers: int | None = args.workers
    shared = not args.broker.startswith("memory:")
    counters: int = args.counter_workers
    if not shared and counters != 1:
        raise ValidationError("--counter-workers needs a shared counter state (--broker "
                              "redis://…); with memory:// every process counts on its own")
    if shared and workers is None and counters > 1:
        raise ValidationError("--counter-workers above 1 needs --workers (the supervisor runs "
                              "them), or run `livecount worker` processes")
    # With a memory broker every worker process follows the store's outbox with a relay and
    # counts of its own (each one exact; N times the counting work). A write through one
    # worker reaches another's relay by its poll on SQLite (NOTIFY wakes it on PostgreSQL):
    # poll often when there are several, or when counting happens in other processes.
    poll = 0.05 if (workers is not None and workers > 1) or shared else 1.0
    # Shared state: under --workers the gateways only serve and the supervisor runs the
    # counter workers; a lone process serves and counts, unless --counter-workers 0.
    role = "gateway" if shared and (workers is not None or counters == 0) else "all"
    try:
        marks = resolve_watermarks(args.soft_memory, args.hard_memory, workers=workers or 1)
    except ValueError as error:
        raise ValidationError(str(error), "--soft-memory/--hard-memory") from None
    max_requests = args.max_requests or None
    jitter = args.max_requests_jitter
    if jitter is None:
        jitter = max_requests // 10 if max_requests else 0
    settings = Settings(store_url=args.store, broker_url=args.broker,
                        flush_interval=args.flush_interval,
                        reconcile_every=args.reconcile_every,
                        outbox_retention=args.outbox_retention,
                        soft_memory_bytes=marks.soft, hard_memory_bytes=marks.hard,
                        memory_limit_bytes=marks.limit.bytes,
                        max_streams=args.max_streams or None,
                        max_streams_per_token=args.max_streams_per_token,
                        drain_timeout=args.drain_timeout, relay_poll_interval=poll, role=role,
                        shards=args.shards, lease_ttl=args.lease_ttl)
    counter_command: tuple[str, ...] = ()
    if shared and workers is not None and counters:
        counter_command = (sys.executable, "-m", "livecount", "worker", "--store", args.store,
                           "--broker", args.broker, "--shards", str(args.shards),
                           "--lease-ttl", str(args.lease_ttl),
                           "--reconcile-every", str(args.reconcile_every or 0),
                           "--outbox-retention", str(args.outbox_retention or 0))
    spec = WorkerSpec(settings, host=args.host, port=args.port, log_level=args.log_level,
                      max_requests=max_requests, max_requests_jitter=jitter,
                      counter_command=counter_command,
                      counter_workers=counters if counter_command else 0)
    if workers is None:
        return run_single(spec)
    return run_supervisor(spec, workers)


def _worker(args: argparse.Namespace) -> int:
    """Count the workspaces this process holds leases on, until SIGTERM/SIGINT."""
    from .exceptions import ValidationError
    from .service import Settings
    from .worker import run_worker

    if not args.broker.startswith(("redis://", "rediss://")):
        raise ValidationError("a counter worker needs a shared counter state and bus: "
                              "--broker redis://…")
    # SQLite has no NOTIFY to wake a relay in another process: poll often there
    poll = 0.05 if args.store.startswith("sqlite") else 1.0
    settings = Settings(store_url=args.store, broker_url=args.broker, role="worker",
                        reconcile_every=args.reconcile_every,
                        outbox_retention=args.outbox_retention, relay_poll_interval=poll,
                        shards=args.shards, lease_ttl=args.lease_ttl)
    return run_worker(settings, host=args.host, port=args.port)


def _soak(args: argparse.Namespace) -> int:
    """Drive a server with requests and stream cycles; pass when its resources stay flat."""
    from .soak import SoakOptions, run_soak_command

    return run_soak_command(SoakOptions(
        url=args.url, admin_token=args.admin_token, requests=args.requests,
        cycles=args.cycles, concurrency=args.concurrency, warmup=args.warmup,
        settle=args.settle, rss_tolerance=args.rss_tolerance,
        fd_tolerance=args.fd_tolerance, out=args.out,
        store=args.store, sample_every=args.sample_every,
        progress=not args.no_progress))


def _demo(args: argparse.Namespace) -> int:
    """Seed a realistic workspace, serve it and simulate a team at work until Ctrl-C."""
    from .demo.run import DemoOptions, run_demo

    return run_demo(DemoOptions(store=args.store, host=args.host, port=args.port,
                                rate=args.rate, conversations=args.conversations,
                                seed=args.seed, duration=args.duration, keep=args.keep))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livecount",
        description="Live, exact conversation counts for every folder and view of a team inbox.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reconcile = commands.add_parser(
        "reconcile", help="recount every view by SQL, compare with the counter state, repair",
        description="Recount every view with SQL inside one snapshot, compare with the "
                    "counter state at the same outbox position, repair and report drift. "
                    "Exit status 1 when drift was found.")
    reconcile.add_argument("--store", default=DEFAULT_STORE,
                           help="store URL (default: %(default)s)")
    reconcile.add_argument("--dry-run", action="store_true", help="report drift, repair nothing")
    reconcile.set_defaults(func=_reconcile)

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the store's schema (idempotent)",
        description="Apply the schema migrations the store lacks, in one transaction, under "
                    "a lock, so running it twice or from several hosts at once is safe. "
                    "Every start does the same; run it first to upgrade ahead of a deploy.")
    migrate.add_argument("--store", default=DEFAULT_STORE, help="store URL (default: %(default)s)")
    migrate.set_defaults(func=_migrate)

    serve = commands.add_parser(
        "serve", help="serve the HTTP API and the live count streams",
        description="Serve the JSON API, the WebSocket/SSE count streams and the operations "
                    "endpoints. The admin token comes from LIVECOUNT_ADMIN_TOKEN, or is "
                    "generated and printed once at first start.")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--store", default=DEFAULT_STORE, help="store URL (default: %(default)s)")
    serve.add_argument("--broker", default="memory://",
                       help="counter state and bus URL: memory:// (this process) or "
                            "redis://host:port/db[?prefix=…] (a Redis counter state and "
                            "Redis Streams bus shared by every process; counting is split "
                            "between counter workers by leases) (default: %(default)s)")
    serve.add_argument("--reconcile-every", type=_seconds_or_off, default=300.0,
                       metavar="SECONDS",
                       help="recount each workspace against the store this often, spread over "
                            "workspaces, repairing drift; 0 turns it off (default: "
                            "%(default)s)")
    serve.add_argument("--outbox-retention", type=_seconds_or_off, default=24 * 3600.0,
                       metavar="SECONDS",
                       help="prune applied outbox entries older than this; 0 keeps them "
                            "forever (default: %(default)s)")
    serve.add_argument("--flush-interval", type=float, default=0.05,
                       help="seconds between a stream connection's flushes (default: "
                            "%(default)s)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn log level (default: %(default)s)")
    serve.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="run N worker processes on the port under a supervisor that "
                            "replaces a worker that dies, recycles one past the hard memory "
                            "watermark or --max-requests (its replacement started first, "
                            "then it drains: stream clients are told to reconnect), rolls "
                            "every worker on SIGHUP and drains all on SIGTERM. With "
                            "--broker memory:// each worker counts on its own (exact, N times "
                            "the counting work; a client moving to another worker gets a "
                            "snapshot of that worker's epoch); with --broker redis:// the N "
                            "workers only serve and the supervisor also runs "
                            "--counter-workers counter workers. Default: one process, "
                            "no supervisor (past the hard watermark it drains and exits with "
                            "status 75 for the process manager to restart it)")
    serve.add_argument("--counter-workers", type=_non_negative_int, default=1, metavar="M",
                       help="with --broker redis://: counter worker processes to run (under "
                            "--workers, the supervisor runs and restarts them); 0 = this "
                            "host only serves, counting is done by `livecount worker` "
                            "processes elsewhere (default: %(default)s)")
    _lease_options(serve)
    serve.add_argument("--soft-memory", default=None, metavar="SIZE",
                       help="resident memory above which /readyz answers 503: bytes "
                            "(800MiB, 1.5G) or a percentage of this worker's share of the "
                            "memory limit (cgroup v2/v1 limit, else host memory, divided by "
                            "the workers); env LIVECOUNT_SOFT_MEMORY (default: 70%%)")
    serve.add_argument("--hard-memory", default=None, metavar="SIZE",
                       help="resident memory above which the worker is recycled; same forms; "
                            "env LIVECOUNT_HARD_MEMORY (default: 85%%)")
    serve.add_argument("--max-requests", type=_non_negative_int,
                       default=os.environ.get("LIVECOUNT_MAX_REQUESTS") or "0",
                       metavar="N",
                       help="recycle a worker after N HTTP requests (plus jitter); 0 = never; "
                            "env LIVECOUNT_MAX_REQUESTS (default: %(default)s)")
    serve.add_argument("--max-requests-jitter", type=_non_negative_int, default=None,
                       metavar="N",
                       help="add a random 0..N to --max-requests per worker, so workers do "
                            "not recycle together (default: a tenth of --max-requests)")
    serve.add_argument("--max-streams", type=_non_negative_int, default=0, metavar="N",
                       help="stream connections one process admits; past it 503 with "
                            "Retry-After, and /readyz turns false from 90%% of it (default, "
                            "0: the open-file limit less 10%%, keeping back at least 64)")
    serve.add_argument("--max-streams-per-token", type=_non_negative_int, default=100,
                       metavar="N",
                       help="stream connections one token may hold in one process; past it "
                            "429 with Retry-After; 0 = no cap (default: %(default)s)")
    serve.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="on shutdown or recycle, how long to wait for stream clients to "
                            "take their reconnect message and go (default: %(default)s)")
    serve.set_defaults(func=_serve)

    worker = commands.add_parser(
        "worker", help="count without serving: a counter worker for a shared (Redis) state",
        description="Follow the store's outbox and keep the counts of the workspaces this "
                    "process holds leases on in the shared counter state and bus "
                    "(--broker redis://…). Run any number: workspaces are split by shard, a "
                    "worker that dies loses its leases after --lease-ttl and the others take "
                    "its shards over (counting them again from the store). SIGTERM gives the "
                    "leases back at once.")
    worker.add_argument("--store", default=DEFAULT_STORE, help="store URL (default: %(default)s)")
    worker.add_argument("--broker", required=True,
                        help="the shared counter state and bus: redis://host:port/db[?prefix=…]")
    worker.add_argument("--reconcile-every", type=_seconds_or_off, default=300.0,
                        metavar="SECONDS",
                        help="recount each owned workspace this often, repairing drift; 0 "
                             "turns it off (default: %(default)s)")
    worker.add_argument("--outbox-retention", type=_seconds_or_off, default=24 * 3600.0,
                        metavar="SECONDS",
                        help="prune applied outbox entries older than this (never past the "
                             "slowest live worker); 0 keeps them (default: %(default)s)")
    _lease_options(worker)
    worker.add_argument("--host", default="127.0.0.1",
                        help="bind address of --port (default: %(default)s)")
    worker.add_argument("--port", type=int, default=None,
                        help="serve GET /healthz and GET /metrics on this port (default: none)")
    worker.set_defaults(func=_worker)

    demo = commands.add_parser(
        "demo", help="try it: a seeded workspace, the server, and a simulated team at work",
        description="Seed a realistic workspace (3 teams, 12 teammates, conversations, custom "
                    "views), serve it, print a login URL per teammate, and change "
                    "conversations at a steady rate until Ctrl-C.")
    demo.add_argument("--store", default=None,
                      help="store URL (default: a SQLite file in a fresh temporary directory, "
                           "removed at exit)")
    demo.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8000,
                      help="port; 0 picks a free one (default: %(default)s)")
    demo.add_argument("--rate", type=float, default=5.0,
                      help="simulated changes per second (default: %(default)s)")
    demo.add_argument("--conversations", type=int, default=2000,
                      help="conversations to seed (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=1,
                      help="random seed for the data and the simulation (default: %(default)s)")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the temporary database directory at exit")
    demo.set_defaults(func=_demo)

    soak = commands.add_parser(
        "soak", help="load a server for a while and check its threads, tasks, fds and "
                     "memory come back flat",
        description="Drive a livecount server with a mix of API requests and stream "
                    "connect/disconnect cycles, sample the threads, asyncio tasks, open fds and "
                    "resident memory of its processes (from /metrics), and pass when threads and "
                    "tasks return to their warm values, fds within --fd-tolerance and memory "
                    "within --rss-tolerance of warm. Writes a PNG chart and a JSON of the series."
                    " Without --url it starts `livecount serve` on a fresh SQLite store itself. "
                    "Exit status 1 when it fails. DESIGN's full run is --requests 100000 --cycles"
                    " 10000.")
    soak.add_argument("--url", default=None,
                      help="a running server (default: start one on a temporary store)")
    soak.add_argument("--admin-token", default=os.environ.get("LIVECOUNT_ADMIN_TOKEN"),
                      help="the server's admin token, to create the soak's workspace "
                           "(default: LIVECOUNT_ADMIN_TOKEN; not needed without --url)")
    soak.add_argument("--requests", type=int, default=10_000,
                      help="API requests to send (default: %(default)s)")
    soak.add_argument("--cycles", type=int, default=1_000,
                      help="stream connect/snapshot/disconnect cycles (default: %(default)s)")
    soak.add_argument("--concurrency", type=int, default=8,
                      help="requests and cycles in flight at once (default: %(default)s)")
    soak.add_argument("--warmup", type=float, default=0.1,
                      help="share of the load run first to warm the server up; its figures "
                           "after it are the warm values (default: %(default)s)")
    soak.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                      help="how long the figures may take to come back after the load "
                           "(default: %(default)s)")
    soak.add_argument("--rss-tolerance", type=float, default=0.05,
                      help="allowed resident memory growth over warm (default: %(default)s)")
    soak.add_argument("--fd-tolerance", type=int, default=8,
                      help="open fds may end this many above warm (connection pools open "
                           "lazily up to their size; a leak grows past it) (default: "
                           "%(default)s)")
    soak.add_argument("--sample-every", type=float, default=0.5, metavar="SECONDS",
                      help="sampling period (default: %(default)s)")
    soak.add_argument("--out", default="soak",
                      help="write OUT.json and OUT.png (default: %(default)s)")
    soak.add_argument("--store", default=None,
                      help="store URL of the server it starts (default: a temporary SQLite "
                           "file)")
    soak.add_argument("--no-progress", action="store_true", help="no progress display")
    soak.set_defaults(func=_soak)
    return parser


def _lease_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=_positive_int, default=64, metavar="N",
                        help="shards of workspaces the counter workers split (every process "
                             "of a deployment must use the same) (default: %(default)s)")
    parser.add_argument("--lease-ttl", type=_positive_float, default=10.0, metavar="SECONDS",
                        help="a counter worker's leases end this long after its last renewal "
                             "(the takeover delay after a crash) (default: %(default)s)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {low} or more, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole(text, 0)


def main(argv: Sequence[str] | None = None) -> int:
    from .exceptions import LivecountError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except LivecountError as error:  # bad URL, bad option value: a message, not a traceback
        parser.exit(2, f"livecount: error: {error}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

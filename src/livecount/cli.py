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


def _serve(args: argparse.Namespace) -> int:
    """Run the HTTP API and the stream gateway in this process under uvicorn."""
    import uvicorn

    from .server.app import Server, create_app, server_options
    from .server.logs import install_redaction
    from .service import Settings

    settings = Settings(store_url=args.store, broker_url=args.broker,
                        flush_interval=args.flush_interval,
                        reconcile_every=args.reconcile_every,
                        outbox_retention=args.outbox_retention)
    app = create_app(settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on",
                            log_level=args.log_level, timeout_graceful_shutdown=10,
                            **server_options(settings))
    install_redaction()  # after Config (it sets up uvicorn's handlers): no token in any log
    Server(config, app, tune_gc=True).run()
    return 0


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

    serve = commands.add_parser(
        "serve", help="serve the HTTP API and the live count streams",
        description="Serve the JSON API, the WebSocket/SSE count streams and the operations "
                    "endpoints. The admin token comes from LIVECOUNT_ADMIN_TOKEN, or is "
                    "generated and printed once at first start.")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--store", default=DEFAULT_STORE, help="store URL (default: %(default)s)")
    serve.add_argument("--broker", default="memory://",
                       help="counter state and bus URL; memory:// is the only backend so far "
                            "(default: %(default)s)")
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
    serve.set_defaults(func=_serve)

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
    return parser


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

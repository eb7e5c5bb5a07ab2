"""The ``livecount`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

DEFAULT_STORE = "sqlite:///" + os.path.join(os.getcwd(), "livecount.db")


def _reconcile(args: argparse.Namespace) -> int:
    from .reconcile import reconcile_store, render

    results = asyncio.run(reconcile_store(args.store, repair=not args.dry_run))
    render(results)
    return 1 if any(r.drifted for r in results) else 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

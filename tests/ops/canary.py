"""The canary: livecount with the incident's bug, to prove the safety net catches it.

DESIGN §1: a counters rewrite started a new thread on every web request and never cleaned it
up; memory climbed for hours until the fleet ran out. This app variant does exactly that:
every HTTP request starts a thread that waits forever and is never joined, holding
``LIVECOUNT_CANARY_BALLAST`` bytes (default 64 KiB) like the leaked threads held their
per-request state. It lives in the test suite only, never in the shipped package.

``python -m tests.ops.canary --port P --store URL`` serves it as ``livecount serve`` would
(one process); :mod:`tests.ops.serve` runs it under the supervisor.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Final

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from livecount.server.app import create_app as create_livecount_app
from livecount.service import Settings

__all__ = ["create_app"]

#: set by nobody: the leaked threads wait on it forever
_NEVER: Final = threading.Event()


def _hold(ballast: bytes) -> None:
    _NEVER.wait()
    del ballast  # pragma: no cover - never reached


class LeakAThreadPerRequest:
    """The bug: a thread per HTTP request, started and forgotten."""

    def __init__(self, app: ASGIApp, ballast: int) -> None:
        self.app = app
        self.ballast = ballast
        self.leaked = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.leaked += 1
            # b"x" * n writes every page, so the ballast is resident (bytes(n) would not be)
            thread = threading.Thread(target=_hold, args=(b"x" * self.ballast,), daemon=True,
                                      name=f"canary-leak-{self.leaked}")
            thread.start()
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> Starlette:
    """livecount's app, plus the leak (same signature as livecount.server.app.create_app)."""
    app = create_livecount_app(settings)
    ballast = int(os.environ.get("LIVECOUNT_CANARY_BALLAST", str(64 << 10)))
    app.add_middleware(LeakAThreadPerRequest, ballast=ballast)
    return app


def main(argv: list[str] | None = None) -> int:
    from livecount.supervisor import WorkerSpec, run_single

    parser = argparse.ArgumentParser(prog="canary")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", required=True)
    args = parser.parse_args(argv)
    settings = Settings(store_url=args.store, relay_poll_interval=0.05)
    spec = WorkerSpec(settings, port=args.port, log_level="warning",
                      app_factory="tests.ops.canary:create_app", tune_gc=False)
    return run_single(spec)


if __name__ == "__main__":
    sys.exit(main())

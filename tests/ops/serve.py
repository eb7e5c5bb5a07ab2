"""Run livecount's supervisor from a test: ``python -m tests.ops.serve --workers N ...``.

The supervisor's tests run several workers, each serving its own SQLite + memory stack over
one file, and some run the test-only canary app, which the command line cannot serve: so
they call :func:`livecount.supervisor.run_supervisor` directly, here.
"""

from __future__ import annotations

import argparse
import sys

from livecount.service import Settings
from livecount.supervisor import WorkerSpec, run_supervisor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.ops.serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--app", default="livecount.server.app:create_app")
    parser.add_argument("--soft-memory", type=int, default=1 << 40)
    parser.add_argument("--hard-memory", type=int, default=2 << 40)
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--admin-token", default=None)
    args = parser.parse_args(argv)
    settings = Settings(store_url=args.store, admin_token=args.admin_token,
                        relay_poll_interval=0.05, flush_interval=0.02,
                        soft_memory_bytes=args.soft_memory, hard_memory_bytes=args.hard_memory,
                        drain_timeout=args.drain_timeout, slow_client_timeout=5.0)
    spec = WorkerSpec(settings, port=args.port, log_level="info", app_factory=args.app,
                      max_requests=args.max_requests or None, graceful_timeout=5.0,
                      tune_gc=False)
    return run_supervisor(spec, args.workers, ready_timeout=30.0)


if __name__ == "__main__":
    sys.exit(main())

"""``livecount worker``: a counter worker, counting without serving.

It follows the store's outbox with a relay and writes the counts of the workspaces it owns
to the shared counter state and bus (Redis), under leases on shards of workspaces
(:mod:`livecount.leases`), until SIGTERM/SIGINT; then it stops writing and gives its leases
back, so another worker takes its shards over at once. Run any number, anywhere that reaches
the store and Redis; gateways (``livecount serve --counter-workers 0``, or the gateways of
``serve --workers N``) serve what they count.

With ``--port`` it also answers ``GET /healthz`` and ``GET /metrics`` (its relay and lease
figures) for the process manager and Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .server.metrics import Metrics
from .service import Service, Settings

__all__ = ["health_app", "run_worker"]

log = logging.getLogger("livecount.worker")


def health_app(service: Service) -> Starlette:
    """`GET /healthz` (the relay task runs) and `GET /metrics` of a counter worker."""
    metrics = Metrics()

    async def healthz(request: Request) -> Response:
        relay = service.relay
        ok = relay is not None and relay.running
        return PlainTextResponse("ok" if ok else "relay not running", 200 if ok else 503)

    async def scrape(request: Request) -> Response:
        await metrics.refresh(request.app)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app = Starlette(routes=[Route("/healthz", healthz), Route("/metrics", scrape)])
    app.state.service = service
    app.state.draining = False
    app.state.metrics = metrics
    return app


async def _run(settings: Settings, host: str, port: int | None) -> None:
    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    server: uvicorn.Server | None = None
    serving: asyncio.Task[None] | None = None
    try:
        leases = service.leases
        log.info("counter worker %s started (holds %d shards)",
                 leases.worker_id if leases else "-", len(leases.held) if leases else 0)
        if port is not None:
            config = uvicorn.Config(health_app(service), host=host, port=port,
                                    log_level="warning", lifespan="off")
            server = uvicorn.Server(config)
            # _serve: serve() would take SIGTERM/SIGINT over from the handlers above
            serving = asyncio.create_task(server._serve(), name="livecount-worker-http")
        await stop.wait()
        log.info("counter worker stopping: giving its leases back")
    finally:
        if server is not None and serving is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
        await service.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_worker(settings: Settings, *, host: str = "127.0.0.1", port: int | None = None
               ) -> int:
    """Count until SIGTERM/SIGINT; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    asyncio.run(_run(settings, host, port))
    return 0

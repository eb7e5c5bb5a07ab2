"""The ASGI application: routes, pure-ASGI middleware, error handlers and the lifespan.

:func:`create_app` builds the service and the stream gateway up front (nothing is opened
until the lifespan starts), so the route table is complete before the first request and the
gateway's routes can be bound to it. The lifespan starts the service, then the gateway, and
stops them in reverse order.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from ..service import Service, Settings
from . import api, openapi, ops
from .admission import Admission, AdmissionMiddleware
from .body import BodyLimit
from .errors import exception_handlers
from .metrics import Metrics, MetricsMiddleware

__all__ = ["Server", "create_app", "drain", "server_options", "tune_gc"]


def _optional(name: str) -> Any | None:
    """The module ``name``, or None while it does not exist (parts written alongside)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _gateway_module() -> Any | None:
    return _optional("livecount.server.gateway")


def _gateway(service: Service) -> Any | None:
    module = _gateway_module()
    return None if module is None else module.Gateway(service)


def _web_routes() -> list[BaseRoute]:
    """The inbox page (``/``) and its assets (``/static/``), when the web module is there."""
    module = _optional("livecount.web")
    return [] if module is None else list(module.web_routes())


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options the app relies on (the gateway's WebSocket settings)."""
    module = _gateway_module()
    options = getattr(module, "uvicorn_options", None)
    return {} if options is None else dict(options(settings))


async def drain(app: Starlette) -> None:
    """Stop being ready and end every stream (each is told to reconnect elsewhere)."""
    app.state.draining = True
    gateway = app.state.gateway
    if gateway is not None:
        await gateway.stop()


class Server(uvicorn.Server):
    """uvicorn, draining the app's streams first when it shuts down.

    uvicorn waits for open connections to end *before* it runs the lifespan shutdown, and a
    stream never ends by itself: so the streams are drained here, ahead of that wait.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette, *,
                 tune_gc: bool = False) -> None:
        super().__init__(config)
        self._livecount_app = app
        self._tune_gc = tune_gc

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._tune_gc:
            tune_gc()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # stop accepting first, so the clients told to reconnect go to another process
        for server in getattr(self, "servers", ()):
            server.close()
        await drain(self._livecount_app)
        await super().shutdown(sockets)


def tune_gc() -> None:
    """For a process that serves many long-lived connections: move everything alive after
    start-up out of the collector's sight and make full collections 10× rarer. A full
    collection walks every tracked object of every connection (~140 each); with thousands of
    connections that was a 0.4 s pause, the tail of the stream latency. Cycles are still
    collected, later. Only the process owner calls this (``livecount serve``, the demo)."""
    gc.collect()
    gc.freeze()
    first, second, _ = gc.get_threshold()
    gc.set_threshold(first, second, 100)


def create_app(settings: Settings) -> Starlette:
    """The app for ``settings``; ``app.state`` holds its ``service``, ``gateway`` (None
    without the stream module), ``metrics``, stream ``admission`` control, the ``draining``
    flag and the count of ``internal_errors`` (requests that reached the 500 handler: each
    one is a bug)."""
    service = Service(settings)
    gateway = _gateway(service)
    metrics = Metrics()
    admission = Admission(settings.max_streams, settings.max_streams_per_token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            if gateway is not None:
                await gateway.start()
            try:
                yield
            finally:
                await drain(app)
        finally:
            await service.stop()

    web = _web_routes()
    routes: list[BaseRoute] = [*ops.routes(),
                               *openapi.routes(streams=gateway is not None, web=bool(web)),
                               *api.routes()]
    if gateway is not None:
        routes += gateway.routes()
    routes += web
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AdmissionMiddleware, admission=admission,
                               route=None if gateway is None else gateway.endpoint,
                               metrics=metrics),
                    Middleware(MetricsMiddleware, metrics=metrics),
                    Middleware(BodyLimit, max_bytes=settings.max_body_bytes)],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.draining = False
    app.state.internal_errors = 0
    return app

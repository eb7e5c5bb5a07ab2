"""Operations endpoints: liveness, readiness (sheds load when draining or memory is high),
and the Prometheus scrape."""

from __future__ import annotations

import psutil
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .errors import JSONResponse, error_response
from .metrics import CONTENT_TYPE, Metrics

__all__ = ["routes"]


async def healthz(request: Request) -> Response:
    """Alive: the event loop answers. Says nothing about the store (that is readiness)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready for new clients, unless draining or past the soft memory watermark: a load
    balancer then sends new work elsewhere while this process finishes what it has."""
    state = request.app.state
    service = state.service
    if state.draining or getattr(service, "draining", False):
        return error_response(503, "unavailable", "draining")
    rss = psutil.Process().memory_info().rss
    soft = service.settings.soft_memory_bytes
    if rss > soft:
        return error_response(503, "unavailable",
                              f"resident memory {rss} bytes is above the soft watermark {soft}")
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    collected: Metrics = request.app.state.metrics
    await collected.refresh(request.app)
    return Response(collected.render(), headers={"Content-Type": CONTENT_TYPE})


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]

"""Operations endpoints: liveness, readiness (sheds load when draining, when memory is high
or near the stream connection cap), and the Prometheus scrape."""

from __future__ import annotations

from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .errors import JSONResponse, error_response
from .metrics import CONTENT_TYPE, Metrics

__all__ = ["not_ready_reason", "routes"]


async def healthz(request: Request) -> Response:
    """Alive: the event loop answers. Says nothing about the store (that is readiness)."""
    return JSONResponse({"status": "ok"})


def not_ready_reason(app: Any, rss: int | None = None) -> str | None:
    """Why ``app`` should not take new work now (None: it should): draining, resident memory
    above the soft watermark, or stream connections near the process cap."""
    state = app.state
    service = state.service
    if state.draining or getattr(service, "draining", False):
        return "draining"
    if rss is None:
        rss = psutil.Process().memory_info().rss
    soft = service.settings.soft_memory_bytes
    if rss > soft:
        return f"resident memory {rss} bytes is above the soft watermark {soft}"
    admission = getattr(state, "admission", None)
    if admission is not None and admission.near_cap:
        return (f"{admission.active} stream connections: near the cap of "
                f"{admission.max_streams}")
    return None


async def readyz(request: Request) -> Response:
    """Ready for new clients, unless draining, past the soft memory watermark or near the
    stream connection cap: a load balancer then sends new work elsewhere while this process
    finishes what it has."""
    reason = not_ready_reason(request.app)
    if reason is not None:
        return error_response(503, "unavailable", reason)
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

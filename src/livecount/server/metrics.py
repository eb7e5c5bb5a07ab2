"""Prometheus metrics: one registry per app, request metrics, and live figures at scrape time.

A registry per app (not the global one) lets several apps live in one process (tests). The
request middleware is pure ASGI: it wraps ``send`` to see the status and adds no task. The
process and relay figures are read when ``/metrics`` is scraped (:meth:`Metrics.refresh`),
never sampled in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any, Final

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsMiddleware"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0)

#: name → (kind, help) of the figures read at scrape time.
_LIVE: Final[dict[str, tuple[str, str]]] = {
    "livecount_stream_connections": ("gauge", "Open WebSocket and SSE stream connections."),
    "livecount_stream_opened": ("counter", "Stream connections opened."),
    "livecount_stream_slow_clients": ("counter", "Streams closed because the client could "
                                      "not keep up."),
    "livecount_relay_entries_applied": ("counter", "Outbox entries the relay has applied."),
    "livecount_relay_errors": ("counter", "Relay steps that failed (and were retried)."),
    "livecount_outbox_lag_entries": ("gauge", "Outbox entries committed, not yet applied."),
    "livecount_drift_repaired": ("counter", "Counters the reconciler found drifted, repaired."),
    "livecount_reconciles": ("counter", "Workspace reconciles completed (scheduled and on "
                             "demand)."),
    "livecount_poison_entries": ("counter", "Outbox entries that could not be applied: "
                                 "recorded, skipped, their workspace recounted."),
    "livecount_reopens_written": ("counter", "Snoozed conversations reopened by the relay."),
    "livecount_outbox_pruned": ("counter", "Applied outbox entries pruned after the "
                                "retention."),
    "livecount_schedule_entries": ("gauge", "Pending time-driven entries (flips and "
                                   "reopens) held in memory."),
    "livecount_process_threads": ("gauge", "Threads of this process."),
    "livecount_process_resident_memory_bytes": ("gauge", "Resident set size of this process."),
    "livecount_process_open_fds": ("gauge", "Open file descriptors of this process."),
    "livecount_asyncio_tasks": ("gauge", "asyncio tasks alive on the serving event loop."),
    "livecount_draining": ("gauge", "1 while this process is draining (not ready)."),
}


class _LiveCollector(Collector):
    """Yields the figures :meth:`Metrics.refresh` last stored."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self.values)

    @staticmethod
    def _families(values: dict[str, float]) -> Iterator[Metric]:
        for name, (kind, help_text) in _LIVE.items():
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, help_text)
            else:
                family = GaugeMetricFamily(name, help_text)
            if name in values:
                family.add_metric([], values[name])
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "livecount_http_requests", "HTTP requests answered, by route template, method and "
            "status.", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "livecount_http_request_duration_seconds", "Time to answer an HTTP request (stream "
            "responses excluded).", ["route", "method"], buckets=_LATENCY_BUCKETS,
            registry=self.registry)
        self._live = _LiveCollector()
        self.registry.register(self._live)
        self._process = psutil.Process()

    async def refresh(self, app: Any) -> None:
        """Read the live figures of ``app`` (its service, relay, gateway) and this process."""
        service = app.state.service
        relay = service.relay
        gateway = getattr(app.state, "gateway", None)
        connections = getattr(gateway, "connections", 0)
        if not isinstance(connections, int | float):
            connections = len(connections)
        values: dict[str, float] = {
            "livecount_stream_connections": connections,
            "livecount_stream_opened": getattr(gateway, "opened", 0),
            "livecount_stream_slow_clients": getattr(gateway, "slow_clients", 0),
            "livecount_relay_entries_applied": relay.entries_applied,
            "livecount_relay_errors": relay.errors,
            "livecount_drift_repaired": relay.drift_repaired,
            "livecount_reconciles": relay.reconciles,
            "livecount_poison_entries": relay.poison_entries,
            "livecount_reopens_written": relay.reopens_written,
            "livecount_outbox_pruned": relay.outbox_pruned,
            "livecount_schedule_entries": relay.scheduled,
            "livecount_process_threads": self._process.num_threads(),
            "livecount_process_resident_memory_bytes": self._process.memory_info().rss,
            "livecount_process_open_fds": self._process.num_fds(),
            "livecount_asyncio_tasks": len(asyncio.all_tasks()),
            "livecount_draining": 1 if app.state.draining else 0,
        }
        # the store is down: the lag is unknown, the rest still reports
        with contextlib.suppress(Exception):
            values["livecount_outbox_lag_entries"] = await relay.lag()
        self._live.values = values

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class MetricsMiddleware:
    """Count and time HTTP requests by route template (``/api/workspaces/{workspace_id}``),
    never by raw path, so the label set stays bounded whatever the clients send."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        streaming = False

        async def observed(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            template = _CONVERTOR.sub("}", path) if path else "<unmatched>"
            method = scope.get("method", "")
            if method not in _METHODS:
                method = "other"
            self.metrics.requests.labels(template, method, str(status)).inc()
            if not streaming:
                self.metrics.latency.labels(template, method).observe(
                    time.perf_counter() - started)


_CONVERTOR: Final = re.compile(r":\w+}")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

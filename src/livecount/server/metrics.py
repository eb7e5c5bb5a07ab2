"""Prometheus metrics: one registry per app, request metrics, and live figures at scrape time.

A registry per app (not the global one) lets several apps live in one process (tests). The
request middleware is pure ASGI: it wraps ``send`` to see the status and adds no task. The
process and relay figures are read when ``/metrics`` is scraped (:meth:`Metrics.refresh`);
a single process never samples them in the background (workers under the supervisor do,
every 2 s, for the spool below: two store reads each time).

Several worker processes (``livecount serve --workers N``) share one port, so a scrape
reaches any one of them. Each worker then labels its series ``worker="<slot>"`` and writes
them to a spool directory the supervisor gives it (every couple of seconds, and at each
scrape); the worker that answers a scrape merges every live worker's file and the
supervisor's own (restarts, recycles) into one exposition (:meth:`Metrics.render`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..domain import now_us
from ..memory import MemoryState, memory_limit

__all__ = ["CONTENT_TYPE", "LagHistogram", "Metrics", "MetricsMiddleware", "merge_expositions"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0)
#: Buckets of the stream delivery histogram (seconds).
DELIVERY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
                           0.5, 1.0, 2.5, 5.0, 10.0)
#: A worker's spool file older than this is left out of the merged exposition (the worker
#: is gone and the supervisor has not removed its file yet).
SPOOL_STALE: Final = 30.0

#: name → (kind, help) of the figures read at scrape time.
_LIVE: Final[dict[str, tuple[str, str]]] = {
    "livecount_stream_connections": ("gauge", "Open WebSocket and SSE stream connections."),
    "livecount_stream_opened": ("counter", "Stream connections opened."),
    "livecount_stream_slow_clients": ("counter", "Streams closed because the client could "
                                      "not keep up."),
    "livecount_stream_connections_limit": ("gauge", "Stream connections this process admits "
                                           "at once (past it: 503)."),
    "livecount_relay_entries_applied": ("counter", "Outbox entries the relay has applied."),
    "livecount_relay_errors": ("counter", "Relay steps that failed (and were retried)."),
    "livecount_outbox_lag_entries": ("gauge", "Outbox entries committed, not yet applied."),
    "livecount_outbox_lag_seconds": ("gauge", "Age of the oldest outbox entry committed and "
                                     "not yet applied (0 when the relay is caught up)."),
    "livecount_drift_repaired": ("counter", "Counters the reconciler found drifted, repaired."),
    "livecount_reconciles": ("counter", "Workspace reconciles completed (scheduled and on "
                             "demand)."),
    "livecount_poison_entries": ("counter", "Outbox entries that could not be applied: "
                                 "recorded, skipped, their workspace recounted."),
    "livecount_reopens_written": ("counter", "Snoozed conversations reopened by the relay."),
    "livecount_shards": ("gauge", "Shards the workspaces are split into between counter "
                                  "workers (shared counter state only)."),
    "livecount_shards_owned": ("gauge", "Shards of workspaces this counter worker holds a "
                                        "lease on (shared counter state only)."),
    "livecount_leases_lost": ("counter", "Leases this counter worker lost: not renewed in "
                                         "time, or taken over (a write was fenced)."),
    "livecount_outbox_pruned": ("counter", "Applied outbox entries pruned after the "
                                "retention."),
    "livecount_schedule_entries": ("gauge", "Pending time-driven entries (flips and "
                                   "reopens) held in memory."),
    "livecount_process_threads": ("gauge", "Threads of this process."),
    "livecount_process_resident_memory_bytes": ("gauge", "Resident set size of this process."),
    "livecount_process_open_fds": ("gauge", "Open file descriptors of this process."),
    "livecount_asyncio_tasks": ("gauge", "asyncio tasks alive on the serving event loop."),
    "livecount_draining": ("gauge", "1 while this process is draining (not ready)."),
    "livecount_ready": ("gauge", "1 while /readyz answers 200 (not draining, below the soft "
                        "memory watermark, below the stream connection cap)."),
    "livecount_memory_limit_bytes": ("gauge", "The memory limit the watermarks derive from "
                                     "(cgroup limit, else host memory), for the whole "
                                     "container or host."),
    "livecount_memory_soft_watermark_bytes": ("gauge", "Resident memory past which /readyz "
                                              "answers 503."),
    "livecount_memory_hard_watermark_bytes": ("gauge", "Resident memory past which the "
                                              "process is recycled."),
    "livecount_memory_watermark_state": ("gauge", "0 below the soft watermark, 1 above it "
                                         "(not ready), 2 above the hard one (recycling)."),
}


class LagHistogram:
    """A histogram for the event loop's hot path: no lock, no labels, a bisect and two
    additions per observation (prometheus-client's takes a lock per call)."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: Sequence[float] = DELIVERY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            running += n
            cumulative.append((_bound(bound), running))
        return HistogramMetricFamily(name, help_text, buckets=cumulative, sum_value=self.sum)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class _LiveCollector(Collector):
    """Yields the figures :meth:`Metrics.refresh` last stored."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.refused: dict[str, float] = {}
        self.delivery: LagHistogram | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families({}, {}, None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.values, self.refused, self.delivery)

    @staticmethod
    def _families(values: dict[str, float], refused: dict[str, float],
                  delivery: LagHistogram | None) -> Iterator[Metric]:
        for name, (kind, help_text) in _LIVE.items():
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, help_text)
            else:
                family = GaugeMetricFamily(name, help_text)
            if name in values:
                family.add_metric([], values[name])
            yield family
        refusals = CounterMetricFamily(
            "livecount_stream_refused", "Stream connections refused by admission control: "
            "reason=process (the process cap, 503) or token (the per-token cap, 429).",
            labels=["reason"])
        for reason, n in sorted(refused.items()):
            refusals.add_metric([reason], n)
        yield refusals
        yield (delivery or LagHistogram()).family(
            "livecount_stream_delivery_seconds",
            "Seconds from the outbox commit of a change (the store's clock; the hub's "
            "receipt for changes without one, such as time-driven flips) to the stream send "
            "that carried it to a client, one observation per client send.")


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
        self._limit: int | None = None
        #: labels added to every series (``{"worker": "0"}`` under the supervisor)
        self.labels: dict[str, str] = {}
        #: where workers spool their series and the supervisor its own (None: one process)
        self.spool: Path | None = None

    def _memory_limit(self, configured: int | None) -> int:
        if configured is not None:
            return configured
        if self._limit is None:
            self._limit = memory_limit().bytes
        return self._limit

    async def refresh(self, app: Any) -> None:
        """Read the live figures of ``app`` (its service, relay, gateway) and this process."""
        from .ops import not_ready_reason

        service = app.state.service
        settings = service.settings
        relay = service.relay
        gateway = getattr(app.state, "gateway", None)
        admission = getattr(app.state, "admission", None)
        connections = getattr(gateway, "connections", 0)
        if not isinstance(connections, int | float):
            connections = len(connections)
        rss = self._process.memory_info().rss
        soft, hard = settings.soft_memory_bytes, settings.hard_memory_bytes
        state = (MemoryState.HARD if rss > hard else MemoryState.SOFT if rss > soft
                 else MemoryState.OK)
        values: dict[str, float] = {
            "livecount_stream_connections": connections,
            "livecount_stream_opened": getattr(gateway, "opened", 0),
            "livecount_stream_slow_clients": getattr(gateway, "slow_clients", 0),
            "livecount_process_threads": self._process.num_threads(),
            "livecount_process_resident_memory_bytes": rss,
            "livecount_process_open_fds": self._process.num_fds(),
            "livecount_asyncio_tasks": len(asyncio.all_tasks()),
            "livecount_draining": 1 if app.state.draining else 0,
            "livecount_ready": 0 if not_ready_reason(app, rss) else 1,
            "livecount_memory_limit_bytes": self._memory_limit(settings.memory_limit_bytes),
            "livecount_memory_soft_watermark_bytes": soft,
            "livecount_memory_hard_watermark_bytes": hard,
            "livecount_memory_watermark_state": int(state),
        }
        if relay is not None:  # a process that counts (a gateway does not)
            values.update({
                "livecount_relay_entries_applied": relay.entries_applied,
                "livecount_relay_errors": relay.errors,
                "livecount_drift_repaired": relay.drift_repaired,
                "livecount_reconciles": relay.reconciles,
                "livecount_poison_entries": relay.poison_entries,
                "livecount_reopens_written": relay.reopens_written,
                "livecount_outbox_pruned": relay.outbox_pruned,
                "livecount_schedule_entries": relay.scheduled,
            })
        if (leases := service.leases) is not None:
            values["livecount_shards"] = leases.shards
            values["livecount_shards_owned"] = len(leases.held)
            values["livecount_leases_lost"] = leases.lost_leases
        if admission is not None:
            values["livecount_stream_connections_limit"] = admission.max_streams
            self._live.refused = dict(admission.refused)
        self._live.delivery = getattr(gateway, "delivery", None)
        # the store is down: the lag is unknown, the rest still reports
        with contextlib.suppress(Exception):
            if relay is None:
                raise LookupError("no relay in this process")
            values["livecount_outbox_lag_entries"] = await relay.lag()
            values["livecount_outbox_lag_seconds"] = await _outbox_lag_seconds(relay)
        self._live.values = values

    def render_own(self) -> bytes:
        """This process's exposition, with :attr:`labels` on every series."""
        if not self.labels:
            return bytes(generate_latest(self.registry))
        return _render(_relabel(self.registry.collect(), self.labels))

    def render(self) -> bytes:
        """The exposition to answer a scrape with: this process's, merged with the other
        workers' and the supervisor's spool files when there is a spool."""
        own = self.render_own()
        if self.spool is None:
            return own
        self.write_spool(own)
        texts = [own.decode()]
        mine = self._spool_file()
        now = time.time()
        for path in sorted(self.spool.glob("*.prom")):
            if path == mine:
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime <= SPOOL_STALE or path.name == "supervisor.prom":
                    texts.append(path.read_text())
        return merge_expositions(texts)

    def _spool_file(self) -> Path | None:
        if self.spool is None:
            return None
        return self.spool / f"worker-{self.labels.get('worker', os.getpid())}.prom"

    def write_spool(self, text: bytes | None = None) -> None:
        """Write this worker's series to its spool file (atomically: write, then rename)."""
        path = self._spool_file()
        if path is None:
            return
        data = self.render_own() if text is None else text
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            temporary.write_bytes(data)
            os.replace(temporary, path)


async def _outbox_lag_seconds(relay: Any) -> float:
    """Seconds since the oldest entry the relay has not applied yet was committed."""
    entries = await relay.store.read_outbox(relay.position, 1)
    committed: int = entries[0].committed_at if entries else 0
    if committed <= 0:
        return 0.0
    return max(0.0, (now_us() - committed) / 1e6)


def _relabel(families: Iterable[Metric], labels: dict[str, str]) -> list[Metric]:
    out = []
    for family in families:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            copy.add_sample(sample.name, {**sample.labels, **labels}, sample.value,
                            sample.timestamp, sample.exemplar)
        out.append(copy)
    return out


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return bytes(generate_latest(registry))


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One exposition from several (workers, the supervisor): the samples of a family that
    appears in several are put under one ``# TYPE`` (Prometheus refuses a family twice), and
    a series that appears twice keeps its first value (the first text wins: the answering
    worker's own). An unreadable text is skipped (a half-written file cannot happen: writes
    are renames)."""
    merged: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for text in texts:
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in families:
            known = merged.get(family.name)
            if known is None:
                known = merged[family.name] = Metric(family.name, family.documentation,
                                                     family.type, family.unit)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in seen:  # a retiring worker and its replacement share a slot
                    continue
                seen.add(key)
                known.add_sample(sample.name, sample.labels, sample.value, sample.timestamp,
                                 sample.exemplar)
    return _render(list(merged.values()))


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

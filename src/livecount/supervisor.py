"""``livecount serve``: one worker process, or N of them under a supervisor, recycled before
they run out of memory.

Built on uvicorn's own multiprocess supervisor (:class:`uvicorn.supervisors.Multiprocess`):
the parent binds the port once and hands the socket to N spawned workers, pings each over a
pipe and replaces one that dies or hangs, and handles the signals. What it adds:

- **Graceful recycling, replacement first.** A worker asks to be recycled when its resident
  memory passes the hard watermark or it has served ``--max-requests`` (plus jitter): it says
  so in its answer to the supervisor's ping (the supervisor also reads every worker's RSS
  itself, in case the worker is too far gone to notice). The supervisor starts the
  replacement, waits until it serves, and only then sends the old worker SIGTERM, on which
  it stops accepting, tells every stream client ``{"type":"reconnect",...}`` (jittered
  ``retry_ms``), waits up to the drain timeout for them to go, finishes its requests and
  exits. Clients resume on another worker. One recycle at a time, so capacity never drops.
- **Restarts with backoff.** A worker that dies (or stops answering pings) is replaced; one
  that dies soon after it started waits 0.5 s, 1 s, 2 s … (at most 30 s) before the next try.
- **SIGHUP**: a rolling restart, each worker recycled as above, one after another;
  **SIGTERM**/**SIGINT**: every worker drains at once, then the supervisor exits.
- **Counter workers** (with a shared counter state): the supervisor also runs
  ``counter_workers`` ``livecount worker`` processes (the gateways then only serve), restarts
  one that dies with the same backoff, and stops them (SIGTERM: they give their leases back)
  after the gateways drained.
- **Metrics across workers.** Each worker labels its series ``worker="<slot>"`` and spools
  them to a directory; a scrape on any worker merges every worker's series and the
  supervisor's own (``livecount_worker_restarts_total``, ``livecount_worker_recycles_total``
  by reason, ``livecount_workers``) — see :mod:`livecount.server.metrics`.

Without ``--workers``, ``livecount serve`` runs one :class:`WorkerServer` in the process
itself: past the hard watermark (or ``--max-requests``) it drains and exits with status
:data:`EXIT_RECYCLE`, for whatever restarts it (Kubernetes, systemd).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess
from uvicorn.supervisors.multiprocess import Process as UvicornProcess

from .server.app import Server
from .service import Settings

__all__ = [
    "EXIT_RECYCLE",
    "Supervisor",
    "WorkerServer",
    "WorkerSpec",
    "build_worker_server",
    "render_families",
    "run_single",
    "run_supervisor",
    "supervisor_families",
]

log = logging.getLogger("uvicorn.error")

#: Exit status of a lone ``livecount serve`` that recycled itself (EX_TEMPFAIL): restart it.
EXIT_RECYCLE: Final = 75
#: Restart backoff of a worker that died young: first delay, cap, and "young".
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
YOUNG: Final = 10.0
#: Supervisor loop period (seconds).
TICK: Final = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to build its app and server (picklable: it crosses
    into spawned processes)."""

    settings: Settings
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    #: ``module:function`` taking :class:`~livecount.service.Settings`, returning the app
    app_factory: str = "livecount.server.app:create_app"
    #: recycle after this many HTTP requests (plus up to ``max_requests_jitter``); None: never
    max_requests: int | None = None
    max_requests_jitter: int = 0
    #: uvicorn's wait for HTTP requests in flight at shutdown (after the stream drain)
    graceful_timeout: float = 10.0
    tune_gc: bool = True
    #: the metrics spool directory (under the supervisor)
    spool: str | None = None
    #: the command line of a counter worker (``livecount worker …``) and how many to run
    counter_command: tuple[str, ...] = ()
    counter_workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _load_factory(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_worker_server(spec: WorkerSpec, *, slot: int | None = None,
                        supervised: bool = False) -> WorkerServer:
    """The app of ``spec`` and the uvicorn server that runs it (in this process)."""
    from .server.app import server_options
    from .server.logs import install_redaction

    app = _load_factory(spec.app_factory)(spec.settings)
    config = uvicorn.Config(app, host=spec.host, port=spec.port, lifespan="on",
                            log_level=spec.log_level,
                            timeout_graceful_shutdown=int(spec.graceful_timeout),
                            **server_options(spec.settings))
    install_redaction()  # after Config (it sets up uvicorn's handlers): no token in any log
    metrics = app.state.metrics
    if slot is not None:
        metrics.labels = {"worker": str(slot)}
    if spec.spool is not None:
        metrics.spool = Path(spec.spool)
    return WorkerServer(config, app, spec=spec, supervised=supervised)


class WorkerServer(Server):
    """livecount's uvicorn server (streams drained before shutdown) that watches its own
    memory and request count once a second and asks to be recycled: under the supervisor by
    setting :attr:`recycle_reason` (the supervisor reads it), alone by draining and exiting
    with :data:`EXIT_RECYCLE`."""

    def __init__(self, config: uvicorn.Config, app: Starlette, *, spec: WorkerSpec,
                 supervised: bool) -> None:
        super().__init__(config, app, tune_gc=spec.tune_gc)
        self.app = app
        self.spec = spec
        self.supervised = supervised
        #: why this worker should be recycled ("memory", "max_requests"); None: it should not
        self.recycle_reason: str | None = None
        self.exit_code = 0
        jitter = random.randint(0, max(0, spec.max_requests_jitter))
        self.request_limit = spec.max_requests + jitter if spec.max_requests else None
        self._process = psutil.Process()

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:
            self.check()
        if counter % 20 == 5 and self.app.state.metrics.spool is not None \
                and not self.app.state.draining:
            metrics = self.app.state.metrics
            with contextlib.suppress(Exception):
                await metrics.refresh(self.app)
                metrics.write_spool()
        return bool(await super().on_tick(counter))

    def check(self) -> None:
        """Ask to be recycled once memory or requests say so (the first reason sticks)."""
        if self.recycle_reason is not None:
            return
        settings = self.spec.settings
        reason = None
        rss = self._process.memory_info().rss
        if rss > settings.hard_memory_bytes:
            reason = "memory"
            log.warning("worker [%d]: resident memory %d bytes is above the hard watermark "
                        "%d: asking to be recycled", os.getpid(), rss,
                        settings.hard_memory_bytes)
        elif (self.request_limit is not None
              and self.server_state.total_requests >= self.request_limit):
            reason = "max_requests"
            log.info("worker [%d]: served %d requests (limit %d): asking to be recycled",
                     os.getpid(), self.server_state.total_requests, self.request_limit)
        if reason is None:
            return
        self.recycle_reason = reason
        if not self.supervised:
            log.warning("draining and exiting with status %d (recycle: %s) for the process "
                        "manager to start a fresh one", EXIT_RECYCLE, reason)
            self.exit_code = EXIT_RECYCLE
            self.should_exit = True


class Worker(UvicornProcess):
    """One worker process as the supervisor sees it. Its ping answer carries the worker's
    recycle request: ``(started, recycle_reason)``."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket],
                 spec: WorkerSpec, slot: int) -> None:
        self.spec = spec
        self.slot = slot
        self.born = time.monotonic()
        self.started = False
        self.recycle_reason: str | None = None
        self.last_answer = 0.0
        self._outstanding = 0
        super().__init__(config, sockets)

    # -- in the worker process --------------------------------------------------------------

    @property
    def server(self) -> WorkerServer:
        if self._server is None:
            self._server = build_worker_server(self.spec, slot=self.slot, supervised=True)
        assert isinstance(self._server, WorkerServer)
        return self._server

    def pong(self) -> None:
        self.child_conn.recv()
        server = self.server
        self.child_conn.send((bool(server.started), server.recycle_reason))

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        server = self.server  # built before the ping thread can ask for it
        threading.Thread(target=self.always_pong, daemon=True).start()
        server.run(sockets)

    # -- in the supervisor ------------------------------------------------------------------

    def probe(self, timeout: float) -> bool:
        """Ping (without waiting long) and read every answer that came; whether one did."""
        answered = False
        try:
            if self._outstanding < 3:
                self.parent_conn.send(b"ping")
                self._outstanding += 1
            if self.parent_conn.poll(timeout):
                while self.parent_conn.poll(0):
                    started, reason = self.parent_conn.recv()
                    self._outstanding -= 1
                    answered = True
                    self.started = self.started or bool(started)
                    if reason and self.recycle_reason is None:
                        self.recycle_reason = str(reason)
        except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError):
            return False
        if answered:
            self.last_answer = time.monotonic()
        return answered

    @property
    def age(self) -> float:
        return time.monotonic() - self.born

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.pid).memory_info().rss) if self.pid else 0
        except psutil.Error:
            return 0


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


class Supervisor(Multiprocess):
    """uvicorn's :class:`Multiprocess`, with recycling, backoff, drain and metrics (see the
    module docstring)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], spec: WorkerSpec,
                 *, ready_timeout: float = 60.0) -> None:
        super().__init__(config, sockets)
        self.spec = spec
        self.ready_timeout = ready_timeout
        self.workers: list[Worker | None] = []
        self.restarts = 0
        self.recycles: Counter[str] = Counter()
        self.recycle_failures = 0
        self.exit_code = 0
        self._restart_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._replacing: tuple[int, Worker, str, float] | None = None
        self._retry_recycle_at: dict[int, float] = {}
        self._retiring: list[tuple[Worker, float]] = []
        self._rolling: deque[int] = deque()
        #: counter worker processes by slot, when they die and when they may come back
        self.counters: list[subprocess.Popen[bytes] | None] = []
        self._counter_born: dict[int, float] = {}
        self._counter_restart_at: dict[int, float] = {}
        self._counter_backoff: dict[int, float] = {}

    @property
    def spool(self) -> Path | None:
        return Path(self.spec.spool) if self.spec.spool else None

    # -- life cycle -------------------------------------------------------------------------

    def _spawn(self, slot: int) -> Worker:
        worker = Worker(self.config, self.sockets, self.spec, slot)
        worker.start()
        log.info("started worker %d [%s]", slot, worker.pid)
        return worker

    def init_processes(self) -> None:
        self.counters = [self._spawn_counter(slot)
                         for slot in range(self.spec.counter_workers)]
        self.workers = [self._spawn(slot) for slot in range(self.processes_num)]

    def _spawn_counter(self, slot: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.spec.counter_command)
        self._counter_born[slot] = time.monotonic()
        log.info("started counter worker %d [%s]", slot, process.pid)
        return process

    def keep_counters_alive(self) -> None:
        """Restart a counter worker that exited (with backoff if it died young)."""
        now = time.monotonic()
        for slot, process in enumerate(self.counters):
            if process is None:
                if now >= self._counter_restart_at.get(slot, 0.0):
                    self.counters[slot] = self._spawn_counter(slot)
                continue
            code = process.poll()
            if code is None:
                continue
            self.restarts += 1
            delay = 0.0
            if now - self._counter_born.get(slot, 0.0) < YOUNG:
                delay = min(BACKOFF_MAX,
                            self._counter_backoff.get(slot, BACKOFF_FIRST / 2) * 2)
            self._counter_backoff[slot] = delay or BACKOFF_FIRST / 2
            log.warning("counter worker %d [%s] exited with status %s; restarting it in "
                        "%.1f s", slot, process.pid, code, delay)
            self.counters[slot] = None
            self._counter_restart_at[slot] = now + delay

    def stop_counters(self) -> None:
        """SIGTERM every counter worker (they give their leases back) and wait for them."""
        running = [p for p in self.counters if p is not None]
        for process in running:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("counter worker [%s] did not stop in time; killing it",
                            process.pid)
                process.kill()
                process.wait()
        self.counters = []

    def run(self) -> None:
        log.info("Started livecount supervisor [%d] with %d workers", os.getpid(),
                 self.processes_num)
        self.init_processes()
        self.write_metrics()
        while not self.should_exit.wait(TICK):
            self.handle_signals()
            if self.should_exit.is_set():
                break
            self.tick()
        self.drain_all()
        self.stop_counters()
        log.info("Stopping livecount supervisor [%d]", os.getpid())

    def tick(self) -> None:
        self.keep_subprocess_alive()
        self.keep_counters_alive()
        self.advance_recycle()
        self.reap_retiring()
        self.write_metrics()

    # -- dead and hung workers --------------------------------------------------------------

    def keep_subprocess_alive(self) -> None:
        now = time.monotonic()
        hung_after = float(self.config.timeout_worker_healthcheck)
        for slot, worker in enumerate(self.workers):
            if worker is None:
                replacing = self._replacing is not None and self._replacing[0] == slot
                if not replacing and now >= self._restart_at.get(slot, 0.0):
                    # (a slot whose replacement is starting gets that one, not a second)
                    self.workers[slot] = self._spawn(slot)
                continue
            alive = worker.process.is_alive()
            worker.probe(0.02)
            if alive and worker.started and now - worker.last_answer <= hung_after:
                continue
            if alive and not worker.started and worker.age <= self.ready_timeout:
                continue  # still starting
            reason = "died" if not alive else "hung" if worker.started else "never started"
            worker.kill()
            worker.join()
            self._forget_spool(worker)
            if worker.exitcode == STARTUP_FAILURE and not worker.started \
                    and not any(w is not None and w.started for w in self.workers):
                log.error("worker %d [%s] failed to start; stopping", slot, worker.pid)
                self.exit_code = STARTUP_FAILURE
                self.should_exit.set()
                return
            self.restarts += 1
            delay = 0.0
            if worker.age < YOUNG:
                delay = min(BACKOFF_MAX, self._backoff.get(slot, BACKOFF_FIRST / 2) * 2)
            self._backoff[slot] = delay or BACKOFF_FIRST / 2
            log.warning("worker %d [%s] %s (exit code %s); restarting it in %.1f s", slot,
                        worker.pid, reason, worker.exitcode, delay)
            self.workers[slot] = None
            self._restart_at[slot] = now + delay

    # -- recycling --------------------------------------------------------------------------

    def advance_recycle(self) -> None:
        """Move the recycle in flight on (its replacement is ready: retire the old one), or
        start the next: a worker that asked (memory, requests), else the rolling restart."""
        now = time.monotonic()
        if self._replacing is not None:
            slot, fresh, reason, began = self._replacing
            fresh.probe(0.02)
            if fresh.started:
                old = self.workers[slot]
                self.workers[slot] = fresh
                self._replacing = None
                self.recycles[reason] += 1
                if old is not None:
                    self.retire(old, reason)
            elif not fresh.process.is_alive() or now - began > self.ready_timeout:
                log.error("the replacement of worker %d [%s] did not start; keeping the old "
                          "one and trying again in 10 s", slot, fresh.pid)
                fresh.kill()
                fresh.join()
                self._forget_spool(fresh)
                self._replacing = None
                self.recycle_failures += 1
                self._retry_recycle_at[slot] = now + 10.0
            return
        hard = self.spec.settings.hard_memory_bytes
        for slot, worker in enumerate(self.workers):
            if worker is None or not worker.started:
                continue
            if now < self._retry_recycle_at.get(slot, 0.0):
                continue
            wanted = worker.recycle_reason
            if wanted is None and (rss := worker.rss()) > hard:
                log.warning("worker %d [%s]: resident memory %d bytes is above the hard "
                            "watermark %d", slot, worker.pid, rss, hard)
                wanted = worker.recycle_reason = "memory"
            if wanted is not None:
                self.recycle(slot, wanted)
                return
        while self._rolling:
            slot = self._rolling.popleft()
            if self.workers[slot] is not None:
                self.recycle(slot, "restart")
                return

    def recycle(self, slot: int, reason: str) -> None:
        """Start the replacement of worker ``slot``; the old one is retired once it serves."""
        old = self.workers[slot]
        log.info("recycling worker %d [%s] (%s): starting its replacement first", slot,
                 old.pid if old else None, reason)
        self._replacing = (slot, self._spawn(slot), reason, time.monotonic())

    def retire(self, worker: Worker, reason: str) -> None:
        """SIGTERM: the worker stops accepting, tells its stream clients to reconnect,
        drains and exits; killed if it has not after the drain and request timeouts."""
        log.info("retiring worker %d [%s] (%s): draining", worker.slot, worker.pid, reason)
        self._forget_spool(worker)
        worker.terminate()
        deadline = (time.monotonic() + self.spec.settings.drain_timeout
                    + self.spec.graceful_timeout + 5.0)
        self._retiring.append((worker, deadline))

    def reap_retiring(self) -> None:
        now = time.monotonic()
        for entry in list(self._retiring):
            worker, deadline = entry
            if worker.process.exitcode is not None:
                worker.process.join()
            elif now > deadline:
                log.warning("worker %d [%s] did not drain in time; killing it", worker.slot,
                            worker.pid)
                worker.process.kill()
                worker.process.join()
            else:
                continue
            self._forget_spool(worker)
            self._retiring.remove(entry)

    def drain_all(self) -> None:
        """SIGTERM every worker (they drain in parallel) and wait for them."""
        everyone = [w for w in self.workers if w is not None]
        if self._replacing is not None:
            everyone.append(self._replacing[1])
            self._replacing = None
        for worker in everyone:
            worker.terminate()
        deadline = (time.monotonic() + self.spec.settings.drain_timeout
                    + self.spec.graceful_timeout + 5.0)
        for worker in everyone + [w for w, _ in self._retiring]:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                log.warning("worker %d [%s] did not drain in time; killing it", worker.slot,
                            worker.pid)
                worker.process.kill()
                worker.process.join()
        self._retiring.clear()
        self.workers = []

    # -- signals ----------------------------------------------------------------------------

    def handle_hup(self) -> None:
        log.info("Received SIGHUP: recycling every worker, one at a time")
        for slot in range(len(self.workers)):
            if slot not in self._rolling:
                self._rolling.append(slot)

    def handle_ttin(self) -> None:
        log.info("Received SIGTTIN: changing the number of workers is not supported")

    def handle_ttou(self) -> None:
        log.info("Received SIGTTOU: changing the number of workers is not supported")

    # -- metrics ----------------------------------------------------------------------------

    def _forget_spool(self, worker: Worker) -> None:
        spool = self.spool
        if spool is None:
            return
        # the slot's file belongs to whoever serves the slot now
        current = self.workers[worker.slot] if worker.slot < len(self.workers) else None
        if current is None or current is worker:
            with contextlib.suppress(OSError):
                (spool / f"worker-{worker.slot}.prom").unlink()

    def families(self) -> list[Metric]:
        return supervisor_families(
            workers=self.processes_num,
            ready=sum(1 for w in self.workers if w is not None and w.started),
            restarts=self.restarts, recycles=self.recycles, failures=self.recycle_failures)

    def write_metrics(self) -> None:
        spool = self.spool
        if spool is None:
            return
        path = spool / "supervisor.prom"
        temporary = spool / ".supervisor.prom.tmp"
        with contextlib.suppress(OSError):
            temporary.write_bytes(render_families(self.families()))
            os.replace(temporary, path)


def supervisor_families(*, workers: int, ready: int, restarts: int,
                        recycles: Counter[str], failures: int) -> list[Metric]:
    """The supervisor's own series (merged into every worker's /metrics)."""
    configured = GaugeMetricFamily("livecount_workers", "Worker processes configured.")
    configured.add_metric([], workers)
    serving = GaugeMetricFamily("livecount_workers_ready", "Worker processes serving.")
    serving.add_metric([], ready)
    restarted = CounterMetricFamily(
        "livecount_worker_restarts", "Workers that died or stopped answering and were "
        "replaced.")
    restarted.add_metric([], restarts)
    recycled = CounterMetricFamily(
        "livecount_worker_recycles", "Workers recycled gracefully (replacement first, then "
        "drain): reason=memory (hard watermark), max_requests, restart (SIGHUP).",
        labels=["reason"])
    for reason in ("memory", "max_requests", "restart"):
        recycled.add_metric([reason], recycles[reason])
    failed = CounterMetricFamily(
        "livecount_worker_recycle_failures", "Recycles abandoned because the replacement did "
        "not start (the old worker kept serving).")
    failed.add_metric([], failures)
    return [configured, serving, restarted, recycled, failed]


def render_families(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return bytes(generate_latest(registry))


def run_supervisor(spec: WorkerSpec, workers: int, *, healthcheck_timeout: int = 5,
                   ready_timeout: float = 60.0) -> int:
    """Bind ``spec.host:spec.port``, run ``workers`` worker processes until SIGTERM/SIGINT;
    the exit status."""
    spool = tempfile.mkdtemp(prefix="livecount-metrics-")
    spec = dataclasses.replace(spec, spool=spool)
    config = uvicorn.Config("livecount.supervisor:run_supervisor", host=spec.host,
                            port=spec.port, workers=workers, log_level=spec.log_level,
                            timeout_worker_healthcheck=healthcheck_timeout)
    try:
        sock = config.bind_socket()
        try:
            supervisor = Supervisor(config, [sock], spec, ready_timeout=ready_timeout)
            supervisor.run()
        finally:
            sock.close()
        return supervisor.exit_code
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def run_single(spec: WorkerSpec) -> int:
    """One worker in this process (no supervisor); :data:`EXIT_RECYCLE` when it recycled
    itself."""
    server = build_worker_server(spec)
    server.run()
    if not server.started and server.exit_code == 0:
        return STARTUP_FAILURE
    return int(server.exit_code)


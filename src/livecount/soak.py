"""``livecount soak``: load a server for a while, then check that it comes back flat.

The outage this project exists to prevent (DESIGN §1) was a leak that only showed after hours
of traffic: threads started per request and never cleaned up. A soak makes the same traffic
in minutes and compares the server's resources before and after:

1. **setup** — a workspace with teammates, a team, custom views and a few conversations
   (through the admin token);
2. **warm-up** — a share of the load (``warmup``), then the clients close and the server is
   left idle until its figures are steady: those are the **warm** values;
3. **load** — the rest: API requests (create, patch, counts, views, reads) and stream
   cycles (WebSocket and SSE in turn: connect, take the snapshot, disconnect), in parallel;
4. **settle** — the clients close; the figures are sampled until threads, tasks and fds are
   back at their warm values (fds: within ``fd_tolerance``) or ``settle`` seconds pass.

It **passes** when threads and asyncio tasks are back at their warm values, open fds within
``fd_tolerance`` of theirs (connection pools open lazily up to their size, a leak grows past
it), resident memory within ``rss_tolerance`` (5%) of warm, no request got a 500, at most 1% of
requests answered another 5xx or failed on the transport, and at most 1% of stream cycles
failed. The
figures come from the server's ``/metrics`` (``livecount_process_threads``,
``livecount_asyncio_tasks``, ``livecount_process_open_fds``,
``livecount_process_resident_memory_bytes``), summed over its worker processes, so the soak
works against any reachable server; without ``url`` it starts ``livecount serve`` on a
temporary SQLite store itself. It writes ``OUT.json`` (every sample and the verdict) and
``OUT.png`` (the four series, with the phases and warm values) when matplotlib is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

__all__ = ["Sample", "SoakOptions", "SoakResult", "run_soak", "run_soak_command", "started_server"]

SERIES: Final = {
    "threads": "livecount_process_threads",
    "tasks": "livecount_asyncio_tasks",
    "fds": "livecount_process_open_fds",
    "rss": "livecount_process_resident_memory_bytes",
}
#: How long a started server may take to answer /readyz.
START_WITHIN: Final = 30.0
_TAGS: Final = ("vip", "billing", "bug", "refund", "urgent", "feedback")


@dataclass
class SoakOptions:
    url: str | None = None
    admin_token: str | None = None
    requests: int = 10_000
    cycles: int = 1_000
    concurrency: int = 8
    warmup: float = 0.1
    settle: float = 10.0
    rss_tolerance: float = 0.05
    #: open fds may end this many above warm: connection pools open lazily up to their size
    #: (a leak grows with the load and passes it)
    fd_tolerance: int = 8
    out: str | None = "soak"
    store: str | None = None
    sample_every: float = 0.5
    progress: bool = True
    seed: int = 1
    #: the server command it starts without ``url`` (``{port}``, ``{store}`` are filled in);
    #: None: ``python -m livecount serve``
    serve_command: list[str] | None = None


@dataclass
class Sample:
    t: float
    phase: str
    threads: float
    tasks: float
    fds: float
    rss: float
    processes: int


@dataclass
class SoakResult:
    passed: bool
    failures: list[str]
    warm: Sample | None
    final: Sample | None
    samples: list[Sample]
    requests: int = 0
    cycles: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    cycle_errors: int = 0
    seconds: float = 0.0
    url: str = ""

    @property
    def deltas(self) -> dict[str, float]:
        if self.warm is None or self.final is None:
            return {}
        return {name: getattr(self.final, name) - getattr(self.warm, name)
                for name in ("threads", "tasks", "fds", "rss")}

    def to_json(self) -> dict[str, Any]:
        rss_growth = None
        if self.warm is not None and self.final is not None and self.warm.rss:
            rss_growth = (self.final.rss - self.warm.rss) / self.warm.rss
        return {
            "passed": self.passed, "failures": self.failures, "url": self.url,
            "requests": self.requests, "cycles": self.cycles, "statuses": self.statuses,
            "cycle_errors": self.cycle_errors, "seconds": round(self.seconds, 2),
            "warm": asdict(self.warm) if self.warm else None,
            "final": asdict(self.final) if self.final else None,
            "deltas": self.deltas, "rss_growth": rss_growth,
            "samples": [asdict(s) for s in self.samples],
        }


# -- the server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def started_server(command: list[str] | None = None, store: str | None = None
                         ) -> AsyncIterator[tuple[str, str]]:
    """Start ``livecount serve`` (or ``command``) on a free port and a temporary store, wait
    until it is ready; yield (base URL, admin token); SIGTERM it (then SIGKILL) at the end."""
    port = _free_port()
    token = "lc_admin_soak_" + secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory(prefix="livecount-soak-") as tmp:
        store_url = store or f"sqlite:///{tmp}/soak.db"
        args = command or [sys.executable, "-m", "livecount", "serve", "--port", "{port}",
                           "--store", "{store}", "--log-level", "warning"]
        args = [a.replace("{port}", str(port)).replace("{store}", store_url) for a in args]
        log_path = Path(tmp) / "server.log"
        proc = _spawn(args, log_path, token)
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_ready(proc, base, log_path)
            yield base, token
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            await asyncio.to_thread(proc.wait)


def _spawn(args: list[str], log_path: Path, token: str) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "LIVECOUNT_ADMIN_TOKEN": token})


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


async def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + START_WITHIN
    async with httpx.AsyncClient(base_url=base, timeout=2, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {START_WITHIN} s:\n"
                                   f"{_tail(log)}")
            await asyncio.sleep(0.05)


# -- sampling -----------------------------------------------------------------------------------


def parse_sample(text: str, t: float, phase: str) -> Sample:
    """The four figures of a ``/metrics`` text, summed over worker processes."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {metric: name for name, metric in SERIES.items()}
    sums: dict[str, float] = dict.fromkeys(SERIES, 0.0)
    processes: set[str] = set()
    for family in text_string_to_metric_families(text):
        name = wanted.get(family.name)
        if name is None:
            continue
        for sample in family.samples:
            sums[name] += sample.value
            processes.add(sample.labels.get("worker", ""))
    return Sample(t=round(t, 3), phase=phase, processes=len(processes), **sums)


class Sampler:
    def __init__(self, client: httpx.AsyncClient, started: float) -> None:
        self.client = client
        self.started = started
        self.samples: list[Sample] = []
        self.phase = "setup"

    async def take(self) -> Sample:
        response = await self.client.get("/metrics")
        response.raise_for_status()
        sample = parse_sample(response.text, time.monotonic() - self.started, self.phase)
        self.samples.append(sample)
        return sample

    async def run(self, every: float) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                await self.take()
            await asyncio.sleep(every)

    async def steady(self, within: float, every: float, target: Sample | None = None,
                     fd_tolerance: int = 0) -> Sample:
        """Sample until two samples in a row agree on threads, tasks and fds (and are back at
        ``target``'s when given, fds within ``fd_tolerance``), or ``within`` seconds pass;
        the last sample."""
        deadline = time.monotonic() + within
        last = await self.take()
        while time.monotonic() < deadline:
            await asyncio.sleep(every)
            sample = await self.take()
            same = all(getattr(sample, k) == getattr(last, k) for k in ("threads", "tasks",
                                                                        "fds"))
            on_target = target is None or (
                sample.threads <= target.threads and sample.tasks <= target.tasks
                and sample.fds <= target.fds + fd_tolerance)
            last = sample
            if same and on_target:
                break
        return last


# -- the load -----------------------------------------------------------------------------------


@dataclass
class _Tenant:
    id: int
    tokens: list[str]
    people: list[int]
    team: int
    conversations: list[int]


async def _setup(client: httpx.AsyncClient, admin: str, rng: random.Random) -> _Tenant:
    headers = {"Authorization": f"Bearer {admin}"}

    async def post(path: str, body: dict[str, Any], token: str | None = None
                   ) -> dict[str, Any]:
        response = await client.post(path, json=body, headers=(
            {"Authorization": f"Bearer {token}"} if token else headers))
        if response.status_code != 201:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
        data: dict[str, Any] = response.json()
        return data

    ws = await post("/api/workspaces", {"name": f"soak-{secrets.token_hex(3)}"})
    base = f"/api/workspaces/{ws['id']}"
    mates = [await post(f"{base}/teammates", {"name": f"Soak {i}",
                                              "email": f"soak{i}@soak.example"})
             for i in range(4)]
    team = await post(f"{base}/teams", {"name": "Soakers",
                                        "member_ids": [m["id"] for m in mates[:2]]})
    for i, (name, flt, group) in enumerate([
            ("VIP open", {"operator": "AND", "value": [
                {"field": "state", "operator": "=", "value": "open"},
                {"field": "tags", "operator": "contains", "value": "vip"}]}, None),
            ("Priority by assignee", {"field": "priority", "operator": "=", "value": True},
             "assignee_id"),
            ("By tag", {"field": "state", "operator": "!=", "value": "closed"}, "tags")]):
        await post(f"{base}/views", {"name": name, "filter": flt, "group_by": group,
                                     "personal": i == 0}, mates[0]["token"])
    tenant = _Tenant(ws["id"], [m["token"] for m in mates], [m["id"] for m in mates],
                     team["id"], [])
    for _ in range(20):
        created = await post(f"{base}/conversations", _conversation(tenant, rng),
                             rng.choice(tenant.tokens))
        tenant.conversations.append(created["id"])
    return tenant


def _conversation(tenant: _Tenant, rng: random.Random) -> dict[str, Any]:
    return {"assignee_id": rng.choice([None, *tenant.people]),
            "team_id": rng.choice([None, tenant.team]),
            "priority": rng.random() < 0.3,
            "tags": rng.sample(_TAGS, rng.randint(0, 2))}


def _patch(tenant: _Tenant, rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        return {"state": rng.choice(["open", "open", "closed"])}
    if kind == 1:
        return {"assignee_id": rng.choice([None, *tenant.people])}
    if kind == 2:
        return {"tags": rng.sample(_TAGS, rng.randint(0, 3))}
    return {"priority": rng.random() < 0.5}


class Load:
    """The request and cycle workers, counting what they did."""

    def __init__(self, base: str, tenant: _Tenant, rng: random.Random) -> None:
        self.base = base
        self.ws_base = "ws" + base[len("http"):]
        self.tenant = tenant
        self.rng = rng
        self.requests = 0
        self.cycles = 0
        self.statuses: Counter[str] = Counter()
        self.cycle_errors = 0
        self.on_progress: Callable[[], None] = lambda: None

    async def request(self, client: httpx.AsyncClient) -> None:
        try:
            status = await self._request(client)
        except httpx.TransportError:  # cut or timed out (a worker recycled mid-request)
            status = "transport"
        self.statuses[status] += 1
        self.requests += 1
        self.on_progress()

    async def _request(self, client: httpx.AsyncClient) -> str:
        rng, tenant = self.rng, self.tenant
        token = rng.choice(tenant.tokens)
        headers = {"Authorization": f"Bearer {token}"}
        path = f"/api/workspaces/{tenant.id}"
        roll = rng.random()
        if roll < 0.05:
            response = await client.post(f"{path}/conversations",
                                          json=_conversation(tenant, rng), headers=headers)
            if response.status_code == 201 and len(tenant.conversations) < 500:
                tenant.conversations.append(response.json()["id"])
        elif roll < 0.45:
            target = rng.choice(tenant.conversations)
            response = await client.patch(f"{path}/conversations/{target}",
                                           json=_patch(tenant, rng), headers=headers)
        elif roll < 0.75:
            response = await client.get(f"{path}/counts", headers=headers)
        elif roll < 0.90:
            response = await client.get(f"{path}/views", headers=headers)
        else:
            target = rng.choice(tenant.conversations)
            response = await client.get(f"{path}/conversations/{target}", headers=headers)
        return str(response.status_code)

    async def cycle(self, sse_client: httpx.AsyncClient, n: int) -> None:
        token = self.rng.choice(self.tenant.tokens)
        try:
            async with asyncio.timeout(10):
                if n % 2:
                    await self._sse_cycle(sse_client, token)
                else:
                    await self._ws_cycle(token)
        except (OSError, TimeoutError, httpx.HTTPError, RuntimeError, ValueError):
            self.cycle_errors += 1
        except Exception as exc:  # websockets' own errors
            if type(exc).__module__.startswith("websockets"):
                self.cycle_errors += 1
            else:
                raise
        self.cycles += 1
        self.on_progress()

    async def _ws_cycle(self, token: str) -> None:
        from websockets.asyncio.client import connect

        url = f"{self.ws_base}/api/workspaces/{self.tenant.id}/ws?token={token}"
        async with connect(url, proxy=None, compression=None, open_timeout=5,
                           close_timeout=2) as conn:
            message = json.loads(await conn.recv())
            if message.get("type") != "snapshot":
                raise RuntimeError(f"expected a snapshot, got {message}")

    async def _sse_cycle(self, client: httpx.AsyncClient, token: str) -> None:
        url = f"/api/workspaces/{self.tenant.id}/stream"
        async with client.stream("GET", url,
                                 headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"stream answered {response.status_code}")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    if json.loads(line[5:]).get("type") != "snapshot":
                        raise RuntimeError("expected a snapshot")
                    return

    async def run(self, requests: int, cycles: int, concurrency: int) -> None:
        """``requests`` requests and ``cycles`` cycles, ``concurrency`` request workers and
        half as many cycle workers, on clients closed at the end (so their connections do
        not count as the server's fds)."""
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        numbers = itertools.count()
        cycle_numbers = itertools.count()

        async def request_worker(client: httpx.AsyncClient) -> None:
            while next(numbers) < requests:
                await self.request(client)

        async def cycle_worker(client: httpx.AsyncClient) -> None:
            while (n := next(cycle_numbers)) < cycles:
                await self.cycle(client, n)

        async with httpx.AsyncClient(base_url=self.base, timeout=30, limits=limits,
                                     trust_env=False) as client, \
                httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(10, read=10),
                                  trust_env=False) as sse_client, \
                asyncio.TaskGroup() as tg:
            for _ in range(concurrency if requests else 0):
                tg.create_task(request_worker(client))
            for _ in range(max(1, concurrency // 2) if cycles else 0):
                tg.create_task(cycle_worker(sse_client))


# -- the run ------------------------------------------------------------------------------------


def judge(warm: Sample, final: Sample, tolerance: float, fd_tolerance: int = 0) -> list[str]:
    """Why a soak fails (empty: it passes). Thread growth comes first: it is the incident's."""
    failures = []
    for name, what, allowed in (("threads", "threads", 0), ("tasks", "asyncio tasks", 0),
                                ("fds", "open file descriptors", fd_tolerance)):
        before, after = int(getattr(warm, name)), int(getattr(final, name))
        if after > before + allowed:
            extra = f" (more than the {allowed} allowed)" if allowed else ""
            failures.append(f"{what} grew from {before} to {after} (+{after - before}){extra} "
                            "and did not come back after the load")
    if warm.rss and final.rss > warm.rss * (1 + tolerance):
        growth = (final.rss - warm.rss) / warm.rss
        failures.append(f"resident memory grew {growth:.1%} ({warm.rss / 2**20:.1f} MiB → "
                        f"{final.rss / 2**20:.1f} MiB), more than the {tolerance:.0%} allowed")
    return failures


async def run_soak(options: SoakOptions,
                   report: Callable[[str, Load | None, Sample | None], None] | None = None
                   ) -> SoakResult:
    """Run the soak (starting a server when ``options.url`` is None); see the module doc."""
    if options.url is None:
        async with started_server(options.serve_command, options.store) as (base, token):
            return await _soak(options, base, token, report)
    if not options.admin_token:
        raise ValueError("--admin-token (or LIVECOUNT_ADMIN_TOKEN) is needed with --url")
    return await _soak(options, options.url.rstrip("/"), options.admin_token, report)


async def _soak(options: SoakOptions, base: str, admin: str,
                report: Callable[[str, Load | None, Sample | None], None] | None
                ) -> SoakResult:
    rng = random.Random(options.seed)
    started = time.monotonic()
    note = report or (lambda phase, load, sample: None)
    async with httpx.AsyncClient(base_url=base, timeout=30, trust_env=False,
                                 limits=httpx.Limits(max_connections=1)) as scraper:
        sampler = Sampler(scraper, started)
        async with httpx.AsyncClient(base_url=base, timeout=30, trust_env=False) as setup:
            tenant = await _setup(setup, admin, rng)
        load = Load(base, tenant, rng)
        warm_requests = int(options.requests * options.warmup)
        warm_cycles = int(options.cycles * options.warmup)
        sampler.phase = "warm-up"
        note("warm-up", load, None)
        background = asyncio.create_task(sampler.run(options.sample_every))
        try:
            await load.run(warm_requests, warm_cycles, options.concurrency)
        finally:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        sampler.phase = "warm"
        warm = await sampler.steady(options.settle, options.sample_every)
        note("load", load, warm)
        sampler.phase = "load"
        background = asyncio.create_task(sampler.run(options.sample_every))
        try:
            await load.run(options.requests - warm_requests, options.cycles - warm_cycles,
                           options.concurrency)
        finally:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        sampler.phase = "settle"
        note("settle", load, None)
        final = await sampler.steady(options.settle, options.sample_every, target=warm,
                                     fd_tolerance=options.fd_tolerance)
    failures = judge(warm, final, options.rss_tolerance, options.fd_tolerance)
    errors = sum(n for status, n in load.statuses.items()
                 if status.startswith("5") or status == "transport")
    if load.statuses.get("500"):
        failures.append(f"{load.statuses['500']} requests answered 500 (a bug every time)")
    if load.requests and errors > load.requests * 0.01:
        failures.append(f"{errors} of {load.requests} requests answered 5xx or failed")
    if load.cycles and load.cycle_errors > load.cycles * 0.01:
        failures.append(f"{load.cycle_errors} of {load.cycles} stream cycles failed")
    result = SoakResult(passed=not failures, failures=failures, warm=warm, final=final,
                        samples=sampler.samples, requests=load.requests, cycles=load.cycles,
                        statuses=dict(load.statuses), cycle_errors=load.cycle_errors,
                        seconds=time.monotonic() - started, url=base)
    note("done", load, final)
    return result


# -- output -------------------------------------------------------------------------------------


def write_outputs(result: SoakResult, out: str) -> list[Path]:
    """``out.json`` always; ``out.png`` when matplotlib is installed. The paths written."""
    written = []
    json_path = Path(f"{out}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    written.append(json_path)
    try:
        png = chart(result, Path(f"{out}.png"))
    except ImportError:
        png = None
    if png is not None:
        written.append(png)
    return written


def chart(result: SoakResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    series = [("threads", "threads", 1), ("tasks", "asyncio tasks", 1),
              ("fds", "open fds", 1), ("rss", "resident memory (MiB)", 2**20)]
    colours = {"warm-up": "#f2f2f2", "warm": "#e0f0e0", "load": "#fdf0d8", "settle": "#e0e8f8"}
    for ax, (name, title, scale) in zip(axes.flat, series, strict=True):
        xs = [s.t for s in result.samples]
        ys = [getattr(s, name) / scale for s in result.samples]
        ax.plot(xs, ys, color="#1f5fa8", linewidth=1.2)
        for phase, colour in colours.items():
            ts = [s.t for s in result.samples if s.phase == phase]
            if ts:
                ax.axvspan(min(ts), max(ts), color=colour, zorder=0, label=phase)
        if result.warm is not None:
            warm = getattr(result.warm, name) / scale
            ax.axhline(warm, color="#2a8a2a", linestyle="--", linewidth=0.8, label="warm")
            if name == "rss":
                ax.axhline(warm * 1.05, color="#c03030", linestyle=":", linewidth=0.8,
                           label="warm + 5%")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1][0].set_xlabel("seconds")
    axes[1][1].set_xlabel("seconds")
    axes[0][0].legend(fontsize=7, loc="upper left")
    verdict = "PASS" if result.passed else "FAIL: " + "; ".join(result.failures)[:160]
    figure.suptitle(f"livecount soak — {result.requests} requests, {result.cycles} stream "
                    f"cycles — {verdict}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render(result: SoakResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"livecount soak: {result.requests} requests, {result.cycles} stream "
                        f"cycles in {result.seconds:.1f} s")
    for column in ("", "warm", "after", "Δ"):
        table.add_column(column, justify="right")
    if result.warm is not None and result.final is not None:
        for name, label, scale, unit in (("threads", "threads", 1, ""),
                                         ("tasks", "asyncio tasks", 1, ""),
                                         ("fds", "open fds", 1, ""),
                                         ("rss", "RSS", 2**20, " MiB")):
            before, after = getattr(result.warm, name) / scale, getattr(result.final, name) / scale
            fmt = "{:.1f}" if scale > 1 else "{:.0f}"
            delta = after - before
            extra = f" ({delta / before:+.1%})" if name == "rss" and before else ""
            table.add_row(label, fmt.format(before) + unit, fmt.format(after) + unit,
                          f"{delta:+.1f}{unit}{extra}" if scale > 1 else f"{delta:+.0f}")
    console.print(table)
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items()))
    console.print(f"statuses {statuses}; stream cycle errors {result.cycle_errors}")
    if result.passed:
        console.print("[bold green]PASS[/]: threads and tasks back at their warm values, fds "
                      "and RSS within tolerance")
    else:
        for failure in result.failures:
            console.print(f"[bold red]FAIL[/]: {failure}")


def run_soak_command(options: SoakOptions) -> int:
    """``livecount soak``: run, show progress, print the table, write the files; 0 on pass."""
    try:
        result = _run_with_progress(options)
    except (RuntimeError, ValueError, httpx.HTTPError) as error:  # a message, not a traceback
        print(f"livecount soak: error: {error}", file=sys.stderr)
        return 2
    render(result)
    if options.out:
        for path in write_outputs(result, options.out):
            print(f"wrote {path}")
    return 0 if result.passed else 1


def _run_with_progress(options: SoakOptions) -> SoakResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not options.progress:
        result = asyncio.run(run_soak(options))
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}")) as progress:
            requests = progress.add_task("requests", total=options.requests, info="")
            cycles = progress.add_task("stream cycles", total=options.cycles, info="")

            def report(phase: str, load: Load | None, sample: Sample | None) -> None:
                info = f"{phase}:"
                if sample is not None:
                    info += (f" threads {sample.threads:.0f} tasks {sample.tasks:.0f} "
                             f"fds {sample.fds:.0f} rss {sample.rss / 2**20:.0f} MiB")
                progress.update(requests, info=info)
                if load is not None:
                    def tick() -> None:
                        progress.update(requests, completed=load.requests)
                        progress.update(cycles, completed=load.cycles)
                    load.on_progress = tick

            result = asyncio.run(run_soak(options, report))
    return result


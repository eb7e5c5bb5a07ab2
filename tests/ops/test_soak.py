"""``livecount soak``: a short run against the real server passes (threads, tasks and fds
back at their warm values, RSS within 5%), and the same soak against the canary — an app
variant that leaks a thread per request, the outage of DESIGN §1 — fails, naming the thread
growth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from livecount.soak import Sample, SoakOptions, judge, parse_sample, run_soak

from .support import PYTHON, ROOT

pytestmark = pytest.mark.anyio


def test_livecount_soak_passes_against_the_real_server(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    result = subprocess.run(
        [sys.executable, "-m", "livecount", "soak", "--requests", "800", "--cycles", "80",
         "--warmup", "0.3", "--settle", "10", "--sample-every", "0.25", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "120"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["passed"] is True and report["failures"] == []
    assert report["requests"] == 800 and report["cycles"] == 80
    assert report["cycle_errors"] == 0
    assert not any(status.startswith("5") for status in report["statuses"])
    deltas = report["deltas"]
    assert deltas["threads"] == 0 and deltas["tasks"] == 0
    assert deltas["fds"] <= 8  # pools open connections lazily (SQLite: a file + its WAL)
    assert report["rss_growth"] <= 0.05
    phases = {sample["phase"] for sample in report["samples"]}
    assert {"warm-up", "warm", "load", "settle"} <= phases
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"soak, real server: {deltas} rss_growth={report['rss_growth']:.2%}")


async def test_the_soak_catches_the_canarys_thread_leak(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net works rather than being assumed: the canary starts a thread per request
    and never joins it; the soak fails and says so first."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("LIVECOUNT_CANARY_BALLAST", str(64 << 10))
    options = SoakOptions(requests=240, cycles=20, warmup=0.25, settle=1.0, sample_every=0.2,
                          out=None, progress=False,
                          serve_command=[PYTHON, "-m", "tests.ops.canary", "--port", "{port}",
                                         "--store", "{store}"])
    result = await run_soak(options)
    assert not result.passed
    assert result.failures[0].startswith("threads grew from"), result.failures
    assert result.warm is not None and result.final is not None
    assert result.deltas["threads"] >= 180  # one per request after the warm-up, and more
    assert result.requests == 240 and result.cycle_errors == 0
    print(f"soak, canary: {result.deltas} failures={result.failures}")


def test_judge_names_each_kind_of_growth() -> None:
    warm = Sample(t=0, phase="warm", threads=9, tasks=8, fds=25, rss=100 << 20, processes=1)
    assert judge(warm, warm, 0.05) == []
    same_but_rss = Sample(t=1, phase="settle", threads=9, tasks=8, fds=25,
                          rss=(100 << 20) * 1.049, processes=1)
    assert judge(warm, same_but_rss, 0.05) == []
    worse = Sample(t=1, phase="settle", threads=12, tasks=10, fds=30, rss=(100 << 20) * 1.2,
                   processes=1)
    tolerated = judge(warm, worse, 0.05, fd_tolerance=5)  # 25 → 30 fds: within 5
    assert [f.split()[0] for f in tolerated] == ["threads", "asyncio", "resident"]
    failures = judge(warm, worse, 0.05)
    assert [f.split()[0] for f in failures] == ["threads", "asyncio", "open", "resident"]
    assert failures[0] == "threads grew from 9 to 12 (+3) and did not come back after the load"
    assert "20.0%" in failures[3]


def test_samples_are_summed_over_workers() -> None:
    text = "\n".join([
        "# TYPE livecount_process_threads gauge",
        'livecount_process_threads{worker="0"} 5', 'livecount_process_threads{worker="1"} 6',
        "# TYPE livecount_asyncio_tasks gauge",
        'livecount_asyncio_tasks{worker="0"} 3', 'livecount_asyncio_tasks{worker="1"} 4',
        "# TYPE livecount_process_open_fds gauge",
        'livecount_process_open_fds{worker="0"} 20', 'livecount_process_open_fds{worker="1"} 21',
        "# TYPE livecount_process_resident_memory_bytes gauge",
        'livecount_process_resident_memory_bytes{worker="0"} 1e8',
        'livecount_process_resident_memory_bytes{worker="1"} 2e8', ""])
    sample = parse_sample(text, 1.5, "load")
    assert (sample.threads, sample.tasks, sample.fds, sample.rss) == (11, 7, 41, 3e8)
    assert sample.processes == 2

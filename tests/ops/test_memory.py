"""Memory limits and watermarks: the limit the process really has (cgroup v2, v1, host), the
watermark settings, readiness under real memory pressure, and a lone server recycling itself
past the hard watermark."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from livecount.memory import (
    MemoryLimit,
    MemoryState,
    memory_limit,
    parse_size,
    resolve_watermarks,
)
from livecount.supervisor import EXIT_RECYCLE
from tests.server.support import live_server, server_settings

from .support import PYTHON, free_port, process, samples, tail

pytestmark = pytest.mark.anyio

HOST = psutil.virtual_memory().total
MiB = 1 << 20


def tree(root: Path, files: dict[str, str], cgroup: str) -> tuple[Path, Path]:
    for name, text in files.items():
        path = root / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    proc = root / "cgroup"
    proc.write_text(cgroup)
    return root / "sys", proc


def test_cgroup_v2_limit_of_the_process_cgroup(tmp_path: Path) -> None:
    sys_root, proc = tree(tmp_path, {"cgroup.controllers": "cpu memory", "memory.max": "max",
                                     "kubepods/pod1/memory.max": str(512 * MiB)},
                          "0::/kubepods/pod1\n")
    limit = memory_limit(sys_root, proc)
    assert limit.bytes == 512 * MiB
    assert limit.source.startswith("cgroup v2") and "pod1/memory.max" in limit.source


def test_cgroup_v2_the_smallest_limit_on_the_path_applies(tmp_path: Path) -> None:
    sys_root, proc = tree(tmp_path, {"cgroup.controllers": "memory",
                                     "a/memory.max": str(256 * MiB),
                                     "a/b/memory.max": "max"}, "0::/a/b\n")
    assert memory_limit(sys_root, proc).bytes == 256 * MiB


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    sys_root, proc = tree(tmp_path, {
        "memory/memory.limit_in_bytes": "9223372036854771712",  # no limit
        "memory/docker/abc/memory.limit_in_bytes": str(1024 * MiB)},
        "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    limit = memory_limit(sys_root, proc)
    assert limit == MemoryLimit(1024 * MiB, limit.source)
    assert limit.source.startswith("cgroup v1")


def test_cgroup_v1_namespaced_root(tmp_path: Path) -> None:
    """Inside a container the memory hierarchy's root is the container's own cgroup, while
    /proc/self/cgroup still names the host path."""
    sys_root, proc = tree(tmp_path, {"memory/memory.limit_in_bytes": str(768 * MiB)},
                          "4:memory:/process_api/abc\n")
    assert memory_limit(sys_root, proc).bytes == 768 * MiB


def test_no_cgroup_limit_means_host_memory(tmp_path: Path) -> None:
    sys_root, proc = tree(tmp_path, {"cgroup.controllers": "memory", "memory.max": "max",
                                     "memory/memory.limit_in_bytes": "9223372036854771712"},
                          "0::/\n")
    assert memory_limit(sys_root, proc) == MemoryLimit(HOST, "host memory")
    # a limit above the host's memory is no limit either
    sys_root, proc = tree(tmp_path / "big", {"cgroup.controllers": "memory",
                                             "memory.max": str(HOST * 4)}, "0::/\n")
    assert memory_limit(sys_root, proc).source == "host memory"
    assert memory_limit(tmp_path / "nothing", tmp_path / "nothing").source == "host memory"


def test_this_machine_has_a_limit() -> None:
    limit = memory_limit()
    assert 0 < limit.bytes <= HOST


@pytest.mark.parametrize(("text", "expected"), [
    ("1073741824", 1 << 30), ("512MiB", 512 * MiB), ("512mib", 512 * MiB), ("1.5GiB", 3 << 29),
    ("800M", 800_000_000), ("2G", 2_000_000_000), ("64 KiB", 64 << 10), ("70%", 700),
    ("100%", 1000), ("12.5%", 125)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text, of=1000) == expected


@pytest.mark.parametrize("text", ["", "abc", "12 parsecs", "-5", "0", "0%", "150%", "%", "5%%"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected|percentage"):
        parse_size(text, of=1000)


def test_watermarks_default_to_shares_of_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIVECOUNT_SOFT_MEMORY", raising=False)
    monkeypatch.delenv("LIVECOUNT_HARD_MEMORY", raising=False)
    limit = MemoryLimit(4000 * MiB, "test")
    one = resolve_watermarks(limit=limit)
    assert (one.soft, one.hard) == (int(4000 * MiB * 0.70), int(4000 * MiB * 0.85))
    two = resolve_watermarks(workers=2, limit=limit)  # each worker: half the limit
    assert (two.soft, two.hard) == (int(2000 * MiB * 0.70), int(2000 * MiB * 0.85))
    assert two.state(0) is MemoryState.OK
    assert two.state(two.soft + 1) is MemoryState.SOFT
    assert two.state(two.hard + 1) is MemoryState.HARD


def test_watermarks_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = MemoryLimit(1000 * MiB, "test")
    monkeypatch.setenv("LIVECOUNT_SOFT_MEMORY", "300MiB")
    monkeypatch.setenv("LIVECOUNT_HARD_MEMORY", "60%")
    marks = resolve_watermarks(limit=limit)
    assert (marks.soft, marks.hard) == (300 * MiB, 600 * MiB)
    marks = resolve_watermarks("100MiB", "200MiB", limit=limit)  # flags win
    assert (marks.soft, marks.hard) == (100 * MiB, 200 * MiB)
    with pytest.raises(ValueError, match="must be below the hard one"):
        resolve_watermarks("90%", "80%", limit=limit)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livecount", *args], capture_output=True,
                          text=True, timeout=60)


def test_serve_refuses_bad_watermarks() -> None:
    result = run_cli("serve", "--soft-memory", "90%", "--hard-memory", "50%")
    assert result.returncode == 2
    assert "must be below the hard one" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("serve", "--hard-memory", "lots")
    assert result.returncode == 2 and "expected bytes" in result.stderr


async def test_readiness_follows_real_memory_pressure(tmp_path: Path) -> None:
    """/readyz and /metrics turn not-ready when this process really allocates past the soft
    watermark (no mocked psutil), and ready again once the memory is freed."""
    process_ = psutil.Process()
    gc.collect()
    soft = process_.memory_info().rss + 128 * MiB
    settings = server_settings(tmp_path, soft_memory_bytes=soft, hard_memory_bytes=soft * 4)
    async with live_server(settings) as server, server.client() as client:
        assert (await client.get("/readyz")).status_code == 200
        metrics = samples((await client.get("/metrics")).text)
        assert metrics[("livecount_ready", ())] == 1
        assert metrics[("livecount_memory_watermark_state", ())] == 0
        assert metrics[("livecount_memory_soft_watermark_bytes", ())] == soft

        ballast = b"x" * (256 * MiB)  # written, so resident (bytes(n) would not be)
        try:
            assert process_.memory_info().rss > soft
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            assert "above the soft watermark" in response.json()["error"]["message"]
            assert (await client.get("/healthz")).status_code == 200  # alive all the same
            metrics = samples((await client.get("/metrics")).text)
            assert metrics[("livecount_ready", ())] == 0
            assert metrics[("livecount_memory_watermark_state", ())] == 1
        finally:
            del ballast
        assert process_.memory_info().rss < soft  # a big allocation goes back to the system
        assert (await client.get("/readyz")).status_code == 200


def test_a_lone_server_recycles_itself_past_the_hard_watermark(tmp_path: Path) -> None:
    """Without --workers there is no one to start a replacement: past the hard watermark
    ``livecount serve`` drains and exits with status 75 for its process manager."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log, process(
            [PYTHON, "-m", "livecount", "serve", "--port", str(port), "--store",
             f"sqlite:///{tmp_path}/serve.db", "--soft-memory", "1MiB", "--hard-memory",
             "2MiB"], log, env={"LIVECOUNT_ADMIN_TOKEN": "lc_admin_x"}) as proc:
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not recycle itself:\n{tail(log_path)}")
    text = tail(log_path)
    assert code == EXIT_RECYCLE, text
    assert re.search(r"above the hard watermark \d+: asking to be recycled", text), text
    assert "exiting with status 75 (recycle: memory)" in text
    assert "Application shutdown complete" in text  # it drained and stopped cleanly

"""``livecount demo`` as a user runs it: a real subprocess, its printed login URLs work, and
it exits 0 and removes its temporary directory, after ``--duration`` or on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from anyio.abc import ByteReceiveStream, Process

pytestmark = pytest.mark.anyio

LOGIN = re.compile(r"^\s+(?P<name>\S.*\S) \((?P<team>[^)]+)\)\s+(?P<url>http://\S+/\?ws=\d+&token=\S+)$")
ADMIN = re.compile(r"^Admin token: (?P<token>\S+)$")
STORE = re.compile(r"store sqlite:///(?P<path>\S+)/livecount\.db")
STARTUP_TIMEOUT = 90  # seconds: seeding and server start on a loaded 2-core machine


class Lines:
    """Lines of a byte stream, read as they come."""

    def __init__(self, stream: ByteReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.seen: list[str] = []

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode()
                self.seen.append(text)
                yield text
            try:
                self.buffer += await self.stream.receive()
            except anyio.EndOfStream:
                if self.buffer:
                    self.seen.append(self.buffer.decode())
                    yield self.seen[-1]
                return

    async def rest(self) -> str:
        async for _ in self:
            pass
        return "\n".join(self.seen)


class Started:
    def __init__(self, lines: Lines) -> None:
        self.lines = lines
        self.logins: list[tuple[str, str, str]] = []  # name, team, url
        self.admin_token = ""
        self.directory: Path | None = None

    async def read(self) -> None:
        """Read until the admin token (printed after the twelve login URLs)."""
        with anyio.fail_after(STARTUP_TIMEOUT):
            async for line in self.lines:
                if match := STORE.search(line):
                    self.directory = Path(match["path"])
                if match := LOGIN.match(line):
                    self.logins.append((match["name"], match["team"], match["url"]))
                if match := ADMIN.match(line):
                    self.admin_token = match["token"]
                    return
        raise AssertionError("the demo ended before printing its URLs:\n"
                             + "\n".join(self.lines.seen))


async def start(tmp_path: Path, *args: str) -> tuple[Process, Started]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # mkdtemp() goes here, where we can look
    env.pop("PYTHONUNBUFFERED", None)  # the URLs must show up promptly through a pipe too
    process = await anyio.open_process(
        [sys.executable, "-m", "livecount", "demo", "--port", "0", "--conversations", "200",
         "--rate", "20", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    started = Started(Lines(process.stdout))
    try:
        await started.read()
    except BaseException:
        process.kill()
        await process.wait()
        await process.aclose()
        raise
    return process, started


async def finish(process: Process, started: Started) -> tuple[int, str]:
    async with process:
        with anyio.fail_after(60):
            output = await started.lines.rest()
            code = await process.wait()
    return code, output


def demo_dirs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("livecount-demo-*"))


async def check_logins(started: Started) -> None:
    assert len(started.logins) == 12
    assert len({url for _, _, url in started.logins}) == 12
    assert {team for _, team, _ in started.logins} == {"Billing", "Technical support", "Sales"}
    url = urlsplit(started.logins[0][2])
    base = f"{url.scheme}://{url.netloc}"
    query = parse_qs(url.query)
    ws, token = query["ws"][0], query["token"][0]
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        page = await client.get("/", params={"ws": ws, "token": token})
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]

        mine = await client.get(f"/api/workspaces/{ws}/counts",
                                headers={"Authorization": f"Bearer {token}"})
        assert mine.status_code == 200, mine.text
        counts = mine.json()["counts"]
        # 7 folders + 6 shared custom views + this teammate's own "My priority"
        assert len(counts) == 14
        other = parse_qs(urlsplit(started.logins[1][2]).query)["token"][0]
        theirs = await client.get(f"/api/workspaces/{ws}/counts",
                                  headers={"Authorization": f"Bearer {other}"})
        assert theirs.status_code == 200 and len(theirs.json()["counts"]) == 13
        admin = await client.get(f"/api/workspaces/{ws}/counts",
                                 headers={"Authorization": f"Bearer {started.admin_token}"})
        assert admin.status_code == 200 and len(admin.json()["counts"]) == 13
        assert 100 <= max(v for v in admin.json()["counts"].values() if isinstance(v, int)) <= 230
        wrong = await client.get(f"/api/workspaces/{ws}/counts",
                                 headers={"Authorization": "Bearer not-a-token"})
        assert wrong.status_code == 401


async def test_runs_for_its_duration_and_cleans_up(tmp_path: Path) -> None:
    process, started = await start(tmp_path, "--duration", "3")
    try:
        assert started.directory is not None and started.directory.parent == tmp_path
        assert demo_dirs(tmp_path) == [started.directory]
        await check_logins(started)
    finally:
        code, output = await finish(process, started)
    assert code == 0, output
    assert re.search(r"\b[1-9]\d* changes \(", output), output  # the simulator made changes
    assert f"Removed {started.directory}" in output
    assert demo_dirs(tmp_path) == []


async def test_ctrl_c_stops_it_gracefully(tmp_path: Path) -> None:
    """With a live stream open: the stream gets its snapshot and deltas from the simulated
    changes, Ctrl-C tells it to reconnect, and the process exits 0 promptly."""
    process, started = await start(tmp_path)  # no --duration: runs until interrupted
    url = urlsplit(started.logins[0][2])
    query = parse_qs(url.query)
    stream_url = f"{url.scheme}://{url.netloc}/api/workspaces/{query['ws'][0]}/stream"
    types: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=10) as client, client.stream(
                "GET", stream_url, params={"token": query["token"][0]}) as response:
            assert response.status_code == 200
            with anyio.fail_after(30):
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    types.append(json.loads(line[6:])["type"])
                    if types[-1] == "reconnect":
                        break
                    if types.count("delta") == 3 and types[-1] == "delta":
                        assert process.returncode is None
                        process.send_signal(signal.SIGINT)
    finally:
        with anyio.fail_after(15):
            code, output = await finish(process, started)
    assert types[0] == "snapshot" and types[-1] == "reconnect", types
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert demo_dirs(tmp_path) == []


async def test_a_second_ctrl_c_still_stops_the_service_cleanly(tmp_path: Path) -> None:
    process, started = await start(tmp_path)
    try:
        await anyio.sleep(0.5)
        process.send_signal(signal.SIGINT)
        # Apart, or the two merge into one pending signal; soon, so the second lands while
        # uvicorn shuts down (it polls should_exit every 0.1 s, then waits 0.1 s more).
        await anyio.sleep(0.05)
        process.send_signal(signal.SIGINT)
    finally:
        with anyio.fail_after(15):
            code, output = await finish(process, started)
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert demo_dirs(tmp_path) == []


async def test_ctrl_c_while_seeding_stops_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = await anyio.open_process(
        [sys.executable, "-m", "livecount", "demo", "--port", "0", "--conversations", "20000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    lines = Lines(process.stdout)
    async with process:
        with anyio.fail_after(STARTUP_TIMEOUT):
            async for line in lines:
                if line.startswith("Seeding"):
                    break
        await anyio.sleep(0.5)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(15):  # seeding 20,000 conversations would take about 30 s
            output = await lines.rest()
            code = await process.wait()
    assert code == 0, output
    assert "Admin token" not in output and "Traceback" not in output, output
    assert demo_dirs(tmp_path) == []


async def test_keep_leaves_the_database(tmp_path: Path) -> None:
    process, started = await start(tmp_path, "--duration", "0.5", "--keep")
    code, output = await finish(process, started)
    assert code == 0, output
    assert started.directory is not None
    assert demo_dirs(tmp_path) == [started.directory]
    assert (started.directory / "livecount.db").stat().st_size > 0

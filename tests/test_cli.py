"""The ``livecount`` command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livecount.store import open_store

pytestmark = pytest.mark.anyio


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livecount", *args], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "120", "PATH": "/usr/bin"})


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("reconcile", "serve", "demo"):
        assert command in result.stdout


async def test_reconcile_prints_a_table_and_finds_no_drift(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    await store.open()
    try:
        ws = await store.create_workspace("acme")
        mate, _ = await store.create_teammate(ws.id, "Ann", "ann@example.com")
        for i in range(30):
            await store.create_conversation(
                ws.id, {"assignee_id": mate.id if i % 2 else None, "tags": ["vip"]}, mate.id)
        await store.create_view(ws.id, "VIP by assignee",
                                {"field": "tags", "operator": "contains", "value": "vip"},
                                "assignee_id", None)
    finally:
        await store.close()
    result = run("reconcile", "--store", sqlite_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "livecount reconcile" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[0] == "1" and cells[2] == "8" and cells[5] == "0"  # 8 views, 0 drifted


def test_reconcile_refuses_a_bad_url() -> None:
    result = run("reconcile", "--store", "mysql://nope")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr

"""The service's life cycle: a start that fails part-way leaves nothing running."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from livecount.exceptions import Unavailable
from livecount.service import Service, Settings

pytestmark = pytest.mark.anyio


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_counter_worker_whose_leases_cannot_start_stops_what_it_opened(
        tmp_path: Path) -> None:
    """The store opens (its threads start), then taking the first leases fails (Redis is not
    there): start() raises and everything is closed again — no store thread, no connection
    (the leak guard checks sockets and threads too)."""
    threads = {t.name for t in threading.enumerate()}
    service = Service(Settings(store_url=f"sqlite:///{tmp_path}/s.db",
                               broker_url=f"redis://127.0.0.1:{_closed_port()}/0",
                               role="worker", reconcile_every=None))
    with pytest.raises(Unavailable):
        await service.start()
    assert {t.name for t in threading.enumerate()} <= threads

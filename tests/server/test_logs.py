"""No token or Authorization value in any log line (DESIGN.md §5).

A real uvicorn server (the app's, with uvicorn's default logging at INFO, as ``livecount
serve`` runs it) serves WebSocket and SSE clients that pass ``?token=``, an SSE client with
``Authorization: Bearer``, API calls with bearer tokens and wrong tokens. Every record that
reaches a handler is captured (a handler on the root logger and on uvicorn's two loggers,
which do not propagate), and so is what uvicorn's own handlers print. With the redaction
installed no line holds a token and the access lines show ``token=REDACTED``; without it
(the control case) the same run leaks, so the capture does see the lines that matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from uvicorn.logging import AccessFormatter
from websockets.asyncio.client import connect

from livecount.server.app import Server, create_app, server_options
from livecount.server.logs import REDACTED, RedactSecrets, install_redaction, redact
from livecount.server.logs import uninstall_redaction as _uninstall

from .support import ADMIN_TOKEN, auth, create_tenant, server_settings

pytestmark = pytest.mark.anyio

_LOGGERS = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "uvicorn.asgi", "livecount",
            "websockets")


class Capture(logging.Handler):
    """Formats every record it gets the way uvicorn's handlers would."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self._access = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s',
                                       use_colors=False)
        self._default = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        formatter = self._access if record.name == "uvicorn.access" else self._default
        self.lines.append(formatter.format(record))


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Put the loggers this test touches back as they were (uvicorn's dictConfig and the
    redaction change global state)."""
    saved = {name: (logger, logger.handlers[:], logger.filters[:], logger.level,
                    logger.propagate, logger.disabled)
             for name in _LOGGERS for logger in (logging.getLogger(name),)}
    try:
        yield
    finally:
        _uninstall()
        for logger, handlers, filters, level, propagate, disabled in saved.values():
            logger.handlers[:] = handlers
            logger.filters[:] = filters
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


class _Server(Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave pytest's signal handlers alone
        yield


@contextlib.asynccontextmanager
async def logging_server(tmp_path: Path, capture: Capture, redaction: bool
                         ) -> AsyncIterator[tuple[str, str]]:
    """The app under uvicorn with its default log config at INFO, as ``livecount serve``
    sets it up: Config first, then :func:`install_redaction`. Yields (http, ws) base URLs."""
    settings = server_settings(tmp_path)
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="info",
                            timeout_graceful_shutdown=5, **server_options(settings))
    for name in ("", "uvicorn", "uvicorn.access"):  # where records end up
        logging.getLogger(name).addHandler(capture)
    if redaction:
        install_redaction()
    server = _Server(config, app)
    task = asyncio.create_task(server.serve(), name="uvicorn-logs-test-server")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped during start-up")
            await asyncio.sleep(0.005)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}", f"ws://{host}:{port}"
    finally:
        server.should_exit = True
        await task


async def exercise(base_url: str, ws_url: str) -> tuple[list[str], str]:
    """Use every way a token travels; return the tokens used and the workspace's path."""
    wrong = "lc_wrong-token-9f8e7d6c5b4a"
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as client:
        admin = ADMIN_TOKEN
        tenant = await create_tenant(client, admin, teammates=3, teams=1)
        ann, bob, cid = tenant.people
        ws_path, sse_path = tenant.url("/ws"), tenant.url("/stream")

        async with connect(f"{ws_url}{ws_path}?token={ann.token}", proxy=None,
                           open_timeout=5) as ws:
            assert json.loads(await ws.recv())["type"] == "snapshot"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(f"{ws_url}{ws_path}?token={wrong}", proxy=None, open_timeout=5):
                pass
        assert refused.value.response.status_code == 401

        for params, headers in (({"token": bob.token}, {}), ({}, auth(cid.token))):
            async with client.stream("GET", sse_path, params=params, headers=headers) as sse:
                assert sse.status_code == 200
                async for line in sse.aiter_lines():
                    if line.startswith("data:"):
                        assert json.loads(line[5:])["type"] == "snapshot"
                        break

        response = await client.post(tenant.url("/conversations"), json={},
                                     headers=auth(ann.token))
        assert response.status_code == 201
        response = await client.get(tenant.url("/counts"), headers=auth(bob.token))
        assert response.status_code == 200
        response = await client.get(tenant.url("/counts"), params={"token": cid.token},
                                    headers=auth(cid.token))
        assert response.status_code == 200
        response = await client.get(tenant.url("/counts"), params={"token": wrong},
                                    headers=auth(wrong))
        assert response.status_code == 401
        response = await client.get("/api/workspaces", params={"access_token": admin})
        assert response.status_code in (401, 405)
    return [admin, ann.token, bob.token, cid.token, wrong], tenant.url()


@pytest.mark.parametrize("redaction", [True, False], ids=["redacted", "control"])
async def test_no_token_in_any_log_line(tmp_path: Path, logging_state: None,
                                        capsys: pytest.CaptureFixture[str],
                                        redaction: bool) -> None:
    capture = Capture()
    async with logging_server(tmp_path, capture, redaction) as (base_url, ws_url):
        tokens, workspace = await exercise(base_url, ws_url)
    printed = capsys.readouterr()  # what uvicorn's own handlers wrote
    lines = capture.lines + (printed.out + printed.err).splitlines()

    access = [line for line in capture.lines if " HTTP/1.1\" " in line]
    assert any(f"GET {workspace}/stream?token=" in line for line in access), capture.lines
    assert any(f"WebSocket {workspace}/ws?token=" in line for line in capture.lines)
    leaks = [line for line in lines for token in tokens if token in line]
    if not redaction:  # the control: the capture sees what would leak
        assert leaks
        return
    assert leaks == []
    assert any(f"GET {workspace}/stream?token={REDACTED} HTTP/1.1\" 200" in line
               for line in access), access
    assert any(f'"WebSocket {workspace}/ws?token={REDACTED}" [accepted]' in line
               for line in capture.lines), capture.lines
    assert any(f'"WebSocket {workspace}/ws?token={REDACTED}" 401' in line
               for line in capture.lines), capture.lines
    assert any(f"GET {workspace}/counts?token={REDACTED} HTTP/1.1\" 401" in line
               for line in access), access
    assert any(f"access_token={REDACTED}" in line for line in access), access
    assert any(f"GET {workspace}/stream?token=REDACTED" in line
               for line in printed.out.splitlines()), "uvicorn's access handler"


# -- the filter alone ------------------------------------------------------------------------


def _record(msg: Any, args: Any, name: str = "livecount.test") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)


def test_redacts_message_and_arguments_keeping_their_shape() -> None:
    secret = "lc_s3cret-value"
    access = _record('%s - "%s %s HTTP/%s" %d',
                     ("1.2.3.4:5", "GET", f"/a/stream?since=1&token={secret}&x=2", "1.1", 200))
    kept = [  # (record, its message once filtered): the arguments keep their shape
        (access, '1.2.3.4:5 - "GET /a/stream?since=1&token=REDACTED&x=2 HTTP/1.1" 200'),
        (_record("%(path)s by %(who)s", {"path": f"/x?token={secret}", "who": 7}),
         "/x?token=REDACTED by 7"),
        (_record("headers %s", ([(b"authorization", f"Bearer {secret}".encode())],)),
         "headers [(b'authorization', b'REDACTED')]"),
        (_record("%s", ({"Authorization": f"Bearer {secret}"},)),  # one dict: the mapping
         "{'Authorization': 'REDACTED'}"),
        (_record("%s and %s", ({"Authorization": f"Bearer {secret}"}, 1)),
         "{'Authorization': 'REDACTED'} and 1"),
        (_record("got %s", (b"GET /ws?token=" + secret.encode(),)),
         "got b'GET /ws?token=REDACTED'"),
        (_record(httpx.URL(f"http://h/x?token={secret}"), ()), "http://h/x?token=REDACTED"),
        (_record("%s", (httpx.URL(f"http://h/x?token={secret}"),)),
         "http://h/x?token=REDACTED"),
        (_record("plain %s %d", ("text", 5)), "plain text 5"),
    ]
    collapsed = [  # the template names the secret: formatted, redacted, no arguments left
        (_record(f"no format: /ws?token={secret}", ()), "no format: /ws?token=REDACTED"),
        (_record("Authorization: Bearer %s", (secret,)), "Authorization: REDACTED"),
        (_record("sent Bearer %s to %s", (secret, "/x")), "sent Bearer REDACTED to /x"),
        (_record(f"via Bearer {secret}", None), "via Bearer REDACTED"),
        (_record("%(token)s and %(n)d", {"token": secret, "n": 3}), "REDACTED and 3"),
        (_record("token=%s %s", (secret,)), "token=REDACTED"),  # a template/args mismatch
    ]
    for record, expected in kept:
        args = record.args
        assert RedactSecrets().filter(record) is True
        assert record.getMessage() == expected
        assert type(record.args) is type(args)
        if isinstance(args, tuple):
            assert isinstance(record.args, tuple) and len(record.args) == len(args)
    assert access.args is not None and access.args[-1] == 200  # still an int
    for record, expected in collapsed:
        assert RedactSecrets().filter(record) is True
        assert record.getMessage().startswith(expected)
        assert secret not in record.getMessage() and not record.args
    # a bare token marked by none of token=, Bearer, Authorization is not recognised
    assert redact(f"token {secret}") == f"token {secret}"


def test_an_access_record_still_formats() -> None:
    record = _record('%s - "%s %s HTTP/%s" %d',
                     ("1.2.3.4:5", "GET", "/s?token=lc_x", "1.1", 200), "uvicorn.access")
    RedactSecrets().filter(record)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s',
                           use_colors=False).format(record)
    assert line == '1.2.3.4:5 - "GET /s?token=REDACTED HTTP/1.1" 200 OK'


def test_install_is_idempotent(logging_state: None) -> None:
    install_redaction()
    install_redaction()
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn", "livecount"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RedactSecrets) for f in filters) == 1, name
    for handler in logging.getLogger().handlers:
        assert sum(isinstance(f, RedactSecrets) for f in handler.filters) == 1
    # a logger's filter does not see its children's records: existing children get it too
    import livecount.server.errors  # noqa: F401  (creates "livecount.server")

    install_redaction()
    assert sum(isinstance(f, RedactSecrets)
               for f in logging.getLogger("livecount.server").filters) == 1
    assert logging.lastResort is not None
    assert sum(isinstance(f, RedactSecrets) for f in logging.lastResort.filters) == 1
    _uninstall()
    assert not any(isinstance(f, RedactSecrets)
                   for f in logging.getLogger("livecount.server").filters)
    assert not any(isinstance(f, RedactSecrets) for f in logging.lastResort.filters)

"""The production store: :class:`SQLStore` on PostgreSQL through psycopg 3.

Same schema, same transactions and same outbox as SQLite; what differs is that several
processes (gateways, workers) write at once, so the things SQLite gets from its single write
lock are made explicit here:

- **Outbox positions in commit order.** An outbox id comes from a sequence when the row is
  inserted, but transactions commit in any order: without care a reader could see id 11
  committed while 10 is still in flight, move past it and skip 10 forever. Every write
  transaction therefore takes ``pg_advisory_xact_lock(OUTBOX_LOCK_KEY)`` right before it
  inserts an outbox row and holds it until it commits: ids are drawn only by the one
  transaction holding the lock, so when one becomes visible every lower id is already
  committed (or rolled back for good; PostgreSQL makes a commit visible before it releases
  its locks). Appends serialize across processes; the rest of a write (reads, validation,
  its own rows) still runs concurrently. Every row lock a transaction takes comes before its
  first append (the hook's contract, see ``_reopen_conversations``), so the advisory lock is
  always the last one taken and writers cannot deadlock on it.
- **Reads are snapshots.** Read transactions run at REPEATABLE READ, so a snapshot's or a
  recount's outbox position and its rows agree.
- **Writes lock what they read.** READ COMMITTED gives each statement its own snapshot, and a
  conversation is read in several (side tables, then the row); a write transaction locks the
  conversation's (or view's, or for a new view the workspace's) row first, so what it loads
  is whole and stays so until it commits.
- **Conversation ids from the sequence** (``MAX(id) + 1`` is only safe with one writer).
- **Group commits** (several conversation writes in one transaction, see
  :mod:`~livecount.store.sqlstore`) lock every row they will change first, in id order, in one
  statement (:meth:`~PostgresStore._lock_group`), and append their outbox rows together, in
  one statement right before COMMIT, taking the outbox lock just before it: the rule above
  holds for them too, the lock is held for two statements and the commit instead of the
  group's every round trip, and one commit (one WAL flush) serves the whole group.
- **Wake-ups across processes.** A transaction that appends also sends
  ``NOTIFY livecount_outbox`` (delivered when it commits; its payload names the store that
  sent it). A store whose :meth:`~PostgresStore.on_commit` has subscribers keeps one
  listening connection on a thread of its own, and calls them for commits of *other*
  processes (its own commits call them from the writer, as on SQLite). A notification only
  wakes the relay: a lost one (a dropped connection, a restart) costs latency, never data,
  because the relay also polls the outbox; after the listener reconnects it calls the
  callbacks once, in case it missed something meanwhile.

Connections: at most 4 pooled (the writer, two readers, the relay's reader; no overflow),
checked with a ping before use, so a connection the server dropped (a restart, an operator's
``pg_terminate_backend``) is replaced transparently; one that drops during a call fails that
call with :class:`~livecount.exceptions.Unavailable` (503). Plus the listener's one while
somebody listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import selectors
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from ..domain import Image
from ..exceptions import ValidationError
from .base import View
from .raw import RawTx
from .schema import conversations, views, workspaces
from .sqlstore import WRITE_OPTION, SQLStore

__all__ = [
    "DEFAULT_OPTIONS",
    "MIGRATION_LOCK_KEY",
    "OUTBOX_CHANNEL",
    "OUTBOX_LOCK_KEY",
    "PostgresStore",
]

#: The channel every append notifies (delivered at commit).
OUTBOX_CHANNEL: Final = "livecount_outbox"
#: ``pg_advisory_xact_lock`` keys (bigint): "lcoutbox" and "lcmigrat" in ASCII.
OUTBOX_LOCK_KEY: Final = int.from_bytes(b"lcoutbox", "big")
MIGRATION_LOCK_KEY: Final = int.from_bytes(b"lcmigrat", "big")
#: The writer, two readers and the relay's reader: one connection each, never more.
POOL_SIZE: Final = 4
#: libpq's connect timeout (seconds) unless the URL sets ``connect_timeout``.
DEFAULT_CONNECT_TIMEOUT: Final = 10
#: Session settings of every connection (the URL's ``options`` may override them): no JIT
#: (see :class:`PostgresStore`), and a lock held elsewhere for 5 s fails the statement, which
#: the API answers 503 with ``Retry-After`` (SQLite's ``busy_timeout`` does the same).
DEFAULT_OPTIONS: Final = "-c jit=off -c lock_timeout=5s"
#: How long a migration waits for another process's migration to finish.
MIGRATION_LOCK_TIMEOUT: Final = "10min"
#: The listener's reconnect backoff: from the first to the last, doubling.
_LISTEN_BACKOFF: Final = (0.05, 5.0)
#: The listener never sends a query while it waits (it could not be interrupted), so TCP
#: keepalives detect a server that vanished without closing the connection (~1 min).
_LISTEN_KEEPALIVES: Final = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                             "keepalives_count": 3}

_DRIVERS: Final = ("postgresql", "postgres", "postgresql+psycopg")
_URL_HELP: Final = "expected a URL like postgresql://user@host:5432/database"
_log = logging.getLogger("livecount.store")


def _write_transaction(conn: Connection) -> bool:
    return bool(conn.get_execution_options().get(WRITE_OPTION, False))


class PostgresStore(SQLStore):
    """``postgresql://user:password@host:port/database`` (also ``postgres://`` and
    ``postgresql+psycopg://``); query parameters are libpq's (``sslmode``, ``options``,
    ``application_name``, ...). ``connect_timeout`` defaults to 10 s, ``application_name``
    to ``livecount``; sessions get :data:`DEFAULT_OPTIONS`: JIT off (a filter compiles to
    many ``EXISTS`` subplans, which JIT spends ~100 ms a query compiling, for no gain at this
    size of query) and ``lock_timeout`` 5 s (a lock held elsewhere longer is a 503, not a
    wedged writer)."""

    read_isolation: ClassVar[str | None] = "REPEATABLE READ"
    #: Take the outbox lock before each append (see the module's docstring). Only tests turn
    #: it off, to show what goes wrong without it.
    serialize_appends: bool = True
    #: Group commits append their outbox rows in one statement right before COMMIT (see
    #: the module's docstring); off only in the benchmark's baseline.
    defer_appends: bool = True

    def __init__(self, url: str) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ValidationError(_URL_HELP) from None
        if parsed.drivername not in _DRIVERS:
            raise ValidationError(f"{_URL_HELP} (the driver is psycopg 3: "
                                  "postgresql+psycopg:// or no driver)")
        if not parsed.database:
            raise ValidationError(f"{_URL_HELP}: the database name is missing")
        options = parsed.query.get("options")
        options = options if isinstance(options, str) or options is None else options[-1]
        # Ours first: a setting the URL's options repeat wins.
        self._options = " ".join(filter(None, (DEFAULT_OPTIONS, options)))
        self._engine_url = parsed.set(drivername="postgresql+psycopg").difference_update_query(
            ["options"])
        self._connect_defaults: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            self._connect_defaults["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        if "application_name" not in parsed.query:
            self._connect_defaults["application_name"] = "livecount"
        #: Names this store in its notifications, so its listener skips its own commits.
        self.instance = secrets.token_hex(8)
        self._listener: _Listener | None = None
        self._listener_lock = threading.Lock()
        super().__init__(url)

    def __repr__(self) -> str:  # never the password
        shown = self._engine_url.set(drivername="postgresql")
        return f"<{type(self).__name__} {shown.render_as_string(hide_password=True)!r}>"

    def _create_engine(self) -> Engine:
        return sa.create_engine(
            self._engine_url, poolclass=QueuePool, pool_size=POOL_SIZE, max_overflow=0,
            pool_timeout=30, pool_pre_ping=True,
            connect_args={**self._connect_defaults, "options": self._options})

    def _conninfo(self) -> tuple[str, dict[str, Any]]:
        """What ``psycopg.connect`` needs to open a connection like the pool's."""
        url = self._engine_url.set(drivername="postgresql")
        return (url.render_as_string(hide_password=False),
                {**self._connect_defaults, "options": self._options})

    # -- hooks of SQLStore -----------------------------------------------------------------

    def _before_outbox_insert(self, conn: Connection | RawTx) -> None:
        """Take the outbox lock (held to the end of the transaction; taking it again is
        free) and queue the notification, which PostgreSQL sends on commit, once per
        transaction. Repeated for every append, so a savepoint rolled back after an append
        (which releases the lock it took) cannot leave a later append unlocked. On the hot
        path (a group commit, no savepoints) once per transaction: the first append takes
        them and the transaction knows it holds them."""
        if isinstance(conn, RawTx):
            if conn.outbox_locked:
                return
            if self.serialize_appends:
                conn.execute("SELECT pg_advisory_xact_lock(%s), pg_notify(%s, %s)",
                             (OUTBOX_LOCK_KEY, OUTBOX_CHANNEL, self.instance))
            else:
                conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, self.instance))
            conn.outbox_locked = True
            return
        if self.serialize_appends:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key), pg_notify(:channel, "
                                 ":payload)"),
                         {"key": OUTBOX_LOCK_KEY, "channel": OUTBOX_CHANNEL,
                          "payload": self.instance})
        else:
            conn.execute(sa.text("SELECT pg_notify(:channel, :payload)"),
                         {"channel": OUTBOX_CHANNEL, "payload": self.instance})

    def _lock_migrations(self, conn: Connection) -> None:
        conn.execute(sa.text(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'"))
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})

    def _next_conversation_id(self, conn: Connection | RawTx) -> int:
        """The next value of the ``conversations.id`` sequence: unique across processes,
        never reused (a rolled-back create leaves a gap, which nothing minds)."""
        if isinstance(conn, RawTx):
            return conn.next_conversation_id()
        return int(conn.scalar(sa.text(
            "SELECT nextval(pg_get_serial_sequence('conversations', 'id'))")))

    def _load_conversation(self, conn: Connection | RawTx, workspace_id: int,
                           conversation_id: int) -> Image:
        if isinstance(conn, RawTx):  # it loads the row FOR UPDATE
            return super()._load_conversation(conn, workspace_id, conversation_id)
        if _write_transaction(conn):
            self._lock_rows(conn, conversations, [conversation_id], workspace_id)
        return super()._load_conversation(conn, workspace_id, conversation_id)

    def _update_view(self, conn: Connection, workspace_id: int, view_id: int, name: str,
                     filter_text: str, group_by: str | None, position: int | None) -> View:
        self._lock_rows(conn, views, [view_id], workspace_id)
        return super()._update_view(conn, workspace_id, view_id, name, filter_text, group_by,
                                     position)

    def _delete_view(self, conn: Connection, workspace_id: int, view_id: int) -> None:
        self._lock_rows(conn, views, [view_id], workspace_id)
        super()._delete_view(conn, workspace_id, view_id)

    def _create_view(self, conn: Connection, workspace_id: int, name: str, filter_text: str,
                     group_by: str | None, owner_id: int | None) -> View:
        """Creations in one workspace take turns, so two processes cannot both take the
        next position, or both pass the limit on views."""
        if isinstance(workspace_id, int) and 0 < workspace_id < 2**63:
            conn.execute(sa.select(workspaces.c.id).where(workspaces.c.id == workspace_id)
                         .with_for_update(key_share=True))  # FOR NO KEY UPDATE
        return super()._create_view(conn, workspace_id, name, filter_text, group_by, owner_id)

    def _lock_group(self, tx: RawTx, conversation_ids: list[int]) -> None:
        """Lock the rows a group commit will change, in id order, before its first append:
        the outbox lock stays the last lock each transaction takes (see the module)."""
        tx.lock_conversations(conversation_ids)

    def _reopen_conversations(self, conn: Connection, due: list[tuple[int, int, int]],
                              fields: dict[str, Any]) -> list[bool]:
        """Lock every due conversation (in id order) before the first reopen appends: the
        outbox lock must be the last lock a transaction takes (see the module)."""
        ids = sorted({c for _, c, _ in due if isinstance(c, int) and 0 < c < 2**63})
        for start in range(0, len(ids), 1000):
            conn.execute(sa.select(conversations.c.id)
                         .where(conversations.c.id.in_(ids[start:start + 1000]))
                         .order_by(conversations.c.id).with_for_update())
        return super()._reopen_conversations(conn, due, fields)

    @staticmethod
    def _lock_rows(conn: Connection, table: sa.Table, ids: Sequence[int],
                   workspace_id: int) -> None:
        wanted = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)
                  and 0 < i < 2**63]
        if wanted and isinstance(workspace_id, int) and 0 < workspace_id < 2**63:
            conn.execute(sa.select(table.c.id).where(
                table.c.id.in_(wanted), table.c.workspace_id == workspace_id)
                .order_by(table.c.id).with_for_update())

    # -- notifications from other processes ------------------------------------------------

    def on_commit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after each commit that grew the outbox: this store's (on its
        writer thread, right after the commit) and, through LISTEN/NOTIFY, other processes'
        (on the store's listener thread, soon after). Keep it cheap and thread-safe; a
        notification can be lost or come twice, so use it to wake a reader that polls
        anyway, never as the record of what changed."""
        unsubscribe = super().on_commit(callback)
        if self._engine is not None:
            self._start_listener()
        return unsubscribe

    async def open(self) -> None:
        await super().open()
        if self._callbacks:
            self._start_listener()

    def _start_listener(self) -> None:
        with self._listener_lock:
            if self._listener is None:
                conninfo, kwargs = self._conninfo()
                listener = _Listener(conninfo, kwargs, self.instance, self._notify)
                listener.start()
                self._listener = listener

    async def _shutdown(self) -> None:
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        try:
            await super()._shutdown()
        finally:
            if listener is not None:
                await listener.join()

    def listening(self) -> bool:
        """Whether the listener is connected and listening (for tests and health checks)."""
        listener = self._listener
        return listener is not None and listener.listening.is_set()


class _Listener:
    """One thread with one autocommit connection that LISTENs on :data:`OUTBOX_CHANNEL` and
    calls ``fire`` for every batch of notifications another store sent.

    It sleeps in a selector (epoll) on the connection's socket and a pipe; :meth:`stop`
    writes to the pipe, so stopping never waits for a timeout. A failed connection is retried
    with a backoff (which stop() interrupts too), and each reconnect fires once.
    """

    def __init__(self, conninfo: str, kwargs: dict[str, Any], instance: str,
                 fire: Callable[[], None]) -> None:
        self._conninfo = conninfo
        self._kwargs = {**_LISTEN_KEEPALIVES, **kwargs,
                        "connect_timeout": min(int(kwargs.get("connect_timeout") or 5), 5)}
        self._instance = instance
        self._fire = fire
        self._stopping = threading.Event()
        self.listening = threading.Event()
        self._exit_lock = threading.Lock()
        self._exited = False
        self._on_exit: Callable[[], None] | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="livecount-store-listen",
                                        daemon=True)

    def start(self) -> None:
        try:
            self._thread.start()
        except BaseException:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            raise

    def stop(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    async def join(self) -> None:
        """Wait for the thread without blocking the event loop, then close the pipe."""
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        with self._exit_lock:
            if self._exited:
                exited.set()
            else:
                def on_exit() -> None:
                    loop.call_soon_threadsafe(exited.set)

                self._on_exit = on_exit
        try:
            await exited.wait()
        finally:
            self._thread.join()  # returns at once unless join() itself was cancelled
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on stop()."""
        self._stopping.wait(seconds)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._exit_lock:
                self._exited = True
                on_exit = self._on_exit
            if on_exit is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    on_exit()

    def _serve(self) -> None:
        backoff = _LISTEN_BACKOFF[0]
        connected_before = False
        while not self._stopping.is_set():
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, **self._kwargs)
            except psycopg.Error as exc:
                _log.warning("the outbox listener cannot connect (%s); retrying in %.2f s",
                             str(exc).strip().splitlines()[0] if str(exc).strip() else
                             type(exc).__name__, backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, _LISTEN_BACKOFF[1])
                continue
            try:
                conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
                self.listening.set()
                backoff = _LISTEN_BACKOFF[0]
                if connected_before:  # notifications may have been lost meanwhile
                    self._fire()
                connected_before = True
                self._listen(conn)
            except Exception as exc:  # psycopg.Error mostly; never let the thread die
                if not self._stopping.is_set():
                    _log.warning("the outbox listener lost its connection (%s); reconnecting",
                                 type(exc).__name__, exc_info=not isinstance(exc, psycopg.Error))
                    self._sleep(backoff)
                    backoff = min(backoff * 2, _LISTEN_BACKOFF[1])
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    conn.close()

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        with selectors.DefaultSelector() as selector:  # epoll: any fd number, unlike select()
            selector.register(conn.fileno(), selectors.EVENT_READ, "conn")
            selector.register(self._wake_r, selectors.EVENT_READ, "stop")
            while not self._stopping.is_set():
                ready = {key.data for key, _ in selector.select()}
                if "stop" in ready:
                    return
                self._drain(conn)

    def _drain(self, conn: psycopg.Connection[Any]) -> None:
        """Read what arrived; fire once if any notification came from another store."""
        others = False
        for notify in conn.notifies(timeout=0):
            others = others or notify.payload != self._instance
        if others:
            started = time.monotonic()
            self._fire()
            if time.monotonic() - started > 1.0:
                _log.warning("on_commit callbacks took %.1f s on the listener thread",
                             time.monotonic() - started)

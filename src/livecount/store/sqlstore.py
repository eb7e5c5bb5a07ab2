"""The :class:`~livecount.store.base.Store` over SQLAlchemy Core, shared by every SQL backend.

Concurrency is bounded and owned: the store runs all database work on three executors that
it creates in :meth:`SQLStore.open` and joins in :meth:`SQLStore.close`. One thread runs
every write transaction, so writes never contend with each other (on SQLite they would
otherwise fight over the file lock) and outbox positions are handed out in commit order; a
small pool runs reads and snapshots; one more thread runs the relay's reads (calls made in
:func:`~livecount.store.base.relay_lane`), which also have a waiting bound of their own, so
API overload can neither delay nor refuse them. No call ever starts a thread of its own.

Every conversation or view write commits in one transaction with exactly one outbox row, and
all validation happens before or inside that transaction, so bad input leaves nothing behind.

Conversation writes (create, PATCH: nearly all the traffic) take a faster road to the same
rows: **group commit** on the driver's own cursor (:mod:`~livecount.store.raw`). They queue
up; the writer thread takes every queued one (up to :data:`MAX_GROUP`) and runs them in ONE
transaction, in queue order, then commits once and hands every caller its own answer in one
wake-up of the event loop. Each write's checks come before its first change (the row is
loaded and validated, If-Match compared, references looked up, then written), so a write
refused by its own checks (404, 409, 412, a validation error) has changed nothing and is
answered alone while the others go on. Any other failure of a write — a database error, a
bug, or a refusal after it had changed something — rolls the whole transaction back, is
answered with its error, and the other writes run again without it in a new transaction. So
no write ever commits half, fails for another's fault, or commits after it was answered with
an error — except when the connection breaks during COMMIT itself: then, as for any database
client, the outcome is unknown and every write of the group is answered 503. Positions are
handed out in queue order and each caller learns its own
(``written_position``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Final, Literal, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import conversations as convs
from ..domain import GROUPABLE, Image, check_text, custom_key_error, now_us, type_name
from ..exceptions import (
    Conflict,
    LimitExceeded,
    LivecountError,
    NotFound,
    PreconditionFailed,
    StoreError,
    Unavailable,
    ValidationError,
)
from ..filters.parse import parse_filter
from . import rows
from .base import (
    OutboxEntry,
    Page,
    Recount,
    Snapshot,
    Team,
    Teammate,
    View,
    Workspace,
    in_relay_lane,
    written_position,
)
from .raw import RawTx, SQLText
from .schema import (
    conversations,
    outbox,
    outbox_poison,
    settings,
    team_members,
    teammates,
    teams,
    views,
    workspaces,
)
from .seed import FOLDERS

__all__ = [
    "MAX_GROUP",
    "MAX_NAME",
    "MAX_OUTBOX_BATCH",
    "MAX_POISON_ERROR",
    "MAX_VIEWS",
    "PRUNE_CHUNK",
    "WRITE_OPTION",
    "SQLStore",
    "hash_token",
    "transient_error",
]

T = TypeVar("T")

MAX_VIEWS: Final = 1000
MAX_NAME: Final = 200
MAX_TEAM_MEMBERS: Final = 10_000
MAX_OUTBOX_BATCH: Final = 10_000
#: Outbox rows deleted per write transaction by :meth:`SQLStore.prune_outbox`, so a big prune
#: holds the write lock only briefly at a time and other writes interleave.
PRUNE_CHUNK: Final = 10_000
#: Longest poison description stored; longer ones are cut.
MAX_POISON_ERROR: Final = 1000
_MAX_ERROR_DETAIL: Final = 200
#: Calls waiting for the store's threads at once; past it a call is refused (503) at once
#: instead of growing the executors' queues without bound under overload.
MAX_PENDING_CALLS: Final = 2048
#: The same for the relay's calls (a handful at a time: one step, a few counts, reopens).
MAX_RELAY_CALLS: Final = 256
#: Most conversation writes committed together by one group commit (see SQLStore._run_group).
MAX_GROUP: Final = 64
_MAX_ID: Final = 2**63 - 1
_MAX_POSITION: Final = 2**31 - 1
_TOKEN_PREFIX: Final = "lc_"
#: Execution option set on the writer's connections, so a backend can begin write
#: transactions differently (SQLite takes the write lock up front with ``BEGIN IMMEDIATE``).
WRITE_OPTION: Final = "livecount_write"

_log = logging.getLogger("livecount.store")
_IMAGE_DECODER: Final = msgspec.json.Decoder(Image)
_OUTBOX_COLUMNS: Final = tuple(c.name for c in outbox.c)
_VIEW_DECODER: Final = msgspec.json.Decoder(View)
_PERSON_FIELDS: Final = ("assignee_id", "author_id", "mentions", "unread_by")
#: The fields that name teammates or teams (checked to belong to the workspace).
_REFERENCES: Final = frozenset({*_PERSON_FIELDS, "team_id"})


def hash_token(token: str) -> str:
    """The stored form of a bearer token: tokens are random, so plain SHA-256 suffices."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


#: SQLite primary result codes of a failure that passes by itself: BUSY, LOCKED (another
#: connection holds the lock past ``busy_timeout``), NOMEM, IOERR, FULL, PROTOCOL. Every
#: other code of an ``OperationalError`` (SQLITE_ERROR: "no such table", a syntax error;
#: CANTOPEN: a wrong path) is a bug or a misconfiguration and stays a 500.
_SQLITE_TRANSIENT: Final = frozenset({5, 6, 7, 10, 13, 15})
_SQLITE_BUSY_LOCKED: Final = frozenset({5, 6})
_BUSY_MESSAGE: Final = "the database is busy (locked); retry shortly"
#: PostgreSQL SQLSTATEs of lock contention: lock_timeout, deadlock (one side is rolled back),
#: serialization failure.
_POSTGRES_BUSY: Final = frozenset({"55P03", "40P01", "40001"})


def transient_error(exc: sa.exc.SQLAlchemyError) -> Unavailable | None:
    """The 503 a database failure deserves when retrying can succeed, else None (a bug: 500).

    Transient: a lost or refused connection (``DisconnectionError``, an invalidated
    connection), no free pooled connection in time (pool ``TimeoutError``), and an
    ``OperationalError`` of the server databases (psycopg raises it for a server that is
    down, restarting or out of connections, lock and statement timeouts, deadlocks,
    serialization failures). SQLite raises ``OperationalError`` for bugs too ("no such
    table", syntax errors), so there only the result codes in :data:`_SQLITE_TRANSIENT` count.
    """
    if isinstance(exc, sa.exc.TimeoutError):
        return Unavailable("the database has no free connection (pool timeout); retry shortly")
    if isinstance(exc, sa.exc.DisconnectionError) or (
            isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated):
        return Unavailable("the database connection was lost; retry shortly")
    if not isinstance(exc, sa.exc.OperationalError):
        return None
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        text = str(orig).lower()
        if not isinstance(code, int):  # a driver without result codes: its messages
            busy = text.startswith(("database is locked", "database table is locked"))
            return Unavailable(_BUSY_MESSAGE) if busy else None
        if code & 0xFF in _SQLITE_BUSY_LOCKED:
            return Unavailable(_BUSY_MESSAGE)
        if code & 0xFF in _SQLITE_TRANSIENT:
            return Unavailable(f"the database is unavailable ({text[:80]}); retry shortly")
        return None
    if getattr(orig, "sqlstate", None) in _POSTGRES_BUSY:
        return Unavailable(_BUSY_MESSAGE)
    return Unavailable("the database is unavailable (OperationalError); retry shortly")


def _encode(value: Image | View | None) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def _check_name(value: Any, path: str = "name") -> str:
    text = check_text(value, path, allow_empty=False)
    if len(text) > MAX_NAME:
        raise ValidationError(f"longer than {MAX_NAME} characters", path)
    return text


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_ID


def _check_filter(raw: Any) -> str:
    """Validate a view filter; return it as JSON text. Parser paths get a ``filter.`` prefix."""
    try:
        parse_filter(raw)
    except ValidationError as exc:
        message = exc.message[len(exc.path) + 2:] if exc.path else exc.message
        path = "filter" if exc.path in ("", "filter") else f"filter.{exc.path}"
        raise type(exc)(message, path) from None
    return msgspec.json.encode(raw).decode()


def _check_group_by(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"expected a field name or null, got {type_name(value)}",
                              "group_by")
    if value.startswith("custom."):
        problem = custom_key_error(value[7:])
        if problem:
            raise ValidationError(problem, "group_by")
        return value
    if value not in GROUPABLE:
        raise ValidationError(f"{value[:60]!r} cannot group a view; expected one of "
                              f"{', '.join(sorted(GROUPABLE))} or custom.<key>", "group_by")
    return value


def _view(row: sa.RowMapping) -> View:
    return View(id=row["id"], workspace_id=row["workspace_id"], name=row["name"],
                filter=msgspec.json.decode(row["filter"]), group_by=row["group_by"],
                owner_id=row["owner_id"], position=row["position"], version=row["version"])


def _entry(row: Mapping[Any, Any]) -> OutboxEntry:
    """Decode one outbox row; never raises: a row that does not decode comes back as a poison
    entry (``error`` set, see :class:`OutboxEntry`), so one bad row cannot wedge a reader."""
    kind: Literal["conversation", "view"]
    decoder: msgspec.json.Decoder[Image] | msgspec.json.Decoder[View]
    stored_kind = row["kind"]
    if stored_kind == "conversation":
        kind, decoder = "conversation", _IMAGE_DECODER
    elif stored_kind == "view":
        kind, decoder = "view", _VIEW_DECODER
    else:
        return _poison(row, "conversation", f"unknown kind {_short(stored_kind)}")
    images: list[Image | View | None] = []
    for column in ("before", "after"):
        value = row[column]
        try:
            images.append(None if value is None else decoder.decode(value))
        except (msgspec.DecodeError, TypeError, ValueError) as exc:
            return _poison(row, kind, f"{column}: {_short(str(exc), repr_=False)}")
    if not all(_is_int(row[name])
               for name in ("workspace_id", "entity_id", "version", "committed_at")):
        return _poison(row, kind, "a malformed column (workspace_id, entity_id, version or "
                                  "committed_at is not an integer)")
    return OutboxEntry(
        position=row["id"], workspace_id=row["workspace_id"], kind=kind,
        entity_id=row["entity_id"], version=row["version"], before=images[0],
        after=images[1], committed_at=row["committed_at"])


def _entry_of(row: Sequence[Any]) -> OutboxEntry:
    """:func:`_entry` of a row as the driver returns it (the columns of ``outbox`` in
    order): the common case — a conversation entry, every column as expected — decoded
    directly, anything else by :func:`_entry` (poison entries included)."""
    position, workspace_id, kind, entity_id, version, before, after, committed_at = row
    if (kind == "conversation" and type(workspace_id) is int and type(entity_id) is int
            and type(version) is int and type(committed_at) is int):
        try:
            return OutboxEntry(
                position=position, workspace_id=workspace_id, kind="conversation",
                entity_id=entity_id, version=version,
                before=None if before is None else _IMAGE_DECODER.decode(before),
                after=None if after is None else _IMAGE_DECODER.decode(after),
                committed_at=committed_at)
        except (msgspec.DecodeError, TypeError, ValueError):
            pass  # described by _entry
    return _entry(dict(zip(_OUTBOX_COLUMNS, row, strict=True)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, repr_: bool = True) -> str:
    text = repr(value) if repr_ else str(value)
    return text if len(text) <= _MAX_ERROR_DETAIL else text[:_MAX_ERROR_DETAIL - 3] + "..."


def _poison(row: Mapping[Any, Any], kind: Literal["conversation", "view"],
            error: str) -> OutboxEntry:
    def number(name: str) -> int:
        value = row[name]
        return value if _is_int(value) else 0

    return OutboxEntry(
        position=row["id"], workspace_id=number("workspace_id"), kind=kind,
        entity_id=number("entity_id"), version=number("version"), before=None, after=None,
        committed_at=number("committed_at"),
        error=f"undecodable outbox entry {row['id']}: {error}")


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None or key[0] is None:
        raise StoreError("the database returned no id for a new row")
    return int(key[0])


def _store_error(exc: sa.exc.SQLAlchemyError) -> LivecountError:
    """What a caller sees of a database error: 503 when retrying can succeed, else 500."""
    unavailable = transient_error(exc)
    if unavailable is not None:
        return unavailable
    return StoreError(f"database error ({type(exc).__name__})")


def _db_error(dialect: sa.Dialect, exc: BaseException, dbapi_connection: Any) -> BaseException:
    """A DB-API error raised on the bare cursor as SQLAlchemy would have raised it (its
    ``OperationalError``, ``IntegrityError`` ...; ``connection_invalidated`` when the
    connection is gone), so :func:`transient_error` judges both paths alike."""
    base = getattr(dialect.loaded_dbapi, "Error", None)
    if base is None or not isinstance(exc, base):
        return exc
    try:
        lost = bool(dialect.is_disconnect(exc, dbapi_connection, None))  # type: ignore[arg-type]
    except Exception:
        lost = False
    translated: BaseException = sa.exc.DBAPIError.instance(
        None, None, exc, base, connection_invalidated=lost, dialect=dialect)
    return translated


class _Job:
    """One queued conversation write: ``fn(tx, *args)``, answered through ``future``."""

    __slots__ = ("args", "fn", "future", "lock", "loop")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop,
                 lock: int | None) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.loop = loop
        self.lock = lock


class _JobFailed(Exception):
    """Job ``index`` of a group broke its transaction with ``error``."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _answer(answers: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """From the writer thread: settle the jobs' futures, one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0].loop, []).append(answer)
    for loop, part in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_settle, part)


def _settle(answers: list[tuple[_Job, Any, BaseException | None]]) -> None:
    for job, result, error in answers:
        if job.future.done():  # the caller was cancelled
            continue
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)


def _start_threads(executor: ThreadPoolExecutor, count: int) -> None:
    """Start all ``count`` threads of ``executor`` now. A pool starts a thread on demand, so
    the first burst of load would raise the process's thread count once, for good: bounded,
    but what a leak looks like to the soak and to a thread-count alert. ``count`` tasks that
    wait for each other each take a thread of their own."""
    barrier = threading.Barrier(count)
    for future in [executor.submit(barrier.wait, 5.0) for _ in range(count)]:
        future.result()


class SQLStore:
    """A store over a synchronous SQLAlchemy :class:`~sqlalchemy.engine.Engine`.

    Subclasses say how to build the engine (:meth:`_create_engine`) and may override the
    hooks a backend needs (:meth:`_next_conversation_id`, :attr:`read_isolation`,
    :meth:`_before_outbox_insert`, :meth:`_lock_migrations`, :meth:`_lock_group`). The
    conversation writes' hooks also receive the hot path's
    :class:`~livecount.store.raw.RawTx` as their ``conn``.
    """

    #: Isolation for read transactions. None keeps the backend's default, which must already
    #: give one consistent snapshot per transaction (SQLite does); PostgreSQL wants
    #: ``"REPEATABLE READ"`` so a snapshot's position and rows agree.
    read_isolation: ClassVar[str | None] = None
    #: Whether a group commit appends its outbox rows together right before COMMIT rather
    #: than each with its write: where appends take a lock shared by every process
    #: (PostgreSQL), it is then held for two statements and the commit, not for the whole
    #: group's round trips.
    defer_appends: bool = False

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._relay_reader: ThreadPoolExecutor | None = None
        self._relay_pending: set[asyncio.Future[Any]] = set()
        self._pending: set[asyncio.Future[Any]] = set()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._callbacks_lock = threading.Lock()
        self._next_callback = 0
        self._appended = 0  # outbox rows in the current write; touched by the writer only
        self._appended_at = 0  # the position of the last of them
        #: conversation writes waiting for the next group commit, and whether a drain job is
        #: queued on (or running in) the writer; both under _group_lock
        self._group: deque[_Job] = deque()
        self._group_lock = threading.Lock()
        self._draining = False
        #: the hot path's statements, for the dialects it knows (else every write takes the
        #: SQLAlchemy path, one transaction each)
        self._sql: SQLText | None = None
        #: (schema version found, schema version now) by the last open(); None before.
        self.schema_versions: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url!r}>"

    # -- lifecycle -------------------------------------------------------------------------

    def _create_engine(self) -> Engine:
        raise NotImplementedError

    async def open(self) -> None:
        """Create the engine and the executors, then migrate the schema (on the writer; see
        :mod:`~livecount.store.migrations`) and record ``(version before, after)`` in
        :attr:`schema_versions`."""
        if self._engine is not None:
            raise StoreError("the store is already open")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="livecount-store-write")
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="livecount-store-read")
        self._relay_reader = ThreadPoolExecutor(1, thread_name_prefix="livecount-store-relay")
        try:
            for executor, size in ((self._writer, 1), (self._readers, 2),
                                   (self._relay_reader, 1)):
                _start_threads(executor, size)
            self._engine = self._create_engine()
            dialect = self._engine.dialect.name
            self._sql = (SQLText("sqlite") if dialect == "sqlite"
                         else SQLText("postgresql") if dialect == "postgresql" else None)
            self.schema_versions = await self._call(self._writer, self._migrate, self._engine)
        except BaseException:
            await self._shutdown()
            raise

    async def close(self) -> None:
        """Wait for calls in flight, join every executor and release every connection.

        Idempotent, so it is safe in ``finally`` blocks and fixtures.
        """
        if self._engine is None:
            return
        await self._shutdown()

    async def _shutdown(self) -> None:
        engine, self._engine = self._engine, None  # new calls fail from here on
        try:
            if self._pending or self._relay_pending:  # wait, not gather: cancelling close()
                await asyncio.wait(self._pending | self._relay_pending)  # must not cancel them
        finally:
            # Every job has returned (or was cancelled while queued), so the joins are short;
            # they happen even if close() itself is cancelled, so no thread outlives it.
            for executor in (self._writer, self._readers, self._relay_reader):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._writer = self._readers = self._relay_reader = None
            if engine is not None:
                engine.dispose()
            with self._callbacks_lock:
                self._callbacks.clear()

    # -- running work ----------------------------------------------------------------------

    def _live(self) -> tuple[Engine, ThreadPoolExecutor, ThreadPoolExecutor]:
        if self._engine is None or self._writer is None or self._readers is None:
            raise StoreError("the store is not open")
        return self._engine, self._writer, self._readers

    async def _call(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        pending = self._admit()  # the relay's calls have a bound of their own
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        pending.add(future)
        try:
            return await future
        except sa.exc.SQLAlchemyError as exc:
            raise _store_error(exc) from exc
        finally:
            self._pending.discard(future)
            self._relay_pending.discard(future)

    def _admit(self) -> set[asyncio.Future[Any]]:
        """The set of pending calls a new call joins; refused (503) past its bound."""
        if in_relay_lane():
            if len(self._relay_pending) >= MAX_RELAY_CALLS:
                raise Unavailable(f"the relay has {MAX_RELAY_CALLS} store calls waiting")
            return self._relay_pending
        if len(self._pending) >= MAX_PENDING_CALLS:
            raise Unavailable(f"the store is overloaded ({MAX_PENDING_CALLS} calls waiting); "
                              "retry shortly")
        return self._pending

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one write transaction on the writer thread; the outbox
        position it committed at (if it appended) goes to :data:`written_position`."""
        engine, writer, _ = self._live()
        done: tuple[T, int] = await self._call(writer, self._run_write, engine, fn, args)
        if done[1]:
            written_position.set(done[1])
        return done[0]

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one read transaction (one snapshot) on a reader (the
        relay's own one for calls in :func:`~livecount.store.base.relay_lane`)."""
        engine, _, readers = self._live()
        if in_relay_lane() and self._relay_reader is not None:
            readers = self._relay_reader
        return await self._call(readers, self._run_read, engine, fn, args)

    async def _read_raw(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(cursor)`` — ONE statement, so one snapshot — on a DB-API cursor of a
        pooled connection, on a reader as :meth:`_read` would (the relay's own in its lane)."""
        engine, _, readers = self._live()
        if in_relay_lane() and self._relay_reader is not None:
            readers = self._relay_reader
        return await self._call(readers, self._run_read_raw, engine, fn)

    @staticmethod
    def _run_read_raw(engine: Engine, fn: Callable[[Any], T]) -> T:
        raw = engine.raw_connection()
        dbapi = raw.dbapi_connection
        cursor = None
        try:
            assert dbapi is not None  # a checked-out connection has one
            cursor = dbapi.cursor()
            result = fn(cursor)
            raw.rollback()  # ends PostgreSQL's implicit transaction; nothing on SQLite
            return result
        except Exception as exc:
            error = _db_error(engine.dialect, exc, dbapi)
            if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
                raw.invalidate()
            if error is exc:
                raise
            raise error from exc
        finally:
            if cursor is not None:
                with contextlib.suppress(Exception):
                    cursor.close()
            raw.close()

    def _run_write(self, engine: Engine, fn: Callable[..., T], args: tuple[Any, ...]
                   ) -> tuple[T, int]:
        self._appended = 0
        self._appended_at = 0
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                result = fn(conn, *args)
        if self._appended:
            self._notify()
        return result, self._appended_at

    # -- group commit: the conversation writes ---------------------------------------------

    async def _group_write(self, fn: Callable[..., T], *args: Any, lock: int | None = None
                           ) -> T:
        """Run ``fn(tx, *args)`` on the writer as one write of the next group commit (see
        the module) and return its result; its outbox position goes to
        :data:`written_position`. ``tx`` is a :class:`~livecount.store.raw.RawTx`. A
        :class:`~livecount.exceptions.LivecountError` that ``fn`` raises before changing
        anything is its refusal, answered alone; raised later (or any other exception), it
        costs the group a retry without ``fn`` (see :meth:`_run_group`); ``fn`` must let
        database errors through (one may have broken the transaction). ``lock`` names the
        conversation ``fn`` will change (PostgreSQL locks the rows of a group up front, in
        id order)."""
        engine, writer, _ = self._live()
        if self._sql is None:
            return await self._write(fn, *args)
        pending = self._admit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[T, int]] = loop.create_future()
        pending.add(future)
        job = _Job(fn, args, future, loop, lock)
        try:
            self._enqueue(job, writer, engine)
            value, position = await future
        except sa.exc.SQLAlchemyError as exc:
            raise _store_error(exc) from exc
        finally:
            pending.discard(future)
            if future.cancelled():  # cancelled while queued: leave the queue now, so what
                # waits stays within the pending bound
                with self._group_lock, contextlib.suppress(ValueError):
                    self._group.remove(job)
        if position:
            written_position.set(position)
        return value

    def _enqueue(self, job: _Job, writer: ThreadPoolExecutor, engine: Engine) -> None:
        """Queue ``job``; the first of a group asks for a drain at the end of this turn of
        the event loop, so every write started in the same turn joins the same group (and
        the writer thread is woken once for them, not once each)."""
        with self._group_lock:
            self._group.append(job)
            if self._draining:
                return  # a drain is on its way: it will take this job too
            self._draining = True
        job.loop.call_soon(self._kick, writer, engine)

    def _kick(self, writer: ThreadPoolExecutor, engine: Engine) -> None:
        try:
            writer.submit(self._drain, engine, writer)
        except BaseException as exc:  # the executor is gone: fail what waits, never hang
            with self._group_lock:
                jobs = list(self._group)
                self._group.clear()
                self._draining = False
            error = StoreError(f"the store's writer is not running ({type(exc).__name__})")
            _answer([(job, None, error) for job in jobs])
            if not isinstance(exc, Exception):
                raise

    def _drain(self, engine: Engine, writer: ThreadPoolExecutor) -> None:
        """On the writer: commit the queued conversation writes, a group at a time. After
        each group the drain goes to the back of the writer's queue if more writes wait, so
        other writes (views, prunes, reopens) take turns with a stream of PATCHes."""
        done = False
        try:
            while True:
                with self._group_lock:
                    count = min(len(self._group), MAX_GROUP)
                    jobs = [self._group.popleft() for _ in range(count)]
                    if not jobs:
                        self._draining = False
                        done = True
                        return
                self._run_group(engine, jobs)
                with self._group_lock:
                    if not self._group:
                        self._draining = False
                        done = True
                        return
                try:
                    writer.submit(self._drain, engine, writer)
                    done = True
                    return
                except RuntimeError:  # the executor is shutting down: finish here
                    continue
        finally:
            if not done:  # an exception escaped: answer what waits, never leave it stranded
                with self._group_lock:
                    self._draining = False
                    stranded = list(self._group)
                    self._group.clear()
                error = Unavailable("the store's writer failed before this write ran; retry")
                _answer([(job, None, error) for job in stranded])

    def _run_group(self, engine: Engine, jobs: list[_Job]) -> None:
        """Commit ``jobs`` in one transaction, minus those that failed, and answer them all.

        A job that breaks the transaction (an exception that is not its own refusal) is
        answered with that error and the others run again without it, in a new transaction:
        each retry drops one job, so it ends. A failure that is no job's (BEGIN, the group's
        locks, COMMIT) fails them all: nothing of theirs committed.
        """
        live = [job for job in jobs if not job.future.done()]  # cancelled while queued
        answers: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            while live:
                try:
                    results = self._group_transaction(engine, live)
                except _JobFailed as failed:
                    answers.append((live.pop(failed.index), None, failed.error))
                    continue
                except Exception as exc:
                    answers += [(job, None, exc) for job in live]
                    break
                for job, result in zip(live, results, strict=True):
                    if isinstance(result, BaseException):
                        answers.append((job, None, result))
                    else:
                        answers.append((job, result, None))
                break
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: answer, then go on up
            answered = {id(job) for job, _, _ in answers}
            answers += [(job, None, exc) for job in live if id(job) not in answered]
            raise
        finally:
            _answer(answers)

    def _group_transaction(self, engine: Engine, jobs: list[_Job]
                           ) -> list[tuple[Any, int] | LivecountError]:
        """One transaction of ``jobs`` on the driver's connection; per job its (result,
        position) or its own refusal. Raises :class:`_JobFailed` when a job broke it."""
        assert self._sql is not None
        dialect = engine.dialect
        raw = engine.raw_connection()  # the pool's: pinged first on PostgreSQL
        dbapi = raw.dbapi_connection
        try:
            assert dbapi is not None  # a checked-out connection has one
            tx = RawTx(dbapi, self._sql, defer_appends=self.defer_appends)
        except BaseException:
            raw.close()
            raise
        results: list[tuple[Any, int] | LivecountError] = []
        single = len(jobs) == 1
        try:
            try:
                tx.begin()
                if not single:
                    self._lock_group(tx, [job.lock for job in jobs if job.lock is not None])
                for index, job in enumerate(jobs):
                    self._appended_at = 0
                    changes = tx.changes
                    try:
                        value = job.fn(tx, *job.args)
                    except LivecountError as refused:
                        if single or tx.changes != changes:  # it changed something: undo all
                            raise _JobFailed(index, refused) from None
                        results.append(refused)  # refused before changing anything
                        continue
                    except Exception as exc:
                        raise _JobFailed(index, _db_error(dialect, exc, dbapi)) from None
                    results.append((value, self._appended_at))
                if tx.deferred:
                    results = self._flush_appends(tx, results)
                tx.commit()
            except BaseException as exc:
                error = exc.error if isinstance(exc, _JobFailed) else _db_error(dialect, exc,
                                                                                  dbapi)
                lost = isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
                if not lost:
                    try:
                        tx.rollback()
                    except Exception:  # a connection that cannot roll back is not reused
                        lost = True
                if lost:
                    raw.invalidate()
                if isinstance(exc, _JobFailed) or error is exc:
                    raise
                raise error from exc
        finally:
            tx.close()  # a cursor left open would keep a closed SQLite file open
            raw.close()  # back to the pool
        if any(not isinstance(r, BaseException) and r[1] for r in results):
            self._notify()
        return results

    def _flush_appends(self, tx: RawTx, results: list[tuple[Any, int] | LivecountError]
                       ) -> list[tuple[Any, int] | LivecountError]:
        """Append the group's deferred outbox rows (see :attr:`defer_appends`) and put their
        positions in place of the placeholders in ``results``."""
        self._before_outbox_insert(tx)
        positions = tx.flush_appends()
        return [r if isinstance(r, BaseException) or r[1] >= 0
                else (r[0], positions[-r[1] - 1]) for r in results]

    def _lock_group(self, tx: RawTx, conversation_ids: list[int]) -> None:
        """Hook, before the first write of a group of several: lock what they will change.
        Nothing by default: SQLite's ``BEGIN IMMEDIATE`` already excludes every other
        writer. PostgreSQL locks the rows (in id order) so that every row lock of the
        transaction comes before its first outbox append (see its module)."""

    def _migrate(self, engine: Engine) -> tuple[int, int]:
        """Bring the schema to the latest version in one write transaction (on the writer)."""
        from . import migrations  # imported late: it imports the schema only

        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                self._lock_migrations(conn)
                return migrations.migrate(conn)

    def _lock_migrations(self, conn: Connection) -> None:
        """Hook: serialize migrations across processes for the rest of ``conn``'s transaction.
        Nothing by default: SQLite's write transactions begin with ``BEGIN IMMEDIATE``, which
        already excludes every other writer."""

    def _run_read(self, engine: Engine, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with engine.connect() as conn:
            if self.read_isolation is not None:
                conn.execution_options(isolation_level=self.read_isolation)
            with conn.begin():
                return fn(conn, *args)

    def on_commit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on the writer thread after each commit that grew the outbox.

        Keep it cheap and thread-safe (``loop.call_soon_threadsafe``); its exceptions are
        logged and swallowed, as the write has committed already. Returns an unsubscribe.
        """
        with self._callbacks_lock:
            key = self._next_callback
            self._next_callback += 1
            self._callbacks[key] = callback

        def unsubscribe() -> None:
            with self._callbacks_lock:
                self._callbacks.pop(key, None)

        return unsubscribe

    def _notify(self) -> None:
        with self._callbacks_lock:
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.exception("on_commit callback %r failed", callback)

    # -- shared pieces of transactions -----------------------------------------------------

    def _append_outbox(self, conn: Connection | RawTx, workspace_id: int,
                       kind: Literal["conversation", "view"], entity_id: int, version: int,
                       before: Image | View | None, after: Image | View | None) -> None:
        if not isinstance(conn, RawTx) or conn.deferred is None:
            self._before_outbox_insert(conn)  # (deferred appends: when they are flushed)
        if isinstance(conn, RawTx):
            position = conn.insert_outbox(workspace_id, kind, entity_id, version,
                                          _encode(before), _encode(after), now_us())
        else:
            position = _inserted_id(conn.execute(outbox.insert().values(
                workspace_id=workspace_id, kind=kind, entity_id=entity_id, version=version,
                before=_encode(before), after=_encode(after), committed_at=now_us())))
        self._appended += 1
        self._appended_at = position

    def _before_outbox_insert(self, conn: Connection | RawTx) -> None:
        """Hook, called in the write transaction right before each outbox row is inserted.

        Nothing by default: on SQLite one write transaction at a time exists (the writer
        thread, and ``BEGIN IMMEDIATE`` across processes), so positions are handed out in
        commit order already. A backend with concurrent writers makes them so here (see
        :class:`~livecount.store.postgres.PostgresStore`). Whatever it locks must come after
        every row lock of the transaction, or writers in two processes can deadlock.
        """

    def _next_conversation_id(self, conn: Connection | RawTx) -> int:
        """The id of the next conversation: ``MAX(id) + 1``.

        Correct only because writes are serialized (one writer thread, and on SQLite a write
        lock taken at ``BEGIN``); a backend with concurrent writers overrides it (a sequence).
        """
        if isinstance(conn, RawTx):
            return conn.next_conversation_id()
        current = conn.scalar(sa.select(sa.func.max(conversations.c.id)))
        return (current or 0) + 1

    @staticmethod
    def _position(conn: Connection) -> int:
        """The newest outbox position: ``MAX(id)``, 0 before the first write.

        Correct after any prune because :meth:`prune_outbox` never deletes the newest row, so
        the maximum survives (a deleted maximum would make this go backwards, and on a table
        without AUTOINCREMENT SQLite would even hand the same id out again).
        """
        return int(conn.scalar(sa.select(sa.func.coalesce(sa.func.max(outbox.c.id), 0))) or 0)

    @staticmethod
    def _workspace(conn: Connection | RawTx, workspace_id: int) -> Workspace:
        if _valid_id(workspace_id):
            if isinstance(conn, RawTx):
                found = conn.workspace(workspace_id)
                if found is not None:
                    return Workspace(id=found[0], name=found[1])
            else:
                row = conn.execute(sa.select(workspaces.c.id, workspaces.c.name)
                                   .where(workspaces.c.id == workspace_id)).first()
                if row is not None:
                    return Workspace(id=row.id, name=row.name)
        raise NotFound(f"workspace {workspace_id} not found")

    @staticmethod
    def _missing(conn: Connection | RawTx, table: sa.Table, workspace_id: int,
                 ids: Iterable[int]) -> set[int]:
        wanted = set(ids)
        if not wanted:
            return set()
        if isinstance(conn, RawTx):
            return conn.missing(table.name, workspace_id, wanted)
        found = set(conn.scalars(sa.select(table.c.id).where(
            table.c.workspace_id == workspace_id, table.c.id.in_(sorted(wanted)))))
        return wanted - found

    def _check_references(self, conn: Connection | RawTx, workspace_id: int,
                          fields: Mapping[str, Any]) -> None:
        """Every teammate and team ``fields`` names must belong to the workspace."""
        if _REFERENCES.isdisjoint(fields):
            return
        people, team_ids = convs.referenced_ids(fields)
        no_people = self._missing(conn, teammates, workspace_id, people)
        no_teams = self._missing(conn, teams, workspace_id, team_ids)
        for name in ("assignee_id", "author_id", "team_id", "mentions", "unread_by"):
            value = fields.get(name)
            named: set[int] = (set(value) if isinstance(value, frozenset)
                               else set() if value is None else {value})
            missing = sorted(named & (no_teams if name == "team_id" else no_people))
            if missing:
                what = "team" if name == "team_id" else "teammate"
                raise ValidationError(f"no {what} {missing[0]} in this workspace", name)

    def _load_conversation(self, conn: Connection | RawTx, workspace_id: int,
                           conversation_id: int) -> Image:
        if _valid_id(conversation_id) and _valid_id(workspace_id):
            if isinstance(conn, RawTx):  # the row locked FOR UPDATE on PostgreSQL
                image = conn.load_conversation(workspace_id, conversation_id)
                if image is not None:
                    return image
                raise NotFound(f"conversation {conversation_id} not found")
            found = rows.load_images(conn, (conversations.c.id == conversation_id)
                                     & (conversations.c.workspace_id == workspace_id))
            if found:
                return found[0]
        raise NotFound(f"conversation {conversation_id} not found")

    @staticmethod
    def _load_view(conn: Connection, workspace_id: int, view_id: int) -> View:
        if _valid_id(view_id) and _valid_id(workspace_id):
            row = conn.execute(sa.select(views).where(
                views.c.id == view_id, views.c.workspace_id == workspace_id)).mappings().first()
            if row is not None:
                return _view(row)
        raise NotFound(f"view {view_id} not found")

    # -- tenants and people ----------------------------------------------------------------

    async def create_workspace(self, name: str) -> Workspace:
        """A workspace with its folders (DESIGN §2), seeded as shared views."""
        return await self._write(self._create_workspace, _check_name(name))

    def _create_workspace(self, conn: Connection, name: str) -> Workspace:
        workspace_id = _inserted_id(conn.execute(
            workspaces.insert().values(name=name, created_at=now_us())))
        for position, folder in enumerate(FOLDERS):
            self._insert_view(conn, workspace_id, folder.name,
                              msgspec.json.encode(folder.filter).decode(), folder.group_by,
                              None, position)
        return Workspace(id=workspace_id, name=name)

    async def get_workspace(self, workspace_id: int) -> Workspace:
        return await self._read(self._workspace, workspace_id)

    async def list_workspaces(self) -> list[Workspace]:
        def run(conn: Connection) -> list[Workspace]:
            query = sa.select(workspaces.c.id, workspaces.c.name).order_by(workspaces.c.id)
            return [Workspace(id=r.id, name=r.name) for r in conn.execute(query)]
        return await self._read(run)

    async def create_teammate(self, workspace_id: int, name: str, email: str
                              ) -> tuple[Teammate, str]:
        """A teammate and its bearer token; only the token's hash is stored."""
        name = _check_name(name)
        email = _check_name(email, "email")
        if "@" not in email:
            raise ValidationError("expected an email address", "email")
        token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
        teammate = await self._write(self._create_teammate, workspace_id, name, email,
                                     hash_token(token))
        return teammate, token

    def _create_teammate(self, conn: Connection, workspace_id: int, name: str, email: str,
                         token_hash: str) -> Teammate:
        self._workspace(conn, workspace_id)
        taken = conn.scalar(sa.select(teammates.c.id).where(
            teammates.c.workspace_id == workspace_id, teammates.c.email == email))
        if taken is not None:
            raise Conflict("a teammate with this email already exists in this workspace")
        try:
            with conn.begin_nested():
                teammate_id = _inserted_id(conn.execute(teammates.insert().values(
                    workspace_id=workspace_id, name=name, email=email, token_hash=token_hash)))
        except sa.exc.IntegrityError:  # another process won the race
            raise Conflict("a teammate with this email already exists in this workspace"
                           ) from None
        return Teammate(id=teammate_id, workspace_id=workspace_id, name=name, email=email)

    async def list_teammates(self, workspace_id: int) -> list[Teammate]:
        def run(conn: Connection) -> list[Teammate]:
            self._workspace(conn, workspace_id)
            query = (sa.select(teammates.c.id, teammates.c.name, teammates.c.email)
                     .where(teammates.c.workspace_id == workspace_id).order_by(teammates.c.id))
            return [Teammate(id=r.id, workspace_id=workspace_id, name=r.name, email=r.email)
                    for r in conn.execute(query)]
        return await self._read(run)

    async def authenticate(self, token: str) -> Teammate | None:
        """The teammate holding ``token``, or None. Looked up by hash: no comparison of
        secrets happens in Python, so there is nothing to time."""
        if not isinstance(token, str) or not token.startswith(_TOKEN_PREFIX) or len(token) > 200:
            self._live()
            return None
        token_hash = hash_token(token)

        def run(conn: Connection) -> Teammate | None:
            row = conn.execute(sa.select(teammates.c.id, teammates.c.workspace_id,
                                         teammates.c.name, teammates.c.email)
                               .where(teammates.c.token_hash == token_hash)).first()
            if row is None:
                return None
            return Teammate(id=row.id, workspace_id=row.workspace_id, name=row.name,
                            email=row.email)
        return await self._read(run)

    async def create_team(self, workspace_id: int, name: str, member_ids: list[int]) -> Team:
        name = _check_name(name)
        if not isinstance(member_ids, list):
            raise ValidationError(f"expected an array, got {type_name(member_ids)}",
                                  "member_ids")
        if len(member_ids) > MAX_TEAM_MEMBERS:
            raise ValidationError(f"more than {MAX_TEAM_MEMBERS} members", "member_ids")
        for i, member in enumerate(member_ids):
            if not _valid_id(member):
                raise ValidationError(
                    f"expected a positive integer id, got {type_name(member)}", f"member_ids[{i}]")
        return await self._write(self._create_team, workspace_id, name, sorted(set(member_ids)))

    def _create_team(self, conn: Connection, workspace_id: int, name: str,
                     member_ids: list[int]) -> Team:
        self._workspace(conn, workspace_id)
        missing = self._missing(conn, teammates, workspace_id, member_ids)
        if missing:
            raise ValidationError(f"no teammate {min(missing)} in this workspace", "member_ids")
        team_id = _inserted_id(conn.execute(teams.insert().values(
            workspace_id=workspace_id, name=name)))
        if member_ids:
            conn.execute(team_members.insert(),
                         [{"team_id": team_id, "teammate_id": m} for m in member_ids])
        return Team(id=team_id, workspace_id=workspace_id, name=name, member_ids=member_ids)

    async def list_teams(self, workspace_id: int) -> list[Team]:
        def run(conn: Connection) -> list[Team]:
            self._workspace(conn, workspace_id)
            members: dict[int, list[int]] = {}
            for team_id, teammate_id in conn.execute(
                    sa.select(team_members.c.team_id, team_members.c.teammate_id)
                    .join(teams, teams.c.id == team_members.c.team_id)
                    .where(teams.c.workspace_id == workspace_id)
                    .order_by(team_members.c.team_id, team_members.c.teammate_id)):
                members.setdefault(team_id, []).append(teammate_id)
            query = (sa.select(teams.c.id, teams.c.name)
                     .where(teams.c.workspace_id == workspace_id).order_by(teams.c.id))
            return [Team(id=r.id, workspace_id=workspace_id, name=r.name,
                         member_ids=members.get(r.id, [])) for r in conn.execute(query)]
        return await self._read(run)

    async def get_setting(self, key: str) -> str | None:
        def run(conn: Connection) -> str | None:
            return conn.scalar(sa.select(settings.c.value).where(settings.c.key == key))
        return await self._read(run)

    async def set_setting_if_absent(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` has one already; return the value now stored."""
        check_text(key, "key", allow_empty=False)
        if len(key) > 64:
            raise ValidationError("longer than 64 characters", "key")
        check_text(value, "value")
        return await self._write(self._set_setting_if_absent, key, value)

    @staticmethod
    def _set_setting_if_absent(conn: Connection, key: str, value: str) -> str:
        query = sa.select(settings.c.value).where(settings.c.key == key)
        stored: str | None = conn.scalar(query)
        if stored is None:
            try:
                with conn.begin_nested():
                    conn.execute(settings.insert().values(key=key, value=value))
            except sa.exc.IntegrityError:  # another process stored one first: keep theirs
                pass
            stored = conn.scalar(query)
        if stored is None:
            raise StoreError(f"setting {key!r} vanished while being set")
        return stored

    # -- conversations ---------------------------------------------------------------------

    async def create_conversation(self, workspace_id: int, body: Mapping[str, Any],
                                  author_id: int | None) -> Image:
        fields = convs.validate_body(dict(body) if isinstance(body, Mapping) else body,
                                     patch=False)
        if author_id is not None and not _valid_id(author_id):
            raise ValidationError(f"expected a positive integer id, got {type_name(author_id)}",
                                  "author_id")
        return await self._group_write(self._create_conversation, workspace_id, fields,
                                       author_id)

    def _create_conversation(self, conn: Connection | RawTx, workspace_id: int,
                             fields: dict[str, Any], author_id: int | None) -> Image:
        self._workspace(conn, workspace_id)
        image = convs.new_image(self._next_conversation_id(conn), workspace_id, fields,
                                author_id, now_us())
        self._check_references(conn, workspace_id,
                               {name: getattr(image, name) for name in (*_PERSON_FIELDS,
                                                                        "team_id")})
        rows.insert_image(conn, image)
        self._append_outbox(conn, workspace_id, "conversation", image.id, image.version,
                            None, image)
        return image

    async def update_conversation(self, workspace_id: int, conversation_id: int,
                                  patch: Mapping[str, Any], if_match: int | None) -> Image:
        """Apply a merge patch. ``if_match`` pins the version the caller saw (else 412).

        A patch that changes nothing writes nothing and returns the conversation as it is.
        """
        fields = convs.validate_body(dict(patch) if isinstance(patch, Mapping) else patch,
                                     patch=True)
        if if_match is not None and (not isinstance(if_match, int) or isinstance(if_match, bool)):
            raise ValidationError(f"expected a version number, got {type_name(if_match)}",
                                  "if_match")
        return await self._group_write(self._update_conversation, workspace_id,
                                       conversation_id, fields, if_match,
                                       lock=conversation_id)

    def _update_conversation(self, conn: Connection | RawTx, workspace_id: int,
                             conversation_id: int,
                             fields: dict[str, Any], if_match: int | None) -> Image:
        for attempt in range(2):
            before = self._load_conversation(conn, workspace_id, conversation_id)
            if attempt == 0:  # after the lookup, so a foreign id is a NotFound like any other
                self._check_references(conn, workspace_id, fields)
            if if_match is not None and before.version != if_match:
                raise PreconditionFailed(f"conversation {conversation_id} is at version "
                                         f"{before.version}, not {if_match}")
            after = convs.apply_patch(before, fields, now_us())
            unchanged = msgspec.structs.replace(after, version=before.version,
                                                updated_at=before.updated_at)
            if unchanged == before:
                return before
            if rows.update_image(conn, before, after):
                self._append_outbox(conn, workspace_id, "conversation", after.id,
                                    after.version, before, after)
                return after
        raise Conflict(f"conversation {conversation_id} changed concurrently; retry")

    async def reopen_conversations(self, due: Sequence[tuple[int, int, int]]) -> list[bool]:
        """Reopen snoozed conversations whose time has come, in ONE write transaction:
        each ``(workspace, conversation, version)`` becomes ``state`` open with
        ``snoozed_until`` cleared if it is still at ``version`` (else it is left alone: a
        newer version decides). True for each one written."""
        fields = convs.validate_body({"state": "open", "snoozed_until": None}, patch=True)
        return await self._write(self._reopen_conversations, list(due), fields)

    def _reopen_conversations(self, conn: Connection, due: list[tuple[int, int, int]],
                              fields: dict[str, Any]) -> list[bool]:
        written = []
        for workspace_id, conversation_id, version in due:
            try:
                with conn.begin_nested():
                    self._update_conversation(conn, workspace_id, conversation_id, fields,
                                              version)
                written.append(True)
            except (PreconditionFailed, NotFound, Conflict):
                written.append(False)
        return written

    async def get_conversation(self, workspace_id: int, conversation_id: int) -> Image:
        return await self._read(self._load_conversation, workspace_id, conversation_id)

    async def list_conversations(self, view: View, me: int, group: str | None, limit: int,
                                 cursor: str | None, now: int) -> Page:
        """One page of ``view`` as ``me`` sees it, newest first (keyset pagination)."""
        from . import queries  # written alongside; imported late to keep imports acyclic

        query = queries.list_query(view, me, group, limit, cursor, now)

        def run(conn: Connection) -> Page:
            ids, next_cursor = queries.split_page(list(conn.scalars(query)), limit)
            found = {image.id: image for image in
                     rows.load_images(conn, conversations.c.id.in_(ids))} if ids else {}
            # one transaction: every listed id is still there to load
            return Page(conversations=[found[i] for i in ids], next_cursor=next_cursor)
        return await self._read(run)

    # -- views -----------------------------------------------------------------------------

    async def list_views(self, workspace_id: int) -> list[View]:
        return await self._read(self._list_views, workspace_id)

    def _list_views(self, conn: Connection, workspace_id: int) -> list[View]:
        self._workspace(conn, workspace_id)
        query = (sa.select(views).where(views.c.workspace_id == workspace_id)
                 .order_by(views.c.position, views.c.id))
        return [_view(row) for row in conn.execute(query).mappings()]

    async def get_view(self, workspace_id: int, view_id: int) -> View:
        return await self._read(self._load_view, workspace_id, view_id)

    async def create_view(self, workspace_id: int, name: str, filter: Any,
                          group_by: str | None, owner_id: int | None) -> View:
        """A view at the end of the list; ``owner_id`` None shares it with the workspace."""
        name = _check_name(name)
        filter_text = _check_filter(filter)
        group_by = _check_group_by(group_by)
        if owner_id is not None and not _valid_id(owner_id):
            raise ValidationError(f"expected a teammate id or null, got {type_name(owner_id)}",
                                  "owner_id")
        return await self._write(self._create_view, workspace_id, name, filter_text, group_by,
                                 owner_id)

    def _create_view(self, conn: Connection, workspace_id: int, name: str, filter_text: str,
                     group_by: str | None, owner_id: int | None) -> View:
        self._workspace(conn, workspace_id)
        if owner_id is not None and self._missing(conn, teammates, workspace_id, [owner_id]):
            raise ValidationError(f"no teammate {owner_id} in this workspace", "owner_id")
        count, top = conn.execute(sa.select(sa.func.count(), sa.func.max(views.c.position))
                                  .where(views.c.workspace_id == workspace_id)).one()
        if count >= MAX_VIEWS:
            raise LimitExceeded(f"at most {MAX_VIEWS} views per workspace")
        position = 0 if top is None else top + 1
        return self._insert_view(conn, workspace_id, name, filter_text, group_by, owner_id,
                                 position)

    def _insert_view(self, conn: Connection, workspace_id: int, name: str, filter_text: str,
                     group_by: str | None, owner_id: int | None, position: int) -> View:
        view_id = _inserted_id(conn.execute(views.insert().values(
            workspace_id=workspace_id, name=name, filter=filter_text, group_by=group_by,
            owner_id=owner_id, position=position, version=1)))
        view = View(id=view_id, workspace_id=workspace_id, name=name,
                    filter=msgspec.json.decode(filter_text), group_by=group_by,
                    owner_id=owner_id, position=position, version=1)
        self._append_outbox(conn, workspace_id, "view", view_id, 1, None, view)
        return view

    async def update_view(self, workspace_id: int, view_id: int, name: str, filter: Any,
                          group_by: str | None, position: int | None) -> View:
        """Replace a view's name, filter and grouping (and position when given)."""
        name = _check_name(name)
        filter_text = _check_filter(filter)
        group_by = _check_group_by(group_by)
        if position is not None and not (isinstance(position, int)
                                         and not isinstance(position, bool)
                                         and 0 <= position <= _MAX_POSITION):
            raise ValidationError(f"expected a non-negative integer, got {type_name(position)}",
                                  "position")
        return await self._write(self._update_view, workspace_id, view_id, name, filter_text,
                                 group_by, position)

    def _update_view(self, conn: Connection, workspace_id: int, view_id: int, name: str,
                     filter_text: str, group_by: str | None, position: int | None) -> View:
        before = self._load_view(conn, workspace_id, view_id)
        after = msgspec.structs.replace(
            before, name=name, filter=msgspec.json.decode(filter_text), group_by=group_by,
            position=before.position if position is None else position,
            version=before.version + 1)
        conn.execute(views.update().where(views.c.id == view_id).values(
            name=name, filter=filter_text, group_by=group_by, position=after.position,
            version=after.version))
        self._append_outbox(conn, workspace_id, "view", view_id, after.version, before, after)
        return after

    async def delete_view(self, workspace_id: int, view_id: int) -> None:
        await self._write(self._delete_view, workspace_id, view_id)

    def _delete_view(self, conn: Connection, workspace_id: int, view_id: int) -> None:
        before = self._load_view(conn, workspace_id, view_id)
        conn.execute(views.delete().where(views.c.id == view_id))
        self._append_outbox(conn, workspace_id, "view", view_id, before.version + 1, before,
                            None)

    # -- the log and consistent reads ------------------------------------------------------

    async def read_outbox(self, after: int, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` entries past position ``after``, in position (= commit) order."""
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= _MAX_ID:
            raise ValidationError("expected a position (a non-negative integer)", "after")
        if (not isinstance(limit, int) or isinstance(limit, bool)
                or not 0 < limit <= MAX_OUTBOX_BATCH):
            raise ValidationError(f"expected 1 to {MAX_OUTBOX_BATCH}", "limit")

        if self._sql is None:
            def run(conn: Connection) -> list[OutboxEntry]:
                query = (sa.select(outbox).where(outbox.c.id > after).order_by(outbox.c.id)
                         .limit(limit))
                return [_entry(row) for row in conn.execute(query).mappings()]
            return await self._read(run)
        # The relay reads every entry once, right after it was written: on the bare cursor,
        # one statement (its own snapshot), rows decoded straight from the driver's tuples.
        statement = self._sql.read_outbox
        return await self._read_raw(lambda cursor: [
            _entry_of(row) for row in cursor.execute(statement, (after, limit)).fetchall()])

    async def outbox_position(self) -> int:
        return await self._read(self._position)

    # -- retention and poison entries ------------------------------------------------------

    async def prune_outbox(self, applied: int, older_than_us: int) -> int:
        """Delete entries at positions ``<= applied`` committed before ``older_than_us`` (µs
        since the epoch); return how many were deleted.

        At most :data:`PRUNE_CHUNK` rows go per write transaction, so other writes interleave
        with a big prune. The newest entry is always kept, whatever ``applied`` says: positions
        then never go backwards (:meth:`outbox_position` is ``MAX(id)``) and are never reused,
        even in a database file whose outbox predates AUTOINCREMENT, and on any backend. On
        SQLite the write-ahead log is checkpointed afterwards so it does not grow; the freed
        pages of the main file are reused by later writes, so no VACUUM is needed.
        """
        for name, value in (("applied", applied), ("older_than_us", older_than_us)):
            if not _is_int(value) or not 0 <= value <= _MAX_ID:
                raise ValidationError("expected a non-negative integer", name)
        engine, _, _ = self._live()
        deleted = 0
        last = 0
        while True:
            count, last = await self._write(self._prune_chunk, applied, older_than_us, last)
            deleted += count
            if last == 0 or count < PRUNE_CHUNK:
                break
        if deleted:
            await self._call(self._live()[1], self._reclaim_log, engine)
        return deleted

    @staticmethod
    def _prune_chunk(conn: Connection, applied: int, older_than_us: int,
                     after: int) -> tuple[int, int]:
        """Delete the next chunk of prunable rows past position ``after``; return how many
        went and the position to continue after (0 when there is nothing more)."""
        newest = conn.scalar(sa.select(sa.func.max(outbox.c.id)))
        if newest is None:
            return 0, 0
        bound = min(applied, int(newest) - 1)  # never the newest row
        prunable = ((outbox.c.id > after) & (outbox.c.id <= bound)
                    & (outbox.c.committed_at < older_than_us))
        chunk = sa.select(outbox.c.id).where(prunable).order_by(outbox.c.id).limit(PRUNE_CHUNK)
        upto = conn.scalar(sa.select(sa.func.max(chunk.subquery().c.id)))
        if upto is None:
            return 0, 0
        result = conn.execute(outbox.delete().where(prunable & (outbox.c.id <= upto)))
        return int(result.rowcount), int(upto)

    def _reclaim_log(self, engine: Engine) -> None:
        """After a prune, outside any transaction: keep the database's log from growing.

        On SQLite, checkpoint the WAL and truncate it. The busy timeout is lowered meanwhile so
        a reader holding an old snapshot costs the writer thread at most a moment (the
        checkpoint then does what it can; SQLite's auto-checkpoint finishes later). Other
        backends need nothing here. Failures are logged, never raised: the prune committed.
        """
        if engine.dialect.name != "sqlite":
            return
        try:
            raw = engine.raw_connection()
            try:
                cursor = raw.cursor()
                try:
                    cursor.execute("PRAGMA busy_timeout")
                    row = cursor.fetchone()
                    timeout = int(row[0]) if row else 0
                    cursor.execute("PRAGMA busy_timeout=50")
                    try:
                        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                        cursor.fetchall()
                    finally:
                        cursor.execute(f"PRAGMA busy_timeout={timeout}")
                finally:
                    cursor.close()
            finally:
                raw.close()
        except Exception:
            _log.warning("checkpointing the SQLite log after a prune failed", exc_info=True)

    async def outbox_floor(self) -> int:
        """The lowest position still stored minus one (0 when nothing was pruned).

        Every entry after it is available to :meth:`read_outbox`; a reader that needs one at
        or before it (a resume, a relay far behind) must fall back to a snapshot or recount.
        """
        def run(conn: Connection) -> int:
            lowest = conn.scalar(sa.select(sa.func.min(outbox.c.id)))
            return 0 if lowest is None else max(int(lowest) - 1, 0)
        return await self._read(run)

    async def record_poison(self, position: int, workspace_id: int, error: str) -> None:
        """Remember the entry at ``position`` as one that can never be applied.

        Idempotent: recording a position again keeps the first record. ``error`` longer than
        :data:`MAX_POISON_ERROR` characters is cut.
        """
        if not _valid_id(position):
            raise ValidationError("expected a position (a positive integer)", "position")
        if not (_is_int(workspace_id) and 0 <= workspace_id <= _MAX_ID):
            raise ValidationError("expected a workspace id (a non-negative integer)",
                                  "workspace_id")
        if not isinstance(error, str):
            raise ValidationError(f"expected a string, got {type_name(error)}", "error")
        # storable anywhere: no lone surrogates, no NUL (PostgreSQL text refuses both)
        text = error.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\0")
        if len(text) > MAX_POISON_ERROR:
            text = text[:MAX_POISON_ERROR - 3] + "..."
        await self._write(self._record_poison, position, workspace_id, text)

    @staticmethod
    def _record_poison(conn: Connection, position: int, workspace_id: int, error: str) -> None:
        exists = sa.select(outbox_poison.c.position).where(outbox_poison.c.position == position)
        if conn.scalar(exists) is not None:
            return
        try:
            with conn.begin_nested():
                conn.execute(outbox_poison.insert().values(
                    position=position, workspace_id=workspace_id, error=error,
                    recorded_at=now_us()))
        except sa.exc.IntegrityError:  # another process recorded it first: keep theirs
            pass

    async def list_poison(self, workspace_id: int | None = None
                          ) -> list[tuple[int, int, str]]:
        """``(position, workspace_id, error)`` of the recorded poison entries, by position;
        only ``workspace_id``'s when given."""
        if workspace_id is not None and not _is_int(workspace_id):
            raise ValidationError(f"expected a workspace id or null, got "
                                  f"{type_name(workspace_id)}", "workspace_id")

        def run(conn: Connection) -> list[tuple[int, int, str]]:
            query = sa.select(outbox_poison.c.position, outbox_poison.c.workspace_id,
                              outbox_poison.c.error).order_by(outbox_poison.c.position)
            if workspace_id is not None:
                query = query.where(outbox_poison.c.workspace_id == workspace_id)
            return [(r.position, r.workspace_id, r.error) for r in conn.execute(query)]
        return await self._read(run)

    async def snapshot(self, workspace_id: int) -> Snapshot:
        """The workspace's views and conversations and the outbox position they reflect."""
        def run(conn: Connection) -> Snapshot:
            position = self._position(conn)
            return Snapshot(position=position, views=self._list_views(conn, workspace_id),
                            conversations=rows.load_images(
                                conn, conversations.c.workspace_id == workspace_id,
                                bulk=True))
        return await self._read(run)

    async def recount(self, workspace_id: int, views: list[View], now: int) -> Recount:
        """Counts of ``views`` by SQL, with the outbox position read in the same snapshot."""
        from . import queries  # written alongside; imported late to keep imports acyclic

        def run(conn: Connection) -> Recount:
            self._workspace(conn, workspace_id)
            position = self._position(conn)
            return Recount(position=position,
                           counts=queries.recount(conn, workspace_id, views, now))
        return await self._read(run)


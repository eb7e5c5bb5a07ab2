"""The source of truth: conversations, views and the outbox, behind one :class:`Store` protocol.

Backends are chosen by URL scheme, so the embedded default and production share every code
path above this package.
"""

from __future__ import annotations

from ..exceptions import ValidationError
from .base import (
    Counts,
    OutboxEntry,
    Page,
    Recount,
    Snapshot,
    Store,
    Team,
    Teammate,
    View,
    Workspace,
)

__all__ = [
    "Counts",
    "OutboxEntry",
    "Page",
    "Recount",
    "Snapshot",
    "Store",
    "Team",
    "Teammate",
    "View",
    "Workspace",
    "open_store",
]


def open_store(url: str) -> Store:
    """The store for ``url`` (not opened yet: ``await store.open()``).

    ``sqlite:///path/to/file.db`` is the embedded store; ``postgresql://user@host/database``
    (or ``postgres://``, ``postgresql+psycopg://``) the production one. Backends are imported
    here, late, so ``import livecount.store`` stays cheap and free of import cycles.
    """
    scheme = url.split(":", 1)[0].lower() if isinstance(url, str) and ":" in url else ""
    backend = scheme.split("+", 1)[0]
    if backend == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url)
    if backend in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValidationError("unsupported store URL; expected sqlite:///path/to/file.db (the "
                          "embedded store) or postgresql://user@host:5432/database")

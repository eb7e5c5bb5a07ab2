"""The relational schema, one definition for SQLite and PostgreSQL (SQLAlchemy Core).

Multi-valued fields and the custom map live in side tables rather than JSON columns so the
SQL compilation of a filter is plain, portable SQL (``EXISTS`` over an indexed table) with
exact types: a custom value is in exactly one of ``text_value``/``num_value``/``bool_value``.
Timestamps are BIGINT microseconds since the epoch, as in an image.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "conversation_custom",
    "conversation_people",
    "conversation_tags",
    "conversations",
    "metadata",
    "outbox",
    "outbox_poison",
    "schema_version",
    "settings",
    "team_members",
    "teammates",
    "teams",
    "versioning",
    "views",
    "workspaces",
]

metadata = MetaData()

#: SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a BIGINT identity.
Id = BigInteger().with_variant(Integer(), "sqlite")

workspaces = Table(
    "workspaces", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

teammates = Table(
    "teammates", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("workspace_id", ForeignKey("workspaces.id"), nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("email", Text, nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    UniqueConstraint("workspace_id", "email"),
)

teams = Table(
    "teams", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("workspace_id", ForeignKey("workspaces.id"), nullable=False, index=True),
    Column("name", Text, nullable=False),
)

team_members = Table(
    "team_members", metadata,
    Column("team_id", ForeignKey("teams.id"), primary_key=True),
    Column("teammate_id", ForeignKey("teammates.id"), primary_key=True),
)

conversations = Table(
    "conversations", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("workspace_id", ForeignKey("workspaces.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("assignee_id", BigInteger),
    Column("team_id", BigInteger),
    Column("author_id", BigInteger),
    Column("priority", Boolean, nullable=False),
    Column("channel", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("waiting_since", BigInteger),
    Column("snoozed_until", BigInteger),
    Index("ix_conversations_ws_state", "workspace_id", "state", "id"),
    Index("ix_conversations_ws_assignee", "workspace_id", "assignee_id"),
    Index("ix_conversations_ws_team", "workspace_id", "team_id"),
    Index("ix_conversations_snoozed", "snoozed_until"),
)

conversation_tags = Table(
    "conversation_tags", metadata,
    Column("conversation_id", ForeignKey("conversations.id"), primary_key=True),
    Column("tag", Text, primary_key=True),
    Index("ix_conversation_tags_tag", "tag", "conversation_id"),
)

#: ``mentions`` and ``unread_by``: (conversation, field, teammate).
conversation_people = Table(
    "conversation_people", metadata,
    Column("conversation_id", ForeignKey("conversations.id"), primary_key=True),
    Column("field", String(16), primary_key=True),
    Column("teammate_id", BigInteger, primary_key=True),
    Index("ix_conversation_people_teammate", "teammate_id", "field", "conversation_id"),
)

conversation_custom = Table(
    "conversation_custom", metadata,
    Column("conversation_id", ForeignKey("conversations.id"), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("text_value", Text),
    Column("num_value", Float(precision=53)),
    Column("bool_value", Boolean),
    Index("ix_conversation_custom_key", "key", "conversation_id"),
)

views = Table(
    "views", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("workspace_id", ForeignKey("workspaces.id"), nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("filter", Text, nullable=False),  # the JSON the client sent, re-encoded
    Column("group_by", Text),
    Column("owner_id", BigInteger),
    Column("position", Integer, nullable=False),
    Column("version", Integer, nullable=False),
)

#: The durable log of every change, written in the same transaction as the change itself.
#: ``kind`` is ``conversation`` (before/after images) or ``view`` (after = the view, or null
#: when it was deleted). ``id`` is the outbox position.
outbox = Table(
    "outbox", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("workspace_id", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("entity_id", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("before", Text),
    Column("after", Text),
    Column("committed_at", BigInteger, nullable=False),
    sqlite_autoincrement=True,
)

#: Outbox entries that can never be applied (DESIGN §6, guarantee 3), one row per position:
#: recorded by the relay, which then skips the entry and recounts its workspace. Not pruned
#: with the outbox, so an operator can still see what was skipped.
outbox_poison = Table(
    "outbox_poison", metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("workspace_id", BigInteger, nullable=False, index=True),
    Column("error", Text, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
)

#: Small key/value facts about the deployment (the admin token's hash).
settings = Table(
    "settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


#: The schema's own bookkeeping, apart from :data:`metadata` (which describes the data and is
#: what migration 1 creates): one row per migration applied, the newest version last. See
#: :mod:`livecount.store.migrations`.
versioning = MetaData()

schema_version = Table(
    "schema_version", versioning,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", BigInteger, nullable=False),  # µs since the epoch
)

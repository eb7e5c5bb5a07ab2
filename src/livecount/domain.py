"""The conversation model shared by every layer: fields, the image type, time and text forms.

An *image* is the full state of one conversation at one version. The store writes images to
the outbox, the engine evaluates predicates on them, the API renders them. Timestamps inside
an image are integer microseconds since the Unix epoch (exact, cheap to compare, identical in
SQL); they become ISO 8601 strings only on the wire.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from .exceptions import ValidationError

__all__ = [
    "FIELDS",
    "GROUPABLE",
    "MAX_SAFE_INTEGER",
    "NOBODY",
    "STATES",
    "CustomValue",
    "Field",
    "FieldKind",
    "Image",
    "canonical_custom",
    "check_text",
    "custom_key_error",
    "format_timestamp",
    "group_text",
    "image_groups",
    "lower",
    "now_us",
    "parse_timestamp",
    "type_name",
]

CustomValue = str | int | float | bool

#: ``$me`` when nobody is the viewer: an id no teammate has (ids start at 1). Evaluating a
#: ``$me`` filter with NOBODY gives its value for every teammate the conversation does not name.
NOBODY: Final = 0
STATES: Final = ("open", "snoozed", "closed")
MAX_SAFE_INTEGER: Final = 2**53
MAX_TEXT: Final = 1000
_CUSTOM_KEY_MAX = 64


class FieldKind(enum.Enum):
    STRING = "string"  # state, channel
    TEAMMATE = "teammate"  # assignee_id, author_id: a teammate id or null
    TEAM = "team"  # team_id
    BOOL = "bool"  # priority
    TIMESTAMP = "timestamp"
    TAGS = "tags"  # set of strings
    TEAMMATES = "teammates"  # set of teammate ids
    CUSTOM = "custom"  # custom.<key>: str | number | bool, or missing

    @property
    def multi(self) -> bool:
        return self in (FieldKind.TAGS, FieldKind.TEAMMATES)

    @property
    def accepts_me(self) -> bool:
        return self in (FieldKind.TEAMMATE, FieldKind.TEAMMATES)


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: FieldKind
    nullable: bool
    choices: tuple[str, ...] = ()


FIELDS: Final[dict[str, Field]] = {
    f.name: f
    for f in (
        Field("state", FieldKind.STRING, False, STATES),
        Field("assignee_id", FieldKind.TEAMMATE, True),
        Field("team_id", FieldKind.TEAM, True),
        Field("author_id", FieldKind.TEAMMATE, True),
        Field("priority", FieldKind.BOOL, False),
        Field("channel", FieldKind.STRING, False),
        Field("tags", FieldKind.TAGS, False),
        Field("mentions", FieldKind.TEAMMATES, False),
        Field("unread_by", FieldKind.TEAMMATES, False),
        Field("created_at", FieldKind.TIMESTAMP, False),
        Field("updated_at", FieldKind.TIMESTAMP, False),
        Field("waiting_since", FieldKind.TIMESTAMP, True),
        Field("snoozed_until", FieldKind.TIMESTAMP, True),
    )
}

#: Fields a view may group by (``custom.<key>`` too). Timestamps make no useful groups.
GROUPABLE: Final = frozenset(n for n, f in FIELDS.items() if f.kind is not FieldKind.TIMESTAMP)


class Image(msgspec.Struct, frozen=True, gc=False):
    """One conversation at one version, as the outbox records it."""

    id: int
    workspace_id: int
    version: int
    state: str
    assignee_id: int | None
    team_id: int | None
    author_id: int | None
    priority: bool
    channel: str
    tags: frozenset[str]
    mentions: frozenset[int]
    unread_by: frozenset[int]
    created_at: int
    updated_at: int
    waiting_since: int | None
    snoozed_until: int | None
    custom: dict[str, CustomValue]


def now_us() -> int:
    """Wall-clock time in integer microseconds, the unit of every timestamp in an image."""
    return time.time_ns() // 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_timestamp(value: Any, path: str) -> int:
    """ISO 8601 text → microseconds. A value without an offset is taken as UTC."""
    if not isinstance(value, str):
        raise ValidationError(
            f"expected an ISO 8601 timestamp string, got {type_name(value)}", path)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(f"{value[:50]!r} is not an ISO 8601 timestamp", path) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if parsed.year < 1970:
        raise ValidationError("timestamps before 1970 are not supported", path)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp(us: int | None) -> str | None:
    if us is None:
        return None
    seconds, micros = divmod(us, 1_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    return stamp.isoformat().replace("+00:00", "Z")


def lower(text: str) -> str:
    """The one lower-casing both compilations use for ``~ !~ ^ $``: Unicode ``str.lower``."""
    return text.lower()


def group_text(value: CustomValue) -> str:
    """The text form of a group value: ``7``, ``vip``, ``true``, ``2.5``."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def image_groups(image: Image, field: str) -> tuple[str, ...]:
    """The group values ``image`` falls in when a view groups by ``field`` (nulls: none)."""
    if field.startswith("custom."):
        value = image.custom.get(field[7:])
        return () if value is None else (group_text(value),)
    value = getattr(image, field)
    if isinstance(value, frozenset):
        return tuple(group_text(v) for v in value)
    return () if value is None else (group_text(value),)


def check_text(value: Any, path: str, *, allow_empty: bool = True) -> str:
    """A string fit for storage in SQLite and PostgreSQL alike (no NUL, bounded length)."""
    if not isinstance(value, str):
        raise ValidationError(f"expected a string, got {type_name(value)}", path)
    if not value and not allow_empty:
        raise ValidationError("must not be empty", path)
    if len(value) > MAX_TEXT:
        raise ValidationError(f"string longer than {MAX_TEXT} characters", path)
    if "\x00" in value:
        raise ValidationError("strings must not contain NUL characters", path)
    return value


def canonical_custom(value: Any, path: str) -> CustomValue:
    """Validate a custom value; integral floats become ints so ``1`` and ``1.0`` are one value."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValidationError(f"numbers must lie within ±2**53, got {value}", path)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError("numbers must be finite", path)
        if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
            return int(value)
        return value
    if isinstance(value, str):
        return check_text(value, path)
    raise ValidationError(f"expected a string, number or boolean, got {type_name(value)}", path)


def custom_key_error(key: str) -> str | None:
    """Why ``key`` cannot name a custom attribute, or None when it can."""
    if not key or len(key) > _CUSTOM_KEY_MAX:
        return f"custom keys have 1 to {_CUSTOM_KEY_MAX} characters"
    if not (key[0].isascii() and (key[0].isalpha() or key[0] == "_")):
        return "custom keys start with an ASCII letter or '_'"
    if not all(c.isascii() and (c.isalnum() or c == "_") for c in key):
        return "custom keys use only ASCII letters, digits and '_'"
    return None


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)

"""Hypothesis strategies the whole test suite shares: filters, conversations, patches, views.

Value pools are small on purpose, so random filters and random conversations meet often (a
test in tests/filters/test_sql.py checks a good share of pairs match): teammates 1..6, teams
1..3, a handful of tags, channels and custom keys, timestamps around :data:`NOW`. Strings mix
case variants whose lower-casing is awkward (``'É'``, ``'ß'``, ``'İ'``, final ``'Σ'``) and the
characters SQL likes to treat specially (``%``, ``_``, ``\\``).
"""

from __future__ import annotations

import functools
from typing import Any, Final

from hypothesis import strategies as st

from livecount.conversations import apply_patch, new_image, validate_body
from livecount.domain import (
    FIELDS,
    GROUPABLE,
    STATES,
    FieldKind,
    Image,
    format_timestamp,
    parse_timestamp,
)
from livecount.filters.parse import OPS_BY_KIND

__all__ = [
    "CUSTOM_KEYS",
    "CUSTOM_POOLS",
    "FOLDERS",
    "NOW",
    "TAGS",
    "TEAMMATES",
    "TEAMS",
    "TIMESTAMPS",
    "conversation_bodies",
    "custom_values",
    "filters",
    "image_lists",
    "images",
    "patches",
    "texts",
    "views",
]

#: The clock of every test that evaluates time filters (microseconds).
NOW: Final = parse_timestamp("2024-03-10T12:00:00Z", "now")
_HOUR: Final = 3_600_000_000
_DAY: Final = 24 * _HOUR
#: Timestamps around NOW, including exact ``older_than``/``newer_than`` boundaries (1 h, 1 d)
#: and one microsecond off them.
TIMESTAMPS: Final = tuple(
    NOW + d
    for d in (0, -1, -_HOUR, -_HOUR + 1, -_HOUR - 1, -_DAY, -_DAY - 1, -3 * _DAY, _HOUR, 2 * _DAY)
)
#: ``older_than``/``newer_than`` spans in seconds (a fraction included: spans are exact µs).
SPANS: Final = (0, 1800, 3600, 3600.000001, 86400, 3 * 86400)
TEAMMATES: Final = tuple(range(1, 7))
TEAMS: Final = (1, 2, 3)
TAGS: Final = (
    "vip",
    "VIP",
    "billing",
    "bug%",
    "a_b",
    "back\\slash",
    "straße",
    "STRASSE",
    "İstanbul",
    "istanbul",
    "ΣΟΦΙΑΣ",
)
CHANNELS: Final = (
    "chat",
    "email",
    "Chat",
    "E-Mail",
    "50%",
    "a_b",
    "x\\y",
    "Éclair",
    "éclair",
    "Straße",
    "STRASSE",
    "İzmir",
    "izmir",
    "ΟΔΥΣΣΕΥΣ",
    "οδυσσευς",
)
CUSTOM_KEYS: Final = ("plan", "seats", "vip", "region")
#: Letters whose lower-casing differs between naive implementations, SQL wildcards, Greek
#: sigmas (final and not), a combining dot and an apostrophe (case-ignorable).
ALPHABET: Final = "aAbBsSzZ%_\\ßẞİIıi\u0307ΣσςΑαÉé '1"
#: Fragments for ``~ ^ $`` and ordering, chosen to hit the pools above in odd ways.
NEEDLES: Final = (
    "",
    "a",
    "A",
    "e",
    "É",
    "%",
    "_",
    "\\",
    "ß",
    "SS",
    "ss",
    "straße",
    "STRASSE",
    "i",
    "I",
    "İ",
    "i\u0307",
    "ı",
    "σ",
    "ς",
    "Σ",
    "ας",
    "ΑΣ",
    "chat",
    "MAIL",
    "50%",
    "a_b",
    "x\\",
    "vip",
    "pro",
    "1",
)

FOLDERS: Final[tuple[tuple[dict[str, Any], str | None], ...]] = tuple(
    (
        {"operator": "AND", "value": [{"field": "state", "operator": "=", "value": "open"}, *rest]}
        if rest
        else {"field": "state", "operator": "=", "value": "open"},
        group,
    )
    for rest, group in (
        ([{"field": "assignee_id", "operator": "=", "value": "$me"}], None),
        ([{"field": "mentions", "operator": "contains", "value": "$me"}], None),
        ([{"field": "author_id", "operator": "=", "value": "$me"}], None),
        ([{"field": "assignee_id", "operator": "is null"}], None),
        ([], None),
        ([], "team_id"),
        ([], "assignee_id"),
    )
)
"""The seeded folders of DESIGN §2 as (filter, group_by)."""


@functools.cache
def texts() -> st.SearchStrategy[str]:
    """Short strings: awkward fragments, pool values, or random ones over :data:`ALPHABET`."""
    return st.one_of(
        st.sampled_from(NEEDLES), st.sampled_from(CHANNELS + TAGS), st.text(ALPHABET, max_size=5)
    )


#: Each custom key's usual values (so filters and conversations meet), mixed types included.
CUSTOM_POOLS: Final[dict[str, tuple[Any, ...]]] = {
    "plan": ("pro", "PRO", "enterprise", "free", "1", ""),
    "seats": (0, 1, 5, 10, 2.5, 1e20, 2**53, "5"),
    "vip": (True, False, "true", 1),
    "region": ("eu", "EU", "us", "Éire", "straße", 2),
}


@functools.cache
def custom_values(key: str | None = None) -> st.SearchStrategy[Any]:
    """Custom values of every type, overlapping across types ("1", 1, 1.0, true); mostly
    from ``key``'s pool when it is given."""
    anything = st.one_of(
        st.sampled_from(("pro", "PRO", "enterprise", "1", "", "true", "É", "straße")),
        st.text(ALPHABET, max_size=3),
        st.sampled_from((0, 1, 2, 5, 10, -1, 2**53)),
        st.sampled_from((1.0, 2.5, -0.5, 0.1, 1e20)),
        st.booleans(),
    )
    if key is None:
        return anything
    usual = st.sampled_from(CUSTOM_POOLS[key])
    return st.one_of(usual, usual, usual, anything)


def _iso(us: int) -> str:
    text = format_timestamp(us)
    assert text is not None
    return text


_timestamps = st.sampled_from(TIMESTAMPS).map(_iso)
_teammate = st.sampled_from(TEAMMATES)
_team = st.sampled_from(TEAMS)
_often = st.sampled_from((True, True, True, False))


@functools.cache  # strategies are built once: hypothesis validates each new one it draws from
def _nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, strategy, st.none())


@st.composite
def _custom_map(draw: st.DrawFn, removals: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in CUSTOM_KEYS:
        if draw(st.booleans()):
            value = custom_values(key)
            out[key] = draw(_nullable(value) if removals else value)
    return out


@functools.cache
def _fields(patch: bool) -> dict[str, st.SearchStrategy[Any]]:
    people = st.lists(_teammate, max_size=3)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "state": st.sampled_from(STATES),
        "assignee_id": _nullable(_teammate),
        "team_id": _nullable(_team),
        "priority": st.booleans(),
        "channel": st.sampled_from(CHANNELS),
        "tags": _nullable(st.lists(st.sampled_from(TAGS), max_size=3)),
        "mentions": _nullable(people),
        "unread_by": _nullable(people),
        "waiting_since": _nullable(_timestamps),
        "snoozed_until": _nullable(_timestamps),
        "custom": st.one_of(*[_custom_map(removals=patch)] * 3, st.none()),
    }
    if not patch:
        fields["author_id"] = _nullable(_teammate)
    return fields


@st.composite
def _body(draw: st.DrawFn, patch: bool) -> dict[str, Any]:
    # Each field is there three times in four: absent fields take defaults (or stay as they
    # were), present ones make filters meet conversations often.
    return {name: draw(value) for name, value in _fields(patch).items() if draw(_often)}


def conversation_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Create bodies ``validate_body(body, patch=False)`` accepts (any field may be absent,
    nullable ones null, sets null or empty)."""
    return _body(patch=False)


def patches() -> st.SearchStrategy[dict[str, Any]]:
    """JSON Merge Patches ``validate_body(patch, patch=True)`` accepts (``custom`` keys set
    to null remove the key; ``custom: null`` removes all)."""
    return _body(patch=True)


@st.composite
def images(draw: st.DrawFn, conversation_id: int = 1, workspace_id: int = 1) -> Image:
    """An image as a create (and maybe one patch) leaves it, created at one of TIMESTAMPS."""
    fields = validate_body(draw(conversation_bodies()), patch=False)
    image = new_image(
        conversation_id, workspace_id, fields, None, draw(st.sampled_from(TIMESTAMPS))
    )
    if draw(st.booleans()):
        changes = validate_body(draw(patches()), patch=True)
        image = apply_patch(
            image, changes, max(image.created_at, draw(st.sampled_from(TIMESTAMPS)))
        )
    return image


@st.composite
def image_lists(draw: st.DrawFn, max_size: int = 8, workspace_id: int = 1) -> list[Image]:
    """Images with distinct, unordered, gappy ids."""
    ids = draw(st.lists(st.integers(1, 10_000), unique=True, max_size=max_size))
    return [draw(images(i, workspace_id)) for i in ids]


# -- filters --------------------------------------------------------------------------------

_FIELDS: Final = (
    "state",
    "assignee_id",
    "team_id",
    "author_id",
    "priority",
    "channel",
    "tags",
    "mentions",
    "unread_by",
    "created_at",
    "updated_at",
    "waiting_since",
    "snoozed_until",
    *(f"custom.{k}" for k in CUSTOM_KEYS),
)
_ME_OPS: Final = ("=", "IN", "contains")


def _kind(field: str) -> FieldKind:
    return FieldKind.CUSTOM if field.startswith("custom.") else FIELDS[field].kind


@functools.cache
def _scalar(field: str, op: str) -> st.SearchStrategy[Any]:
    """One valid comparison value for ``field op``."""
    kind = _kind(field).value
    if field == "state" and op in ("=", "!=", "IN", "NIN"):
        return st.sampled_from(STATES)
    if kind == "string" and op in ("=", "!=", "IN", "NIN"):
        return st.one_of(st.sampled_from(CHANNELS), st.sampled_from(CHANNELS), texts())
    if kind == "string":
        return texts()
    if kind == "teammate":
        return st.sampled_from((*TEAMMATES, *TEAMMATES, 0, 7, -1))
    if kind == "team":
        return st.sampled_from((*TEAMS, 4))
    if kind == "bool":
        return st.booleans()
    if kind == "timestamp":
        return _timestamps
    if kind == "tags":
        return st.sampled_from((*TAGS, "VIP!", "straße"))
    if kind == "teammates":
        return _teammate
    key = field[7:]
    strings = st.sampled_from([v for v in CUSTOM_POOLS[key] if isinstance(v, str)] or [""])
    if op in ("~", "!~", "^", "$"):
        return st.one_of(strings, texts())
    if op in ("<", "<=", ">", ">="):
        return st.one_of(strings, texts(), st.sampled_from((0, 1, 2, 5, 2.5, -1, 1e20)))
    return custom_values(key)


@st.composite
def _comparison(draw: st.DrawFn, negated: bool) -> dict[str, Any]:
    field = draw(st.sampled_from(_FIELDS))
    kind = _kind(field)
    op = draw(st.sampled_from(OPS_BY_KIND[kind]))
    if op in ("is null", "is not null"):
        return {"field": field, "operator": op}
    me = kind.accepts_me and op in _ME_OPS and not negated and draw(st.booleans())
    if op in ("older_than", "newer_than"):
        value: Any = draw(st.sampled_from(SPANS))
    elif op in ("IN", "NIN"):
        value = draw(st.lists(_scalar(field, op), min_size=0 if me else 1, max_size=3))
        if me:
            value.insert(draw(st.integers(0, len(value))), "$me")
    else:
        value = "$me" if me else draw(_scalar(field, op))
    return {"field": field, "operator": op, "value": value}


def _composite(depth: int, negated: bool) -> st.SearchStrategy[dict[str, Any]]:
    children = st.lists(_node(depth - 1, negated), min_size=1, max_size=3)
    both = st.builds(
        lambda op, value: {"operator": op, "value": value}, st.sampled_from(("AND", "OR")), children
    )
    # NOT takes its sub-filter bare or as a one-item list; nothing under it may use $me.
    inverted = st.builds(
        lambda child, listed: {"operator": "NOT", "value": [child] if listed else child},
        _node(depth - 1, True),
        st.booleans(),
    )
    return st.one_of(both, both, inverted)


_NODES: dict[tuple[int, bool], st.SearchStrategy[dict[str, Any]]] = {}


def _node(depth: int, negated: bool) -> st.SearchStrategy[dict[str, Any]]:
    key = (depth, negated)
    if key not in _NODES:
        leaf = _comparison(negated)
        _NODES[key] = leaf if depth <= 1 else st.one_of(leaf, leaf, _composite(depth, negated))
    return _NODES[key]


def filters(max_depth: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """Valid filter JSON: nested AND/OR/NOT up to ``max_depth`` levels, every field and every
    operator it takes, ``$me`` wherever it is allowed (never under NOT or a negative one)."""
    return _node(max_depth, False)


def views() -> st.SearchStrategy[dict[str, Any]]:
    """Arguments of ``Store.create_view`` (after ``workspace_id``): name, filter, group_by
    (plain, multi-valued and custom fields), owner_id (None: shared)."""
    group_by = st.none() | st.sampled_from(
        (*sorted(GROUPABLE), *(f"custom.{k}" for k in CUSTOM_KEYS))
    )
    random = st.fixed_dictionaries(
        {
            "name": st.text(ALPHABET, min_size=1, max_size=12),
            "filter": filters(),
            "group_by": group_by,
            "owner_id": st.none() | _teammate,
        }
    )
    folder = st.builds(
        lambda pair, name: {"name": name, "filter": pair[0], "group_by": pair[1], "owner_id": None},
        st.sampled_from(FOLDERS),
        st.sampled_from(("Your inbox", "Folder")),
    )
    return st.one_of(random, random, random, folder)

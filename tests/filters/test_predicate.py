"""The predicate compilation on examples: every operator, and DESIGN §3's rules for nulls,
type mismatches, negation, case and ordering, one table row each."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given

from livecount.domain import NOBODY, Image
from livecount.exceptions import ValidationError
from livecount.filters.parse import OPS_BY_KIND, parse_filter
from livecount.filters.predicate import compile_predicate
from livecount.filters.tree import NEGATIONS, Comparison, Node, Not
from tests.strategies import NOW, filters, images

HOUR = 3_600_000_000
BASE = Image(id=1, workspace_id=1, version=1, state="open", assignee_id=None, team_id=None,
             author_id=None, priority=False, channel="chat", tags=frozenset(),
             mentions=frozenset(), unread_by=frozenset(), created_at=NOW - 24 * HOUR,
             updated_at=NOW - HOUR, waiting_since=None, snoozed_until=None, custom={})


def image(**fields: Any) -> Image:
    for name in ("tags", "mentions", "unread_by"):
        if name in fields:
            fields[name] = frozenset(fields[name])
    return msgspec.structs.replace(BASE, **fields)


def cmp(field: str, op: str, value: Any = ...) -> dict[str, Any]:
    return {"field": field, "operator": op} if value is ... else \
        {"field": field, "operator": op, "value": value}


def evaluate(raw: dict[str, Any], img: Image, me: int = NOBODY) -> bool:
    return compile_predicate(parse_filter(raw))(img, me, NOW)


# (filter, image fields, me, expected)
CASES: list[tuple[dict[str, Any], dict[str, Any], int, bool]] = [
    # strings: = is exact, IN/NIN, ordering by code point
    (cmp("state", "=", "open"), {}, 0, True),
    (cmp("state", "=", "open"), {"state": "closed"}, 0, False),
    (cmp("state", "!=", "open"), {"state": "closed"}, 0, True),
    (cmp("state", "!=", "open"), {}, 0, False),
    (cmp("state", "IN", ["open", "snoozed"]), {"state": "snoozed"}, 0, True),
    (cmp("state", "IN", ["open", "snoozed"]), {"state": "closed"}, 0, False),
    (cmp("state", "NIN", ["open", "snoozed"]), {"state": "closed"}, 0, True),
    (cmp("state", "NIN", ["open"]), {}, 0, False),
    (cmp("channel", "=", "Chat"), {}, 0, False),
    (cmp("channel", "=", "chat"), {}, 0, True),
    (cmp("channel", "<", "a"), {"channel": "Zebra"}, 0, True),  # 'Z' < 'a' by code point
    (cmp("channel", ">", "z"), {"channel": "éclair"}, 0, True),  # 'é' (U+00E9) > 'z'
    (cmp("channel", "<", "chat"), {}, 0, False),
    (cmp("channel", "<=", "chat"), {}, 0, True),
    (cmp("channel", ">=", "chat"), {}, 0, True),
    (cmp("channel", ">", "chat"), {}, 0, False),
    (cmp("channel", "<", "chat!"), {}, 0, True),  # a prefix sorts first
    (cmp("state", ">", "closed"), {"state": "snoozed"}, 0, True),
    # ~ !~ ^ $: substrings, case-insensitive with str.lower, wildcards are literal
    (cmp("channel", "~", "HA"), {}, 0, True),
    (cmp("channel", "~", "xyz"), {}, 0, False),
    (cmp("channel", "!~", "HA"), {}, 0, False),
    (cmp("channel", "!~", "xyz"), {}, 0, True),
    (cmp("channel", "^", "CH"), {}, 0, True),
    (cmp("channel", "^", "at"), {}, 0, False),
    (cmp("channel", "$", "AT"), {}, 0, True),
    (cmp("channel", "$", "ch"), {}, 0, False),
    (cmp("channel", "~", ""), {}, 0, True),
    (cmp("channel", "^", ""), {}, 0, True),
    (cmp("channel", "$", ""), {}, 0, True),
    (cmp("channel", "!~", ""), {}, 0, False),
    (cmp("channel", "~", "%"), {}, 0, False),
    (cmp("channel", "~", "%"), {"channel": "50%"}, 0, True),
    (cmp("channel", "~", "_"), {"channel": "ab"}, 0, False),
    (cmp("channel", "~", "_"), {"channel": "a_b"}, 0, True),
    (cmp("channel", "~", "a_b"), {"channel": "aXb"}, 0, False),
    (cmp("channel", "$", "\\"), {"channel": "x\\"}, 0, True),
    (cmp("channel", "~", "\\y"), {"channel": "x\\Y"}, 0, True),
    (cmp("state", "~", "OPE"), {}, 0, True),
    (cmp("channel", "~", "é"), {"channel": "Éclair"}, 0, True),
    (cmp("channel", "^", "ÉC"), {"channel": "éclair"}, 0, True),
    (cmp("channel", "~", "ss"), {"channel": "Straße"}, 0, False),  # 'ß' lowers to itself
    (cmp("channel", "~", "ß"), {"channel": "STRASSE"}, 0, False),
    (cmp("channel", "~", "SS"), {"channel": "STRASSE"}, 0, True),
    (cmp("channel", "~", "ẞ"), {"channel": "straße"}, 0, True),  # capital sharp s → 'ß'
    (cmp("channel", "^", "i"), {"channel": "İzmir"}, 0, True),  # 'İ' → 'i' + U+0307
    (cmp("channel", "^", "iz"), {"channel": "İzmir"}, 0, False),
    (cmp("channel", "^", "İz"), {"channel": "İzmir"}, 0, True),
    (cmp("channel", "^", "i\u0307z"), {"channel": "İZMIR"}, 0, True),
    (cmp("channel", "^", "iz"), {"channel": "IZMIR"}, 0, True),
    (cmp("channel", "~", "ı"), {"channel": "IZMIR"}, 0, False),  # dotless ı is no 'i'
    (cmp("channel", "$", "ς"), {"channel": "ΟΔΥΣΣΕΥΣ"}, 0, True),  # final sigma
    (cmp("channel", "$", "σ"), {"channel": "ΟΔΥΣΣΕΥΣ"}, 0, False),
    (cmp("channel", "~", "σσ"), {"channel": "ΟΔΥΣΣΕΥΣ"}, 0, True),
    (cmp("channel", "$", "ΥΣ"), {"channel": "ΟΔΥΣΣΕΥΣ"}, 0, True),  # needle lowered too
    (cmp("channel", "=", "ΟΔΥΣΣΕΥΣ"), {"channel": "οδυσσευς"}, 0, False),
    # teammate and team ids: null never equals, negatives include null
    (cmp("assignee_id", "=", 5), {"assignee_id": 5}, 0, True),
    (cmp("assignee_id", "=", 5), {}, 0, False),
    (cmp("assignee_id", "!=", 5), {}, 0, True),
    (cmp("assignee_id", "!=", 5), {"assignee_id": 5}, 0, False),
    (cmp("assignee_id", "!=", 5), {"assignee_id": 4}, 0, True),
    (cmp("assignee_id", "IN", [4, 5]), {"assignee_id": 5}, 0, True),
    (cmp("assignee_id", "IN", [4, 5]), {}, 0, False),
    (cmp("assignee_id", "NIN", [4, 5]), {}, 0, True),
    (cmp("assignee_id", "NIN", [4, 5]), {"assignee_id": 4}, 0, False),
    (cmp("assignee_id", "<", 3), {"assignee_id": 2}, 0, True),
    (cmp("assignee_id", "<", 3), {}, 0, False),
    (cmp("assignee_id", ">=", 3), {}, 0, False),
    ({"operator": "NOT", "value": cmp("assignee_id", "<", 3)}, {}, 0, True),
    (cmp("assignee_id", "<=", 3), {"assignee_id": 3}, 0, True),
    (cmp("assignee_id", ">", 3), {"assignee_id": 3}, 0, False),
    (cmp("assignee_id", "is null"), {}, 0, True),
    (cmp("assignee_id", "is null"), {"assignee_id": 1}, 0, False),
    (cmp("assignee_id", "is not null"), {"assignee_id": 1}, 0, True),
    (cmp("author_id", "=", 2), {"author_id": 2}, 0, True),
    (cmp("team_id", ">", 1), {"team_id": 2}, 0, True),
    (cmp("team_id", "NIN", [2]), {}, 0, True),
    (cmp("team_id", "is not null"), {}, 0, False),
    (cmp("team_id", "is null"), {"team_id": 1}, 0, False),
    (cmp("team_id", "=", 1), {"team_id": 1}, 0, True),
    (cmp("team_id", "!=", 1), {"team_id": 1}, 0, False),
    (cmp("team_id", "IN", [1, 3]), {"team_id": 3}, 0, True),
    (cmp("team_id", "<", 2), {"team_id": 1}, 0, True),
    (cmp("team_id", "<=", 2), {}, 0, False),
    (cmp("team_id", ">=", 2), {"team_id": 1}, 0, False),
    (cmp("state", "is null"), {}, 0, False),
    (cmp("channel", "is not null"), {}, 0, True),
    # $me: the viewer; NOBODY matches no teammate field
    (cmp("assignee_id", "=", "$me"), {"assignee_id": 3}, 3, True),
    (cmp("assignee_id", "=", "$me"), {"assignee_id": 3}, 4, False),
    (cmp("assignee_id", "=", "$me"), {}, NOBODY, False),
    (cmp("assignee_id", "IN", ["$me", 2]), {"assignee_id": 1}, 1, True),
    (cmp("assignee_id", "IN", ["$me", 2]), {"assignee_id": 2}, 1, True),
    (cmp("assignee_id", "IN", ["$me", 2]), {"assignee_id": 3}, 1, False),
    (cmp("assignee_id", "IN", ["$me"]), {}, NOBODY, False),
    (cmp("author_id", "=", "$me"), {"author_id": 6}, 6, True),
    (cmp("mentions", "contains", "$me"), {"mentions": [2, 3]}, 2, True),
    (cmp("mentions", "contains", "$me"), {"mentions": [2, 3]}, 4, False),
    (cmp("mentions", "contains", "$me"), {"mentions": [2]}, NOBODY, False),
    (cmp("unread_by", "contains", "$me"), {"unread_by": [5]}, 5, True),
    # booleans
    (cmp("priority", "=", True), {"priority": True}, 0, True),
    (cmp("priority", "=", True), {}, 0, False),
    (cmp("priority", "!=", True), {}, 0, True),
    (cmp("priority", "IN", [False]), {}, 0, True),
    (cmp("priority", "NIN", [False]), {}, 0, False),
    (cmp("priority", "is null"), {}, 0, False),
    (cmp("priority", "is not null"), {}, 0, True),
    # timestamps: exact instants, and spans relative to now (boundary included in older_than)
    (cmp("created_at", "=", "2024-03-09T12:00:00Z"), {}, 0, True),
    (cmp("created_at", "=", "2024-03-09T12:00:00.000001Z"), {}, 0, False),
    (cmp("created_at", "<", "2024-03-09T12:00:00.000001+00:00"), {}, 0, True),
    (cmp("created_at", ">", "2024-03-09T13:00:00+02:00"), {}, 0, True),  # 11:00 UTC
    (cmp("waiting_since", "older_than", 3600), {"waiting_since": NOW - HOUR}, 0, True),
    (cmp("waiting_since", "older_than", 3600), {"waiting_since": NOW - HOUR + 1}, 0, False),
    (cmp("waiting_since", "newer_than", 3600), {"waiting_since": NOW - HOUR + 1}, 0, True),
    (cmp("waiting_since", "newer_than", 3600), {"waiting_since": NOW - HOUR}, 0, False),
    (cmp("waiting_since", "newer_than", 0), {"waiting_since": NOW}, 0, False),
    (cmp("waiting_since", "older_than", 0), {"waiting_since": NOW}, 0, True),
    (cmp("waiting_since", "newer_than", 3600), {"waiting_since": NOW + HOUR}, 0, True),
    (cmp("waiting_since", "older_than", 0.5), {"waiting_since": NOW - 500_000}, 0, True),
    (cmp("waiting_since", "older_than", 3600), {}, 0, False),
    (cmp("waiting_since", "newer_than", 3600), {}, 0, False),
    ({"operator": "NOT", "value": cmp("waiting_since", "older_than", 1)}, {}, 0, True),
    (cmp("snoozed_until", "is null"), {}, 0, True),
    (cmp("snoozed_until", "is not null"), {"snoozed_until": NOW}, 0, True),
    (cmp("updated_at", "IN", ["2024-03-10T11:00:00Z", "2020-01-01T00:00:00Z"]), {}, 0, True),
    (cmp("updated_at", "NIN", ["2024-03-10T11:00:00Z"]), {}, 0, False),
    (cmp("updated_at", "<=", "2024-03-10T11:00:00Z"), {}, 0, True),
    (cmp("updated_at", ">=", "2024-03-10T11:00:00.000001Z"), {}, 0, False),
    (cmp("waiting_since", ">=", "2000-01-01T00:00:00Z"), {}, 0, False),
    (cmp("snoozed_until", "!=", "2024-01-01T00:00:00Z"), {}, 0, True),
    (cmp("snoozed_until", "<", "2030-01-01T00:00:00Z"), {}, 0, False),
    # multi-valued: contains is exact; is null means empty
    (cmp("tags", "contains", "vip"), {"tags": ["vip", "x"]}, 0, True),
    (cmp("tags", "contains", "vip"), {"tags": ["VIP"]}, 0, False),
    (cmp("tags", "contains", "vip"), {}, 0, False),
    (cmp("tags", "not_contains", "vip"), {}, 0, True),
    (cmp("tags", "not_contains", "vip"), {"tags": ["vip"]}, 0, False),
    (cmp("tags", "contains", "bug%"), {"tags": ["bug"]}, 0, False),
    (cmp("tags", "is null"), {}, 0, True),
    (cmp("tags", "is null"), {"tags": ["x"]}, 0, False),
    (cmp("tags", "is not null"), {"tags": ["x"]}, 0, True),
    (cmp("mentions", "contains", 3), {"mentions": [3]}, 0, True),
    (cmp("mentions", "not_contains", 3), {"mentions": [2]}, 0, True),
    (cmp("unread_by", "is null"), {"unread_by": [1]}, 0, False),
    (cmp("mentions", "is not null"), {}, 0, False),
    (cmp("unread_by", "not_contains", 1), {}, 0, True),
    # custom: missing is null; a value of another type never matches a positive operator
    (cmp("custom.plan", "=", "pro"), {"custom": {"plan": "pro"}}, 0, True),
    (cmp("custom.plan", "=", "pro"), {"custom": {"plan": "PRO"}}, 0, False),
    (cmp("custom.plan", "=", "pro"), {}, 0, False),
    (cmp("custom.plan", "!=", "pro"), {}, 0, True),
    (cmp("custom.plan", "!=", "pro"), {"custom": {"plan": 1}}, 0, True),
    (cmp("custom.plan", "!=", "pro"), {"custom": {"plan": "pro"}}, 0, False),
    (cmp("custom.seats", "=", 1), {"custom": {"seats": 1}}, 0, True),
    (cmp("custom.seats", "=", 1), {"custom": {"seats": "1"}}, 0, False),
    (cmp("custom.seats", "=", 1), {"custom": {"seats": True}}, 0, False),
    (cmp("custom.seats", "=", True), {"custom": {"seats": 1}}, 0, False),
    (cmp("custom.seats", "=", True), {"custom": {"seats": True}}, 0, True),
    (cmp("custom.seats", "=", 0), {"custom": {"seats": False}}, 0, False),
    (cmp("custom.seats", "=", "true"), {"custom": {"seats": True}}, 0, False),
    (cmp("custom.seats", "=", 1.0), {"custom": {"seats": 1}}, 0, True),  # 1.0 is 1
    (cmp("custom.seats", "=", 2.5), {"custom": {"seats": 2.5}}, 0, True),
    (cmp("custom.seats", "IN", [1, "x"]), {"custom": {"seats": "x"}}, 0, True),
    (cmp("custom.seats", "IN", [1, "x"]), {"custom": {"seats": 1}}, 0, True),
    (cmp("custom.seats", "IN", [1, "x"]), {"custom": {"seats": True}}, 0, False),
    (cmp("custom.seats", "IN", [1, "x"]), {}, 0, False),
    (cmp("custom.seats", "NIN", [1, "x"]), {"custom": {"seats": True}}, 0, True),
    (cmp("custom.seats", "NIN", [1, "x"]), {}, 0, True),
    (cmp("custom.seats", "NIN", [True]), {"custom": {"seats": True}}, 0, False),
    (cmp("custom.seats", ">", 2), {"custom": {"seats": 5}}, 0, True),
    (cmp("custom.seats", ">", 2), {"custom": {"seats": 2.5}}, 0, True),
    (cmp("custom.seats", ">", 2), {"custom": {"seats": 2}}, 0, False),
    (cmp("custom.seats", ">", 2), {"custom": {"seats": "5"}}, 0, False),
    (cmp("custom.seats", ">", 0), {"custom": {"seats": True}}, 0, False),  # no bool order
    (cmp("custom.seats", ">", 2), {}, 0, False),
    (cmp("custom.seats", "<=", 2), {"custom": {"seats": 2}}, 0, True),
    ({"operator": "NOT", "value": cmp("custom.seats", ">", 2)}, {}, 0, True),
    ({"operator": "NOT", "value": cmp("custom.seats", ">", 2)},
     {"custom": {"seats": "9"}}, 0, True),
    (cmp("custom.plan", "<", "b"), {"custom": {"plan": "a"}}, 0, True),
    (cmp("custom.plan", "<", "b"), {"custom": {"plan": "B"}}, 0, True),
    (cmp("custom.plan", "<", "b"), {"custom": {"plan": 1}}, 0, False),
    (cmp("custom.plan", ">=", "b"), {"custom": {"plan": "é"}}, 0, True),
    (cmp("custom.plan", "~", "RO"), {"custom": {"plan": "pro"}}, 0, True),
    (cmp("custom.plan", "~", "1"), {"custom": {"plan": 1}}, 0, False),
    (cmp("custom.plan", "~", "tru"), {"custom": {"plan": True}}, 0, False),
    (cmp("custom.plan", "!~", "1"), {"custom": {"plan": 1}}, 0, True),
    (cmp("custom.plan", "!~", "x"), {}, 0, True),
    (cmp("custom.plan", "^", ""), {"custom": {"plan": ""}}, 0, True),
    (cmp("custom.plan", "^", ""), {"custom": {"plan": 0}}, 0, False),
    (cmp("custom.plan", "$", "SE"), {"custom": {"plan": "Enterprise"}}, 0, True),
    (cmp("custom.plan", "$", "%"), {"custom": {"plan": "100%"}}, 0, True),
    (cmp("custom.plan", "is null"), {}, 0, True),
    (cmp("custom.plan", "is null"), {"custom": {"other": 1}}, 0, True),
    (cmp("custom.plan", "is not null"), {"custom": {"plan": False}}, 0, True),
    (cmp("custom.plan", "is not null"), {"custom": {"plan": ""}}, 0, True),
    # composites
    ({"operator": "AND", "value": [cmp("state", "=", "open"), cmp("priority", "=", True)]},
     {"priority": True}, 0, True),
    ({"operator": "AND", "value": [cmp("state", "=", "open"), cmp("priority", "=", True)]},
     {}, 0, False),
    ({"operator": "OR", "value": [cmp("state", "=", "closed"), cmp("priority", "=", False)]},
     {}, 0, True),
    ({"operator": "OR", "value": [cmp("state", "=", "closed")]}, {}, 0, False),
    ({"operator": "NOT", "value": [cmp("state", "=", "open")]}, {}, 0, False),
    ({"operator": "NOT", "value": {"operator": "NOT", "value": cmp("assignee_id", "=", 1)}},
     {}, 0, False),
    ({"operator": "OR", "value": [cmp("assignee_id", "=", "$me"),
                                  cmp("mentions", "contains", "$me")]},
     {"mentions": [4]}, 4, True),
    ({"operator": "AND", "value": [cmp("state", "=", "open"),
                                   {"operator": "NOT", "value": cmp("tags", "contains", "x")},
                                   cmp("assignee_id", "IN", ["$me"])]},
     {"assignee_id": 2, "tags": ["y"]}, 2, True),
]


def _case_id(case: tuple[dict[str, Any], dict[str, Any], int, bool]) -> str:
    raw, fields, me, expected = case
    text = msgspec.json.encode(raw).decode()
    return f"{text} on {msgspec.json.encode(fields).decode()} me={me} -> {expected}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_predicate(case: tuple[dict[str, Any], dict[str, Any], int, bool]) -> None:
    raw, fields, me, expected = case
    assert evaluate(raw, image(**fields), me) is expected


def test_every_operator_has_a_case() -> None:
    """The table above covers every operator on every kind of field."""
    def leaves(node: Node) -> list[Comparison]:
        if isinstance(node, Comparison):
            return [node]
        children = (node.child,) if isinstance(node, Not) else node.children
        return [leaf for child in children for leaf in leaves(child)]

    seen = {(leaf.kind, leaf.op) for raw, *_ in CASES for leaf in leaves(parse_filter(raw))}
    wanted = {(kind, op) for kind, ops in OPS_BY_KIND.items() for op in ops}
    assert wanted - seen == set()
    # ... with both outcomes for each operator
    outcomes: dict[str, set[bool]] = {}
    for raw, _, _, expected in CASES:
        if "field" in raw:
            outcomes.setdefault(raw["operator"], set()).add(expected)
    assert {op for op, seen_ in outcomes.items() if seen_ != {True, False}} == set()


@given(filters(), images())
def test_negative_operators_are_exact_negations(raw: dict[str, Any], img: Image) -> None:
    """``a != b`` ≡ ``NOT a = b`` for every comparison, so nulls and types cannot leak."""
    def flip(node: Any) -> Any:
        if "field" in node and node["operator"] in NEGATIONS:
            positive = {**node, "operator": NEGATIONS[node["operator"]]}
            return {"operator": "NOT", "value": positive}
        if node["operator"] in ("AND", "OR"):
            return {**node, "value": [flip(c) for c in node["value"]]}
        if node["operator"] == "NOT":
            child = node["value"][0] if isinstance(node["value"], list) else node["value"]
            return {"operator": "NOT", "value": flip(child)}
        return node

    original = compile_predicate(parse_filter(raw))
    flipped = compile_predicate(parse_filter(flip(raw)))
    uses_me = "$me" in msgspec.json.encode(raw).decode()
    inverted = None if uses_me else compile_predicate(parse_filter({"operator": "NOT",
                                                                    "value": raw}))
    for me in (NOBODY, 1, 2, 3):
        assert original(img, me, NOW) is flipped(img, me, NOW)
        if inverted is not None:
            assert inverted(img, me, NOW) is not original(img, me, NOW)


@pytest.mark.parametrize("raw", [
    {"operator": "NOT", "value": cmp("assignee_id", "=", "$me")},
    cmp("assignee_id", "!=", "$me"),
    cmp("assignee_id", "NIN", ["$me"]),
    cmp("mentions", "not_contains", "$me"),
    cmp("team_id", "=", "$me"),
    cmp("assignee_id", "<", "$me"),
])
def test_me_where_it_is_not_allowed(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"\$me"):
        parse_filter(raw)

"""Filter validation: every malformed filter is refused with a message naming its path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livecount.exceptions import LimitExceeded, ValidationError
from livecount.filters.parse import MAX_CONDITIONS, MAX_DEPTH, MAX_IN_VALUES, parse_filter
from tests.strategies import filters


def eq(field: str, value: Any, op: str = "=") -> dict[str, Any]:
    return {"field": field, "operator": op, "value": value}


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = eq("state", "open")
    for _ in range(depth - 1):
        node = {"operator": "AND", "value": [node]}
    return node


OPEN = eq("state", "open")

#: (filter, the path the message must start with, a fragment the message must contain)
MALFORMED: list[tuple[Any, str, str]] = [
    (None, "filter", "expected a filter object, got null"),
    ([OPEN], "filter", "got array"),
    ("state = open", "filter", "got string"),
    ({}, "filter", "missing 'operator'"),
    ({"operator": "XOR", "value": [OPEN]}, "operator", "'XOR' is not an operator"),
    ({"operator": 7, "value": [OPEN]}, "operator", "number is not an operator"),
    ({"operator": "and", "value": [OPEN]}, "operator", "'and' is not an operator"),
    ({"operator": "AND"}, "filter", "AND needs a 'value'"),
    ({"operator": "AND", "value": []}, "value", "at least one sub-filter"),
    ({"operator": "OR", "value": OPEN}, "value", "expects an array of filters"),
    ({"operator": "AND", "value": [OPEN], "extra": 1}, "filter", "unexpected key 'extra'"),
    ({"operator": "NOT", "value": [OPEN, OPEN]}, "value", "exactly one sub-filter"),
    ({"operator": "AND", "value": [OPEN, {"operator": "OR", "value": [
        {"field": "state", "operator": "between", "value": 1}]}]},
     "value[1].value[0].operator", "'between' is not an operator; expected one of"),
    ({"operator": "AND", "value": [OPEN, 5]}, "value[1]", "expected a filter object"),
    ({"field": "subject", "operator": "=", "value": "x"}, "field", "'subject' is not a field"),
    ({"field": 3, "operator": "=", "value": "x"}, "field", "expected a field name string"),
    ({"operator": "=", "value": "x"}, "filter", "missing 'field'"),
    ({"field": "state", "operator": "="}, "filter", "'=' needs a 'value'"),
    (eq("state", "pending"), "value", "'pending' is not a state"),
    (eq("state", 1), "value", "expected a string"),
    (eq("team_id", "7"), "value", "expected a team id"),
    (eq("assignee_id", True), "value", "expected a teammate id"),
    (eq("priority", "yes"), "value", "expected true or false"),
    (eq("priority", None), "value", "use 'is null'"),
    (eq("created_at", "yesterday"), "value", "not an ISO 8601 timestamp"),
    (eq("created_at", 1700000000), "value", "expected an ISO 8601 timestamp string"),
    (eq("waiting_since", "1 hour", "older_than"), "value", "expected a number of seconds"),
    (eq("waiting_since", -5, "older_than"), "value", "seconds must lie between"),
    (eq("channel", 60, "older_than"), "operator", "'older_than' does not apply"),
    (eq("tags", "vip"), "operator", "'=' does not apply to tags field 'tags'"),
    (eq("state", "open", "contains"), "operator", "'contains' does not apply"),
    (eq("priority", True, "<"), "operator", "'<' does not apply"),
    (eq("team_id", 3, "~"), "operator", "'~' does not apply"),
    (eq("team_id", [], "IN"), "value", "non-empty array"),
    (eq("team_id", 3, "IN"), "value", "'IN' expects an array"),
    (eq("team_id", [1, "2"], "IN"), "value[1]", "expected a team id"),
    ({"field": "assignee_id", "operator": "is null", "value": None}, "filter",
     "'is null' takes no value"),
    (eq("channel", "$me"), "value", "$me is only allowed on teammate fields"),
    (eq("assignee_id", "$me", "!="), "value", "$me is not allowed with '!='"),
    (eq("mentions", "$me", "not_contains"), "value", "$me is not allowed with 'not_contains'"),
    (eq("assignee_id", ["$me"], "NIN"), "value", "$me is not allowed with 'NIN'"),
    ({"operator": "NOT", "value": eq("assignee_id", "$me")}, "value.value",
     "$me is not allowed under NOT"),
    ({"operator": "NOT", "value": {"operator": "OR", "value": [
        OPEN, eq("mentions", "$me", "contains")]}}, "value.value[1].value",
     "$me is not allowed under NOT"),
    (eq("custom.plan!", "x"), "field", "custom keys use only ASCII letters"),
    (eq("custom.", "x"), "field", "custom keys have 1 to 64 characters"),
    (eq("custom.seats", True, ">="), "value", "booleans have no order"),
    (eq("custom.plan", 5, "~"), "value", "expected a string"),
    (eq("custom.plan", {"a": 1}), "value", "expected a string, number or boolean"),
    (eq("custom.score", float("inf")), "value", "numbers must be finite"),
    (eq("channel", "a\x00b"), "value", "NUL"),
    (eq("channel", "x" * 1001), "value", "longer than 1000"),
]

LIMITS: list[tuple[Any, str, str]] = [
    (nested(MAX_DEPTH + 1), "value[0]" + ".value[0]" * (MAX_DEPTH - 1),
     f"nesting deeper than {MAX_DEPTH} levels"),
    ({"operator": "AND", "value": [OPEN] * (MAX_CONDITIONS + 1)}, f"value[{MAX_CONDITIONS}]",
     f"more than {MAX_CONDITIONS} conditions"),
    ({"operator": "OR", "value": [eq("team_id", list(range(1, 600)), "IN")] * 2},
     "value[1].value", f"more than {MAX_IN_VALUES} values"),
]


def test_enough_cases() -> None:
    assert len(MALFORMED) + len(LIMITS) >= 30


@pytest.mark.parametrize(("raw", "path", "fragment"), MALFORMED)
def test_malformed_filter_names_its_path(raw: Any, path: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_filter(raw)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(("raw", "path", "fragment"), LIMITS)
def test_limits_say_which(raw: Any, path: str, fragment: str) -> None:
    with pytest.raises(LimitExceeded) as caught:
        parse_filter(raw)
    assert caught.value.path == path
    assert fragment in str(caught.value)


def test_limits_are_inclusive() -> None:
    parse_filter(nested(MAX_DEPTH))
    parse_filter({"operator": "AND", "value": [OPEN] * MAX_CONDITIONS})
    parse_filter(eq("team_id", list(range(1, MAX_IN_VALUES + 1)), "IN"))


def test_deep_json_is_refused_not_crashed() -> None:
    deep: Any = OPEN
    for _ in range(5000):
        deep = {"operator": "NOT", "value": deep}
    with pytest.raises(LimitExceeded):
        parse_filter(deep)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["AND", "OR", "NOT", "=", "IN", "contains", "state", "tags", "$me",
                       "custom.plan", "open", "is null", "older_than"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["operator", "value", "field", "x"]), children,
                      max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_any_json_parses_or_raises_validation_error(raw: Any) -> None:
    """Nothing but ValidationError ever escapes, whatever the JSON."""
    try:
        parse_filter(raw)
    except ValidationError as error:
        assert error.path and str(error).startswith(error.path)


@given(filters())
def test_generated_filters_are_valid(raw: dict[str, Any]) -> None:
    parse_filter(raw)

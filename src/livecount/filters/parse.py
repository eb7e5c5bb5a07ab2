"""JSON filter → validated tree. Every error names the exact path of the offending part."""

from __future__ import annotations

from typing import Any, Final

from ..domain import (
    FIELDS,
    MAX_SAFE_INTEGER,
    STATES,
    FieldKind,
    canonical_custom,
    check_text,
    custom_key_error,
    parse_timestamp,
    type_name,
)
from ..exceptions import LimitExceeded, ValidationError
from .tree import NEGATIONS, NULL_OPERATORS, TIME_OPERATORS, And, Comparison, Node, Not, Or

__all__ = ["MAX_CONDITIONS", "MAX_DEPTH", "MAX_IN_VALUES", "OPERATORS", "parse_filter"]

MAX_DEPTH: Final = 8
MAX_CONDITIONS: Final = 100
MAX_IN_VALUES: Final = 1000
ME: Final = "$me"

COMPOSITES: Final = ("AND", "OR", "NOT")
_SCALAR: Final = ("=", "!=", "IN", "NIN")
_ORDER: Final = ("<", "<=", ">", ">=")
_TEXT: Final = ("~", "!~", "^", "$")
_NULL: Final = ("is null", "is not null")
_SET: Final = ("contains", "not_contains")
OPS_BY_KIND: Final[dict[FieldKind, tuple[str, ...]]] = {
    FieldKind.STRING: _SCALAR + _ORDER + _TEXT + _NULL,
    FieldKind.TEAMMATE: _SCALAR + _ORDER + _NULL,
    FieldKind.TEAM: _SCALAR + _ORDER + _NULL,
    FieldKind.BOOL: _SCALAR + _NULL,
    FieldKind.TIMESTAMP: _SCALAR + _ORDER + _NULL + ("older_than", "newer_than"),
    FieldKind.TAGS: _SET + _NULL,
    FieldKind.TEAMMATES: _SET + _NULL,
    FieldKind.CUSTOM: _SCALAR + _ORDER + _TEXT + _NULL,
}
OPERATORS: Final = (*COMPOSITES, *_SCALAR, *_ORDER, *_SET, *_TEXT, *_NULL,
                    "older_than", "newer_than")
_MAX_SPAN_SECONDS: Final = 100 * 366 * 86_400
_ME_FIELDS: Final = ", ".join(n for n, f in FIELDS.items() if f.kind.accepts_me)


def parse_filter(raw: Any) -> Node:
    """Validate a filter (already JSON-decoded) and return its tree.

    Raises :class:`ValidationError` (or its subclass :class:`LimitExceeded`) and nothing else.
    """
    parser = _Parser()
    return parser.node(raw, "", depth=1, negated=False)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Parser:
    def __init__(self) -> None:
        self.conditions = 0
        self.in_values = 0

    def node(self, raw: Any, path: str, *, depth: int, negated: bool) -> Node:
        where = path or "filter"
        if depth > MAX_DEPTH:
            raise LimitExceeded(f"nesting deeper than {MAX_DEPTH} levels", where)
        if not isinstance(raw, dict):
            raise ValidationError(f"expected a filter object, got {type_name(raw)}", where)
        if "operator" not in raw:
            raise ValidationError("missing 'operator'", where)
        op = raw["operator"]
        if not isinstance(op, str) or op not in OPERATORS:
            shown = repr(op) if isinstance(op, str) else type_name(op)
            raise ValidationError(
                f"{shown[:60]} is not an operator; expected one of {', '.join(OPERATORS)}",
                _join(path, "operator"),
            )
        if op in COMPOSITES:
            return self.composite(raw, op, path, depth=depth, negated=negated)
        return self.comparison(raw, op, path, negated=negated)

    def composite(self, raw: dict[str, Any], op: str, path: str, *, depth: int,
                  negated: bool) -> Node:
        _only_keys(raw, ("operator", "value"), path)
        if "value" not in raw:
            raise ValidationError(f"{op} needs a 'value'", path or "filter")
        value = raw["value"]
        vpath = _join(path, "value")
        if op == "NOT":
            if isinstance(value, list):
                if len(value) != 1:
                    raise ValidationError("NOT takes exactly one sub-filter", vpath)
                return Not(self.node(value[0], f"{vpath}[0]", depth=depth + 1, negated=True))
            return Not(self.node(value, vpath, depth=depth + 1, negated=True))
        if not isinstance(value, list):
            raise ValidationError(f"{op} expects an array of filters, got {type_name(value)}",
                                  vpath)
        if not value:
            raise ValidationError(f"{op} needs at least one sub-filter", vpath)
        children = tuple(
            self.node(child, f"{vpath}[{i}]", depth=depth + 1, negated=negated)
            for i, child in enumerate(value)
        )
        return And(children) if op == "AND" else Or(children)

    def comparison(self, raw: dict[str, Any], op: str, path: str, *, negated: bool) -> Node:
        where = path or "filter"
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise LimitExceeded(f"more than {MAX_CONDITIONS} conditions in one filter", where)
        null_test = op in NULL_OPERATORS
        _only_keys(raw, ("field", "operator") if null_test else ("field", "operator", "value"),
                   path, hint=f"'{op}' takes no value" if null_test else "")
        if "field" not in raw:
            raise ValidationError("missing 'field'", where)
        name = raw["field"]
        fpath = _join(path, "field")
        kind = _field_kind(name, fpath)
        allowed = OPS_BY_KIND[kind]
        if op not in allowed:
            raise ValidationError(
                f"'{op}' does not apply to {kind.value} field '{name}'; "
                f"expected one of {', '.join(allowed)}",
                _join(path, "operator"),
            )
        if null_test:
            return Comparison(name, kind, op)
        if "value" not in raw:
            raise ValidationError(f"'{op}' needs a 'value'", where)
        vpath = _join(path, "value")
        value = raw["value"]
        if _mentions_me(value):
            self._check_me(kind, name, op, negated, vpath)
        if op in ("IN", "NIN"):
            return self.in_list(name, kind, op, value, vpath)
        if value == ME and not isinstance(value, bool):
            return Comparison(name, kind, op, None, me=True)
        if op in TIME_OPERATORS:
            return Comparison(name, kind, op, _span(value, vpath))
        return Comparison(name, kind, op, _scalar(name, kind, op, value, vpath))

    def in_list(self, name: str, kind: FieldKind, op: str, value: Any, vpath: str) -> Node:
        if not isinstance(value, list):
            raise ValidationError(f"'{op}' expects an array, got {type_name(value)}", vpath)
        if not value:
            raise ValidationError(f"'{op}' needs a non-empty array", vpath)
        self.in_values += len(value)
        if self.in_values > MAX_IN_VALUES:
            raise LimitExceeded(f"more than {MAX_IN_VALUES} values in IN/NIN lists", vpath)
        me = False
        items: list[Any] = []
        for i, item in enumerate(value):
            if isinstance(item, str) and item == ME:
                me = True
                continue
            items.append(_scalar(name, kind, op, item, f"{vpath}[{i}]"))
        return Comparison(name, kind, op, tuple(dict.fromkeys(items)), me=me)

    @staticmethod
    def _check_me(kind: FieldKind, name: str, op: str, negated: bool, vpath: str) -> None:
        if not kind.accepts_me:
            raise ValidationError(
                f"$me is only allowed on teammate fields ({_ME_FIELDS}), not '{name}'", vpath)
        if op in NEGATIONS:
            raise ValidationError(f"$me is not allowed with '{op}'; use '{NEGATIONS[op]}' "
                                  "or a filter without $me", vpath)
        if op not in ("=", "IN", "contains"):
            raise ValidationError(f"$me is only allowed with '=', 'IN' or 'contains', "
                                  f"not '{op}'", vpath)
        if negated:
            raise ValidationError("$me is not allowed under NOT", vpath)


def _only_keys(raw: dict[str, Any], keys: tuple[str, ...], path: str, hint: str = "") -> None:
    for key in raw:
        if key not in keys:
            shown = repr(key)[:60]
            extra = f" ({hint})" if hint and key == "value" else ""
            raise ValidationError(f"unexpected key {shown}{extra}; expected {', '.join(keys)}",
                                  path or "filter")


def _field_kind(name: Any, path: str) -> FieldKind:
    if not isinstance(name, str):
        raise ValidationError(f"expected a field name string, got {type_name(name)}", path)
    if name.startswith("custom."):
        problem = custom_key_error(name[7:])
        if problem:
            raise ValidationError(f"{name[:80]!r}: {problem}", path)
        return FieldKind.CUSTOM
    field = FIELDS.get(name)
    if field is None:
        raise ValidationError(
            f"{name[:60]!r} is not a field; expected one of {', '.join(FIELDS)} or custom.<key>",
            path)
    return field.kind


def _mentions_me(value: Any) -> bool:
    if isinstance(value, str):
        return value == ME
    return isinstance(value, list) and any(isinstance(v, str) and v == ME for v in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _span(value: Any, path: str) -> int:
    if not _is_number(value):
        raise ValidationError(f"expected a number of seconds, got {type_name(value)}", path)
    if not 0 <= value <= _MAX_SPAN_SECONDS:
        raise ValidationError(f"seconds must lie between 0 and {_MAX_SPAN_SECONDS}", path)
    span: int = round(value * 1_000_000)
    return span


def _scalar(name: str, kind: FieldKind, op: str, value: Any, path: str) -> Any:
    """Check one comparison value against the field's type and make it canonical."""
    if value is None:
        raise ValidationError("null is not a value to compare with; use 'is null'", path)
    match kind:
        case FieldKind.STRING:
            text = check_text(value, path)
            if op in ("=", "!=", "IN", "NIN") and name == "state" and text not in STATES:
                raise ValidationError(
                    f"{text[:60]!r} is not a state; expected one of {', '.join(STATES)}", path)
            return text
        case FieldKind.TEAMMATE | FieldKind.TEAM | FieldKind.TEAMMATES:
            if not isinstance(value, int) or isinstance(value, bool):
                what = "a teammate" if kind is not FieldKind.TEAM else "a team"
                extra = " or \"$me\"" if kind.accepts_me else ""
                raise ValidationError(f"expected {what} id (integer){extra}, "
                                      f"got {type_name(value)}", path)
            if abs(value) > MAX_SAFE_INTEGER:
                raise ValidationError("id out of range", path)
            return value
        case FieldKind.BOOL:
            if not isinstance(value, bool):
                raise ValidationError(f"expected true or false, got {type_name(value)}", path)
            return value
        case FieldKind.TIMESTAMP:
            return parse_timestamp(value, path)
        case FieldKind.TAGS:
            return check_text(value, path)
        case FieldKind.CUSTOM:
            if op in ("~", "!~", "^", "$"):
                return check_text(value, path)
            if op in ("<", "<=", ">", ">=") and isinstance(value, bool):
                raise ValidationError(f"'{op}' needs a string or a number; booleans have no "
                                      "order", path)
            return canonical_custom(value, path)
    raise AssertionError(kind)

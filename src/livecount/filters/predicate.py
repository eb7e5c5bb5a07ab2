"""Filter tree → a Python function ``(image, me, now) -> bool``.

The tree is turned into the source of one function and compiled once, so evaluating a view
costs a single call with no tree walking: the engine's hot path. Every value from the filter
is bound as a constant in the function's globals (never spliced into the source), so the
generated code holds only our own identifiers and operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..domain import CustomValue, FieldKind, Image, lower
from .tree import NEGATIONS, And, Comparison, Node, Not, Or

__all__ = ["Predicate", "compile_predicate", "custom_tag"]

#: ``(image, me, now) -> bool``; ``me`` is the viewing teammate (``NOBODY`` for none),
#: ``now`` the time in microseconds.
Predicate = Callable[[Image, int, int], bool]

_NUM = frozenset({int, float})


def custom_tag(value: CustomValue | None) -> tuple[str, CustomValue] | None:
    """A custom value with its type, so ``1``, ``"1"`` and ``true`` never compare equal."""
    if value is None:
        return None
    if value.__class__ is bool:
        return ("b", value)
    if value.__class__ is str:
        return ("s", value)
    return ("n", value)


def compile_predicate(node: Node) -> Predicate:
    """Compile ``node`` into one Python function."""
    gen = _Codegen()
    body = gen.expr(node)
    source = f"def _predicate(c, me, now):\n    return {body}\n"
    namespace: dict[str, Any] = {"_lower": lower, "_tag": custom_tag, "_NUM": _NUM, **gen.consts}
    exec(compile(source, "<livecount filter>", "exec"), namespace)
    predicate: Predicate = namespace["_predicate"]
    predicate.__doc__ = source
    return predicate


class _Codegen:
    def __init__(self) -> None:
        self.consts: dict[str, Any] = {}
        self.temps = 0

    def const(self, value: Any) -> str:
        name = f"_k{len(self.consts)}"
        self.consts[name] = value
        return name

    def expr(self, node: Node) -> str:
        match node:
            case And(children):
                return "(" + " and ".join(self.expr(c) for c in children) + ")"
            case Or(children):
                return "(" + " or ".join(self.expr(c) for c in children) + ")"
            case Not(child):
                return f"(not {self.expr(child)})"
            case Comparison(op=op) if op in NEGATIONS:
                positive = Comparison(node.field, node.kind, NEGATIONS[op], node.value, node.me)
                return f"(not {self.expr(positive)})"
            case Comparison(kind=FieldKind.CUSTOM):
                return self.custom(node)
            case Comparison():
                return self.fixed(node)
        raise AssertionError(node)

    def fixed(self, node: Comparison) -> str:
        """A comparison on one of the conversation's own fields."""
        attr = f"c.{node.field}"  # field names come from domain.FIELDS, never from input
        op, value = node.op, node.value
        if op == "is null":
            return f"(not {attr})" if node.kind.multi else f"({attr} is None)"
        if op == "contains":
            return f"(me in {attr})" if node.me else f"({self.const(value)} in {attr})"
        if op == "=":
            return f"({attr} == me)" if node.me else f"({attr} == {self.const(value)})"
        if op == "IN":
            test = f"({attr} in {self.const(frozenset(value))})"
            return f"({attr} == me or {test})" if node.me else test
        if op in ("<", "<=", ">", ">="):
            return f"({attr} is not None and {attr} {op} {self.const(value)})"
        if op in ("~", "^", "$"):
            return self.text(attr, op, value)
        if op == "older_than":
            return f"({attr} is not None and {attr} <= now - {self.const(value)})"
        if op == "newer_than":
            return f"({attr} is not None and {attr} > now - {self.const(value)})"
        raise AssertionError(node)

    def custom(self, node: Comparison) -> str:
        """A comparison on ``custom.<key>``: the stored value's type must fit the operator."""
        get = f"c.custom.get({self.const(node.custom_key)})"
        op, value = node.op, node.value
        if op == "is null":
            return f"({get} is None)"
        if op == "=":
            return f"(_tag({get}) == {self.const(custom_tag(value))})"
        if op == "IN":
            return f"(_tag({get}) in {self.const(frozenset(custom_tag(v) for v in value))})"
        self.temps += 1
        temp = f"_v{self.temps}"
        if op in ("<", "<=", ">", ">="):
            check = "in _NUM" if value.__class__ in _NUM else "is str"
            return f"(({temp} := {get}).__class__ {check} and {temp} {op} {self.const(value)})"
        if op in ("~", "^", "$"):
            return f"(({temp} := {get}).__class__ is str and {self.text(temp, op, value)})"
        raise AssertionError(node)

    def text(self, subject: str, op: str, value: str) -> str:
        needle = self.const(lower(value))
        if op == "~":
            return f"({needle} in _lower({subject}))"
        method = "startswith" if op == "^" else "endswith"
        return f"_lower({subject}).{method}({needle})"

"""The counter engine: compiled views, their index and the delta computation."""

from .engine import Delta, Engine
from .index import ViewIndex, necessary_condition
from .views import CompiledView, changed_fields, compile_view

__all__ = [
    "CompiledView",
    "Delta",
    "Engine",
    "ViewIndex",
    "changed_fields",
    "compile_view",
    "necessary_condition",
]

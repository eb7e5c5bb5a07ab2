"""Who sees which view, and the counts a teammate sees: one place for both rules.

A shared view (``owner_id`` None) is visible to everyone in the workspace; a personal view
only to its owner. The admin token sees the shared views, with ``$me`` as nobody. Counts are
stored decomposed (base + per-teammate adjustment, see :mod:`livecount.engine`); this module
composes them into what the API and the stream send: view id (as a string) → integer, or →
``{group value: integer}`` for grouped views.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .store.base import Counts, View

__all__ = ["Rendered", "render_counts", "render_keys", "view_to_wire", "visible_views"]

Rendered = dict[str, int | dict[str, int]]


def visible_views(views: Iterable[View], teammate: int | None) -> list[View]:
    return [v for v in views if v.owner_id is None or v.owner_id == teammate]


def render_counts(views: Iterable[View], counts: Counts, teammate: int | None) -> Rendered:
    """Every visible view's count as ``teammate`` sees it; grouped views omit empty groups."""
    wanted = {v.id: v for v in visible_views(views, teammate)}
    out: Rendered = {str(v.id): ({} if v.group_by else 0) for v in wanted.values()}
    for (vid, group, who), n in counts.items():
        if vid not in wanted or (who is not None and who != teammate):
            continue
        key = str(vid)
        if group is None:
            total = out[key]
            assert isinstance(total, int)
            out[key] = total + n
        else:
            groups = out[key]
            assert isinstance(groups, dict)
            groups[group] = groups.get(group, 0) + n
    for value in out.values():
        if isinstance(value, dict):
            for group in [g for g, n in value.items() if n == 0]:
                del value[group]
    return out


def render_keys(views: dict[int, View], counts: Counts, teammate: int | None,
                keys: Iterable[tuple[int, str | None]]) -> Rendered:
    """The current values of some (view, group) counters, for a delta: a grouped view lists
    only the given groups, a group that became empty as 0."""
    out: Rendered = {}
    for vid, group in keys:
        view = views.get(vid)
        if view is None or (view.owner_id is not None and view.owner_id != teammate):
            continue
        value = counts.get((vid, group, None), 0)
        if teammate is not None:
            value += counts.get((vid, group, teammate), 0)
        if group is None:
            out[str(vid)] = value
        else:
            groups = out.setdefault(str(vid), {})
            assert isinstance(groups, dict)
            groups[group] = value
    return out


def view_to_wire(view: View) -> dict[str, Any]:
    return {"id": view.id, "name": view.name, "filter": view.filter, "group_by": view.group_by,
            "owner_id": view.owner_id, "personal": view.owner_id is not None,
            "position": view.position, "version": view.version}

"""The folders every new workspace starts with (DESIGN §2), as data.

Folders are ordinary shared views written in the filter language, so the engine, the SQL
compilation and the API treat them exactly like a team's custom views.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

__all__ = ["FOLDERS", "Folder"]


class Folder(NamedTuple):
    name: str
    filter: dict[str, Any]
    group_by: str | None = None


def _open(*more: dict[str, Any]) -> dict[str, Any]:
    """``state = open``, AND-ed with ``more`` when there is more."""
    is_open = {"field": "state", "operator": "=", "value": "open"}
    if not more:
        return is_open
    return {"operator": "AND", "value": [is_open, *more]}


#: In sidebar order; a folder's index is its view position.
FOLDERS: Final[tuple[Folder, ...]] = (
    Folder("Your inbox", _open({"field": "assignee_id", "operator": "=", "value": "$me"})),
    Folder("Mentions", _open({"field": "mentions", "operator": "contains", "value": "$me"})),
    Folder("Created by you", _open({"field": "author_id", "operator": "=", "value": "$me"})),
    Folder("Unassigned", _open({"field": "assignee_id", "operator": "is null"})),
    Folder("All", _open()),
    Folder("Team inboxes", _open(), "team_id"),
    Folder("Teammates", _open(), "assignee_id"),
)

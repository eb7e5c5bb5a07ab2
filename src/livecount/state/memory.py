"""Counter state in this process's memory: the embedded default."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

from ..store.base import Counts, View
from .base import StateConflict, StateFenced, StateSnapshot, Update

__all__ = ["MemoryState"]


class _Workspace:
    __slots__ = ("counts", "fence", "position", "seq", "views")

    def __init__(self) -> None:
        self.counts: Counts = {}
        self.seq = 0
        self.position = 0
        self.views: list[View] = []
        self.fence = 0


class MemoryState:
    """Plain dictionaries. Each method runs without awaiting, so it is atomic on the loop.

    Nothing survives a restart (``load`` returns None): the relay rebuilds by recount, and
    the new process's state has a new epoch.
    """

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(6)
        self._workspaces: dict[int, _Workspace] = {}

    def _get(self, workspace_id: int) -> _Workspace:
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = self._workspaces[workspace_id] = _Workspace()
        return ws

    def _fenced(self, workspace_id: int, fence: int) -> _Workspace:
        ws = self._get(workspace_id)
        if fence < ws.fence:
            raise StateFenced(workspace_id, fence, ws.fence)
        ws.fence = fence
        return ws

    async def load(self, workspace_id: int) -> StateSnapshot | None:
        return None

    async def apply(self, workspace_id: int, deltas: Counts, position: int,
                    expect: int, *, fence: int = 0) -> Update:
        ws = self._fenced(workspace_id, fence)
        if ws.position != expect:
            if ws.position == position:
                return Update(self.epoch, ws.seq, {}, duplicate=True)
            raise StateConflict(workspace_id, ws.position, expect)
        counts = ws.counts
        changed: Counts = {}
        for key, delta in deltas.items():
            if not delta:
                continue
            value = counts.get(key, 0) + delta
            if value:
                counts[key] = value
            else:
                del counts[key]
            changed[key] = value
        ws.position = position
        return self._commit(ws, changed)

    async def replace(self, workspace_id: int, counts: Counts, position: int,
                      view_ids: Iterable[int] | None = None, *,
                      views: Sequence[View], fence: int = 0) -> Update:
        ws = self._fenced(workspace_id, fence)
        ws.views = list(views)
        scope = None if view_ids is None else set(view_ids)
        changed: Counts = {}
        for key in [k for k in ws.counts if scope is None or k[0] in scope]:
            if counts.get(key, 0) == 0:
                del ws.counts[key]
                changed[key] = 0
        for key, value in counts.items():
            if scope is not None and key[0] not in scope:
                continue
            if value and ws.counts.get(key) != value:
                ws.counts[key] = value
                changed[key] = value
        ws.position = position
        return self._commit(ws, changed, bump=True)

    async def assign(self, workspace_id: int, values: Counts, *, fence: int = 0) -> Update:
        ws = self._fenced(workspace_id, fence)
        changed: Counts = {}
        for key, value in values.items():
            if ws.counts.get(key, 0) == value:
                continue
            if value:
                ws.counts[key] = value
            else:
                del ws.counts[key]
            changed[key] = value
        return self._commit(ws, changed)

    async def position(self, workspace_id: int) -> int:
        ws = self._workspaces.get(workspace_id)
        return 0 if ws is None else ws.position

    async def snapshot(self, workspace_id: int) -> StateSnapshot:
        ws = self._get(workspace_id)
        return StateSnapshot(self.epoch, ws.seq, ws.position, dict(ws.counts), list(ws.views))

    def _commit(self, ws: _Workspace, changed: Counts, bump: bool = False) -> Update:
        if changed or bump:
            ws.seq += 1
        return Update(self.epoch, ws.seq, changed)

    async def close(self) -> None:
        self._workspaces.clear()

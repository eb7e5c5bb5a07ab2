"""Counter state in this process's memory: the embedded default."""

from __future__ import annotations

from collections.abc import Iterable

from ..store.base import Counts
from .base import StateSnapshot, Update

__all__ = ["MemoryState"]


class _Workspace:
    __slots__ = ("counts", "position", "seq")

    def __init__(self) -> None:
        self.counts: Counts = {}
        self.seq = 0
        self.position = 0


class MemoryState:
    """Plain dictionaries. Each method runs without awaiting, so it is atomic on the loop.

    Nothing survives a restart (``load`` returns None): the relay rebuilds by recount.
    """

    def __init__(self) -> None:
        self._workspaces: dict[int, _Workspace] = {}

    def _get(self, workspace_id: int) -> _Workspace:
        ws = self._workspaces.get(workspace_id)
        if ws is None:
            ws = self._workspaces[workspace_id] = _Workspace()
        return ws

    async def load(self, workspace_id: int) -> StateSnapshot | None:
        return None

    async def apply(self, workspace_id: int, deltas: Counts, position: int) -> Update:
        ws = self._get(workspace_id)
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
        return self._commit(ws, changed, position)

    async def replace(self, workspace_id: int, counts: Counts, position: int,
                      view_ids: Iterable[int] | None = None) -> Update:
        ws = self._get(workspace_id)
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
        return self._commit(ws, changed, position, bump=True)

    async def drop_views(self, workspace_id: int, view_ids: Iterable[int],
                         position: int) -> Update:
        return await self.replace(workspace_id, {}, position, view_ids)

    async def snapshot(self, workspace_id: int) -> StateSnapshot:
        ws = self._get(workspace_id)
        return StateSnapshot(ws.seq, ws.position, dict(ws.counts))

    @staticmethod
    def _commit(ws: _Workspace, changed: Counts, position: int, bump: bool = False) -> Update:
        ws.position = max(ws.position, position)
        if changed or bump:
            ws.seq += 1
        return Update(ws.seq, changed)

    async def close(self) -> None:
        self._workspaces.clear()

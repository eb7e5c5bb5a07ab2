"""Time without writes: the instants at which counts change because the clock moved.

Two schedules, each holding **at most one entry per conversation** (a write replaces the
conversation's entry at once, so memory is bounded by the conversations that have a pending
instant, whatever the write rate):

- **flips**: a view using ``older_than``/``newer_than`` can only change its mind about an
  image at ``image.<field> + span``; at that instant the image is re-evaluated for the
  time-dependent views (``Engine.clock_deltas``).
- **reopens**: a snoozed conversation reopens at ``snoozed_until``, which is a real write
  (state → open) so it reaches the outbox like any other change.

Reading what is due never removes it: the relay removes flips only once their deltas are
committed (``consume``), and reopens once their write has landed (``done``), so a failure in
between loses nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from .domain import Image

__all__ = ["DueFlip", "FlipSchedule", "KeyedHeap", "ReopenSchedule", "Timer"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Timer = tuple[int, str, int]  # (view id, timestamp field, span µs)
#: A conversation's flips due by some instant: (image, [(instant, view ids), ...]).
DueFlip = tuple[Image, list[tuple[int, frozenset[int]]]]


class KeyedHeap(Generic[K, V]):
    """A binary min-heap of (priority, key, value) with at most one entry per key: setting a
    key replaces its entry, removing it takes it out at once (O(log n) both)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, K, V]] = []
        self._where: dict[K, int] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, key: K) -> bool:
        return key in self._where

    def get(self, key: K) -> tuple[int, V] | None:
        i = self._where.get(key)
        if i is None:
            return None
        priority, _, value = self._heap[i]
        return priority, value

    def set(self, key: K, priority: int, value: V) -> None:
        i = self._where.get(key)
        if i is None:
            self._heap.append((priority, key, value))
            i = len(self._heap) - 1
            self._where[key] = i
        else:
            self._heap[i] = (priority, key, value)
        self._sift_down(i)
        self._sift_up(self._where[key])

    def remove(self, key: K) -> None:
        i = self._where.pop(key, None)
        if i is None:
            return
        last = self._heap.pop()
        if i < len(self._heap):
            self._heap[i] = last
            self._where[last[1]] = i
            self._sift_down(i)
            self._sift_up(self._where[last[1]])

    def peek(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, until: int) -> Iterator[tuple[int, K, V]]:
        """Entries with priority ≤ ``until`` (not in order), without removing them: a walk
        of the heap that skips every subtree whose root is later."""
        heap = self._heap
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            if i < len(heap) and heap[i][0] <= until:
                yield heap[i]
                stack.append(2 * i + 1)
                stack.append(2 * i + 2)

    def _less(self, i: int, j: int) -> bool:
        return self._heap[i][0] < self._heap[j][0]

    def _swap(self, i: int, j: int) -> None:
        heap = self._heap
        heap[i], heap[j] = heap[j], heap[i]
        self._where[heap[i][1]] = i
        self._where[heap[j][1]] = j

    def _sift_up(self, i: int) -> None:
        while i > 0:
            parent = (i - 1) // 2
            if not self._less(i, parent):
                return
            self._swap(i, parent)
            i = parent

    def _sift_down(self, i: int) -> None:
        n = len(self._heap)
        while True:
            smallest = i
            for child in (2 * i + 1, 2 * i + 2):
                if child < n and self._less(child, smallest):
                    smallest = child
            if smallest == i:
                return
            self._swap(i, smallest)
            i = smallest


def _instants(image: Image, timers: Iterable[Timer], after: int) -> dict[int, set[int]]:
    instants: dict[int, set[int]] = {}
    for view_id, name, span in timers:
        stamp = getattr(image, name)
        if stamp is not None and stamp + span > after:
            instants.setdefault(stamp + span, set()).add(view_id)
    return instants


class FlipSchedule:
    """Pending membership flips of one workspace: per conversation, its current image and
    the instants (with the views each concerns) still ahead of the counts."""

    def __init__(self) -> None:
        self._heap: KeyedHeap[int, tuple[Image, list[tuple[int, frozenset[int]]]]] = (
            KeyedHeap())

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, conversation_id: int) -> bool:
        return conversation_id in self._heap

    def watch(self, image: Image, timers: Iterable[Timer], now: int) -> None:
        """``image`` is the conversation's new current version: its instants after ``now``
        replace whatever was scheduled for the conversation."""
        instants = _instants(image, timers, now)
        if not instants:
            self._heap.remove(image.id)
            return
        entries = sorted((i, frozenset(v)) for i, v in instants.items())
        self._heap.set(image.id, entries[0][0], (image, entries))

    def extend(self, image: Image, timers: Iterable[Timer], after: int) -> None:
        """Add the instants after ``after`` of some (newly installed) views for ``image``,
        the conversation's current version, keeping those already scheduled."""
        instants = _instants(image, timers, after)
        if not instants:
            return
        known = self._heap.get(image.id)
        if known is not None:
            for instant, views in known[1][1]:
                instants.setdefault(instant, set()).update(views)
        entries = sorted((i, frozenset(v)) for i, v in instants.items())
        self._heap.set(image.id, entries[0][0], (image, entries))

    def forget(self, conversation_id: int) -> None:
        self._heap.remove(conversation_id)

    def next_instant(self) -> int | None:
        return self._heap.peek()

    def due(self, now: int) -> list[DueFlip]:
        """Every conversation with flips due by ``now`` and those flips, in instant order.
        Nothing is removed: see :meth:`consume`."""
        out = []
        for _, _, (image, entries) in self._heap.due(now):
            out.append((image, [e for e in entries if e[0] <= now]))
        return out

    def consume(self, image: Image, now: int) -> None:
        """The flips of ``image`` due by ``now`` are committed: drop them (if the entry is
        still for this version)."""
        known = self._heap.get(image.id)
        if known is None or known[1][0].version != image.version:
            return
        rest = [e for e in known[1][1] if e[0] > now]
        if rest:
            self._heap.set(image.id, rest[0][0], (image, rest))
        else:
            self._heap.remove(image.id)


class ReopenSchedule:
    """Snoozed conversations waiting for their ``snoozed_until``, over all workspaces: one
    entry per conversation, for its current version."""

    def __init__(self) -> None:
        self._heap: KeyedHeap[tuple[int, int], int] = KeyedHeap()

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, image: Image) -> None:
        """``image`` is the conversation's new current version."""
        key = (image.workspace_id, image.id)
        if image.state == "snoozed" and image.snoozed_until is not None:
            self._heap.set(key, image.snoozed_until, image.version)
        else:
            self._heap.remove(key)

    def forget(self, workspace_id: int, conversation_id: int) -> None:
        self._heap.remove((workspace_id, conversation_id))

    def forget_workspace(self, workspace_id: int) -> None:
        for key in [k for k in self._heap._where if k[0] == workspace_id]:
            self._heap.remove(key)

    def next_instant(self) -> int | None:
        return self._heap.peek()

    def due(self, now: int, limit: int) -> list[tuple[int, int, int]]:
        """Up to ``limit`` (workspace, conversation, version) due by ``now``, not removed."""
        out = []
        for _, key, version in self._heap.due(now):
            out.append((key[0], key[1], version))
            if len(out) >= limit:
                break
        return out

    def done(self, workspace_id: int, conversation_id: int, version: int) -> None:
        """The reopen of that version was written (or refused because a newer version
        exists): drop it, unless a newer version replaced it meanwhile."""
        key = (workspace_id, conversation_id)
        known = self._heap.get(key)
        if known is not None and known[1] == version:
            self._heap.remove(key)

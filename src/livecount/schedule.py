"""Time without writes: the instants at which counts change because the clock moved.

Two kinds of instants, each kept in a heap so the relay sleeps exactly until the next one
(a timer per pending flip, never a periodic scan):

- **flips**: a view using ``older_than``/``newer_than`` can only change its mind about an
  image at ``image.<field> + span``; at that instant the image is re-evaluated for the
  time-dependent views (``Engine.clock_deltas``).
- **reopens**: a snoozed conversation reopens at ``snoozed_until``, which is a real write
  (state → open) so it reaches the outbox like any other change.

Entries name the version they were scheduled for; one that a newer version superseded is
skipped when it comes due, and the heap is compacted when such stale entries pile up, so the
memory stays proportional to the pending instants of current versions.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator

from .domain import Image

__all__ = ["FlipSchedule", "ReopenSchedule", "Timer"]

_order = itertools.count()


Timer = tuple[int, str, int]  # (view id, timestamp field, span µs)


class FlipSchedule:
    """Pending membership flips of one workspace's conversations.

    An entry names the views it concerns, so a view installed later can schedule the flips
    of existing conversations without making other views re-evaluate an instant they have
    already passed; entries for the same (conversation, version, instant) are merged.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Image, frozenset[int]]] = []
        self._compacted_at = 64

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, image: Image, timers: Iterable[Timer], now: int) -> None:
        """Schedule the instants after ``now`` at which ``image`` may flip, per view."""
        instants: dict[int, set[int]] = {}
        for view_id, name, span in timers:
            stamp = getattr(image, name)
            if stamp is not None and stamp + span > now:
                instants.setdefault(stamp + span, set()).add(view_id)
        for instant, views in instants.items():
            heapq.heappush(self._heap, (instant, next(_order), image, frozenset(views)))

    def next_instant(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: int, current: Callable[[int], int]
            ) -> Iterator[tuple[int, Image, frozenset[int]]]:
        """Pop the flips due by ``now`` whose image is still the current version, in instant
        order, merged per (conversation, instant)."""
        heap = self._heap
        merged: dict[tuple[int, int, int], tuple[Image, set[int]]] = {}
        while heap and heap[0][0] <= now:
            instant, _, image, views = heapq.heappop(heap)
            if current(image.id) != image.version:
                continue
            key = (instant, image.id, image.version)
            if key in merged:
                merged[key][1].update(views)
            else:
                merged[key] = (image, set(views))
        for (instant, _, _), (image, view_set) in merged.items():
            yield instant, image, frozenset(view_set)

    def compact(self, current: Callable[[int], int]) -> None:
        """Drop superseded entries once the heap has doubled since the last compaction."""
        if len(self._heap) < 2 * self._compacted_at:
            return
        self._heap = [e for e in self._heap if current(e[2].id) == e[2].version]
        heapq.heapify(self._heap)
        self._compacted_at = max(64, len(self._heap))


class ReopenSchedule:
    """Snoozed conversations waiting for their ``snoozed_until``, over all workspaces."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, int, int]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, image: Image) -> None:
        if image.state == "snoozed" and image.snoozed_until is not None:
            heapq.heappush(self._heap, (image.snoozed_until, next(_order), image.workspace_id,
                                        image.id, image.version))

    def next_instant(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: int) -> list[tuple[int, int, int]]:
        """(workspace, conversation, version) of every reopen due by ``now``."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, workspace_id, conversation_id, version = heapq.heappop(self._heap)
            out.append((workspace_id, conversation_id, version))
        return out

"""How much memory this process may use, and the watermarks that act on it.

The limit is the one the process really has: the cgroup v2 ``memory.max`` of its own cgroup
(or an ancestor's, the smallest), else the cgroup v1 ``memory.limit_in_bytes``, else the
host's physical memory. A container without a limit reports the host.

Watermarks (DESIGN §4, §5):

- **soft**: ``/readyz`` answers 503, so the load balancer sends new work elsewhere while the
  process finishes what it has;
- **hard**: the worker is recycled: stop accepting, tell stream clients to reconnect, drain,
  exit (under ``livecount serve --workers N`` the replacement starts first).

Both are given as bytes (``"1.5GiB"``, ``"800M"``, ``"1073741824"``) or as a percentage of the
process's *share* of the limit (the limit divided by the number of worker processes):
defaults :data:`DEFAULT_SOFT` and :data:`DEFAULT_HARD`; environment variables
``LIVECOUNT_SOFT_MEMORY`` / ``LIVECOUNT_HARD_MEMORY`` stand in for the flags.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

__all__ = [
    "DEFAULT_HARD",
    "DEFAULT_SOFT",
    "MemoryLimit",
    "MemoryState",
    "Watermarks",
    "memory_limit",
    "parse_size",
    "resolve_watermarks",
]

#: Default soft watermark: this share of the process's part of the limit.
DEFAULT_SOFT: Final = "70%"
#: Default hard watermark.
DEFAULT_HARD: Final = "85%"
#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything at or
#: above this is no limit.
_V1_UNLIMITED: Final = 1 << 60

_UNITS: Final = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30,
    "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40,
}
_SIZE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*")
_PERCENT: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*%\s*")


@dataclass(frozen=True)
class MemoryLimit:
    """``bytes`` the process (with its cgroup) may use, and where that figure came from:
    ``"cgroup v2 <path>"``, ``"cgroup v1 <path>"`` or ``"host memory"``."""

    bytes: int
    source: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and cgroup v1 memory-controller path (from
    ``/proc/self/cgroup``)."""
    v2 = v1 = None
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root/path`` and each of its parents up to ``root`` (a limit anywhere above applies)."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def memory_limit(cgroup_root: str | Path = "/sys/fs/cgroup",
                 proc_cgroup: str | Path = "/proc/self/cgroup") -> MemoryLimit:
    """The memory limit of this process: the smallest cgroup limit that applies, else the
    host's memory. The paths are parameters for the tests (fake cgroup trees)."""
    root, proc = Path(cgroup_root), Path(proc_cgroup)
    host = int(psutil.virtual_memory().total)
    v2_path, v1_path = _own_cgroups(proc)
    found: list[MemoryLimit] = []
    # cgroup v2: the unified hierarchy mounted at the root (or at root/unified in hybrid mode)
    for base in (root, root / "unified"):
        if not (base / "cgroup.controllers").exists():
            continue
        for directory in _ancestors(base, v2_path or "/"):
            value = _read(directory / "memory.max")
            if value is not None and value != "max" and value.isdigit():
                found.append(MemoryLimit(int(value), f"cgroup v2 {directory / 'memory.max'}"))
        break
    # cgroup v1: the memory controller's hierarchy; inside a container its root is usually
    # the container's own cgroup, so the root itself is checked too
    memory_root = root / "memory"
    if memory_root.is_dir():
        for directory in {*_ancestors(memory_root, v1_path or "/"), memory_root}:
            value = _read(directory / "memory.limit_in_bytes")
            if value is not None and value.isdigit() and int(value) < _V1_UNLIMITED:
                found.append(MemoryLimit(int(value),
                                         f"cgroup v1 {directory / 'memory.limit_in_bytes'}"))
    found = [f for f in found if 0 < f.bytes < host]
    if found:
        return min(found, key=lambda f: f.bytes)
    return MemoryLimit(host, "host memory")


def parse_size(text: str, of: int | None = None) -> int:
    """Bytes from ``"512MiB"``, ``"1.5G"``, ``"1073741824"``, or ``"70%"`` of ``of``.
    Raises :class:`ValueError` with a message that says what is expected."""
    percent = _PERCENT.fullmatch(text)
    if percent:
        if of is None:
            raise ValueError(f"{text!r}: a percentage needs a limit to be relative to")
        value = float(percent.group(1))
        if not 0 < value <= 100:
            raise ValueError(f"{text!r}: expected a percentage above 0 and at most 100")
        return int(of * value / 100)
    size = _SIZE.fullmatch(text)
    unit = size.group(2).lower() if size else ""
    if size is None or unit not in _UNITS:
        raise ValueError(f"{text!r}: expected bytes with an optional unit (512MiB, 1.5G, "
                         "1073741824) or a percentage of the memory limit (70%)")
    value = int(float(size.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r}: expected more than 0 bytes")
    return value


class MemoryState(enum.IntEnum):
    """Where a process's resident memory stands (the value of the
    ``livecount_memory_watermark_state`` gauge)."""

    OK = 0
    SOFT = 1  # not ready
    HARD = 2  # to be recycled


@dataclass(frozen=True)
class Watermarks:
    soft: int
    hard: int
    limit: MemoryLimit

    def state(self, rss: int) -> MemoryState:
        if rss > self.hard:
            return MemoryState.HARD
        if rss > self.soft:
            return MemoryState.SOFT
        return MemoryState.OK


def resolve_watermarks(soft: str | None = None, hard: str | None = None, *, workers: int = 1,
                       limit: MemoryLimit | None = None) -> Watermarks:
    """The watermarks of one worker process out of ``workers``: each given as bytes or a
    percentage of that worker's share of the limit; None falls back to the environment
    (``LIVECOUNT_SOFT_MEMORY``, ``LIVECOUNT_HARD_MEMORY``), then to the defaults. The soft
    watermark must be below the hard one."""
    limit = limit or memory_limit()
    share = limit.bytes // max(1, workers)
    soft_text = soft or os.environ.get("LIVECOUNT_SOFT_MEMORY") or DEFAULT_SOFT
    hard_text = hard or os.environ.get("LIVECOUNT_HARD_MEMORY") or DEFAULT_HARD
    soft_bytes = parse_size(soft_text, share)
    hard_bytes = parse_size(hard_text, share)
    if soft_bytes >= hard_bytes:
        raise ValueError(f"the soft memory watermark ({soft_text} = {soft_bytes} bytes) must "
                         f"be below the hard one ({hard_text} = {hard_bytes} bytes)")
    return Watermarks(soft_bytes, hard_bytes, limit)

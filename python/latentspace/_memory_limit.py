"""How much memory this process may use: the machine's, or less where a control group caps it.

Containers (Docker, Kubernetes, systemd services) cap a process's memory with a cgroup
limit far below the machine's: a 4 GiB pod on a 512 GiB host. The kernel kills a process
that passes the limit while it touches lazily allocated pages, with no Python exception,
just as it does one that passes the machine's memory. So the checks that refuse a request
larger than memory (k x queries of results, model weights, a PCA decomposed whole) compare
with the least of the machine's memory and every limit above this process in its cgroup
hierarchy (v2 `memory.max`, v1 `memory.limit_in_bytes`).
"""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MemoryLimit", "memory_limit"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value
_NO_LIMIT_FROM = 1 << 60


@dataclass(frozen=True)
class MemoryLimit:
    """`nbytes` of memory this process may use; `cgroup` when a cgroup's limit set it."""

    nbytes: int
    cgroup: bool = False

    def __str__(self) -> str:
        size = f"{self.nbytes / 2**30:,.1f} GiB" if self.nbytes >= 2**30 else f"{self.nbytes / 2**20:,.1f} MiB"
        return f"the {size} memory limit of this process's cgroup" if self.cgroup else f"this machine's {size} of memory"


# How long a limit read is used before it is read again. Reading it takes a file per ancestor
# group (about 0.1 ms), and every knn and FlatIndex.search asks (empty_results): a 1-query
# search of 1,000 rows took 104 us instead of 7. A limit changed at run time (a resized pod,
# `systemctl set-property`) is seen within this long.
_CACHE_SECONDS = 1.0
_clock = time.monotonic
_cached: tuple[float, MemoryLimit | None] | None = None  # (when read, what was read)


def memory_limit() -> MemoryLimit | None:
    """The memory this process may use, or None where neither the machine's memory nor a
    limit can be told (os.sysconf missing, as on Windows). Read again only after _CACHE_SECONDS."""
    global _cached
    now, cached = _clock(), _cached
    if cached is not None and now - cached[0] < _CACHE_SECONDS:
        return cached[1]
    limit = _read_memory_limit()
    _cached = (now, limit)  # (one reference swap: a thread reading meanwhile sees either pair)
    return limit


def _read_memory_limit() -> MemoryLimit | None:
    """memory_limit, read now."""
    machine = _machine_memory()
    limit = _cgroup_limit(Path("/proc/self/cgroup"), _CGROUP_ROOT)
    if limit is not None and (machine is None or limit < machine):
        return MemoryLimit(limit, cgroup=True)
    return None if machine is None else MemoryLimit(machine)


def _machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_limit(membership: Path, root: Path) -> int | None:
    """The least memory limit over this process's cgroups (from `membership`, the
    /proc/self/cgroup format) and their ancestors under `root`, or None where none is set
    or none can be read."""
    try:
        lines = membership.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":  # v2: one unified hierarchy
            limits += _limits_along(root / "unified", group, "memory.max") or _limits_along(root, group, "memory.max")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            limits += _limits_along(root / controllers, group, "memory.limit_in_bytes")
    return min(limits, default=None)


def _limits_along(mount: Path, group: str, name: str) -> list[int]:
    """The limits in file `name` of the cgroup `group` under `mount` and of each of its
    ancestors up to the mount itself. Walking up also covers a container whose cgroup
    namespace was not unshared: /proc/self/cgroup then names the host's path, which does
    not exist under the container's mount, whose root is the container's own group."""
    limits = []
    relative = posixpath.normpath(group.strip("/") or ".")
    if relative == ".." or relative.startswith("../"):
        # A group outside this cgroup namespace's root (the kernel writes "/../sibling" for a
        # process moved out of it): this mount shows neither it nor its ancestors, and its
        # root's limit is not this process's. Walked, ".." read files outside the mount.
        return limits
    directory = mount / relative
    while True:
        limit = _read_limit(directory / name)
        if limit is not None:
            limits.append(limit)
        if directory == mount or mount not in directory.parents:
            return limits
        directory = directory.parent


def _read_limit(path: Path) -> int | None:
    """A limit file's value in bytes; None for "max", an unset v1 limit, or no such file."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():  # "max" (v2: no limit), or something this code does not know
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT_FROM else None

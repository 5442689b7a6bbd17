"""Whether this process's address-space limit leaves room for the stacks of n OpenMP threads.

GNU OpenMP creates its worker threads at the first parallel region that asks for them, each
with a stack reserved in the address space. Under an address-space limit (`ulimit -v`,
RLIMIT_AS: batch schedulers and shared login nodes set one) a thread count whose stacks do
not fit makes libgomp print "Thread creation failed" and end the process, from inside the
next search: no Python exception, nothing the caller can catch. set_num_threads asks this
module first and refuses such a count, naming `n`; at import, a default count (OMP_NUM_THREADS
or the CPU count) that cannot fit is lowered (lowered_default), with a warning.
"""

from __future__ import annotations

import os
import platform
import re

__all__ = ["address_space_limited", "lowered_default", "stack_room_error"]

# glibc's thread stack where RLIMIT_STACK is unlimited (ARCH_STACK_DEFAULT_SIZE): 2 MiB on
# x86-64, aarch64 and most others, more on a few (glibc's pthreaddef.h, by platform.machine()
# prefix). Taken as 8 MiB, 400 threads that ran under a 1.5 GiB `ulimit -v` were refused.
_DEFAULT_STACK_BYTES = 2 << 20
_LARGER_DEFAULT_STACK = {"ppc": 4 << 20, "sparc64": 4 << 20, "alpha": 4 << 20, "parisc": 8 << 20, "ia64": 32 << 20}
_PER_THREAD_EXTRA_BYTES = 256 << 10  # guard page, TLS, libgomp's per-thread state: a margin
_DEFAULT_STACK_SHARE = 2  # a lowered default's stacks take at most 1/2 of the room left (lowered_default)
_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def stack_room_error(n: int) -> str | None:
    """Why n threads' stacks cannot fit the address space this process has left, in words
    naming n, or None when they fit, there is no limit, or it cannot be told (not Linux)."""
    room = _stack_room()
    if room is None or _fits(n, *room):
        return None
    fits = _most_threads(*room)
    return (f"n: {_shortfall(n, *room)}; use at most about {fits} thread{'s' if fits > 1 else ''}, "
            f"or a smaller OMP_STACKSIZE")


def address_space_limited() -> bool:
    """Whether this process has an address-space limit (`ulimit -v`): one getrlimit call."""
    try:
        import resource
    except ImportError:  # (Windows)
        return False
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY


def lowered_default(count: int) -> tuple[int, str] | None:
    """For a default thread count (OMP_NUM_THREADS or the CPU count) whose stacks cannot fit
    the address space left, the count to use instead and why `count` cannot, in words; None
    when it fits, there is no limit, or it cannot be told.

    The count used is the most whose stacks take at most half of what is left, not all of it:
    the rest is for the data and the libraries loaded after import (the most that fit at
    import no longer did after an `import torch`, about 0.5 GiB, and the first search ended
    the process all the same). A count chosen by set_num_threads may still take it all."""
    room = _stack_room()
    if room is None or _fits(count, *room):
        return None
    left, per_thread = room
    return _most_threads(left // _DEFAULT_STACK_SHARE, per_thread), _shortfall(count, left, per_thread)


def _fits(n: int, left: int, per_thread: int) -> bool:
    return (n - 1) * per_thread <= left  # the calling thread has its own stack already


def _most_threads(left: int, per_thread: int) -> int:
    return max(1, left // per_thread + 1)


def _shortfall(n: int, left: int, per_thread: int) -> str:
    needed = (n - 1) * per_thread
    return (f"{n} threads need about {needed / 2**30:,.2f} GiB of address space for their stacks "
            f"({per_thread / 2**20:,.2f} MiB each), more than the {left / 2**30:,.2f} GiB this process's limit "
            f"(ulimit -v, RLIMIT_AS) leaves")


def _stack_room() -> tuple[int, int] | None:
    """(address space left under the limit, bytes each worker thread takes), or None when
    there is no limit or it cannot be told (not Linux, no /proc)."""
    if not address_space_limited():  # the usual case: nothing more to read
        return None
    import resource

    soft_limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    used = _address_space_used()
    if used is None:
        return None
    return max(soft_limit - used, 0), _thread_stack_bytes(resource) + _PER_THREAD_EXTRA_BYTES


def _thread_stack_bytes(resource) -> int:
    """The stack libgomp gives each worker: OMP_STACKSIZE / GOMP_STACKSIZE where set (as
    libgomp reads them), otherwise glibc's default: the soft RLIMIT_STACK, or where that is
    unlimited the machine's default (_unlimited_stack_default)."""
    for name in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        parsed = _parse_stack_size(os.environ.get(name))
        if parsed is not None:
            return parsed
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return _unlimited_stack_default() if soft == resource.RLIM_INFINITY or soft <= 0 else soft


def _unlimited_stack_default() -> int:
    """glibc's thread stack on this machine where RLIMIT_STACK is unlimited."""
    machine = platform.machine().lower()
    return next((size for prefix, size in _LARGER_DEFAULT_STACK.items() if machine.startswith(prefix)),
                _DEFAULT_STACK_BYTES)


def _parse_stack_size(text: str | None) -> int | None:
    """OMP_STACKSIZE's value in bytes ("size" in KiB, or with a B / K / M / G suffix), None
    for unset or a value libgomp would also ignore."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*([BKMGbkmg]?)\s*", text)
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[(match.group(2) or "K").upper()]


def _address_space_used() -> int | None:
    """This process's mapped address space now (VmSize), None where /proc cannot tell."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

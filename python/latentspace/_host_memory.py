"""Whether a range of this process's memory can be written, asked of the kernel.

numpy tracks writability (`flags.writeable`), torch does not: `torch.from_numpy` of a
read-only array or memory map only warns, and the tensor it returns faults the process on
the first write (torch's own `fill_` included). Encoding into such an `out=` tensor must
be a Python error, not a segfault, so before the first write we have the kernel write one
byte of every page back onto itself: the bytes now there go into a pipe, and readv reads
them back to their places. It refuses (EFAULT) where a page is not writable, and changes
nothing where it is. (Not process_vm_writev, which does it in one call: sandboxes block
that debugging syscall, and a seccomp filter often kills the process for it, as systemd's
SystemCallFilter= does without SystemCallErrorNumber=; a pipe and readv are as ordinary as
syscalls get.)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

import numpy as np

__all__ = ["is_writable"]

_PAGE_BYTES = mmap.PAGESIZE
_IOV_MAX = 1024  # Linux's limit on iovecs per call (UIO_MAXIOV); their bytes fit an empty pipe


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


# The iovecs are built as a (n, 2) uint64 array, which is this struct's layout only where
# pointers and size_t are 8 bytes: elsewhere there is no answer (None).
_IOVEC_IS_TWO_UINT64 = ctypes.sizeof(_IoVec) == 16 and _IoVec.length.offset == 8


def _readv():
    if not (sys.platform.startswith("linux") and _IOVEC_IS_TWO_UINT64):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).readv
    except (OSError, AttributeError):  # no C library to ask
        return None
    function.restype = ctypes.c_ssize_t
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return function


_READV = _readv()


def is_writable(array: np.ndarray) -> bool | None:
    """True when every page under `array`'s elements (C-contiguous) can be written, False
    when one cannot, None when the kernel cannot tell us (no readv, no file descriptor
    left for the pipe, ...): the caller then proceeds as before."""
    if _READV is None or array.nbytes == 0:
        return None if _READV is None else True
    start = array.ctypes.data
    first_page = start - start % _PAGE_BYTES
    pages = -(-(start + array.nbytes - first_page) // _PAGE_BYTES)
    flat = array.reshape(-1).view(np.uint8)
    # One byte per page: the first byte of the array, then each later page's first byte;
    # _IOV_MAX pages at a time, so that a huge array needs no list of all its pages.
    for begin in range(0, pages, _IOV_MAX):
        addresses = first_page + _PAGE_BYTES * np.arange(begin, min(begin + _IOV_MAX, pages), dtype=np.uint64)
        if begin == 0:
            addresses[0] = start
        answer = _write_back(flat, start, addresses)
        if answer is not True:
            return answer
    return True


def _write_back(flat: np.ndarray, start: int, addresses: np.ndarray) -> bool | None:
    """Writes the byte at each address (within `flat`, which begins at `start`) onto itself."""
    # The bytes now there, read through the (readable) array
    current = flat[(addresses - np.uint64(start)).astype(np.int64)].tobytes()
    iovecs = np.empty((addresses.size, 2), dtype=np.uint64)  # iovec's layout: (base, length)
    iovecs[:, 0], iovecs[:, 1] = addresses, 1
    try:
        read_end, write_end = os.pipe()
    except OSError:  # no file descriptor left
        return None
    try:
        if os.write(write_end, current) != len(current):  # at most 1 KiB: all at once into an empty pipe
            return None
        written = _READV(read_end, iovecs.ctypes.data, addresses.size)
        code = ctypes.get_errno()
    except OSError:  # the pipe refused the bytes: no answer
        return None
    finally:
        os.close(read_end)
        os.close(write_end)
    if written == addresses.size:
        return True
    if written >= 0:  # stopped at the first page it could not write
        return False
    return False if code == errno.EFAULT else None

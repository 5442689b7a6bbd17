"""Whether a range of this process's memory can be written, asked of the kernel.

numpy tracks writability (`flags.writeable`), torch does not: `torch.from_numpy` of a
read-only array or memory map only warns, and the tensor it returns faults the process on
the first write (torch's own `fill_` included). Encoding into such an `out=` tensor must
be a Python error, not a segfault, so before the first write we ask the kernel to write
one byte of every page back onto itself with process_vm_writev: it refuses (EFAULT) where
a page is not writable, and changes nothing where it is.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

__all__ = ["is_writable"]

_PAGE_BYTES = mmap.PAGESIZE
_IOV_MAX = 1024  # Linux's limit on iovecs per call (UIO_MAXIOV)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


# The remote iovecs are built as a (n, 2) uint64 array, which is this struct's layout only
# where pointers and size_t are 8 bytes: elsewhere there is no answer (None).
_IOVEC_IS_TWO_UINT64 = ctypes.sizeof(_IoVec) == 16 and _IoVec.length.offset == 8


def _process_vm_writev():
    try:
        function = ctypes.CDLL(None, use_errno=True).process_vm_writev
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    function.restype = ctypes.c_ssize_t
    function.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                         ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    return function


_WRITEV = _process_vm_writev() if _IOVEC_IS_TWO_UINT64 else None


def is_writable(array: np.ndarray) -> bool | None:
    """True when every page under `array`'s elements (C-contiguous) can be written, False
    when one cannot, None when the kernel cannot tell us (no process_vm_writev, or a
    sandbox that forbids it): the caller then proceeds as before."""
    if _WRITEV is None or array.nbytes == 0:
        return None if _WRITEV is None else True
    start = array.ctypes.data
    # One byte per page: the first byte of the array, then each later page's first byte.
    first_page = start - start % _PAGE_BYTES
    addresses = np.arange(first_page + _PAGE_BYTES, start + array.nbytes, _PAGE_BYTES, dtype=np.uint64)
    addresses = np.concatenate([np.array([start], dtype=np.uint64), addresses])
    flat = array.reshape(-1).view(np.uint8)
    pid = os.getpid()
    for begin in range(0, addresses.size, _IOV_MAX):
        batch = addresses[begin : begin + _IOV_MAX]
        # The bytes now there, read through the (readable) array: written back unchanged.
        current = np.ascontiguousarray(flat[(batch - np.uint64(start)).astype(np.int64)])
        local = _IoVec(current.ctypes.data, current.size)
        remote = np.empty((batch.size, 2), dtype=np.uint64)  # iovec's layout: (base, length)
        remote[:, 0], remote[:, 1] = batch, 1
        written = _WRITEV(pid, ctypes.byref(local), 1, remote.ctypes.data_as(ctypes.POINTER(_IoVec)), batch.size, 0)
        if written == batch.size:
            continue
        if written >= 0:  # stopped at the first page it could not write
            return False
        code = ctypes.get_errno()
        if code == errno.EFAULT:
            return False
        return None  # ENOSYS, EPERM (seccomp), ...: no answer
    return True

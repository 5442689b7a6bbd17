"""Atomic file writes, shared by every file latentspace saves (indexes, models, histories).

The data goes to a temporary file beside the target (same folder, so the same filesystem),
which is flushed, fsynced and renamed over the target; then the folder is fsynced so the
rename itself is durable. A crash or an exception at any point leaves either the old file or
the new one, never a mix, and never a stray temporary file after an exception.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ._paths import too_long

__all__ = ["atomic_path", "atomic_write", "fsync_folder", "unwritable"]


def fsync_folder(folder: Path) -> None:
    """fsyncs a folder so that a rename inside it survives a crash (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwritable(path: Path) -> tuple[type[OSError], str] | None:
    """Why a file cannot be written at `path` (the error type and the reason), or None: a
    name too long for the file system (the reason does not repeat it), a folder there, its
    folder missing, or its folder not writable (naming it)."""
    spare = len(os.fsencode(_temporary_name(path))) - len(os.fsencode(str(path)))
    problem = too_long(path, spare=max(spare, 0))
    if problem is not None:
        return OSError, problem
    try:
        if path.is_dir():
            return IsADirectoryError, f"{path} is a folder; pass a file path"
        if not path.parent.is_dir():
            return FileNotFoundError, f"cannot write {path}: folder {path.parent} does not exist"
    except OSError as error:  # a folder on the way that cannot be searched, say: in words that name the path
        return type(error), f"cannot write {path}: {error.strerror or error}"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return PermissionError, f"cannot write {path}: folder {path.parent} is not writable"
    return None


# A temporary name ".NAME.<16 hex>.tmp" is 22 bytes longer than NAME; past this length it keeps
# only as much of NAME as leaves it no longer than NAME itself (which the file system holds):
# a name within 22 bytes of the limit could be written, but not through its temporary file.
_TEMPORARY_NAME_BYTES = 128


def _temporary_name(path: Path) -> str:
    name, extra = path.name, len(".." + "0" * 16 + ".tmp")
    size = len(os.fsencode(name))
    if size + extra > _TEMPORARY_NAME_BYTES:
        name = _first_bytes(name, size - extra)
    return str(path.parent / f".{name}.{secrets.token_hex(8)}.tmp")


def _first_bytes(name: str, limit: int) -> str:
    """The longest start of `name`, in whole characters (the name stays valid text), that
    takes at most `limit` bytes in the file system's encoding."""
    low, high = 0, min(len(name), limit)  # (a character takes a byte at least)
    while low < high:
        middle = (low + high + 1) // 2
        if len(os.fsencode(name[:middle])) <= limit:
            low = middle
        else:
            high = middle - 1
    return name[:low]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the block to create and fill (for writers
    that need a file name, such as np.lib.format.open_memmap); on a clean exit that file is
    fsynced and renamed over `path`, on an exception (including KeyboardInterrupt) it is
    removed, `path` is left as it was and the exception propagates. (Close or flush memory
    maps of it inside the block.) Raises IsADirectoryError when `path` is a folder,
    FileNotFoundError when its folder does not exist, PermissionError when the folder
    cannot be written (each naming `path`, not the temporary file), and OSError when a part
    of the path, or the whole, is too long for the file system (saying which, and its limit).
    """
    path = Path(os.fspath(path))
    problem = unwritable(path)
    if problem is not None:
        error, reason = problem
        raise error(f"path: {reason}")
    tmp_name = Path(_temporary_name(path))
    try:
        yield tmp_name
        fd = os.open(tmp_name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException as error:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and _names_no_file_asked_for(error, tmp_name):
            raise _naming(error, path) from None
        raise
    fsync_folder(path.parent)


# Errors of a write or fsync that say why the data did not land, and name no file.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # (not EIO: a read fails so too)


def _names_no_file_asked_for(error: OSError, tmp_name: Path) -> bool:
    """Whether the error leaves the caller without the file it asked for: the OS named the
    temporary file, which the caller never typed (a folder that takes no new files, such as
    /proc), or a write or fsync failed naming no file at all (a full disk: `latentspace
    index build` printed only "[Errno 28] No space left on device")."""
    if error.filename is not None:
        return os.fsdecode(error.filename) == str(tmp_name)
    return error.errno in _WRITE_ERRNOS


def _naming(error: OSError, path: Path) -> OSError:
    """The error, of its type and errno (a caller may still tell a full disk apart), naming `path`."""
    named = type(error)(f"path: cannot write {path}: {error.strerror or error}")
    named.errno = error.errno
    return named


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Opens a temporary file for binary writing; on a clean exit it replaces `path`.

    Usage: `with atomic_write(path) as f: f.write(...)`. Same guarantees as atomic_path.
    """
    with atomic_path(path) as tmp_name:
        # Created like any new file (mode 0o666 less the umask), unlike mkstemp's 0o600.
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f

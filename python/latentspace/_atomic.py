"""Atomic file writes, shared by every file latentspace saves (indexes, models, histories).

The data goes to a temporary file beside the target (same folder, so the same filesystem),
which is flushed, fsynced and renamed over the target; then the folder is fsynced so the
rename itself is durable. A crash or an exception at any point leaves either the old file or
the new one, never a mix, and never a stray temporary file after an exception.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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
    """Why a file cannot be written at `path` (the error type and the reason, naming it), or
    None: a folder there, its folder missing, or its folder not writable."""
    if path.is_dir():
        return IsADirectoryError, f"{path} is a folder; pass a file path"
    if not path.parent.is_dir():
        return FileNotFoundError, f"cannot write {path}: folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return PermissionError, f"cannot write {path}: folder {path.parent} is not writable"
    return None


def _temporary_name(path: Path) -> str:
    return str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the block to create and fill (for writers
    that need a file name, such as np.lib.format.open_memmap); on a clean exit that file is
    fsynced and renamed over `path`, on an exception (including KeyboardInterrupt) it is
    removed, `path` is left as it was and the exception propagates. (Close or flush memory
    maps of it inside the block.) Raises IsADirectoryError when `path` is a folder,
    FileNotFoundError when its folder does not exist, and PermissionError when the folder
    cannot be written (each naming `path`, not the temporary file).
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
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(path.parent)


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

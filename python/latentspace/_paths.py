"""Checks on a path before it is read: a regular file, not a folder and not a FIFO or device
(opening a FIFO with no writer blocks forever, and the readers stat and seek)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def stat_regular_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> os.stat_result:
    """os.stat of `path` when it is a regular file. FileNotFoundError when there is none,
    IsADirectoryError for a folder, `error` for anything else (a FIFO, a device); `what`
    names the file the caller expected ("a file", "an index file")."""
    path = Path(os.fspath(path))
    status = path.stat()
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(f"path: {path} is a folder; pass {what}")
    if not stat.S_ISREG(status.st_mode):
        raise error(f"{path}: not a regular file (a FIFO or a device); pass {what}")
    return status

"""Checks on a path: that it is one (as_path); before it is read, a regular file, not a folder
and not a FIFO or device (opening a FIFO with no writer blocks forever, and the readers stat
and seek); before it is written, a name the file system can hold (too_long)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any


def as_path(path: Any, name: str = "path") -> Path:
    """`path` (a str, an os.PathLike, or bytes as os.fsencode gives them, which np.load takes
    too) as a Path. TypeError naming `name` for anything else (Python's own named no
    argument); ValueError for "" (pathlib reads it as the current folder: "path: . is a
    folder") and for a NUL character (the OS's "embedded null byte" named no argument)."""
    text = _path_text(path, name)
    if not text:
        raise ValueError(f"{name}: empty; expected a file's path")
    if "\0" in text:
        raise ValueError(f"{name}: {text!r} holds a NUL character, which no file name can")
    return Path(text)


def _path_text(path: Any, name: str) -> str:
    """`path` (what as_path takes) as text, unchecked; as_path's TypeError for anything else."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise TypeError(f"{name}: expected a str, bytes or os.PathLike (a file's path), got {type(path).__name__}") from None


def stat_regular_file(path: str | bytes | os.PathLike, what: str,
                      error: type[Exception] = ValueError) -> os.stat_result:
    """os.stat of `path` when it is a regular file. FileNotFoundError when there is none,
    IsADirectoryError for a folder, `error` for anything else (a FIFO, a device); `what`
    names the file the caller expected ("a file", "an index file"). as_path's errors for
    what is no path."""
    path = as_path(path)
    status = path.stat()
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(f"path: {path} is a folder; pass {what}")
    if not stat.S_ISREG(status.st_mode):
        raise error(f"{path}: not a regular file (a FIFO or a device); pass {what}")
    return status


def too_long(path: str | bytes | os.PathLike, *, spare: int = 0) -> str | None:
    """Why the file system would refuse `path` as too long, or None: one of its parts (a
    folder's or the file's name) longer than its NAME_MAX bytes, or the whole longer than
    PATH_MAX - 1 bytes less `spare` (what a writer adds to it: a temporary file's longer
    name). The OS said only "[Errno 36] File name too long" and the whole path, naming no
    argument. The limits are those of the nearest folder on the way that exists; where the
    OS cannot tell them (Windows: no os.pathconf), None. `path` is what as_path takes (a str,
    an os.PathLike, or bytes; as_path's TypeError for anything else), but "" and a NUL
    character are left to as_path: neither is too long."""
    text = _path_text(path, "path")  # (os.fspath left bytes as bytes, which Path refused)
    name_max, path_max = _limits(Path(text))
    if name_max is not None:
        for part in Path(text).parts:
            size = len(os.fsencode(part))
            if size > name_max:
                return (f"file name too long ({_length(part, size)} in one path component; the file system "
                        f"allows {name_max}{'' if size == len(part) else ' bytes'})")
    size = len(os.fsencode(text))
    if path_max is not None and size > path_max - 1 - spare:
        allowed = path_max - 1
        if not spare:
            return f"path too long ({_length(text, size)}; the file system allows {allowed:,})"
        return (f"path too long ({_length(text, size)}; at most {allowed - spare:,} fit: the file system allows "
                f"{allowed:,}, and the temporary file written beside it needs {spare} more)")
    return None


def _length(text: str, size: int) -> str:
    """A name's length as the file system counts it (bytes) and as its reader does."""
    if size == len(text):
        return f"{size:,} characters"
    return f"{len(text):,} characters, {size:,} bytes"


def _limits(path: Path) -> tuple[int | None, int | None]:
    """(NAME_MAX, PATH_MAX) of the file system that would hold `path`, read in the nearest
    folder above it that exists; (None, None) where os.pathconf cannot tell."""
    if not hasattr(os, "pathconf"):
        return None, None
    for folder in (path.parent, *path.parent.parents):
        try:
            name_max, path_max = os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
        except (OSError, ValueError):  # not there (yet), or a part of it too long itself
            continue
        return (name_max if name_max > 0 else None), (path_max if path_max > 0 else None)
    return None, None

"""Atomic file writes, shared by every file latentspace saves (indexes, models, histories).

The data goes to a temporary file beside the target (same folder, so the same filesystem),
which is flushed, fsynced and renamed over the target; then the folder is fsynced so the
rename itself is durable. A crash or an exception at any point leaves either the old file or
the new one, never a mix, and never a stray temporary file after an exception.

atomic_file_set extends that to a set of files that belong together (the demo's pictures):
either the old set or the new one, never some of each (see the notes above it).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ._paths import as_path, too_long

try:
    import fcntl
except ImportError:  # (Windows: no flock; see _folder_lock)
    fcntl = None

__all__ = ["atomic_file_set", "atomic_path", "atomic_write", "file_set_unwritable", "fsync_folder", "unwritable",
           "write_target"]


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
        if path.exists() and not path.is_file():
            # os.replace would put a regular file in its place: a device such as /dev/null,
            # a FIFO or a socket, which the user never meant to lose (loaders refuse them too).
            return OSError, (f"{path} is not a regular file (a device, a FIFO or a socket), which saving would "
                             "replace; pass a file path")
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


def write_target(path: Path) -> Path:
    """Where a save to `path` writes: the file a symbolic link names, so that the link stays a
    link (os.replace over the link itself left the link gone and the file it named unchanged);
    `path` itself otherwise, also where it cannot be told (a name too long: unwritable says so)."""
    try:
        return Path(os.path.realpath(path)) if path.is_symlink() else path
    except OSError:
        return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the block to create and fill (for writers
    that need a file name, such as np.lib.format.open_memmap); on a clean exit that file is
    fsynced and renamed over `path`, on an exception (including KeyboardInterrupt) it is
    removed, `path` is left as it was and the exception propagates. (Close or flush memory
    maps of it inside the block.) Raises IsADirectoryError when `path` is a folder,
    FileNotFoundError when its folder does not exist, PermissionError when the folder
    cannot be written (each naming `path`, not the temporary file), OSError when a part of
    the path, or the whole, is too long for the file system (saying which, and its limit) or
    when `path` is a device, a FIFO or a socket; as_path's errors for what is no path (None,
    "", a NUL character). A symbolic link is followed: the file it names is replaced.
    """
    path = write_target(as_path(path))
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


# ---------------------------------------------------------------------------------------
# A set of files that belong together (the demo's five pictures), replaced together.
#
# Each file written atomically is not enough: a run stopped after two of five pictures (Ctrl-C,
# a full disk, an error while drawing) left two new pictures beside three old ones, and nothing
# said so. A manifest written last (the run's files and checksums) would only let a reader
# *detect* the mix, and only a reader that checks it: the user opening the folder in an image
# viewer would still see pictures of two runs. So the set is staged instead: every file is
# written into a hidden folder inside the target folder (the same file system, so publishing
# copies nothing and allocates no data), and only once all of them are there do they replace
# the old ones, by renames that take microseconds, with SIGINT and SIGTERM held until the last
# is done. What can fail or be interrupted (the drawing, seconds long) thus leaves the old set
# untouched and the staging folder removed; a rename that fails while publishing puts the old
# files back from hard links (or copies) taken first; and a process killed outright between
# two renames (SIGKILL, a power cut) leaves a journal by which the next writer completes that
# set before doing anything else. The folder holds just the set's files, as before (no
# manifest beside them); the user's other files are never touched, and only folders named as
# this code names its own (.TAG.<16 hex>.tmp) are ever removed.
#
# Two writers at once: publishing, and removing dead writers' staging folders, happen under an
# exclusive flock of the target folder, so two sets never interleave: the last to publish wins,
# whole. Each staging folder holds an `.owner` file that its writer keeps flocked while it is
# alive: another writer removes only staging folders whose lock it can take (their writer has
# gone: the kernel drops a dead process's locks), never a running writer's.
_OWNER = ".owner"
_JOURNAL = ".publishing"  # the set's names, one a line, written just before the renames
_PREVIOUS = ".previous"  # the old files, linked (or copied) here before the renames
_LOCK_FILE = ".latentspace.lock"  # only where the folder itself cannot be flocked (NFS)


def _staging_name(tag: str, token: str) -> str:
    return f".{tag}.{token}.tmp"


def _is_staging_name(name: str, tag: str) -> bool:
    return re.fullmatch(rf"\.{re.escape(tag)}\.[0-9a-f]{{16}}\.tmp", name) is not None


def file_set_unwritable(folder: Path, names: Sequence[str], *,
                        tag: str) -> tuple[Path, tuple[type[OSError], str]] | None:
    """The first of the set's files that atomic_file_set could not write into `folder`, with
    unwritable()'s problem, or None: besides unwritable()'s checks (a folder of the file's
    name, say), a path too long once it is staged (its temporary file in the staging folder)."""
    staged_folder = folder / _staging_name(tag, "0" * 16)
    for name in names:
        path = folder / name
        problem = unwritable(path)
        if problem is None:
            spare = len(os.fsencode(_temporary_name(staged_folder / name))) - len(os.fsencode(str(path)))
            reason = too_long(path, spare=max(spare, 0))
            problem = None if reason is None else (OSError, reason)
        if problem is not None:
            return path, problem
    return _lock_problem(folder)


def _lock_problem(folder: Path) -> tuple[Path, tuple[type[OSError], str]] | None:
    """The folder's lock tried before any work (for the demo: before its training): one held
    for good by another (`flock DIR latentspace demo --out DIR`) is said now, not after."""
    if not folder.is_dir():
        return None  # (made later, by the caller: nobody holds a lock on it)
    try:
        with _folder_lock(folder):
            return None
    except OSError as error:
        return folder, (type(error), str(error).removeprefix("path: "))


@contextmanager
def atomic_file_set(folder: str | os.PathLike, names: Sequence[str], *, tag: str) -> Iterator[Path]:
    """Yields a new, empty staging folder inside `folder` (named .TAG.<16 hex>.tmp) for the
    block to write the files `names` into; on a clean exit they replace `folder`'s files of
    those names together (see the notes above), on an exception (KeyboardInterrupt included)
    nothing in `folder` changes, the staging folder is removed and the exception propagates.
    FileNotFoundError, publishing nothing, when the block did not write one of `names`."""
    folder = Path(os.fspath(folder))
    names = tuple(names)
    for name in names:
        if not name or name in (".", "..") or os.path.basename(name) != name:
            raise ValueError(f"names: expected file names without a folder, got {name!r}")
    with _owned_staging(folder, tag) as staging:
        yield staging
        with _folder_lock(folder):
            _remove_dead_staging(folder, tag, keep=staging)  # (one cut short while publishing: completed first)
            _publish(staging, folder, names)


@contextmanager
def _owned_staging(folder: Path, tag: str) -> Iterator[Path]:
    """A new staging folder in `folder`, its owner lock held for the block, removed (with what
    it holds) however the block ends. Made and locked under the folder's lock, so that no other
    writer takes it for a dead writer's in between; dead writers' folders are removed first."""
    with _folder_lock(folder):
        _remove_dead_staging(folder, tag)
        staging = folder / _staging_name(tag, secrets.token_hex(8))
        staging.mkdir()
        owner = None
        try:
            owner = os.open(staging / _OWNER, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(owner, fcntl.LOCK_EX)  # (at most a moment's wait: another's _owner_alive)
                except OSError:
                    pass  # a file system without flock: others cannot tell, so they leave it alone
        except BaseException:
            _remove_staging(staging, owner)
            raise
    try:
        yield staging
    finally:
        _remove_staging(staging, owner)


def _remove_staging(staging: Path, owner: int | None) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    if owner is not None:
        os.close(owner)  # (after the removal: the lock says "alive" until the folder is gone)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock of `folder` for the block, waiting for another holder. Where the
    folder cannot be flocked (NFS emulates flock with fcntl locks, which need a file open for
    writing), a lock file in it instead (left there: removing a lock file races its waiters).
    Where there is no flock at all (Windows, a file system that refuses it), none: best effort
    there, as the pictures were written before (a refusal came only after the demo's training).
    A lock held past _LOCK_WAIT_S is no writer's of ours (they hold it for milliseconds) but one
    that may never be released (`flock DIR latentspace demo --out DIR`: the demo waited for its
    own parent): TimeoutError, naming the folder."""
    if fcntl is None:
        yield
        return
    fd = _locked(folder, os.O_RDONLY)
    if fd is None:  # (also a folder that may be written but not read: mode 0o300)
        fd = _locked(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


def _locked(path: Path, flags: int) -> int | None:
    """A descriptor of `path` (opened with `flags`) that holds its exclusive flock, waiting for
    another holder up to _LOCK_WAIT_S (then TimeoutError); None where it cannot be opened or
    locked."""
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        return None
    try:
        locked = _flock_waiting(fd, path)
    except BaseException:  # (Ctrl-C while waiting, or held too long)
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        return None
    return fd


# Our writers hold a folder's lock for milliseconds (a few renames); a lock held longer is
# someone else's, perhaps for good (the demo's own parent process).
_LOCK_WAIT_S = 30.0
_LOCK_POLL_S = 0.02


def _flock_waiting(fd: int, path: Path) -> bool:
    """Takes fd's exclusive flock, polling while another holds it (a blocking flock would wait
    for ever on a holder that waits for us); False where flock is refused outright."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                error = TimeoutError(f"path: {path} is locked by another process (an flock, held over "
                                     f"{_LOCK_WAIT_S:g} s), and its files are published under that lock; "
                                     "release it, or write elsewhere")
                error.errno = errno.ETIMEDOUT
                raise error from None
            time.sleep(_LOCK_POLL_S)
        except OSError:
            return False


def _remove_dead_staging(folder: Path, tag: str, keep: Path | None = None) -> None:
    """Removes the staging folders in `folder` whose writers have gone (killed outright: any
    other end removes its own), first completing a publish one was cut short in. Called under
    the folder's lock, before every publish: so a journal found here is always that of the last
    publish into the folder, and completing it cannot bring back files older than another set."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # (a folder that may be written but not read: nothing to clean that can be found)
        return
    for entry in entries:
        if not (_is_staging_name(entry.name, tag) and entry.is_dir(follow_symlinks=False)):
            continue
        staging = Path(entry.path)
        if staging == keep or _owner_alive(staging):
            continue
        _complete_publish(staging, folder)
        shutil.rmtree(staging, ignore_errors=True)


def _owner_alive(staging: Path) -> bool:
    """Whether the writer of a staging folder still runs: whether it holds the owner lock. A
    folder without its owner file is a dead writer's (it is made under the folder's lock, which
    this caller holds); one whose lock cannot be tested is left alone."""
    if fcntl is None:
        return True  # (no locks to tell by: left alone, a running writer's work never removed)
    try:
        fd = os.open(staging / _OWNER, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; anything else: cannot tell
        return True
    finally:
        os.close(fd)
    return False


def _complete_publish(staging: Path, folder: Path) -> None:
    """Moves in the files a dead writer had not yet published when it was killed between its
    renames (its journal says it had begun); nothing where it had not begun. The journal goes
    first whatever happens, so that it is never completed twice."""
    journal = staging / _JOURNAL
    try:
        names = journal.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        journal.unlink()
    except OSError:
        return
    for name in names:
        if name and name not in (".", "..") and os.path.basename(name) == name and os.path.lexists(staging / name):
            try:
                os.replace(staging / name, folder / name)
            except OSError:
                pass  # (the next set published overwrites it)
    fsync_folder(folder)


def _publish(staging: Path, folder: Path, names: tuple[str, ...]) -> None:
    """Moves the staged files over `folder`'s, all or none (see the notes above)."""
    missing = [name for name in names if not os.path.lexists(staging / name)]
    if missing:
        raise FileNotFoundError(f"names: {', '.join(missing)} not written into {staging}; nothing was published")
    for name in names:
        if (folder / name).is_dir():
            raise IsADirectoryError(f"path: {folder / name} is a folder; move it to write the set")
        _fsync_file(staging / name)
    _keep_previous(staging, folder, names)
    with atomic_write(staging / _JOURNAL) as journal:  # (it fsyncs the staging folder too)
        journal.write("".join(f"{name}\n" for name in names).encode("utf-8", "surrogateescape"))
    with _signals_held():
        moved: list[str] = []
        try:
            for name in names:
                os.replace(staging / name, folder / name)
                moved.append(name)
        except BaseException:
            os.unlink(staging / _JOURNAL)  # a crash from here on must not complete the new set
            _put_back(staging, folder, moved)
            raise
        fsync_folder(folder)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_previous(staging: Path, folder: Path, names: tuple[str, ...]) -> None:
    """The old files of the set, hard-linked (no space, no time) into the staging folder, or
    copied where the file system has no hard links; a failure here publishes nothing."""
    previous = staging / _PREVIOUS
    previous.mkdir()
    for name in names:
        old = folder / name
        if not os.path.lexists(old):
            continue
        try:
            os.link(old, previous / name, follow_symlinks=False)
        except (OSError, NotImplementedError):
            shutil.copy2(old, previous / name, follow_symlinks=False)


def _put_back(staging: Path, folder: Path, moved: list[str]) -> None:
    """After a rename failed while publishing: the files already moved are replaced by the old
    ones kept, or removed where the set had none of that name (best effort: the first error is
    the one reported)."""
    for name in reversed(moved):
        kept, target = staging / _PREVIOUS / name, folder / name
        try:
            if os.path.lexists(kept):
                os.replace(kept, target)
            else:
                os.unlink(target)
        except OSError:
            pass
    fsync_folder(folder)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held for the block, then raised again for the handlers they had (a
    Ctrl-C between two renames would leave a mixed set). Only in the main thread (the only one
    that may set handlers, and the one Python runs them in), and only for signals whose handler
    Python can put back (not one set from C) and that are not ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)

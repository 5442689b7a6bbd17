"""latentspace._atomic, under every file the library saves: an error names the path the caller
gave (never the hidden temporary file beside it), and nothing is left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import latentspace as ls
from latentspace._atomic import atomic_path, atomic_write


def test_a_missing_folder_is_named_by_the_path_asked_for(tmp_path):
    target = tmp_path / "no" / "such" / "file.bin"
    with pytest.raises(FileNotFoundError, match=f"path: cannot write {target}: folder {target.parent} does not exist") as caught:
        with atomic_write(target) as f:
            f.write(b"x")
    assert ".tmp" not in str(caught.value)
    assert not (tmp_path / "no").exists()


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"path: {tmp_path} is a folder; pass a file path"):
        with atomic_path(tmp_path):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named_by_the_path_asked_for(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"path: cannot write {folder / 'm.st'}: folder {folder} is not"):
            with atomic_write(folder / "m.st") as f:
                f.write(b"x")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_saving_an_index_into_a_missing_folder_names_the_file(tmp_path):
    index = ls.FlatIndex(3)
    index.add(np.ones((2, 3), np.float32))
    target = tmp_path / "missing" / "i.lsidx"
    with pytest.raises(FileNotFoundError, match=f"{target}: folder {target.parent} does not exist"):
        index.save(target)


needs_pathconf = pytest.mark.skipif(not hasattr(os, "pathconf"), reason="the limits are read with os.pathconf")


@needs_pathconf
def test_a_file_name_too_long_for_the_file_system_is_named_by_the_path(tmp_path):
    """atomic_write said "[Errno 36] File name too long: '...'" (the whole name), naming no argument."""
    name = "a" * 300 + ".bin"
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(OSError, match=rf"^path: file name too long \(304 characters in one path component; "
                                      rf"the file system allows {limit}\)$"):
        with atomic_write(tmp_path / name) as f:
            f.write(b"x")
    with pytest.raises(OSError, match=r"^path: file name too long \(304 characters in one path component"):
        with atomic_write(tmp_path / name / "inner.bin") as f:  # a folder's name, too
            f.write(b"x")
    assert list(tmp_path.iterdir()) == []


@needs_pathconf
def test_a_path_too_long_for_the_file_system_is_named_by_the_path(tmp_path):
    limit = os.pathconf(tmp_path, "PC_PATH_MAX")
    target = tmp_path.joinpath(*["d" * 100] * (limit // 100 + 1), "f.bin")  # every part short
    with pytest.raises(OSError, match=rf"^path: path too long \({len(str(target)):,} characters; at most "):
        with atomic_write(target) as f:
            f.write(b"x")


@needs_pathconf
def test_the_longest_name_the_file_system_allows_is_written(tmp_path):
    """The temporary file's name (".NAME.<16 hex>.tmp") passed the limit for names within 22
    characters of it: a valid target failed with "File name too long" naming the temporary file."""
    target = tmp_path / ("b" * os.pathconf(tmp_path, "PC_NAME_MAX"))
    with atomic_write(target) as f:
        f.write(b"payload")
    assert target.read_bytes() == b"payload"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@needs_pathconf
def test_saving_an_index_under_a_name_too_long_names_the_path(tmp_path):
    index = ls.FlatIndex(3)
    with pytest.raises(OSError, match=r"^path: file name too long \(306 characters"):
        index.save(tmp_path / ("i" * 300 + ".lsidx"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_files_is_named_by_the_path_not_the_temporary_file():
    """/proc exists and passes the folder checks, but creating the temporary file there fails:
    the OS's error named '/proc/.x.<hex>.tmp', a file the caller never typed."""
    target = "/proc/latentspace-atomic-test.bin"
    with pytest.raises(OSError) as raised:
        with atomic_write(target) as f:
            f.write(b"x")
    message = str(raised.value)
    assert message.startswith(f"path: cannot write {target}: ") and ".tmp" not in message, message


class _FullDisk:
    """A file whose writes fail as on a full disk (ENOSPC, an error that names no file)."""

    def __init__(self, real):
        self._real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_is_named_by_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, where):
    """ENOSPC from a write or the fsync names no file: `latentspace index build` printed only
    "error: [Errno 28] No space left on device", not which file could not be written."""
    import latentspace._atomic as atomic

    index = ls.FlatIndex(3)
    index.add(np.ones((4, 3), np.float32))
    target = tmp_path / "i.lsidx"
    index.save(target)
    before = target.read_bytes()
    index.add(np.zeros((100, 3), np.float32))
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode)))
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match=f"^path: cannot write {target}: No space left on device$") as raised:
        index.save(target)
    assert raised.value.errno == errno.ENOSPC  # still tells a full disk apart from other failures
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["i.lsidx"]


def test_a_fifo_or_device_at_the_path_is_refused_and_left_as_it_was(tmp_path):
    """Saving renamed a regular file over whatever was at the path: a FIFO, or /dev/null itself
    when root saved there (an audit's probe turned this machine's /dev/null into a file)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    index = ls.FlatIndex(2)
    index.add(np.ones((1, 2), np.float32))
    with pytest.raises(OSError, match=f"path: {fifo} is not a regular file \\(a device, a FIFO or a socket\\)"):
        index.save(fifo)
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    with pytest.raises(OSError, match="path: /dev/null is not a regular file"):
        ls.save_model(ls.PCA(1).fit(np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)),
                      "/dev/null")
    assert not Path("/dev/null").is_file() and Path("/dev/null").exists()


def test_a_symbolic_link_is_followed_and_stays_a_link(tmp_path):
    """os.replace over a link replaced the link itself with a file: the file it named was left
    as it was and the link was gone. Now the file it names is replaced, the link kept."""
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "index.lsidx"
    link = tmp_path / "current.lsidx"
    link.symlink_to(real)  # dangling until the first save
    for rows in (1, 3):
        index = ls.FlatIndex(2)
        index.add(np.arange(2 * rows, dtype=np.float32).reshape(rows, 2))
        index.save(link)
        assert link.is_symlink() and real.is_file()
        assert ls.load_index(link).ntotal == rows == ls.load_index(real).ntotal
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["index.lsidx"]  # no temporary file
    (tmp_path / "to_fifo").symlink_to(tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="is not a regular file"):
        index.save(tmp_path / "to_fifo")
    assert (tmp_path / "fifo").is_fifo()


@pytest.mark.parametrize("path,error,message", [
    (None, TypeError, "path: expected a str, bytes or os.PathLike \\(a file's path\\), got NoneType"),
    ("", ValueError, "path: empty; expected a file's path"),
    ("a\0b", ValueError, "path: 'a\\\\x00b' holds a NUL character"),
])
def test_what_is_no_path_is_refused_by_name_by_every_saver(tmp_path, path, error, message):
    index = ls.FlatIndex(2)
    index.add(np.ones((1, 2), np.float32))
    model = ls.PCA(1).fit(np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32))
    for save in (index.save, lambda p: ls.save_model(model, p)):
        with pytest.raises(error, match=message):
            save(path)


def test_bytes_paths_save_and_load_as_str_paths_do(tmp_path):
    """np.load and the datasets' loaders take bytes paths; index and model files refused them
    with pathlib's "argument should be a str object", naming no argument."""
    index = ls.FlatIndex(2)
    index.add(np.ones((2, 2), np.float32))
    index.save(os.fsencode(tmp_path / "i.lsidx"))
    assert ls.load_index(os.fsencode(tmp_path / "i.lsidx")).ntotal == 2
    model = ls.PCA(1).fit(np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32))
    ls.save_model(model, os.fsencode(tmp_path / "m.safetensors"))
    assert type(ls.load_model(os.fsencode(tmp_path / "m.safetensors"))) is ls.PCA

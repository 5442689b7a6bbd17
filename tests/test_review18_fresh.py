"""A fresh review of the demo's picture set (_atomic.atomic_file_set): a folder whose lock is
held for good by someone else (`flock DIR latentspace demo --out DIR`, a shell holding it on
a descriptor) hung the demo forever after its training; a file system without flock failed it
after its training where the pictures were written before; and where there are no locks at all
(no fcntl: Windows) a second writer removed a running writer's staging folder."""

from __future__ import annotations

import errno
import os
import threading
import types
from contextlib import ExitStack

import pytest

pytest.importorskip("matplotlib")
fcntl = pytest.importorskip("fcntl")

from latentspace import _atomic, cli_demo  # noqa: E402

TAG = "latentspace-demo"
NAMES = ("a.png", "b.png")


def _prepared(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes(b"old")
    return folder


def _write(staging, label: bytes) -> None:
    for name in NAMES:
        (staging / name).write_bytes(label)


def _set(folder) -> set[bytes]:
    return {(folder / name).read_bytes() for name in NAMES}


def _staging(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(f".{TAG}.")]


def _held(folder) -> int:
    """A descriptor holding the folder's flock, as `flock DIR command` holds it for its command."""
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_folder_locked_for_good_by_another_is_an_error_not_a_hang(tmp_path, monkeypatch):
    folder = _prepared(tmp_path)
    monkeypatch.setattr(_atomic, "_LOCK_WAIT_S", 0.3, raising=False)
    outcome: list[BaseException | None] = []

    def publish():
        try:
            with _atomic.atomic_file_set(folder, NAMES, tag=TAG) as staging:
                _write(staging, b"new")
            outcome.append(None)
        except BaseException as error:  # reported below
            outcome.append(error)

    fd = _held(folder)
    try:
        thread = threading.Thread(target=publish)
        thread.start()
        thread.join(10)
        finished_while_held = not thread.is_alive()
    finally:
        os.close(fd)
        thread.join(10)
    assert finished_while_held, "waited for the folder's lock without end"
    assert isinstance(outcome[0], OSError) and str(folder) in str(outcome[0]) and "locked" in str(outcome[0])
    assert _set(folder) == {b"old"} and _staging(folder) == []


def test_the_demo_refuses_a_locked_out_before_training(tmp_path, monkeypatch):
    folder = _prepared(tmp_path)
    monkeypatch.setattr(_atomic, "_LOCK_WAIT_S", 0.3, raising=False)
    fd = _held(folder)
    try:
        with pytest.raises(ValueError, match=r"^--out: .*locked"):
            cli_demo._check_pictures_writable(folder)
    finally:
        os.close(fd)
    cli_demo._check_pictures_writable(folder)  # released: nothing to say


def _no_flock(*args, **kwargs):
    raise OSError(errno.ENOLCK, "No locks available")


def test_a_file_system_without_flock_still_gets_the_set(tmp_path, monkeypatch):
    """Where flock fails outright (some FUSE and network file systems) the set is published
    without the lock, as where there is no flock at all, not refused after the training."""
    folder = _prepared(tmp_path)
    monkeypatch.setattr(_atomic, "fcntl", types.SimpleNamespace(
        flock=_no_flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN))
    cli_demo._check_pictures_writable(folder)
    with _atomic.atomic_file_set(folder, NAMES, tag=TAG) as staging:
        _write(staging, b"new")
    assert _set(folder) == {b"new"} and _staging(folder) == []


@pytest.mark.parametrize("locks", ["none", "failing"])
def test_without_locks_a_running_writers_staging_folder_is_left_alone(tmp_path, monkeypatch, locks):
    """With no lock to tell a running writer from a dead one, a second writer removed the first's
    staging folder (its pictures drawn so far): the first then failed after all its work."""
    folder = _prepared(tmp_path)
    if locks == "none":
        monkeypatch.setattr(_atomic, "fcntl", None)
    else:
        monkeypatch.setattr(_atomic, "fcntl", types.SimpleNamespace(
            flock=_no_flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN))
    with ExitStack() as first:
        staging = first.enter_context(_atomic.atomic_file_set(folder, NAMES, tag=TAG))
        _write(staging, b"first")
        with _atomic.atomic_file_set(folder, NAMES, tag=TAG) as second:
            _write(second, b"second")
        assert _set(folder) == {b"second"}
        assert sorted(os.listdir(staging)) == sorted([*NAMES, ".owner"])
    assert _set(folder) == {b"first"} and _staging(folder) == []

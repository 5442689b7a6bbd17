"""The demo's pictures as one set: an interrupted or failed run (Ctrl-C, a full disk, an error
while drawing) leaves the pictures of the run before it, all of them, and none of its own; a
run killed outright leaves at most a hidden temporary folder, which the next run cleans up;
two runs into one folder leave one run's whole set; the user's other files are never touched.
Before, each picture replaced its predecessor as soon as it was drawn, so a run stopped after
two pictures left two new ones beside three old ones, and nothing said so."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import CHEAP_DEMO, run_cli_main

pytest.importorskip("matplotlib")

from latentspace import _atomic, plots  # noqa: E402
from latentspace.cli_demo import PICTURES  # noqa: E402

STAGING_TAG = "latentspace-demo"  # the demo's temporary folders: .latentspace-demo.<16 hex>.tmp
USER_FILES = {"notes.txt": b"mine", "latent_map.png.bak": b"my copy"}


_main = run_cli_main


def _old_set(folder) -> dict[str, bytes]:
    """An earlier run's pictures (stand-ins, told apart by their bytes) beside the user's files."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {name: f"old {name}".encode() for name in PICTURES} | USER_FILES
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return contents


def _contents(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def _failing_save(monkeypatch, at: int, error: BaseException) -> None:
    """plots._save (every picture's writer) raises `error` at its `at`-th call (from 0), after
    the pictures before it were drawn and written."""
    real, calls = plots._save, []

    def save(figure, path):
        calls.append(path)
        if len(calls) == at + 1:
            raise error
        return real(figure, path)

    monkeypatch.setattr(plots, "_save", save)


# ---------------------------------------------------------------------------------------
# latentspace demo


@pytest.mark.parametrize("at,error,code", [
    *[(at, KeyboardInterrupt(), 130) for at in range(len(PICTURES))],
    (2, OSError(errno.ENOSPC, "No space left on device"), 2),
    (4, OSError(errno.ENOSPC, "No space left on device"), 2),
])
def test_a_demo_stopped_while_drawing_keeps_the_old_set(tmp_path, capsys, monkeypatch, at, error, code):
    out = tmp_path / "pictures"
    before = _old_set(out)
    _failing_save(monkeypatch, at, error)
    got, printed, err = _main(capsys, *CHEAP_DEMO, "--out", str(out))
    assert got == code, err
    assert "pictures:" not in printed
    # the old pictures, every one, and the user's files; no new picture and no temporary file
    assert sorted(os.listdir(out)) == sorted(before)
    assert _contents(out) == before


def test_a_demo_stopped_while_drawing_into_a_new_folder_leaves_nothing(tmp_path, capsys, monkeypatch):
    _failing_save(monkeypatch, 3, KeyboardInterrupt())
    got, _, err = _main(capsys, *CHEAP_DEMO, "--out", str(tmp_path / "new" / "pictures"))
    assert got == 130, err
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone again


def test_a_demo_replaces_the_old_set_and_cleans_a_stale_temporary_folder(tmp_path, capsys):
    """A run killed outright (SIGKILL, a power cut) while drawing left its temporary folder; the
    next run removes it, and writes the whole new set."""
    out = tmp_path / "pictures"
    _old_set(out)
    stale = out / f".{STAGING_TAG}.0123456789abcdef.tmp"
    stale.mkdir()
    (stale / "latent_map.png").write_bytes(b"half a picture")
    (stale / ".owner").write_bytes(b"")  # its owner is gone: nobody holds its lock
    got, printed, err = _main(capsys, *CHEAP_DEMO, "--out", str(out))
    assert got == 0, err
    assert sorted(os.listdir(out)) == sorted([*PICTURES, *USER_FILES])
    after = _contents(out)
    for name in PICTURES:
        assert after[name].startswith(b"\x89PNG"), name
    assert {name: after[name] for name in USER_FILES} == USER_FILES
    assert f"pictures: 5 PNG files in {out.resolve()}: latent_map.png" in printed


def test_a_demo_leaves_a_running_demos_temporary_folder_alone(tmp_path, capsys):
    out = tmp_path / "pictures"
    out.mkdir()
    running = out / f".{STAGING_TAG}.fedcba9876543210.tmp"
    running.mkdir()
    (running / "latent_map.png").write_bytes(b"being drawn")
    with open(running / ".owner", "wb") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)  # as the run that made it holds it
        got, _, err = _main(capsys, *CHEAP_DEMO, "--out", str(out))
    assert got == 0, err
    assert (running / "latent_map.png").read_bytes() == b"being drawn"


# ---------------------------------------------------------------------------------------
# _atomic.atomic_file_set, the demo's helper

NAMES = ("a.png", "b.png", "c.png")


def _write_set(staging, label: str) -> None:
    for name in NAMES:
        (staging / name).write_bytes(f"{label} {name}".encode())


def _is_set(folder, label: str) -> bool:
    return all((folder / name).read_bytes() == f"{label} {name}".encode() for name in NAMES)


def _prepared(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes(f"old {name}".encode())
    (folder / "mine.txt").write_bytes(b"mine")
    return folder


def _staging_folders(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(f".{STAGING_TAG}.")]


def test_a_file_set_is_published_whole(tmp_path):
    folder = _prepared(tmp_path)
    with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
        assert staging.parent == folder and staging.name.startswith(f".{STAGING_TAG}.")
        _write_set(staging, "new")
        assert _is_set(folder, "old")  # nothing is published before the block ends
    assert _is_set(folder, "new")
    assert sorted(os.listdir(folder)) == sorted([*NAMES, "mine.txt"])


def test_a_file_set_missing_a_file_publishes_nothing(tmp_path):
    folder = _prepared(tmp_path)
    with pytest.raises(FileNotFoundError, match="c.png"):
        with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
            for name in NAMES[:2]:
                (staging / name).write_bytes(b"new")
    assert _is_set(folder, "old") and _staging_folders(folder) == []


def test_ctrl_c_while_publishing_is_held_until_the_set_is_whole(tmp_path, monkeypatch):
    """A SIGINT between two of the renames that publish the set would leave it mixed: it is
    held, and raised once the set is whole."""
    folder = _prepared(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    real, published = os.replace, []

    def replace(source, target):
        real(source, target)
        if os.path.dirname(target) == str(folder):
            published.append(target)
            if len(published) == 1:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
            _write_set(staging, "new")
    assert len(published) == len(NAMES)
    assert _is_set(folder, "new") and _staging_folders(folder) == []
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_a_rename_that_fails_while_publishing_puts_the_old_set_back(tmp_path, monkeypatch):
    folder = _prepared(tmp_path)
    (folder / "c.png").unlink()  # a file of the set that did not exist before stays absent
    real, published = os.replace, []

    def replace(source, target):
        if os.path.dirname(target) == str(folder) and ".tmp" in str(source):
            published.append(target)
            if len(published) == 3:
                raise OSError(errno.EIO, "Input/output error", str(source))
        real(source, target)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
            _write_set(staging, "new")
    assert sorted(os.listdir(folder)) == ["a.png", "b.png", "mine.txt"]
    assert (folder / "a.png").read_bytes() == b"old a.png" and (folder / "b.png").read_bytes() == b"old b.png"


def test_a_publish_cut_short_by_a_crash_is_completed_by_the_next_run(tmp_path):
    """A run killed between the renames (its journal written, a.png already moved): the next
    run moves the rest in, so the folder holds that run's whole set, whatever the next run does."""
    folder = _prepared(tmp_path)
    crashed = folder / f".{STAGING_TAG}.00000000000000aa.tmp"
    crashed.mkdir()
    _write_set(crashed, "crashed")
    os.replace(crashed / "a.png", folder / "a.png")
    (crashed / ".publishing").write_text("\n".join(NAMES) + "\n")
    with pytest.raises(RuntimeError, match="drawing failed"):
        with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG):
            raise RuntimeError("drawing failed")
    assert _is_set(folder, "crashed") and _staging_folders(folder) == []
    assert (folder / "mine.txt").read_bytes() == b"mine"


def test_only_the_helpers_own_temporary_folders_are_cleaned(tmp_path):
    folder = _prepared(tmp_path)
    for name in (f".{STAGING_TAG}.notahexname.tmp", f".{STAGING_TAG}.0123456789abcdef.tmp.keep", "other.tmp"):
        (folder / name).mkdir()
        (folder / name / "x").write_bytes(b"mine")
    with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
        _write_set(staging, "new")
    assert sorted(_staging_folders(folder)) == sorted([f".{STAGING_TAG}.notahexname.tmp",
                                                       f".{STAGING_TAG}.0123456789abcdef.tmp.keep"])
    assert (folder / "other.tmp" / "x").read_bytes() == b"mine"


def test_two_sets_written_at_once_never_interleave(tmp_path, monkeypatch):
    """Two writers publishing into one folder at the same time: the folder ends holding one
    writer's whole set (the last to publish), never some of each. The first writer's renames
    are slowed down and the second starts just after it, so that without a lock the second's
    first file lands last, and the first's others."""
    folder = _prepared(tmp_path)
    real = os.replace
    pause = {b"first": 0.03, b"second": 0.01}

    def slow_replace(source, target):
        label = Path(source).read_bytes().split(b" ")[0]
        real(source, target)
        if os.path.dirname(target) == str(folder):
            time.sleep(pause.get(label, 0))

    monkeypatch.setattr(_atomic.os, "replace", slow_replace)
    start = threading.Barrier(2)
    errors = []

    def publish(label, delay):
        try:
            with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
                _write_set(staging, label)
                start.wait()
                time.sleep(delay)
        except BaseException as error:  # reported below
            errors.append(error)

    for _ in range(3):
        threads = [threading.Thread(target=publish, args=args) for args in (("first", 0), ("second", 0.005))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert _is_set(folder, "first") or _is_set(folder, "second"), _contents(folder)
        assert _staging_folders(folder) == []


def test_a_file_set_waits_for_another_writers_publish(tmp_path):
    """The folder's lock, held by another writer, holds the publish back until it is released."""
    folder = _prepared(tmp_path)
    done = threading.Event()

    def publish():
        with _atomic.atomic_file_set(folder, NAMES, tag=STAGING_TAG) as staging:
            _write_set(staging, "new")
        done.set()

    with _atomic._folder_lock(folder):
        thread = threading.Thread(target=publish)
        thread.start()
        assert not done.wait(0.5)
        assert _is_set(folder, "old")
    thread.join(10)
    assert done.is_set() and _is_set(folder, "new")

"""A dataset file replaced on disk while it is being loaded (another process saving a new
version atomically: write a temporary file, os.replace it over the path).

The loaders read each file through one open file, so the array is the one of the file they
opened, whole: never the header (shape, dtype, offsets) of one file applied to the bytes of
the other. Each test replaces the file at a fixed point of the load, deterministically: right
after the loader first opens the path, or while it reads a header (monkeypatched numpy or
h5py functions that rename the other file over the path, then go on). Each test also checks
that the replacement happened, so none can pass by never replacing anything.
"""

from __future__ import annotations

import builtins
import io
import os

import numpy as np
import pytest

from latentspace import datasets

try:  # numpy >= 2 keeps the code of np.lib.format here; np.load and open_memmap call it
    from numpy.lib import _format_impl as _numpy_format
except ImportError:  # numpy 1.x: np.lib.format is the code itself
    _numpy_format = np.lib.format


def _replace_after_first_open(monkeypatch, path, replacement):
    """From now on, the first open() of `path` renames `replacement` over it just after it
    is opened (what is open stays the old file). Returns the list the replacement is
    recorded in. Patches io.open too: zipfile opens with it."""
    done = []
    real_open = builtins.open

    def opening(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if not done and not isinstance(file, int) and os.fspath(file) == os.fspath(path):
            os.replace(replacement, path)
            done.append(os.fspath(file))
        return handle

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)
    return done


def _replace_on_first_call(monkeypatch, name, path, replacement):
    """numpy's format function `name` (in np.lib.format and where numpy's own code looks it
    up) renames `replacement` over `path` on its first call, then reads as usual."""
    done = []
    original = getattr(np.lib.format, name)

    def replacing(*args, **kwargs):
        if not done:
            os.replace(replacement, path)
            done.append(name)
        return original(*args, **kwargs)

    for module in {np.lib.format, _numpy_format}:
        monkeypatch.setattr(module, name, replacing)
    return done


def _original_and_other(rng):
    """The file's array and its replacement: another shape, dtype and contents, and larger,
    so the first file's offsets and shape still fit inside the second (a mix maps instead
    of failing)."""
    return rng.random((50, 7)).astype(np.float32), rng.random((80, 9))


def _assert_is(loaded, expected, mapped):
    assert loaded.shape == expected.shape and loaded.dtype == expected.dtype
    np.testing.assert_array_equal(loaded, expected)
    assert isinstance(loaded, np.memmap) == mapped


# ---------------------------------------------------------------------------------------
# .npy


@pytest.mark.parametrize("mmap", [True, False])
def test_npy_replaced_after_it_is_opened(tmp_path, rng, monkeypatch, mmap):
    """load_npy opened the path to look for a zip prefix, then np.load opened it again: the
    array came from the new file (mmap=True: numpy opened it twice more by name)."""
    original, other = _original_and_other(rng)
    np.save(tmp_path / "x.npy", original)
    np.save(tmp_path / "other.npy", other)
    done = _replace_after_first_open(monkeypatch, tmp_path / "x.npy", tmp_path / "other.npy")
    loaded = datasets.load_npy(tmp_path / "x.npy", mmap=mmap)
    assert done
    _assert_is(loaded, original, mapped=mmap)
    assert np.load(tmp_path / "x.npy").shape == other.shape  # the path holds the new file


def test_mapped_npy_replaced_while_its_header_is_read(tmp_path, rng, monkeypatch):
    """np.load(mmap_mode="r") read the header from one open file, then np.memmap opened the
    path by name: the old file's shape and dtype over the new file's bytes."""
    original, other = _original_and_other(rng)
    np.save(tmp_path / "x.npy", original)
    np.save(tmp_path / "other.npy", other)
    done = _replace_on_first_call(monkeypatch, "read_magic", tmp_path / "x.npy", tmp_path / "other.npy")
    loaded = datasets.load_npy(tmp_path / "x.npy", mmap=True)
    assert done
    _assert_is(loaded, original, mapped=True)
    del loaded
    # and the new file, loaded afterwards, is the new array (whole)
    _assert_is(datasets.load_npy(tmp_path / "x.npy", mmap=True), other, mapped=True)


# ---------------------------------------------------------------------------------------
# .npz


@pytest.mark.parametrize("compressed, mmap", [(False, True), (False, False), (True, False)])
def test_npz_replaced_after_it_is_opened(tmp_path, rng, monkeypatch, compressed, mmap):
    """load_npz opened the path three times (zipfile.is_zipfile, zipfile.ZipFile, and the
    mapped member's header), and np.memmap a fourth: the array came from the new file."""
    save = np.savez_compressed if compressed else np.savez
    original, other = _original_and_other(rng)
    save(tmp_path / "d.npz", x=original)
    save(tmp_path / "other.npz", x=other)
    done = _replace_after_first_open(monkeypatch, tmp_path / "d.npz", tmp_path / "other.npz")
    loaded = datasets.load_npz(tmp_path / "d.npz", "x", mmap=mmap)
    assert done
    _assert_is(loaded, original, mapped=mmap)


def test_mapped_npz_member_replaced_while_its_header_is_read(tmp_path, rng, monkeypatch):
    """The member's .npy header was read from one open file and np.memmap opened the path
    by name: the old member's shape and offset over the new file's bytes."""
    original, other = _original_and_other(rng)
    np.savez(tmp_path / "d.npz", x=original)
    np.savez(tmp_path / "other.npz", x=other)
    done = _replace_on_first_call(monkeypatch, "read_array_header_1_0", tmp_path / "d.npz",
                                  tmp_path / "other.npz")
    loaded = datasets.load_npz(tmp_path / "d.npz", "x", mmap=True)
    assert done
    _assert_is(loaded, original, mapped=True)


# ---------------------------------------------------------------------------------------
# ann-benchmarks HDF5


def _ann_file(h5py, path, train):
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "euclidean"
        f.create_dataset("train", data=train)
        f.create_dataset("test", data=train[:3])
        f.create_dataset("neighbors", data=np.arange(3 * 4, dtype=np.int32).reshape(3, 4))
        f.create_dataset("distances", data=np.linspace(0, 1, 3 * 4, dtype=np.float32).reshape(3, 4))


def test_mapped_hdf5_replaced_after_it_is_opened(tmp_path, rng, monkeypatch):
    """h5py read the layout (shapes, offsets) from the file it opened, and np.memmap opened
    the path by name: the old file's offsets and shapes over the new file's bytes."""
    h5py = pytest.importorskip("h5py")
    original, other = _original_and_other(rng)
    _ann_file(h5py, tmp_path / "a.hdf5", original)
    _ann_file(h5py, tmp_path / "other.hdf5", other)
    with h5py.File(tmp_path / "a.hdf5", "r") as f:
        expected = {name: f[name][()] for name in ("train", "test", "neighbors", "distances")}
    done = []
    real_file = h5py.File

    def opening(*args, **kwargs):
        handle = real_file(*args, **kwargs)
        if not done:
            os.replace(tmp_path / "other.hdf5", tmp_path / "a.hdf5")
            done.append(args)
        return handle

    monkeypatch.setattr(h5py, "File", opening)
    data = datasets.load_ann_benchmarks(tmp_path / "a.hdf5", mmap=True)
    assert done
    for name, array in expected.items():
        _assert_is(getattr(data, name), array, mapped=True)

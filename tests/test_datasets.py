"""Datasets: the bundled digits, a stratified split, .npy / .npz files (memory-mapped when
large) and the ann-benchmarks HDF5 layout (skipped without h5py)."""

from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np
import pytest

from latentspace import datasets


def _assert_every_reader_refuses(path, message: str) -> None:
    """load_ann_benchmarks (mapped or not) and the CLI's block reader refuse the file alike."""
    from latentspace._streamed_inputs import open_rows

    for mmap in (None, False, True):
        with pytest.raises(ValueError, match=message):
            datasets.load_ann_benchmarks(path, mmap=mmap)
    with pytest.raises(ValueError, match=message):
        with open_rows(path):
            pass


def test_load_digits():
    images, labels = datasets.load_digits()
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0 and images.flags.c_contiguous
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(np.unique(images * 16), np.arange(17))  # 0..16 / 16


def test_stratified_split():
    _, labels = datasets.load_digits()
    train, test = datasets.stratified_split(labels, test_fraction=0.3, seed=0)
    assert len(train) + len(test) == 1797
    assert np.intersect1d(train, test).size == 0
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    for label in range(10):
        members = np.sum(labels == label)
        assert np.sum(labels[test] == label) == round(0.3 * members)
    again = datasets.stratified_split(labels, test_fraction=0.3, seed=0)
    np.testing.assert_array_equal(again[1], test)
    other = datasets.stratified_split(labels, test_fraction=0.3, seed=1)
    assert not np.array_equal(other[1], test)
    with pytest.raises(ValueError, match=r"test_fraction: expected a finite number in \(0, 1\)"):
        datasets.stratified_split(labels, test_fraction=1.0)
    with pytest.raises(ValueError, match="labels: expected a 1-d integer array"):
        datasets.stratified_split(labels.astype(float))


@pytest.mark.parametrize("fraction,empty", [(0.999, "train"), (0.001, "test")])
def test_a_split_that_leaves_a_part_empty_is_refused(fraction, empty):
    """0.999 of the digits' classes (about 180 rows each) rounds to all of them: the train part
    came back empty, and 0.001 the test part, without a word."""
    _, labels = datasets.load_digits()
    with pytest.raises(ValueError, match=f"test_fraction: {fraction} leaves the {empty} part empty \\(1797 labels, 10"):
        datasets.stratified_split(labels, test_fraction=fraction)
    train, test = datasets.stratified_split(labels, test_fraction=0.01)  # 2 of each class: both parts hold rows
    assert len(test) == 20 and len(train) == 1777


# ---------------------------------------------------------------------------------------
# .npy / .npz


@pytest.mark.parametrize("mmap", [None, True, False])
def test_load_npy(tmp_path, rng, mmap):
    x = rng.random((50, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    loaded = datasets.load_npy(tmp_path / "x.npy", mmap=mmap)
    np.testing.assert_array_equal(loaded, x)
    assert isinstance(loaded, np.memmap) == bool(mmap)


def test_large_npy_is_mapped_automatically(tmp_path, rng, monkeypatch):
    x = rng.random((50, 7))
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(datasets, "MMAP_THRESHOLD_BYTES", 1000)
    loaded = datasets.load_npy(tmp_path / "x.npy")
    assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
    np.testing.assert_array_equal(loaded, x)


@pytest.mark.parametrize("mmap", [None, True, False])
@pytest.mark.parametrize("order", ["C", "F"])
def test_load_npz_uncompressed(tmp_path, rng, mmap, order):
    x = np.asarray(rng.random((40, 5)), order=order)
    labels = rng.integers(0, 3, 40)
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    loaded = datasets.load_npz(tmp_path / "d.npz", "x", mmap=mmap)
    np.testing.assert_array_equal(loaded, x)
    assert isinstance(loaded, np.memmap) == bool(mmap)
    np.testing.assert_array_equal(datasets.load_npz(tmp_path / "d.npz", "labels", mmap=mmap), labels)


def test_large_npz_member_is_mapped_automatically(tmp_path, rng, monkeypatch):
    x = rng.random((60, 9)).astype(np.float32)
    np.savez(tmp_path / "d.npz", only=x)
    monkeypatch.setattr(datasets, "MMAP_THRESHOLD_BYTES", 1000)
    loaded = datasets.load_npz(tmp_path / "d.npz")  # the only array: no key needed
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, x)


def test_compressed_npz(tmp_path, rng):
    x = rng.random((30, 4))
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.testing.assert_array_equal(datasets.load_npz(tmp_path / "c.npz"), x)
    with pytest.raises(ValueError, match="mmap: array 'x' of .* is compressed and cannot be memory-mapped"):
        datasets.load_npz(tmp_path / "c.npz", mmap=True)


def test_mapped_npz_member_with_zip_extra_fields(tmp_path, rng):
    """The local header's extra field can differ from the central directory's: the offset of
    the data must come from the local header."""
    x = rng.random((20, 3))
    np.save(tmp_path / "x.npy", x)
    with zipfile.ZipFile(tmp_path / "e.npz", "w", zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo("x.npy")
        info.extra = b"\xfe\xca\x04\x00abcd"  # an unknown 8-byte extra block
        archive.writestr(info, (tmp_path / "x.npy").read_bytes())
    np.testing.assert_array_equal(datasets.load_npz(tmp_path / "e.npz", mmap=True), x)


def test_npy_npz_errors(tmp_path, rng):
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.ones(3))
    with pytest.raises(ValueError, match=r"key: .* holds 2 arrays \(a, b\); pass key="):
        datasets.load_npz(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=r"key: .* has no array 'c' \(it holds: a, b\)"):
        datasets.load_npz(tmp_path / "two.npz", "c")
    with pytest.raises(ValueError, match="an .npz archive, not a .npy array; use load_npz"):
        datasets.load_npy(tmp_path / "two.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy array"):
        datasets.load_npy(tmp_path / "objects.npy")
    np.savez(tmp_path / "objects.npz", o=np.array([{"a": 1}], dtype=object))
    for mmap in (False, True):
        with pytest.raises(ValueError, match="(not readable|object arrays are not loaded)"):
            datasets.load_npz(tmp_path / "objects.npz", mmap=mmap)
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="has dtype <U1; expected real numbers"):
        datasets.load_npy(tmp_path / "text.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="not a readable .npy array"):
        datasets.load_npy(tmp_path / "junk.npy")
    with pytest.raises(ValueError, match="not an .npz archive"):
        datasets.load_npz(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError):
        datasets.load_npy(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError):
        datasets.load_npz(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="mmap: expected True, False or None"):
        datasets.load_npy(tmp_path / "junk.npy", mmap="yes")


@pytest.mark.parametrize("name", ["fifo.npy", "fifo.npz", "fifo.hdf5"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, name):
    """Opening a FIFO with no writer blocks forever; no loader can use one (they seek and
    stat): refused up front, as a folder is."""
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match=f"{name}: not a regular file"):
        datasets.load_array(tmp_path / name)
    folder = tmp_path / ("folder" + os.path.splitext(name)[1])
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        datasets.load_array(folder)


def test_corrupted_npz_member_is_a_value_error(tmp_path, rng):
    """A member whose bytes fail the zip CRC: ValueError naming the file (zipfile's BadZipFile
    is no ValueError, so the CLI printed a traceback)."""
    np.savez(tmp_path / "a.npz", a=rng.standard_normal((10, 4)))
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[100:110] = b"x" * 10  # inside the member's data
    (tmp_path / "a.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="a.npz: array 'a' is not readable"):
        datasets.load_npz(tmp_path / "a.npz", mmap=False)


def _two_arrays(path, rng, compressed=False):
    """An archive of two members, as in the bug report (np.savez: a float32, b float64)."""
    save = np.savez_compressed if compressed else np.savez
    save(path, a=rng.standard_normal((10, 3)).astype(np.float32), b=rng.standard_normal((10, 3)))
    return bytearray(path.read_bytes())


# What is damaged: (the structure's signature, the damaged byte's offset from it). The
# central directory entry of "a.npy" comes first; the end record says where it starts.
_ZIP_FIELDS = {"central directory signature": (b"PK\x01\x02", 0), "version needed": (b"PK\x01\x02", 6),
               "encrypted flag": (b"PK\x01\x02", 8), "compression method": (b"PK\x01\x02", 10),
               "central directory size": (b"PK\x05\x06", 13), "central directory offset": (b"PK\x05\x06", 17)}


@pytest.mark.parametrize("field", list(_ZIP_FIELDS))
@pytest.mark.parametrize("mmap", [None, False, True])
def test_damaged_npz_archive_is_a_value_error(tmp_path, rng, field, mmap):
    """A flipped byte in the archive's structure raised zipfile.BadZipFile, NotImplementedError
    ('That compression method is not supported') or RuntimeError, which are no ValueErrors:
    the CLI printed a traceback. Now: ValueError naming the file."""
    raw = _two_arrays(tmp_path / "s.npz", rng)
    signature, offset = _ZIP_FIELDS[field]
    raw[(raw.rindex(signature) if signature == b"PK\x05\x06" else raw.index(signature)) + offset] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    # mmap=True may refuse first, as the member no longer reads as uncompressed: also fine
    expected = r"bad.npz" if mmap else r"bad.npz: not a readable .npz file \(\w+: "
    with pytest.raises(ValueError, match=expected):
        datasets.load_npz(tmp_path / "bad.npz", "a", mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
def test_every_flipped_npy_byte_is_a_value_error_or_loads(tmp_path, rng, mmap):
    """Whatever byte of a .npy file is damaged, load_npy raises ValueError naming the file or
    loads. Before: a header byte turned into a quote or a bracket let numpy's
    tokenize.TokenError (or SyntaxError) through."""
    source = tmp_path / "a.npy"
    np.save(source, rng.random((5, 3)).astype(np.float32))
    raw = source.read_bytes()
    path = tmp_path / "bad.npy"
    header_end = raw.index(b"\n") + 1
    for position in range(len(raw)):
        replacements = (b"'", b'"', b"(", b"{", bytes([raw[position] ^ 0xFF])) if position < header_end \
            else (bytes([raw[position] ^ 0xFF]),)
        for replacement in replacements:
            damaged = bytearray(raw)
            damaged[position:position + 1] = replacement
            path.write_bytes(bytes(damaged))
            try:
                datasets.load_npy(path, mmap=mmap)
            except ValueError as error:
                assert str(path) in str(error), (position, replacement, error)
            except Exception as error:  # noqa: BLE001 - the test is that nothing else escapes
                pytest.fail(f"byte {position} set to {replacement!r}, mmap={mmap}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("compressed", [False, True])
def test_every_flipped_npz_byte_is_a_value_error_or_loads(tmp_path, rng, compressed):
    """Whatever byte is damaged, load_npz raises ValueError naming the file (a damaged stored
    member that is memory-mapped cannot be CRC-checked and may load). Before: BadZipFile,
    NotImplementedError, RuntimeError, OSError, zlib.error, SyntaxError, TokenError."""
    raw = _two_arrays(tmp_path / "s.npz", rng, compressed)
    path = tmp_path / "bad.npz"
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        for mmap in (False,) if compressed else (False, True):
            try:
                datasets.load_npz(path, "a", mmap=mmap)
            except ValueError as error:
                assert str(path) in str(error), (position, mmap, error)
            except Exception as error:  # noqa: BLE001 - the test is that nothing else escapes
                pytest.fail(f"byte {position} flipped, mmap={mmap}: {type(error).__name__}: {error}")


def test_load_array_dispatches_on_suffix(tmp_path, rng):
    x = rng.random((10, 3))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", data=x)
    np.testing.assert_array_equal(datasets.load_array(tmp_path / "x.npy"), x)
    np.testing.assert_array_equal(datasets.load_array(tmp_path / "x.npz"), x)
    with pytest.raises(ValueError, match="path: expected a .npy, .npz, .hdf5 or .h5 file"):
        datasets.load_array(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="key: a .npy file holds one array"):
        datasets.load_array(tmp_path / "x.npy", key="data")


# ---------------------------------------------------------------------------------------
# ann-benchmarks HDF5


def _ann_file(path, rng, *, chunked=False, distance="angular"):
    h5py = pytest.importorskip("h5py")
    train = rng.random((100, 8)).astype(np.float32)
    test = rng.random((5, 8)).astype(np.float32)
    neighbors = rng.integers(0, 100, (5, 10)).astype(np.int32)
    distances = rng.random((5, 10)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        options = dict(chunks=True, compression="gzip") if chunked else {}
        f.create_dataset("train", data=train, **options)
        f.create_dataset("test", data=test)
        f.create_dataset("neighbors", data=neighbors)
        f.create_dataset("distances", data=distances)
    return train, test, neighbors, distances


@pytest.mark.parametrize("mmap", [None, True, False])
def test_load_ann_benchmarks(tmp_path, rng, mmap):
    train, test, neighbors, distances = _ann_file(tmp_path / "a.hdf5", rng)
    data = datasets.load_ann_benchmarks(tmp_path / "a.hdf5", mmap=mmap)
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.test, test)
    np.testing.assert_array_equal(data.neighbors, neighbors)
    np.testing.assert_array_equal(data.distances, distances)
    assert data.distance == "angular" and data.metric == "cosine"
    assert isinstance(data.train, np.memmap) == bool(mmap)
    np.testing.assert_array_equal(datasets.load_array(tmp_path / "a.hdf5"), train)
    np.testing.assert_array_equal(datasets.load_array(tmp_path / "a.hdf5", key="test"), test)


def test_ann_benchmarks_chunked_and_euclidean(tmp_path, rng):
    train, *_ = _ann_file(tmp_path / "c.h5", rng, chunked=True, distance="euclidean")
    data = datasets.load_ann_benchmarks(tmp_path / "c.h5")
    np.testing.assert_array_equal(data.train, train)
    assert data.metric == "l2"
    with pytest.raises(ValueError, match="mmap: dataset /train of .* is chunked or compressed"):
        datasets.load_ann_benchmarks(tmp_path / "c.h5", mmap=True)


def test_ann_benchmarks_errors(tmp_path, rng):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "partial.hdf5", "w") as f:
        f.create_dataset("train", data=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="not in the ann-benchmarks layout \\(missing datasets: test, neighbors, distances\\)"):
        datasets.load_ann_benchmarks(tmp_path / "partial.hdf5")
    (tmp_path / "junk.hdf5").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        datasets.load_ann_benchmarks(tmp_path / "junk.hdf5")
    with pytest.raises(FileNotFoundError):
        datasets.load_ann_benchmarks(tmp_path / "missing.hdf5")
    _ann_file(tmp_path / "a.hdf5", rng)
    with pytest.raises(ValueError, match="key: expected 'train', 'test', 'neighbors' or 'distances'"):
        datasets.load_array(tmp_path / "a.hdf5", key="queries")


@pytest.mark.parametrize("error", [
    OSError("Can't synchronously read data (actual len exceeds EOA)"),
    KeyError("Unable to synchronously open object (bad object header version number)"),
    RuntimeError("Unable to synchronously check link existence (addr overflow, addr = 1072)"),
    TypeError("Unknown string encoding (value 14)"),
])
@pytest.mark.parametrize("where", ["names", "datasets", "attribute"])
def test_damage_inside_an_hdf5_file_is_a_value_error(tmp_path, rng, monkeypatch, error, where):
    """What h5py raised for bytes of an ann-benchmarks file flipped one at a time (each of these
    messages came from such a file, 2026-11-27), wherever the loader meets it, becomes a
    ValueError naming the file; they escaped as they were. (Not a test that flips bytes: a
    damaged global heap or attribute message can crash or hang libhdf5 itself, docs/models.md.)"""
    h5py = pytest.importorskip("h5py")
    _ann_file(tmp_path / "a.hdf5", rng)

    def fail(*args, **kwargs):
        raise error

    target = {"names": (h5py.File, "__contains__"), "datasets": (datasets, "_h5_array"),
              "attribute": (h5py.AttributeManager, "get")}[where]
    monkeypatch.setattr(*target, fail)
    with pytest.raises(ValueError, match=f"a.hdf5: a damaged HDF5 file \\({type(error).__name__}: "):
        datasets.load_ann_benchmarks(tmp_path / "a.hdf5")


def test_a_compact_hdf5_dataset_is_not_called_unwritten(tmp_path):
    """A small dataset in HDF5's compact layout keeps its data in its object header: no offset
    of its own, as an unwritten contiguous dataset. mmap=True said it had 'no data stored in
    the file (never written)', and the data was there (mmap=False reads it)."""
    h5py = pytest.importorskip("h5py")
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    with h5py.File(tmp_path / "compact.hdf5", "w") as f:
        create = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        create.set_layout(h5py.h5d.COMPACT)
        dataset = h5py.h5d.create(f.id, b"train", h5py.h5t.NATIVE_FLOAT, h5py.h5s.create_simple(data.shape), dcpl=create)
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
        f.create_dataset("test", data=data)
        f.create_dataset("neighbors", data=np.zeros((3, 2), np.int64))
        f.create_dataset("distances", data=np.zeros((3, 2), np.float32))
        f.attrs["distance"] = "euclidean"
    np.testing.assert_array_equal(datasets.load_array(tmp_path / "compact.hdf5", "train", mmap=False), data)
    with pytest.raises(ValueError, match=r"mmap: dataset /train of .* is stored in its object header \(HDF5's "
                                         r"compact layout\) and cannot be memory-mapped; pass mmap=False"):
        datasets.load_array(tmp_path / "compact.hdf5", "train", mmap=True)


def _part_elsewhere(f, h5py, how: str, other, train: np.ndarray) -> None:
    """f["train"] with its data in the file `other`, as `how` says."""
    if how == "external link":
        f["train"] = h5py.ExternalLink(str(other), "/data")
    elif how == "link through a group elsewhere":
        f["group"] = h5py.ExternalLink(str(other), "/")
        f["train"] = h5py.SoftLink("/group/data")
    elif how == "soft link written with '.'":
        f["elsewhere"] = h5py.ExternalLink(str(other), "/data")
        f["train"] = h5py.SoftLink("/./elsewhere")
    elif how == "external storage":
        other.write_bytes(train.tobytes())
        f.create_dataset("train", shape=train.shape, dtype=train.dtype, external=[(str(other), 0, train.nbytes)])
    else:  # a virtual dataset
        layout = h5py.VirtualLayout(shape=train.shape, dtype=train.dtype)
        layout[:] = h5py.VirtualSource(str(other), "data", shape=train.shape)
        f.create_virtual_dataset("train", layout, fillvalue=0)


@pytest.mark.parametrize("how", ["external link", "link through a group elsewhere", "soft link written with '.'",
                                 "external storage", "virtual"])
def test_ann_benchmarks_data_in_another_file_is_refused(tmp_path, rng, how):
    """A part whose data is in another file, named by the HDF5 file: HDF5 opened whatever it
    names, and blocked forever on a FIFO (Ctrl-C did not stop it), read a device, or (a virtual
    dataset whose file is missing) gave its fill value as rows without a word."""
    h5py = pytest.importorskip("h5py")
    parts = _ann_parts(rng)
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other.create_dataset("data", data=parts["train"])
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        _part_elsewhere(f, h5py, how, tmp_path / ("other.bin" if how == "external storage" else "other.h5"),
                        parts["train"])
        for name in ("test", "neighbors", "distances"):
            f.create_dataset(name, data=parts[name])
    message = (re.escape(f"{tmp_path / 'a.hdf5'}: ")
               + r"(dataset /)?train .*another file.*; expected its data in this file")
    _assert_every_reader_refuses(tmp_path / "a.hdf5", message)


@pytest.mark.parametrize("part, value, message", [
    ("neighbors", np.int32(3), "neighbors must be 2-d (k neighbours of each query), got shape ()"),
    ("neighbors", np.zeros(2, np.int32), "neighbors must be 2-d (k neighbours of each query), got shape (2,)"),
    ("distances", np.float32(1), "distances must be 2-d (k neighbours of each query), got shape ()"),
    ("distances", np.zeros((2, 4), np.float32), "distances has shape (2, 4) but neighbors (2, 3)"),
])
def test_ann_benchmarks_neighbors_and_distances_of_another_shape(tmp_path, rng, part, value, message):
    """A scalar neighbors escaped as IndexError ('tuple index out of range': a traceback from the
    CLI), and distances were not checked at all."""
    from latentspace._streamed_inputs import open_rows

    h5py = pytest.importorskip("h5py")
    parts = {**_ann_parts(rng), part: value}
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        for name, data in parts.items():
            f.create_dataset(name, data=data)
    expected = re.escape(f"{tmp_path / 'a.hdf5'}: {message}")
    with pytest.raises(ValueError, match=expected):
        datasets.load_ann_benchmarks(tmp_path / "a.hdf5")
    with pytest.raises(ValueError, match=expected):
        with open_rows(tmp_path / "a.hdf5"):
            pass


def test_ann_benchmarks_part_compressed_with_a_filter_not_installed(tmp_path, rng):
    """A dataset compressed with a filter this HDF5 has no plugin for (blosc, 32001: ann
    datasets compressed with hdf5plugin) was called "a damaged HDF5 file (OSError: Can't
    synchronously read data (can't open directory (/usr/local/lib/plugin)...))"."""
    h5py = pytest.importorskip("h5py")
    if h5py.h5z.filter_avail(32001):
        pytest.skip("this HDF5 has the blosc plugin")
    parts = _ann_parts(rng)
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        create = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        create.set_chunk(parts["train"].shape)
        create.set_filter(32001, h5py.h5z.FLAG_OPTIONAL, (0,))
        space = h5py.h5s.create_simple(parts["train"].shape)
        train = h5py.h5d.create(f.id, b"train", h5py.h5t.IEEE_F32LE, space, dcpl=create)
        train.write_direct_chunk((0, 0), parts["train"].tobytes(), filter_mask=0)
        for name in ("test", "neighbors", "distances"):
            f.create_dataset(name, data=parts[name])
    message = re.escape(f"{tmp_path / 'a.hdf5'}: dataset /train is compressed with HDF5 filter 32001, which this "
                        "HDF5 cannot decode")
    _assert_every_reader_refuses(tmp_path / "a.hdf5", message)


def test_ann_benchmarks_without_h5py(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match=r"needs h5py: pip install 'latentspace\[hdf5\]'"):
        datasets.load_ann_benchmarks(tmp_path / "a.hdf5")


# ---------------------------------------------------------------------------------------
# Review: inputs that were misread or escaped as other errors


def test_a_npy_holding_the_zip_end_signature_still_loads(tmp_path):
    """A .npy whose last 64 KiB hold the bytes PK\\x05\\x06 (a zip's end record signature:
    any uint8 or int32 data can) passed zipfile.is_zipfile and was refused as "an .npz
    archive". What a file is is told by its first bytes, as np.load tells it."""
    x = np.zeros((100, 16), dtype=np.float32)
    x.view(np.uint8).reshape(-1)[-64:-60] = np.frombuffer(b"PK\x05\x06", np.uint8)
    np.save(tmp_path / "x.npy", x)
    assert zipfile.is_zipfile(tmp_path / "x.npy")  # the trap: zipfile searches the tail
    for mmap in (None, True, False):
        np.testing.assert_array_equal(datasets.load_npy(tmp_path / "x.npy", mmap=mmap), x)
    np.savez(tmp_path / "a.npz", a=x)
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npz").read_bytes())
    with pytest.raises(ValueError, match="an .npz archive, not a .npy array"):
        datasets.load_npy(tmp_path / "a.npy")


@pytest.mark.parametrize("rows", [5, 20])
def test_mapped_npz_member_must_hold_the_data_its_header_claims(tmp_path, rng, rows):
    """An uncompressed member whose .npy header claims more (or fewer) rows than the member
    holds: memory-mapping it read the next member's bytes as data (or silently dropped
    rows), where reading it (mmap=False) fails the CRC. Now both raise ValueError."""
    np.savez(tmp_path / "s.npz", a=rng.standard_normal((10, 3)).astype(np.float32), b=rng.standard_normal((10, 3)))
    raw = bytearray((tmp_path / "s.npz").read_bytes())
    at = raw.index(b"'shape': (10, 3)")
    raw[at : at + 16] = f"'shape': ({rows:2d}, 3)".encode()
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    for mmap in (True, False):
        with pytest.raises(ValueError, match="bad.npz: array 'a' is not readable"):
            datasets.load_npz(tmp_path / "bad.npz", "a", mmap=mmap)


def test_mapped_npz_member_past_the_end_of_the_file(tmp_path):
    """A stored member whose .npy header and zip sizes agree on more bytes than the file
    holds: the check is against the size of the open file (os.fstat), named in the error
    (np.memmap said only "mmap length is greater than file size")."""
    header = io.BytesIO()
    np.lib.format.write_array(header, np.arange(30.0).reshape(10, 3))
    npy = header.getvalue().replace(b"(10, 3)", b"(99, 3)")  # 99 rows claimed, 10 stored
    with zipfile.ZipFile(tmp_path / "x.npz", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x.npy", npy)
    raw = bytearray((tmp_path / "x.npz").read_bytes())
    claimed = len(npy) + (99 - 10) * 3 * 8
    entry = raw.index(b"PK\x01\x02")  # the central directory's sizes, as the header's shape
    raw[entry + 20 : entry + 28] = claimed.to_bytes(4, "little") * 2
    (tmp_path / "x.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"x.npz: array 'x' is not readable \(its data runs past the end of "
                                         rf"the file: \d+ bytes needed, the file has {len(raw)}\)"):
        datasets.load_npz(tmp_path / "x.npz", mmap=True)


@pytest.mark.parametrize("shape", [(10**12, 3), (10, 10**12), (2**40, 2**40)])
@pytest.mark.parametrize("mmap", [None, False, True])
def test_a_npy_header_claiming_more_than_the_file_holds_names_the_file(tmp_path, shape, mmap):
    """Read (not mapped), numpy allocated the array the header claims before reading a byte:
    a claim of terabytes raised MemoryError ("Unable to allocate 233. TiB"), naming no file,
    and `latentspace train` exited 1 with it; mapped, the same file was a ValueError."""
    raw = io.BytesIO()
    np.lib.format.write_array(raw, np.arange(30.0, dtype=np.float32).reshape(10, 3))
    claimed = raw.getvalue().replace(b"'shape': (10, 3)", f"'shape': {shape}".encode())
    claimed = claimed.replace(b" " * (len(claimed) - len(raw.getvalue())) + b"\n", b"\n", 1)
    (tmp_path / "x.npy").write_bytes(claimed)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'x.npy'}: not a readable .npy array (")):
        datasets.load_npy(tmp_path / "x.npy", mmap=mmap)


@pytest.mark.parametrize("key", [None, "x"])
@pytest.mark.parametrize("methods", [(zipfile.ZIP_STORED, zipfile.ZIP_STORED),
                                     (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)])
def test_an_archive_holding_two_members_of_one_name_is_refused(tmp_path, rng, key, methods):
    """Two members named x.npy (zipfile writes them, with a warning): key=None said the archive
    "holds 2 arrays (x, x); pass key= to pick one", which no key can, and key="x" read the last
    one, whichever a listing of the archive shows."""
    from latentspace._streamed_inputs import open_rows

    import warnings

    for method, rows in zip(methods, (3, 5)):
        with zipfile.ZipFile(tmp_path / "d.npz", "a", compression=method) as archive, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Duplicate name: 'x.npy'"
            archive.writestr("x.npy", _npy_member(rng.random((rows, 2))))
    message = re.escape(f"{tmp_path / 'd.npz'}: holds 2 members named 'x.npy'")
    for mmap in (None, False):
        with pytest.raises(ValueError, match=message):
            datasets.load_npz(tmp_path / "d.npz", key, mmap=mmap)
    with pytest.raises(ValueError, match=message):
        with open_rows(tmp_path / "d.npz", key):
            pass


def _npy_member(array: np.ndarray) -> bytes:
    raw = io.BytesIO()
    np.lib.format.write_array(raw, array)
    return raw.getvalue()


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
@pytest.mark.parametrize("shape", [(10**12, 3), (10, 10**12)])
def test_a_member_header_claiming_terabytes_is_refused_before_it_is_read(tmp_path, method, shape):
    """numpy allocates the array a member's header claims before reading its data: load_npz
    (`latentspace train`, --labels, --weights) raised MemoryError ("Unable to allocate 233.
    TiB"), naming no file. The claim is checked against the member's size first, as the CLI's
    streamed reads check it."""
    raw = _npy_member(np.arange(30.0, dtype=np.float32).reshape(10, 3))
    claimed = raw.replace(b"'shape': (10, 3)", f"'shape': {shape}".encode())
    claimed = claimed.replace(b" " * (len(claimed) - len(raw)) + b"\n", b"\n", 1)
    with zipfile.ZipFile(tmp_path / "c.npz", "w", compression=method) as archive:
        archive.writestr("x.npy", claimed)
    for mmap in (None, False):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'c.npz'}: array 'x' is not readable "
                                                       "(EOF: reading array data, expected ")):
            datasets.load_npz(tmp_path / "c.npz", mmap=mmap)


def _ann_parts(rng):
    return {"train": rng.random((6, 4)).astype(np.float32), "test": rng.random((2, 4)).astype(np.float32),
            "neighbors": np.zeros((2, 3), np.int32), "distances": np.zeros((2, 3), np.float32)}


@pytest.mark.parametrize("part", ["train", "neighbors"])
@pytest.mark.parametrize("what", ["group", "null"])
def test_ann_benchmarks_part_that_is_no_array(tmp_path, rng, part, what):
    """A part that is an HDF5 group (AttributeError: 'Group' object has no attribute 'dtype')
    or a dataset with a null dataspace (TypeError about int() and NoneType) escaped as
    Python's errors: the CLI printed a traceback for the group. Now ValueError naming it."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        for name, value in _ann_parts(rng).items():
            if name != part:
                f.create_dataset(name, data=value)
        if what == "group":
            f.create_group(part)
        else:
            f.create_dataset(part, data=h5py.Empty("f4"))
    for mmap in (None, True, False):
        with pytest.raises(ValueError, match=f"a.hdf5: /{part} is not an array"):
            datasets.load_ann_benchmarks(tmp_path / "a.hdf5", mmap=mmap)


def test_ann_benchmarks_empty_parts(tmp_path, rng):
    """mmap=True on a dataset of no rows was refused as "chunked or compressed", which it is
    not (an empty .npy or .npz member loads so). (A dataset never written: see below.)"""
    h5py = pytest.importorskip("h5py")
    parts = _ann_parts(rng)
    parts["train"] = np.zeros((0, 4), np.float32)
    # no train row to name: every neighbour id is ann-benchmarks' -1 padding (an id of 0 is refused)
    parts["neighbors"] = np.full(parts["neighbors"].shape, -1, parts["neighbors"].dtype)
    with h5py.File(tmp_path / "e.hdf5", "w") as f:
        for name, value in parts.items():
            f.create_dataset(name, data=value)
    for mmap in (None, True, False):
        data = datasets.load_ann_benchmarks(tmp_path / "e.hdf5", mmap=mmap)
        assert data.train.shape == (0, 4) and data.train.dtype == np.float32


@pytest.mark.parametrize("layout", ["contiguous", "chunked, part written", "chunked, 10**12 rows"])
def test_ann_benchmarks_rows_never_written_are_refused(tmp_path, rng, layout):
    """Rows never written have no data in the file (HDF5 gives its fill value for them): they
    were read as zeros without a word, and a tiny file declaring 10**12 such rows was a memory
    bomb (train: MemoryError naming no file; encode wrote a 16 TB file for ever; search blamed
    -k). mmap=True said "has no data stored in the file"; now every read says so."""
    h5py = pytest.importorskip("h5py")
    parts = _ann_parts(rng)
    with h5py.File(tmp_path / "u.hdf5", "w") as f:
        for name, value in parts.items():
            if name != "train":
                f.create_dataset(name, data=value)
            elif layout == "contiguous":
                f.create_dataset(name, shape=(6, 4), dtype="f4")  # storage never allocated
            elif layout == "chunked, part written":
                f.create_dataset(name, shape=(6, 4), dtype="f4", chunks=(2, 4))[:2] = value[:2]
            else:
                f.create_dataset(name, shape=(10**12, 4), dtype="f4", chunks=(1000, 4), compression="gzip")
    message = re.escape(f"{tmp_path / 'u.hdf5'}: dataset /train ") + r".*never written"
    _assert_every_reader_refuses(tmp_path / "u.hdf5", message)


# ---------------------------------------------------------------------------------------
# Rows read block by block (the CLI's encode, index build and search): a compressed .npz
# member or a chunked / compressed HDF5 dataset was read whole before the first row was used


def _streamed(path, key=None, rows=4):
    """(whether the rows were streamed, their blocks joined, each block's row count)."""
    from latentspace._streamed_inputs import open_rows

    with open_rows(path, key) as source:
        blocks = list(source.blocks(rows))
        streamed = source.array is None
        shape, dtype = source.shape, source.dtype
    assert all(block.dtype == dtype for block in blocks)  # as stored: the consumer converts
    joined = np.concatenate(blocks).astype(dtype) if blocks else np.empty(shape, dtype)
    assert joined.shape == shape
    return streamed, joined, [len(block) for block in blocks]


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i2", "u1"])
@pytest.mark.parametrize("shape", [(23, 3), (23, 2, 3), (23,)])
@pytest.mark.parametrize("rows", [1, 5, 23, 100])
def test_compressed_member_is_read_block_by_block(tmp_path, rng, dtype, shape, rows):
    """Each block holds `rows` rows (the last fewer), as stored (no dtype conversion: the
    reader's consumer converts a block at a time), in order; together, load_npz's array."""
    x = (rng.random(shape) * 100).astype(dtype)
    np.savez_compressed(tmp_path / "c.npz", x=x, other=np.zeros(3))
    streamed, joined, counts = _streamed(tmp_path / "c.npz", "x", rows)
    assert streamed
    assert counts == [min(rows, 23 - start) for start in range(0, 23, rows)]
    np.testing.assert_array_equal(joined, datasets.load_npz(tmp_path / "c.npz", "x"))
    assert joined.dtype == np.dtype(dtype)


def test_only_compressed_fortran_members_and_empty_ones_are_read_whole(tmp_path, rng):
    """A Fortran-ordered compressed member (its rows are not contiguous in the stream) and a
    member of no data are read whole; a stored member and a .npy (C or Fortran-ordered, read a
    column at a time) are read a block at a time too (they were mapped: see
    test_streamed_inputs.py), all as load_npz / load_npy give them."""
    x = rng.random((9, 4, 3)).astype(np.float32)
    np.savez_compressed(tmp_path / "f.npz", x=np.asfortranarray(x), empty=np.zeros((0, 4), np.float32))
    np.savez(tmp_path / "s.npz", x=x, f=np.asfortranarray(x))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    for path, key, streamed_expected in [("f.npz", "x", False), ("f.npz", "empty", False), ("s.npz", "f", True),
                                         ("s.npz", "x", True), ("x.npy", None, True), ("f.npy", None, True)]:
        streamed, joined, _ = _streamed(tmp_path / path, key)
        assert streamed == streamed_expected, path
        np.testing.assert_array_equal(joined, datasets.load_array(tmp_path / path, key))


def test_streamed_rows_keep_the_loaders_errors(tmp_path, rng):
    from latentspace._streamed_inputs import open_rows

    x = rng.random((6, 2)).astype(np.float32)
    np.savez_compressed(tmp_path / "two.npz", a=x, b=x)
    np.savez_compressed(tmp_path / "bool.npz", a=np.ones((5, 2), bool))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.csv").write_text("1,2\n")
    cases = [(tmp_path / "two.npz", None, r"key: .*two.npz holds 2 arrays \(a, b\); pass key= to pick one"),
             (tmp_path / "two.npz", "c", r"key: .*two.npz has no array 'c'"),
             (tmp_path / "bool.npz", None, r"bool.npz: array 'a' has dtype bool; expected real numbers"),
             (tmp_path / "x.npy", "a", "key: a .npy file holds one array"),
             (tmp_path / "x.csv", None, "path: expected a .npy, .npz, .hdf5 or .h5 file"),
             (tmp_path / "x.npy.npz", None, "not an .npz archive")]
    (tmp_path / "x.npy.npz").write_bytes((tmp_path / "x.npy").read_bytes())
    for path, key, message in cases:
        with pytest.raises(ValueError, match=message):
            with open_rows(path, key):
                pass
    with pytest.raises(FileNotFoundError):
        with open_rows(tmp_path / "missing.npz"):
            pass


def _outcome(read, path):
    """An array, or the ValueError naming `path` that reading raised (anything else fails)."""
    try:
        return read()
    except ValueError as error:
        assert str(path) in str(error), error
        return ValueError


def test_every_flipped_byte_of_a_compressed_archive_streams_as_load_npz_reads(tmp_path, rng):
    """Whatever byte is damaged, the streamed rows are load_npz's array, or both raise a
    ValueError naming the file: a damaged deflate stream, the CRC checked at the member's end
    (before its last block is handed out), a header's shape that does not fill the member."""
    raw = _two_arrays(tmp_path / "s.npz", rng, compressed=True)
    path = tmp_path / "bad.npz"
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        expected = _outcome(lambda: datasets.load_npz(path, "a", mmap=False), path)
        got = _outcome(lambda: _streamed(path, "a", rows=3)[1], path)
        if expected is ValueError or got is ValueError:
            assert got is expected, (position, got, expected)
        else:
            np.testing.assert_array_equal(got, expected)


def _member_bytes(array, claimed_rows=None):
    """A .npy file's bytes; its header claiming `claimed_rows` rows when given."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    raw = buffer.getvalue()
    if claimed_rows is not None:
        width = len(str(array.shape[0]))  # the header keeps its length
        raw = raw.replace(f"({array.shape[0]}, ".encode(), f"({claimed_rows:{width}d}, ".encode(), 1)
    return raw


@pytest.mark.parametrize("claimed, message", [(8, "its header's shape does not match the member's size"),
                                              (12, "EOF: reading array data")])
def test_compressed_member_must_hold_the_rows_its_header_claims(tmp_path, rng, claimed, message):
    x = rng.random((10, 3)).astype(np.float32)
    with zipfile.ZipFile(tmp_path / "c.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", _member_bytes(x, claimed))
    with pytest.raises(ValueError, match=f"c.npz: array 'x' is not readable \\({message}"):
        _streamed(tmp_path / "c.npz", rows=4)


def _with_crc(path, crc):
    """The archive at `path` with its (only) member's CRC-32 replaced, in both headers."""
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        at = raw.index(signature) + offset
        raw[at : at + 4] = crc.to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def test_a_member_failing_its_crc_is_refused_before_its_last_block(tmp_path, rng):
    """The CRC is known only once the whole member is read: the last block is handed out only
    after it has matched, so a consumer never finishes on a damaged member; one that stops
    early (a bad row) can ask verify_rest() whether the member was damaged."""
    from latentspace._streamed_inputs import open_rows

    # (128 KiB of rows, so that reading the header does not already reach the member's end)
    np.savez_compressed(tmp_path / "c.npz", x=rng.random((1000, 32)).astype(np.float32))
    _with_crc(tmp_path / "c.npz", 0x12345678)
    with open_rows(tmp_path / "c.npz") as source:
        blocks = source.blocks(400)
        assert len(next(blocks)) == 400 and len(next(blocks)) == 400
        with pytest.raises(ValueError, match=r"c.npz: array 'x' is not readable \(Bad CRC-32"):
            next(blocks)
    with open_rows(tmp_path / "c.npz") as source:
        next(source.blocks(400))
        with pytest.raises(ValueError, match=r"c.npz: array 'x' is not readable \(Bad CRC-32"):
            source.verify_rest()
    np.savez_compressed(tmp_path / "good.npz", x=rng.random((1000, 32)).astype(np.float32))
    with open_rows(tmp_path / "good.npz") as source:
        next(source.blocks(400))
        source.verify_rest()  # intact: returns


def test_a_truncated_compressed_archive_is_a_value_error(tmp_path, rng):
    """Cut anywhere, the archive is refused naming the file (its end record is gone)."""
    np.savez_compressed(tmp_path / "c.npz", x=rng.random((300, 8)).astype(np.float32))
    raw = (tmp_path / "c.npz").read_bytes()
    for length in (0, 10, 100, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        (tmp_path / "cut.npz").write_bytes(raw[:length])
        with pytest.raises(ValueError, match="cut.npz: not an .npz archive"):
            _streamed(tmp_path / "cut.npz")


@pytest.mark.parametrize("when", ["opened", "header read"])
def test_streamed_member_is_from_the_file_opened_when_the_path_is_replaced(tmp_path, rng, monkeypatch, when):
    """The archive's directory, the member's header and every block come from the one file
    opened: a file saved over the path meanwhile (os.replace: just after the path is opened,
    or while the member's header is read) changes nothing read."""
    import builtins

    original, other = rng.random((50, 7)).astype(np.float32), rng.random((80, 9))
    np.savez_compressed(tmp_path / "d.npz", x=original)
    np.savez_compressed(tmp_path / "other.npz", x=other)
    done = []
    real_open, real_header = builtins.open, np.lib.format.read_array_header_1_0

    def opening(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if not done and not isinstance(file, int) and os.fspath(file) == os.fspath(tmp_path / "d.npz"):
            os.replace(tmp_path / "other.npz", tmp_path / "d.npz")
            done.append(file)
        return handle

    def reading_header(*args, **kwargs):
        if not done:
            os.replace(tmp_path / "other.npz", tmp_path / "d.npz")
            done.append("header")
        return real_header(*args, **kwargs)

    if when == "opened":
        monkeypatch.setattr(builtins, "open", opening)
        monkeypatch.setattr(io, "open", opening)
    else:
        monkeypatch.setattr(np.lib.format, "read_array_header_1_0", reading_header)
    streamed, joined, _ = _streamed(tmp_path / "d.npz", rows=16)
    assert done and streamed
    np.testing.assert_array_equal(joined, original)
    assert joined.dtype == original.dtype


def _chunked_ann_file(path, rng, n=100):
    h5py = pytest.importorskip("h5py")
    parts = {"train": rng.random((n, 8)).astype(np.float32), "test": rng.random((7, 8)),
             "neighbors": np.zeros((7, 3), np.int32), "distances": np.zeros((7, 3), np.float32)}
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "euclidean"
        for name, value in parts.items():
            f.create_dataset(name, data=value, chunks=(min(16, len(value)), value.shape[1]), compression="gzip")
    return parts


@pytest.mark.parametrize("key", [None, "train", "test"])
@pytest.mark.parametrize("rows", [1, 10, 16, 1000])
def test_chunked_hdf5_dataset_is_read_block_by_block(tmp_path, rng, key, rows):
    parts = _chunked_ann_file(tmp_path / "c.hdf5", rng)
    streamed, joined, counts = _streamed(tmp_path / "c.hdf5", key, rows)
    expected = parts[key or "train"]
    assert streamed and counts == [min(rows, len(expected) - s) for s in range(0, len(expected), rows)]
    np.testing.assert_array_equal(joined, expected)
    assert joined.dtype == expected.dtype


def test_streamed_hdf5_keeps_the_loaders_checks(tmp_path, rng, monkeypatch):
    """The layout is checked as load_ann_benchmarks checks it, without reading the other
    parts; a contiguous dataset is read a block at a time too (not mapped); damage met while a
    block is read is a ValueError naming the file."""
    h5py = pytest.importorskip("h5py")
    from latentspace._streamed_inputs import open_rows

    parts = _chunked_ann_file(tmp_path / "c.hdf5", rng)
    _ann_file(tmp_path / "plain.hdf5", rng)
    streamed, joined, _ = _streamed(tmp_path / "plain.hdf5", "test")
    assert streamed
    np.testing.assert_array_equal(joined, datasets.load_array(tmp_path / "plain.hdf5", "test"))
    with h5py.File(tmp_path / "partial.hdf5", "w") as f:
        f.create_dataset("train", data=parts["train"], chunks=True, compression="gzip")
    with h5py.File(tmp_path / "wide.hdf5", "w") as f:
        for name, value in parts.items():
            f.create_dataset(name, data=value if name != "test" else np.zeros((7, 9)), compression="gzip")
    for path, key, message in [
            ("partial.hdf5", None,
             r"not in the ann-benchmarks layout \(missing datasets: test, neighbors, distances\)"),
            ("wide.hdf5", None, r"train and test dimensions differ, \(100, 8\) vs \(7, 9\)"),
            ("c.hdf5", "queries", "key: expected 'train', 'test', 'neighbors' or 'distances'")]:
        with pytest.raises(ValueError, match=message):
            with open_rows(tmp_path / path, key):
                pass

    def fail(*args, **kwargs):
        raise OSError("Can't synchronously read data (inflate() failed)")

    with open_rows(tmp_path / "c.hdf5") as source:
        monkeypatch.setattr(h5py.Dataset, "__getitem__", fail)
        monkeypatch.setattr(h5py.Dataset, "read_direct", fail)
        with pytest.raises(ValueError, match=r"c.hdf5: a damaged HDF5 file \(OSError: Can't synchronously read"):
            next(source.blocks(10))


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_load_npz_names_the_file_for_a_damaged_bzip2_or_lzma_member(tmp_path, method):
    """np.load reads bzip2 and LZMA members too; their damage (lzma.LZMAError, or bz2's
    OSError) escaped load_npz as a traceback instead of its ValueError naming the file."""
    path = tmp_path / "d.npz"
    rows = np.arange(20000, dtype=np.float32).reshape(-1, 8)
    with zipfile.ZipFile(path, "w", compression=method) as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array(member, rows)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle : middle + 64] = bytes(64)  # a run of zeros inside the compressed stream
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: (array 'x' is not readable|not a readable "
                                         rf"\.npz file) \(.+\)$"):
        datasets.load_npz(path, key="x", mmap=False)

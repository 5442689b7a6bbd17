"""An adversarial review of the file loaders (datasets.load_npy / load_npz / load_array /
load_ann_benchmarks and the CLI's block reader, _streamed_inputs.open_rows): each case a file
a user (or a hostile sender) could hand them, each answered with numpy's array or a ValueError
naming the file, never a hang, an allocation sized by a header's claim, or another shape."""

from __future__ import annotations

import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from latentspace import datasets
from latentspace._streamed_inputs import open_rows


def _npy_bytes(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy file of the header text given as is (numpy's writer refuses the odd ones)."""
    text = header.encode("latin1")
    length_bytes = 2 if version == (1, 0) else 4
    padding = 64 - (6 + 2 + length_bytes + len(text) + 1) % 64
    text += b" " * padding + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(text).to_bytes(length_bytes, "little") + text + data


def _header(shape: str, descr: str = "'<f4'", fortran: str = "False") -> str:
    return "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape)


def _streamed(path, key=None, rows: int = 3, most_blocks: int = 10_000) -> np.ndarray:
    """Every row open_rows gives, joined; a failure, not a hang, past most_blocks blocks."""
    with open_rows(path, key) as source:
        if source.array is not None:
            return np.asarray(source.array)
        blocks = []
        for block in source.blocks(rows):
            blocks.append(block)
            if len(blocks) > most_blocks:
                pytest.fail(f"{path}: more than {most_blocks} blocks of {rows} rows (shape {source.shape})")
        return np.concatenate(blocks)


def _every_npy_reader(path):
    """The readers of a .npy: read, mapped, and a block at a time (the CLI's)."""
    return {"read": lambda: datasets.load_npy(path, mmap=False), "mapped": lambda: datasets.load_npy(path, mmap=True),
            "streamed": lambda: _streamed(path)}


# ---------------------------------------------------------------------------------------
# .npy headers numpy itself refuses (or misreads): every reader refuses them alike, naming the file


# (shape, descr, what the refusal says). Each broke at least one reader: (True, 4) raised
# numpy's bare TypeError ("an integer is required") from load_npy and was streamed as one row;
# (2**62, 0) holds no data, so its claim passed, and the block reader handed out empty blocks
# forever; (2**63, 0) was an OverflowError from the map; 70 axes a ValueError naming nothing
# from the block reader; a subarray dtype was refused by load_npy but mapped, as (3, 2).
_ODD_HEADERS = {
    "a bool as a dimension": ("(True, 4)", "'<f4'", r"shape is not valid"),
    "zero rows of a size numpy cannot hold": (f"({2**62}, 0)", "'<f4'", r"array is too big"),
    "a dimension past int64": (f"({2**63}, 0)", "'<f4'", r"Maximum allowed dimension exceeded"),
    "more axes than numpy allows": (str((1,) * 70), "'<f4'", r"maximum supported dimension"),
    "a subarray dtype": ("(3,)", "('<f4', (2,))", r"subarray dtype"),
}


@pytest.mark.parametrize("case", list(_ODD_HEADERS))
def test_odd_npy_header_is_refused_by_every_reader(tmp_path, case):
    shape, descr, message = _ODD_HEADERS[case]
    path = tmp_path / "odd.npy"
    path.write_bytes(_npy_bytes(_header(shape, descr), np.arange(6, dtype="<f4").tobytes()))
    for reader, read in _every_npy_reader(path).items():
        with pytest.raises(ValueError, match=f"odd.npy: not a readable .npy array .*{message}"):
            read()
            pytest.fail(f"{reader} read it")


@pytest.mark.parametrize("case", list(_ODD_HEADERS))
@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_odd_npz_member_header_is_refused_by_every_reader(tmp_path, case, method):
    shape, descr, message = _ODD_HEADERS[case]
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("x.npy", _npy_bytes(_header(shape, descr), np.arange(6, dtype="<f4").tobytes()))
    readers = {"read": lambda: datasets.load_npz(path, mmap=False), "streamed": lambda: _streamed(path)}
    if method == zipfile.ZIP_STORED:
        readers["mapped"] = lambda: datasets.load_npz(path, mmap=True)
    for reader, read in readers.items():
        with pytest.raises(ValueError, match=f"odd.npz: array 'x' is not readable .*{message}"):
            read()
            pytest.fail(f"{reader} read it")


def test_stored_member_of_unknown_npy_version_is_not_mapped(tmp_path):
    """A member whose .npy magic says version 9.9: np.load and load_npz(mmap=False) refuse it;
    the map took its header as a 2.0 one."""
    blob = bytearray(_npy_bytes(_header("(4,)"), bytes(16), version=(2, 0)))
    blob[6:8] = b"\x09\x09"
    with zipfile.ZipFile(tmp_path / "v.npz", "w") as archive:
        archive.writestr("x.npy", bytes(blob))
    with pytest.raises(ValueError, match=r"v.npz: array 'x' is not readable .*format version"):
        datasets.load_npz(tmp_path / "v.npz", mmap=True)


# ---------------------------------------------------------------------------------------
# A header claiming a huge length of its own


def _header_length_bomb(path, method, claimed: int) -> None:
    """A .npy member whose header says it is `claimed` bytes long, followed by that many spaces:
    bzip2 holds 256 MiB of them in a few hundred bytes."""
    with zipfile.ZipFile(path, "w", method) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", claimed))
            spaces = b" " * (4 << 20)
            for _ in range(claimed // len(spaces)):
                member.write(spaces)


@pytest.mark.parametrize("reader", ["load_npz", "open_rows"])
@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_npz_header_length_claim_is_refused_before_it_is_read(tmp_path, method, reader):
    """numpy read all the length a header claims (with a copy) before refusing one over 10,000
    bytes, in words about allow_pickle and max_header_size, which latentspace takes neither
    of: now refused from the length alone. load_npz also read a bzip2 or LZMA member through
    zipfile, which decompresses each piece of its input whole: the first piece of this one is
    all of it (1 GiB held to read a header of 12 bytes, for a 512 MiB claim in 555 bytes)."""
    path = tmp_path / "bomb.npz"
    _header_length_bomb(path, method, 256 << 20)
    read = (lambda: datasets.load_npz(path)) if reader == "load_npz" else (lambda: _streamed(path))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb.npz: array 'x' is not readable \(its \.npy header claims "
                                             r"268,435,456 bytes") as error:
            read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "allow_pickle" not in str(error.value)
    assert peak < 16 << 20, f"{peak:,} bytes held"


# ---------------------------------------------------------------------------------------
# Files that are no .npy at all


@pytest.mark.parametrize("content", [b"1,2,3\n4,5,6\n", b"\x93NU", b"\x80\x04K\x01.", b"x"])
def test_a_file_that_is_no_npy_is_not_called_a_pickle(tmp_path, content):
    """A CSV, a text file, a pickle or a .npy cut to 3 bytes, named .npy: np.load takes any file
    without the magic string for a pickle, and load_npy passed on its advice to load it
    unsafely with allow_pickle, which latentspace does not even take."""
    path = tmp_path / "data.npy"
    path.write_bytes(content)
    for reader, read in _every_npy_reader(path).items():
        with pytest.raises(ValueError, match=r"data.npy: not a readable .npy array \(it does not start with") as error:
            read()
        assert "pickled" not in str(error.value) and "allow_pickle" not in str(error.value), reader


def test_an_array_of_python_objects_is_refused_alike_by_every_reader(tmp_path):
    """A ragged list saved by np.save is an array of pickled Python objects. The readers
    refused it in three wordings: numpy's "cannot be loaded when allow_pickle=False" (an
    argument latentspace does not take), "Array can't be memory-mapped" (from the CLI's reader,
    which maps nothing) and "object arrays are not loaded"."""
    ragged = np.array([np.zeros(2), np.zeros(3)], dtype=object)
    np.save(tmp_path / "o.npy", ragged, allow_pickle=True)
    np.savez(tmp_path / "o.npz", x=ragged)
    np.savez_compressed(tmp_path / "oc.npz", x=ragged)
    readers = dict(_every_npy_reader(tmp_path / "o.npy"))
    for name in ("o.npz", "oc.npz"):
        path = tmp_path / name
        readers[f"{name} read"] = lambda path=path: datasets.load_npz(path, mmap=False)
        readers[f"{name} streamed"] = lambda path=path: _streamed(path)
    readers["o.npz mapped"] = lambda: datasets.load_npz(tmp_path / "o.npz", mmap=True)
    for reader, read in readers.items():
        with pytest.raises(ValueError, match=r"o(c)?\.np[yz]: .*an array of Python objects \(dtype object\), "
                                             r"stored pickled: latentspace never unpickles") as error:
            read()
        assert "allow_pickle" not in str(error.value) and "memory-mapped" not in str(error.value), reader


# ---------------------------------------------------------------------------------------
# HDF5


def test_ann_distance_attribute_not_utf8_is_kept_not_a_crash(tmp_path):
    """A fixed-length "distance" attribute of bytes that are no UTF-8: its decode raised a
    UnicodeDecodeError naming nothing. It is no metric latentspace knows: metric None."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "ann.hdf5"
    with h5py.File(path, "w") as f:
        f["train"], f["test"] = np.zeros((5, 3), np.float32), np.zeros((2, 3), np.float32)
        f["neighbors"], f["distances"] = np.zeros((2, 4), np.int32), np.zeros((2, 4), np.float32)
        f.attrs["distance"] = np.bytes_(b"\xffeuclidean")
    ann = datasets.load_ann_benchmarks(path)
    assert ann.metric is None and ann.distance.endswith("euclidean")


# ---------------------------------------------------------------------------------------
# Paths


def test_bytes_paths_are_read_as_numpy_reads_them(tmp_path):
    """np.load takes a bytes path (os.fsencode's); the loaders raised pathlib's TypeError, which
    names no argument."""
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    for name in ("x.npy", "x.npz"):
        path = os.fsencode(tmp_path / name)
        np.testing.assert_array_equal(datasets.load_array(path), x)
        np.testing.assert_array_equal(_streamed(path), x)
    np.testing.assert_array_equal(datasets.load_npy(os.fsencode(tmp_path / "x.npy")), x)
    np.testing.assert_array_equal(datasets.load_npz(os.fsencode(tmp_path / "x.npz")), x)


@pytest.mark.parametrize("path", [None, 3, 2.5])
def test_a_path_of_another_type_is_a_type_error_naming_path(path):
    for read in (datasets.load_npy, datasets.load_npz, datasets.load_ann_benchmarks, datasets.load_array, _streamed):
        with pytest.raises(TypeError, match=r"path: expected a str, bytes or os\.PathLike"):
            read(path)


def test_empty_and_nul_paths_are_named(tmp_path):
    """"" was "path: . is a folder" (pathlib reads it as the current folder); a NUL byte was the
    OS's "embedded null byte", naming no argument."""
    for read in (datasets.load_npy, datasets.load_npz):
        with pytest.raises(ValueError, match="path: empty"):
            read("")
        with pytest.raises(ValueError, match="path: .* holds a NUL character"):
            read(f"{tmp_path}/x.npy\0.npy")


def test_too_long_takes_what_as_path_takes(tmp_path):
    """_paths.too_long (asked before a file is written) raised pathlib's TypeError for a bytes
    path, which as_path, and so every loader, takes."""
    from latentspace import _paths

    assert _paths.too_long(os.fsencode(tmp_path / "x.npy")) is None
    long_name = os.fsencode(tmp_path / ("x" * 300 + ".npy"))
    assert _paths.too_long(long_name).startswith("file name too long (304 characters in one path component")
    with pytest.raises(TypeError, match=r"path: expected a str, bytes or os\.PathLike"):
        _paths.too_long(3)


# ---------------------------------------------------------------------------------------
# .npz archives: which member, and why it cannot be read


def test_a_member_is_found_by_its_full_name_as_numpy_finds_it(tmp_path):
    """np.load(path)["x.npy"] reads the member x.npy; load_npz(key="x.npy") said the archive had
    no such array. numpy takes a member's full name before the name less ".npy": with members
    x.npy and x.npy.npy, "x.npy" is the first, "x.npy.npy" the second."""
    x, y = np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((2, 2), np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    with zipfile.ZipFile(tmp_path / "two.npz", "w") as archive:
        for name, array in (("x.npy", x), ("x.npy.npy", y)):
            with archive.open(name, "w") as member:
                np.lib.format.write_array(member, array)
    for path, key, expected in [("a.npz", "x.npy", x), ("two.npz", "x.npy", x), ("two.npz", "x.npy.npy", y),
                                ("two.npz", "x", x)]:
        np.testing.assert_array_equal(np.load(tmp_path / path)[key], expected)  # (numpy's own answer)
        for mmap in (None, True, False):
            np.testing.assert_array_equal(datasets.load_npz(tmp_path / path, key, mmap=mmap), expected)
        np.testing.assert_array_equal(_streamed(tmp_path / path, key), expected)
    with pytest.raises(ValueError, match=r"key: .*a.npz has no array 'y.npy' \(it holds: x\)"):
        datasets.load_npz(tmp_path / "a.npz", "y.npy")


def _patched_npz(path, offsets_and_values) -> None:
    """An archive of one stored member x.npy whose local header and directory entry have the
    bytes at `offsets_and_values` (offsets from each's signature) set."""
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array(member, np.arange(6, dtype=np.float32).reshape(3, 2))
    blob = bytearray(path.read_bytes())
    for signature, shift in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):  # (the entry has 2 more bytes first)
        at = blob.index(signature) + shift
        for offset, value in offsets_and_values:
            blob[at + offset : at + offset + len(value)] = value
    path.write_bytes(bytes(blob))


def _every_npz_reader(path):
    return {"read": lambda: datasets.load_npz(path, mmap=False), "mapped": lambda: datasets.load_npz(path, mmap=True),
            "automatic": lambda: datasets.load_npz(path), "streamed": lambda: _streamed(path)}


def test_a_member_of_a_compression_method_zipfile_cannot_read_is_named_so(tmp_path):
    """A member compressed with Deflate64 (zip method 9, which 7-Zip and Windows write):
    mmap=True said "compressed and cannot be memory-mapped; pass mmap=False", and mmap=False
    then failed with zipfile's "That compression method is not supported"."""
    path = tmp_path / "m.npz"
    _patched_npz(path, [(8, (9).to_bytes(2, "little"))])
    for reader, read in _every_npz_reader(path).items():
        with pytest.raises(ValueError, match=r"m.npz: array 'x' is compressed with zip method 9 \(Deflate64\), "
                                             r"which Python's zipfile cannot decompress") as error:
            read()
        assert "mmap" not in str(error.value), reader


def test_an_encrypted_member_is_named_not_dumped(tmp_path):
    """An encrypted member (flag bit 0): load_npz's error held zipfile's whole ZipInfo repr
    ("File <ZipInfo filename='x.npy' filemode='?rw-------' file_size=160> is encrypted")."""
    path = tmp_path / "e.npz"
    _patched_npz(path, [(6, b"\x01")])
    for reader, read in _every_npz_reader(path).items():
        with pytest.raises(ValueError, match=r"e.npz: array 'x' \(member 'x.npy'\) is encrypted; latentspace "
                                             r"reads only unencrypted archives") as error:
            read()
        assert "ZipInfo" not in str(error.value), reader


_DIRECTORY_DAMAGE = {
    "encrypted flag": (8, r"RuntimeError: member 'x.npy' is encrypted by the archive's directory, not by its local "
                          r"header: damaged\?"),
    "compression method": (10, r"NotImplementedError: That compression method is not supported \(member 'x.npy': "
                               r"method 255 in the archive's directory, 0 in its local header: damaged\?\)"),
}


@pytest.mark.parametrize("field", list(_DIRECTORY_DAMAGE))
def test_a_directory_entry_at_odds_with_its_local_header_is_damage(tmp_path, field):
    """A byte flipped in the directory alone makes it say "encrypted" or "method 255" of a member
    whose local header says neither: damage, reported as such (in the type zipfile raised for
    it), not as an encrypted member nor as one of a method zipfile lacks; and without the
    member's whole ZipInfo, or mmap=True's advice to pass mmap=False."""
    offset, message = _DIRECTORY_DAMAGE[field]
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2), np.float32))
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"PK\x01\x02") + offset] ^= 0xFF
    path.write_bytes(bytes(blob))
    for reader, read in _every_npz_reader(path).items():
        with pytest.raises(ValueError, match=rf"d.npz: not a readable .npz file \({message}"):
            read()
            pytest.fail(f"{reader} read it")


_NO_ZIP = {
    "empty": (b"", r" \(the file is empty\)"),
    "a .npy": (None, r" \(a \.npy file: use load_npy\)"),
    "HDF5": (b"\x89HDF\r\n\x1a\n" + bytes(100), r" \(an HDF5 file: use load_ann_benchmarks, or load_array with "
                                                r"a \.hdf5 or \.h5 name\)"),
    "cut short": (None, r" \(it starts as a zip archive but its end record is missing or damaged: cut short\?\)"),
    "text": (b"1,2,3\n", ""),
}


@pytest.mark.parametrize("case", list(_NO_ZIP))
def test_a_file_that_is_no_zip_is_told_what_it_is(tmp_path, case):
    """Any file that is no zip archive was told "not an .npz archive (a .npy file? use
    load_npy)": an empty file, an HDF5 file, a text file. The hint now says what the file is
    (its first bytes), and no hint where they say nothing."""
    content, message = _NO_ZIP[case]
    if case == "a .npy":
        np.save(tmp_path / "x.npy", np.zeros(3, np.float32))
        content = (tmp_path / "x.npy").read_bytes()
    elif case == "cut short":
        np.savez(tmp_path / "x.npz", x=np.zeros(300, np.float32))
        content = (tmp_path / "x.npz").read_bytes()[:500]
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    for read in (lambda: datasets.load_npz(path), lambda: _streamed(path)):
        with pytest.raises(ValueError, match=rf"d\.npz: not an \.npz archive{message}$"):
            read()


# ---------------------------------------------------------------------------------------
# ann-benchmarks: neighbours and distances that no recall can use


def _ann(path, neighbors, distances=None, distance="euclidean", n_train=5):
    h5py = pytest.importorskip("h5py")
    neighbors = np.asarray(neighbors)
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f["train"], f["test"] = np.zeros((n_train, 3), np.float32), np.zeros((len(neighbors), 3), np.float32)
        f["neighbors"] = neighbors
        f["distances"] = np.zeros(neighbors.shape, np.float32) if distances is None else np.asarray(distances)


def _every_ann_reader(path, part):
    return {f"mmap={mmap}": (lambda mmap=mmap: datasets.load_ann_benchmarks(path, mmap=mmap))
            for mmap in (None, True, False)} | {
        "load_array": lambda: datasets.load_array(path, part), "streamed": lambda: _streamed(path, part)}


_BAD_NEIGHBORS = {
    "float ids": (np.array([[0.0, 1.0], [2.0, 3.0]], np.float32),
                  r"dataset /neighbors has dtype float32; expected integers \(ids of train rows\)"),
    "an id past train": (np.array([[0, 1], [4, 5]], np.int32),
                         r"neighbors\[1, 1\] is 5, past the last train row \(train has 5 rows: ids 0 to 4\)"),
    "a negative id": (np.array([[0, -2], [7, 1]], np.int64),
                      r"neighbors\[0, 1\] is -2, a negative id \(only -1, padding, may end a row\)"),
    "padding before an id": (np.array([[0, 1, 2], [3, -1, 4]], np.int32),
                             r"neighbors\[1, 1\] is -1 \(padding\) followed by an id in its row"),
    "an unsigned id past train": (np.array([[0, 1], [2, 2**40]], np.uint64),
                                  r"neighbors\[1, 1\] is 1099511627776, past the last train row"),
}


@pytest.mark.parametrize("case", list(_BAD_NEIGHBORS))
def test_ann_neighbors_that_name_no_train_row_are_refused(tmp_path, case):
    """Float, negative or out-of-range neighbour ids were loaded without a word, and a recall
    computed from them was silently wrong. Now refused naming the file, the dataset and the
    first bad one (row-major)."""
    neighbors, message = _BAD_NEIGHBORS[case]
    _ann(tmp_path / "a.hdf5", neighbors)
    for reader, read in _every_ann_reader(tmp_path / "a.hdf5", "neighbors").items():
        with pytest.raises(ValueError, match=f"a.hdf5: {message}"):
            read()
            pytest.fail(f"{reader} read it")


def test_ann_neighbors_padded_with_minus_one_are_read(tmp_path):
    """ann-benchmarks pads a row of fewer than k neighbours with -1 (and its distances with +inf)
    in the files it writes results to; a ground truth padded so is taken as it is."""
    neighbors = np.array([[4, 0, 1], [2, -1, -1], [-1, -1, -1]], np.int32)
    distances = np.array([[0, 1, 2], [0, np.inf, np.inf], [np.inf] * 3], np.float32)
    _ann(tmp_path / "a.hdf5", neighbors, distances)
    data = datasets.load_ann_benchmarks(tmp_path / "a.hdf5")
    np.testing.assert_array_equal(data.neighbors, neighbors)
    np.testing.assert_array_equal(data.distances, distances)


_BAD_DISTANCES = {
    "NaN, angular": ("angular", [[0.0, np.nan]], r"distances\[0, 1\] is nan; expected a distance"),
    "negative, euclidean": ("euclidean", [[0.0, 0.5], [-0.1, 1.0]],  # (said in float32's digits, not -0.10000000149)
                            r"distances\[1, 0\] is -0\.1; a euclidean distance is never negative"),
}


@pytest.mark.parametrize("case", list(_BAD_DISTANCES))
def test_ann_distances_no_distance_can_be_are_refused(tmp_path, case):
    """NaN is no distance of any metric; a euclidean distance is never negative. (An angular
    distance, 1 - cos, can be a rounding error below 0, and an inner product's any number:
    those are read, see below.)"""
    distance, distances, message = _BAD_DISTANCES[case]
    distances = np.array(distances, np.float32)
    _ann(tmp_path / "a.hdf5", np.zeros(distances.shape, np.int32), distances, distance)
    for reader, read in _every_ann_reader(tmp_path / "a.hdf5", "distances").items():
        with pytest.raises(ValueError, match=f"a.hdf5: {message}"):
            read()
            pytest.fail(f"{reader} read it")


@pytest.mark.parametrize("distance", ["angular", "dot"])
def test_ann_negative_distances_of_other_metrics_are_read(tmp_path, distance):
    distances = np.array([[-1e-7, 0.5], [-3.0, 1.0]], np.float32)
    _ann(tmp_path / "a.hdf5", np.zeros((2, 2), np.int32), distances, distance)
    np.testing.assert_array_equal(datasets.load_ann_benchmarks(tmp_path / "a.hdf5").distances, distances)


def test_an_empty_npy_file_is_called_empty(tmp_path):
    """An empty .npy was "it does not start with the .npy magic string ..., but with b''"
    where load_npz says "(the file is empty)"."""
    (tmp_path / "empty.npy").write_bytes(b"")
    for mmap in (None, True, False):
        with pytest.raises(ValueError, match=r"empty\.npy: not a readable \.npy array \(the file is empty\)$"):
            datasets.load_npy(tmp_path / "empty.npy", mmap=mmap)


@pytest.mark.parametrize("user_block", [512, 4096])
def test_an_hdf5_file_with_a_user_block_is_told_what_it_is(tmp_path, user_block):
    """HDF5 puts its signature at 0 or, past a user block, at 512, 1024, 2048, ... bytes: the
    hint looked at offset 0 only, so an HDF5 file with a user block got no hint."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "d.npz"
    with h5py.File(path, "w", userblock_size=user_block) as f:
        f["train"] = np.zeros((4, 3), np.float32)
    assert not path.read_bytes().startswith(b"\x89HDF")
    message = _NO_ZIP["HDF5"][1]
    for read in (lambda: datasets.load_npz(path), lambda: _streamed(path)):
        with pytest.raises(ValueError, match=rf"d\.npz: not an \.npz archive{message}$"):
            read()

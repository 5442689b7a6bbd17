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
        with pytest.raises(TypeError, match=r"path: expected a str or os\.PathLike"):
            read(path)


def test_empty_and_nul_paths_are_named(tmp_path):
    """"" was "path: . is a folder" (pathlib reads it as the current folder); a NUL byte was the
    OS's "embedded null byte", naming no argument."""
    for read in (datasets.load_npy, datasets.load_npz):
        with pytest.raises(ValueError, match="path: empty"):
            read("")
        with pytest.raises(ValueError, match="path: .* holds a NUL character"):
            read(f"{tmp_path}/x.npy\0.npy")

"""Datasets. The default is embedded: the handwritten digits bundled with scikit-learn.

Files: .npy and .npz arrays (memory-mapped when large, so data bigger than RAM can be
trained on or indexed), and the ann-benchmarks HDF5 layout (needs the optional h5py:
`pip install "latentspace[hdf5]"`).
"""

from __future__ import annotations

import contextlib
import io
import lzma
import math
import os
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import check_float, check_int
from ._paths import as_path, stat_regular_file
from ._zip_member import open_member

__all__ = [
    "AnnBenchmark",
    "load_ann_benchmarks",
    "load_array",
    "load_digits",
    "load_npy",
    "load_npz",
    "stratified_split",
]

# Files (or archive members) at least this large are memory-mapped when mmap=None.
MMAP_THRESHOLD_BYTES = 256 << 20

# What zipfile raises for a damaged archive instead of a ValueError: BadZipFile (bad magic,
# offsets, CRC), NotImplementedError (a flipped version, flag or compression method),
# RuntimeError (a flipped "encrypted" flag), OSError (a seek to a negative offset).
_ZIP_DAMAGE = (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError)
# ... and what reading a damaged member raises: zlib.error (a compressed member's bad
# deflate stream), LZMAError (an LZMA member's, read by zipfile; the loaders read bzip2 and
# LZMA members through _zip_member.BoundedMember, whose damage is a ValueError), SyntaxError
# and TokenError (numpy parses the .npy header and its dtype as Python literals).
_NPY_DAMAGE = (ValueError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, SyntaxError, tokenize.TokenError)
# The first bytes of a zip archive (a local file header, or the end record of an empty one).
_ZIP_PREFIXES = (b"PK\x03\x04", b"PK\x05\x06")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 handwritten 8x8 digits bundled with scikit-learn (no download).

    Returns:
        images: (1797, 64) float32 in [0, 1] (pixel intensities 0..16 divided by 16),
            row-major 8x8.
        labels: (1797,) int64, the digit 0..9.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    bunch = _sklearn_digits()
    images = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return np.ascontiguousarray(images), labels


def stratified_split(labels: Any, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each sorted, holding out round(test_fraction * n_c) rows of
    every class c, chosen at random from `seed` (numpy's default_rng)."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"labels: expected a 1-d integer array, got {y.dtype} shape {y.shape}")
    test_fraction = check_float(test_fraction, "test_fraction", include_minimum=False, maximum=1.0,
                                include_maximum=False)
    rng = np.random.default_rng(check_int(seed, "seed", minimum=0))
    test = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test.append(members[: int(round(test_fraction * len(members)))])
    test_rows = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_rows] = False
    train_rows = np.flatnonzero(mask)
    if len(y) and (not len(train_rows) or not len(test_rows)):
        # (0.999 of classes of a few hundred rounds to all of them, 0.001 to none)
        empty = "train" if not len(train_rows) else "test"
        raise ValueError(f"test_fraction: {test_fraction} leaves the {empty} part empty ({len(y)} labels, "
                         f"{len(np.unique(y))} classes; round(test_fraction * rows) held out of each class)")
    return train_rows, test_rows.astype(np.int64)


# ---------------------------------------------------------------------------------------
# .npy / .npz


def _check_mmap(mmap: Any) -> None:
    if mmap is not None and not isinstance(mmap, bool):
        raise TypeError(f"mmap: expected True, False or None (automatic), got {mmap!r}")


def _regular_file(path: str | bytes | os.PathLike) -> Path:
    """path as a Path to a regular file (_paths.stat_regular_file says what else raises)."""
    stat_regular_file(path, "a file")
    return as_path(path)


def _checked(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{path}: {what} has dtype {array.dtype}; expected real numbers (float32 preferred)")
    if array.ndim < 1:
        raise ValueError(f"{path}: {what} is a scalar; expected an array of rows")
    return array


def load_npy(path: str | bytes | os.PathLike, *, mmap: bool | None = None) -> np.ndarray:
    """An array from a .npy file, as stored (no dtype conversion, so no copy).

    mmap: True maps the file read-only (np.memmap: pages are read on demand, the data can
    exceed RAM); False reads it; None (default) maps files of MMAP_THRESHOLD_BYTES (256 MiB)
    or more. Never unpickles: object arrays are refused. Raises ValueError for a file that
    is not a .npy array of real numbers.
    """
    _check_mmap(mmap)
    path = _regular_file(path)
    # Everything below reads this one open file, never the path again: a file saved over the
    # path meanwhile (os.replace) gave the new file's array, or, mapped, the old header's
    # shape and dtype over the new file's bytes (np.load re-opens the path by name to map).
    with open(path, "rb") as f:
        if mmap is None:
            mmap = os.fstat(f.fileno()).st_size >= MMAP_THRESHOLD_BYTES
        _refuse_npz(path, f)
        with _npy_errors(path):
            array = _map_npy(f) if mmap else _read_npy(f)
    return _checked(array, path, "the array")


def _refuse_npz(path: Path, f) -> None:
    """Refuses the .npy file open as `f` (left at its start) when it is a zip archive, told by
    its first bytes as np.load tells one (zipfile.is_zipfile searches the last 64 KiB for the
    bytes PK\x05\x06, which an array's data can hold)."""
    head = f.read(len(_ZIP_PREFIXES[0]))
    f.seek(0)
    if head.startswith(_ZIP_PREFIXES):
        raise ValueError(f"{path}: an .npz archive, not a .npy array; use load_npz")


@contextlib.contextmanager
def _npy_errors(path: Path):
    """numpy's errors reading the .npy file `path` as load_npy raises them: a ValueError naming
    the file (the errors about the path itself as they are)."""
    try:
        yield
    # (SyntaxError, TokenError: numpy parses the header's dict as Python literals, and a
    # damaged byte can leave an unclosed quote or bracket)
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as error:
        if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ValueError(f"{path}: not a readable .npy array ({error})") from None


def _read_npy(f) -> np.ndarray:
    """np.load of the .npy file open as `f` (at its start), its header's shape checked against
    the file's size first (_checked_npy_header): numpy allocates the array the header claims
    before reading a byte (a claim of terabytes was a MemoryError naming nothing)."""
    _check_npy_magic(f)
    _checked_npy_header(f)
    f.seek(0)
    return np.load(f, allow_pickle=False)


def _check_npy_magic(f) -> None:
    """Refuses the file open as `f` (left at its start) unless it starts as a .npy does. np.load
    takes any other file (not a zip) for a pickle, and said so for a CSV, a text file or a
    .npy cut to a few bytes, with its advice to load it unsafely with allow_pickle, which
    latentspace does not take."""
    head = f.read(len(np.lib.format.MAGIC_PREFIX))
    f.seek(0)
    if not head:
        raise ValueError("the file is empty")
    if head != np.lib.format.MAGIC_PREFIX:
        raise ValueError(f"it does not start with the .npy magic string {np.lib.format.MAGIC_PREFIX!r}, "
                         f"but with {head!r}: not a .npy file (latentspace never loads pickles)")


def _checked_npy_header(f):
    """_npy_header of the .npy file open as `f` (at its start), refusing a shape whose data
    the file cannot hold, in numpy's words (counted in Python's integers: numpy's own count
    overflows for a claim of 2**80 elements)."""
    shape, fortran, dtype = _npy_header(f)
    _check_claim(shape, dtype, os.fstat(f.fileno()).st_size - f.tell())
    return shape, fortran, dtype


def _check_claim(shape: tuple[int, ...], dtype: np.dtype, held: int) -> None:
    """A .npy header's shape against the at most `held` bytes of data its file or member can
    give, in numpy's words, before any is read: numpy allocates the array a header claims
    first. (Counted in Python's integers: numpy's count overflows for 2**80 elements. The
    array is one numpy can make, of no Python objects: _read_npy_header checked it.)"""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > held:
        raise ValueError(f"EOF: reading array data, expected {nbytes} bytes got {held}")


def _map_npy(f) -> np.memmap:
    """np.memmap of the .npy file open as `f` (at its start), as np.load(mmap_mode="r") maps
    one, with its errors, but from this file: np.load maps the path by name."""
    shape, fortran, dtype = _npy_layout(f)
    # np.memmap takes the file's size from this same file (a seek to its end) and refuses a
    # shape that does not fit in it
    return np.memmap(f, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                     order="F" if fortran else "C")  # outlives f: the map holds its own handle


def _npy_layout(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file open as `f` (at its start), left at its
    data, with the checks and errors of np.load(mmap_mode="r"): its data must be in the file
    (load_npy's mapping, and the CLI's reads a block at a time)."""
    _check_npy_magic(f)
    return _checked_npy_header(f)


def load_npz(path: str | bytes | os.PathLike, key: str | None = None, *, mmap: bool | None = None) -> np.ndarray:
    """One array from a .npz archive: `key`, or the only one when the archive holds one.

    mmap: as for load_npy. An uncompressed member (np.savez) can be memory-mapped straight
    from the archive; a compressed one (np.savez_compressed) must be read (mmap=True then
    raises ValueError, None reads it). Never unpickles.
    """
    _check_mmap(mmap)
    path = _regular_file(path)
    # One open file for the archive's directory, the member's header and its data (as in
    # load_npy): opened by name each time, a file saved over the path meanwhile gave the new
    # file's array, or the old member's offset and shape over the new file's bytes.
    with open(path, "rb") as f:
        _check_zip(path, f)
        try:
            with zipfile.ZipFile(f) as archive:
                return _read_member(path, f, archive, key, mmap)
        except _ZIP_DAMAGE as error:
            raise _zip_damage(path, error) from None


def _check_zip(path: Path, f) -> None:
    """Refuses the open file `f` unless it is a zip archive, saying what it is instead where
    its first bytes tell (_not_zip_hint)."""
    if not zipfile.is_zipfile(f):
        raise ValueError(f"{path}: not an .npz archive{_not_zip_hint(f)}")


# The first bytes of an HDF5 file's superblock (its signature): at offset 0, or past a user
# block at 512, 1024, 2048, ... (h5py writes one when asked: userblock_size).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_FIRST_USER_BLOCK = 512


def _is_hdf5(f) -> bool:
    """Whether the open file `f` holds an HDF5 superblock signature where HDF5 looks for one:
    offset 0, then each power of two from 512 within the file (a few dozen reads at most)."""
    size = f.seek(0, os.SEEK_END)
    offset = 0
    while offset + len(_HDF5_SIGNATURE) <= size:
        f.seek(offset)
        if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
            return True
        offset = _HDF5_FIRST_USER_BLOCK if offset == 0 else offset * 2
    return False


def _not_zip_hint(f) -> str:
    """What the open file `f`, which is no zip archive, is, from its first bytes, as the end
    of load_npz's refusal: "" where they tell nothing (its hint had said "a .npy file? use
    load_npy" for any file, empty, HDF5 or text)."""
    f.seek(0)
    head = f.read(max(len(_HDF5_SIGNATURE), len(np.lib.format.MAGIC_PREFIX)))
    f.seek(0)
    if not head:
        return " (the file is empty)"
    if head.startswith(np.lib.format.MAGIC_PREFIX):
        return " (a .npy file: use load_npy)"
    if head.startswith(_ZIP_PREFIXES):  # (is_zipfile looks for the end record, which holds the directory)
        return " (it starts as a zip archive but its end record is missing or damaged: cut short?)"
    hdf5 = _is_hdf5(f)
    f.seek(0)
    return " (an HDF5 file: use load_ann_benchmarks, or load_array with a .hdf5 or .h5 name)" if hdf5 else ""


def _zip_damage(path: Path, error: BaseException) -> BaseException:
    """What load_npz raises for one of _ZIP_DAMAGE met in the archive at `path`: a ValueError
    naming the file, or the error itself when it is about the path (already clear)."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return error
    return ValueError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})")


def _member_damage(path: Path, key: str, error: BaseException) -> ValueError:
    """What load_npz (and the CLI's streamed reads) raise for one of _NPY_DAMAGE met in the
    member `key`: numpy's messages name no file, and zipfile's EOFError for a member whose data
    ends before its directory entry says (the file cut while it is read) has no text at all."""
    if isinstance(error, EOFError) and not str(error):
        reason = "the file ends inside the member's data: cut short while it was read?"
    else:
        reason = str(error) or type(error).__name__
    return ValueError(f"{path}: array {key!r} is not readable ({reason})")


def _member_name(path: Path, archive: zipfile.ZipFile, key: str | None) -> str:
    """The name (less ".npy") of the member holding `key`, or the archive's only array when key
    is None; ValueError naming key otherwise. `key` is an array's name or its member's full
    name, as np.load's takes it (_key_name)."""
    names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    key = _key_name(key, names)
    # Two members of one name: which is the array is not known (zipfile, and np.load, read the
    # last; a listing of the archive may show the first), and no key picks one
    chosen = key if key is not None else names[0] if len(set(names)) == 1 else None
    if chosen is not None and names.count(chosen) > 1:
        raise ValueError(f"{path}: holds {names.count(chosen)} members named {chosen + '.npy'!r}; "
                         "expected one (which is the array is unknown)")
    if key is None:
        if len(names) != 1:
            raise ValueError(f"key: {path} holds {len(names)} arrays ({', '.join(names) or 'none'}); "
                             "pass key= to pick one")
        return names[0]
    if key not in names:
        raise ValueError(f"key: {path} has no array {key!r} (it holds: {', '.join(names) or 'none'})")
    return key


def _key_name(key: Any, names: list[str]) -> Any:
    """`key` as the name of an array in `names` (its member's name less ".npy"): np.load's
    archive takes a member's full name first ("x.npy" is the member x.npy, though another is
    named x.npy.npy), then the name less ".npy"; load_npz refused the full name. Anything
    else as it is (refused by _member_name)."""
    if isinstance(key, str) and key.endswith(".npy") and key[: -len(".npy")] in names:
        return key[: -len(".npy")]
    return key


# The zip compression methods zipfile decompresses (np.savez stores, np.savez_compressed
# deflates; np.load reads bzip2 and LZMA members too, as do the loaders: _zip_member.py; Python
# 3.14 added Zstandard), and the names of some others, for the error that refuses a member of
# one (APPNOTE.TXT 4.4.5).
_ZIP_METHODS_READ = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
                     *([zipfile.ZIP_ZSTANDARD] if hasattr(zipfile, "ZIP_ZSTANDARD") else [])}
_ZIP_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 93: "Zstandard", 95: "XZ", 97: "WavPack",
                     98: "PPMd", 99: "WinZip AES encryption"}


def _check_member_readable(path: Path, f, key: str, info: zipfile.ZipInfo) -> None:
    """Refuses the member `info` (the array `key`) of the archive open as `f` before it is read
    or mapped, naming it, when zipfile cannot read it: encrypted (zipfile's refusal printed the
    member's whole ZipInfo), or compressed with a method zipfile has no decompressor for
    (mmap=True was told to pass mmap=False, which then failed with "That compression method is
    not supported"). Damage that only makes the directory say so is one of _ZIP_DAMAGE
    (_check_local_header)."""
    encrypted, method = bool(info.flag_bits & 0x1), info.compress_type
    if not encrypted and method in _ZIP_METHODS_READ:
        return
    _check_local_header(f, info, encrypted, method)
    if encrypted:
        raise ValueError(f"{path}: array {key!r} (member {info.filename!r}) is encrypted; latentspace reads only "
                         "unencrypted archives")
    name = _ZIP_METHOD_NAMES.get(method, "not one zipfile knows")
    raise ValueError(f"{path}: array {key!r} is compressed with zip method {method} ({name}), which Python's "
                     "zipfile cannot decompress; save it with np.savez or np.savez_compressed")


def _check_local_header(f, info: zipfile.ZipInfo, encrypted: bool, method: int) -> None:
    """Damage, as load_npz reports it, when the member's local header, in the archive open as
    `f`, is missing or says otherwise than its directory entry about its encryption or
    compression method: both hold them, and a byte flipped in the directory is no encrypted
    member, nor one of a method zipfile lacks. Raised as the type zipfile raises for it, in
    its order (the CLI's users, and its tests, know the damage by it), with words that name
    the member (zipfile's printed its whole ZipInfo)."""
    f.seek(info.header_offset)
    local = f.read(30)
    name = info.filename
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"Bad magic number for the local header of member {name!r}")
    if bool(local[6] & 0x1) != encrypted:
        raise RuntimeError(f"member {name!r} is {'' if encrypted else 'not '}encrypted by the archive's directory, "
                           f"{'not ' if encrypted else ''}by its local header: damaged?")
    local_method = int.from_bytes(local[8:10], "little")
    if local_method != method:
        raise NotImplementedError(f"That compression method is not supported (member {name!r}: method {method} in the "
                                  f"archive's directory, {local_method} in its local header: damaged?)")


def _read_member(path: Path, f, archive: zipfile.ZipFile, key: str | None, mmap: bool | None) -> np.ndarray:
    """load_npz's array from the archive open on the file `f` (its damage errors are
    translated by load_npz)."""
    key = _member_name(path, archive, key)
    info = archive.getinfo(key + ".npy")
    _check_member_readable(path, f, key, info)
    stored = info.compress_type == zipfile.ZIP_STORED
    if mmap is True and not stored:
        raise ValueError(f"mmap: array {key!r} of {path} is compressed and cannot be memory-mapped; "
                         "pass mmap=False (or save it with np.savez, uncompressed)")
    if mmap is None:
        mmap = stored and info.file_size >= MMAP_THRESHOLD_BYTES
    try:
        if mmap:
            array = _map_member(f, info)
        else:
            _check_member_size(f, archive, info)
            with open_member(f, archive, info) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
                # read_array stops at the header's shape: reading to the end runs zipfile's
                # CRC check, and bytes left over mean the header claims fewer rows than held
                if member.read(1):
                    raise ValueError("its header's shape does not match the member's size")
    except _NPY_DAMAGE as error:  # numpy's messages name no file
        raise _member_damage(path, key, error) from None
    return _checked(array, path, f"array {key!r}")


def _check_member_size(f, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuses a member of the archive open as `f` whose .npy header claims more data than the
    member can hold (_member_bytes), from the header alone: numpy allocates the claimed array
    before reading a byte (a claim of terabytes was a MemoryError naming nothing)."""
    with open_member(f, archive, info) as member:
        header = _CountedStream(member)
        shape, _, dtype = _npy_header(header)
    _check_claim(shape, dtype, _member_bytes(f, info) - header.count)


# The most bytes one byte of deflate data can give: a 258-byte match coded in about 2 bits
# gives 1032 to 1 (zlib's documented limit of the format); a member claiming more is lying.
DEFLATE_MOST_EXPANSION = 1032


def _member_bytes(f, info: zipfile.ZipInfo) -> int:
    """The most bytes the member `info` of the archive open as `f` can give: its directory
    entry's size (zipfile's stream stops there), and for a stored member no more than the file
    holds past its local header (an entry claiming 4 GB in a file of a few KiB was believed,
    the read then saying the file was cut short while it was read)."""
    in_file = os.fstat(f.fileno()).st_size - info.header_offset - 30
    if info.compress_type == zipfile.ZIP_DEFLATED:
        # Deflate expands at most DEFLATE_MOST_EXPANSION-fold: a directory entry claiming more
        # (4 GB from a few KiB) was believed until the read failed, after the output or the
        # results of every claimed row were made.
        return min(info.file_size, DEFLATE_MOST_EXPANSION * min(info.compress_size, in_file))
    if info.compress_type != zipfile.ZIP_STORED:
        return info.file_size  # (bzip2's and LZMA's expansion has no such small bound)
    return min(info.file_size, in_file)


class _CountedStream:
    """A stream that counts the bytes read from it (the length of a member's .npy header)."""

    def __init__(self, stream: Any):
        self._stream, self.count = stream, 0

    def read(self, n: int) -> bytes:
        data = self._stream.read(n)
        self.count += len(data)
        return data


def _npy_header(stream):
    """(shape, fortran_order, dtype) of the .npy file (or zip member) read from `stream`'s
    start, with numpy's checks and errors; the stream is left at the array's data."""
    return _read_npy_header(stream, np.lib.format.read_magic(stream))


# The longest .npy header read: numpy's own bound (np.load's max_header_size). A header of an
# array of numbers takes about 128 bytes.
MAX_NPY_HEADER_BYTES = 10_000


def _read_npy_header(stream, version):
    """(shape, fortran_order, dtype) of the .npy header that follows the magic string of
    `version` in `stream`, with numpy's checks and errors, and these before numpy's: the
    header's length refused past MAX_NPY_HEADER_BYTES before the header is read (numpy read all
    that it claimed, with a copy, only then to refuse it: 555 bytes of bzip2 claiming 512 MiB
    held 1 GiB); and the array it describes, one numpy can make (_check_header_array)."""
    if version not in ((1, 0), (2, 0), (3, 0)):  # numpy's own check and message
        raise ValueError(f"we only support format version (1,0), (2,0), and (3,0), not {version}")
    length_field = _read_exactly(stream, 2 if version == (1, 0) else 4, "array header")
    length = int.from_bytes(length_field, "little")
    if length > MAX_NPY_HEADER_BYTES:
        raise ValueError(f"its .npy header claims {length:,} bytes; a header is at most "
                         f"{MAX_NPY_HEADER_BYTES:,} (an array of numbers takes about 128)")
    header = io.BytesIO(length_field + _read_exactly(stream, length, "array header"))
    # 3.0 is 2.0's layout with UTF-8 text, written only for field names latin-1 cannot hold:
    # no array of numbers (the loaders refuse the others after reading the header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    _check_header_array(shape, dtype)
    return shape, fortran, dtype


def _read_exactly(stream, size: int, what: str) -> bytes:
    """The next `size` bytes of `stream` (a zip member's can come in pieces); numpy's words
    when it ends first."""
    data = b""
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            raise ValueError(f"EOF: reading {what}, expected {size} bytes got {len(data)}")
        data += piece
    return data


def _check_header_array(shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuses, before any array is made (the block readers never make the whole), what a
    .npy header describes that no reader takes, each in one wording:
    - an array of Python objects (stored pickled; numpy's refusal spoke of an allow_pickle that
      latentspace does not take, the CLI's reader of a map it does not make);
    - a shape or dtype numpy would refuse when it made the array, in numpy's words: the block
      readers took (2**62, 0) (no data, so no claim to refuse) for that many empty rows, handed
      out without end; a bool as a dimension (numpy's check takes it for an int) was numpy's
      bare TypeError, or one row;
    - a subarray dtype (numpy writes none: an array of one takes its axes), which np.load
      refused and the map read with those axes."""
    if dtype.hasobject:
        raise ValueError(f"an array of Python objects (dtype {dtype}), stored pickled: latentspace never "
                         "unpickles; save an array of numbers")
    if not all(type(size) is int for size in shape):
        raise ValueError(f"shape is not valid: {shape!r}")
    if dtype.subdtype is not None:
        raise ValueError(f"its dtype {dtype} is a subarray dtype, which numpy never writes")
    if any(size < 0 for size in shape):
        raise ValueError("negative dimensions are not allowed")
    np.empty((0,) * len(shape))  # numpy's limit on axes (32 before numpy 2, 64 since), in its words
    most = np.iinfo(np.intp).max
    if any(size > most for size in shape):
        raise ValueError("Maximum allowed dimension exceeded")
    # (numpy counts an empty axis as 1 here, so that the other axes' product cannot overflow)
    if math.prod(max(size, 1) for size in shape) * max(dtype.itemsize, 1) > most:
        raise ValueError("array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size.")


def _map_member(f, info: zipfile.ZipInfo) -> np.ndarray:
    """np.memmap of an uncompressed .npy member of the zip archive open as `f`
    (_read_member names the file in its errors)."""
    shape, fortran, dtype = _stored_member_layout(f, info)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(f, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                     order="F" if fortran else "C")  # outlives f: the map holds its own handle


def _stored_member_layout(f, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an uncompressed .npy member of the zip archive open as
    `f`, left at the member's data: checked to be read from the file as it lies there, not
    through zipfile (mapped, or by offset), with no CRC check (_read_member names the file in
    its errors)."""
    if info.flag_bits & 0x1:  # mapping an encrypted member would give its ciphertext as data
        raise ValueError("the member is encrypted (latentspace reads only unencrypted archives)")
    size = os.fstat(f.fileno()).st_size
    f.seek(info.header_offset)
    local = f.read(30)  # the local file header: its name and extra lengths can differ
    if local[:4] != b"PK\x03\x04":
        raise ValueError("corrupted .npz archive (bad local header)")
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    shape, fortran, dtype = _npy_header(f)
    offset = f.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    # Not CRC-checked when mapped: at least the header's shape must fill the member exactly,
    # or the map would read the next member's bytes (or drop rows) as data.
    if offset - start + nbytes != info.file_size:
        raise ValueError("its header's shape does not match the member's size")
    if offset + nbytes > size:  # the size of this open file, not of whatever the path is now
        raise ValueError(f"its data runs past the end of the file: {offset + nbytes} bytes needed, "
                         f"the file has {size}")
    return shape, fortran, dtype


def load_array(path: str | bytes | os.PathLike, key: str | None = None, *, mmap: bool | None = None) -> np.ndarray:
    """An array from .npy, .npz or ann-benchmarks .hdf5 / .h5 (its "train" set, or `key`),
    chosen by the file's suffix."""
    suffix = as_path(path).suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise ValueError(f"key: a .npy file holds one array; got key={key!r}")
        return load_npy(path, mmap=mmap)
    if suffix == ".npz":
        return load_npz(path, key, mmap=mmap)
    if suffix in (".hdf5", ".h5"):
        part = "train" if key is None else key
        if part not in ("train", "test", "neighbors", "distances"):  # before the file is read
            raise ValueError(f"key: expected 'train', 'test', 'neighbors' or 'distances' for an HDF5 file, got {key!r}")
        return getattr(load_ann_benchmarks(path, mmap=mmap), part)
    raise ValueError(f"path: expected a .npy, .npz, .hdf5 or .h5 file, got {path!s}")


# ---------------------------------------------------------------------------------------
# ann-benchmarks HDF5

# ann-benchmarks' distance names -> latentspace metrics ("angular" is cosine similarity).
_ANN_METRICS = {"euclidean": "l2", "angular": "cosine", "dot": "ip", "ip": "ip", "cosine": "cosine"}


@dataclass
class AnnBenchmark:
    """An ann-benchmarks dataset: vectors to index, queries and their true neighbours.

    train: (n, d) vectors; test: (q, d) queries; neighbors: (q, k) int indices into train,
    nearest first, each in 0..n-1, or -1 as padding at the end of a row of fewer than k
    (ann-benchmarks' own padding, written with +inf distances); distances: (q, k) their
    distances; distance: the file's "distance" attribute ("euclidean", "angular", ...);
    metric: the matching latentspace metric ("l2", "cosine", "ip") or None when there is none.
    """

    train: np.ndarray
    test: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    distance: str
    metric: str | None


_H5_DAMAGE = (OSError, KeyError, RuntimeError, TypeError)
_ANN_PARTS = ("train", "test", "neighbors", "distances")


def load_ann_benchmarks(path: str | bytes | os.PathLike, *, mmap: bool | None = None) -> AnnBenchmark:
    """Reads an ann-benchmarks HDF5 file (datasets train, test, neighbors, distances and the
    attribute "distance"), as published at ann-benchmarks.com. Needs h5py.

    mmap: as for load_npy; a contiguous, uncompressed dataset (the usual layout) is mapped
    straight from the file, a chunked or compressed one is read.

    Refused with a ValueError naming the file, the dataset and its first bad entry: neighbour
    ids that are no integers, or name no train row (negative, or n or more, for n train rows;
    -1 is taken as padding, as ann-benchmarks pads its result files, but only at the end of a
    row); and distances that are NaN, or negative for "euclidean" (a norm): a recall computed
    from them was silently wrong. (An "angular" distance, 1 - cos, can round to just below 0,
    and a "dot" distance is any number: only NaN is refused for those.)
    """
    _check_mmap(mmap)
    h5py = _import_h5py()
    path = _regular_file(path)
    with _open_h5(h5py, path) as f:
        try:
            parts = _ann_datasets(path, f)
            arrays = {name: _h5_array(path, parts[name], mmap) for name in _ANN_PARTS}
            distance = _ann_distance(f)
        except _H5_DAMAGE as error:
            raise _h5_damage(path, error) from None
    _check_ann_shapes(path, {name: tuple(array.shape) for name, array in arrays.items()})
    _check_ann_answers(path, arrays, distance)
    return AnnBenchmark(distance=distance, metric=_ANN_METRICS.get(distance.lower()), **arrays)


def _ann_distance(f: Any) -> str:
    """The open ann-benchmarks file's "distance" attribute as text ("" when it has none)."""
    distance = f.attrs.get("distance", "")
    if isinstance(distance, bytes):  # (a fixed-length string; bytes that are no UTF-8 are no metric's name)
        distance = distance.decode(errors="replace")
    return str(distance)


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("load_ann_benchmarks needs h5py: pip install 'latentspace[hdf5]' "
                          "(or pip install h5py)") from None
    return h5py


def _open_h5(h5py: Any, path: Path):
    """The HDF5 file at `path`, open for reading; ValueError naming it when it is no HDF5 file."""
    try:
        # sec2 (HDF5's default, also on Windows) so that _map_h5_dataset can map the
        # descriptor HDF5 reads the layout from; an HDF5_DRIVER setting would pick another
        return h5py.File(path, "r", driver="sec2")
    except OSError as error:
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from None


def _h5_damage(path: Path, error: BaseException) -> ValueError:
    # The file opened as HDF5: h5py reports damage inside it as any of _H5_DAMAGE (bytes
    # flipped one at a time in a small file gave each: "addr overflow", "actual len exceeds
    # EOA", "bad object header version number", "Unknown string encoding")
    return ValueError(f"{path}: a damaged HDF5 file ({type(error).__name__}: {error})")


def _ann_datasets(path: Path, f: Any) -> dict[str, Any]:
    """The four parts of the open ann-benchmarks file `f` (not read), each checked to be a
    dataset of numbers. h5py's errors for a damaged file escape (see _h5_damage)."""
    for name in _ANN_PARTS:  # before `name in f`, which opens the file an external link names
        _check_in_file(path, f, name, name)
    missing = [name for name in _ANN_PARTS if name not in f]
    if missing:
        raise ValueError(f"{path}: not in the ann-benchmarks layout (missing datasets: {', '.join(missing)})")
    parts = {name: f[name] for name in _ANN_PARTS}
    for dataset in parts.values():
        _check_h5_dataset(path, dataset)
    return parts


# The most soft links followed to a part (HDF5's own limit, H5L_NUM_LINKS, is 16).
_MAX_SOFT_LINKS = 16


def _check_in_file(path: Path, f: Any, name: str, target: str, followed: int = 0) -> None:
    """Refuses the part `name` when reaching `target` (its path in `f`) goes through an external
    link: HDF5 opens whatever file the link names, and blocked forever on a FIFO (Ctrl-C did not
    stop it). Each component's link is looked at (getlink: not followed) before it is passed,
    and a soft link's target before what lies past it."""
    import h5py

    walked = ""
    for part in target.split("/"):
        if part in ("", "."):  # ("a//b", "/./b": HDF5 reads them as "a/b", "/b"; h5py's get did not)
            continue
        parent, walked = walked, f"{walked}/{part}"
        link = f.get(walked, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise ValueError(f"{path}: {name} is in another file (an external link to {link.filename}:{link.path}); "
                             "expected its data in this file")
        if isinstance(link, h5py.SoftLink):
            if followed >= _MAX_SOFT_LINKS:
                raise ValueError(f"{path}: {name} is reached through more than {_MAX_SOFT_LINKS} soft links")
            _check_in_file(path, f, name, link.path if link.path.startswith("/") else f"{parent}/{link.path}",
                           followed + 1)
        if link is None:  # missing: reported as such by the caller
            return


def _check_ann_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    for name in ("train", "test"):
        if len(shapes[name]) != 2:
            raise ValueError(f"{path}: {name} must be 2-d (rows of vectors), got shape {shapes[name]}")
    if shapes["train"][1] != shapes["test"][1]:
        raise ValueError(f"{path}: train and test dimensions differ, {shapes['train']} vs {shapes['test']}")
    for name in ("neighbors", "distances"):
        if len(shapes[name]) != 2:
            raise ValueError(f"{path}: {name} must be 2-d (k neighbours of each query), got shape {shapes[name]}")
    if shapes["distances"] != shapes["neighbors"]:
        raise ValueError(f"{path}: distances has shape {shapes['distances']} but neighbors {shapes['neighbors']}")
    if shapes["neighbors"][0] != shapes["test"][0]:
        raise ValueError(f"{path}: neighbors has {shapes['neighbors'][0]} rows for {shapes['test'][0]} queries")


# ann-benchmarks' distances that are never negative (a norm; the others: "angular" is 1 - cos,
# which rounds to just below 0 for a vector's own direction, and "dot" is any number).
_NONNEGATIVE_DISTANCES = {"euclidean"}
# The rows of neighbors or distances checked at a time (ann-benchmarks' are 10,000 x 100: one
# block), so that the comparisons' temporary arrays stay small for a file of any size.
_ANSWER_BLOCK_BYTES = 4 << 20


def _check_ann_answers(path: Path, parts: dict[str, Any], distance: str) -> None:
    """Refuses neighbors and distances (arrays or h5py datasets of 2-d shapes checked by
    _check_ann_shapes) that no recall can use, naming the first bad entry (row-major):
    see load_ann_benchmarks."""
    _check_ann_neighbors(path, parts["neighbors"], parts["train"].shape[0])
    _check_ann_distances(path, parts["distances"], distance)


def _check_ann_neighbors(path: Path, neighbors: Any, n_train: int) -> None:
    """Refuses neighbour ids that are no integers, or name none of the n_train rows (-1 is
    padding, at a row's end only)."""
    if neighbors.dtype.kind not in "iu":
        raise ValueError(f"{path}: dataset /neighbors has dtype {neighbors.dtype}; expected integers (ids of train "
                         "rows)")
    bad = _first_entry(neighbors, lambda block: _bad_neighbors(block, n_train))
    if bad is not None:
        (row, column), value = bad
        where = f"{path}: neighbors[{row}, {column}] is {value}"
        if value == -1:
            raise ValueError(f"{where} (padding) followed by an id in its row; padding only ends a row")
        if value < 0:
            raise ValueError(f"{where}, a negative id (only -1, padding, may end a row)")
        ids = f": ids 0 to {n_train - 1}" if n_train else ""
        raise ValueError(f"{where}, past the last train row (train has {n_train} rows{ids})")


def _check_ann_distances(path: Path, distances: Any, distance: str) -> None:
    """Refuses a NaN distance, and a negative one where the metric `distance` (the file's
    attribute) has none (_NONNEGATIVE_DISTANCES); +inf is ann-benchmarks' padding."""
    if distances.dtype.kind != "f":  # (integers: neither NaN nor, for the non-negative metrics, checked)
        return
    nonnegative = distance.lower() in _NONNEGATIVE_DISTANCES
    bad = _first_entry(distances, lambda block: np.isnan(block) | (nonnegative & (block < 0)))
    if bad is not None:
        (row, column), value = bad
        why = "expected a distance" if np.isnan(value) else f"a {distance} distance is never negative"
        raise ValueError(f"{path}: distances[{row}, {column}] is {value!s}; {why}")


def _bad_neighbors(block: np.ndarray, n_train: int) -> np.ndarray:
    """Where the rows of neighbour ids `block` name no train row: n_train or more, below -1,
    or -1 (padding) with an id after it in its row."""
    bad = block >= n_train
    if block.dtype.kind == "i":  # (an unsigned id is never negative)
        padding = block == -1
        bad |= block < -1
        bad[:, :-1] |= padding[:, :-1] & ~padding[:, 1:]
    return bad


def _first_entry(array: Any, is_bad: Any) -> tuple[tuple[int, int], Any] | None:
    """((row, column), value) of the first entry of the 2-d `array` (or h5py dataset) where
    is_bad(block of rows) is True, read a block of rows at a time; None where there is none."""
    rows = max(1, _ANSWER_BLOCK_BYTES // max(1, array.shape[1] * array.dtype.itemsize))
    for start in range(0, array.shape[0], rows):
        block = np.asarray(array[start : start + rows])
        found = np.flatnonzero(is_bad(block))
        if len(found):
            row, column = divmod(int(found[0]), block.shape[1])
            return (start + row, column), block[row, column]  # (numpy's scalar: its str, float32's own digits)
    return None


def _check_h5_dataset(path: Path, dataset: Any) -> None:
    import h5py

    # A group, or a dataset of a null dataspace (shape None), has no dtype or shape to read
    if not isinstance(dataset, h5py.Dataset) or dataset.shape is None:
        what = "a dataset of no shape" if isinstance(dataset, h5py.Dataset) else f"an HDF5 {type(dataset).__name__}"
        raise ValueError(f"{path}: {dataset.name} is not an array ({what}); expected a dataset of numbers")
    if dataset.dtype.kind not in "fiu":
        raise ValueError(f"{path}: dataset {dataset.name} has dtype {dataset.dtype}; expected numbers")
    # Data in files the dataset names: HDF5 reads whatever they are (a FIFO blocked forever), and
    # a virtual dataset's missing file gave its fill value as rows, without a word
    if dataset.external is not None:
        files = ", ".join(sorted({os.fsdecode(name) for name, _, _ in dataset.external}))
        raise ValueError(f"{path}: dataset {dataset.name} is stored in another file (external storage: {files}); "
                         "expected its data in this file")
    if dataset.is_virtual:
        raise ValueError(f"{path}: dataset {dataset.name} is a virtual dataset, mapped from another file; "
                         "expected its data in this file")
    _check_filters(path, dataset)
    _check_written(path, dataset)


def _check_filters(path: Path, dataset: Any) -> None:
    """Refuses a dataset compressed with a filter this HDF5 cannot decode (a plugin it lacks:
    blosc, zstd, lz4 as hdf5plugin writes them), which the first read called damage."""
    import h5py

    create = dataset.id.get_create_plist()
    for number in range(create.get_nfilters()):
        code = create.get_filter(number)[0]
        if not h5py.h5z.filter_avail(code):  # (loads a plugin found on HDF5_PLUGIN_PATH)
            raise ValueError(f"{path}: dataset {dataset.name} is compressed with HDF5 filter {code}, which this HDF5 "
                             "cannot decode (no plugin for it: set HDF5_PLUGIN_PATH to a folder holding one)")


def _check_written(path: Path, dataset: Any) -> None:
    """Refuses a dataset with rows never written: they have no data in the file, and HDF5 gives
    its fill value for them (they were read as zeros without a word; a tiny file declaring
    10**12 such rows was a memory bomb). Counted from the layout, nothing read."""
    import h5py

    if math.prod(dataset.shape) == 0:
        return
    if dataset.chunks is None:  # contiguous storage is allocated whole or not at all; compact always
        compact = dataset.id.get_create_plist().get_layout() == h5py.h5d.COMPACT
        if not compact and dataset.id.get_storage_size() == 0:
            raise ValueError(f"{path}: dataset {dataset.name} was never written (its shape {dataset.shape} has no "
                             "data in the file)")
        return
    count_chunks = getattr(dataset.id, "get_num_chunks", None)  # (an h5py built on HDF5 < 1.10.5 has none)
    if count_chunks is None:
        return
    chunks = math.prod(-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks))
    written = count_chunks()
    if written < chunks:
        raise ValueError(f"{path}: dataset {dataset.name} has rows never written: {chunks - written:,} of its "
                         f"{chunks:,} chunks have no data in the file")


def _h5_mappable(dataset: Any) -> bool:
    """Whether the dataset is contiguous and uncompressed, stored in the file itself (it can
    be mapped), not chunked, compressed, compact, external or never written."""
    return dataset.chunks is None and dataset.compression is None and dataset.id.get_offset() is not None


def _h5_array(path: Path, dataset: Any, mmap: bool | None) -> np.ndarray:
    import h5py

    _check_h5_dataset(path, dataset)
    nbytes = math.prod(dataset.shape) * dataset.dtype.itemsize
    if nbytes == 0:  # nothing to map (as an empty .npy or .npz member)
        return np.empty(dataset.shape, dtype=dataset.dtype)
    offset = dataset.id.get_offset()
    mappable = _h5_mappable(dataset)
    if mmap is True and not mappable:
        compact = dataset.id.get_create_plist().get_layout() == h5py.h5d.COMPACT  # no offset either
        # (never written and external storage are refused by _check_h5_dataset)
        why = "is stored in its object header (HDF5's compact layout)" if compact else "is chunked or compressed"
        raise ValueError(f"mmap: dataset {dataset.name} of {path} {why} and cannot be memory-mapped; "
                         "pass mmap=False")
    if mmap is None:
        mmap = mappable and nbytes >= MMAP_THRESHOLD_BYTES
    if mmap:
        return _map_h5_dataset(dataset, offset)
    return np.asarray(dataset[()])


def _map_h5_dataset(dataset: Any, offset: int) -> np.memmap:
    """np.memmap of a contiguous dataset from the very file h5py has open.

    Mapping the path by name could map another file: one saved over the path (os.replace)
    after h5py read the layout would give the old file's offsets and shapes over the new
    file's bytes. Mapping h5py's own descriptor (a duplicate of it, the sec2 driver's file
    handle) cannot, and needs no second open, no check of which file it got and no retry.
    """
    descriptor = dataset.file.id.get_vfd_handle()
    # The duplicate shares the file position with HDF5's descriptor: np.memmap seeks to the
    # end to learn the size, and a sec2 build without pread (Windows) trusts the position it
    # last left, so put it back.
    position = os.lseek(descriptor, 0, os.SEEK_CUR)
    try:
        with os.fdopen(os.dup(descriptor), "rb") as f:
            # np.memmap refuses a map past the end of this file (HDF5 refuses such a dataset
            # before: "invalid dataset size"); the map outlives f, holding its own handle
            return np.memmap(f, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
    finally:
        os.lseek(descriptor, position, os.SEEK_SET)

"""Input files read a block of rows at a time, for the commands that go through their rows in
chunks (`latentspace encode`, `index build`, `search`): memory bounded by a block, not by the
file.

Nothing is memory-mapped: a mapped file cut short while it is read (truncated in place) killed
the process with SIGBUS at the first page past its new end. A .npy is read by offset from its
open file (_FileRows; a Fortran-ordered one a column at a time); an .npz member, stored or
compressed, from its zip stream (its CRC checked); an HDF5 dataset, contiguous, chunked or
compressed, a slice of rows at a time (the file's size checked after each read: HDF5 reads past
the end as zeros). A Fortran-ordered stored member is read by offset, as a .npy; a
Fortran-ordered compressed member is read whole (its rows are not contiguous in the stream), as
is a member or dataset holding no data. A member whose header claims more data than it holds
is refused before a row is read (a claim of terabytes was allocated for). bzip2 and LZMA
members (np.load reads them too) are decompressed here, the output bounded by each read:
zipfile decompresses each piece of their input whole. A dataset's reads run on to a chunk
boundary only within _READ_AHEAD_BYTES (chunks of one column of every row made a read of all).

Every read goes through the one file opened (as in the loaders): a file saved over the path
meanwhile changes nothing read. Damage met while a block is read raises the loaders' ValueError
naming the file.
"""

from __future__ import annotations

import contextlib
import lzma
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets
from ._paths import as_path
from ._zip_member import PIECE_BYTES, open_member

__all__ = ["ArrayRows", "open_rows"]

# The most rows (in bytes) a read of an HDF5 dataset may hold past the block it completes. A read
# runs on to the next chunk boundary (no chunk decompressed twice) only within this: chunks tall
# and narrow (one column of every row, (n, 1)) put that boundary past the last row, and the read
# held the whole dataset. Past it, reads end inside chunks, which HDF5 decompresses again for the
# next read: slower, with memory bounded.
_READ_AHEAD_BYTES = 8 << 20


class ArrayRows:
    """An array read whole (the few inputs that are, and search --model's codes), cut into
    blocks by slicing."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = array.ndim

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive views of `rows` rows (the last fewer); none for an array of no rows."""
        for start in range(0, self.shape[0], rows):
            yield self.array[start : start + rows]

    def verify_rest(self) -> None:
        """Nothing is left unread that could be damaged (see _MemberRows.verify_rest)."""

    def close(self) -> None:
        """Nothing to close: the array holds no file."""


class _FileRows:
    """The array of a .npy file (or of a stored .npz member, which lies in the file as one),
    read a block of rows at a time from the one file opened, by offset. Not mapped: a map of a
    file cut short while it is read (truncated in place) killed the process with SIGBUS at the
    first page past the new end; a read there ends early, an error naming the file. A
    Fortran-ordered array's block is read a column at a time (each column's rows are
    contiguous in the file)."""

    array = None

    def __init__(self, path: Path, f: Any, shape: tuple[int, ...], fortran: bool, dtype: np.dtype,
                 unreadable: str = "not a readable .npy array"):
        self._path, self._f, self._offset, self._unreadable = path, f, f.tell(), unreadable
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)
        self._columns = math.prod(shape[1:])
        self._fortran = fortran and len(shape) > 1
        self._failed: ValueError | None = None

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive arrays of `rows` rows (the last fewer), as stored."""
        n = self.shape[0]
        for start in range(0, n, rows):
            count = min(rows, n - start)
            block = np.empty((self._columns, count) if self._fortran else (count, self._columns), self.dtype)
            raw = block.view(np.uint8)
            if self._fortran:  # column j's rows start at row j * n of the data
                for column in range(self._columns):
                    self._read_into(raw[column], (column * n + start) * self.dtype.itemsize)
                yield block.T.reshape((count, *self.shape[1:]), order="F")
            else:
                self._read_into(raw.reshape(-1), start * self._columns * self.dtype.itemsize)
                yield block.reshape(count, *self.shape[1:])

    def verify_rest(self) -> None:
        """Raises a read's error again; nothing else to verify (a .npy has no checksum)."""
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        """Nothing to close: the file is closed by open_rows."""

    def _read_into(self, target: np.ndarray, at: int) -> None:
        """Fills the contiguous uint8 `target` from the data's byte `at` on."""
        self._f.seek(self._offset + at)
        view, filled = memoryview(target), 0
        while filled < len(view):
            got = self._f.readinto(view[filled:])
            if not got:  # (the header's size was checked against the file when it was opened)
                self._failed = ValueError(f"{self._path}: {self._unreadable} (EOF: reading array data, "
                                          f"expected {len(view)} bytes got {filled}: the file was cut short "
                                          "while it was read?)")
                raise self._failed
            filled += got


class _MemberRows:
    """A C-ordered .npy member of an .npz, stored or compressed, read from its (decompressing)
    zip stream `member` (left at the array's data) a block at a time."""

    array = None

    def __init__(self, path: Path, key: str, member: Any, shape: tuple[int, ...], dtype: np.dtype):
        self._path, self._key, self._member = path, key, member
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)
        self._row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.nbytes = math.prod(shape) * dtype.itemsize
        self._left = self.nbytes  # the data's bytes not read yet
        self._failed: ValueError | None = None

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive arrays of `rows` rows (the last fewer), as stored (the consumer converts
        the dtype a block at a time). The last is handed out only once the member has passed
        its CRC-32 and holds no more bytes than its header says: a consumer that reads every
        block never finishes on a damaged member."""
        n = self.shape[0]
        for start in range(0, n, rows):
            count = min(rows, n - start)
            block = self._read(count * self._row_bytes).view(self.dtype).reshape(count, *self.shape[1:])
            if start + count == n:
                self._check_end()
            yield block

    def verify_rest(self) -> None:
        """Reads what is left of the member (a piece at a time), raising the ValueError naming
        the file if it is damaged. The CRC covers the whole member, so a damaged one can hand
        out garbage before it is caught: a consumer that stops early, on an error about a row,
        asks here first whether the row was the file's damage."""
        if self._failed is not None:
            raise self._failed
        while self._left:
            self._read(min(self._left, PIECE_BYTES))
        self._check_end()

    def close(self) -> None:
        self._member.close()

    def _read(self, nbytes: int) -> np.ndarray:
        """The next nbytes of the data, as a new uint8 array."""
        buffer = np.empty(nbytes, np.uint8)
        filled = 0
        with self._translated():
            while filled < nbytes:
                piece = self._member.read(min(PIECE_BYTES, nbytes - filled))
                if not piece:  # numpy's words for a member shorter than its header says
                    raise ValueError(f"EOF: reading array data, expected {nbytes} bytes got {filled}")
                buffer[filled : filled + len(piece)] = np.frombuffer(piece, np.uint8)
                filled += len(piece)
        self._left -= nbytes
        return buffer

    def _check_end(self) -> None:
        # Reading past the data runs zipfile's CRC check (at the member's end); a byte left
        # over means the header claims fewer rows than the member holds (as load_npz checks)
        with self._translated():
            if self._member.read(1):
                raise ValueError("its header's shape does not match the member's size")

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Damage met in the member as load_npz reports it, remembered for verify_rest."""
        try:
            yield
        except datasets._NPY_DAMAGE as error:
            self._failed = datasets._member_damage(self._path, self._key, error)
            raise self._failed from None
        except datasets._ZIP_DAMAGE as error:  # (an OSError reading the file, as load_npz says it)
            self._failed = datasets._zip_damage(self._path, error)
            raise self._failed from None


class _DatasetRows:
    """An HDF5 dataset (contiguous, chunked, compressed, or stored in its object header), read
    a slice of rows at a time."""

    array = None

    def __init__(self, path: Path, dataset: Any):
        self._path, self._dataset = path, dataset
        self.shape, self.dtype, self.ndim = tuple(dataset.shape), dataset.dtype, len(dataset.shape)
        # HDF5 decompresses whole chunks: a read that ends inside a chunk, and the next read
        # that starts there, would decompress it twice. Reads end on a chunk's first row
        # (within _READ_AHEAD_BYTES: see _read_end).
        self._chunk_rows = dataset.chunks[0] if dataset.chunks else 1
        self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self._failed: ValueError | None = None
        # HDF5 (its sec2 driver) reads past the file's end as zeros: a file cut short while it
        # is read gave zero rows. Its size now (HDF5 refused to open it shorter than its
        # layout) is checked again after each read.
        self._descriptor = dataset.file.id.get_vfd_handle()
        self._size = os.fstat(self._descriptor).st_size

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive arrays of `rows` rows (the last fewer), as stored. Each read runs on
        past the block (see _read_end); the rows it holds past the block start the next one."""
        n = self.shape[0]
        held = np.empty((0, *self.shape[1:]), self.dtype)  # rows read, not yet handed out
        read_to = 0
        for start in range(0, n, rows):
            count = min(rows, n - start)
            if len(held) < count:
                end = self._read_end(start + count)
                # One new array for the rows held and those read (read_direct: no temporary copy)
                joined = np.empty((len(held) + end - read_to, *self.shape[1:]), self.dtype)
                joined[: len(held)] = held
                self._read_into(joined[len(held) :], read_to, end)
                held, read_to = joined, end
            yield held[:count]
            held = held[count:]

    def _read_end(self, needed: int) -> int:
        """Where the read that completes the block ending at row `needed` stops: the next chunk
        boundary, unless the rows past the block to it exceed _READ_AHEAD_BYTES; then that
        many rows past the block (inside a chunk: HDF5 decompresses it again next read)."""
        n = self.shape[0]
        boundary = -(-needed // self._chunk_rows) * self._chunk_rows
        allowed = needed + _READ_AHEAD_BYTES // max(1, self._row_bytes)
        return min(n, boundary if boundary <= allowed else allowed)

    def verify_rest(self) -> None:
        """Raises the damage a read met again; nothing else to verify: HDF5 checks each
        chunk (its filters) as it is read."""
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        """Nothing to close: the file is closed by open_rows."""

    def _read_into(self, target: np.ndarray, start: int, stop: int) -> None:
        try:
            if len(target):
                self._dataset.read_direct(target, np.s_[start:stop])
        except datasets._H5_DAMAGE as error:
            self._failed = datasets._h5_damage(self._path, error)
            raise self._failed from None
        size = os.fstat(self._descriptor).st_size
        if size < self._size:
            self._failed = ValueError(f"{self._path}: the file was cut short while it was read ({self._size} bytes "
                                      f"when opened, {size} now)")
            raise self._failed


@contextlib.contextmanager
def open_rows(path: str | bytes | os.PathLike, key: str | None = None) -> Iterator[Any]:
    """The array of a .npy, .npz (`key`, or its only array) or ann-benchmarks .hdf5 / .h5
    (its "train" set, or `key`) as an object with shape, dtype, ndim, array (the array, or None
    when streamed) and blocks(rows), for the duration of the block. load_array's checks and
    errors. Streamed rows come from the file held open until the block ends; an error about a
    row from their consumer should call verify_rest() first (see _MemberRows.verify_rest)."""
    suffix = as_path(path).suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise ValueError(f"key: a .npy file holds one array; got key={key!r}")
        with _npy_rows(path) as rows:
            yield rows
    elif suffix == ".npz":
        with _npz_rows(path, key) as rows:
            yield rows
    elif suffix in (".hdf5", ".h5"):
        with _ann_rows(path, key) as rows:
            yield rows
    else:
        raise ValueError(f"path: expected a .npy, .npz, .hdf5 or .h5 file, got {path!s}")


@contextlib.contextmanager
def _npy_rows(path: str | os.PathLike) -> Iterator[Any]:
    """A .npy's rows, read a block at a time (_FileRows): load_npy(mmap=True)'s checks and errors."""
    path = datasets._regular_file(path)
    with open(path, "rb") as f:  # the one open file (see datasets.load_npy)
        datasets._refuse_npz(path, f)
        with datasets._npy_errors(path):
            shape, fortran, dtype = datasets._npy_layout(f)
        rows = _FileRows(path, f, shape, fortran, dtype)
        datasets._checked(rows, path, "the array")
        yield rows


@contextlib.contextmanager
def _npz_rows(path: str | os.PathLike, key: str | None) -> Iterator[Any]:
    path = datasets._regular_file(path)
    with open(path, "rb") as f:  # the one open file (see datasets.load_npz)
        datasets._check_zip(path, f)
        try:
            archive = zipfile.ZipFile(f)
        except datasets._ZIP_DAMAGE as error:
            raise datasets._zip_damage(path, error) from None
        with archive:
            try:
                rows = _member_rows(path, f, archive, key)
            # (LZMAError: a damaged LZMA member read by zipfile, as load_npz did)
            except (*datasets._ZIP_DAMAGE, lzma.LZMAError) as error:
                raise datasets._zip_damage(path, error) from None
            # (the consumer's own errors, raised here, are not the archive's: outside the try)
            with contextlib.closing(rows):
                yield rows


def _member_rows(path: Path, f: Any, archive: zipfile.ZipFile, key: str | None) -> Any:
    """The member's rows: streamed when it is C-ordered and holds data, stored or compressed;
    else the array load_npz gives (mmap=None). zipfile's errors escape (see _npz_rows)."""
    key = datasets._member_name(path, archive, key)
    info = archive.getinfo(key + ".npy")
    datasets._check_member_readable(path, f, key, info)
    # (A stored member is streamed too, not mapped: see _FileRows; and its CRC is checked.)
    member = open_member(f, archive, info)
    try:
        rows = _streamed_member(path, f, key, member, info)
    except BaseException:
        member.close()
        raise
    if rows is not None:
        return rows
    member.close()
    if info.compress_type == zipfile.ZIP_STORED:
        rows = _stored_rows(path, f, key, info)
        if rows is not None:
            return rows
    return ArrayRows(datasets._read_member(path, f, archive, key, None))  # read whole: load_npz's checks


def _stored_rows(path: Path, f: Any, key: str, info: zipfile.ZipInfo) -> _FileRows | None:
    """A stored member that _streamed_member does not stream (Fortran-ordered: load_npz maps
    it from 256 MiB) read by offset from the file (_FileRows), as load_npz maps it; None for
    one holding no data (read whole)."""
    try:
        shape, fortran, dtype = datasets._stored_member_layout(f, info)
    except datasets._NPY_DAMAGE as error:
        raise datasets._member_damage(path, key, error) from None
    if len(shape) < 1 or math.prod(shape) == 0:
        return None
    rows = _FileRows(path, f, shape, fortran, dtype, f"array {key!r} is not readable")
    datasets._checked(rows, path, f"array {key!r}")
    return rows


def _streamed_member(path: Path, f: Any, key: str, member: Any, info: zipfile.ZipInfo) -> _MemberRows | None:
    """The open member's rows, its header read and checked (_checked_header); None for one
    read otherwise: Fortran-ordered, or holding no data. (One of objects was refused with its header.)"""
    shape, fortran, dtype = _checked_header(path, f, key, member, info)
    rows = _MemberRows(path, key, member, shape, dtype)
    if len(shape) < 1 or (fortran and len(shape) > 1) or not rows.nbytes:
        return None
    datasets._checked(rows, path, f"array {key!r}")  # its dtype, before any data is read
    return rows


def _checked_header(path: Path, f: Any, key: str, member: Any, info: zipfile.ZipInfo) -> tuple[Any, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy header read from the open `member`, which is
    left at its data; the shape checked against the most the member can give
    (datasets._member_bytes: its directory entry's size, at which the stream stops) before a
    row is read: a claim of terabytes was
    allocated for a block (MemoryError, naming nothing), or taken at its word for the command's
    output (encode's codes, search's results). Errors as load_npz words them. (A claim of fewer
    bytes is refused at the member's end, by _check_end: the entry's size can be larger than
    the data, whose stream then ends first, as zipfile and load_npz accept.)"""
    header = datasets._CountedStream(member)
    try:
        shape, fortran, dtype = datasets._npy_header(header)
        datasets._check_claim(shape, dtype, datasets._member_bytes(f, info) - header.count)
    except datasets._NPY_DAMAGE as error:
        raise datasets._member_damage(path, key, error) from None
    return shape, fortran, dtype


@contextlib.contextmanager
def _ann_rows(path: str | os.PathLike, key: str | None) -> Iterator[Any]:
    part = "train" if key is None else key
    if part not in datasets._ANN_PARTS:  # before the file is read
        raise ValueError(f"key: expected 'train', 'test', 'neighbors' or 'distances' for an HDF5 file, got {key!r}")
    h5py = datasets._import_h5py()
    path = datasets._regular_file(path)
    with datasets._open_h5(h5py, path) as f:
        try:
            # load_ann_benchmarks' checks of the layout, without reading the other parts
            parts = datasets._ann_datasets(path, f)
            datasets._check_ann_shapes(path, {name: tuple(dataset.shape) for name, dataset in parts.items()})
            dataset = parts[part]
            # (the part asked for only, read a block at a time: a train or test stream reads no other)
            if part == "neighbors":
                datasets._check_ann_neighbors(path, dataset, parts["train"].shape[0])
            elif part == "distances":
                datasets._check_ann_distances(path, dataset, datasets._ann_distance(f))
            # (a contiguous dataset is read a slice at a time too, not mapped: see _FileRows)
            if math.prod(dataset.shape) == 0:
                rows: Any = ArrayRows(datasets._h5_array(path, dataset, None))
            else:
                rows = _DatasetRows(path, dataset)
        except datasets._H5_DAMAGE as error:
            raise datasets._h5_damage(path, error) from None
        yield rows  # (the consumer's errors, raised here, are not the file's: outside the try)

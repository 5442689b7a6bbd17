"""Index files: versioned, checksummed, written atomically, optionally memory-mapped.

Layout (little-endian):

    offset  size  field
    0       8     magic b"LSPACEIX"
    8       4     format version (uint32)
    12      4     header length H (uint32)
    16      4     CRC-32 of the header bytes (uint32)
    20      4     reserved, zero (checked)
    24      H     header: UTF-8 JSON (index type, metric, dim, ntotal, dtype, data offset,
                  data size, CRC-32 of the data, writer's version)
    ...           zero padding up to a 64-byte boundary (so a mapped array is aligned; checked)
    data_offset   the vectors, (ntotal, dim) float32, row-major

Saving writes a temporary file beside the target, fsyncs it, renames it over the target
and fsyncs the folder: a crash at any point leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .._arrays import DIM_BELOW, check_int, empty_vector_buffer
from .._atomic import atomic_write
from .._paths import as_path, stat_regular_file

MAGIC = b"LSPACEIX"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header CRC, reserved (0)
_DATA_ALIGNMENT = 64
_CHUNK_BYTES = 64 << 20
# The header holds a weighted_l2 index's weights, about 20 bytes a dimension: room for some 10
# million. (It was 1 MiB, so save() wrote files of 50,000 weights that load refused.) A corrupted
# length reads no more than this, nor than the file holds, before the header's checksum fails.
_MAX_HEADER_BYTES = 256 << 20
# The header's integer fields, each in [minimum, below). A row's bytes (dim * 4) must fit in
# an int64, as numpy and the native kernels count them; a CRC-32 is 32 bits.
_HEADER_INTS = {"ntotal": (0, None), "dim": (1, DIM_BELOW), "data_offset": (0, None),
                "data_nbytes": (0, None), "data_crc32": (0, 1 << 32)}


class IndexFileError(ValueError):
    """The file is not a latentspace index, or it is truncated, corrupted or too new."""


def _crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes, in chunks (works on memory maps larger than RAM)."""
    flat = array.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, _CHUNK_BYTES):
        crc = zlib.crc32(flat[start : start + _CHUNK_BYTES], crc)
    return crc


def _header_int(path: Path, header: dict[str, Any], name: str) -> int:
    """header[name] when it is an integer in its _HEADER_INTS range (not a bool, not a float:
    int() would truncate 4.5 and raise OverflowError on 1e400, which JSON reads as inf)."""
    minimum, below = _HEADER_INTS[name]
    if name not in header:
        raise IndexFileError(f"{path}: corrupted index header (no {name!r} field)")
    try:
        value = check_int(header[name], name, minimum=minimum)
    except (TypeError, ValueError) as error:
        raise IndexFileError(f"{path}: corrupted index header ({error})") from None
    if below is not None and value >= below:
        raise IndexFileError(f"{path}: corrupted index header ({name}: expected less than {below}, got {value})")
    return value


def _parse_header(path: Path, encoded: bytes) -> tuple[dict[str, Any], list[int]]:
    """The JSON header and its integer fields (in _HEADER_INTS order), each checked by type and
    range: the CRC only proves the bytes are as written, not that a trusted writer wrote them."""
    try:
        header = json.loads(encoded)
    except (ValueError, RecursionError) as error:  # RecursionError: crafted deep nesting
        raise IndexFileError(f"{path}: corrupted index header (unreadable JSON: {error})") from None
    if not isinstance(header, dict):
        raise IndexFileError(f"{path}: corrupted index header (not a JSON object)")
    if not isinstance(header.get("writer", ""), str):
        raise IndexFileError(f"{path}: corrupted index header (writer: expected a version string, "
                             f"got {header['writer']!r})")
    return header, [_header_int(path, header, name) for name in _HEADER_INTS]


def _data_offset(header: dict[str, Any]) -> int:
    """Where the data starts: past the prefix, the header as it will be written and 32 spare
    bytes (the header's own offset field grows from 0 to its value), on a 64-byte boundary.
    Sized for the widest CRC, so that a streamed file, whose CRC is known only at its end,
    lays out the same as one written at once."""
    encoded = json.dumps(dict(header, data_offset=0, data_crc32=0xFFFFFFFF), sort_keys=True).encode()
    offset = _PREFIX.size + len(encoded) + 32
    return offset + -offset % _DATA_ALIGNMENT


def _prefix_and_header(path: Any, header: dict[str, Any], offset: int) -> bytes:
    """The file's first `offset` bytes: prefix, header (with data_offset = offset), zero padding."""
    encoded = json.dumps(dict(header, data_offset=offset), sort_keys=True).encode()
    if _PREFIX.size + len(encoded) > offset:
        raise AssertionError("index header outgrew its reserved space")  # cannot happen: 32 spare bytes
    if len(encoded) > _MAX_HEADER_BYTES:  # refused before anything is written: load would refuse it
        raise ValueError(f"{path}: the index header would take {len(encoded):,} bytes, more than the "
                         f"{_MAX_HEADER_BYTES:,} an index file holds (a weighted_l2 index's weights take "
                         "about 20 bytes a dimension)")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(encoded), zlib.crc32(encoded), 0)
    return prefix + encoded + b"\0" * (offset - _PREFIX.size - len(encoded))


def save_index_file(path: str | os.PathLike, header: dict[str, Any], data: np.ndarray) -> None:
    """Writes header + data (C-contiguous float32) to `path` atomically."""
    data = np.ascontiguousarray(data, dtype="<f4")
    header = dict(header, dtype="float32", data_nbytes=int(data.nbytes), data_crc32=_crc32(data))
    start = _prefix_and_header(path, header, _data_offset(header))
    with atomic_write(path) as f:
        f.write(start)
        flat = data.reshape(-1).view(np.uint8)
        for begin in range(0, flat.size, _CHUNK_BYTES):
            f.write(flat[begin : begin + _CHUNK_BYTES])


def save_index_file_streaming(path: str | os.PathLike, header: dict[str, Any], chunks: Iterable[np.ndarray]) -> None:
    """save_index_file for data that arrives in chunks, none of it held after it is written:
    the chunks ((m, dim) float32, C-contiguous, rows in order) must hold header["ntotal"] rows
    of header["dim"] values in all. The data's CRC is known only at the end, so the space of
    the prefix and header is kept (sized for the widest CRC) and they are written last. The
    file is byte for byte the one save_index_file writes for the same rows."""
    ntotal, dim = int(header["ntotal"]), int(header["dim"])
    nbytes = ntotal * dim * 4
    header = dict(header, dtype="float32", data_nbytes=nbytes)
    offset = _data_offset(header)
    crc, rows = 0, 0
    with atomic_write(path) as f:
        f.write(b"\0" * offset)
        for chunk in chunks:
            if chunk.dtype != np.dtype("<f4") or chunk.ndim != 2 or chunk.shape[1] != dim or not chunk.flags.c_contiguous:
                raise ValueError(f"chunks: expected C-contiguous float32 (m, {dim}) arrays, got {chunk.dtype} "
                                 f"{chunk.shape}")
            rows += chunk.shape[0]
            if rows > ntotal:
                raise ValueError(f"chunks: more than the {ntotal:,} rows the header declares")
            flat = chunk.reshape(-1).view(np.uint8)
            for begin in range(0, flat.size, _CHUNK_BYTES):
                crc = zlib.crc32(flat[begin : begin + _CHUNK_BYTES], crc)
                f.write(flat[begin : begin + _CHUNK_BYTES])
        if rows != ntotal:
            raise ValueError(f"chunks: {rows:,} rows, not the {ntotal:,} the header declares")
        start = _prefix_and_header(path, dict(header, data_crc32=crc), offset)
        f.seek(0)
        f.write(start)


class MappedFile:
    """The file under a memory-mapped index, watched through a descriptor of its own: reading
    a page past the end of a file truncated since it was mapped kills the process (SIGBUS),
    and bytes rewritten in place are searched under the old header, so check() is called
    before each read of the map. Not the path: save() renames a new file over it, which
    leaves the mapped one whole (and this check passing). A truncation during a read is
    still fatal; this check makes the next call raise instead."""

    def __init__(self, f: Any, path: Path):
        self._path = path
        self._fd = os.dup(f.fileno())
        weakref.finalize(self, os.close, self._fd)
        self._loaded = self._state()

    def _state(self) -> tuple[int, int]:
        status = os.fstat(self._fd)
        return status.st_size, status.st_mtime_ns

    def check(self) -> None:
        """Raises IndexFileError when the file's size or modification time has changed."""
        now = self._state()
        if now != self._loaded:
            raise IndexFileError(
                f"{self._path}: the memory-mapped index file was truncated or rewritten in place since it was "
                f"loaded ({now[0]:,} bytes, {self._loaded[0]:,} then); load it again (index.save() replaces a "
                "file safely: it renames a new one over it)")


def load_index_file(path: str | os.PathLike, *, mmap: bool = False, verify: bool = True):
    """Reads an index file; returns (header dict, data (ntotal, dim) float32).

    mmap=True maps the vectors read-only instead of reading them into memory. verify=True
    (the default) checks the data's CRC-32 too (a full read); the header is always checked.
    Raises IndexFileError for a foreign, truncated, corrupted or too-new file.
    """
    header, data, _ = open_index_file(path, mmap=mmap, verify=verify)
    return header, data


def open_index_file(path: str | os.PathLike, *, mmap: bool = False, verify: bool = True):
    """load_index_file's (header, data), and the MappedFile to check before reading a
    mapped `data` (None when the data was read into memory or is empty)."""
    path = as_path(path)
    stat_regular_file(path, "an index file", IndexFileError)  # before open: a FIFO would block it
    with open(path, "rb") as f:
        # Everything below reads this one open file, never the path again: save() renames a
        # new file over the path, and a load racing it mixed one file's header with the
        # other's size or data (a valid file refused as truncated or corrupted, or mapped
        # with the wrong shape).
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX.size)
        looks_like_ours = prefix.startswith(MAGIC) or (prefix and MAGIC.startswith(prefix))
        if not looks_like_ours:
            raise IndexFileError(f"{path}: not a latentspace index file (bad magic bytes)")
        if len(prefix) < _PREFIX.size:
            raise IndexFileError(f"{path}: truncated index file ({size} bytes)")
        _, version, header_len, header_crc, reserved = _PREFIX.unpack(prefix)
        if version > FORMAT_VERSION:
            raise IndexFileError(
                f"{path}: index format v{version} was written by a newer latentspace "
                f"(this one reads up to v{FORMAT_VERSION}); upgrade latentspace"
            )
        if version < 1 or header_len > _MAX_HEADER_BYTES or reserved != 0:
            raise IndexFileError(f"{path}: corrupted index header (version {version}, length {header_len})")
        encoded = f.read(header_len)
        if len(encoded) < header_len:
            raise IndexFileError(f"{path}: truncated index file ({size} bytes)")
        if zlib.crc32(encoded) != header_crc:
            raise IndexFileError(f"{path}: corrupted index header (checksum mismatch)")
        header, (ntotal, dim, offset, nbytes, data_crc) = _parse_header(path, encoded)
        if header.get("dtype") != "float32" or nbytes != ntotal * dim * 4:
            raise IndexFileError(f"{path}: corrupted index header (inconsistent shape or dtype)")
        if size < offset + nbytes:
            raise IndexFileError(
                f"{path}: truncated index file ({size} bytes, expected {offset + nbytes})"
            )
        # Everything between the header and the data is zero padding: no byte goes unchecked.
        padding = f.read(offset - _PREFIX.size - header_len) if offset >= _PREFIX.size + header_len else b"x"
        if padding.strip(b"\0"):
            raise IndexFileError(f"{path}: corrupted index file (bad padding before the data)")
        if size > offset + nbytes:
            raise IndexFileError(f"{path}: corrupted index file ({size - offset - nbytes} unexpected trailing bytes)")
        mapped = None
        if ntotal == 0:
            data = np.empty((0, dim), dtype=np.float32)
        elif mmap:
            mapped = MappedFile(f, path)  # the size and time the map is checked against
            data = np.memmap(f, dtype="<f4", mode="r", offset=offset, shape=(ntotal, dim))  # outlives f
        else:
            f.seek(offset)
            data = empty_vector_buffer(ntotal, dim)  # as FlatIndex grows its own buffer
            got = f.readinto(memoryview(data.reshape(-1).view(np.uint8)))
            if got != nbytes:
                raise IndexFileError(f"{path}: truncated index file while reading data")
    if verify and _crc32(data) != data_crc:
        raise IndexFileError(f"{path}: corrupted index data (checksum mismatch)")
    return header, data, mapped

"""A bzip2 or LZMA member of a zip archive read with bounded memory (load_npz and
_streamed_inputs.py read every member through open_member).

zipfile decompresses each piece of such a member's input whole, with no bound on the output:
a piece of a member of zeros is the whole member, held with copies (126 MiB for 49 MiB of rows
in bzip2). BoundedMember reads the same bytes with each read's output bounded by the read, its
CRC-32 checked at the end as zipfile checks it. (Deflate, np.savez_compressed's method, is read
through zipfile itself, whose deflate reads are bounded.)
"""

from __future__ import annotations

import bz2
import lzma
import zipfile
import zlib
from typing import Any

__all__ = ["PIECE_BYTES", "UNBOUNDED_METHODS", "BoundedMember", "open_member"]

# What a compressed member's data is read in (a block is filled from these): zipfile's read(n)
# holds n bytes of compressed input, its undecompressed tail and the output, and joins the
# output's pieces into one bytes object (copying it once per piece).
PIECE_BYTES = 256 << 10

# The compression methods whose zipfile decompressor has no bound on its output: each piece of
# input is decompressed whole (a piece of a member of zeros is the whole member, held with copies).
UNBOUNDED_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def open_member(f: Any, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    """The member `info` of the archive open on the file `f`, open for reading: a BoundedMember
    for bzip2 and LZMA (zipfile's own held the whole of a bomb's first piece: 1 GiB to read
    the 12 bytes that start a .npy), zipfile's for the others."""
    return BoundedMember(f, archive, info) if info.compress_type in UNBOUNDED_METHODS else archive.open(info)


class BoundedMember:
    """A bzip2 or LZMA member's data as archive.open reads it (the same bytes, its CRC-32
    checked at the end), but decompressed with the output of each read bounded by the read:
    its compressed data is read from the archive's open file `f` a piece at a time."""

    def __init__(self, f: Any, archive: zipfile.ZipFile, info: zipfile.ZipInfo):
        archive.open(info).close()  # zipfile's checks of the member: local header, name, encryption
        self._f, self._info = f, info
        self._method = UNBOUNDED_METHODS[info.compress_type]
        self._position = _data_offset(f, info)
        self._compressed_left = info.compress_size
        self._left = info.file_size  # output still to come (zipfile stops there too)
        self._crc = zlib.crc32(b"")
        # (LZMA's decompressor is made from the properties at the start of its data)
        self._decompressor: Any = bz2.BZ2Decompressor() if info.compress_type == zipfile.ZIP_BZIP2 else None

    def read(self, n: int) -> bytes:
        """Up to n bytes of the data, fewer only at its end; the CRC-32 is checked once the
        member's size is reached, or its stream ends (as zipfile checks it)."""
        n = min(n, self._left)
        pieces, got = [], 0
        while got < n and not self._ended():
            pieces.append(self._decompress(n - got))
            got += len(pieces[-1])
        data = b"".join(pieces)
        self._left -= len(data)
        self._crc = zlib.crc32(data, self._crc)
        if (not self._left or self._ended()) and self._crc != self._info.CRC:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {self._info.filename!r}")
        return data

    def close(self) -> None:
        """Nothing to close: `f` is the archive's (see _npz_rows)."""

    def __enter__(self) -> BoundedMember:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _ended(self) -> bool:
        return self._decompressor is not None and self._decompressor.eof

    def _decompress(self, limit: int) -> bytes:
        if self._decompressor is None:
            self._decompressor, data = _lzma_decompressor(self._input())
        elif self._decompressor.needs_input:
            data = self._input()
        else:  # output left from the input given before
            data = b""
        try:
            return self._decompressor.decompress(data, limit)
        except (OSError, lzma.LZMAError) as error:  # (bz2's damage is an OSError, "Invalid data stream")
            raise ValueError(f"{self._method} data: {error}") from None

    def _input(self) -> bytes:
        """The next piece of the compressed data."""
        if self._compressed_left <= 0:
            raise EOFError(f"its compressed data ends before its {self._method} stream does")
        self._f.seek(self._position)
        data = self._f.read(min(PIECE_BYTES, self._compressed_left))
        if not data:
            raise EOFError("the file ends inside the member's data: cut short while it was read?")
        self._position += len(data)
        self._compressed_left -= len(data)
        return data


def _data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Where the member's compressed data starts in the archive's file: past its local header,
    whose name and extra field can differ in length from the directory's."""
    f.seek(info.header_offset)
    local = f.read(30)
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def _lzma_decompressor(data: bytes) -> tuple[Any, bytes]:
    """(a raw LZMA1 decompressor, the rest of `data`) from the start of a zip LZMA member's data:
    2 bytes of version, 2 of the properties' size, then the properties (5 bytes: lc, lp and pb
    in one, the dictionary size), as zipfile reads it."""
    if len(data) < 4 or len(data) < 4 + int.from_bytes(data[2:4], "little"):
        raise EOFError("its data ends inside its LZMA header")
    size = int.from_bytes(data[2:4], "little")
    properties = data[4 : 4 + size]
    if size != 5 or properties[0] >= 9 * 5 * 5:
        raise ValueError(f"LZMA data: unsupported properties {properties.hex()}")
    lc, rest = properties[0] % 9, properties[0] // 9
    lzma1 = {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": rest % 5, "pb": rest // 5,
             "dict_size": int.from_bytes(properties[1:5], "little")}
    try:
        return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1]), data[4 + size :]
    except lzma.LZMAError as error:
        raise ValueError(f"LZMA data: {error}") from None

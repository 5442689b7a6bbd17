"""Index files: save / load round trips, memory maps, corruption, atomic saves."""

from __future__ import annotations

import json
import re
import os
import struct
import zlib

import numpy as np
import pytest

import latentspace
from latentspace import IndexFileError
from latentspace.indexes import io as index_io
from conftest import METRICS

PREFIX = struct.Struct("<8sIII4x")  # magic, version, header length, header CRC (see io.py)


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _saved(tmp_path, rng, metric="l2", n=100, dim=12, name="index.lsx"):
    index = latentspace.FlatIndex(dim, metric)
    if n:
        index.add(_normal(rng, n, dim))
    path = tmp_path / name
    index.save(path)
    return index, path


def _layout(path):
    """(header length, header dict, data offset, data size) of a saved file."""
    raw = path.read_bytes()
    _, _, header_len, _ = PREFIX.unpack(raw[: PREFIX.size])
    header = json.loads(raw[PREFIX.size : PREFIX.size + header_len])
    return header_len, header, header["data_offset"], header["data_nbytes"]


def _flip(path, offset, mask=0x01):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def _rewrite_header(path, edit):
    """Rewrites the JSON header with `edit(header)` applied and a valid header CRC."""
    raw = path.read_bytes()
    magic, version, header_len, _ = PREFIX.unpack(raw[: PREFIX.size])
    header = json.loads(raw[PREFIX.size : PREFIX.size + header_len])
    edit(header)
    encoded = json.dumps(header, sort_keys=True).encode()
    old_offset = json.loads(raw[PREFIX.size : PREFIX.size + header_len])["data_offset"]
    assert PREFIX.size + len(encoded) <= old_offset, "edited header must fit before the data"
    out = bytearray(raw)
    out[: PREFIX.size] = PREFIX.pack(magic, version, len(encoded), zlib.crc32(encoded))
    out[PREFIX.size : old_offset] = encoded + b"\0" * (old_offset - PREFIX.size - len(encoded))
    path.write_bytes(bytes(out))


def _load_error(path, **kwargs) -> str:
    """Loads `path`, which must fail with IndexFileError; returns the message without the
    path (pytest's tmp_path holds the test's name, which must not satisfy a match)."""
    with pytest.raises(IndexFileError) as info:
        latentspace.load_index(path, **kwargs)
    return str(info.value).replace(str(path), "<path>")


def _assert_same_index(loaded, original, queries):
    assert loaded.dim == original.dim
    assert loaded.metric == original.metric
    assert loaded.ntotal == original.ntotal == len(loaded)
    np.testing.assert_array_equal(loaded.vectors(), original.vectors())
    for k in (1, 5, original.ntotal + 2):
        D0, I0 = original.search(queries, k)
        D, I = loaded.search(queries, k)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n", [0, 1, 100])
@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip(tmp_path, rng, metric, n, mmap):
    index, path = _saved(tmp_path, rng, metric, n=n, dim=12)
    loaded = latentspace.load_index(path, mmap=mmap)
    assert isinstance(loaded, latentspace.FlatIndex)
    _assert_same_index(loaded, index, _normal(rng, 7, 12))
    assert loaded.is_mmap == (mmap and n > 0)


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_of_weights_longer_than_a_mebibyte_of_header(tmp_path, rng, mmap):
    # A weighted_l2 index keeps its weights in the JSON header, about 20 bytes a dimension:
    # from about 50,000 dimensions save() wrote a file that load_index() refused as
    # "corrupted index header" (the reader's 1 MiB header limit).
    dim = 60000
    index = latentspace.FlatIndex(dim, "weighted_l2", weights=rng.random(dim, dtype=np.float32))
    index.add(_normal(rng, 3, dim))
    path = tmp_path / "wide.lsidx"
    index.save(path)
    assert _layout(path)[0] > 1 << 20
    loaded = latentspace.load_index(path, mmap=mmap)
    np.testing.assert_array_equal(loaded.weights, index.weights)
    _assert_same_index(loaded, index, _normal(rng, 2, dim))


def test_header_beyond_the_readers_limit_is_refused_at_save(tmp_path, rng, monkeypatch):
    # (the limit lowered, so that a small index exceeds it) save() must not write a file that
    # load_index() refuses; the old file stays
    index = latentspace.FlatIndex(100, "weighted_l2", weights=rng.random(100, dtype=np.float32))
    index.add(_normal(rng, 2, 100))
    path = tmp_path / "wide.lsidx"
    path.write_bytes(b"old")
    monkeypatch.setattr(index_io, "_MAX_HEADER_BYTES", 1000)
    with pytest.raises(ValueError, match="index header would take .* bytes, more than the 1,000"):
        index.save(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["wide.lsidx"]


def test_round_trip_accepts_str_path_and_overwrites(tmp_path, rng):
    a, path = _saved(tmp_path, rng, "ip", n=10, dim=3)
    b = latentspace.FlatIndex(5, "cosine")
    b.add(_normal(rng, 30, 5))
    b.save(str(path))  # overwrite, str path
    loaded = latentspace.load_index(str(path))
    _assert_same_index(loaded, b, _normal(rng, 2, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.lsx"]


def test_loaded_index_can_grow(tmp_path, rng):
    index, path = _saved(tmp_path, rng, "l2", n=20, dim=4)
    loaded = latentspace.load_index(path)
    assert not loaded.is_mmap
    assert loaded.nbytes == 20 * 4 * 4
    extra = _normal(rng, 9, 4)
    loaded.add(extra)
    index.add(extra)
    _assert_same_index(loaded, index, _normal(rng, 3, 4))
    # the file is untouched by the in-memory add
    assert latentspace.load_index(path).ntotal == 20


def test_saved_file_layout(tmp_path, rng):
    index, path = _saved(tmp_path, rng, "cosine", n=33, dim=5)
    raw = path.read_bytes()
    magic, version, header_len, header_crc = PREFIX.unpack(raw[: PREFIX.size])
    assert magic == b"LSPACEIX" and version == 1
    assert raw[20:24] == b"\0\0\0\0"
    header = json.loads(raw[PREFIX.size : PREFIX.size + header_len])
    assert zlib.crc32(raw[PREFIX.size : PREFIX.size + header_len]) == header_crc
    assert header["type"] == "FlatIndex" and header["metric"] == "cosine"
    assert header["dim"] == 5 and header["ntotal"] == 33
    assert header["data_offset"] % 64 == 0
    assert len(raw) == header["data_offset"] + 33 * 5 * 4
    data = np.frombuffer(raw[header["data_offset"] :], dtype="<f4").reshape(33, 5)
    np.testing.assert_array_equal(data, index.vectors())


# ---------------------------------------------------------------------------------------
# Memory-mapped loading


@pytest.mark.parametrize("metric", METRICS)
def test_mmap_load(tmp_path, rng, metric):
    index, path = _saved(tmp_path, rng, metric, n=300, dim=16)
    loaded = latentspace.load_index(path, mmap=True)
    assert loaded.is_mmap
    assert "mmap" in repr(loaded)
    _assert_same_index(loaded, index, _normal(rng, 9, 16))
    vectors = loaded.vectors()
    assert not vectors.flags.writeable
    # genuinely a memory map of the file
    chain, base = [], vectors
    while isinstance(base, np.ndarray):
        chain.append(base)
        base = base.base
    assert any(isinstance(a, np.memmap) for a in chain) or isinstance(base, __import__("mmap").mmap)
    with pytest.raises(ValueError):
        vectors[0, 0] = 1.0
    with pytest.raises(ValueError, match="add"):
        loaded.add(_normal(rng, 2, 16))
    assert loaded.ntotal == 300
    np.testing.assert_array_equal(loaded.reconstruct([0, 299]), index.vectors()[[0, 299]])


def test_mmap_reads_the_file(tmp_path, rng):
    # after loading with mmap, the vectors are read from the file on demand: a change in
    # the file (same size) is visible through the mapping, unlike a regular load
    _, path = _saved(tmp_path, rng, "l2", n=40, dim=8)
    _, _, offset, _ = _layout(path)
    mapped = latentspace.load_index(path, mmap=True)
    copied = latentspace.load_index(path, mmap=False)
    before = copied.vectors()[0, 0]
    loaded = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.float32(123.5).tobytes())
    # (the mapped index refuses a file whose size or time changed since it was loaded: the
    # time is put back, as a writer could, to see the pages read through the map)
    os.utime(path, ns=(loaded.st_atime_ns, loaded.st_mtime_ns))
    assert mapped.vectors()[0, 0] == np.float32(123.5)
    assert copied.vectors()[0, 0] == before


def test_mmap_reset_then_add(tmp_path, rng):
    _, path = _saved(tmp_path, rng, "ip", n=10, dim=3)
    loaded = latentspace.load_index(path, mmap=True)
    loaded.reset()
    assert not loaded.is_mmap and loaded.ntotal == 0
    new = _normal(rng, 4, 3)
    loaded.add(new)
    np.testing.assert_array_equal(loaded.vectors(), new)
    assert latentspace.load_index(path).ntotal == 10


def test_mmap_index_can_be_saved(tmp_path, rng):
    index, path = _saved(tmp_path, rng, "cosine", n=50, dim=6)
    loaded = latentspace.load_index(path, mmap=True)
    copy_path = tmp_path / "copy.lsx"
    loaded.save(copy_path)
    _assert_same_index(latentspace.load_index(copy_path), index, _normal(rng, 3, 6))


def test_save_over_own_mmap_source(tmp_path, rng):
    index, path = _saved(tmp_path, rng, "l2", n=40, dim=6)
    mapped = latentspace.load_index(path, mmap=True)
    mapped.save(path)  # reads from the mapping while replacing the file
    _assert_same_index(latentspace.load_index(path), index, _normal(rng, 3, 6))
    _assert_same_index(mapped, index, _normal(rng, 3, 6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.lsx"]


# A file truncated under a mapped index: reading the pages past its end kills the process with
# SIGBUS, so the calls run in a child process (a regression fails the test, not the session).
_TRUNCATED_UNDER_A_MAP = """
import os, pickle, sys
import numpy as np
import latentspace
from latentspace import IndexFileError

path = sys.argv[1]
index = latentspace.FlatIndex(6)
index.add(np.arange(6000, dtype=np.float32).reshape(1000, 6))
index.save(path)
mapped = latentspace.load_index(path, mmap=True)
mapped.search(np.zeros((1, 6), np.float32), 3)  # fine while the file is whole
os.truncate(path, os.path.getsize(path) // 2)
calls = {"search": lambda: mapped.search(np.zeros((1, 6), np.float32), 3),
         "vectors": mapped.vectors, "reconstruct": lambda: mapped.reconstruct([999]),
         "save": lambda: mapped.save(path + ".copy"), "pickle": lambda: pickle.dumps(mapped),
         "to": lambda: mapped.to("cpu")}
for name, call in calls.items():
    try:
        call()
        print(name, "no error")
    except IndexFileError as error:
        print(name, str(error).replace(path, "<path>"))
mapped.reset()  # drops the map: usable again
mapped.add(np.ones((2, 6), np.float32))
print("after reset", mapped.search(np.ones((1, 6), np.float32), 1)[1].tolist())
"""


def test_a_file_truncated_under_its_map_raises_instead_of_killing_the_process(tmp_path):
    """The next search of an index mapped from a file truncated since (another process
    rewriting it in place) read past the file's end: SIGBUS, the process killed (exit -7)."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", _TRUNCATED_UNDER_A_MAP, str(tmp_path / "i.lsidx")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    lines = child.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["search", "vectors", "reconstruct", "save", "pickle", "to"]
    for line in lines[:-1]:
        assert "<path>: the memory-mapped index file was truncated or rewritten in place since it was " \
               "loaded" in line, line
    assert lines[-1] == "after reset [[0]]"
    assert not (tmp_path / "i.lsidx.copy").exists()


def test_a_file_rewritten_in_place_under_its_map_is_refused(tmp_path, rng):
    """Same size, other bytes (`cp other.lsidx index.lsidx` over a mapped file): the mapped
    index silently searched the new file's vectors under the old header."""
    index, path = _saved(tmp_path, rng, "l2", n=50, dim=4)
    other, other_path = _saved(tmp_path, rng, "l2", n=50, dim=4, name="other.lsx")
    mapped = latentspace.load_index(path, mmap=True)
    with open(path, "r+b") as f:  # in place: the mapped inode itself changes
        f.write(other_path.read_bytes())
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a clock tick later, whatever the fs's
    with pytest.raises(IndexFileError, match="truncated or rewritten in place since it was loaded"):
        mapped.search(_normal(rng, 1, 4), 2)


def test_replacing_a_mapped_file_by_rename_keeps_the_map_searchable(tmp_path, rng):
    index, path = _saved(tmp_path, rng, "ip", n=30, dim=4)
    mapped = latentspace.load_index(path, mmap=True)
    latentspace.FlatIndex(4, "ip").save(path)  # save() renames a new file over the path
    other = tmp_path / "moved.lsx"
    os.replace(path, other)
    _assert_same_index(mapped, index, _normal(rng, 3, 4))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("metric", ["l2", "weighted_l2"])
@pytest.mark.parametrize("n", [0, 1, 1000])
def test_a_streamed_index_file_is_the_saved_one_byte_for_byte(tmp_path, rng, metric, n):
    # latentspace index build streams rows into the file (the CRC is known only at the end):
    # the same bytes as FlatIndex.save, whatever the CRC's width, so either loads the same way.
    vectors = rng.standard_normal((n, 7)).astype(np.float32)
    weights = rng.random(7).astype(np.float32) if metric == "weighted_l2" else None
    index = latentspace.FlatIndex(7, metric, weights=weights)
    index.add(vectors)
    index.save(tmp_path / "saved.lsidx")
    chunks = (vectors[start : start + 300] for start in range(0, n, 300))
    latentspace.indexes.flat.save_rows_as_index(tmp_path / "streamed.lsidx", n, chunks, 7, metric, weights=weights)
    assert (tmp_path / "streamed.lsidx").read_bytes() == (tmp_path / "saved.lsidx").read_bytes()


@pytest.mark.parametrize("crc", [0, 1, 0xFFFFFFFF])
def test_a_streamed_file_lays_out_for_any_crc(tmp_path, rng, monkeypatch, crc):
    # The space of the header is kept for the widest CRC before the data's is known: with a
    # CRC of one digit or of ten the data starts at the same offset and the file loads.
    real_crc32 = zlib.crc32
    monkeypatch.setattr(index_io.zlib, "crc32", lambda data, value=0: crc if len(data) != 0 and
                        not isinstance(data, bytes) else real_crc32(data, value))
    vectors = rng.standard_normal((50, 3)).astype(np.float32)
    header = {"type": "FlatIndex", "metric": "l2", "dim": 3, "ntotal": 50, "writer": "test"}
    index_io.save_index_file_streaming(tmp_path / "x.lsidx", header, [vectors])
    monkeypatch.setattr(index_io.zlib, "crc32", real_crc32)
    loaded_header, data = index_io.load_index_file(tmp_path / "x.lsidx", verify=False)
    assert loaded_header["data_crc32"] == crc and loaded_header["data_offset"] % 64 == 0
    np.testing.assert_array_equal(data, vectors)


@pytest.mark.parametrize("rows, match", [(49, "chunks: 49 rows, not the 50"), (51, "more than the 50 rows")])
def test_a_streamed_file_with_the_wrong_row_count_is_refused_and_not_written(tmp_path, rng, rows, match):
    target = tmp_path / "x.lsidx"
    target.write_bytes(b"the old file")
    header = {"type": "FlatIndex", "metric": "l2", "dim": 3, "ntotal": 50, "writer": "test"}
    with pytest.raises(ValueError, match=match):
        index_io.save_index_file_streaming(target, header, [rng.standard_normal((rows, 3)).astype(np.float32)])
    assert target.read_bytes() == b"the old file" and sorted(p.name for p in tmp_path.iterdir()) == ["x.lsidx"]
    with pytest.raises(ValueError, match=r"chunks: expected C-contiguous float32 \(m, 3\)"):
        index_io.save_index_file_streaming(target, header, [np.zeros((50, 3))])


def test_saved_file_permissions_follow_umask(tmp_path, rng):
    # An atomic save must not change what a plain open(path, "wb") would produce: the new
    # file gets the usual 0o666 & ~umask mode (mkstemp's private 0o600 must not leak).
    index, path = _saved(tmp_path, rng, "l2", n=3, dim=2, name="first.lsx")
    umask = os.umask(0o022)
    os.umask(umask)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------
# Corruption, truncation, foreign files


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupted_data_byte(tmp_path, rng, mmap, where):
    _, path = _saved(tmp_path, rng, "l2", n=100, dim=12)
    _, _, offset, nbytes = _layout(path)
    position = {"first": offset, "middle": offset + nbytes // 2, "last": offset + nbytes - 1}[where]
    _flip(path, position, 0x10)
    assert "corrupted" in _load_error(path, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
def test_verify_false_skips_data_checksum(tmp_path, rng, mmap):
    index, path = _saved(tmp_path, rng, "l2", n=100, dim=12)
    _, _, offset, _ = _layout(path)
    _flip(path, offset + 4 * 7 + 3, 0x80)  # sign bit of vector 0, component 7 (little-endian)
    loaded = latentspace.load_index(path, mmap=mmap, verify=False)
    assert loaded.ntotal == 100
    assert loaded.vectors()[0, 7] == -index.vectors()[0, 7]
    np.testing.assert_array_equal(loaded.vectors()[1:], index.vectors()[1:])


def test_issubclass_of_value_error():
    assert issubclass(IndexFileError, ValueError)
    assert latentspace.IndexFileError is index_io.IndexFileError


@pytest.mark.parametrize("mmap", [False, True])
def test_flipped_header_bytes(tmp_path, rng, mmap):
    # every byte of the fixed prefix's checked fields and of the JSON header
    _, path = _saved(tmp_path, rng, "ip", n=20, dim=4)
    header_len, _, _, _ = _layout(path)
    original = path.read_bytes()
    positions = list(range(0, 20)) + list(range(24, 24 + header_len, max(1, header_len // 40)))
    for position in positions:
        for mask in (0x01, 0x80):
            path.write_bytes(original)
            _flip(path, position, mask)
            with pytest.raises(IndexFileError):
                latentspace.load_index(path, mmap=mmap)
            # the header is always checked, even without the data checksum
            with pytest.raises(IndexFileError):
                latentspace.load_index(path, mmap=mmap, verify=False)


def test_flipped_reserved_prefix_byte(tmp_path, rng):
    # bytes 20..23 are documented as "reserved, zero": a file where they are not is corrupted
    _, path = _saved(tmp_path, rng, "l2", n=20, dim=4)
    original = path.read_bytes()
    for position in range(20, 24):
        path.write_bytes(original)
        _flip(path, position, 0x01)
        with pytest.raises(IndexFileError):
            latentspace.load_index(path)


def test_flipped_padding_byte(tmp_path, rng):
    # the zero padding between the JSON header and the 64-byte aligned data
    _, path = _saved(tmp_path, rng, "l2", n=20, dim=4)
    header_len, _, offset, _ = _layout(path)
    original = path.read_bytes()
    assert offset > 24 + header_len
    for position in range(24 + header_len, offset):
        path.write_bytes(original)
        _flip(path, position, 0x04)
        assert "corrupted" in _load_error(path)
        assert "corrupted" in _load_error(path, mmap=True, verify=False)


def test_header_corruption_messages(tmp_path, rng):
    _, path = _saved(tmp_path, rng, "l2", n=20, dim=4)
    original = path.read_bytes()
    _flip(path, 30)  # inside the JSON header
    assert "corrupted" in _load_error(path)
    path.write_bytes(original)
    _flip(path, 0)  # magic
    assert "not a latentspace index" in _load_error(path)


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_files(tmp_path, rng, mmap):
    _, path = _saved(tmp_path, rng, "cosine", n=64, dim=10)
    header_len, _, offset, nbytes = _layout(path)
    original = path.read_bytes()
    cuts = [0, 1, 5, 8, 12, 23, 24, 24 + header_len // 2, 24 + header_len, offset,
            offset + 1, offset + nbytes // 2, offset + nbytes - 4, offset + nbytes - 1]
    for cut in cuts:
        path.write_bytes(original[:cut])
        message = _load_error(path, mmap=mmap)
        if cut == 0:
            assert "not a latentspace index" in message or "truncated" in message


def test_truncated_files_say_truncated(tmp_path, rng):
    # a file that begins like an index but stops early is reported as truncated (not as a
    # foreign file, not as corrupted)
    _, path = _saved(tmp_path, rng, "l2", n=64, dim=10)
    header_len, _, offset, nbytes = _layout(path)
    original = path.read_bytes()
    for cut in [1, 5, 8, 12, 20, 23, 24, 24 + header_len // 2, offset, offset + nbytes // 2,
                offset + nbytes - 1]:
        path.write_bytes(original[:cut])
        message = _load_error(path)
        assert "truncated" in message, f"cut at {cut} bytes: {message}"


def test_trailing_bytes(tmp_path, rng):
    _, path = _saved(tmp_path, rng, "l2", n=10, dim=4)
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(IndexFileError):
        latentspace.load_index(path)


def test_foreign_files(tmp_path, rng):
    npy = tmp_path / "array.npy"
    np.save(npy, _normal(rng, 10, 4))
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not an index\n" * 10)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(b"\x93" + rng.bytes(4095))
    empty = tmp_path / "empty.lsx"
    empty.write_bytes(b"")
    lookalike = tmp_path / "lookalike.bin"
    lookalike.write_bytes(b"LSPACEIY" + bytes(200))
    for path in (npy, text, noise, empty, lookalike):
        for mmap in (False, True):
            assert "not a latentspace index" in _load_error(path, mmap=mmap)


@pytest.mark.parametrize("version", [2, 7, 2**32 - 1])
def test_newer_format_version(tmp_path, rng, version):
    _, path = _saved(tmp_path, rng, "l2", n=5, dim=3)
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", version)
    path.write_bytes(bytes(raw))
    assert "newer" in _load_error(path)


def test_version_zero_is_corrupted(tmp_path, rng):
    _, path = _saved(tmp_path, rng, "l2", n=5, dim=3)
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError):
        latentspace.load_index(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.update(type="IVFIndex"),
        lambda h: h.update(metric="manhattan"),
        lambda h: h.update(dtype="float64"),
        lambda h: h.update(dim=0),
        lambda h: h.update(dim=5),  # inconsistent with data_nbytes
        lambda h: h.update(ntotal=-1),
        lambda h: h.update(ntotal=6),
        lambda h: h.pop("dim"),
        lambda h: h.pop("data_crc32"),
        lambda h: h.update(ntotal="many"),
        lambda h: h.update(data_crc32=h["data_crc32"] ^ 1),
    ],
    ids=["type", "metric", "dtype", "dim0", "dim-mismatch", "ntotal-neg", "ntotal-mismatch",
         "no-dim", "no-crc", "ntotal-str", "crc"],
)
def test_inconsistent_header_with_valid_checksum(tmp_path, rng, edit):
    _, path = _saved(tmp_path, rng, "l2", n=5, dim=3)
    _rewrite_header(path, edit)
    with pytest.raises(IndexFileError):
        latentspace.load_index(path)


_WRONG_TYPES = {
    "metric": [["l2"], {"l2": 1}, 2, None, True],  # a list was hashed: TypeError
    "ntotal": [1e400, 5.0, 5.5, True, "5", [5], None, float("nan")],  # 1e400 is inf: OverflowError
    "dim": [4.5, 3.0, 1e400, True, "3", [3], None, 2**70],  # 4.5 was truncated to 4
    "data_offset": [64.0, 1e400, "64", True, None, -64],
    "data_nbytes": [60.0, 1e400, "60", False, None],
    "data_crc32": [1.0, 1e400, "0", True, None, -1, 2**32],
    "weights": ["abc", [True, 1, 1], [1, None, 1], [[1, 1, 1]], {"a": 1}, 7, [1e400, 1, 1]],
    "storage": [["fp32"], 16, None, "fp64"],
    "writer": [1, ["0.1"], None],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in _WRONG_TYPES.items() for v in values],
                         ids=lambda x: repr(x)[:16])
@pytest.mark.parametrize("n", [0, 5])
def test_header_field_of_the_wrong_type(tmp_path, rng, field, value, n):
    """A crafted header (valid checksum) whose field has the wrong type or range: IndexFileError
    naming the file and the field, never a TypeError or OverflowError from inside the
    loader, nor a float such as 4.5 read as an int. n=0: no data for the shape to disagree with."""
    index = latentspace.FlatIndex(3, "weighted_l2", weights=[1.0, 2.0, 0.5])
    if n:
        index.add(_normal(rng, n, 3))
    path = tmp_path / "crafted.lsx"
    index.save(path)
    _rewrite_header(path, lambda h: h.update({field: value}))
    for mmap in (False, True):
        message = _load_error(path, mmap=mmap)
        assert message.startswith("<path>: corrupted index"), message
        if field not in ("ntotal", "dim", "data_nbytes", "data_offset"):  # these can also disagree first
            assert f"{field}: " in message, message


def test_header_integers_must_be_json_integers(tmp_path, rng):
    """The messages name the field and what it should be."""
    _, path = _saved(tmp_path, rng, "l2", n=0, dim=4)
    _rewrite_header(path, lambda h: h.update(dim=4.5))
    assert "corrupted index header (dim: expected an integer >= 1, got float 4.5)" in _load_error(path)
    _rewrite_header(path, lambda h: h.update(dim=4, ntotal=1e400))
    assert "corrupted index header (ntotal: expected an integer >= 0, got float inf)" in _load_error(path)
    _rewrite_header(path, lambda h: h.update(ntotal=0, metric=["l2"]))
    assert ("corrupted index header (metric: expected one of 'l2', 'ip', 'cosine', 'weighted_l2', "
            "got ['l2'])") in _load_error(path)
    _rewrite_header(path, lambda h: h.update(metric="l2", data_offset="64"))
    assert "corrupted index header (data_offset: expected an integer >= 0, got str '64')" in _load_error(path)


def test_deeply_nested_header_is_an_index_file_error(tmp_path, rng):
    """json.loads recurses: a crafted header of nested brackets raised RecursionError."""
    _, path = _saved(tmp_path, rng, "l2", n=5, dim=3)
    raw = bytearray(path.read_bytes())
    _, version, _, _ = PREFIX.unpack(raw[: PREFIX.size])
    body = b"[" * 100_000
    out = raw[: PREFIX.size] + body + b"\0" * (-(PREFIX.size + len(body)) % 64)
    out[: PREFIX.size] = PREFIX.pack(b"LSPACEIX", version, len(body), zlib.crc32(body))
    path.write_bytes(bytes(out))
    assert "corrupted index header (unreadable JSON" in _load_error(path)


def test_header_not_json_object(tmp_path, rng):
    _, path = _saved(tmp_path, rng, "l2", n=5, dim=3)
    raw = bytearray(path.read_bytes())
    _, version, header_len, _ = PREFIX.unpack(raw[: PREFIX.size])
    for body in (b"[1, 2, 3]", b"\xff\xfe not utf-8", b"{\"dim\": "):
        encoded = body.ljust(header_len, b" ")
        out = bytearray(raw)
        out[: PREFIX.size] = PREFIX.pack(b"LSPACEIX", version, header_len, zlib.crc32(encoded))
        out[PREFIX.size : PREFIX.size + header_len] = encoded
        path.write_bytes(bytes(out))
        with pytest.raises(IndexFileError):
            latentspace.load_index(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        latentspace.load_index(tmp_path / "missing.lsx")
    with pytest.raises(FileNotFoundError):
        latentspace.load_index(tmp_path / "missing.lsx", mmap=True)


@pytest.mark.parametrize("mmap", [False, True])
def test_load_from_a_folder_or_a_fifo_fails(tmp_path, mmap):
    """Only a regular file can be an index: a folder is named as one, and a FIFO is refused
    up front (opening one with no writer would block forever)."""
    with pytest.raises(IsADirectoryError, match=f"path: {tmp_path} is a folder"):
        latentspace.load_index(tmp_path, mmap=mmap)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(IndexFileError, match="not a regular file"):
        latentspace.load_index(fifo, mmap=mmap)


def test_save_to_directory_fails(tmp_path, rng):
    index = latentspace.FlatIndex(3)
    index.add(_normal(rng, 2, 3))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(OSError):
        index.save(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert list(tmp_path.iterdir()) == [folder]


def test_save_to_relative_path(tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = latentspace.FlatIndex(3, "ip")
    index.add(_normal(rng, 5, 3))
    index.save("relative.lsx")
    _assert_same_index(latentspace.load_index("relative.lsx"), index, _normal(rng, 2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relative.lsx"]


def test_save_into_missing_folder_fails(tmp_path, rng):
    index = latentspace.FlatIndex(3)
    with pytest.raises(OSError):
        index.save(tmp_path / "no" / "such" / "index.lsx")


# ---------------------------------------------------------------------------------------
# Atomic saves


def _failing(*args, **kwargs):
    raise OSError(28, "No space left on device (simulated)")


@pytest.mark.parametrize("target", ["fsync", "replace"])
def test_failed_save_keeps_old_file(tmp_path, rng, monkeypatch, target):
    old, path = _saved(tmp_path, rng, "cosine", n=30, dim=5)
    new = latentspace.FlatIndex(5, "l2")
    new.add(_normal(rng, 80, 5))
    with monkeypatch.context() as m:
        m.setattr(index_io.os, target, _failing)
        with pytest.raises(OSError, match="simulated"):
            new.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.lsx"], "temporary file left behind"
    _assert_same_index(latentspace.load_index(path), old, _normal(rng, 4, 5))
    # and a later, successful save replaces it
    new.save(path)
    _assert_same_index(latentspace.load_index(path), new, _normal(rng, 4, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.lsx"]


def test_failed_first_save_leaves_nothing(tmp_path, rng, monkeypatch):
    index = latentspace.FlatIndex(5)
    index.add(_normal(rng, 8, 5))
    monkeypatch.setattr(index_io.os, "fsync", _failing)
    with pytest.raises(OSError):
        index.save(tmp_path / "index.lsx")
    assert list(tmp_path.iterdir()) == []


def test_save_interrupted_by_keyboard_interrupt_cleans_up(tmp_path, rng, monkeypatch):
    old, path = _saved(tmp_path, rng, "ip", n=6, dim=2)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    new = latentspace.FlatIndex(2, "ip")
    new.add(_normal(rng, 9, 2))
    with monkeypatch.context() as m:
        m.setattr(index_io.os, "replace", interrupt)
        with pytest.raises(KeyboardInterrupt):
            new.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.lsx"]
    _assert_same_index(latentspace.load_index(path), old, _normal(rng, 2, 2))


def test_save_fsyncs_before_rename(tmp_path, rng, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(index_io.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(index_io.os, "replace",
                        lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    index = latentspace.FlatIndex(3)
    index.add(_normal(rng, 4, 3))
    index.save(tmp_path / "x.lsx")
    assert "replace" in calls and "fsync" in calls[: calls.index("replace")]


@pytest.mark.parametrize("argument", ["mmap", "verify"])
@pytest.mark.parametrize("value", ["no", "False", 0, None])
def test_load_index_flags_must_be_booleans(tmp_path, rng, argument, value):
    """mmap="no" read as true: the index came back memory-mapped and read-only, and add()
    then refused it for a reason the caller never asked for. A TypeError naming the flag."""
    path = tmp_path / "a.lsidx"
    index = latentspace.FlatIndex(4)
    index.add(rng.standard_normal((10, 4)).astype(np.float32))
    index.save(path)
    with pytest.raises(TypeError, match=f"^{argument}: expected True or False"):
        latentspace.load_index(path, **{argument: value})
    assert latentspace.load_index(path, **{argument: np.bool_(True)}).ntotal == 10


@pytest.mark.parametrize("metric, bad", [("l2", "nan"), ("l2", "inf"), ("l2", "huge"), ("weighted_l2", "heavy")])
def test_a_file_holding_rows_add_refuses_is_refused_at_load_when_verified(tmp_path, rng, metric, bad):
    """save() never writes a row add() refuses, so such a row under a valid CRC is a crafted or
    corrupted file: with verify=True (the full read) it is refused at load, naming the file and
    the row, instead of loading and failing each search (naming 'database', no argument of
    search). verify=False loads it as before (the search still refuses it)."""
    from latentspace.indexes import io as index_io

    index = latentspace.FlatIndex(4, metric, weights=np.full(4, 1e4, np.float32) if metric == "weighted_l2" else None)
    index.add(_normal(rng, 30, 4))
    header = index._file_header(30)
    data = index.vectors().copy()
    data[17] = {"nan": np.nan, "inf": np.inf, "huge": 1e19, "heavy": 1e18}[bad]
    index_io.save_index_file(tmp_path / "x.lsidx", header, data)
    for mmap in (False, True):
        with pytest.raises(latentspace.IndexFileError, match=rf"^{re.escape(str(tmp_path / 'x.lsidx'))}: "
                                                               r"corrupted index data \(row 17"):
            latentspace.load_index(tmp_path / "x.lsidx", mmap=mmap)
    loaded = latentspace.load_index(tmp_path / "x.lsidx", verify=False)
    with pytest.raises(ValueError, match="row 17"):
        loaded.search(_normal(rng, 2, 4), 3)

"""Odd input files for the commands that read their rows a block at a time (`latentspace
encode`, `index build`, `search`; python/latentspace/_streamed_inputs.py): each gives the
output the same rows in a .npy give, or one error line naming the file, with memory bounded
by a block, not by the file."""

from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np
import pytest

import latentspace
from latentspace._streamed_inputs import open_rows

_ROWS = 200_000  # x 64 float32: 48.8 MiB of rows, for the memory checks


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """cli.main in this process (one thread, no bar): (status, stdout, stderr)."""
    from latentspace.cli import main

    code = main([*args, "--threads", "1", "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _traced_main(capsys, *args: str) -> tuple[int, str, int]:
    """_main and the peak of Python's and numpy's allocations meanwhile (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        code, _, err = _main(capsys, *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return code, err, peak


def _one_line_error(capsys, command: str, *args: str) -> str:
    code, out, err = _main(capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith(f"latentspace {command}: error: ") and err.count("\n") == 1, err
    return err


def _npy_bytes(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """The .npy file of `array`; its header claiming `shape` when given (the data as it is)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    raw = buffer.getvalue()
    if shape is None:
        return raw
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": shape}
    claimed = io.BytesIO()
    np.lib.format.write_array_header_1_0(claimed, header)
    return claimed.getvalue() + raw[raw.index(b"\n") + 1 :]


def _archive(path, raw: bytes, method: int = zipfile.ZIP_DEFLATED, name: str = "x.npy") -> None:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr(name, raw)


def _member_data(path) -> tuple[int, int]:
    """(offset, size) of the only member's compressed data in the archive at `path`."""
    raw = path.read_bytes()
    info = zipfile.ZipFile(path).infolist()[0]
    local = raw[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    return start, info.compress_size


@pytest.fixture
def small(tmp_path):
    """A model of 64 -> 4, an index of 50 rows of 64 dimensions, and 20 rows as a .npy."""
    import torch

    torch.manual_seed(0)
    latentspace.save_model(latentspace.Autoencoder(64, 4, hidden=(16,)).eval(), tmp_path / "model.safetensors")
    x = np.random.default_rng(3).standard_normal((20, 64)).astype(np.float32)
    index = latentspace.FlatIndex(64)
    index.add(x[:50])
    index.save(tmp_path / "i.lsidx")
    np.save(tmp_path / "x.npy", x)
    return tmp_path, x


def _commands(tmp, data: str, out: str = "out") -> dict[str, list[str]]:
    return {"encode": ["encode", str(tmp / "model.safetensors"), str(tmp / data), "--out", str(tmp / f"{out}.npy")],
            "index build": ["index", "build", str(tmp / data), "--out", str(tmp / f"{out}.lsidx")],
            "search": ["search", str(tmp / "i.lsidx"), str(tmp / data), "-k", "3", "--out", str(tmp / f"{out}.npz")]}


def _output(tmp, command: str, out: str):
    if command == "encode":
        return np.load(tmp / f"{out}.npy")
    if command == "index build":
        return (tmp / f"{out}.lsidx").read_bytes()
    with np.load(tmp / f"{out}.npz") as results:
        return results["distances"].tobytes() + results["indices"].tobytes()


def _assert_same_output(tmp, command: str, a: str, b: str) -> None:
    first, second = _output(tmp, command, a), _output(tmp, command, b)
    if isinstance(first, np.ndarray):
        np.testing.assert_array_equal(first, second)
    else:
        assert first == second


# ---------------------------------------------------------------------------------------
# A compressed member whose header's shape is not its data's


@pytest.mark.parametrize("shape, message", [
    ((10**12, 64), "EOF: reading array data, expected 256000000000000 bytes got 5120"),  # search: "-k: ... lower -k"
    ((20, 10**12), "EOF: reading array data, expected 80000000000000 bytes got 5120"),  # MemoryError, naming nothing
    # encode: "[Errno 22] Invalid argument"; 2**80 elements are more than numpy can count: refused
    # in its words before the claim is weighed (datasets._check_header_array)
    ((2**40, 2**40), "array is too big"),
    ((-20, 64), "negative dimensions are not allowed"),  # named no file
])
@pytest.mark.parametrize("command", ["encode", "index build", "search"])
def test_a_header_claiming_other_than_the_member_holds_is_one_error_naming_the_file(small, capsys, command, shape,
                                                                                     message):
    """The header's shape is checked against the most the member can give (its directory
    entry's size, at which the stream stops) before a row is read, in load_npz's words; a claim
    of terabytes was allocated (MemoryError, exit 1, naming no file), made encode's output
    (`[Errno 22]`) or search's results ("lower -k") first."""
    tmp, x = small
    _archive(tmp / "c.npz", _npy_bytes(x, shape))
    err = _one_line_error(capsys, command, *_commands(tmp, "c.npz")[command])
    assert f"error: {tmp / 'c.npz'}: array 'x' is not readable ({message}" in err, err
    assert not any(p.name.startswith("out") for p in tmp.iterdir())


@pytest.mark.parametrize("stored, fortran", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", [(10**12, 64), (20, 10**12)])
def test_a_member_read_whole_claiming_terabytes_is_one_error_naming_the_file(small, capsys, stored, fortran, shape):
    """An uncompressed member (read whole below 256 MiB) or a Fortran-ordered compressed one
    (read whole) is checked against its size as a streamed one is: numpy allocated the claimed
    array before reading a byte (MemoryError "Unable to allocate 233. TiB", exit 1, no file)."""
    tmp, x = small
    raw = _npy_bytes(np.asfortranarray(x) if fortran else x, shape)
    if fortran:
        raw = raw.replace(b"'fortran_order': False", b"'fortran_order': True ", 1)
    _archive(tmp / "c.npz", raw, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    err = _one_line_error(capsys, "index build", *_commands(tmp, "c.npz")["index build"])
    assert f"error: {tmp / 'c.npz'}: array 'x' is not readable (EOF: reading array data, expected " in err, err


def test_a_header_claiming_more_rows_is_refused_before_any_block_is_read(tmp_path, rng):
    x = rng.random((10, 3)).astype(np.float32)
    _archive(tmp_path / "c.npz", _npy_bytes(x, (1000, 3)))
    with pytest.raises(ValueError, match="c.npz: array 'x' is not readable \\(EOF: reading array data, "
                                         "expected 12000 bytes got 120\\)"):
        with open_rows(tmp_path / "c.npz"):
            pass


# ---------------------------------------------------------------------------------------
# A file truncated while its member is read


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_file_truncated_while_its_member_is_read_says_so(tmp_path, rng, method):
    """Cut (in place: the same open file) after the first block: the member's data ends early,
    which zipfile raises as an EOFError with no text; the error said "is not readable ()"."""
    x = rng.standard_normal((16000, 64)).astype(np.float32)  # 4 MiB: bzip2 blocks of 900 kB, pieces of 256 KiB
    _archive(tmp_path / "c.npz", _npy_bytes(x), method)
    start, size = _member_data(tmp_path / "c.npz")
    with pytest.raises(ValueError) as caught:
        with open_rows(tmp_path / "c.npz") as rows:
            blocks = rows.blocks(100)
            np.testing.assert_array_equal(next(blocks), x[:100])
            os.truncate(tmp_path / "c.npz", start + size // 2)
            for _ in blocks:
                pass
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'c.npz'}: array 'x' is not readable (") and "()" not in message, message
    assert "ends" in message, message


# ---------------------------------------------------------------------------------------
# Members compressed with bzip2 or LZMA (np.load reads them; np.savez_compressed writes deflate)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_bzip2_and_lzma_members_stream_their_rows(tmp_path, rng, method, rows):
    x = rng.standard_normal((300, 5)).astype(">f8")
    _archive(tmp_path / "c.npz", _npy_bytes(x), method)
    with np.load(tmp_path / "c.npz") as archive:
        np.testing.assert_array_equal(archive["x"], x)  # numpy reads them
    with open_rows(tmp_path / "c.npz") as source:
        assert source.array is None
        blocks = list(source.blocks(rows))
    assert [len(b) for b in blocks] == [min(rows, 300 - s) for s in range(0, 300, rows)]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


@pytest.fixture(scope="module")
def sparse_rows(tmp_path_factory):
    """200,000 x 64 float32 rows, nearly all zeros (bag-of-words counts, one-hot columns): a
    .npy, and members compressed with bzip2 and LZMA, each a few KiB."""
    tmp = tmp_path_factory.mktemp("sparse")
    x = np.zeros((_ROWS, 64), np.float32)
    x[::1000, 3] = 1
    np.save(tmp / "x.npy", x)
    raw = _npy_bytes(x)
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        _archive(tmp / f"x{method}.npz", raw, method)
    return tmp


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_members_stream_with_bounded_memory(sparse_rows, capsys, method):
    """zipfile decompresses each piece of a bzip2 or LZMA member's input whole, with no bound
    on its output: the whole member at once, held with copies of it (peaks of 126 MiB and
    64 MiB for 48.8 MiB of rows)."""
    tmp = sparse_rows
    code, _, err = _main(capsys, "index", "build", str(tmp / "x.npy"), "--out", str(tmp / "a.lsidx"),
                         "--batch-size", "4096")
    assert code == 0, err
    code, err, peak = _traced_main(capsys, "index", "build", str(tmp / f"x{method}.npz"), "--out",
                                   str(tmp / "b.lsidx"), "--batch-size", "4096")
    assert code == 0, err
    rows_bytes = _ROWS * 64 * 4
    assert peak < rows_bytes / 4, f"peak {peak / 2**20:.1f} MiB for {rows_bytes / 2**20:.1f} MiB of rows"
    assert (tmp / "a.lsidx").read_bytes() == (tmp / "b.lsidx").read_bytes()


@pytest.mark.parametrize("fortran", [False, True])
def test_a_damaged_lzma_member_is_one_error_naming_the_file(small, capsys, fortran):
    """liblzma's error for a damaged stream (lzma.LZMAError) escaped as a traceback, whether
    the member was streamed or (Fortran-ordered) read whole."""
    tmp, x = small
    _archive(tmp / "c.npz", _npy_bytes(np.asfortranarray(x) if fortran else x), zipfile.ZIP_LZMA)
    start, size = _member_data(tmp / "c.npz")
    raw = bytearray((tmp / "c.npz").read_bytes())
    raw[start + size // 2] ^= 0x5A  # (LZMAError: Corrupt input data)
    (tmp / "c.npz").write_bytes(bytes(raw))
    err = _one_line_error(capsys, "index build", *_commands(tmp, "c.npz")["index build"])
    assert f"error: {tmp / 'c.npz'}: " in err and "Corrupt input data" in err, err


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_bzip2_or_lzma_member_failing_its_crc_is_refused(tmp_path, rng, method):
    x = rng.standard_normal((1000, 32)).astype(np.float32)
    _archive(tmp_path / "c.npz", _npy_bytes(x), method)
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        at = raw.index(signature) + offset
        raw[at : at + 4] = bytes(4)
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="c.npz: array 'x' is not readable \\(Bad CRC-32 for file 'x.npy'\\)"):
        with open_rows(tmp_path / "c.npz") as rows:
            for _ in rows.blocks(100):
                pass


# ---------------------------------------------------------------------------------------
# HDF5 datasets chunked down their columns


def _ann_file(path, train, **options) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "euclidean"
        f.create_dataset("train", data=train, **options)
        f.create_dataset("test", data=np.asarray(train[:5], np.float32))
        f.create_dataset("neighbors", data=np.zeros((5, 1), np.int64))
        f.create_dataset("distances", data=np.zeros((5, 1), np.float32))


@pytest.mark.parametrize("chunks", [(300, 1), (7, 5), (100, 8), (1, 64), (299, 64)])
@pytest.mark.parametrize("rows", [1, 4, 256, 1000])
def test_chunked_datasets_give_their_rows_in_blocks(tmp_path, rng, monkeypatch, chunks, rows):
    """Whatever the chunks' shape and the read-ahead (small here: chunks of 300 rows reach past
    it), the blocks are the dataset's rows."""
    from latentspace import _streamed_inputs

    monkeypatch.setattr(_streamed_inputs, "_READ_AHEAD_BYTES", 4096)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    _ann_file(tmp_path / "x.hdf5", x, chunks=chunks, compression="gzip")
    with open_rows(tmp_path / "x.hdf5") as source:
        assert source.array is None
        blocks = list(source.blocks(rows))
    assert [len(b) for b in blocks] == [min(rows, 300 - s) for s in range(0, 300, rows)]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


@pytest.mark.parametrize("command", ["encode", "index build"])
def test_a_dataset_chunked_by_column_is_read_with_bounded_memory(tmp_path, capsys, command):
    """Chunks of one column of every row ((n, 1)): each read ran to the next chunk boundary,
    past the last row, so the whole dataset was held (a 48.8 MiB peak for 48.8 MiB of rows)."""
    import torch

    torch.manual_seed(0)
    latentspace.save_model(latentspace.Autoencoder(64, 4, hidden=(16,)).eval(), tmp_path / "model.safetensors")
    x = np.random.default_rng(11).standard_normal((_ROWS, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _ann_file(tmp_path / "x.hdf5", x, chunks=(_ROWS, 1), compression="gzip", compression_opts=1)
    del x
    code, _, err = _main(capsys, *_commands(tmp_path, "x.npy", "a")[command], "--batch-size", "4096")
    assert code == 0, err
    code, err, peak = _traced_main(capsys, *_commands(tmp_path, "x.hdf5", "b")[command], "--batch-size", "4096")
    assert code == 0, err
    rows_bytes = _ROWS * 64 * 4
    assert peak < rows_bytes / 2, f"peak {peak / 2**20:.1f} MiB for {rows_bytes / 2**20:.1f} MiB of rows"
    _assert_same_output(tmp_path, command, "a", "b")


# ---------------------------------------------------------------------------------------
# A file cut short (truncated in place) while its rows are read


_CUT_WHILE_READ = """
import os, sys
import numpy as np
from latentspace import datasets
from latentspace._streamed_inputs import open_rows

datasets.MMAP_THRESHOLD_BYTES = 0  # the loaders map what they can, as they do from 256 MiB
path, size = sys.argv[1], int(sys.argv[2])
try:
    with open_rows(path) as rows:
        blocks = rows.blocks(100)
        next(blocks)
        os.truncate(path, size)
        for block in blocks:
            float(np.asarray(block, np.float64).sum())  # every row used
except ValueError as error:
    print("ValueError:", error)
"""


@pytest.mark.parametrize("name", ["x.npy", "stored.npz", "contiguous.hdf5", "fortran.npy", "fortran_stored.npz"])
def test_a_file_cut_short_while_its_rows_are_read_is_an_error_not_a_crash(tmp_path, rng, name):
    """Mapped (a .npy, an uncompressed .npz member or a contiguous HDF5 dataset of 256 MiB or
    more), a file truncated in place while read killed the process with SIGBUS at the first
    page past its new end: no error, and encode's temporary output left behind."""
    import subprocess
    import sys

    x = rng.standard_normal((20000, 64)).astype(np.float32)
    path = tmp_path / name
    if name == "x.npy":
        np.save(path, x)
    elif name == "fortran.npy":
        np.save(path, np.asfortranarray(x))
    elif name == "stored.npz":
        np.savez(path, x=x)
    elif name == "fortran_stored.npz":
        np.savez(path, x=np.asfortranarray(x))
    else:
        _ann_file(path, x)
    size = path.stat().st_size // 3
    if name == "contiguous.hdf5":  # (cut inside train: the other parts follow it)
        h5py = pytest.importorskip("h5py")
        with h5py.File(path, "r") as f:
            size = f["train"].id.get_offset() + x.nbytes // 3
    done = subprocess.run([sys.executable, "-c", _CUT_WHILE_READ, str(path), str(size)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith(f"ValueError: {path}: "), done.stdout


# ---------------------------------------------------------------------------------------
# Ctrl-C while the rows are read


@pytest.mark.parametrize("data", ["x.npy", "c.npz", "c.hdf5"])
@pytest.mark.parametrize("command", ["encode", "index build", "search"])
def test_ctrl_c_mid_stream_keeps_the_output_saved_before(small, capsys, monkeypatch, data, command):
    """Ctrl-C after the first block: exit 130 and one line; the output the user saved before
    is as it was, and no temporary file is left beside it."""
    from latentspace import _streamed_inputs

    tmp, x = small
    x = np.repeat(x, 10, axis=0)  # 200 rows: blocks of 16 leave some unread
    np.save(tmp / "x.npy", x)
    np.savez_compressed(tmp / "c.npz", x=x)
    _ann_file(tmp / "c.hdf5", x, chunks=(16, 64), compression="gzip")
    for kind in (_streamed_inputs._FileRows, _streamed_inputs._MemberRows, _streamed_inputs._DatasetRows):
        def interrupted(self, rows, _blocks=kind.blocks):
            for number, block in enumerate(_blocks(self, rows)):
                if number == 1:
                    raise KeyboardInterrupt
                yield block
        monkeypatch.setattr(kind, "blocks", interrupted)
    out = _commands(tmp, data)[command][-1]
    with open(out, "wb") as saved:
        saved.write(b"saved before")
    before = sorted(p.name for p in tmp.iterdir())
    code, _, err = _main(capsys, *_commands(tmp, data)[command], "--batch-size", "16")
    assert code == 130 and err == f"latentspace {command}: interrupted\n", (code, err)
    assert open(out, "rb").read() == b"saved before"
    assert sorted(p.name for p in tmp.iterdir()) == before


# ---------------------------------------------------------------------------------------
# Rows the model cannot take, in a file that declares many


@pytest.mark.parametrize("command", ["encode", "search --model"])
def test_rows_the_model_cannot_take_are_refused_before_their_codes_are_made(small, capsys, command):
    """A .npy of 10**12 rows of no values (its header alone: no data to hold): search --model
    allocated the codes of all the queries first (MemoryError "Unable to allocate 14.6 TiB",
    exit 1, naming nothing), encode a 16 TB output file, before the encoder saw a row."""
    tmp, x = small
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 0)})
    (tmp / "wide.npy").write_bytes(header.getvalue())
    codes = latentspace.FlatIndex(4)
    codes.add(np.ones((3, 4), np.float32))
    codes.save(tmp / "codes.lsidx")
    argv = (["encode", str(tmp / "model.safetensors"), str(tmp / "wide.npy"), "--out", str(tmp / "out.npy")]
            if command == "encode" else
            ["search", str(tmp / "codes.lsidx"), str(tmp / "wide.npy"), "--model", str(tmp / "model.safetensors"),
             "--out", str(tmp / "out.npz")])
    err = _one_line_error(capsys, command.split()[0], *argv)
    assert f"error: {tmp / 'wide.npy'}: expected shape (n, 64), got (1000000000000, 0)" in err, err
    assert not any(p.name.startswith(("out", ".out")) for p in tmp.iterdir())


@pytest.mark.parametrize("command", ["encode", "index build", "search"])
def test_a_stored_member_claiming_more_than_the_file_holds_is_refused_before_a_row_is_read(small, capsys, command):
    """A stored member whose directory entry (and header) claim 4 GB in a file of a few KiB:
    the claim was taken at its word (search allocated 1.9 GB of results, encode a 256 MB output)
    and the read then said "the file ends inside the member's data: cut short while it was
    read?", which it was not. A stored member holds at most what the file holds."""
    import struct

    from latentspace import datasets

    tmp, x = small
    claimed = (16_000_000, 64)
    _archive(tmp / "c.npz", _npy_bytes(x, claimed), zipfile.ZIP_STORED)
    raw = bytearray((tmp / "c.npz").read_bytes())
    entry = raw.index(b"PK\x01\x02")
    raw[entry + 20 : entry + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)  # its sizes in the directory
    (tmp / "c.npz").write_bytes(bytes(raw))
    expected = f"{tmp / 'c.npz'}: array 'x' is not readable (EOF: reading array data, expected {16_000_000 * 256} bytes"
    err = _one_line_error(capsys, command, *_commands(tmp, "c.npz")[command])
    assert f"error: {expected}" in err, err
    assert not any(p.name.startswith(("out", ".out")) for p in tmp.iterdir())
    with pytest.raises(ValueError, match=re.escape(expected)):
        datasets.load_npz(tmp / "c.npz", mmap=False)
    with pytest.raises(ValueError, match=re.escape(f"{tmp / 'c.npz'}: array 'x' is not readable (")):
        datasets.load_npz(tmp / "c.npz")  # (mapped for its claimed size: its own checks)



@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize("command", ["encode", "search --model"])
def test_a_bad_row_read_in_blocks_is_named_as_the_arrays_row(tmp_path, rng, capsys, monkeypatch, suffix, command):
    """Rows read a block at a time are encoded as the array is, and a NaN row in a later block
    is named in the very words encode gives the array (it named the chunk: "row 9 (row 1 of
    chunk X[2])", which the CLI rewrote by pattern)."""
    model = latentspace.Autoencoder(8, 3, hidden=(6,))
    latentspace.save_model(model, tmp_path / "m.safetensors")
    x = rng.standard_normal((30, 8)).astype(np.float32)
    x[9, 5] = np.nan
    with pytest.raises(ValueError) as api:
        latentspace.encode(model, x, batch_size=4)
    assert str(api.value).startswith("X: row 9 ")
    data = tmp_path / f"x{suffix}"
    np.save(data, x) if suffix == ".npy" else np.savez_compressed(data, x=x)
    m = str(tmp_path / "m.safetensors")
    if command == "encode":
        args = ["encode", m, str(data), "--out", str(tmp_path / "z.npy"), "--batch-size", "4"]
    else:  # its queries are read in blocks of the encoder's chunk
        monkeypatch.setattr(latentspace.Encoder, "default_batch_size", property(lambda self: 4))
        index = latentspace.FlatIndex(3)
        index.add(np.zeros((5, 3), np.float32))
        index.save(tmp_path / "i.lsidx")
        args = ["search", str(tmp_path / "i.lsidx"), str(data), "--model", m, "--out", str(tmp_path / "r.npz")]
    err = _one_line_error(capsys, command.split()[0], *args)
    assert err == f"latentspace {command.split()[0]}: error: {data}: {str(api.value)[3:]}\n", err


def test_a_block_reader_giving_other_rows_than_its_shape_is_refused():
    """BlockSource checks what its reader hands over against the array's shape."""
    from latentspace._encode_stream import BlockSource

    encoder = latentspace.Encoder(latentspace.Autoencoder(4, 2, hidden=(3,)))
    blocks = [np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32)]
    for given, shape, message in [
        (blocks, (5, 4), r"^X: its reader gave a block of shape \(3, 4\) at row 3 of an array of shape \(5, 4\)"),
        (blocks, (7, 4), r"^X: its reader gave 6 rows of an array of shape \(7, 4\)"),
        ([np.zeros((3, 5), np.float32)], (3, 4), r"^X: its reader gave a block of shape \(3, 5\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            list(BlockSource(iter(given), shape).chunks(2))
    source = BlockSource(iter(blocks), (6, 4))
    assert [(start, len(piece)) for start, piece, _ in source.chunks(2)] == [(0, 2), (2, 1), (3, 2), (5, 1)]
    out = np.empty((6, 2), np.float32)
    from latentspace._encode_stream import UserOut

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    codes = encoder._encode_to(BlockSource(iter([x[:4], x[4:]]), (6, 4)), UserOut(out, 6, 2), 3, False)
    assert codes is out
    np.testing.assert_array_equal(out, encoder.encode(x, batch_size=3))


@pytest.mark.parametrize("command", ["encode", "index build", "search"])
def test_a_deflated_member_claiming_more_than_deflate_can_give_is_refused_before_a_row_is_read(small, capsys,
                                                                                                command):
    """A deflated member whose directory entry (and header) claim 4 GB from a few KiB of
    compressed data was believed until the read failed (search allocating results for every
    claimed query first): deflate expands at most 1032-fold, so the claim cannot be true."""
    import struct

    from latentspace import datasets

    tmp, x = small
    claimed = (16_000_000, 64)
    _archive(tmp / "c.npz", _npy_bytes(x, claimed), zipfile.ZIP_DEFLATED)
    raw = bytearray((tmp / "c.npz").read_bytes())
    entry = raw.index(b"PK\x01\x02")
    raw[entry + 24 : entry + 28] = struct.pack("<I", 0xFFFFFFF0)  # its uncompressed size in the directory
    (tmp / "c.npz").write_bytes(bytes(raw))
    most = 1032 * zipfile.ZipFile(tmp / "c.npz").infolist()[0].compress_size
    expected = f"{tmp / 'c.npz'}: array 'x' is not readable (EOF: reading array data, expected {16_000_000 * 256} bytes"
    err = _one_line_error(capsys, command, *_commands(tmp, "c.npz")[command])
    assert f"error: {expected}" in err and int(re.search(r"got (\d+)", err).group(1)) <= most, err
    assert not any(p.name.startswith(("out", ".out")) for p in tmp.iterdir())
    with pytest.raises(ValueError, match=re.escape(expected)):
        datasets.load_npz(tmp / "c.npz")

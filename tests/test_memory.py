"""Peak memory on inputs larger than a chunk: the docs promise bounded memory (a memory map is
read chunk by chunk), so the memory a call takes must not grow with a chunk's row count times
a large sample. Each case runs in a fresh subprocess whose anonymous memory (RssAnon: not the
memory map's file pages, which the kernel can drop) the parent samples; the figure is its
peak above the level after the imports and the data's set-up. The bounds leave a wide margin
over the fixed figure and sit far below the one before the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")

MiB = 1 << 20


def _rss_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _state(pid: int) -> str | None:
    """The process's state letter from /proc/PID/stat (T: stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def peak_anon_above_start(body: str, timeout: float = 60.0) -> int:
    """Runs `body` (Python; it prints START after its set-up) in a fresh interpreter and
    returns the peak of its anonymous memory after START, above the level at START."""
    script = "import numpy as np, torch, latentspace as ls\n" + textwrap.dedent(body)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, bufsize=1)
    # The child stops itself after START (SIGSTOP): the baseline is taken while it waits. Wait
    # for it to have stopped: a SIGCONT sent before its SIGSTOP would leave it stopped for good.
    assert child.stdout.readline().strip() == "START", child.stderr.read()
    stopped_by = time.monotonic() + timeout
    while _state(child.pid) != "T":
        assert time.monotonic() < stopped_by, "the case never stopped after START"
        time.sleep(0.001)
    start = _rss_anon(child.pid)
    peak = start
    deadline = time.monotonic() + timeout
    os.kill(child.pid, signal.SIGCONT)
    while child.poll() is None:
        value = _rss_anon(child.pid)
        if value is not None:
            peak = max(peak, value)
        assert time.monotonic() < deadline, "the case ran too long"
        time.sleep(0.002)
    _, err = child.communicate()
    assert child.returncode == 0, err
    return peak - start


_START = "print('START', flush=True); import os, signal; os.kill(os.getpid(), signal.SIGSTOP)\n"


def _memmap(path, shape, seed=0) -> None:
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(seed)
    step = max(1, (16 * MiB) // (4 * int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        data[start : start + step] = rng.random((min(step, shape[0] - start), *shape[1:]), dtype=np.float32)
    data.flush()


@pytest.mark.parametrize("encode", ["encoder.encode(X, out=np.empty((len(X), 8), np.float32))", "model.encode(X)"])
def test_encoding_a_memory_map_of_large_images_stays_small(tmp_path, encode):
    # 8,193 images of 64x64 (128 MiB): a default torch chunk (Encoder: 4,096 rows; a model's
    # own encode of numpy: 8,192) held that many images, their private copy and a
    # ConvAutoencoder's activations at once (about 0.45 and 0.9 GiB with 8 channels; 5.9 GiB
    # for 4,096 images of 3x128x128 with the default channels); a chunk is now bounded in bytes.
    path = tmp_path / "images.npy"
    _memmap(path, (8193, 1, 64, 64))
    peak = peak_anon_above_start(f"""
        torch.manual_seed(0)
        X = np.load({str(path)!r}, mmap_mode="r")
        model = ls.ConvAutoencoder((1, 64, 64), 8, channels=(8,))
        encoder = ls.Encoder(model)
        {_START}
        assert {encode}.shape == (8193, 8)
    """)
    assert peak < 300 * MiB, f"peak {peak / MiB:.0f} MiB"


def test_model_decode_of_numpy_holds_its_output_once():
    # Chunked numpy outputs were kept as parts and then concatenated: twice the output at the
    # end (512 MiB for these 256 MiB of images); the result is now filled chunk by chunk.
    peak = peak_anon_above_start(f"""
        torch.manual_seed(0)
        model = ls.Autoencoder(2048, 8, hidden=(16,))
        codes = np.random.default_rng(0).standard_normal((32768, 8)).astype(np.float32)
        {_START}
        images = model.decode(codes)
        assert images.shape == (32768, 2048)
    """)
    assert peak < 400 * MiB, f"peak {peak / MiB:.0f} MiB for 256 MiB of output"


def test_pca_fit_on_a_memory_map_of_wide_rows_stays_small(tmp_path):
    # PCA.fit accumulates X^T X in chunks of 65,536 rows: 512 bytes a row in float64 made
    # each chunk (and its centred copy) 128 MiB; a chunk is now bounded in bytes.
    path = tmp_path / "rows.npy"
    _memmap(path, (131072, 256))
    peak = peak_anon_above_start(f"""
        X = np.load({str(path)!r}, mmap_mode="r")
        pca = ls.PCA(4)
        {_START}
        pca.fit(X)
    """)
    assert peak < 300 * MiB, f"peak {peak / MiB:.0f} MiB"


def test_cli_index_build_streams_the_rows_into_the_file(tmp_path):
    # index build held the whole index (dim * 4 bytes a row) before saving it, so a .npy
    # larger than memory could not be indexed though search --mmap could search the result;
    # it now writes each checked chunk straight into the file.
    path = tmp_path / "vectors.npy"
    _memmap(path, (393_216, 128))  # 192 MiB
    peak = peak_anon_above_start(f"""
        from latentspace import cli
        {_START}
        assert cli.main(["index", "build", {str(path)!r}, "--out", {str(tmp_path / 'v.lsidx')!r}, "--quiet"]) == 0
    """)
    assert peak < 96 * MiB, f"peak {peak / MiB:.0f} MiB"
    import latentspace

    np.testing.assert_array_equal(latentspace.load_index(tmp_path / "v.lsidx").vectors(), np.load(path))

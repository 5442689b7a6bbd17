"""latentspace._host_memory.is_writable, and encode's out= over read-only memory.

torch has no read-only flag: a tensor over a read-only memory map faults the process on its
first write. encode(out=tensor) asks the kernel first and raises instead."""

import ctypes
import mmap
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from latentspace._host_memory import is_writable

PAGE = mmap.PAGESIZE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_vm_writev is Linux's")


def _read_only_map(tmp_path, values):
    path = tmp_path / "values.npy"
    np.save(path, values)
    return np.load(path, mmap_mode="r")


def test_ordinary_memory_is_writable_and_left_unchanged(rng):
    values = rng.standard_normal((3 * PAGE // 4 + 5, 7)).astype(np.float32)  # several pages, odd end
    before = values.copy()
    assert is_writable(values) is True
    assert np.array_equal(values, before)


def test_a_read_only_memory_map_is_not_writable_and_a_writable_one_is(tmp_path, rng):
    values = rng.standard_normal((1000, 3)).astype(np.float32)
    assert is_writable(_read_only_map(tmp_path, values)) is False
    assert is_writable(np.load(tmp_path / "values.npy", mmap_mode="r+")) is True
    assert is_writable(np.load(tmp_path / "values.npy", mmap_mode="c")) is True  # copy-on-write
    assert np.array_equal(np.load(tmp_path / "values.npy"), values)


@pytest.mark.parametrize("start, stop, expected", [
    (0, 2 * PAGE, True),            # the two writable pages
    (0, 3 * PAGE, False),           # reaches the protected page
    (2 * PAGE - 1, 2 * PAGE + 1, False),  # one byte either side of the boundary
    (2 * PAGE + 5, 3 * PAGE, False),  # starts inside it
    (PAGE + 3, PAGE + 4, True),     # one byte
])
def test_one_protected_page_among_writable_ones(start, stop, expected):
    buffer = mmap.mmap(-1, 3 * PAGE)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(raw.ctypes.data + 2 * PAGE, PAGE, mmap.PROT_READ) == 0
    try:
        assert is_writable(raw[start:stop]) is expected
    finally:
        libc.mprotect(raw.ctypes.data + 2 * PAGE, PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
        del raw


def test_more_pages_than_one_call_takes(rng):
    values = np.ones(1500 * PAGE // 4, dtype=np.float32)  # 1,500 pages: two batches of iovecs
    values[-1] = 3.0
    assert is_writable(values) is True
    assert values[-1] == 3.0 and values[0] == 1.0


def test_empty_is_writable():
    assert is_writable(np.empty((0, 4), dtype=np.float32)) is True


def test_encode_into_a_tensor_over_a_read_only_map_raises(tmp_path):
    # Before the check this faulted the interpreter (exit -11), so it runs in a child.
    script = textwrap.dedent(f"""
        import warnings
        import numpy as np, torch, latentspace
        warnings.simplefilter("ignore")  # torch warns that the array is not writable
        np.save({str(tmp_path / 'out.npy')!r}, np.zeros((40, 3), np.float32))
        out = torch.from_numpy(np.load({str(tmp_path / 'out.npy')!r}, mmap_mode="r"))
        model = torch.nn.Sequential(torch.nn.Linear(5, 3)).eval()
        try:
            latentspace.encode(model, np.ones((40, 5), np.float32), out=out)
        except ValueError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "out: the tensor's memory is read-only" in result.stdout

"""latentspace._host_memory.is_writable, and encode's out= over read-only memory.

torch has no read-only flag: a tensor over a read-only memory map faults the process on its
first write. encode(out=tensor) asks the kernel first and raises instead."""

import ctypes
import mmap
import platform
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


# process_vm_writev's number, for a seccomp filter in a child (x86_64 and aarch64 only)
_PROCESS_VM_WRITEV = {"x86_64": 311, "aarch64": 271}


@pytest.mark.skipif(platform.machine() not in _PROCESS_VM_WRITEV, reason="the syscall number is per machine")
def test_a_sandbox_that_kills_debugging_syscalls_does_not_kill_encode(tmp_path):
    """Sandboxes block process_vm_writev, a debugging syscall, and a seccomp filter often
    kills the process for it (systemd's SystemCallFilter= without SystemCallErrorNumber=).
    The check used it on every encode(out=tensor): a writable out then cost the process
    (SIGSYS, 'Bad system call')."""
    script = textwrap.dedent(f"""
        import ctypes, warnings
        import numpy as np, torch, latentspace

        class Instruction(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                        ("k", ctypes.c_uint)]

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

        # load the syscall number; process_vm_writev: kill the process; anything else: allow
        code = (Instruction * 4)(Instruction(0x20, 0, 0, 0),
                                 Instruction(0x15, 0, 1, {_PROCESS_VM_WRITEV[platform.machine()]}),
                                 Instruction(0x06, 0, 0, 0x80000000), Instruction(0x06, 0, 0, 0x7FFF0000))
        program = Program(4, code)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        if libc.prctl(38, 1, None, 0, 0) or libc.prctl(22, 2, ctypes.addressof(program), 0, 0):  # no seccomp here
            print("no seccomp")
            raise SystemExit(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 3)).eval()
        x = np.ones((40, 5), np.float32)
        out = torch.empty(40, 3)
        latentspace.encode(model, x, out=out)
        print("writable:", bool(torch.equal(out, model(torch.from_numpy(x)).detach())))
        warnings.simplefilter("ignore")  # torch warns that the array is not writable
        np.save({str(tmp_path / 'out.npy')!r}, np.zeros((40, 3), np.float32))
        out = torch.from_numpy(np.load({str(tmp_path / 'out.npy')!r}, mmap_mode="r"))
        try:
            latentspace.encode(model, x, out=out)
        except ValueError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr)
    if result.stdout.strip() == "no seccomp":
        pytest.skip("seccomp filters cannot be installed here")
    assert "writable: True" in result.stdout
    assert "out: the tensor's memory is read-only" in result.stdout


def test_a_large_array_is_checked_in_bounded_memory():
    """The page addresses were listed all at once: 16 bytes per page, 256 MiB of lists for a
    64 GiB out. Listed per call of _IOV_MAX pages, the check needs a few kilobytes."""
    import tracemalloc

    values = np.zeros(64 << 20, dtype=np.uint8)  # 64 MiB: 16,384 pages
    tracemalloc.start()
    try:
        assert is_writable(values) is True
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10  # the old lists: 2 x 16,384 x 8 bytes, and their concatenation


def test_torch_allocated_out_is_not_probed_and_wrapped_memory_is(monkeypatch):
    # torch's own (resizable) storage is writable: the kernel is asked only about memory torch
    # wraps. (Read before .numpy(), which marks any storage not resizable: the skip had never
    # happened.)
    import torch

    from latentspace import _arrays

    asked = []
    monkeypatch.setattr(_arrays, "is_writable", lambda view: asked.append(view.shape) or True)
    _arrays.check_encode_out(torch.empty(4, 3), 4, 3)
    assert asked == []
    _arrays.check_encode_out(torch.from_numpy(np.empty((4, 3), np.float32)), 4, 3)
    assert asked == [(4, 3)]

"""The default thread count (OMP_NUM_THREADS, else the CPU count) is fitted to an address-space
limit at import. Under `ulimit -v 4000000` with OMP_NUM_THREADS=5000, or with OMP_STACKSIZE=4G
and the 2 CPUs of the test VM, the first search ended the process (libgomp: "Thread creation
failed", exit 1, no Python exception): only set_num_threads and --threads were checked."""

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from latentspace import _thread_stacks, runtime

resource = pytest.importorskip("resource")

_LIMIT_BYTES = 4_000_000 << 10  # `ulimit -v 4000000`, in KiB: about 3.8 GiB
_STACK_BYTES = 8 << 20  # `ulimit -s 8192`, the usual default

# Prints each warning of `import latentspace`, the count then in use, and a search's result.
_IMPORT_AND_SEARCH = textwrap.dedent("""
    import sys
    import warnings
    import numpy as np
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import latentspace
    for warning in caught:
        print("warning:", warning.category.__name__, warning.message)
    print("threads:", latentspace.get_num_threads())
    if len(sys.argv) > 1:  # a library imported after latentspace, as latentspace.encode imports torch
        __import__(sys.argv[1])
    x = np.random.default_rng(0).random((20000, 16), dtype=np.float32)
    print("searched:", latentspace.knn(x[:4000], x, 3)[1][0, 0])
""")


def _address_limit_settable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return hard == resource.RLIM_INFINITY or hard >= _LIMIT_BYTES


needs_address_limit = pytest.mark.skipif(not _address_limit_settable(),
                                         reason="needs Linux and a hard RLIMIT_AS of at least 4,000,000 KiB")


def _import_and_search_under_limit(*then_import: str, **env: str) -> subprocess.CompletedProcess:
    def limit():  # what `ulimit -v 4000000; ulimit -s 8192` does, in the child only
        resource.setrlimit(resource.RLIMIT_AS, (_LIMIT_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))
        resource.setrlimit(resource.RLIMIT_STACK, (_STACK_BYTES, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    return subprocess.run([sys.executable, "-c", _IMPORT_AND_SEARCH, *then_import], capture_output=True, text=True,
                          timeout=120, preexec_fn=limit, env={"PATH": "/usr/bin:/bin", **env})


def _lines(stdout: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix).strip() for line in stdout.splitlines() if line.startswith(prefix)]


@needs_address_limit
@pytest.mark.parametrize("env, source, asked", [
    ({"OMP_NUM_THREADS": "5000"}, "OMP_NUM_THREADS=5000", 5000),
    # 4 GiB stacks: not even a second thread fits, so the CPU count (2 or more) is too many
    ({"OMP_STACKSIZE": "4G"}, "the CPU count", len(os.sched_getaffinity(0))),
])
def test_a_default_count_that_cannot_fit_is_lowered_with_a_warning(env, source, asked):
    if asked < 2:
        pytest.skip("one CPU: the CPU count cannot be lowered")
    done = _import_and_search_under_limit(**env)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    used = int(_lines(done.stdout, "threads:")[0])
    assert 1 <= used < asked
    # stacks of 8.25 MiB in at most half of what 3.8 GiB less Python's own leaves: about 220
    assert used == 1 if "OMP_STACKSIZE" in env else 100 < used < 250
    warned = _lines(done.stdout, "warning:")
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"RuntimeWarning latentspace's default thread count, {asked} ({source}), ")
    assert "ulimit -v, RLIMIT_AS" in warned[0]
    assert f"the CPU kernels use {used} thread{'s' if used > 1 else ''} instead" in warned[0]
    assert _lines(done.stdout, "searched:") == ["0"]


@needs_address_limit
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_the_lowered_default_leaves_room_for_torch_imported_later():
    """The most threads that fit at import (446 here) no longer fit once torch (about 0.5 GiB
    of address space) was imported: the first search still ended the process. The lowered
    count leaves half of the room for such later use."""
    done = _import_and_search_under_limit("torch", OMP_NUM_THREADS="5000")
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert len(_lines(done.stdout, "warning:")) == 1
    assert _lines(done.stdout, "searched:") == ["0"]


@needs_address_limit
@pytest.mark.parametrize("env, expected", [({"OMP_NUM_THREADS": "8"}, 8), ({}, len(os.sched_getaffinity(0)))])
def test_a_default_count_that_fits_is_kept_without_a_warning(env, expected):
    done = _import_and_search_under_limit(**env)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert _lines(done.stdout, "warning:") == []
    assert _lines(done.stdout, "threads:") == [str(expected)]
    assert _lines(done.stdout, "searched:") == ["0"]


class _FakeNative:
    """The two native calls the fitting makes, with a default count to report."""

    def __init__(self, default: int):
        self.count = default
        self.reads = 0

    def num_threads(self) -> int:
        self.reads += 1
        return self.count

    def set_num_threads(self, n: int) -> None:
        self.count = n


def _limit_leaving(monkeypatch, room_bytes: int | None) -> None:
    """An address-space limit that leaves room_bytes (None: no limit), 8 MiB thread stacks."""
    gib = 1 << 30
    monkeypatch.setattr(_thread_stacks, "_address_space_used", lambda: gib)
    address_limit = resource.RLIM_INFINITY if room_bytes is None else gib + room_bytes
    limits = {resource.RLIMIT_AS: (address_limit, address_limit), resource.RLIMIT_STACK: (_STACK_BYTES, _STACK_BYTES)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[which])
    for name in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        monkeypatch.delenv(name, raising=False)


def _fit(monkeypatch, default: int) -> tuple[_FakeNative, list[warnings.WarningMessage]]:
    native = _FakeNative(default)
    monkeypatch.setattr(runtime, "_native", native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime._fit_default_threads_to_address_limit()
    return native, caught


def test_the_default_is_lowered_to_the_most_threads_that_fit_half_the_room(monkeypatch):
    # 2 GiB left, 8.25 MiB a thread: 248 workers and the caller fit; in half of it 124 and the caller
    _limit_leaving(monkeypatch, 2 << 30)
    monkeypatch.setenv("OMP_NUM_THREADS", "5000")
    native, caught = _fit(monkeypatch, 5000)
    assert native.count == 125
    assert [w.category for w in caught] == [RuntimeWarning]
    message = str(caught[0].message)
    assert message.startswith("latentspace's default thread count, 5000 (OMP_NUM_THREADS=5000), does not fit "
                              "this process's address-space limit: 5000 threads need about 40.28 GiB of address "
                              "space for their stacks (8.25 MiB each), more than the 2.00 GiB this process's limit "
                              "(ulimit -v, RLIMIT_AS) leaves; the CPU kernels use 125 threads instead")
    assert "GNU OpenMP would end the process at the first search" in message
    assert _thread_stacks.stack_room_error(125) is None  # set_num_threads takes it, and up to 249
    assert _thread_stacks.stack_room_error(249) is None and _thread_stacks.stack_room_error(250) is not None


def test_a_default_from_the_cpu_count_is_named_so(monkeypatch):
    _limit_leaving(monkeypatch, 2 << 30)
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")  # ignored, as libgomp ignores it: the CPU count counts
    native, caught = _fit(monkeypatch, 300)
    assert native.count == 125
    assert str(caught[0].message).startswith("latentspace's default thread count, 300 (the CPU count), ")
    monkeypatch.delenv("OMP_NUM_THREADS")
    _, caught = _fit(monkeypatch, 300)
    assert str(caught[0].message).startswith("latentspace's default thread count, 300 (the CPU count), ")


def test_a_default_that_fits_is_kept_silently(monkeypatch):
    _limit_leaving(monkeypatch, 2 << 30)  # (249 fits the room, though not half of it: kept as asked)
    native, caught = _fit(monkeypatch, 249)
    assert native.count == 249 and caught == []


def test_no_limit_reads_nothing(monkeypatch):
    """No address-space limit: neither the default count nor /proc is read."""
    _limit_leaving(monkeypatch, None)
    monkeypatch.setattr(_thread_stacks, "_address_space_used", lambda: pytest.fail("read /proc without a limit"))
    native, caught = _fit(monkeypatch, 10**6)
    assert native.reads == 0 and native.count == 10**6 and caught == []

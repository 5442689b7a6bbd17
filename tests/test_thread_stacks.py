"""set_num_threads refuses a thread count whose stacks cannot fit the address space left under
`ulimit -v`: GNU OpenMP would print "Thread creation failed" and end the process at the next
search, with no Python exception."""

import platform
import subprocess
import sys
import textwrap

import pytest

import latentspace
from latentspace import _thread_stacks

resource = pytest.importorskip("resource")

_SEARCH_AFTER = textwrap.dedent("""
    import sys
    import numpy as np
    import latentspace
    try:
        latentspace.set_num_threads(int(sys.argv[1]))
    except ValueError as error:
        print("refused:", error)
        raise SystemExit(0)
    x = np.random.default_rng(0).random((20000, 16), dtype=np.float32)
    print("searched", latentspace.knn(x[:4000], x, 3)[1][0, 0])
""")


def _run_under_address_limit(n: int, limit_bytes: int, stack_bytes: int = 8 << 20) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
        resource.setrlimit(resource.RLIMIT_STACK, (stack_bytes, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    return subprocess.run([sys.executable, "-c", _SEARCH_AFTER, str(n)], capture_output=True, text=True,
                          timeout=120, preexec_fn=limit, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_too_many_threads_under_an_address_limit_are_refused_by_name():
    """Under a 6 GiB limit: 5,000 threads' 8 MiB stacks (39 GiB) ended the process (libgomp:
    "Thread creation failed", exit 1); now a ValueError naming n, and a count that fits runs."""
    refused = _run_under_address_limit(5000, 6 << 30)
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.startswith("refused: n: 5000 threads need about"), refused.stdout
    assert "ulimit -v" in refused.stdout and "use at most about" in refused.stdout
    fits = int(refused.stdout.split("use at most about ")[1].split()[0])
    assert 400 < fits < 760  # 6 GiB less the interpreter's own, over 8.25 MiB a thread
    ran = _run_under_address_limit(8, 6 << 30)
    assert ran.returncode == 0 and ran.stdout.strip() == "searched 0", (ran.stdout, ran.stderr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_the_cli_refuses_too_many_threads_naming_the_flag(tmp_path):
    """`--threads` is refused while the command line is parsed (exit 2), named as the flag."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    done = subprocess.run([sys.executable, "-m", "latentspace", "train", str(tmp_path / "x.npy"), "-o",
                           str(tmp_path / "m.safetensors"), "--threads", "5000"], capture_output=True, text=True,
                          timeout=120, preexec_fn=limit, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "error: argument --threads: 5000 threads need about" in done.stderr, done.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_no_limit_refuses_nothing(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert _thread_stacks.stack_room_error(10**6) is None


def test_the_room_left_and_the_stack_size_decide(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(_thread_stacks, "_address_space_used", lambda: gib)
    limits = {resource.RLIMIT_AS: (3 * gib, 3 * gib), resource.RLIMIT_STACK: (8 << 20, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[which])
    monkeypatch.delenv("OMP_STACKSIZE", raising=False)
    monkeypatch.delenv("GOMP_STACKSIZE", raising=False)
    # 2 GiB left, 8.25 MiB a thread: 248 workers fit beside the calling thread
    assert _thread_stacks.stack_room_error(249) is None
    message = _thread_stacks.stack_room_error(250)
    assert message is not None and message.startswith("n: 250 threads need about 2.01 GiB of address space for their stacks (8.25 MiB each), "
                                                  "more than the 2.00 GiB")
    assert "use at most about 249 threads" in message
    monkeypatch.setenv("OMP_STACKSIZE", "1M")  # smaller stacks: many more fit
    assert _thread_stacks.stack_room_error(1500) is None
    limits[resource.RLIMIT_AS] = (gib // 2, gib // 2)  # already past the limit: nothing fits
    monkeypatch.delenv("OMP_STACKSIZE")
    assert "use at most about 1 thread, or" in _thread_stacks.stack_room_error(2)
    monkeypatch.setattr(_thread_stacks, "_address_space_used", lambda: None)  # cannot tell: no refusal
    assert _thread_stacks.stack_room_error(10**6) is None


@pytest.mark.parametrize("text, expected", [
    (None, None), ("512", 512 << 10), ("4M", 4 << 20), (" 16 k ", 16 << 10), ("1G", 1 << 30), ("100B", 100),
    ("abc", None), ("4 MB", None), ("-1", None), ("", None),
])
def test_omp_stacksize_is_read_as_libgomp_reads_it(text, expected):
    assert _thread_stacks._parse_stack_size(text) == expected


def test_set_num_threads_in_this_process_still_takes_ordinary_counts(num_threads):
    num_threads(3)
    assert latentspace.get_num_threads() == 3


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"),
                    reason="glibc's default thread stack of these machines")
@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_STACK)[1] != resource.RLIM_INFINITY,
                    reason="needs a hard RLIMIT_STACK of unlimited")
def test_an_unlimited_stack_limit_gives_threads_glibcs_2_mib_stacks():
    """`ulimit -s unlimited`: glibc gives each thread ARCH_STACK_DEFAULT_SIZE, 2 MiB on x86-64 and
    aarch64, not 8. The check took 8 MiB and refused 400 threads under a 1.5 GiB limit, which
    ran (400 stacks of 8 MiB would need 3.2 GiB: running shows they were not 8 MiB)."""
    ran = _run_under_address_limit(400, 3 << 29, stack_bytes=resource.RLIM_INFINITY)
    assert ran.returncode == 0 and ran.stdout.strip() == "searched 0", (ran.stdout, ran.stderr)


def test_the_stack_of_an_unlimited_stack_limit_is_glibcs_default(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(_thread_stacks, "_address_space_used", lambda: gib)
    limits = {resource.RLIMIT_AS: (3 * gib, 3 * gib), resource.RLIMIT_STACK: (resource.RLIM_INFINITY,) * 2}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[which])
    monkeypatch.delenv("OMP_STACKSIZE", raising=False)
    monkeypatch.delenv("GOMP_STACKSIZE", raising=False)
    monkeypatch.setattr(_thread_stacks.platform, "machine", lambda: "x86_64")
    # 2 GiB left, 2.25 MiB a thread: 910 workers fit beside the calling thread
    assert _thread_stacks.stack_room_error(911) is None
    assert "(2.25 MiB each)" in _thread_stacks.stack_room_error(912)
    monkeypatch.setattr(_thread_stacks.platform, "machine", lambda: "ppc64le")  # 4 MiB there
    assert "(4.25 MiB each)" in _thread_stacks.stack_room_error(912)

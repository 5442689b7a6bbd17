"""The memory a process may use: the machine's, or a cgroup's limit where one is lower.

Each check builds a fake /proc/self/cgroup and /sys/fs/cgroup tree in a temporary directory,
in the shapes the kernel and container runtimes leave them."""

import pytest

from latentspace import _memory_limit
from latentspace._memory_limit import MemoryLimit, _cgroup_limit

GIB = 1 << 30


def _tree(tmp_path, membership: str, files: dict[str, str]):
    """A /proc/self/cgroup holding `membership` and a cgroup mount with `files` (path under
    the mount: contents); returns (membership file, mount root)."""
    proc = tmp_path / "cgroup"
    proc.write_text(membership)
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, root


def test_v2_limit_of_the_process_group(tmp_path):
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/memory.max": f"{4 * GIB}\n",
        "kubepods/pod1/memory.max": "max\n",
        "kubepods/memory.max": "max\n",
    })
    assert _cgroup_limit(proc, root) == 4 * GIB


def test_v2_an_ancestors_lower_limit_binds(tmp_path):
    """A pod's limit over its containers' (each unlimited, or higher) is the one the kernel enforces."""
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/memory.max": "max\n",
        "kubepods/pod1/memory.max": f"{2 * GIB}\n",
        "kubepods/memory.max": f"{64 * GIB}\n",
    })
    assert _cgroup_limit(proc, root) == 2 * GIB


def test_v2_in_a_container_with_its_own_cgroup_namespace(tmp_path):
    """Docker with cgroupns=private: the process's group is "/", the mount's root is the container's."""
    proc, root = _tree(tmp_path, "0::/\n", {"memory.max": f"{3 * GIB}\n"})
    assert _cgroup_limit(proc, root) == 3 * GIB


def test_v2_host_path_not_under_the_containers_mount(tmp_path):
    """cgroupns=host: /proc/self/cgroup names the host's path, which the container's mount (its
    own group at the root) does not hold; the walk up reaches the mount's root and its limit."""
    proc, root = _tree(tmp_path, "0::/system.slice/docker-abc.scope\n", {"memory.max": f"{GIB}\n"})
    assert _cgroup_limit(proc, root) == GIB


def test_v1_memory_controller(tmp_path):
    proc, root = _tree(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n", {
        "memory/docker/abc/memory.limit_in_bytes": f"{6 * GIB}\n",
        "memory/docker/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "cpu,cpuacct/docker/abc/memory.limit_in_bytes": "1024\n",  # not the memory controller: ignored
    })
    assert _cgroup_limit(proc, root) == 6 * GIB


def test_hybrid_hierarchy_reads_the_unified_mount_too(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/user.slice\n0::/user.slice\n", {
        "memory/user.slice/memory.limit_in_bytes": "9223372036854771712\n",
        "unified/user.slice/memory.max": f"{5 * GIB}\n",
    })
    assert _cgroup_limit(proc, root) == 5 * GIB


@pytest.mark.parametrize("files", [
    {},  # nothing mounted
    {"memory.max": "max\n"},
    {"memory.max": "0\n"},  # nonsense: not a limit this code trusts
    {"memory.max": "garbage\n"},
    {"memory.max": "\n"},
])
def test_no_usable_limit_is_none(tmp_path, files):
    proc, root = _tree(tmp_path, "0::/\n", files)
    assert _cgroup_limit(proc, root) is None


@pytest.mark.parametrize("membership", ["", "garbage without colons\n", "\xff\xfe"])
def test_unreadable_membership_is_none(tmp_path, membership):
    proc, root = _tree(tmp_path, membership, {"memory.max": f"{GIB}\n"})
    if membership == "\xff\xfe":
        proc.write_bytes(b"\xff\xfe0::/\n")
    assert _cgroup_limit(proc, root) is None
    assert _cgroup_limit(tmp_path / "no-such-file", root) is None


def test_memory_limit_takes_the_lower_of_machine_and_cgroup(monkeypatch):
    read = _memory_limit._read_memory_limit  # (memory_limit keeps what this read for a while)
    monkeypatch.setattr(_memory_limit, "_machine_memory", lambda: 24 * GIB)
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: 4 * GIB)
    assert read() == MemoryLimit(4 * GIB, cgroup=True)
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: 64 * GIB)
    assert read() == MemoryLimit(24 * GIB)
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: None)
    assert read() == MemoryLimit(24 * GIB)
    monkeypatch.setattr(_memory_limit, "_machine_memory", lambda: None)
    assert read() is None
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: GIB)
    assert read() == MemoryLimit(GIB, cgroup=True)


def test_memory_limit_on_this_machine_is_at_most_its_memory():
    import os

    limit = _memory_limit.memory_limit()
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limit is not None and 0 < limit.nbytes <= machine


def test_words():
    assert str(MemoryLimit(int(23.5 * GIB))) == "this machine's 23.5 GiB of memory"
    assert str(MemoryLimit(512 << 20, cgroup=True)) == "the 512.0 MiB memory limit of this process's cgroup"


def test_a_cgroup_limit_refuses_results_the_machine_could_hold(monkeypatch):
    """k x queries of results within the machine's memory but past the container's limit: the
    kernel's OOM killer, not numpy, would have ended the search."""
    import numpy as np

    import latentspace

    monkeypatch.setattr(_memory_limit, "_machine_memory", lambda: 1 << 40)
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: 1 << 20)
    monkeypatch.setattr(_memory_limit, "_cached", None)  # (read the limits above, not the last ones read)
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(MemoryError, match=r"^k: 1 queries x k=131072 results need .* more than the 1.0 MiB "
                                          r"memory limit of this process's cgroup; lower k"):
        latentspace.knn(x[:1], x, 1 << 17)
    assert latentspace.knn(x[:1], x, 1 << 15)[1].shape == (1, 1 << 15)


def test_a_search_does_not_read_the_cgroup_files_each_call(monkeypatch):
    """memory_limit reads /proc/self/cgroup and a file per ancestor group (95 us here): every
    knn and FlatIndex.search asks it (empty_results), so a 1-query search of 1,000 rows took
    104 us instead of 7. The limit is read again only after _CACHE_SECONDS."""
    import numpy as np

    import latentspace

    reads = []
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: reads.append(1) or 64 * GIB)
    monkeypatch.setattr(_memory_limit, "_cached", None)  # (nothing read yet)
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    for _ in range(20):
        latentspace.knn(x[:1], x, 3)
    assert len(reads) == 1
    later = _memory_limit._clock() + _memory_limit._CACHE_SECONDS + 0.01
    monkeypatch.setattr(_memory_limit, "_clock", lambda: later)  # a limit changed at run time (a resized pod) is seen
    monkeypatch.setattr(_memory_limit, "_cgroup_limit", lambda membership, root: reads.append(1) or 1 << 20)
    with pytest.raises(MemoryError, match="memory limit of this process's cgroup"):
        latentspace.knn(x[:1], x, 1 << 17)
    assert len(reads) == 2


def test_a_group_outside_the_namespace_root_reads_nothing_outside_the_mount(tmp_path):
    """A process outside its cgroup namespace's root (moved after the namespace was made: the
    kernel writes "/../sibling") is in a group this mount does not show. The walk read
    `mount/../sibling` and `mount/..` (files outside the cgroup mount) and then the mount's
    own limit, which is not this process's."""
    proc, root = _tree(tmp_path, "0::/../sibling\n", {"memory.max": f"{GIB}\n"})
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "memory.max").write_text(f"{GIB // 2}\n")
    (tmp_path / "memory.max").write_text(f"{GIB // 4}\n")
    assert _cgroup_limit(proc, root) is None

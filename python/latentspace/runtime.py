"""Build and runtime information, thread count and SIMD level."""

from __future__ import annotations

import os
import warnings
from typing import Any

from . import _native
from ._arrays import check_int
from ._thread_stacks import address_space_limited, lowered_default, stack_room_error

__all__ = [
    "build_info",
    "cuda_available",
    "get_num_threads",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
]

_SIMD_ENV = "LATENTSPACE_SIMD"
_MAX_THREADS = 2**31 - 1


def _warn_about_bad_simd_env() -> None:
    value = os.environ.get(_SIMD_ENV)
    if value is not None and value not in ("scalar", "avx2", "avx512"):
        warnings.warn(
            f"{_SIMD_ENV}={value!r} is not one of 'scalar', 'avx2', 'avx512'; ignoring it",
            RuntimeWarning,
            stacklevel=3,
        )


def _fit_default_threads_to_address_limit() -> None:
    """Lowers a default thread count (OMP_NUM_THREADS, else the CPU count) whose stacks cannot
    fit under an address-space limit (`ulimit -v`), with a RuntimeWarning: libgomp would end
    the process at the first search ("Thread creation failed"), where set_num_threads would
    have refused the same count. Run once, at import: without a limit it reads nothing, and
    the default is read at first use, as before."""
    if not address_space_limited():
        return
    asked = _native.num_threads()
    lowered = lowered_default(asked)
    if lowered is None:
        return
    used, why = lowered
    _native.set_num_threads(used)
    warnings.warn(
        f"latentspace's default thread count, {asked} ({_default_count_source(asked)}), does not fit this "
        f"process's address-space limit: {why}; the CPU kernels use {used} thread{'s' if used > 1 else ''} "
        f"instead, whose stacks take at most half of that, the rest being left for data and for libraries "
        f"imported later such as torch (GNU OpenMP would end the process at the first search: \"Thread "
        f"creation failed\"). set_num_threads(n) or a smaller OMP_STACKSIZE choose otherwise",
        RuntimeWarning,
        stacklevel=3,
    )


def _default_count_source(count: int) -> str:
    """Where OpenMP's default count came from: OMP_NUM_THREADS where its first count is this
    one (the native parse decides; a value it ignores leaves the CPU count), else the CPU count."""
    value = os.environ.get("OMP_NUM_THREADS")
    first = (value or "").split(",")[0].strip().removeprefix("+")
    return f"OMP_NUM_THREADS={value}" if first.isdigit() and int(first) == count else "the CPU count"


def get_num_threads() -> int:
    """Threads the native CPU kernels use (default: OpenMP's, so OMP_NUM_THREADS counts, lowered
    with a warning at import where a `ulimit -v` leaves no room for its thread stacks; 1 in a
    process forked from one that had imported latentspace, see set_num_threads)."""
    return _native.num_threads()


def set_num_threads(n: int) -> None:
    """Sets the thread count of latentspace's kernels only (torch's is separate).

    A forked child (multiprocessing's default start method on Linux) starts with 1: GNU
    OpenMP cannot start threads in a child forked after its parent ran some, and would wait
    forever. Raise it there only in a child forked before its parent ran any threads (or use
    the "spawn" or "forkserver" start method). Raises ValueError naming n when raising the
    count to n needs thread stacks that cannot fit the address space this process's limit
    leaves (`ulimit -v`), where OpenMP would end the process at the next search. (Lowering it
    is not checked: the threads may exist already, their stacks in the address space used.)"""
    n = check_int(n, "n")
    if n > _MAX_THREADS:
        raise ValueError(f"n: expected an integer <= {_MAX_THREADS} (the native thread count is an int), got {n}")
    # (libgomp ends the process when it cannot create a thread: refused here, by name)
    too_many = stack_room_error(n) if n > _native.num_threads() else None
    if too_many is not None:
        raise ValueError(too_many)
    _native.set_num_threads(n)


def simd_level() -> str:
    """SIMD instruction set the CPU kernels use now: 'avx512', 'avx2' or 'scalar'."""
    return _native.simd_level()


def set_simd_level(level: str) -> None:
    """Caps the SIMD level ('scalar', 'avx2', 'avx512'), e.g. to compare or test paths.

    The LATENTSPACE_SIMD environment variable sets the same cap at import. Raises ValueError
    for an unknown level or one this CPU lacks. Process-wide: a call running on another
    thread meanwhile uses either level, the one it read when it started (each kernel call
    reads the level once, so its result is one level's, bit for bit).
    """
    if not isinstance(level, str):
        raise TypeError(f"level: expected 'scalar', 'avx2' or 'avx512', got {level!r}")
    _native.set_simd_level(level)


def cuda_available() -> bool:
    """True when device="cuda" works here: this build has CUDA, a GPU is visible now, and the
    installed torch has CUDA too (torch is imported only when the first two hold)."""
    if not (_native.cuda_compiled() and _native.cuda_devices()):
        return False
    import torch

    return bool(torch.cuda.is_available())


def build_info() -> dict[str, Any]:
    """How this latentspace was built and what it can use on this machine now."""
    devices = _native.cuda_devices()
    architectures = _native.cuda_architectures()
    return {
        "version": _native.__version__,
        "simd_level": _native.simd_level(),
        "hardware_simd_level": _native.hardware_simd_level(),
        "num_threads": _native.num_threads(),
        "openmp": True,
        "cuda_compiled": _native.cuda_compiled(),
        "cuda_architectures": [a for a in architectures.split(";") if a],
        "gpu_visible": bool(devices),
        "cuda_devices": devices,
        "cuda_unavailable_reason": "" if devices else _native.cuda_unavailable_reason(),
        "cuda_losses": _cuda_setting("losses"),
        "cuda_encoder": _cuda_setting("encoder"),
        "cuda_row_check": _cuda_setting("row_check"),
    }


def _cuda_setting(operation: str) -> str:
    """What CUDA tensors get now for `operation`: "native" (latentspace's CUDA kernels) or
    "torch" (torch's ops), from LATENTSPACE_CUDA_LOSSES ("losses": latentspace.losses),
    LATENTSPACE_CUDA_ENCODER ("encoder": latentspace.encode) or LATENTSPACE_CUDA_ROW_CHECK
    ("row_check": the NaN / Inf / norm check of the rows a GPU search or index takes); a bad
    value is reported, not raised (the operation raises it)."""
    from . import _cuda_encoder, _cuda_losses, _cuda_row_check  # (they import no torch)

    try:
        modules = {"losses": _cuda_losses, "encoder": _cuda_encoder, "row_check": _cuda_row_check}
        return modules[operation].backend()
    except ValueError as error:
        return f"invalid ({error})"

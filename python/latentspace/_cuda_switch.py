"""Which implementation CUDA tensors get for an operation that has native CUDA kernels waiting
for a GPU run's verdict (the fused losses, the encoder): an environment variable read at every
call, "native" (latentspace's kernels), "torch" (torch's own ops) or unset / "" / "auto" (the
operation's default). A build without CUDA, or a GPU older than every architecture it was built
for, gets torch by default; asked for "native", a build without CUDA gets the operation's clear
"built without CUDA" error where the kernels would run."""

from __future__ import annotations

import os
from functools import lru_cache

from . import _native

__all__ = ["choose_backend", "kernels_run_everywhere"]


def kernels_run_everywhere() -> bool:
    """Whether this build has CUDA kernels, and every GPU the process sees runs them. A GPU
    older than every architecture built (a T4, compute capability 7.5, against the default
    80;90) would fail the first launch with "no kernel image is available", where torch's ops
    run: there the default is torch's."""
    return _native.cuda_compiled() and _visible_gpus_run_the_kernels()


@lru_cache(maxsize=1)
def _visible_gpus_run_the_kernels() -> bool:
    """Read once: the visible GPUs do not change within a process, and every loss call asks."""
    from ._cuda_device import kernels_run_on

    architectures = [entry for entry in _native.cuda_architectures().split(";") if entry]
    return all(kernels_run_on(architectures, tuple(device["compute_capability"])) for device in _native.cuda_devices())


def choose_backend(variable: str, default: str) -> str:
    """"native" or "torch": what the environment variable `variable` asks for, `default` for
    unset / "" / "auto" ("torch" in a build without CUDA kernels, or where a visible GPU runs
    none of them); ValueError naming the variable for anything else."""
    value = os.environ.get(variable, "")
    if value in ("", "auto"):
        return default if kernels_run_everywhere() else "torch"
    if value not in ("native", "torch"):
        raise ValueError(f"{variable}: expected 'auto', 'native' or 'torch', got {value!r}")
    return value

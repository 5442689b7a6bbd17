"""Which implementation CUDA tensors get for an operation that has native CUDA kernels waiting
for a GPU run's verdict (the fused losses, the encoder): an environment variable read at every
call, "native" (latentspace's kernels), "torch" (torch's own ops) or unset / "" / "auto" (the
operation's default). A build without CUDA gets torch by default; asked for "native", it gets
the operation's clear "built without CUDA" error where the kernels would run."""

from __future__ import annotations

import os

from . import _native

__all__ = ["choose_backend"]


def choose_backend(variable: str, default: str) -> str:
    """"native" or "torch": what the environment variable `variable` asks for, `default` for
    unset / "" / "auto" ("torch" in a build without CUDA kernels); ValueError naming the
    variable for anything else."""
    value = os.environ.get(variable, "")
    if value in ("", "auto"):
        return default if _native.cuda_compiled() else "torch"
    if value not in ("native", "torch"):
        raise ValueError(f"{variable}: expected 'auto', 'native' or 'torch', got {value!r}")
    return value

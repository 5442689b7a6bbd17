"""The device argument of a GPU search: which device, and why CUDA cannot be used here.

resolve_device turns None / "cpu" / "cuda" / "cuda:N" / a torch.device into None (the CPU)
or a torch.device, and refuses with a RuntimeError naming every reason (the build, the GPU,
torch, the build's architectures against the GPU's) when CUDA is asked for and unusable.
check_budget checks the byte budgets a GPU search takes (workspace_bytes, gpu_memory_bytes).
Used by search.knn and FlatIndex through _cuda_search.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from . import runtime
from ._arrays import CudaUnavailableError, check_int, is_torch_tensor

__all__ = ["check_budget", "cuda_unavailable_reasons", "kernels_run_on", "require_cuda", "resolve_device"]

_DEVICE_PATTERN = re.compile(r"cuda(?::([0-9]+))?")  # [0-9], not \d: no other scripts' digits
_CPU_PATTERN = re.compile(r"cpu(?::[0-9]+)?")  # torch.device("cpu", 0) prints as "cpu:0"
_ARCHITECTURE_PATTERN = re.compile(r"([0-9]+)([a-z]?)(?:-(real|virtual))?")


def cuda_unavailable_reasons() -> list[str]:
    """Why device="cuda" cannot be used here: empty when it can."""
    reasons = []
    info = runtime.build_info()
    if not info["cuda_compiled"]:
        reasons.append("latentspace was built without CUDA (reinstall it where nvcc is found, "
                       "or with -C cmake.define.LATENTSPACE_CUDA=ON)")
    elif not info["gpu_visible"]:
        reasons.append(f"latentspace finds no usable CUDA GPU ({info['cuda_unavailable_reason'] or 'none visible'})")
    import torch

    if torch.version.cuda is None:
        reasons.append(f"the installed torch {torch.__version__} has no CUDA support (install a CUDA "
                       "build of torch, see https://pytorch.org/get-started/locally/)")
    elif not torch.cuda.is_available():
        reasons.append("torch sees no CUDA GPU")
    return reasons


def require_cuda(what: str, fix: str) -> None:
    """Raises CudaUnavailableError (a RuntimeError) '<what>, but CUDA is unavailable here:
    <reasons>. <fix>'."""
    reasons = cuda_unavailable_reasons()
    if reasons:
        raise CudaUnavailableError(f"{what}, but CUDA is unavailable here: {'; '.join(reasons)}. {fix}")


def resolve_device(device: Any, *inputs: tuple[Any, str]):
    """The device a search runs on: None for the CPU, else a torch.device('cuda', index).

    device: None, "cpu", "cuda" (torch's current device), "cuda:N" or a torch.device. None
    picks CUDA when one of `inputs` ((value, name) pairs) is a CUDA tensor (the first such
    input's device), else the CPU; torch is not imported for numpy inputs.

    Raises TypeError / ValueError for a malformed device, RuntimeError (naming every reason)
    when CUDA is asked for, or a CUDA tensor given, and CUDA is unusable.
    """
    if device is None:
        for value, name in inputs:
            if is_torch_tensor(value) and value.device.type == "cuda":
                require_cuda(f"{name} is a CUDA tensor",
                             "Pass device='cpu' to copy the inputs to the CPU and search there.")
                return _cuda_device(value.device.index, repr(str(value.device)))
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device
    else:
        raise TypeError(f"device: expected None, 'cpu', 'cuda', 'cuda:N' or a torch.device, "
                        f"got {type(device).__name__} {device!r}")
    if _CPU_PATTERN.fullmatch(text):
        return None
    match = _DEVICE_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"device: expected None, 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}")
    require_cuda(f"device={text!r} asked for", "Use device='cpu' (or None with CPU data) to search on the CPU.")
    return _cuda_device(None if match.group(1) is None else int(match.group(1)), repr(text))


def _cuda_device(index: int | None, asked: str):
    import torch

    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"device: {asked} asked for, but {count} CUDA GPU{'s are' if count != 1 else ' is'} "
                         f"visible (cuda:0 to cuda:{count - 1})")
    _require_kernels_for(index, asked)
    return torch.device("cuda", index)


def kernels_run_on(architectures: list[str], capability: tuple[int, int]) -> bool:
    """Whether a build for these CUDA architectures (CMake's entries: "90", "80-real",
    "86-virtual", "90a") has kernels a GPU of this compute capability runs: machine code
    (sm_XY) runs on the same major version at minor >= Y; PTX (compute_XY) is compiled by the
    driver for any capability >= X.Y; an arch-specific entry ("90a") runs on that GPU alone."""
    major, minor = capability
    for entry in architectures:
        match = _ARCHITECTURE_PATTERN.fullmatch(entry)
        if match is None:
            continue
        number, specific, kind = int(match.group(1)), match.group(2), match.group(3)
        built = (number // 10, number % 10)
        if specific:  # machine code or PTX, for that GPU alone
            if built == (major, minor):
                return True
            continue
        if kind != "virtual" and built[0] == major and minor >= built[1]:
            return True
        if kind != "real" and (major, minor) >= built:
            return True
    return False


def _require_kernels_for(index: int, asked: str) -> None:
    """RuntimeError naming the device when its compute capability is older than every
    architecture this build has kernels for (the first launch would fail with "no kernel
    image is available"). Skipped where latentspace's own device list lacks the index."""
    info = runtime.build_info()
    device = next((d for d in info["cuda_devices"] if d["index"] == index), None)
    if device is None or kernels_run_on(info["cuda_architectures"], tuple(device["compute_capability"])):
        return
    major, minor = device["compute_capability"]
    raise RuntimeError(
        f"device: {asked} asked for, but {device['name']} (compute capability {major}.{minor}) runs none of this "
        f"build's kernels (architectures {';'.join(info['cuda_architectures'])}); reinstall latentspace with "
        f"LATENTSPACE_CUDA_ARCHITECTURES={major}{minor} set, or search on the CPU (device='cpu')")


def check_budget(value: Any, name: str) -> int | None:
    """None (the default) or a byte count >= 1 (workspace_bytes, gpu_memory_bytes), below 2^63
    (the native side takes it as a size_t)."""
    return None if value is None else check_int(value, name, below=1 << 63)

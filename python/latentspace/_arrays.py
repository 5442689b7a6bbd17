"""Every input check and conversion, in one place.

Arrays enter latentspace as numpy arrays or torch CPU tensors and leave as the same type.
A C-contiguous float32 input is handed to native code as is (torch tensors as a zero-copy
numpy view of the same memory); anything else is converted once:

* other real dtypes (float16, bfloat16, float64, integers) -> float32 copy;
* non-contiguous arrays (slices, transposes) -> C-contiguous copy.

Booleans, complex numbers, strings and objects are refused with a TypeError. NaN and Inf
are refused by the native code, which checks them in the same pass that computes norms.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import numpy as np

from . import _native

__all__ = [
    "ArrayKind",
    "as_matrix",
    "check_dim",
    "check_k",
    "check_rows_usable",
    "check_metric",
    "empty_results",
    "is_torch_tensor",
]

# What the caller passed, so results can be returned as the same type.
ArrayKind = str  # "numpy" or "torch"

METRICS = {"l2": 0, "ip": 1, "cosine": 2}


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to look
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_to_numpy(x: Any, name: str) -> np.ndarray:
    import torch

    if x.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a CPU tensor, got one on '{x.device}'; "
            f"the CUDA backend is not available yet, pass {name}.cpu()"
        )
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or _is_torch_int(x)):
        raise TypeError(f"{name}: expected a real numeric dtype (float32 preferred), got {x.dtype}")
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    return x.numpy()  # shares memory with the tensor


def _is_torch_int(x: Any) -> bool:
    import torch

    return x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_matrix(x: Any, name: str, *, dim: int | None = None) -> tuple[np.ndarray, ArrayKind]:
    """Returns x as a C-contiguous float32 (rows, dim) numpy array (a view when possible)
    and whether it came as numpy or torch. Raises TypeError / ValueError naming `name`."""
    if is_torch_tensor(x):
        kind: ArrayKind = "torch"
        if x.dim() != 2:
            raise ValueError(_rank_message(name, x.dim(), tuple(x.shape), dim))
        array = _torch_to_numpy(x, name)
    else:
        kind = "numpy"
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{name}: expected a 2-d numpy array or torch tensor, got {type(x).__name__}")
        array = np.asarray(x)
        if array.dtype.kind not in "fiu":
            raise TypeError(
                f"{name}: expected a real numeric dtype (float32 preferred), got {array.dtype}"
            )
        if array.ndim != 2:
            raise ValueError(_rank_message(name, array.ndim, array.shape, dim))
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=np.float32)
    if array.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns (the dimension), got shape {tuple(array.shape)}")
    return array, kind


def _rank_message(name: str, ndim: int, shape: tuple, dim: int | None) -> str:
    want = f"(n, {dim})" if dim is not None else "(n, dim)"
    hint = " (for one vector use x.reshape(1, -1))" if ndim == 1 else ""
    return f"{name}: expected a 2-d array of shape {want}, got {ndim}-d shape {tuple(shape)}{hint}"


def check_rows_usable(array: np.ndarray, name: str) -> None:
    """Raises ValueError naming `name` and the first bad row when a row of a float32 matrix
    holds NaN or Inf, or values so large that squared distances overflow float32. (Search
    checks this itself while it computes norms; indexes check it once, when vectors are added.)"""
    bad = _native.sq_norms(array, np.empty(array.shape[0], dtype=np.float32))
    if bad >= 0:
        raise ValueError(
            f"{name}: row {bad} contains NaN or Inf, or values so large that squared distances "
            "overflow float32 (squared norm above 4.2e37); clean or rescale the data"
        )


def check_dim(dim: Any) -> int:
    """A vector dimension: an integer >= 1."""
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")
    return int(dim)


def check_k(k: Any) -> int:
    """k must be an integer >= 1 (Python or numpy int; bool is refused)."""
    if isinstance(k, (bool, np.bool_)):
        raise TypeError(f"k: expected an integer >= 1, got {k!r}")
    try:
        value = operator.index(k)
    except TypeError:
        raise TypeError(f"k: expected an integer >= 1, got {type(k).__name__} {k!r}") from None
    if value < 1:
        raise ValueError(f"k: expected an integer >= 1, got {value}")
    return value


def check_metric(metric: Any) -> int:
    """Returns the native code of 'l2', 'ip' or 'cosine'."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric: expected one of 'l2', 'ip', 'cosine', got {metric!r}")
    return METRICS[metric]


def empty_results(kind: ArrayKind, rows: int, k: int):
    """Allocates (rows, k) float32 distances and int64 indices of the caller's type; returns
    them with numpy views of the same memory for native code to fill."""
    if kind == "torch":
        import torch

        distances = torch.empty((rows, k), dtype=torch.float32)
        indices = torch.empty((rows, k), dtype=torch.int64)
        return distances, indices, distances.numpy(), indices.numpy()
    distances = np.empty((rows, k), dtype=np.float32)
    indices = np.empty((rows, k), dtype=np.int64)
    return distances, indices, distances, indices

"""The row check and the squared norms of CUDA tensors on latentspace's own kernel
(csrc/cuda/norms.cu, `_native.sq_norms_cuda`): one read of the rows gives the first unusable
row (NaN, Inf, a squared norm above MAX_SQUARED_NORM, or with weights a weighted one) and, for
a GPU index's kept norms, every row's squared norm.

torch's ops do the same in several passes (_arrays.unusable_row_flag): they write the rows'
squares to a temporary (NORM_BYTES_PER_STEP of rows at a time), read it back to sum it, and
launch half a dozen more kernels, about three passes over a database for each check. A
`latentspace.knn` of CUDA tensors checks its database at every call.

Which implementation CUDA tensors get: LATENTSPACE_CUDA_ROW_CHECK, read at every check
(_cuda_switch.choose_backend): "native" (the kernel), "torch" (torch's ops), unset / "" /
"auto" DEFAULT_BACKEND: "native" since GPU run 12 verified the kernel (H200: its GPU tests
passed, memcheck clean) and timed it 3.1x torch's ops on a 1M x 128 database, 2.3x faster on
a single query's latentspace.knn (docs/gpu-runs.md); a build without CUDA kernels, or a GPU
none of them runs on, gets "torch" (_cuda_switch.choose_backend).
"""

from __future__ import annotations

from typing import Any

from . import _native
from ._arrays import NORM_BYTES_PER_STEP
from ._cuda_search import storage_code
from ._cuda_switch import choose_backend

__all__ = ["BACKEND_VARIABLE", "DEFAULT_BACKEND", "backend", "takes", "first_unusable_row", "squared_norms_into"]

BACKEND_VARIABLE = "LATENTSPACE_CUDA_ROW_CHECK"
DEFAULT_BACKEND = "native"


def backend() -> str:
    """"native" or "torch": the implementation LATENTSPACE_CUDA_ROW_CHECK asks for now."""
    return choose_backend(BACKEND_VARIABLE, DEFAULT_BACKEND)


def _kernel_reads(tensor: Any) -> bool:
    """Whether the kernel can read this tensor: a C-contiguous 2-d CUDA tensor of float32,
    float16 or bfloat16 with at least one column (it reads the pointer as packed rows)."""
    import torch

    return (tensor.device.type == "cuda" and tensor.dim() == 2 and tensor.shape[1] >= 1
            and tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) and tensor.is_contiguous())


def takes(tensor: Any) -> bool:
    """Whether the kernel checks this tensor: one it can read (_kernel_reads), while the
    backend is "native"."""
    return _kernel_reads(tensor) and backend() == "native"


def first_unusable_row(tensor: Any, first_row: int = 0, weights: Any = None, norms_out: Any = None) -> Any:
    """first_row + the first unusable row of `tensor` (takes(tensor) must hold), or -1, as a
    0-d int64 tensor on its device; queued on torch's current stream there, nothing waits.
    weights: dim values (numpy or torch), also refusing a weighted squared norm too large.
    norms_out: None, or a contiguous float32 tensor of one value per row on the same device,
    which gets the rows' squared norms."""
    import torch

    if not _kernel_reads(tensor):
        # (a host or strided tensor would be read wrong or fault; every caller asks takes() first)
        raise ValueError(f"tensor: expected a contiguous 2-d float32, float16 or bfloat16 CUDA tensor with at least "
                         f"one column, got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
                         f"{'' if tensor.is_contiguous() else ', not contiguous'}")
    rows, dim = tensor.shape
    device = tensor.device
    # resolve_neg: a lazily negated view's storage holds the values un-negated (the kernel
    # reads the storage; torch's ops apply the bit)
    w = None if weights is None else \
        torch.as_tensor(weights, dtype=torch.float32, device=device).resolve_neg().contiguous()
    if w is not None and w.shape != (dim,):
        raise ValueError(f"weights: expected {dim} values (one per column), got shape {tuple(w.shape)}")
    if norms_out is not None:
        if (norms_out.device != device or norms_out.dtype != torch.float32 or norms_out.shape != (rows,)
                or not norms_out.is_contiguous()):
            raise ValueError(f"norms_out: expected a contiguous float32 tensor of shape ({rows},) on {device}, got "
                             f"{tuple(norms_out.shape)} {norms_out.dtype} on {norms_out.device}")
    with torch.cuda.device(device):
        flag = torch.empty((), dtype=torch.int64, device=device)
        # The weights' copy and the kernel are queued on the same stream: the copy has landed
        # before the kernel reads it, and its memory is not handed out again before the kernel
        # is done (the caching allocator reuses a block on its own stream, in stream order).
        _native.sq_norms_cuda(tensor.data_ptr(), rows, dim, storage_code(tensor.dtype),
                              0 if w is None else w.data_ptr(), int(first_row),
                              0 if norms_out is None else norms_out.data_ptr(), flag.data_ptr(),
                              torch.cuda.current_stream(device).cuda_stream)
    return flag


def squared_norms_into(rows: Any, out: Any) -> None:
    """out[i] = sum_d rows[i, d]^2 in float32 for a 2-d tensor of float32 / float16 / bfloat16
    rows on a GPU and a float32 tensor `out` of one value per row beside them: one read of the
    rows on the kernel (takes(rows)), or torch's ops NORM_BYTES_PER_STEP of rows at a time."""
    if takes(rows) and out.is_contiguous():
        first_unusable_row(rows, norms_out=out)  # (the flag: rows are checked where they come in)
        return
    step = max(1, NORM_BYTES_PER_STEP // (max(1, rows.shape[1]) * 4))
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = rows[start : start + step].float().square().sum(dim=1)

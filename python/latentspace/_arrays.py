"""Every input check and conversion, in one place.

Arrays enter latentspace as numpy arrays or torch tensors and leave as the same type.
A C-contiguous float32 input is handed to native code as is (torch tensors as a zero-copy
numpy view of the same memory); anything else is converted once:

* other real dtypes (float16, bfloat16, float64, integers) -> float32 copy;
* non-contiguous arrays (slices, transposes) -> C-contiguous copy.

Booleans, complex numbers, strings and objects are refused with a TypeError. NaN and Inf
are refused by the native code, which checks them in the same pass that computes norms.

A search on the CPU of CUDA tensors (device="cpu") copies them to the host first. A search
on a GPU (_cuda_search.py) takes its inputs as float32 tensors on the device
(as_device_matrix, same checks and messages) and checks NaN / Inf there (unusable_row_flag).
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import numpy as np

from . import _native
from ._host_memory import is_writable
from ._memory_limit import memory_limit

__all__ = [
    "STORED_ROWS_NAME",
    "ArrayKind",
    "as_labels",
    "as_matrix",
    "as_model_input",
    "as_output",
    "check_float",
    "check_bool",
    "check_int",
    "check_real_dtype",
    "check_sample_shape",
    "resolve_device",
    "CudaUnavailableError",
    "numpy_to_tensor",
    "numpy_to_private_tensor",
    "check_apart",
    "DIM_BELOW",
    "check_dim",
    "detached",
    "check_k",
    "check_rows_usable",
    "check_metric",
    "empty_results",
    "is_torch_tensor",
    "as_device_matrix",
    "as_host_matrix",
    "check_rows_usable_flags",
    "check_weighted_rows",
    "first_refused_row",
    "native_knn",
    "database_row_check",
    "query_row_checks",
    "raise_unusable_rows",
    "refuse_masked",
    "host_to_tensor",
    "unusable_row_flag",
    "as_float64_matrix",
    "as_scores",
    "empty_vector_buffer",
]

# What the caller passed, so results can be returned as the same type.
ArrayKind = str  # "numpy" or "torch"

# Metric name -> native code. "weighted_l2" is the l2 kernel given per-dimension weights.
METRICS = {"l2": 0, "ip": 1, "cosine": 2, "weighted_l2": 0}


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to look
    return torch is not None and isinstance(x, torch.Tensor)


def detached(x: Any):
    """x.detach() holding its values in memory: a tensor with torch's neg bit set (z.conj().imag
    of a complex z) is a lazy negation, which .numpy() refuses and native code reading its
    memory (by address, on a GPU) would search un-negated; it is materialised (a copy)."""
    return x.detach().resolve_neg()


def _torch_to_numpy(x: Any, name: str) -> np.ndarray:
    import torch

    check_real_dtype(x, name)
    x = detached(x)
    if x.device.type == "cuda":
        x = x.cpu()  # a search on the CPU (device="cpu") of CUDA tensors: copied to the host
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    return x.numpy()  # shares memory with the tensor


def _is_torch_int(x: Any) -> bool:
    import torch

    # (uint16 / uint32 / uint64 since torch 2.3: numpy's unsigned arrays are taken too)
    unsigned = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))
    return x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *unsigned)


def refuse_masked(x: Any, name: str) -> None:
    """TypeError naming `name` for a masked array with masked entries: np.asarray keeps the
    masked entries' values and drops the mask, so they would count as data."""
    if isinstance(x, np.ma.MaskedArray) and np.ma.getmaskarray(x).any():
        raise TypeError(f"{name}: a masked array with masked entries (its mask would be ignored); pass "
                        f"{name}.filled(value), or only the rows without masked entries")


def _real_numpy(x: Any, name: str, expected: str) -> np.ndarray:
    """np.asarray(x), refusing strings, None and non-real dtypes with a TypeError naming `name`."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}: expected {expected}, got {type(x).__name__}")
    refuse_masked(x, name)
    try:
        array = np.asarray(x)
    except ValueError as error:  # a ragged nested list: numpy's message names no argument
        raise ValueError(f"{name}: expected rows of equal length ({error})") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric dtype (float32 preferred), got {array.dtype}")
    return array


def as_matrix(x: Any, name: str, *, dim: int | None = None,
              dim_of: str = "the dimension") -> tuple[np.ndarray, ArrayKind]:
    """Returns x as a C-contiguous float32 (rows, dim) numpy array (a view when possible)
    and whether it came as numpy or torch. Raises TypeError / ValueError naming `name`
    (dim_of: whose dimension dim is, for that message, e.g. "the queries' dimension")."""
    if is_torch_tensor(x):
        kind: ArrayKind = "torch"
        if x.dim() != 2:
            raise ValueError(_rank_message(name, x.dim(), tuple(x.shape), dim))
        array = _torch_to_numpy(x, name)
    else:
        kind = "numpy"
        array = _real_numpy(x, name, "a 2-d numpy array or torch tensor")
        if array.ndim != 2:
            raise ValueError(_rank_message(name, array.ndim, array.shape, dim))
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            with np.errstate(over="ignore"):  # values past float32 become inf: refused by the row checks, by name
                array = np.ascontiguousarray(array, dtype=np.float32)
    if array.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns ({dim_of}), got shape {tuple(array.shape)}")
    return array, kind


def _rank_message(name: str, ndim: int, shape: tuple, dim: int | None) -> str:
    want = f"(n, {dim})" if dim is not None else "(n, dim)"
    hint = " (for one vector use x.reshape(1, -1))" if ndim == 1 else ""
    return f"{name}: expected a 2-d array of shape {want}, got {ndim}-d shape {tuple(shape)}{hint}"


def check_rows_usable(array: np.ndarray, name: str, *, first_row: int = 0, weights: np.ndarray | None = None) -> None:
    """Raises ValueError naming `name` and the first bad row when a row of a float32 matrix
    holds NaN or Inf, or values so large that squared distances overflow float32. (Search
    checks this itself while it computes norms; indexes check it once, when vectors are added.)
    first_row: the row number of array[0] in the caller's data (a chunk of a file), for the message.
    weights: (dim,) float32 weighted_l2 weights: also a squared norm scaled by them above
    MAX_SQUARED_NORM, in the CPU kernel's weighted words."""
    bad = first_unusable_row(array)
    if bad >= 0:
        raise ValueError(f"{name}: row {first_row + bad} {BAD_ROW_WORDS}")
    if weights is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            heavy = np.flatnonzero(~((array * array) @ weights <= MAX_SQUARED_NORM))
        if heavy.size:
            raise ValueError(f"{name}: row {first_row + int(heavy[0])} {_BAD_WEIGHTED_ROW}")


def first_unusable_row(array: np.ndarray) -> int:
    """The first row of a C-contiguous float32 matrix that check_rows_usable refuses, or -1."""
    return _native.sq_norms(array, np.empty(array.shape[0], dtype=np.float32)) if array.shape[0] else -1


# The bound that picks the rows weighted_overflow_row sums again allows for the rounding of
# both float32 sums (relative error at most about dim * 2**-24 each) with a factor 2, which
# covers it up to this many dimensions; wider rows are all summed again.
_BOUND_DIMS = 1 << 20


def weighted_overflow_row(rows: np.ndarray, weights: np.ndarray, name: str, first_row: int = 0) -> int:
    """The first row of a C-contiguous float32 matrix whose squared norm scaled by `weights`,
    sum_d w_d x_d^2, is above what a search can use (MAX_SQUARED_NORM), or -1, when no row
    before it is unusable as it is (NaN, Inf, plain overflow): then that row raises
    check_rows_usable's ValueError, naming `name` and the row (first_row + r). Either way the
    first refused row in row order, whichever its kind."""
    plain, heavy = refused_rows(rows, weights)
    if heavy >= 0:  # (refused_rows looks for it before the plain row only)
        return heavy
    if plain >= 0:
        raise ValueError(f"{name}: row {first_row + plain} {BAD_ROW_WORDS}")  # check_rows_usable's words
    return -1


def first_refused_row(rows: np.ndarray, weights: np.ndarray) -> int:
    """The first row of a C-contiguous float32 matrix that a weighted_l2 search refuses, in row
    order, whichever its kind (NaN, Inf, a plain or weighted squared norm past MAX_SQUARED_NORM),
    or -1: the row a combined unusable_row_flag(..., weights=) names. Never raises."""
    plain, heavy = refused_rows(rows, weights)
    return heavy if heavy >= 0 else plain  # (heavy is before plain)


def refused_rows(rows: np.ndarray, weights: np.ndarray) -> tuple[int, int]:
    """(plain, heavy) for a C-contiguous float32 matrix and weighted_l2 weights: the first row
    unusable as it is (NaN, Inf, a plain squared norm past MAX_SQUARED_NORM), and the first
    row before it (before the end when there is none) whose squared norm scaled by the
    weights, sum_d w_d x_d^2, is past MAX_SQUARED_NORM; -1 for none. Never raises.

    Costs one read of the rows (their plain squared norms, as check_rows_usable computes
    them) and a pass over the norms: |x|_w^2 <= max(w) |x|^2, so only the rows whose bound
    passes the limit can, and only they are summed again, exactly (float32 squares times w,
    as the GPU's check sums them)."""
    if rows.shape[0] == 0:
        return -1, -1
    norms = np.empty(rows.shape[0], dtype=np.float32)
    plain = _native.sq_norms(rows, norms)
    if plain >= 0:  # the rows after it do not matter: the search names this one first
        rows, norms = rows[:plain], norms[:plain]
    return plain, _first_heavy_row(rows, norms, weights)


def _first_heavy_row(rows: np.ndarray, norms: np.ndarray, weights: np.ndarray) -> int:
    """refused_rows' heavy row among usable rows, from their plain squared norms."""
    if rows.shape[0] == 0:
        return -1
    largest = float(weights.max(initial=0.0))
    if largest == 0.0:
        return -1
    slack = 2.0 if rows.shape[1] <= _BOUND_DIMS else np.inf
    threshold = MAX_SQUARED_NORM / (largest * slack)  # (0 for an infinite slack: every row)
    if threshold >= MAX_SQUARED_NORM:
        return -1  # no usable plain norm passes it
    suspects = np.flatnonzero(norms > np.float32(threshold))
    if suspects.size == 0:
        return -1
    with np.errstate(over="ignore", invalid="ignore"):
        weighted = np.square(rows[suspects]) @ weights
    over = np.flatnonzero(~(weighted <= MAX_SQUARED_NORM))  # (an inf product passes too)
    return int(suspects[over[0]]) if over.size else -1


def check_weighted_rows(rows: np.ndarray, weights: np.ndarray, name: str, first_row: int = 0) -> None:
    """The weighted search's check of a float32 matrix: ValueError naming `name` and the first
    refused row (first_row + r) in row order, whichever its kind, in the CPU kernel's weighted
    words (they cover both kinds, as the device's combined check does). One read of the rows
    (refused_rows)."""
    start = 0
    while (row := first_refused_row(rows[start:], weights)) >= 0:
        row += start
        if first_unusable_row(rows[row : row + 1]) < 0:
            # Only the weights refuse it. Summed in another order, a row within an ulp of the
            # limit may pass here: then the kernel, which has the last word, decides for it,
            # and the rows after it are still checked.
            with np.errstate(over="ignore", invalid="ignore"):
                if float((rows[row] * rows[row]) @ weights) <= MAX_SQUARED_NORM:
                    start = row + 1
                    continue
        raise ValueError(f"{name}: row {first_row + row} {_BAD_WEIGHTED_ROW}")


# What a FlatIndex search names for a stored vector that the search's weights make unusable
# (add refused any the index's own weights do): the argument to change, and where the row is.
STORED_ROWS_NAME = "weights (the index's vectors)"


def native_knn(queries: np.ndarray, database: np.ndarray, k: int, code: int, distances: np.ndarray,
               indices: np.ndarray, weights: np.ndarray | None, *, database_name: str = "database") -> None:
    """_native.knn, whose weighted refusal names the first refused row in row order, queries
    first, in the weighted words, as every other path does. (The kernel checks all queries as
    they are before it weighs any, and a panel of database rows for NaN before it weighs them:
    it may name a later row. Read again only when it refuses one.) database_name: what the
    refusal of a database row names (the kernel's own words say "database")."""
    try:
        _native.knn(queries, database, k, code, distances, indices, weights)
    except ValueError:
        if weights is not None:
            check_weighted_rows(queries, weights, "queries")
            check_weighted_rows(database, weights, database_name)
        raise


# The CPU kernel's words (csrc/cpu/knn.cpp, kBadRowMessage / kBadWeightedRowMessage).
BAD_ROW_WORDS = ("contains NaN or Inf, or values so large that squared distances overflow float32 (squared norm "
            "above 4.2e37); clean or rescale the data")
_BAD_WEIGHTED_ROW = ("contains NaN or Inf, or values so large that squared distances overflow float32 (squared "
                     "norm, plain or scaled by the weights, above 4.2e37); clean or rescale the data, or lower "
                     "the weights")


# A vector's bytes (dim * 4) times any row count must fit in an int64, as numpy, the native
# kernels and the index file format (indexes/io.py) count them.
DIM_BELOW = 1 << 61


def check_dim(dim: Any) -> int:
    """A vector dimension: an integer in [1, DIM_BELOW)."""
    return check_int(dim, "dim", below=DIM_BELOW)


def check_k(k: Any) -> int:
    """k must be an integer >= 1 (Python or numpy int; bool is refused)."""
    return check_int(k, "k")


def check_metric(metric: Any) -> int:
    """Returns the native code of 'l2', 'ip', 'cosine' or 'weighted_l2'."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric: expected one of 'l2', 'ip', 'cosine', 'weighted_l2', got {metric!r}")
    return METRICS[metric]


def is_ascending(metric: str) -> bool:
    """Distances (l2, weighted_l2) sort ascending, similarities (ip, cosine) descending."""
    return METRICS[metric] == 0


def check_weights(weights: Any, dim: int) -> np.ndarray:
    """Per-dimension influence weights: (dim,) real, finite, >= 0; returns a float32 copy (so
    that changing the caller's array later changes nothing here)."""
    if is_torch_tensor(weights):
        check_dense(weights, "weights")
        weights = detached(weights).cpu().numpy()
    array = _real_numpy(weights, "weights", "a 1-d array of per-dimension weights")
    if array.ndim != 1 or array.shape[0] != dim:
        raise ValueError(f"weights: expected {dim} values (one per dimension), got shape {tuple(array.shape)}")
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):  # beyond float32: inf, refused below
        weights32 = np.array(array, dtype=np.float32)  # always a copy
    bad = ~np.isfinite(weights32) | (weights32 < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"weights: expected finite values >= 0, got {weights32[i]} at index {i}")
    # A positive weight below float32's smallest (1e-46, say) became 0: its dimension silently
    # dropped, every distance 0 where all were so small.
    vanished = (weights32 == 0) & (array > 0)
    if vanished.any():
        i = int(np.flatnonzero(vanished)[0])
        raise ValueError(f"weights: {float(array[i])!r} at index {i} is below float32's smallest positive value "
                         f"({np.finfo(np.float32).smallest_subnormal:.3g}) and would act as 0; pass 0 to drop "
                         "that dimension, or scale the weights up (distances scale with them)")
    return weights32


def weights_for(metric: str, weights: Any, dim: int, default: np.ndarray | None = None) -> np.ndarray | None:
    """The weights a search uses: for metric 'weighted_l2', `weights` checked (or `default`,
    an index's own); None for the other metrics, which refuse weights."""
    if metric != "weighted_l2":
        if weights is not None:
            raise ValueError(f"weights: only metric='weighted_l2' takes weights (this search uses {metric!r})")
        return None
    if weights is None:
        if default is None:
            raise ValueError("weights: metric='weighted_l2' needs weights, one non-negative value per dimension")
        return default
    return check_weights(weights, dim)


def empty_results(kind: ArrayKind, rows: int, k: int):
    """Allocates (rows, k) float32 distances and int64 indices of the caller's type; returns
    them with numpy views of the same memory for native code to fill. Raises ValueError
    naming k when they could never be allocated, MemoryError naming k when they exceed the
    memory this process may use (_memory_limit) (numpy and torch allocate lazily: filling them got the process killed) or
    cannot be allocated now."""
    nbytes = max(rows, 1) * k * 12  # max(rows, 1): numpy refuses a (0, 2**62) array too
    if nbytes > sys.maxsize:
        raise ValueError(f"k: {rows} queries x k={k} results need {nbytes:.3g} bytes, more than any "
                         "address space; lower k")
    memory, needed = memory_limit(), rows * k * 12  # (no queries need no memory, whatever k)
    if memory is not None and needed > memory.nbytes:  # lazily allocated, then killed while being filled
        raise MemoryError(f"k: {rows} queries x k={k} results need {needed / 2**30:,.1f} GiB, more than "
                          f"{memory}; lower k")
    try:
        if kind == "torch":
            import torch

            # device="cpu": filled by the CPU kernels through numpy views, whatever
            # torch.set_default_device says
            distances = torch.empty((rows, k), dtype=torch.float32, device="cpu")
            indices = torch.empty((rows, k), dtype=torch.int64, device="cpu")
            return distances, indices, distances.numpy(), indices.numpy()
        distances = np.empty((rows, k), dtype=np.float32)
        indices = np.empty((rows, k), dtype=np.int64)
        return distances, indices, distances, indices
    except (MemoryError, RuntimeError) as error:  # torch's CPU allocator raises RuntimeError
        raise MemoryError(f"k: {rows} queries x k={k} results need {nbytes / 2**30:,.1f} GiB, which cannot be "
                          f"allocated; lower k ({error})") from None


# ---------------------------------------------------------------------------------------
# Search on a GPU: the same checks, with the data held as torch tensors on a device.

# The largest squared norm a row may have (csrc/ops/norms.h kMaxSquaredNorm = FLT_MAX / 8):
# below it, every distance the search computes stays finite.
MAX_SQUARED_NORM = float(np.float32(3.4028234e38) / np.float32(8.0))
_NORM_ROWS_PER_STEP = 1 << 22  # rows whose norms are computed at once (16 MiB of norms)
# ... and at most this many bytes of rows, whose squares torch's ops hold at once (a step of
# 4 Mi rows of 1,024 dimensions squared 16 GiB at once before).
NORM_BYTES_PER_STEP = 256 << 20
# Tensors of at most this many elements (64 KiB of float32: a few queries) are checked on the
# host: one small copy and the CPU's check, instead of the device check's dozen small torch
# launches, which took 160-250 us of a single-query search's 380-860 us (GPU run 7's profile,
# docs/benchmarks.md; the host check's own time on a GPU is not yet measured). Only without
# weights: the weighted check stays on the device.
_HOST_CHECK_ELEMENTS = 1 << 14


def as_host_matrix(x: Any, name: str, *, dim: int | None = None, dim_of: str = "the dimension") -> np.ndarray:
    """x as a 2-d numpy array of a real dtype, checked like as_matrix but NOT converted: a
    numpy array (or memory map) is returned as is, so that a caller streaming it in chunks
    converts one chunk at a time; a torch tensor becomes float32 numpy (a CPU tensor's own
    memory when it is float32 and contiguous)."""
    if is_torch_tensor(x):
        return as_matrix(x, name, dim=dim)[0]
    array = _real_numpy(x, name, "a 2-d numpy array or torch tensor")
    if array.ndim != 2:
        raise ValueError(_rank_message(name, array.ndim, array.shape, dim))
    if array.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns ({dim_of}), got shape {tuple(array.shape)}")
    return array


def as_device_matrix(x: Any, name: str, device: Any, *, dim: int | None = None, keep_half: bool = False,
                     dim_of: str = "the dimension"):
    """Returns (tensor, kind): x as a C-contiguous float32 (rows, dim) torch tensor on
    `device`, and whether it came as numpy or torch. Same checks and messages as as_matrix.

    A float32 contiguous tensor already on `device` is used as is (no copy). Anything else
    is copied once: to the device, and / or to float32 (float16, bfloat16, float64 and
    integer tensors), and / or to contiguous memory (slices, transposes). keep_half: float16
    and bfloat16 tensors keep their dtype (a GPU database read in its stored precision)."""
    import torch

    if not is_torch_tensor(x):
        array, kind = as_matrix(x, name, dim=dim)
        return host_to_tensor(array).to(device), kind
    if x.dim() != 2:
        raise ValueError(_rank_message(name, x.dim(), tuple(x.shape), dim))
    check_real_dtype(x, name)
    if x.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns ({dim_of}), got shape {tuple(x.shape)}")
    keep = keep_half and x.dtype in (torch.float16, torch.bfloat16)
    tensor = detached(x).to(device=device, dtype=x.dtype if keep else torch.float32)  # no-op when already there
    return tensor.contiguous(), "torch"


def host_to_tensor(array: np.ndarray):
    """A torch CPU tensor over a float32 numpy array's memory, for copying elsewhere (to a
    device or a pinned buffer): never written through, so a read-only array (a memory map)
    is wrapped without a copy and without torch's warning about non-writable arrays."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def unusable_row_flag(tensor: Any, first_row: int = 0, weights: Any = None):
    """The index (first_row + r) of the first unusable row r of an (n, dim) tensor (float32, or
    float16 / bfloat16 storage, checked in float32), or -1, as a 0-d int64 tensor on the
    tensor's device: nothing waits for the device (read it with .item() when it is needed),
    except where torch's ops would check a tensor of at most _HOST_CHECK_ELEMENTS elements: it
    is checked on the host (its flag is a host tensor). Unusable as in check_rows_usable: NaN,
    Inf, or a squared norm above MAX_SQUARED_NORM; with weights (dim values, numpy or torch),
    also a weighted squared norm sum_d w_d x_d^2 above it, as the CPU kernel refuses for
    weighted_l2 (the GPU kernel trusts its caller: such a row would give NaN distances). On a GPU, the check is
    latentspace's kernel (one read of the rows) where _cuda_row_check.takes the tensor
    (LATENTSPACE_CUDA_ROW_CHECK native or, since GPU run 12, unset), or else torch's ops, at most NORM_BYTES_PER_STEP
    bytes of rows squared at once."""
    import torch

    from . import _cuda_row_check  # (not at the top: it imports this module)

    if _cuda_row_check.takes(tensor):
        # One launch, nothing waits: even a single query's check is read only once the search
        # is queued (search_then_check), where the host check below waits for its copy first.
        return _cuda_row_check.first_unusable_row(detached(tensor), first_row, weights)
    if weights is None and tensor.numel() <= _HOST_CHECK_ELEMENTS:
        # A few rows (a single query, say): read to the host and checked there, by the CPU's
        # own check, as a 0-d tensor on the host (raise_unusable_rows reads both kinds): one
        # copy and a wait, where torch's ops launch a dozen kernels for one row.
        bad = first_unusable_row(np.ascontiguousarray(detached(tensor).to("cpu", torch.float32).numpy()))
        return torch.tensor(-1 if bad < 0 else first_row + bad)
    none = torch.iinfo(torch.int64).max
    first = torch.full((), none, dtype=torch.int64, device=tensor.device)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=tensor.device)
    step = max(1, min(_NORM_ROWS_PER_STEP, NORM_BYTES_PER_STEP // (max(1, tensor.shape[1]) * 4)))
    for start in range(0, tensor.shape[0], step):
        rows = tensor[start : start + step].float()  # half storage: norms in float32
        # NaN compares false, and an overflowing square is +inf: both count as unusable. The
        # float32 sum of squares, as the CPU kernel checks it (a norm squared again rounded
        # 15-20% of rows within 3e-7 of the limit to the other side); the order of the sum
        # can still differ from the CPU's by an ulp.
        if w is None:
            bad = ~(rows.square().sum(dim=1) <= MAX_SQUARED_NORM)
        else:  # one pass of squares for both norms
            squares = rows.square()
            bad = ~(squares.sum(dim=1) <= MAX_SQUARED_NORM) | ~((squares @ w) <= MAX_SQUARED_NORM)
        position = torch.arange(start, start + rows.shape[0], device=tensor.device)
        first = torch.minimum(first, torch.where(bad, position, none).min())
    return torch.where(first == none, -1, first + first_row)


def check_rows_usable_flags(flags: list, names: list[str]) -> None:
    """Reads unusable_row_flag results (one wait for the device) and raises ValueError, as
    check_rows_usable does, for the first name whose flag found an unusable row."""
    raise_unusable_rows([(flag, name, False) for flag, name in zip(flags, names)])


def query_row_checks(queries: Any, weights: Any = None, first_row: int = 0) -> list[tuple]:
    """The (flag, "queries", weighted) check of queries for raise_unusable_rows: with weights, one
    flag for rows unusable as they are or weighted (the first in row order, whichever its kind),
    named in the weighted words, as database_row_check's and the CPU search's."""
    return [(unusable_row_flag(queries, first_row, weights), "queries", weights is not None)]


def database_row_check(rows: Any, weights: Any = None, first_row: int = 0, name: str = "database") -> tuple:
    """The (flag, name, weighted) check of database rows: with weights, one flag for rows
    unusable as they are or weighted, named in the weighted words (as the CPU kernel does)."""
    return unusable_row_flag(rows, first_row, weights), name, weights is not None


def raise_unusable_rows(checks: list[tuple]) -> None:
    """Reads (flag, name, weighted) checks (one wait for the device) and raises ValueError, in
    the CPU kernel's words (its weighted_l2 ones where weighted), for the first check whose
    flag found an unusable row."""
    import torch

    if not checks:
        return
    on_device = [flag for flag, _, _ in checks if flag.device.type != "cpu"]
    device_rows = iter(torch.stack(on_device).tolist() if on_device else [])  # one wait for the device
    rows = [next(device_rows) if flag.device.type != "cpu" else int(flag) for flag, _, _ in checks]
    for row, (_, name, weighted) in zip(rows, checks):
        if row >= 0:
            raise ValueError(f"{name}: row {row} {_BAD_WEIGHTED_ROW if weighted else BAD_ROW_WORDS}")


# ---------------------------------------------------------------------------------------
# Models and training: tensors in the model's dtype and device, scalar arguments.


def as_model_input(x: Any, name: str, *, sample_shapes: tuple[tuple[int, ...], ...],
                   dtype: Any, device: Any) -> tuple[Any, ArrayKind]:
    """Returns x as a torch tensor of `dtype` on `device`, and whether it came as numpy or
    torch.

    x must be a numpy array or torch tensor of shape (n, *s) for one of the accepted
    per-sample shapes `s` (the first is the one named in errors). Other real dtypes are
    converted; a torch tensor keeps its autograd graph (the conversion is differentiable).
    A torch tensor must already be on `device` (as in torch, nothing moves silently);
    numpy arrays are copied there (always a copy: the model may work in place, and a numpy
    caller's array is never written to). Raises TypeError / ValueError naming `name`.
    """
    import torch

    if not is_torch_tensor(x):
        array = _real_numpy(x, name, "a numpy array or torch tensor")
        check_sample_shape(tuple(array.shape), name, sample_shapes)
        return numpy_to_private_tensor(array, dtype, device), "numpy"
    if x.device != torch.device(device):
        raise ValueError(
            f"{name}: expected a tensor on the model's device '{torch.device(device)}', got one "
            f"on '{x.device}'; pass {name}.to('{torch.device(device)}')"
        )
    check_real_dtype(x, name)
    check_sample_shape(tuple(x.shape), name, sample_shapes)
    return x.to(device=device, dtype=dtype), "torch"


def check_sample_shape(shape: tuple[int, ...], name: str, sample_shapes: tuple[tuple[int, ...], ...]) -> None:
    """Refuses a shape other than (n, *s) for one of the per-sample shapes (the first is the
    one named in the error)."""
    if len(shape) == 0 or tuple(shape[1:]) not in sample_shapes:
        want = " or ".join("(n, " + ", ".join(map(str, s)) + ")" for s in sample_shapes)
        hint = " (for one sample use x.reshape(1, -1))" if len(shape) == 1 else ""
        raise ValueError(f"{name}: expected shape {want}, got {tuple(shape)}{hint}")


def numpy_to_tensor(array: np.ndarray):
    """A torch CPU tensor sharing the array's memory when it is C-contiguous, writable and
    in the machine's byte order; a copy otherwise (torch has no read-only tensors: a
    read-only array, such as a memory map opened with mode "r", is never exposed as a
    writable tensor; and torch refuses big-endian arrays, which numpy converts). Long double,
    which has no torch twin, becomes a float64 copy."""
    import torch

    if array.dtype.kind == "f" and array.dtype.itemsize > 8:
        array = array.astype(np.float64)
    if array.flags.writeable and array.flags.c_contiguous and array.dtype.isnative:
        return torch.from_numpy(array)
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="), order="C"))


def numpy_to_private_tensor(array: np.ndarray, dtype: Any, device: Any):
    """A numpy array's values as a tensor of `dtype` on `device` that never shares the
    array's memory: a model may work in place (nn.ReLU(inplace=True)), and a numpy caller's
    array (or a memory map opened "r+") must not be written to. One copy at most.
    Integers go through float64 (exact below 2**53)."""
    converted = array.astype(np.float64) if array.dtype.kind in "iu" else array
    tensor = numpy_to_tensor(converted)
    shared = tensor.numel() > 0 and tensor.data_ptr() == array.ctypes.data  # still the caller's memory
    return tensor.to(device=device, dtype=dtype, copy=shared)


def check_real_dtype(x: Any, name: str) -> None:
    """Refuses booleans, complex numbers, strings and objects (numpy arrays or torch tensors),
    and sparse or nested torch tensors."""
    if is_torch_tensor(x):
        check_dense(x, name)
        ok = x.dtype != _torch_bool() and not x.is_complex() and (x.is_floating_point() or _is_torch_int(x))
    else:
        ok = x.dtype.kind in "fiu"
    if not ok:
        raise TypeError(f"{name}: expected a real numeric dtype (float32 preferred), got {x.dtype}")


def check_dense(x: Any, name: str) -> None:
    """Refuses torch tensors that are not plain strided ones (sparse, nested), and tensors
    elsewhere than in CPU or CUDA memory (a 'meta' tensor has no data to read): torch's own
    errors for them (from .contiguous(), .numpy(), .cpu(), or sizes) name no argument."""
    import torch

    if x.device.type not in ("cpu", "cuda"):
        hint = " (a meta tensor holds no data)" if x.device.type == "meta" else f"; pass {name}.cpu()"
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on '{x.device}'{hint}")
    if x.is_nested:
        raise TypeError(f"{name}: expected a dense tensor, got a nested one")
    if x.layout != torch.strided:
        layout = str(x.layout).removeprefix("torch.")
        raise TypeError(f"{name}: expected a dense tensor, got a {layout} one; pass {name}.to_dense()")


def _torch_bool():
    import torch

    return torch.bool


def as_output(tensor: Any, kind: ArrayKind):
    """A model's result in the caller's type: the tensor itself for torch callers; for
    numpy callers a numpy array on the CPU, detached, of the model's dtype, except that
    bfloat16 (which numpy lacks) comes back as float32, which holds its values exactly."""
    if kind == "torch":
        return tensor
    import torch

    tensor = tensor.detach().to("cpu")
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def check_bool(value: Any, name: str) -> bool:
    """True or False (Python's or numpy's); anything else, 0 and None included, is a TypeError
    naming `name` (a string "no" would read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_int(value: Any, name: str, *, minimum: int = 1, below: int | None = None) -> int:
    """An integer >= minimum, and < below when given (Python or numpy int; bool is refused)."""
    wanted = f"an integer >= {minimum}" if below is None else f"an integer in [{minimum}, {below})"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected {wanted}, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected {wanted}, got {type(value).__name__} {value!r}") from None
    if result < minimum or (below is not None and result >= below):
        raise ValueError(f"{name}: expected {wanted}, got {result}")
    return result


def check_float(value: Any, name: str, *, minimum: float = 0.0, maximum: float = float("inf"),
                include_minimum: bool = True, include_maximum: bool = True) -> float:
    """A finite real number in the given range (bool is refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    result = float(value)
    low_ok = result >= minimum if include_minimum else result > minimum
    high_ok = result <= maximum if include_maximum else result < maximum
    if not (np.isfinite(result) and low_ok and high_ok):
        low = "[" if include_minimum else "("
        high = "]" if include_maximum else ")"
        raise ValueError(f"{name}: expected a finite number in {low}{minimum:g}, {maximum:g}{high}, got {value!r}")
    return result


def as_labels(labels: Any, name: str, n: int) -> np.ndarray:
    """Class labels: a 1-d integer array (numpy or torch) of length n, returned as int64 numpy."""
    torch_input = is_torch_tensor(labels)
    if torch_input:
        check_dense(labels, name)
        dtype = str(labels.dtype).removeprefix("torch.")
        labels = detached(labels).to("cpu")
        if labels.is_floating_point():
            labels = labels.double()  # (bfloat16 has no numpy dtype); refused below, by its own name
        labels = labels.numpy()
    refuse_masked(labels, name)
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        hint = ""
        if array.dtype.kind == "f" and array.ndim == 1 and np.isnan(array).any():
            hint = (f" containing NaN (row {int(np.flatnonzero(np.isnan(array))[0])}): drop the "
                    "unlabelled rows, or give them a class of their own")
        elif array.dtype.kind == "f":
            hint = f"; convert whole-number labels with {name}.long()" if torch_input else \
                f"; convert whole-number labels with {name}.astype(np.int64)"
        shown = dtype if torch_input else array.dtype
        raise TypeError(f"{name}: expected integer class labels, got dtype {shown}{hint}")
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) (one label per row), got {array.shape}")
    return array.astype(np.int64, copy=False)


class CudaUnavailableError(RuntimeError, ValueError):
    """CUDA asked for where it cannot run here (a build without CUDA, no usable GPU, torch
    without CUDA or seeing no GPU), the message naming why. Both a RuntimeError (what search
    raised) and a ValueError (what encode, train and load_model raised), so that either except
    clause catches it."""


def resolve_device(device: Any, *, allow_auto: bool = True):
    """A torch.device from 'cpu', 'cuda', 'cuda:N', a torch.device, or 'auto' (CUDA when
    torch sees a GPU, else the CPU). Refuses CUDA when torch sees no GPU."""
    import torch

    expected = ("'auto', " if allow_auto else "") + "'cpu', 'cuda' or 'cuda:N'"
    if allow_auto and isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected {expected}, got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected {expected}, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        alternatives = "'auto' or 'cpu'" if allow_auto else "'cpu'"
        raise CudaUnavailableError(f"device: {device!r} asked for, but torch sees no CUDA GPU; use {alternatives}")
    return resolved


# ---------------------------------------------------------------------------------------
# Encoding: chunks of rows in (numpy or torch, any real dtype), float32 codes out.


def check_rows(x: Any, name: str, sample_shapes: tuple[tuple[int, ...], ...] | None) -> None:
    """Refuses a chunk that is not a numpy array or torch tensor of real numbers shaped
    (n, *s) for one of `sample_shapes` (None: any shape with rows first, at least 2-d)."""
    if not isinstance(x, np.ndarray) and not is_torch_tensor(x):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    check_real_dtype(x, name)
    shape = tuple(x.shape)
    if sample_shapes is not None:
        check_sample_shape(shape, name, sample_shapes)
    elif len(shape) < 2:
        raise ValueError(f"{name}: expected rows of samples (at least 2-d, shape (n, ...)), got shape {shape}")


def rows_as_float32(x: Any) -> np.ndarray:
    """A checked chunk as a C-contiguous float32 numpy array: the chunk itself when it is
    one (a numpy array or a CPU tensor's memory), else a converted copy (a CUDA tensor is
    copied to the CPU). Values beyond float32's range become +-inf (and are then refused)."""
    if is_torch_tensor(x):
        import torch

        x = detached(x)
        if x.device.type != "cpu":
            x = x.to("cpu")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return x.contiguous().numpy()
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=np.float32)


def rows_as_tensor(x: Any, dtype: Any, device: Any):
    """A checked chunk as a torch tensor of `dtype` on `device`, detached (no autograd)."""
    if is_torch_tensor(x):
        # torch in: torch's semantics, no copy (but for a neg-bit view: native code on a GPU
        # reads the memory by address; see detached)
        return detached(x).to(device=device, dtype=dtype)
    return numpy_to_private_tensor(x, dtype, device)


def first_nonfinite_row(tensor: Any) -> int:
    """Index of the first row of a (n, ...) tensor holding NaN or Inf, -1 when there is none."""
    return first_false_row(finite_row_flags(tensor))


def finite_row_flags(tensor: Any):
    """Whether each row of a (n, ...) tensor is free of NaN and Inf: a bool tensor of n values
    on the tensor's device, queued there (nothing waits for the device)."""
    width = int(np.prod(tensor.shape[1:]))  # explicit: reshape(0, -1) is ambiguous to torch
    return tensor.reshape(tensor.shape[0], width).isfinite().all(dim=1)


def first_false_row(flags: Any) -> int:
    """Index of the first False in a bool tensor of row flags, -1 when there is none (one wait
    for the device, and a second only when there is one)."""
    bad = ~flags
    if not bool(bad.any()):
        return -1
    return int(bad.nonzero()[0, 0])


def _host_byte_span(x: Any) -> tuple[int, int] | None:
    """The [first, last) host addresses a numpy array's or CPU tensor's elements lie within,
    None when it has none there (empty, on a GPU, or not an array)."""
    if is_torch_tensor(x):
        if x.device.type != "cpu" or x.numel() == 0:
            return None
        start, shape, strides, itemsize = x.data_ptr(), x.shape, x.stride(), x.element_size()
        strides = [stride * itemsize for stride in strides]  # torch counts elements, numpy bytes
    elif isinstance(x, np.ndarray):
        if x.size == 0:
            return None
        start, shape, strides, itemsize = x.ctypes.data, x.shape, x.strides, x.itemsize
    else:
        return None
    reach = [(size - 1) * stride for size, stride in zip(shape, strides)]
    return (start + sum(r for r in reach if r < 0), start + sum(r for r in reach if r > 0) + itemsize)


def check_apart(x: Any, name: str, out: Any) -> None:
    """Refuses an `out` whose memory overlaps the input's (a numpy array or torch tensor, as
    given or a view of the same buffer): its codes would overwrite rows not yet read, and
    even out=X only works by accident of row order. As np.may_share_memory, by the bounds
    each occupies (an interleaving that never touches is refused too: never a wrong answer)."""
    a, b = _host_byte_span(x), _host_byte_span(out)
    if a is not None and b is not None and a[0] < b[1] and b[0] < a[1]:
        raise ValueError(f"out: shares memory with {name}; pass a separate array")


def check_out_tensor(out: Any, want: str) -> None:
    """The checks of a torch tensor as encode's `out` on any device: float32, no autograd,
    holding its own values, C-contiguous 2-d (`want`: the shape expected, for the message)."""
    import torch

    if out.dtype != torch.float32:
        raise TypeError(f"out: expected float32, got {out.dtype}")
    if out.requires_grad:
        raise ValueError("out: expected a tensor that does not require grad (encoding has no autograd)")
    if out.is_neg():  # its memory would hold -codes: written by address (or through .numpy())
        raise ValueError("out: expected a tensor holding its own values, got a negated view (neg bit set); "
                         "pass a plain tensor")
    if out.dim() != 2 or not out.is_contiguous():
        raise ValueError(f"out: expected a C-contiguous 2-d tensor of shape {want}, "
                         f"got shape {tuple(out.shape)}" + ("" if out.is_contiguous() else ", non-contiguous"))


def check_encode_out(out: Any, rows: int | None, dim: int | None) -> np.ndarray:
    """The writable float32 numpy view of an `out` argument: a numpy array (or memory map
    opened for writing) or a CPU torch tensor, float32, C-contiguous, shaped (rows, dim).
    rows / dim None: not known yet (checked by the caller as the codes arrive)."""
    want = f"({'n' if rows is None else rows}, {'latent_dim' if dim is None else dim})"
    if is_torch_tensor(out):
        if out.device.type != "cpu":  # (encode hands those to _encode_device_out.check_device_out)
            raise ValueError(f"out: expected a numpy array or a CPU tensor, got a tensor on '{out.device}'")
        check_out_tensor(out, want)
        # torch has no read-only flag: writing would fault. Its own allocations (resizable
        # storage: torch.empty, slices of it) are writable; memory it wraps (from_numpy,
        # frombuffer, from_file, torch.load(mmap=True)) is asked of the kernel. (Read before
        # .numpy(), which marks the storage not resizable.)
        own_allocation = out.untyped_storage().resizable()
        view = out.numpy()
        if not own_allocation and is_writable(view) is False:
            raise ValueError("out: the tensor's memory is read-only (e.g. torch.from_numpy of a read-only "
                             "array or memory map); pass a writable one")
    elif isinstance(out, np.ndarray):
        if out.dtype != np.float32:
            raise TypeError(f"out: expected float32, got {out.dtype}")
        if out.ndim != 2 or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous 2-d array of shape {want}, got shape {out.shape}"
                             + ("" if out.flags.c_contiguous else ", non-contiguous"))
        if not out.flags.writeable:
            raise ValueError("out: the array is read-only; pass a writable one")
        view = out
    else:
        raise TypeError(f"out: expected a float32 numpy array or torch tensor (CPU or CUDA), got {type(out).__name__}")
    if (rows is not None and view.shape[0] != rows) or (dim is not None and view.shape[1] != dim):
        raise ValueError(f"out: expected shape {want}, got {tuple(view.shape)}")
    if not view.flags.aligned:  # the native encoder refuses it too, but mid-stream: say so first
        raise ValueError("out: expected an aligned array (its address a multiple of 4 bytes, as any "
                         "allocation is; this one is a view at an odd byte offset); pass a freshly allocated one")
    return view


# ---------------------------------------------------------------------------------------
# Measuring a latent space (metrics.py, feature_relevance.py, plots.py): statistics in
# float64, per-dimension scores and weights.


def as_float64_matrix(x: Any, name: str, *, dim: int | None = None) -> np.ndarray:
    """x as a (rows, dim) float64 numpy array (statistics are summed in float64), checked
    like as_matrix (rank, real dtype, dim) and refused with a ValueError naming the first
    row that holds NaN or Inf."""
    if is_torch_tensor(x):
        if x.dim() != 2:
            raise ValueError(_rank_message(name, x.dim(), tuple(x.shape), dim))
        check_real_dtype(x, name)
        array = detached(x).to("cpu").double().numpy()
    else:
        array = _real_numpy(x, name, "a 2-d numpy array or torch tensor")
        if array.ndim != 2:
            raise ValueError(_rank_message(name, array.ndim, array.shape, dim))
        array = np.asarray(array, dtype=np.float64)
    if array.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns (the dimension), got shape {tuple(array.shape)}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise ValueError(f"{name}: row {bad[0]} contains NaN or Inf; clean the data first")
    return array


def as_scores(scores: Any, name: str = "scores", *, allow_inf: bool = False) -> np.ndarray:
    """One score per dimension: a non-empty 1-d array of real numbers, none NaN (nor +-Inf
    unless allow_inf: for ranking, where +inf is simply the best), returned as float64 numpy."""
    if is_torch_tensor(scores):
        check_real_dtype(scores, name)
        scores = detached(scores).to("cpu").double().numpy()
    array = _real_numpy(scores, name, "a 1-d array of per-dimension scores")
    if array.ndim != 1 or array.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty 1-d array (one score per dimension), got shape {array.shape}")
    array = array.astype(np.float64)
    bad = np.flatnonzero(np.isnan(array) if allow_inf else ~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}: dimension {bad[0]} has a non-finite score ({array[bad[0]]}); "
                         "replace it (e.g. np.nan_to_num(scores, posinf=scores[np.isfinite(scores)].max()))")
    return array


# Host vector buffers at least this large come from 2 MiB-aligned MADV_HUGEPAGE memory.
HUGE_BUFFER_BYTES = 4 << 20
_CACHE_LINE = 64


def empty_vector_buffer(rows: int, dim: int) -> np.ndarray:
    """An uninitialised, writable (rows, dim) float32 array for vectors that stay in host
    memory and are searched many times (FlatIndex's buffer). Its first element sits on a
    64-byte cache line (numpy's own large arrays start 16 bytes past a page, so that every
    64-byte load of a 512-byte row spans two lines); from HUGE_BUFFER_BYTES up it is 2 MiB
    aligned and marked MADV_HUGEPAGE (csrc/bindings/buffers.cpp; freed with the array, never
    cached). Without that allocator: a 64-byte aligned numpy array. MemoryError says how much
    it asked for (the allocators' own say "std::bad_alloc" or less)."""
    rows, dim = int(rows), int(dim)
    nbytes = rows * dim * 4
    try:
        return _aligned_float32(rows, dim, nbytes)
    except MemoryError:
        raise MemoryError(f"cannot allocate {nbytes / 2**30:,.1f} GiB of host memory for {rows:,} vectors of "
                          f"dimension {dim}") from None


def _aligned_float32(rows: int, dim: int, nbytes: int) -> np.ndarray:
    allocate = getattr(_native, "empty_huge_float32", None)
    if nbytes >= HUGE_BUFFER_BYTES and allocate is not None:
        return allocate(rows, dim, cached=False)
    if nbytes == 0:
        return np.empty((rows, dim), dtype=np.float32)
    spare = _CACHE_LINE // 4
    flat = np.empty(rows * dim + spare, dtype=np.float32)
    first = (-flat.ctypes.data % _CACHE_LINE) // 4
    return flat[first : first + rows * dim].reshape(rows, dim)

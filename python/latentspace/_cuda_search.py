"""Exact kNN on a CUDA GPU: the searches that run a plan of native calls, and the top-k merge.

The native kernel (csrc/cuda/knn.cu, `_native.knn_cuda`) searches C-contiguous float32
queries (Q, D) against a float32 database (N, D), both on the current CUDA device, into
preallocated (Q, k) float32 / int64 outputs, queued on a stream, with a workspace its caller
allocates. It trusts its caller for: finite inputs, N < 2^31 and Q * k < 2^31 per call. This
module is that caller, with two helpers beside it:

* _cuda_device: the device argument (resolve_device: None / "cpu" / "cuda" / "cuda:N" /
  torch.device -> None, the CPU, or a torch.device; a RuntimeError naming every reason when
  CUDA is asked for and unusable) and the byte budgets (check_budget).
* _cuda_chunks: pure functions that split a search into native calls (each call's workspace
  at most `workspace_bytes`, Q * k < 2^31) and a host database into chunks that fit a GPU
  memory budget, smaller ones first.

Here:
* merge_topk: the running top-k merged with one database chunk's top-k (a stable sort, so
  ties keep the lower index). Pure torch: works on CPU tensors as on CUDA ones.
* search_resident: database already on the device (queries chunked, the database split
  only past what one call takes); search_then_check: a search, then the row checks read
  (a GPU FlatIndex's).
* search_streamed: database in host memory, copied chunk by chunk through two pinned
  buffers on a side stream while the previous chunk is searched, results merged.
* knn_on_device: search.knn's entry, from the caller's arguments to results of the
  caller's kind.

The searches run on a "backend": CudaBackend (the native CUDA kernel on torch's current
stream) or CpuBackend, a stand-in running the same orchestration on CPU tensors with the
CPU kernel, so that chunking, streaming and merging are tested on machines without a GPU.

Memory (all from torch's caching allocator, nothing hidden):
* workspace: one `torch.empty(bytes, uint8)` per native call, at most `workspace_bytes`
  (default: DEFAULT_WORKSPACE_BYTES, or for a resident search what one call of all its
  queries needs, within 8 GiB and an eighth of the free device memory:
  resident_workspace_bytes); queries are searched in as many calls as that takes.
* host streaming: about `gpu_memory_bytes` (default: DEFAULT_GPU_MEMORY_BYTES or half the
  free device memory, whichever is smaller) for two database chunks, a block of queries and
  its results, plus the workspace; two pinned host buffers of one chunk each.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import _native
from ._arrays import (
    METRICS,
    as_device_matrix,
    as_host_matrix,
    as_matrix,
    check_k,
    check_metric,
    check_rows_usable,
    check_weighted_rows,
    database_row_check,
    first_refused_row,
    host_to_tensor,
    is_ascending,
    is_torch_tensor,
    query_row_checks,
    raise_unusable_rows,
    weights_for,
)
from ._cuda_chunks import (
    DEFAULT_GPU_MEMORY_BYTES,
    DEFAULT_WORKSPACE_BYTES,
    HOST_CHUNK_BYTES,
    MAX_ITEMS_PER_CALL,
    MOST_DEFAULT_WORKSPACE_BYTES,
    check_one_query_fits,
    default_workspace_bytes,
    first_stream_rows,
    plan_database_chunks,
    plan_host_stream,
    plan_query_chunks,
    plan_stream_chunks,
    rows_per_call,
)
from ._host_copy import copy_rows

__all__ = ["CHECK_AHEAD_QUERIES", "CpuBackend", "CudaBackend", "check_database_without_queries", "knn_on_device",
           "merge_topk", "resident_workspace_bytes", "search_resident", "search_streamed", "search_then_check"]

# From this many queries on, a weighted_l2 search streaming a host database checks each chunk on
# the host before the chunk is searched (_start_chunk), as the CPU search checks its database
# first from search.CHECK_FIRST_QUERIES queries: fewer queries search the database about as
# fast as the host copies it, so the check (one more read of each chunk) could add up to half
# the search again (its 256 MiB chunk's check took 0.4-1.5x the chunk's copy here, D = 256 to
# 8) to save what a search that ends in an error costs anyway; the device's check, read at
# the end, then names the row.
CHECK_AHEAD_QUERIES = 2048

_PAD = {"l2": float("inf"), "ip": float("-inf"), "cosine": float("-inf"), "weighted_l2": float("inf")}

# ---------------------------------------------------------------------------------------
# Merging


def merge_topk(running, chunk, k: int, metric: str, offset: int = 0):
    """Merges a database chunk's top-k into the running top-k of the chunks before it.

    running: None (no chunk yet) or (distances, indices), each (Q, r), as merge_topk returns.
    chunk: (distances, indices), (Q, c), best first, ties to the lower index, indices local
    to the chunk (-1 for padding; they get `offset`, the chunk's first row, added). Chunks
    must come in increasing order of offset. Returns the k best (or fewer: r + c) of both,
    best first (l2 ascending, ip / cosine descending); a stable sort keeps equal distances
    in the order running-then-chunk, that is, lower index first. Padding (+inf for l2,
    -inf for ip / cosine, index -1) sorts last. Works on CPU and CUDA tensors alike.
    """
    import torch

    distances, indices = chunk
    if offset:
        indices = torch.where(indices >= 0, indices + offset, indices)
    if running is None:
        return distances[:, :k], indices[:, :k]
    distances = torch.cat([running[0], distances], dim=1)
    indices = torch.cat([running[1], indices], dim=1)
    order = torch.sort(distances, dim=1, descending=not is_ascending(metric), stable=True).indices[:, :k]
    return distances.gather(1, order), indices.gather(1, order)


def _pad(distances, indices, kept: int, metric: str) -> None:
    if kept < distances.shape[1]:
        distances[:, kept:] = _PAD[metric]
        indices[:, kept:] = -1


# ---------------------------------------------------------------------------------------
# Backends: where a block of queries meets a block of the database


# How the GPU kernel computes dot products (csrc/ops/knn.h KnnPrecision): exact float32 on
# CUDA cores, or inputs rounded to tf32 / bf16 / fp16 on tensor cores with float32 sums.
PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2, "fp16": 3}


def check_precision(precision: Any, on_gpu: bool) -> int:
    """The native code of a search precision. The CPU computes in float32 only: the others
    are refused there, with the fix."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of 'fp32', 'tf32', 'bf16', 'fp16', got {precision!r}")
    if precision != "fp32" and not on_gpu:
        raise ValueError(f"precision: {precision!r} runs on CUDA tensor cores only; the CPU search computes "
                         "in float32 (precision='fp32'); pass device='cuda' or CUDA tensors")
    return PRECISIONS[precision]


# Database storage of a GPU index, in the order of csrc/ops/knn.h's KnnStorage codes.
STORAGES = ("fp32", "fp16", "bf16")
_STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # the torch dtype of each


def storage_dtype(storage: str):
    """The torch dtype of a storage name ("fp32", "fp16", "bf16")."""
    import torch

    return getattr(torch, _STORAGE_DTYPES[STORAGES.index(storage)])


def storage_code(dtype) -> int:
    """The native storage code of a database tensor's dtype (float32, float16, bfloat16)."""
    return _STORAGE_DTYPES.index(str(dtype).removeprefix("torch."))


def check_storage(storage: Any, on_gpu: bool) -> str:
    """A FlatIndex storage: "fp32" anywhere; "fp16" / "bf16" on a GPU index only."""
    if not isinstance(storage, str) or storage not in STORAGES:
        raise ValueError(f"storage: expected one of 'fp32', 'fp16', 'bf16', got {storage!r}")
    if storage != "fp32" and not on_gpu:
        raise ValueError(f"storage: {storage!r} is for an index on a GPU (device='cuda'); "
                         "a CPU index stores float32 (storage='fp32')")
    return storage


class CudaBackend:
    """The native CUDA kernel on `device`, queued on torch's current stream for it. Use
    under `torch.cuda.device(device)`: the kernel runs on the current device. precision:
    a PRECISIONS code."""

    def __init__(self, device, precision: int = 0, weights: np.ndarray | None = None):
        import torch

        self.device = device
        self.precision = precision
        self.stream = torch.cuda.current_stream(device)
        self.dim = 0  # the rows' dimension, which the plan's split rule reads (set_dim)
        self.set_weights(weights)

    def set_dim(self, dim: int) -> None:
        """The dimension of the rows this backend searches: the native plan's split rule reads
        it (knn_plan.cuh), so the workspace is sized for the plan the search makes."""
        self.dim = dim

    def set_weights(self, weights: np.ndarray | None) -> None:
        """weighted_l2: checked weights, put on the device for the kernel (a few bytes, copied
        per search), or None; host_weights keeps them in host memory for host-side checks."""
        import torch

        self.host_weights = weights
        self.weights = None if weights is None else torch.from_numpy(weights).to(self.device)

    def workspace_of(self, num_queries: int, num_database: int, k: int, bound: int) -> int:
        """The native call's workspace for these sizes, planned to fit `bound` bytes (the
        fitted plan, on unless LATENTSPACE_CUDA_FITTED_PLAN=0, and the large-k plan's check);
        the search plans again with the workspace's size as its bound, which gives the same
        plan (csrc/cuda/knn_plan.cuh plan_for)."""
        return _native.knn_cuda_workspace_bytes(num_queries, num_database, k, self.device.index, bound, self.dim)

    def free_bytes(self) -> int:
        """Device memory a new tensor can take now: the driver's free bytes and what torch's
        caching allocator holds unused."""
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def search(self, queries, database, k: int, code: int, distances, indices, workspace, norms=None) -> None:
        _native.knn_cuda(queries.data_ptr(), queries.shape[0], database.data_ptr(), database.shape[0],
                         database.shape[1], k, code, distances.data_ptr(), indices.data_ptr(),
                         workspace.data_ptr(), workspace.numel(), self.stream.cuda_stream, self.precision,
                         0 if self.weights is None else self.weights.data_ptr(), storage_code(database.dtype),
                         0 if norms is None else norms.data_ptr())

    def upload(self, array: np.ndarray):
        return host_to_tensor(array).to(self.device)

    def host_chunks(self, database: np.ndarray, rows: int) -> "_PinnedChunks":
        return _PinnedChunks(database, rows, self.device, self.stream)


class CpuBackend:
    """A stand-in for CudaBackend on CPU tensors with the CPU kernel: the orchestration
    (query chunks, database chunks, streaming, merging) runs as it does on a GPU.
    workspace_of(num_queries, num_database, k, bound) -> bytes models the kernel's workspace
    (bound: the caller's workspace_bytes, which the native plan may fit; None: no bound).
    free: the device memory free_bytes() reports (0: a search given no workspace_bytes gets
    DEFAULT_WORKSPACE_BYTES, as before default_workspace_bytes)."""

    def __init__(self, workspace_of: Callable[[int, int, int, int], int] | None = None,
                 weights: np.ndarray | None = None, free: int = 0):
        import torch

        self.device = torch.device("cpu")
        self.workspace_of = workspace_of or (lambda nq, nb, k, bound: 256 + nq * k * 16 + nb * 4)
        self.free = free
        self.dim = 0  # (set_dim: as CudaBackend's; the stand-in's workspace model ignores it)
        self.set_weights(weights)

    def free_bytes(self) -> int:
        return self.free

    def set_dim(self, dim: int) -> None:
        self.dim = dim

    def set_weights(self, weights: np.ndarray | None) -> None:
        self.weights = self.host_weights = weights

    def search(self, queries, database, k: int, code: int, distances, indices, workspace, norms=None) -> None:
        # (norms: the CPU kernel computes its own; the stand-in only checks they line up)
        if norms is not None and norms.shape[0] != database.shape[0]:
            raise ValueError(f"norms: expected {database.shape[0]} (one per database row), got {norms.shape[0]}")
        try:
            _native.knn(queries.numpy(), database.float().numpy(), k, code, distances.numpy(), indices.numpy(),
                        self.weights)
        except ValueError:
            # The CPU kernel checks its inputs, the CUDA one trusts its caller and returns
            # meaningless results for NaN / Inf: so does the stand-in, and the caller's own
            # check must report the bad row.
            distances.fill_(float("nan"))
            indices.fill_(-1)

    def upload(self, array: np.ndarray):
        return host_to_tensor(np.ascontiguousarray(array, dtype=np.float32))

    def host_chunks(self, database: np.ndarray, rows: int) -> "_HostChunks":
        return _HostChunks(database)


class _PinnedChunks:
    """Database chunks from host memory to the device through two pinned buffers.

    start(j, ...) fills pinned buffer j % 2 from the host array (converting to float32 as it
    copies) and queues its copy to device buffer j % 2 on a side stream; take(j, ...) makes
    the compute stream wait for that copy; release(j) marks the device buffer free again once
    the compute stream's work queued so far (the search of chunk j) is done. With start(j + 1)
    issued right after chunk j's search is queued, the host copy and the transfer of the
    next chunk overlap the search of this one.
    """

    def __init__(self, database: np.ndarray, rows: int, device, compute_stream):
        import torch

        dim = database.shape[1]
        self._database = database
        self._host = [torch.empty((rows, dim), dtype=torch.float32, device="cpu", pin_memory=True) for _ in range(2)]
        self._host_views = [buffer.numpy() for buffer in self._host]
        self._device_buffers = [torch.empty((rows, dim), dtype=torch.float32, device=device) for _ in range(2)]
        self._copy_stream = torch.cuda.Stream(device)
        # The device buffers come from the compute stream's pool: memory that work queued there
        # still uses may be handed out again, so the copies start only after that work.
        self._copy_stream.wait_stream(compute_stream)
        for buffer in self._device_buffers:
            buffer.record_stream(self._copy_stream)  # freed only after the copies into it
        self._compute = compute_stream
        self._copied: list[Any] = [None, None]
        self._searched: list[Any] = [None, None]

    def start(self, j: int, start: int, stop: int) -> None:
        import torch

        slot, rows = j % 2, stop - start
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the pinned buffer's previous copy has left it
        # float32 from any float dtype over a few threads; too large -> inf, refused later
        copy_rows(self._host_views[slot][:rows], self._database[start:stop])
        with torch.cuda.stream(self._copy_stream):
            if self._searched[slot] is not None:
                self._copy_stream.wait_event(self._searched[slot])  # the device buffer is free
            self._device_buffers[slot][:rows].copy_(self._host[slot][:rows], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        self._copied[slot] = copied

    def host_rows(self, j: int, rows: int) -> np.ndarray:
        """Chunk j as start(j) left it in its pinned buffer: float32, the values its upload
        reads (until start(j + 2) fills the buffer again)."""
        return self._host_views[j % 2][:rows]

    def take(self, j: int, rows: int):
        slot = j % 2
        self._compute.wait_event(self._copied[slot])
        return self._device_buffers[slot][:rows]

    def release(self, j: int) -> None:
        import torch

        searched = torch.cuda.Event()
        searched.record(self._compute)
        self._searched[j % 2] = searched


class _HostChunks:
    """_PinnedChunks's stand-in for CpuBackend: float32 chunks of the host array."""

    def __init__(self, database: np.ndarray):
        self._database = database
        self._slots: list[Any] = [None, None]

    def start(self, j: int, start: int, stop: int) -> None:
        with np.errstate(over="ignore", invalid="ignore"):
            chunk = np.ascontiguousarray(self._database[start:stop], dtype=np.float32)
        self._slots[j % 2] = host_to_tensor(chunk)

    def host_rows(self, j: int, rows: int) -> np.ndarray:
        return self._slots[j % 2][:rows].numpy()

    def take(self, j: int, rows: int):
        return self._slots[j % 2][:rows]

    def release(self, j: int) -> None:
        self._slots[j % 2] = None


# ---------------------------------------------------------------------------------------
# Searches


def _search_block(backend, queries, database, k: int, code: int, workspace_bytes: int, out=None, norms=None):
    """Top-k of `queries` among all rows of `database` (k <= its rows, N < 2^29), both on
    the backend's device: one native call per chunk of queries, each with its own
    workspace. Writes into out = (distances, indices), (Q, k) contiguous, or new tensors.
    norms: the database's cached norms (see FlatIndex), or None to compute them per call."""
    import torch

    num_queries, num_database = queries.shape[0], database.shape[0]
    if out is None:
        out = (torch.empty((num_queries, k), dtype=torch.float32, device=backend.device),
               torch.empty((num_queries, k), dtype=torch.int64, device=backend.device))
    distances, indices = out
    plan = plan_query_chunks(num_queries, k, lambda n: backend.workspace_of(n, num_database, k, workspace_bytes),
                             workspace_bytes)
    for start, stop, need in plan:
        workspace = torch.empty(need, dtype=torch.uint8, device=backend.device)
        backend.search(queries[start:stop], database, k, code, distances[start:stop], indices[start:stop], workspace,
                       norms)
        del workspace  # back to the caching allocator before the next call takes its own
    return distances, indices


def resident_workspace_bytes(backend, num_queries: int, num_database: int, k: int) -> int:
    """The workspace bound of a resident search of these sizes given no workspace_bytes
    (_cuda_chunks.default_workspace_bytes): the need of one call of all its queries (as many
    as one call takes) over the rows one call takes under the largest such bound."""
    rows = min(num_database, rows_per_call(MOST_DEFAULT_WORKSPACE_BYTES))
    kept = max(1, min(k, rows))
    queries = max(1, min(num_queries, MAX_ITEMS_PER_CALL // kept))
    return default_workspace_bytes(lambda: backend.workspace_of(queries, rows, kept, None), backend.free_bytes)


def search_resident(backend, queries, database, k: int, metric: str, workspace_bytes: int, norms=None):
    """(distances, indices), each (Q, k) on the backend's device, of queries (Q, D) among the
    database (N, D), N >= 1, both contiguous tensors on that device and checked (queries
    float32, the database float32 or half storage). norms: (N,) float32 on the device, the
    database's squared norms (l2) or inverse norms (cosine), when the caller keeps them."""
    import torch

    num_queries, num_database = queries.shape[0], database.shape[0]
    code, kept = METRICS[metric], min(k, num_database)
    distances = torch.empty((num_queries, k), dtype=torch.float32, device=backend.device)
    indices = torch.empty((num_queries, k), dtype=torch.int64, device=backend.device)
    check_one_query_fits(backend.workspace_of, num_database, k, workspace_bytes)
    pieces = plan_database_chunks(num_database, rows_per_call(workspace_bytes))
    if len(pieces) == 1 and kept == k:
        _search_block(backend, queries, database, k, code, workspace_bytes, out=(distances, indices), norms=norms)
        return distances, indices
    running = None
    for start, stop in pieces:
        chunk = _search_block(backend, queries, database[start:stop], min(kept, stop - start), code, workspace_bytes,
                              norms=None if norms is None else norms[start:stop])
        running = merge_topk(running, chunk, kept, metric, offset=start)
    distances[:, :kept] = running[0]
    indices[:, :kept] = running[1]
    _pad(distances, indices, kept, metric)
    return distances, indices


def search_then_check(search: Callable[[], Any], checks: list) -> Any:
    """search(), then the row checks (raise_unusable_rows: one wait for the device, if any
    check is on it) read once it is queued: a GPU FlatIndex's search of queries checked on
    the device. A search over rows the checks refuse is harmless (streamed searches have
    always searched a chunk before its check is read) and its results are dropped. A refused
    row outranks the search's own ValueError (a workspace too small for one query, say) or
    running out of device memory, as in knn, which reads its checks before its search (a
    FlatIndex search let those errors win until the nineteenth session); other errors (CUDA's)
    propagate as they are, the checks unread."""
    try:
        results = search()
    except Exception as error:
        if not _refusal_or_out_of_memory(error):
            raise
        try:
            raise_unusable_rows(checks)
        except ValueError as refused:
            raise refused from None
        raise
    raise_unusable_rows(checks)
    return results


def _refusal_or_out_of_memory(error: Exception) -> bool:
    """Whether a search's error comes after its inputs' own in precedence: a ValueError (the
    workspace bound, say) or torch's out-of-memory error; not a CUDA error, after which the
    checks' flags may not be readable."""
    import torch

    return isinstance(error, (ValueError, torch.cuda.OutOfMemoryError))


def search_streamed(backend, queries, database: np.ndarray, k: int, metric: str, *, workspace_bytes: int,
                    memory_bytes: int, query_checks: list | None = None):
    """Search of a host database (N, D), N >= 1, a numpy array of any real dtype (a memory
    map too), streamed to the device in chunks (plan_host_stream sizes the largest,
    plan_stream_chunks starts smaller).

    queries: a float32 contiguous tensor on the device, already checked (its checks may be
    passed in query_checks, from query_row_checks, read with the database's at the end), or a
    float32 numpy array, uploaded and checked one block at a time. Results: (Q, k) tensors on
    the device for tensor queries, numpy arrays for numpy queries. NaN / Inf found in the
    database (or queries) raise ValueError at the end, naming the first bad row, as the CPU
    search does: the chunks are checked on the device as they land, and read once, at the end.
    weighted_l2 (the backend's weights), from CHECK_AHEAD_QUERIES queries: a database row the
    search refuses (the weights make it unusable, or NaN / Inf) is refused before its chunk is
    searched, checked on the host in the pinned buffer (_start_chunk); bad queries are still
    named first.
    """
    import torch

    host_queries = isinstance(queries, np.ndarray)
    num_queries, dim = queries.shape
    num_database = database.shape[0]
    code, kept = METRICS[metric], min(k, num_database)
    check_one_query_fits(backend.workspace_of, num_database, k, workspace_bytes)
    query_rows, database_rows = plan_host_stream(num_queries, num_database, dim, k, memory_bytes, workspace_bytes)
    if host_queries:
        distances = np.empty((num_queries, k), dtype=np.float32)
        indices = np.empty((num_queries, k), dtype=np.int64)
    else:
        distances = torch.empty((num_queries, k), dtype=torch.float32, device=backend.device)
        indices = torch.empty((num_queries, k), dtype=torch.int64, device=backend.device)
    pieces = plan_stream_chunks(num_database, database_rows, first_stream_rows(database_rows, dim))
    blocks = plan_database_chunks(num_queries, query_rows)
    jobs = [(block, piece) for block in blocks for piece in pieces]
    query_checks, database_checks = list(query_checks or []), []
    weights = backend.weights
    host_weights = backend.host_weights if num_queries >= CHECK_AHEAD_QUERIES else None  # None: no check ahead
    chunks = backend.host_chunks(database, database_rows)
    refused = _start_chunk(chunks, 0, jobs[0], host_weights) if jobs else -1
    running, block_queries = None, None
    for j, ((first, last), (start, stop)) in enumerate(jobs):
        if refused >= 0:  # weighted_l2: a row in the chunk about to be searched
            _refuse_database_row(refused, queries, query_checks, database_checks, host_weights)
        if start == 0:  # a new block of queries: the database streams again
            if host_queries:
                block_queries = backend.upload(queries[first:last])
                query_checks.extend(query_row_checks(block_queries, weights, first))
            else:
                block_queries = queries[first:last]
        rows = chunks.take(j, stop - start)
        if first == 0:
            database_checks.append(database_row_check(rows, weights, start))
        chunk = _search_block(backend, block_queries, rows, min(kept, stop - start), code, workspace_bytes)
        chunks.release(j)
        if j + 1 < len(jobs):
            refused = _start_chunk(chunks, j + 1, jobs[j + 1], host_weights)  # overlaps the search just queued
        running = merge_topk(running, chunk, kept, metric, offset=start)
        if stop == num_database:
            if host_queries:
                distances[first:last, :kept] = running[0].cpu().numpy()
                indices[first:last, :kept] = running[1].cpu().numpy()
            else:
                distances[first:last, :kept] = running[0]
                indices[first:last, :kept] = running[1]
            running = None
    if host_queries:
        distances[:, kept:] = _PAD[metric]
        indices[:, kept:] = -1
    else:
        _pad(distances, indices, kept, metric)
    raise_unusable_rows(query_checks + database_checks)  # bad queries first, as on the CPU
    return distances, indices


def _start_chunk(chunks, j: int, job: tuple, host_weights: np.ndarray | None) -> int:
    """chunks.start(j, ...) for job ((first, last), (start, stop)), and for weighted_l2 (host
    weights given) on the database's first pass (first == 0), the chunk's check: the first row
    (start + r) the search refuses, or -1.

    Why on the host, in the pinned buffer: the device's check of a chunk is read only at the end,
    since reading it before the chunk's search would wait for the search queued before it (a
    host sync per chunk, which the pipeline has none of: the host copies chunk j + 1 while the GPU
    searches chunk j). The chunk's float32 values are in host memory anyway, where the CPU's
    one-read check (first_refused_row) runs while the GPU searches the chunk before it and the chunk
    itself uploads. Its cost: a read of each chunk on the host, once; hidden while a chunk's
    search takes longer than its host copy and this read (many queries), it lengthens each step
    of the host's copy when the search is shorter (few queries)."""
    (first, _), (start, stop) = job
    chunks.start(j, start, stop)
    if host_weights is None or first != 0:
        return -1
    # (first_refused_row: the row database_row_check's flag finds; one read of the rows when
    # none is, no device memory)
    row = first_refused_row(chunks.host_rows(j, stop - start), host_weights)
    return -1 if row < 0 else start + row


def _refuse_database_row(row: int, queries, query_checks: list, database_checks: list,
                         weights: np.ndarray) -> None:
    """Raises ValueError for a database row the weighted search refuses, found before its chunk
    was searched, as the search would have at its end: a bad query first (numpy queries all
    checked here, those of blocks not yet uploaded too, the first in row order), then a row
    the device's check found in an earlier chunk, then this one, in database_row_check's words."""
    import torch

    if isinstance(queries, np.ndarray):
        check_weighted_rows(np.ascontiguousarray(queries, dtype=np.float32), weights, "queries")
        query_checks = []
    raise_unusable_rows(query_checks + database_checks + [(torch.tensor(row), "database", True)])


def check_database_without_queries(database, weights: np.ndarray | None) -> None:
    """The check knn makes of a database it has no queries to search for, in the CPU's order and
    words (search.knn): the first refused row in row order, in the plain words, or with weights,
    whichever its kind, in the weighted ones. database: a tensor on the device (its flag read
    once), or a host array of any real dtype, converted and checked one chunk of HOST_CHUNK_BYTES
    at a time (as a streamed search does, never whole), up to the first chunk holding one."""
    if not isinstance(database, np.ndarray):
        raise_unusable_rows([database_row_check(database, weights)])
        return
    rows = max(1, HOST_CHUNK_BYTES // (database.shape[1] * 4))
    for start in range(0, database.shape[0], rows):
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused as such
            chunk = np.ascontiguousarray(database[start : start + rows], dtype=np.float32)
        if weights is None:
            check_rows_usable(chunk, "database", first_row=start)
        else:
            check_weighted_rows(chunk, weights, "database", start)


# ---------------------------------------------------------------------------------------
# latentspace.knn(..., device="cuda")


def knn_on_device(queries: Any, database: Any, k: Any, metric: Any, device, *, workspace_bytes: int | None,
                  gpu_memory_bytes: int | None, precision: int = 0, weights: Any = None):
    """latentspace.knn on a CUDA device (resolved by resolve_device). See search.knn."""
    import torch

    with torch.cuda.device(device):
        backend = CudaBackend(device, precision)
        return _knn(backend, queries, database, k, metric, workspace_bytes=workspace_bytes,
                    gpu_memory_bytes=gpu_memory_bytes, weights=weights)


def _knn(backend, queries: Any, database: Any, k: Any, metric: Any, *, workspace_bytes: int | None,
         gpu_memory_bytes: int | None, weights: Any = None):
    """knn_on_device on any backend (tests run it on CpuBackend): checks in the CPU search's
    order and words, then a resident or a streamed search, results in the caller's type."""
    import torch

    device = backend.device
    device_queries = is_torch_tensor(queries) and queries.device.type != "cpu"
    if device_queries:
        q, kind = as_device_matrix(queries, "queries", device)
    else:
        q, kind = as_matrix(queries, "queries")  # host: uploaded by the search
    dim = q.shape[1]
    resident = is_torch_tensor(database) and database.device.type != "cpu"
    if resident:  # a float16 / bfloat16 database on the GPU is read as it is stored
        x, _ = as_device_matrix(database, "database", device, dim=dim, keep_half=True,
                                dim_of="the queries' dimension")
    else:
        x = as_host_matrix(database, "database", dim=dim, dim_of="the queries' dimension")
    k = check_k(k)
    check_metric(metric)
    w = weights_for(metric, weights, dim)
    if w is not None:
        backend.set_weights(w)
    backend.set_dim(dim)
    if x.shape[0] == 0:
        raise ValueError("database: expected at least one row, got shape (0, %d)" % dim)
    if q.shape[0] == 0:
        # as on the CPU: the database is checked even without queries, in its order and words
        check_database_without_queries(x, w)
        distances = torch.empty((0, k), dtype=torch.float32, device=device)
        indices = torch.empty((0, k), dtype=torch.int64, device=device)
    elif resident:
        if isinstance(q, np.ndarray):
            q = backend.upload(q)
        # Read before the search is queued: the search then runs after the call returns, as
        # torch's ops do (reading after it, as FlatIndex's search_then_check does, would save
        # one host round trip of a single query's search but hold every call until its search
        # is done).
        raise_unusable_rows(query_row_checks(q, backend.weights) + [database_row_check(x, backend.weights)])
        bound = workspace_bytes or resident_workspace_bytes(backend, q.shape[0], x.shape[0], k)
        distances, indices = search_resident(backend, q, x, k, metric, bound)
    else:
        checks = [] if isinstance(q, np.ndarray) else query_row_checks(q, backend.weights)
        memory_bytes = gpu_memory_bytes or _default_memory_bytes(device)
        distances, indices = search_streamed(backend, q, x, k, metric,
                                             workspace_bytes=workspace_bytes or DEFAULT_WORKSPACE_BYTES,
                                             memory_bytes=memory_bytes, query_checks=checks)
    return as_caller_results(distances, indices, kind, device_queries)


def _default_memory_bytes(device) -> int:
    import torch

    if device.type != "cuda":
        return DEFAULT_GPU_MEMORY_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(DEFAULT_GPU_MEMORY_BYTES, free // 2))


def as_caller_results(distances, indices, kind: str, device_queries: bool):
    """Results in the caller's type: numpy for numpy queries, CPU tensors for CPU tensor
    queries, tensors on the device that searched for CUDA tensor queries."""
    import torch

    if isinstance(distances, np.ndarray):
        if kind == "numpy":
            return distances, indices
        return torch.from_numpy(distances), torch.from_numpy(indices)
    if kind == "numpy":
        return distances.cpu().numpy(), indices.cpu().numpy()
    if not device_queries:
        return distances.cpu(), indices.cpu()
    return distances, indices

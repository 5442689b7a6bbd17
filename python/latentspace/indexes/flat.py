"""FlatIndex: exact search over vectors held in one contiguous float32 array."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from .. import _cuda_search, _native
from .._arrays import (
    METRICS,
    as_matrix,
    check_dim,
    check_k,
    check_metric,
    check_rows_usable,
    empty_results,
)
from .._arrays import as_device_matrix, check_rows_usable_flags, is_torch_tensor, unusable_row_flag
from .io import IndexFileError, load_index_file, save_index_file

_GROWTH = 1.5  # capacity grows geometrically so that many small add() calls stay linear
_PAD = {"l2": np.inf, "ip": -np.inf, "cosine": -np.inf}


class FlatIndex:
    """Exact (brute-force) index, faiss-style: add vectors, search the k nearest.

    Args:
        dim: vector dimension, >= 1.
        metric: "l2" (squared Euclidean, ascending), "ip" (inner product, descending) or
            "cosine" (cosine similarity, descending; zero vectors score 0).
        device: None or "cpu" (vectors in host memory), or "cuda", "cuda:N", a torch.device:
            vectors in a torch tensor on that GPU, searched there (docs/gpu.md). vectors()
            and reconstruct() then return host copies; save() writes the same file format.

    Memory: the vectors are held once, as (ntotal, dim) float32 (dim * 4 bytes per
    vector, see `bytes_per_vector`), in a buffer that grows by 1.5x (see `nbytes`). Search
    computes norms on the fly: no other per-vector state is kept.

    Thread safety: any number of threads may search at once (the GIL is released during
    the native search), also while another thread adds; add() and reset() serialise
    among themselves. A search sees the vectors present when it started.
    """

    def __init__(self, dim: int, metric: str = "l2", device: Any = None):
        check_metric(metric)
        self._dim = check_dim(dim)
        self._metric = metric
        self._device = _cuda_search.resolve_device(device)  # None: the CPU
        self._lock = threading.Lock()
        self._buffer = np.empty((0, self._dim), dtype=np.float32)
        self._ntotal = 0
        self._read_only = False
        if self._device is not None:
            self._init_cuda()

    # -- properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def __len__(self) -> int:
        return self._ntotal

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of storage per vector (float32 components; nothing else is stored)."""
        return self._dim * 4

    @property
    def nbytes(self) -> int:
        """Bytes held for vectors now, including spare capacity (0 extra after load); on a
        GPU index, device memory."""
        if self._device is not None:
            return int(self._gpu_buffer.numel() * 4)
        return int(self._buffer.nbytes)

    @property
    def is_mmap(self) -> bool:
        """True when the vectors are memory-mapped from a file (read-only)."""
        return self._read_only

    def __repr__(self) -> str:
        extra = ", mmap" if self._read_only else ""
        if self._device is not None:
            extra = f", device={self.device!r}"
        return f"FlatIndex(dim={self._dim}, metric={self._metric!r}, ntotal={self._ntotal}{extra})"

    # -- contents -----------------------------------------------------------------------
    def add(self, x: Any) -> None:
        """Appends the rows of x, (n, dim), numpy or torch. Raises ValueError for NaN / Inf."""
        if self._device is not None:
            return self._add_cuda(x)
        array, _ = as_matrix(x, "x", dim=self._dim)
        if array.shape[0] == 0:
            return
        check_rows_usable(array, "x")
        with self._lock:
            if self._read_only:
                raise ValueError(
                    "add: this index is memory-mapped read-only (load_index(..., mmap=True)); "
                    "load it with mmap=False to add vectors"
                )
            n, m = self._ntotal, array.shape[0]
            if n + m > self._buffer.shape[0]:
                capacity = max(n + m, int(self._buffer.shape[0] * _GROWTH), 16)
                grown = np.empty((capacity, self._dim), dtype=np.float32)
                grown[:n] = self._buffer[:n]
                self._buffer = grown  # searches in flight keep the old buffer alive
            self._buffer[n : n + m] = array
            self._ntotal = n + m

    def reset(self) -> None:
        """Removes all vectors (and drops a memory map)."""
        if self._device is not None:
            return self._reset_cuda()
        with self._lock:
            self._buffer = np.empty((0, self._dim), dtype=np.float32)
            self._ntotal = 0
            self._read_only = False

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors for integer ids (a copy, in host memory), shape (len(ids), dim)."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids: expected integers, got {ids.dtype}")
        if self._device is not None:
            return self._reconstruct_cuda(ids)
        vectors = self.vectors()
        if ids.size and (ids.min() < 0 or ids.max() >= vectors.shape[0]):
            raise ValueError(f"ids: expected values in [0, {vectors.shape[0]}), got {ids.min()}..{ids.max()}")
        return np.array(vectors[ids.reshape(-1)], dtype=np.float32)

    def vectors(self) -> np.ndarray:
        """A read-only view of the stored vectors, (ntotal, dim) float32 (no copy); on a GPU
        index, a read-only host copy."""
        if self._device is not None:
            return self._vectors_cuda()
        with self._lock:
            view = self._buffer[: self._ntotal].view()
        view.flags.writeable = False
        return view

    # -- search -------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, workspace_bytes: int | None = None):
        """k nearest stored vectors of each query: (distances, indices), each (Q, k).

        Same conventions as latentspace.knn (best first, ties to the lower index, -1 and
        +-inf padding when k > ntotal); an empty index returns only padding. Results follow
        the queries' type (numpy or torch); on a GPU index CUDA tensor queries get results on
        the index's device, other queries results in host memory. workspace_bytes: as for
        latentspace.knn (GPU only; checked, unused on the CPU).
        """
        workspace_bytes = _cuda_search.check_budget(workspace_bytes, "workspace_bytes")
        if self._device is not None:
            return self._search_cuda(queries, k, workspace_bytes)
        q, kind = as_matrix(queries, "queries", dim=self._dim)
        k = check_k(k)
        with self._lock:
            database = self._buffer[: self._ntotal]
        distances, indices, d_view, i_view = empty_results(kind, q.shape[0], k)
        _native.knn(q, database, k, METRICS[self._metric], d_view, i_view)
        return distances, indices

    # -- on a GPU (device="cuda"): the vectors in a torch tensor on the device ------------
    @property
    def device(self) -> str:
        """Where the vectors live and searches run: "cpu" or "cuda:N"."""
        return "cpu" if self._device is None else str(self._device)

    def to(self, device: Any) -> "FlatIndex":
        """A new index with the same vectors on `device` (None / "cpu", "cuda", "cuda:N",
        a torch.device); always a copy, also to the same device (a memory-mapped index
        becomes one held in memory)."""
        index = FlatIndex(self._dim, self._metric, device=device)
        if self._device is not None:
            with self._lock:
                stored = self._gpu_buffer[: self._ntotal]
        else:
            stored = self.vectors()
        index.add(stored)
        return index

    def _init_cuda(self) -> None:
        import torch

        # One storage, the tensor: the host buffer is dropped so that no host path uses it.
        self._buffer = None
        self._gpu_buffer = torch.empty((0, self._dim), dtype=torch.float32, device=self._device)

    def _add_cuda(self, x: Any) -> None:
        import torch

        with torch.cuda.device(self._device):
            rows, _ = as_device_matrix(x, "x", self._device, dim=self._dim)
            if rows.shape[0] == 0:
                return
            check_rows_usable_flags([unusable_row_flag(rows)], ["x"])
            with self._lock:
                n, m = self._ntotal, rows.shape[0]
                buffer = self._gpu_buffer
                if n + m > buffer.shape[0]:
                    capacity = max(n + m, int(buffer.shape[0] * _GROWTH), 16)
                    grown = torch.empty((capacity, self._dim), dtype=torch.float32, device=self._device)
                    grown[:n] = buffer[:n]
                    buffer = grown  # searches in flight keep the old buffer alive
                buffer[n : n + m] = rows
                # Searches on other threads run on other streams: the rows must have landed
                # before any search can see them.
                torch.cuda.current_stream(self._device).synchronize()
                self._gpu_buffer = buffer
                self._ntotal = n + m

    def _reset_cuda(self) -> None:
        import torch

        with self._lock:
            self._gpu_buffer = torch.empty((0, self._dim), dtype=torch.float32, device=self._device)
            self._ntotal = 0

    def _vectors_cuda(self) -> np.ndarray:
        with self._lock:
            stored = self._gpu_buffer[: self._ntotal]
        copy = stored.cpu().numpy()
        copy.flags.writeable = False
        return copy

    def _reconstruct_cuda(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with self._lock:
            stored = self._gpu_buffer[: self._ntotal]
        if ids.min() < 0 or ids.max() >= stored.shape[0]:
            raise ValueError(f"ids: expected values in [0, {stored.shape[0]}), got {ids.min()}..{ids.max()}")
        rows = torch.from_numpy(ids.reshape(-1).astype(np.int64)).to(self._device)
        return stored.index_select(0, rows).cpu().numpy()

    def _search_cuda(self, queries: Any, k: Any, workspace_bytes: int | None):
        import torch

        with torch.cuda.device(self._device):
            device_queries = is_torch_tensor(queries) and queries.device.type != "cpu"
            q, kind = as_device_matrix(queries, "queries", self._device, dim=self._dim)
            k = check_k(k)
            with self._lock:
                database = self._gpu_buffer[: self._ntotal]
            check_rows_usable_flags([unusable_row_flag(q)], ["queries"])
            backend = _cuda_search.CudaBackend(self._device)
            if database.shape[0] == 0:
                distances = torch.full((q.shape[0], k), float(_PAD[self._metric]), device=self._device)
                indices = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=self._device)
            else:
                # The buffer may be replaced (add) and freed while this search is still queued
                # on this thread's stream: the caching allocator must wait for the search.
                database.record_stream(backend.stream)
                distances, indices = _cuda_search.search_resident(
                    backend, q, database, k, self._metric,
                    workspace_bytes or _cuda_search.DEFAULT_WORKSPACE_BYTES)
            return _cuda_search.as_caller_results(distances, indices, kind, device_queries)


    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to `path` atomically (versioned, checksummed; see indexes/io.py)."""
        if self._device is not None:
            database = self._vectors_cuda()  # the same file from a GPU index: a host copy first
        else:
            with self._lock:
                database = self._buffer[: self._ntotal]
        header = {"type": "FlatIndex", "metric": self._metric, "dim": self._dim,
                  "ntotal": int(database.shape[0]), "writer": _native.__version__}
        save_index_file(path, header, database)

    @classmethod
    def _from_file(cls, header: dict, data: np.ndarray, mmap: bool) -> "FlatIndex":
        metric = header.get("metric")
        if metric not in METRICS:
            raise IndexFileError(f"corrupted index header (unknown metric {metric!r})")
        index = cls(int(header["dim"]), metric)
        index._buffer = data
        index._ntotal = data.shape[0]
        index._read_only = bool(mmap) and data.shape[0] > 0
        return index


def load_index(path: str | os.PathLike, *, mmap: bool = False, verify: bool = True, device: Any = None):
    """Loads an index saved with `index.save(path)`.

    Args:
        mmap: map the vectors read-only instead of reading them, so an index larger than
            RAM can still be searched (pages are read on demand).
        verify: check the CRC-32 of the vectors (reads the whole file once; the header is
            always checked). Pass False to open a huge mapped index without a full read.
        device: None / "cpu" (host memory), or "cuda", "cuda:N", a torch.device: the
            vectors are read (or mapped, with mmap=True) and copied to that GPU.

    Raises IndexFileError (a ValueError) for a foreign, truncated, corrupted or too-new
    file, FileNotFoundError when there is none.
    """
    target = _cuda_search.resolve_device(device)  # before reading: a bad device fails fast
    header, data = load_index_file(path, mmap=mmap, verify=verify)
    kind = header.get("type")
    if kind == "FlatIndex":
        index = FlatIndex._from_file(header, data, mmap)
        return index if target is None else index.to(target)
    raise IndexFileError(f"{path}: unknown index type {kind!r}")

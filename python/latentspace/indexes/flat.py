"""FlatIndex: exact search over vectors held in one contiguous float32 array."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any, Iterable

import numpy as np

from .. import _cuda_device, _cuda_row_check, _cuda_search, _native
from .._arrays import (
    METRICS,
    as_matrix,
    check_bool,
    check_dim,
    check_int,
    check_k,
    check_metric,
    check_rows_usable,
    check_weights,
    empty_results,
    empty_vector_buffer,
    native_knn,
    weights_for,
)
from .._arrays import (STORED_ROWS_NAME, as_device_matrix, check_dense, check_rows_usable_flags, database_row_check,
                       detached, is_torch_tensor, query_row_checks, raise_unusable_rows, unusable_row_flag,
                       weighted_overflow_row)
from .io import IndexFileError, MappedFile, open_index_file, save_index_file, save_index_file_streaming

_GROWTH = 1.5  # capacity grows geometrically so that many small add() calls stay linear
# A buffer's bytes (rows * dim * 4) must fit in an int64, as numpy and the native kernels count
# them (the largest dimension: _arrays.DIM_BELOW).
_MAX_BUFFER_BYTES = 2**63 - 1
# remove_ids finds the kept rows of this many stored rows at a time (their positions, 8 bytes
# each, are made per block, not for the whole index).
_GATHER_ROWS = 65536
_PAD = {"l2": np.inf, "ip": -np.inf, "cosine": -np.inf, "weighted_l2": np.inf}


def gather_kept_rows(rows: Any, keep: np.ndarray, kept: int, block_rows: int = _GATHER_ROWS) -> Any:
    """A new torch tensor on `rows`' device of the `kept` leading-dimension rows of `rows` that
    the bool array `keep` marks (keep.size <= len(rows)), in order. Gathered a block of
    `block_rows` at a time straight into the new tensor: the positions of every kept row at
    once took 8 bytes a row on the host and again on the device (800 MB each for 100M rows),
    beside the two buffers."""
    import torch

    fresh = torch.empty((kept, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    written = 0
    for start in range(0, keep.size, block_rows):
        positions = start + np.flatnonzero(keep[start : start + block_rows])
        if positions.size:
            index = torch.from_numpy(positions).to(rows.device)
            torch.index_select(rows, 0, index, out=fresh[written : written + positions.size])
            written += positions.size
    return fresh


class FlatIndex:
    """Exact (brute-force) index, faiss-style: add vectors, search the k nearest.

    Args:
        dim: vector dimension, >= 1.
        metric: "l2" (squared Euclidean, ascending), "ip" (inner product, descending) or
            "cosine" (cosine similarity, descending; zero vectors score 0) or "weighted_l2"
            (sum_d w_d (q_d - x_d)^2, ascending: see weights).
        weights: "weighted_l2" only: the index's default per-dimension weights, (dim,) finite
            values >= 0 (None: all ones). search(..., weights=w) overrides them for one
            search; `index.weights = w` changes the default. The stored vectors are never
            scaled or copied for either. Rows whose squared norm scaled by them,
            sum_d w_d x_d^2, is too large for float32 distances (above 4.2e37) are refused
            when they are added, and weights that would make a stored row so when they are set.
        device: None or "cpu" (vectors in host memory), or "cuda", "cuda:N", a torch.device:
            vectors in a torch tensor on that GPU, searched there (docs/gpu.md). vectors()
            and reconstruct() then return host copies; save() writes the same file format.
        storage: "fp32" (default), or on a GPU index "fp16" / "bf16": vectors stored in half
            precision (half the device memory and bandwidth; products and sums stay float32).
            Added vectors are rounded to it, and rows beyond float16's range (|x| > 65504)
            are refused. vectors(), reconstruct() and save() give float32 values; the file
            records the storage, which load_index(..., device="cuda") restores.

    Memory: the vectors are held once, as (ntotal, dim) float32 (dim * 4 bytes per
    vector, see `bytes_per_vector`), in a buffer that grows by 1.5x (see `nbytes`). Search
    computes norms on the fly: no other per-vector state is kept. The buffer starts on a
    cache line; from 4 MiB up it is 2 MiB aligned, rounded up to whole 2 MiB pages (at most
    2 MiB beyond `nbytes`) and offered to the kernel for transparent huge pages.

    Thread safety: any number of threads may search at once (the GIL is released during
    the native search), also while another thread writes; add(), add_encoded(), reserve(),
    remove_ids(), reset() and the weights setter serialise among themselves. A search sees
    the vectors present when it started (rows being added become visible together, when the
    add returns), on the CPU with the default weights they were checked against, as do
    save(), to() and copies, on a GPU index too. A signal handler may read the index while its
    own thread writes it.
    """

    def __init__(self, dim: int, metric: str = "l2", device: Any = None, weights: Any = None,
                 storage: str = "fp32"):
        check_metric(metric)
        self._dim = check_dim(dim)
        self._metric = metric
        self._weights = None
        if metric == "weighted_l2":
            self._weights = np.ones(self._dim, np.float32) if weights is None else check_weights(weights, self._dim)
        elif weights is not None:
            raise ValueError(f"weights: only metric='weighted_l2' takes weights (this index uses {metric!r})")
        self._device = _cuda_device.resolve_device(device)  # None: the CPU
        self._storage = _cuda_search.check_storage(storage, self._device is not None)
        # _write_lock serialises the writers for the whole of their work (add_encoded holds it
        # while it encodes); _lock guards the (buffer, ntotal) pair and is held only briefly,
        # so searches never wait for an encoding to finish.
        self._new_locks()
        _LIVE_INDEXES.add(self)
        self._buffer = np.empty((0, self._dim), dtype=np.float32)
        self._ntotal = 0
        self._read_only = False
        self._mapped: MappedFile | None = None  # the file under a memory-mapped buffer
        if self._device is not None:
            self._init_cuda()

    def _new_locks(self) -> None:
        """Fresh, free locks (at construction, and in a forked child: see _free_locks_in_child)."""
        self._write_lock = threading.Lock()
        self._writer: int | None = None  # the thread holding _write_lock (see _writing)
        # Reentrant: Python runs a signal handler at any call, also one made holding _lock
        # (reset's np.empty), and a handler that searches or saves this index took it again
        # on the same thread: it waited for itself for ever. Every state _lock guards is
        # consistent between its statements (see reset), so a handler may read it there.
        self._lock = threading.RLock()

    # -- properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def weights(self) -> np.ndarray | None:
        """The default per-dimension weights of a "weighted_l2" index (a copy), else None."""
        return None if self._weights is None else self._weights.copy()

    @weights.setter
    def weights(self, weights: Any) -> None:
        """New default weights, checked against the stored vectors (one read of them): weights
        that scale a row's squared norm past what a search can use are refused."""
        if self._metric != "weighted_l2":
            raise ValueError(f"weights: only metric='weighted_l2' takes weights (this index uses {self._metric!r})")
        checked = check_weights(weights, self._dim)
        with self._writing("weights"):  # no add can slip a row past the check before the swap
            row = self._overweighted_stored_row(checked)
            if row >= 0:
                raise ValueError(f"weights: they scale the squared norm of the index's row {row} past float32's "
                                 f"range (sum_d w_d x_d^2 above 4.2e37, the most a search can use); lower them, "
                                 f"or rescale the vectors")
            with self._lock:  # beside the rows, which _snapshot reads with them
                self._weights = checked

    def _overweighted_stored_row(self, weights: np.ndarray) -> int:
        """weighted_overflow_row of the stored vectors (call with the write lock held)."""
        if self._device is not None:
            with self._lock:
                stored = self._gpu_buffer[: self._ntotal]
            return int(unusable_row_flag(stored, weights=weights).item()) if stored.shape[0] else -1
        return weighted_overflow_row(self._stored(), weights, "the index's vectors")

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def __len__(self) -> int:
        return self._ntotal

    @property
    def storage(self) -> str:
        """The stored element type: "fp32", or "fp16" / "bf16" on a GPU index."""
        return self._storage

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of storage per vector (its components; nothing else is stored)."""
        return self._dim * (4 if self._storage == "fp32" else 2)

    @property
    def nbytes(self) -> int:
        """Bytes held for vectors now, including spare capacity (0 extra after load); on a
        GPU index, device memory."""
        if self._device is not None:
            return int(self._gpu_buffer.numel() * self._gpu_buffer.element_size())
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
        """Appends the rows of x, (n, dim), numpy or torch. Raises ValueError for NaN / Inf, and
        for rows whose squared norm scaled by a weighted_l2 index's weights is too large for
        float32 distances."""
        if self._device is not None:
            return self._add_cuda(x)
        array, _ = as_matrix(x, "x", dim=self._dim)
        if array.shape[0] == 0:
            return
        if self._weights is None:  # (None for good: only a weighted_l2 index has weights)
            check_rows_usable(array, "x")
        with self._writing("add"):
            if self._weights is not None:  # checked against the weights in place when the rows go
                check_rows_for_index(array, "x", self._weights)  # in (the setter holds this lock)
            self._check_writable("add")
            n, m = self._ntotal, array.shape[0]
            self._grow(n + m)
            self._buffer[n : n + m] = array  # rows past ntotal: no search reads them yet
            with self._lock:
                self._ntotal = n + m

    def reserve(self, rows: int) -> None:
        """Makes room for `rows` more vectors, so that adding them (in any number of calls)
        does not reallocate; e.g. before adding a large file chunk by chunk."""
        rows = check_int(rows, "rows", minimum=0)
        with self._writing("reserve"):
            self._check_writable("reserve")
            try:
                if self._device is not None:
                    self._grow_cuda(self._ntotal + rows, exact=True)
                else:
                    total = self._ntotal + rows
                    if total * self._dim * 4 > _MAX_BUFFER_BYTES:  # no allocator can even be asked for it
                        raise MemoryError(f"cannot allocate {total * self._dim * 4 / 2**30:,.1f} GiB of host memory "
                                          f"for {total:,} vectors of dimension {self._dim}")
                    self._grow(total, exact=True)
            except MemoryError as error:
                raise MemoryError(f"rows: {error}") from None

    def add_encoded(self, model: Any, X: Any, *, batch_size: int | None = None, precision: str = "fp32",
                    device: Any = None, progress: bool = False) -> int:
        """Encodes X with `model` and appends the codes: latentspace.encode(model, X) then
        add(), without holding the codes twice.

        The buffer grows once by len(X) rows and the encoder writes straight into them (an
        iterable X: grown chunk by chunk). model: a latentspace model, nn.Module or
        Encoder (see latentspace.Encoder; its latent_dim must equal this index's dim).
        X, batch_size, precision, device, progress: as for latentspace.encode.

        All or nothing: if encoding fails (NaN in row r of X, a bad chunk, Ctrl-C), no row
        is added. Returns the number of rows added.
        """
        # encode sits above the indexes on the data path; importing it here, when asked,
        # keeps `import latentspace` for search free of torch and the path one-way at import.
        from .._encode_stream import Source
        from ..encoding import as_encoder

        encoder = as_encoder(model, device=device, precision=precision)
        if encoder.latent_dim is not None and encoder.latent_dim != self._dim:
            raise ValueError(f"model: its codes have {encoder.latent_dim} dimensions (latent_dim) but this "
                             f"index holds {self._dim}-dimensional vectors")
        if batch_size is None:
            batch_size = encoder.default_batch_size
        batch_size = check_int(batch_size, "batch_size")
        progress = check_bool(progress, "progress")
        source = Source(X, encoder._sample_shapes)
        with self._writing("add_encoded"):
            self._check_writable("add_encoded")
            if self._device is not None:
                return self._add_encoded_cuda(encoder, source, batch_size, progress)
            if source.rows is not None:
                self._grow(self._ntotal + source.rows)
            first = self._ntotal
            added = encoder._encode_to(source, _IndexRows(self), batch_size, progress)
            # As add() does for its input: codes that search could not use (an overflow in
            # the model on huge but finite inputs) are refused before anyone sees them.
            check_rows_for_index(self._buffer[first : first + added], "the codes of X", self._weights)
            with self._lock:
                self._ntotal += added
        return added

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Holds _write_lock for one write. A write from the thread already writing (a signal
        handler run inside add_encoded's native encode, or X's own iterator calling add) would
        wait for itself forever: it raises instead."""
        me = threading.get_ident()
        if self._writer == me:
            raise RuntimeError(
                f"{what}: this thread is already writing to this index (an add, add_encoded, reserve, remove_ids or "
                "reset further up its stack, e.g. a signal handler or X's iterator running inside "
                "add_encoded); a write nested in another would wait for itself forever")
        with self._write_lock:
            self._writer = me
            try:
                yield
            finally:
                self._writer = None

    def _check_writable(self, what: str) -> None:
        if self._read_only:
            raise ValueError(
                f"{what}: this index is memory-mapped read-only (load_index(..., mmap=True)); "
                "load it with mmap=False to change it"
            )

    def _grow(self, rows: int, *, exact: bool = False, keep: int | None = None) -> None:
        """Capacity for `rows` vectors: geometric growth (many small adds stay linear), or
        exactly `rows` when asked (reserve). The first `keep` rows are carried over (default
        ntotal; add_encoded also keeps the rows it has written so far). Call with
        _write_lock held."""
        capacity = self._buffer.shape[0]
        if rows <= capacity:
            return
        if not exact:
            rows = max(rows, int(capacity * _GROWTH), 16)
        n = self._ntotal if keep is None else keep
        grown = empty_vector_buffer(rows, self._dim)  # cache-line (large: 2 MiB) aligned
        grown[:n] = self._buffer[:n]
        with self._lock:
            self._buffer = grown  # searches in flight keep the old buffer alive

    def reset(self) -> None:
        """Removes all vectors (and drops a memory map)."""
        if self._device is not None:
            return self._reset_cuda()
        with self._writing("reset"), self._lock:
            # ntotal first: a child forked between these lines (no lock protects it there)
            # sees an empty index, never an ntotal beyond its buffer.
            self._ntotal = 0
            self._buffer = np.empty((0, self._dim), dtype=np.float32)
            self._read_only = False
            self._mapped = None

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors for integer ids, an id or a 1-d list of them (a copy, in host
        memory), shape (len(ids), dim)."""
        ids = _id_array(ids)
        if ids.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        if self._device is not None:
            return self._reconstruct_cuda(ids)
        vectors = self.vectors()
        if ids.size and (ids.min() < 0 or ids.max() >= vectors.shape[0]):
            raise ValueError(f"ids: expected values in [0, {vectors.shape[0]}), got {ids.min()}..{ids.max()}")
        return np.array(vectors[ids.reshape(-1)], dtype=np.float32)

    def remove_ids(self, ids: Any) -> int:
        """Removes the vectors with these ids (an id, or a 1-d list, array or tensor of them)
        and returns how many were removed, as faiss's IndexFlat.remove_ids: an id not in the
        index is ignored and a repeated one counts once; ids are positions, so the vectors
        after a removed one move down (a later vector's id drops by the number removed before
        it). The kept vectors go into a new buffer swapped in at the end: a search already
        running reads the vectors as they were (it holds the old buffer), and for that moment
        both are held. A memory-mapped index refuses (load it with mmap=False)."""
        # A uint64 id past int64 wraps to a negative one here: absent either way, so ignored.
        ids = _id_array(ids).astype(np.int64, copy=False)
        with self._writing("remove_ids"):
            self._check_writable("remove_ids")
            n = self._ntotal
            keep = np.ones(n, dtype=bool)
            keep[ids[(ids >= 0) & (ids < n)]] = False  # ids not in the index are ignored, as faiss does
            kept = int(np.count_nonzero(keep))
            if kept == n:
                return 0
            if self._device is not None:
                self._remove_cuda(keep, kept)
                return n - kept
            fresh = self._kept_rows(keep, kept)
            with self._lock:
                # Not reset's "ntotal first": the old buffer's first `kept` rows are not the kept
                # ones, so neither order of two stores is safe to stop between. One statement:
                # nothing (no call, no loop, so no thread switch or fork) runs between its stores.
                self._buffer, self._ntotal = fresh, kept  # searches in flight keep the old buffer
        return n - kept

    def _kept_rows(self, keep: np.ndarray, kept: int) -> np.ndarray:
        """A new buffer of exactly the stored rows `keep` marks, in order, copied straight into
        it (np.take with out= and mode="clip" writes in place: mode="raise", and fancy indexing,
        make a temporary of the rows first). Call with _write_lock held."""
        fresh = empty_vector_buffer(kept, self._dim)
        written = 0
        for start in range(0, keep.size, _GATHER_ROWS):
            rows = start + np.flatnonzero(keep[start : start + _GATHER_ROWS])
            np.take(self._buffer, rows, axis=0, out=fresh[written : written + rows.size], mode="clip")
            written += rows.size
        return fresh

    def vectors(self) -> np.ndarray:
        """A read-only view of the stored vectors, (ntotal, dim) float32 (no copy); on a GPU
        index, a read-only host copy."""
        if self._device is not None:
            return self._vectors_cuda()
        view = self._stored().view()
        view.flags.writeable = False
        return view

    def _stored(self) -> np.ndarray:
        """The stored rows, a view of the buffer; of a memory-mapped one only once its file
        is checked to hold them still (a read past the end of a truncated file is SIGBUS)."""
        return self._snapshot()[0]

    def _snapshot(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(_stored(), the default weights), read together: every stored row was checked
        against these weights. Read apart, a change of weights and an add between the two
        reads paired new rows with old weights, which may refuse them (a search raised for a
        stored row; a saved file, a pickle or a copy could not be loaded)."""
        with self._lock:
            stored, weights, mapped = self._buffer[: self._ntotal], self._weights, self._mapped
        if mapped is not None:
            mapped.check()
        return stored, weights

    # -- search -------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, weights: Any = None, precision: str = "fp32",
               workspace_bytes: int | None = None):
        """k nearest stored vectors of each query: (distances, indices), each (Q, k).

        Same conventions as latentspace.knn (best first, ties to the lower index, -1 and
        +-inf padding when k > ntotal); an empty index returns only padding. Results follow
        the queries' type (numpy or torch); on a GPU index CUDA tensor queries get results on
        the index's device, other queries results in host memory. weights ("weighted_l2"
        only): this search's per-dimension weights instead of the index's. precision,
        workspace_bytes: as for latentspace.knn with its database on the GPU (GPU only:
        "tf32" / "bf16" / "fp16" are refused on a CPU index; workspace_bytes is checked but
        unused there).
        """
        workspace_bytes = _cuda_device.check_budget(workspace_bytes, "workspace_bytes")
        precision_code = _cuda_search.check_precision(precision, self._device is not None)
        w = weights_for(self._metric, weights, self._dim, default=self._weights)
        if self._device is not None:
            # (no weights given: the index's own, read with the rows they were checked against)
            return self._search_cuda(queries, k, workspace_bytes, precision_code, None if weights is None else w)
        q, kind = as_matrix(queries, "queries", dim=self._dim)
        k = check_k(k)
        database, own_weights = self._snapshot()
        if weights is None:
            w = own_weights  # the weights these rows were checked against, not those read above
        distances, indices, d_view, i_view = empty_results(kind, q.shape[0], k)
        native_knn(q, database, k, METRICS[self._metric], d_view, i_view, w, database_name=STORED_ROWS_NAME)
        return distances, indices

    # -- on a GPU (device="cuda"): the vectors in a torch tensor on the device ------------
    @property
    def device(self) -> str:
        """Where the vectors live and searches run: "cpu" or "cuda:N"."""
        return "cpu" if self._device is None else str(self._device)

    def to(self, device: Any) -> "FlatIndex":
        """A new index with the same vectors on `device` (None / "cpu", "cuda", "cuda:N",
        a torch.device); always a copy, also to the same device (a memory-mapped index
        becomes one held in memory). A GPU target keeps the storage; a CPU one stores float32."""
        target = _cuda_device.resolve_device(device)
        if self._device is not None:
            with self._lock:
                stored, weights = self._gpu_buffer[: self._ntotal], self._weights
        else:
            stored, weights = self._snapshot()
        index = FlatIndex(self._dim, self._metric, device=device, weights=weights,
                          storage=self._storage if target is not None else "fp32")
        index.add(stored)
        return index

    def _init_cuda(self) -> None:
        import torch

        # One storage, the tensor: the host buffer is dropped so that no host path uses it.
        self._buffer = None
        self._gpu_buffer = torch.empty((0, self._dim), dtype=_cuda_search.storage_dtype(self._storage),
                                       device=self._device)
        # The norms the kernel needs (l2: squared, cosine: inverse), kept beside the vectors so
        # that a search reads the database once; None for ip (none needed) and weighted_l2
        # (they depend on each search's weights).
        self._gpu_norms = (torch.empty(0, dtype=torch.float32, device=self._device)
                           if self._metric in ("l2", "cosine") else None)

    def _add_cuda(self, x: Any) -> None:
        import torch

        with torch.cuda.device(self._device):
            rows, _ = as_device_matrix(x, "x", self._device, dim=self._dim)
            if rows.shape[0] == 0:
                return
            if self._weights is None:  # (None for good: only a weighted_l2 index has weights)
                check_device_rows_for_index(rows, "x", None)
            with self._writing("add"):
                if self._weights is not None:  # checked against the weights the rows go in with
                    check_device_rows_for_index(rows, "x", self._weights)
                rows = self._to_storage(rows, "x")
                if self._storage != "fp32":  # rounded: a row may cross the limit
                    self._refuse_overweighted_cuda(rows, "x")
                n, m = self._ntotal, rows.shape[0]
                self._grow_cuda(n + m)
                self._gpu_buffer[n : n + m] = rows  # rows past ntotal: no search reads them yet
                self._update_norms_cuda(n, n + m)
                self._publish_cuda(n + m)

    def _to_storage(self, rows: Any, name: str) -> Any:
        """float32 rows rounded to the index's storage; a row that overflows it is refused."""
        if self._storage == "fp32":
            return rows
        stored = rows.to(_cuda_search.storage_dtype(self._storage))
        bad = int(unusable_row_flag(stored).item())
        if bad >= 0:
            raise ValueError(f"{name}: row {bad} has values beyond {self._storage}'s range (|x| > 65504 for fp16); "
                             "rescale the data, or build the index with storage='bf16' or 'fp32'")
        return stored

    def _refuse_overweighted_cuda(self, rows: Any, name: str) -> None:
        """check_rows_for_index's weighted check of usable rows (as stored: float16 / bfloat16
        rounding included) on their device: one pass of torch ops there, one read of the flag."""
        if self._weights is None or rows.shape[0] == 0:
            return
        row = int(unusable_row_flag(rows, weights=self._weights).item())
        if row >= 0:
            raise ValueError(_overweighted_row(name, row))

    def _grow_cuda(self, rows: int, *, exact: bool = False, keep: int | None = None) -> None:
        """_grow for the GPU buffer (same growth rule; call with the write lock held)."""
        import torch

        buffer = self._gpu_buffer
        capacity = buffer.shape[0]
        if rows <= capacity:
            return
        if not exact:
            rows = max(rows, int(capacity * _GROWTH), 16)
        n = self._ntotal if keep is None else keep
        grown = torch.empty((rows, self._dim), dtype=buffer.dtype, device=self._device)
        grown[:n] = buffer[:n]
        norms = None
        if self._gpu_norms is not None:
            norms = torch.empty(rows, dtype=torch.float32, device=self._device)
            norms[:n] = self._gpu_norms[:n]
        # Searches on other streams may see the new buffer as soon as it is swapped in, and the
        # old one may be reused once released: both copies must have landed first.
        torch.cuda.current_stream(self._device).synchronize()
        with self._lock:
            self._gpu_buffer = grown  # searches in flight keep the old buffer alive
            self._gpu_norms = norms

    def _update_norms_cuda(self, start: int, stop: int) -> None:
        """The kept norms of rows [start, stop), from the stored (rounded) vectors."""
        if self._gpu_norms is None:
            return
        squared = self._gpu_norms[start:stop]
        # (one read of the rows on latentspace's kernel, or torch's ops in bounded steps)
        _cuda_row_check.squared_norms_into(self._gpu_buffer[start:stop], squared)
        if self._metric == "cosine":  # inverse norms; a zero vector scores 0
            squared.copy_(squared.rsqrt().where(squared > 0, squared.new_zeros(())))

    def _publish_cuda(self, ntotal: int) -> None:
        """Makes rows up to ntotal visible to searches. Searches on other threads run on other
        streams: the rows must have landed before any of them can see them."""
        import torch

        torch.cuda.current_stream(self._device).synchronize()
        with self._lock:
            self._ntotal = ntotal

    def _add_encoded_cuda(self, encoder: Any, source: Any, batch_size: int, progress: bool) -> int:
        import torch

        with torch.cuda.device(self._device):
            if source.rows is not None:
                self._grow_cuda(self._ntotal + source.rows)
            first = self._ntotal
            added = encoder._encode_to(source, _GpuIndexRows(self), batch_size, progress)
            codes = self._gpu_buffer[first : first + added]
            check_device_rows_for_index(codes, "the codes of X", self._weights)
            self._update_norms_cuda(first, first + added)
            self._publish_cuda(first + added)
        return added

    def _remove_cuda(self, keep: np.ndarray, kept: int) -> None:
        """remove_ids on the GPU: the rows (and norms) `keep` marks gathered into new tensors,
        swapped in once the gather has landed (searches on other streams may see them at once)."""
        import torch

        with torch.cuda.device(self._device):
            with self._lock:
                buffer, norms = self._gpu_buffer, self._gpu_norms
            fresh = gather_kept_rows(buffer, keep, kept)
            fresh_norms = None if norms is None else gather_kept_rows(norms, keep, kept)
            torch.cuda.current_stream(self._device).synchronize()
            with self._lock:
                # One statement: nothing (no call, so no signal handler) runs between its stores,
                # and a reader never pairs the new row count with the old buffer.
                self._ntotal, self._gpu_buffer, self._gpu_norms = kept, fresh, fresh_norms

    def _reset_cuda(self) -> None:
        import torch

        with self._writing("reset"):
            empty = torch.empty((0, self._dim), dtype=_cuda_search.storage_dtype(self._storage), device=self._device)
            empty_norms = None if self._gpu_norms is None else torch.empty(0, dtype=torch.float32, device=self._device)
            with self._lock:
                # One statement, as remove_ids's swap: a signal handler (the lock is reentrant)
                # runs at a call, never between these stores, so it never sees the old norms
                # beside the new buffer.
                self._ntotal, self._gpu_buffer, self._gpu_norms = 0, empty, empty_norms

    def _vectors_cuda(self) -> np.ndarray:
        return self._snapshot_cuda()[0]

    def _snapshot_cuda(self) -> tuple[np.ndarray, np.ndarray | None]:
        """A read-only host copy of the stored rows, and the default weights, read together
        (as _snapshot on the CPU: every stored row was checked against these weights)."""
        with self._lock:
            stored, weights = self._gpu_buffer[: self._ntotal], self._weights
        copy = stored.float().cpu().numpy()
        copy.flags.writeable = False
        return copy, weights

    def _reconstruct_cuda(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with self._lock:
            stored = self._gpu_buffer[: self._ntotal]
        if ids.min() < 0 or ids.max() >= stored.shape[0]:
            raise ValueError(f"ids: expected values in [0, {stored.shape[0]}), got {ids.min()}..{ids.max()}")
        rows = torch.from_numpy(ids.reshape(-1).astype(np.int64)).to(self._device)
        return stored.index_select(0, rows).float().cpu().numpy()

    def _search_cuda(self, queries: Any, k: Any, workspace_bytes: int | None, precision: int = 0,
                     weights: np.ndarray | None = None):
        """search on the GPU; weights: the search's own (checked), or None for the index's."""
        import torch

        with torch.cuda.device(self._device):
            device_queries = is_torch_tensor(queries) and queries.device.type != "cpu"
            q, kind = as_device_matrix(queries, "queries", self._device, dim=self._dim)
            k = check_k(k)
            with self._lock:
                database = self._gpu_buffer[: self._ntotal]
                norms = None if self._gpu_norms is None else self._gpu_norms[: self._ntotal]
                own_weights = weights is None
                weights = self._weights if own_weights else weights
            # Read after the search is queued (search_then_check): the host does not wait for
            # the checks' kernels before queuing the search's.
            backend = _cuda_search.CudaBackend(self._device, precision, weights)
            backend.set_dim(self._dim)
            checks = query_row_checks(q, backend.weights)
            if backend.weights is not None and not own_weights and database.shape[0]:
                # Rows were checked at add against the index's weights, but other weights may
                # push a row's weighted squared norm past float32 (the CPU kernel refuses it):
                # one more read of the vectors, for those only.
                checks.append(database_row_check(database, backend.weights, name=STORED_ROWS_NAME))
            if database.shape[0] == 0:
                raise_unusable_rows(checks)
                distances = torch.full((q.shape[0], k), float(_PAD[self._metric]), device=self._device)
                indices = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=self._device)
            else:
                # The buffer may be replaced (add) and freed while this search is still queued
                # on this thread's stream: the caching allocator must wait for the search.
                database.record_stream(backend.stream)
                if norms is not None:
                    norms.record_stream(backend.stream)
                distances, indices = _cuda_search.search_then_check(
                    lambda: _cuda_search.search_resident(
                        backend, q, database, k, self._metric,
                        workspace_bytes
                        or _cuda_search.resident_workspace_bytes(backend, q.shape[0], database.shape[0], k),
                        norms=norms), checks)
            return _cuda_search.as_caller_results(distances, indices, kind, device_queries)


    # -- persistence --------------------------------------------------------------------
    def __reduce__(self):
        """Pickling (multiprocessing, joblib), copy.copy and copy.deepcopy: a new index with the
        same metric, weights, storage, device and vectors, in a buffer and locks of its own (the
        default shallow copy shared the buffer, so rows one added in its spare capacity
        overwrote the other's; the locks cannot be pickled). A memory-mapped index becomes one
        held in memory, as with to()."""
        device = None if self._device is None else str(self._device)
        vectors, weights = self._snapshot() if self._device is None else self._snapshot_cuda()
        return _rebuilt, (self._dim, self._metric, weights, self._storage, device, vectors)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to `path` atomically (versioned, checksummed; see indexes/io.py)."""
        # (the same file from a GPU index: a host copy first)
        database, weights = self._snapshot() if self._device is None else self._snapshot_cuda()
        save_index_file(path, self._file_header(database.shape[0], weights), database)

    def _file_header(self, ntotal: int, weights: np.ndarray | None = None) -> dict:
        """The header of this index's file when it holds `ntotal` vectors (indexes/io.py), with
        `weights` as its default weights (None: the index's own; save passes those it read
        with the rows)."""
        weights = self._weights if weights is None else weights
        header = {"type": "FlatIndex", "metric": self._metric, "dim": self._dim,
                  "ntotal": int(ntotal), "writer": _native.__version__}
        if weights is not None:
            header["weights"] = [float(w) for w in weights]  # float32 values: exact in JSON
        if self._storage != "fp32":
            header["storage"] = self._storage  # restored when loaded onto a GPU
        return header

    @classmethod
    def _from_file(cls, header: dict, data: np.ndarray, mapped: MappedFile | None, path: Any) -> "FlatIndex":
        """The index of a loaded file; load_index_file checked the integer fields, the rest
        (metric, weights, storage) are checked here as the constructor checks its arguments
        (check_metric: a crafted ["l2"] is refused by type, not hashed)."""
        weights = header.get("weights")
        if weights is not None and not (isinstance(weights, list) and all(type(w) in (int, float) for w in weights)):
            # numpy would read [true, 1] as integers: JSON's bools are no weights
            raise IndexFileError(f"{path}: corrupted index header (weights: expected a list of numbers)")
        try:
            check_metric(header.get("metric"))
            index = cls(header["dim"], header["metric"], weights=weights)
            _cuda_search.check_storage(header.get("storage", "fp32"), True)
        except (TypeError, ValueError) as error:
            raise IndexFileError(f"{path}: corrupted index header ({error})") from None
        index._buffer = data
        index._ntotal = data.shape[0]
        index._read_only = mapped is not None  # (an empty file maps nothing)
        index._mapped = mapped
        return index


# Every index alive in this process, for the fork handler below (weak: no index is kept alive).
_LIVE_INDEXES: "weakref.WeakSet[FlatIndex]" = weakref.WeakSet()


def _refuse_rows_add_refuses(index: FlatIndex, path: Any) -> None:
    """IndexFileError naming the file and the first stored row add() would refuse (NaN, Inf,
    a squared norm, plain or weighted by the index's weights, past what a search can use):
    under a valid CRC only a crafted or corrupted file holds one, and it loaded only to fail
    every search, naming 'database'."""
    try:
        check_rows_for_index(index._stored(), "data", index._weights)
    except ValueError as error:
        reason = str(error).removeprefix("data: ")
        raise IndexFileError(f"{path}: corrupted index data ({reason})") from None


def _id_array(ids: Any) -> np.ndarray:
    """ids as a 1-d integer numpy array (an id, a list, an array or a tensor of them), named
    `ids` in every refusal."""
    if is_torch_tensor(ids):  # np.asarray's torch errors (sparse, meta, neg bit) name no argument
        check_dense(ids, "ids")
        ids = detached(ids).cpu().numpy()
    given = ids
    ids = np.asarray(ids)
    if ids.ndim > 1:  # else flattened: rows in an order the caller never chose
        raise ValueError(f"ids: expected an id or a 1-d list of ids, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        values = _python_ints(given)
        if values:  # numpy made them float64 or object: one is past int64 / uint64
            raise TypeError(f"ids: expected integers within int64's or uint64's range, "
                            f"got {min(values)}..{max(values)}")
        raise TypeError(f"ids: expected integers, got {ids.dtype}")
    return ids.reshape(-1)


def _python_ints(ids: Any) -> list:
    """ids as a list when they are an int (not a bool) or a list / tuple of them (numpy's own
    integer scalars included), else an empty list."""
    values = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return values if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) else []


def _free_locks_in_child() -> None:
    # A child forked (multiprocessing's default start method on Linux) while another thread
    # was adding to an index inherits that thread's locks held, but not the thread that would
    # release them: the child's first write waited forever. The child has no other thread, and
    # the state it inherits is consistent (rows being added are unpublished until ntotal moves),
    # so it starts with free locks.
    for index in list(_LIVE_INDEXES):
        index._new_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_free_locks_in_child)


def check_rows_for_index(rows: np.ndarray, name: str, weights: np.ndarray | None, first_row: int = 0) -> None:
    """The check add() makes of rows going into an index (a C-contiguous float32 matrix):
    check_rows_usable's, and with a weighted_l2 index's weights, a ValueError naming `name`
    and the first row (first_row + r) in row order that a search could not use, whichever its
    kind: NaN / Inf in check_rows_usable's words, a weighted squared norm in add's own."""
    if weights is None:
        check_rows_usable(rows, name, first_row=first_row)
        return
    row = weighted_overflow_row(rows, weights, name, first_row)
    if row >= 0:
        raise ValueError(_overweighted_row(name, first_row + row))


def check_device_rows_for_index(rows: Any, name: str, weights: np.ndarray | None) -> None:
    """check_rows_for_index of a tensor on its device (a GPU index's add and add_encoded): the
    first refused row in row order, whichever its kind, in the words of its kind. One combined
    flag read; only a refused row is looked at again, to tell its kind."""
    if weights is None:
        check_rows_usable_flags([unusable_row_flag(rows)], [name])
        return
    row = int(unusable_row_flag(rows, weights=weights).item())
    if row < 0:
        return
    check_rows_usable_flags([unusable_row_flag(rows[row : row + 1], row)], [name])  # NaN, Inf: the plain words
    raise ValueError(_overweighted_row(name, row))


def _overweighted_row(name: str, row: int) -> str:
    return (f"{name}: row {row}: its squared norm scaled by the index's weights (sum_d w_d x_d^2) overflows "
            "float32 distances (above 4.2e37, the most a search can use); rescale the data or lower the weights")


def save_rows_as_index(path: str | os.PathLike, rows: int, chunks: Iterable[np.ndarray], dim: int,
                       metric: str = "l2", *, weights: Any = None) -> None:
    """Writes the file that FlatIndex(dim, metric, weights=weights) holding these rows would
    save, without holding them: `chunks` yields (m, dim) float32 C-contiguous arrays, `rows`
    in all, each already checked as add() checks its input (check_rows_for_index). For data
    larger than memory (`latentspace index build`); load_index(path, mmap=True) then searches it."""
    header = FlatIndex(dim, metric, weights=weights)._file_header(rows)  # checks dim, metric, weights
    save_index_file_streaming(path, header, chunks)


def _rebuilt(dim: int, metric: str, weights: Any, storage: str, device: Any, vectors: np.ndarray) -> FlatIndex:
    """FlatIndex.__reduce__'s constructor: an index holding a copy of `vectors`."""
    index = FlatIndex(dim, metric, device=device, weights=weights, storage=storage)
    index.add(vectors)
    return index


class _IndexRows:
    """add_encoded's destination: the rows after ntotal in the index's own buffer, grown
    as chunks arrive (held under the index's write lock; ntotal moves only at the end)."""

    def __init__(self, index: FlatIndex):
        self._index = index
        self._first = index._ntotal

    def _check_width(self, dim: int) -> None:
        if dim != self._index._dim:  # a module whose width was unknown before its first chunk
            raise ValueError(f"model: its codes have {dim} dimensions but this index holds "
                             f"{self._index._dim}-dimensional vectors")

    def reserve(self, start: int, rows: int, dim: int) -> np.ndarray:
        self._check_width(dim)
        row = self._first + start
        self._index._grow(row + rows, keep=row)  # the codes written so far move with the buffer
        return self._index._buffer[row : row + rows]

    def finish(self, rows: int, dim: int | None) -> int:
        return rows


class _GpuIndexRows(_IndexRows):
    """_IndexRows for an index on a GPU: the blocks are rows of its device tensor (the
    encoder copies each chunk's codes there)."""

    def reserve(self, start: int, rows: int, dim: int) -> Any:
        self._check_width(dim)
        row = self._first + start
        self._index._grow_cuda(row + rows, keep=row)
        return self._index._gpu_buffer[row : row + rows]


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
    file or one that is not a regular file (a FIFO), FileNotFoundError when there is none,
    IsADirectoryError for a folder.
    """
    target = _cuda_device.resolve_device(device)  # before reading: a bad device fails fast
    mmap, verify = check_bool(mmap, "mmap"), check_bool(verify, "verify")  # "no" would read as true
    header, data, mapped = open_index_file(path, mmap=mmap, verify=verify)
    kind = header.get("type")
    if kind == "FlatIndex":
        index = FlatIndex._from_file(header, data, mapped, path)
        if verify:  # (a second read of the rows, as add() checks them: save never wrote such a row)
            _refuse_rows_add_refuses(index, path)
        if target is None:
            return index  # float32 on the CPU, whatever the saved GPU storage
        gpu = FlatIndex(index.dim, index.metric, device=target, weights=index._weights,
                        storage=header.get("storage", "fp32"))
        gpu.add(index.vectors())
        return gpu
    raise IndexFileError(f"{path}: unknown index type {kind!r}")

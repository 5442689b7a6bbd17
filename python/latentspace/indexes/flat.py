"""FlatIndex: exact search over vectors held in one contiguous float32 array."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from .. import _native
from .._arrays import (
    METRICS,
    as_matrix,
    check_dim,
    check_int,
    check_k,
    check_metric,
    check_rows_usable,
    empty_results,
)
from .io import IndexFileError, load_index_file, save_index_file

_GROWTH = 1.5  # capacity grows geometrically so that many small add() calls stay linear


class FlatIndex:
    """Exact (brute-force) index, faiss-style: add vectors, search the k nearest.

    Args:
        dim: vector dimension, >= 1.
        metric: "l2" (squared Euclidean, ascending), "ip" (inner product, descending) or
            "cosine" (cosine similarity, descending; zero vectors score 0).

    Memory: the vectors are held once, as (ntotal, dim) float32 (dim * 4 bytes per
    vector, see `bytes_per_vector`), in a buffer that grows by 1.5x (see `nbytes`). Search
    computes norms on the fly: no other per-vector state is kept.

    Thread safety: any number of threads may search at once (the GIL is released during
    the native search), also while another thread adds; add(), add_encoded(), reserve()
    and reset() serialise among themselves. A search sees the vectors present when it
    started (rows being added become visible together, when the add returns).
    """

    def __init__(self, dim: int, metric: str = "l2"):
        check_metric(metric)
        self._dim = check_dim(dim)
        self._metric = metric
        # _write_lock serialises the writers for the whole of their work (add_encoded holds it
        # while it encodes); _lock guards the (buffer, ntotal) pair and is held only briefly,
        # so searches never wait for an encoding to finish.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._buffer = np.empty((0, self._dim), dtype=np.float32)
        self._ntotal = 0
        self._read_only = False

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
        """Bytes held for vectors now, including spare capacity (0 extra after load)."""
        return int(self._buffer.nbytes)

    @property
    def is_mmap(self) -> bool:
        """True when the vectors are memory-mapped from a file (read-only)."""
        return self._read_only

    def __repr__(self) -> str:
        extra = ", mmap" if self._read_only else ""
        return f"FlatIndex(dim={self._dim}, metric={self._metric!r}, ntotal={self._ntotal}{extra})"

    # -- contents -----------------------------------------------------------------------
    def add(self, x: Any) -> None:
        """Appends the rows of x, (n, dim), numpy or torch. Raises ValueError for NaN / Inf."""
        array, _ = as_matrix(x, "x", dim=self._dim)
        if array.shape[0] == 0:
            return
        check_rows_usable(array, "x")
        with self._write_lock:
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
        with self._write_lock:
            self._check_writable("reserve")
            self._grow(self._ntotal + rows, exact=True)

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
        source = Source(X, encoder._sample_shapes)
        with self._write_lock:
            self._check_writable("add_encoded")
            if source.rows is not None:
                self._grow(self._ntotal + source.rows)
            first = self._ntotal
            added = encoder._encode_to(source, _IndexRows(self), batch_size, progress)
            # As add() does for its input: codes that search could not use (an overflow in
            # the model on huge but finite inputs) are refused before anyone sees them.
            check_rows_usable(self._buffer[first : first + added], "the codes of X")
            with self._lock:
                self._ntotal += added
        return added

    def _check_writable(self, what: str) -> None:
        if self._read_only:
            raise ValueError(
                f"{what}: this index is memory-mapped read-only (load_index(..., mmap=True)); "
                "load it with mmap=False to add vectors"
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
        grown = np.empty((rows, self._dim), dtype=np.float32)
        grown[:n] = self._buffer[:n]
        with self._lock:
            self._buffer = grown  # searches in flight keep the old buffer alive

    def reset(self) -> None:
        """Removes all vectors (and drops a memory map)."""
        with self._write_lock, self._lock:
            self._buffer = np.empty((0, self._dim), dtype=np.float32)
            self._ntotal = 0
            self._read_only = False

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors for integer ids (a copy), shape (len(ids), dim)."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids: expected integers, got {ids.dtype}")
        vectors = self.vectors()
        if ids.size and (ids.min() < 0 or ids.max() >= vectors.shape[0]):
            raise ValueError(f"ids: expected values in [0, {vectors.shape[0]}), got {ids.min()}..{ids.max()}")
        return np.array(vectors[ids.reshape(-1)], dtype=np.float32)

    def vectors(self) -> np.ndarray:
        """A read-only view of the stored vectors, (ntotal, dim) float32 (no copy)."""
        with self._lock:
            view = self._buffer[: self._ntotal].view()
        view.flags.writeable = False
        return view

    # -- search -------------------------------------------------------------------------
    def search(self, queries: Any, k: int):
        """k nearest stored vectors of each query: (distances, indices), each (Q, k).

        Same conventions as latentspace.knn (best first, ties to the lower index, -1 and
        +-inf padding when k > ntotal); an empty index returns only padding.
        """
        q, kind = as_matrix(queries, "queries", dim=self._dim)
        k = check_k(k)
        with self._lock:
            database = self._buffer[: self._ntotal]
        distances, indices, d_view, i_view = empty_results(kind, q.shape[0], k)
        _native.knn(q, database, k, METRICS[self._metric], d_view, i_view)
        return distances, indices

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to `path` atomically (versioned, checksummed; see indexes/io.py)."""
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


class _IndexRows:
    """add_encoded's destination: the rows after ntotal in the index's own buffer, grown
    as chunks arrive (held under the index's write lock; ntotal moves only at the end)."""

    def __init__(self, index: FlatIndex):
        self._index = index
        self._first = index._ntotal

    def reserve(self, start: int, rows: int, dim: int) -> np.ndarray:
        if dim != self._index._dim:  # a module whose width was unknown before its first chunk
            raise ValueError(f"model: its codes have {dim} dimensions but this index holds "
                             f"{self._index._dim}-dimensional vectors")
        row = self._first + start
        self._index._grow(row + rows, keep=row)  # the codes written so far move with the buffer
        return self._index._buffer[row : row + rows]

    def finish(self, rows: int, dim: int | None) -> int:
        return rows


def load_index(path: str | os.PathLike, *, mmap: bool = False, verify: bool = True):
    """Loads an index saved with `index.save(path)`.

    Args:
        mmap: map the vectors read-only instead of reading them, so an index larger than
            RAM can still be searched (pages are read on demand).
        verify: check the CRC-32 of the vectors (reads the whole file once; the header is
            always checked). Pass False to open a huge mapped index without a full read.

    Raises IndexFileError (a ValueError) for a foreign, truncated, corrupted or too-new
    file, FileNotFoundError when there is none.
    """
    header, data = load_index_file(path, mmap=mmap, verify=verify)
    kind = header.get("type")
    if kind == "FlatIndex":
        return FlatIndex._from_file(header, data, mmap)
    raise IndexFileError(f"{path}: unknown index type {kind!r}")

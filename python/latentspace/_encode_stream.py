"""Where encode's rows come from and where its codes go.

Sources cut X into chunks of at most batch_size rows without converting or copying it (a
memory map is read chunk by chunk as the encoder gets to it). Destinations hand out, for
each chunk, the rows its codes are written into: a slice of the caller's `out`, of a new
array, or (FlatIndex.add_encoded) of an index's own buffer. Codes are never held twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from ._arrays import ArrayKind, check_apart, check_encode_out, check_rows, is_torch_tensor, refuse_masked
from ._encode_device_out import check_apart_on_device, check_device_out, is_device_tensor

__all__ = ["BlockSource", "Destination", "NewArray", "Source", "UserOut", "checked_out", "check_apart_from_out"]

# What next() returns when an iterable X is exhausted: not None, which an iterable may
# yield by mistake, and which must be refused as a bad chunk, not end the stream.
_END = object()


def checked_out(out: Any, rows: int | None, dim: int | None) -> Any:
    """What encode writes `out`'s rows through: a writable float32 numpy view of a host `out`
    (numpy, memory map, CPU tensor), or a CUDA tensor itself; refused with a ValueError /
    TypeError naming out when it cannot hold the codes. rows / dim None: not known yet."""
    return check_device_out(out, rows, dim) if is_device_tensor(out) else check_encode_out(out, rows, dim)


def check_apart_from_out(x: Any, name: str, out: Any) -> None:
    """Refuses an `out` that overlaps the input x (named `name`), in host or in GPU memory."""
    check_apart(x, name, out)
    check_apart_on_device(x, name, out)


class Source:
    """X as (start, chunk, name) pieces: the numpy array / memory map / torch tensor cut
    into slices, or each array an iterable yields (split when bigger than a batch).

    rows: the row count when X says it up front (an array), None for an iterable.
    kind: "numpy" or "torch" (of X, or of an iterable's first chunk), for the result's type.
    device: the torch device of a torch X (its first chunk), None for numpy.
    out: the caller's `out`, if any: X (every chunk of an iterable) must not overlap it.
    """

    def __init__(self, X: Any, sample_shapes: tuple[tuple[int, ...], ...] | None, *, out: Any = None):
        self._sample_shapes = sample_shapes
        self._out = out
        self._first: Any = None
        self._sample_shape: tuple[int, ...] | None = None  # an iterable's first chunk's, past the rows
        if isinstance(X, (str, bytes, Mapping)) or X is None or np.isscalar(X):
            raise TypeError("X: expected a numpy array, a torch tensor or an iterable of 2-d chunks, "
                            f"got {type(X).__name__}")
        if isinstance(X, (list, tuple)):  # nested lists are one array, as everywhere in latentspace
            try:
                X = np.asarray(X)
            except ValueError as error:
                raise ValueError(f"X: a list or tuple is read as one array and this one is not ({error}); "
                                 "pass iter(chunks) to encode a list of chunks") from None
        if isinstance(X, np.ndarray) or is_torch_tensor(X):
            refuse_masked(X, "X")
            check_rows(X, "X", sample_shapes)
            check_apart_from_out(X, "X", out)
            self._array, self._chunks = X, None
            self.rows: int | None = int(X.shape[0])
            self.kind: ArrayKind = "torch" if is_torch_tensor(X) else "numpy"
            self.device = X.device if self.kind == "torch" else None
            return
        shape = getattr(X, "shape", None)
        if isinstance(shape, tuple) and len(shape) >= 2 and hasattr(X, "dtype"):
            # An array-like (h5py.Dataset, zarr.Array) iterates row by row, so each row would be
            # refused as a chunk "of shape (d,)": say what X is and the fix instead.
            raise TypeError(f"X: a {type(X).__name__} of shape {shape} is neither a numpy array nor a torch tensor, "
                            "and iterating it gives single rows, not chunks; pass np.asarray(X) (or a memory map), "
                            "or chunks of rows: (X[i : i + n] for i in range(0, len(X), n))")
        try:
            iterator = iter(X)
        except TypeError:
            raise TypeError("X: expected a numpy array, a torch tensor or an iterable of 2-d chunks, "
                            f"got {type(X).__name__}") from None
        self._array, self._chunks, self.rows = None, iterator, None
        # The first chunk decides the result's type: read it now.
        first = next(iterator, _END)
        self._first = None if first is _END else self._checked_chunk(first, 0)
        # (kept apart from the chunk, which chunks() lets go of once it is encoded)
        self._sample_shape = None if self._first is None else tuple(self._first.shape[1:])
        first_is_torch = self._first is not None and is_torch_tensor(self._first)
        self.kind = "torch" if first_is_torch else "numpy"
        self.device = self._first.device if first_is_torch else None

    def _checked_chunk(self, chunk: Any, i: int) -> Any:
        name = f"X[{i}]"  # the i-th chunk the iterable yielded
        if isinstance(chunk, (list, tuple)):
            try:
                chunk = np.asarray(chunk)
            except ValueError as error:
                raise ValueError(f"{name}: a list or tuple is read as one array and this one is not "
                                 f"({error})") from None
        refuse_masked(chunk, name)
        check_rows(chunk, name, self._sample_shapes)
        check_apart_from_out(chunk, name, self._out)
        if self._sample_shapes is None:
            # A module of unknown input shape: every chunk must look like the first.
            if self._sample_shape is not None and tuple(chunk.shape[1:]) != self._sample_shape:
                raise ValueError(f"{name}: expected shape (n, {', '.join(map(str, self._sample_shape))}) "
                                 f"like the first chunk, got {tuple(chunk.shape)}")
        return chunk

    def chunks(self, batch_size: int) -> Iterator[tuple[int, Any, tuple[int, int] | None]]:
        """(start row within X, piece, origin): origin is None for an array, (i, first row of
        chunk i) for the i-th chunk of an iterable, so errors can name both. An empty array
        yields one empty piece (a module of unknown output width can still be asked for it)."""
        if self._array is not None:
            n = self.rows
            if n == 0:
                yield 0, self._array, None
            for start in range(0, n, batch_size):
                yield start, self._array[start : start + batch_size], None
            return
        start = 0
        i = 0
        pending, self._first = self._first, None  # held only while it is encoded, as any chunk
        while pending is not None:
            for offset in range(0, max(int(pending.shape[0]), 1), batch_size):
                yield start + offset, pending[offset : offset + batch_size], (i, start)
            start += int(pending.shape[0])
            i += 1
            following = next(self._chunks, _END)
            pending = None if following is _END else self._checked_chunk(following, i)


class BlockSource:
    """The rows of one array of known shape, handed over a block at a time by a reader (the
    CLI's files, read in blocks): encoded as Source encodes the array itself, and named as it,
    "X: row 70000", not as an iterable's chunks ("row 70000 (row 4464 of chunk X[1])").

    blocks: an iterator of (rows, *sample) numpy arrays, in order, whose row counts add up to
    shape[0] (checked as they arrive); shape: the array's, already checked against the model."""

    kind: ArrayKind = "numpy"
    device = None

    def __init__(self, blocks: Iterator[Any], shape: tuple[int, ...]):
        self._blocks, self._shape = blocks, tuple(shape)
        self.rows: int | None = int(shape[0])

    def chunks(self, batch_size: int) -> Iterator[tuple[int, Any, tuple[int, int] | None]]:
        start = 0
        for block in self._blocks:
            if tuple(block.shape[1:]) != self._shape[1:] or start + len(block) > self.rows:
                raise ValueError(f"X: its reader gave a block of shape {tuple(block.shape)} at row {start} "
                                 f"of an array of shape {self._shape}")
            check_rows(block, "X", (self._shape[1:],))
            for offset in range(0, len(block), batch_size):
                yield start + offset, block[offset : offset + batch_size], None
            start += len(block)
        if start != self.rows:
            raise ValueError(f"X: its reader gave {start} rows of an array of shape {self._shape}")


class Destination(Protocol):
    """Where codes go: reserve() gives the (rows, dim) block for the chunk starting at row
    `start` (a writable float32 numpy view, or a torch tensor on a GPU); finish() gives the
    result once `rows` rows are written (raising if they do not fill it). A destination that
    knows how many rows it takes before they come (a caller's out) says so in `expected_rows`
    (optional; the progress bar's total for an iterable X, whose length is unknown)."""

    def reserve(self, start: int, rows: int, dim: int) -> Any: ...

    def finish(self, rows: int, dim: int | None) -> Any: ...


class UserOut:
    """The caller's `out`: checked up front, filled in place, returned as given. Its rows are
    written through a numpy view on the host, or directly on a GPU."""

    def __init__(self, out: Any, rows: int | None, dim: int | None):
        self._out = out
        self._view = checked_out(out, rows, dim)
        self.expected_rows = int(self._view.shape[0])  # X's chunks must fill it exactly

    def reserve(self, start: int, rows: int, dim: int) -> Any:
        capacity, width = self._view.shape
        if width != dim:
            raise ValueError(f"out: expected shape (n, {dim}) (the model's latent_dim), got {tuple(self._view.shape)}")
        if start + rows > capacity:
            raise ValueError(f"out: has room for {capacity} rows, but X holds more (at least {start + rows})")
        return self._view[start : start + rows]

    def finish(self, rows: int, dim: int | None) -> Any:
        if rows != self._view.shape[0]:
            raise ValueError(f"out: has {self._view.shape[0]} rows, but X held only {rows}; "
                             f"pass out[:{rows}] (its contents are unspecified now)")
        return self._out


class NewArray:
    """A new result of the input's type: one (rows, dim) allocation when the row count is
    known, else one block per chunk, joined at the end."""

    def __init__(self, rows: int | None, kind: ArrayKind, device: Any):
        self._rows, self._kind, self._device = rows, kind, device
        self._whole: Any = None
        self._parts: list[Any] = []

    def _allocate(self, rows: int, dim: int) -> Any:
        if self._kind == "numpy":
            return np.empty((rows, dim), dtype=np.float32)
        import torch

        return torch.empty((rows, dim), dtype=torch.float32, device=self._device)

    @staticmethod
    def _writable(block: Any) -> Any:
        # CPU tensors are written through their numpy view (shared memory), GPU ones directly.
        return block.numpy() if is_torch_tensor(block) and block.device.type == "cpu" else block

    def reserve(self, start: int, rows: int, dim: int) -> Any:
        if self._rows is None:
            self._parts.append(self._allocate(rows, dim))
            return self._writable(self._parts[-1])
        if self._whole is None:
            self._whole = self._allocate(self._rows, dim)
        return self._writable(self._whole[start : start + rows])

    def finish(self, rows: int, dim: int | None) -> Any:
        if self._whole is not None:
            return self._whole
        if dim is None:
            raise ValueError("X: holds no rows, and this module's output width is unknown until it has "
                             "encoded some; pass out= of shape (0, latent_dim) for an empty result")
        if self._rows is not None or not self._parts:
            return self._allocate(rows, dim)
        if len(self._parts) == 1:
            return self._parts[0]
        if self._kind == "numpy":
            return np.concatenate(self._parts)
        import torch

        return torch.cat(self._parts)

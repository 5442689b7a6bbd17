"""The training rows: X checked once, then served in batches as tensors of the model's dtype
on the training device."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._arrays import check_real_dtype, is_torch_tensor, numpy_to_tensor, refuse_masked
from .models.base import ReconstructionModel, module_device_dtype

__all__ = ["TrainingData"]

CHECK_CHUNK_ROWS = 65536  # rows per pass when checking the data (works on memory maps)
# ... and at most this many bytes of them in float64 (a torch chunk's copy, numpy's |x|), so
# that checking wide rows does not take memory on the order of the data itself
CHECK_CHUNK_BYTES = 32 << 20
RESIDENT_MAX_BYTES = 1 << 30  # data up to this size is moved to the device once, whole

_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class TrainingData:
    """The training rows, checked once, served in batches as tensors of the model's dtype
    (float32 unless the model was converted) on the device.

    In-memory data up to 1 GiB (in that dtype) is converted and moved to the device once, and
    data of that dtype in CPU memory is used in place for CPU training, whatever its size; a
    memory map, or other data, stays where it is and each batch is gathered from it (rows in
    ascending order, so a memory map is read front to back).
    """

    def __init__(self, X: Any, model: ReconstructionModel, loss: str, device: torch.device):
        self.dtype = module_device_dtype(model)[1]  # float32 unless the model was converted
        shapes = model._sample_shapes()
        want = " or ".join("(n, " + ", ".join(map(str, s)) + ")" for s in shapes)
        if is_torch_tensor(X):
            X = X.detach()
        elif not isinstance(X, np.ndarray):  # a np.memmap is an ndarray: never copied whole
            if isinstance(X, (str, bytes)) or X is None:
                raise TypeError(f"X: expected a numpy array or torch tensor, got {type(X).__name__}")
            given, X = type(X).__name__, np.asarray(X)
            if X.ndim == 0 and X.dtype == object:  # a generator, a dict: np.asarray wraps it whole
                raise TypeError(f"X: expected a numpy array, memory map or torch tensor of shape {want}, got {given} "
                                "(make an array of its rows first, np.stack(list(X)) say)")
        refuse_masked(X, "X")  # (np.asarray would train on the masked entries' values)
        check_real_dtype(X, "X")
        if X.ndim < 2 or tuple(X.shape[1:]) not in shapes:
            raise ValueError(f"X: expected shape {want} for this {type(model).__name__}, got {tuple(X.shape)}")
        # the file a memory map reads, or None (checkpoint= must not overwrite it)
        self.mapped_file: str | None = getattr(X, "filename", None) if isinstance(X, np.memmap) else None
        self.n = int(X.shape[0])
        self._loss = loss
        self._check_values(X, loss, self.dtype)
        self.device = device
        nbytes = self.n * int(np.prod(X.shape[1:])) * self.dtype.itemsize
        in_memory = is_torch_tensor(X) or not isinstance(X, np.memmap)
        # data of the model's dtype already in CPU memory is used in place, however large
        zero_copy = device.type == "cpu" and (
            (is_torch_tensor(X) and X.device.type == "cpu" and X.dtype == self.dtype)
            or (not is_torch_tensor(X) and X.dtype == _NUMPY_OF.get(self.dtype) and X.flags.c_contiguous
                and X.flags.writeable))
        self.resident = in_memory and (zero_copy or nbytes <= RESIDENT_MAX_BYTES)
        if self.resident:
            tensor = X if is_torch_tensor(X) else numpy_to_tensor(X)
            self.tensor = tensor.to(device=device, dtype=self.dtype)
        else:
            self.source = X

    @staticmethod
    def _check_values(X: Any, loss: str, dtype: torch.dtype) -> None:
        low, high = math.inf, -math.inf
        largest = torch.finfo(dtype).max  # the model's dtype: values beyond it become inf
        row_bytes = 8 * max(1, int(np.prod(X.shape[1:])))
        step = max(1, min(CHECK_CHUNK_ROWS, CHECK_CHUNK_BYTES // row_bytes))
        for start in range(0, X.shape[0], step):
            chunk = X[start : start + step]
            if is_torch_tensor(chunk):
                chunk = chunk.to("cpu", torch.float64).numpy()
            rows = chunk.reshape(chunk.shape[0], -1)
            finite = np.isfinite(rows).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise ValueError(f"X: row {row} contains NaN or Inf; clean the data before training")
            # (only where the data's dtype reaches past the model's: a float32 array cannot
            # exceed a float64 model's range, nor be compared with it without overflowing)
            reaches = rows.dtype.kind != "f" or float(np.finfo(rows.dtype).max) > largest
            beyond = (np.abs(rows) > largest).any(axis=1) if reaches else np.zeros(rows.shape[0], dtype=bool)
            if beyond.any():
                row = start + int(np.flatnonzero(beyond)[0])
                name = str(dtype).removeprefix("torch.")
                raise ValueError(f"X: row {row} has values beyond {name}'s range (|x| > {largest:.4g}), the model's "
                                 "dtype; rescale the data")
            if chunk.size:
                low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        if loss == "bce" and (low < 0 or high > 1):
            raise ValueError(
                f"X: loss='bce' needs data in [0, 1] (probabilities, such as pixel intensities), got "
                f"values in [{low:g}, {high:g}]; rescale the data or use loss='mse' (with output='linear')"
            )

    def recheck(self) -> str | None:
        """The checks of the data the batches are drawn from, made again after a divergence:
        what they find now ("X: row 123 contains NaN or Inf", a memory map written during
        training), or None."""
        try:
            self._check_values(self.tensor if self.resident else self.source, self._loss, self.dtype)
        except ValueError as error:
            return str(error).split(";")[0]
        return None

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        """The batch's samples in the order of `rows` (an int64 CPU tensor of row numbers), as
        the labels are gathered."""
        if self.resident:
            return self.tensor[rows.to(self.device)]
        # Read in ascending row order (a memory map pages forward), then put the samples back in
        # the order asked: the metric term pairs them with labels[rows].
        order = np.argsort(rows.numpy(), kind="stable")
        ordered = rows.numpy()[order]
        chunk = self.source[torch.from_numpy(ordered)] if is_torch_tensor(self.source) else self.source[ordered]
        tensor = chunk if is_torch_tensor(chunk) else numpy_to_tensor(np.asarray(chunk))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return tensor[torch.from_numpy(back)].to(device=self.device, dtype=self.dtype)

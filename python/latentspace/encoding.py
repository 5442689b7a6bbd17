"""Batched encoding of any number of rows, native where the model allows, torch elsewhere.

    Z = latentspace.encode(model, X)                      # numpy in, numpy out
    encoder = latentspace.Encoder(model)                  # reuse: weights exported once
    encoder.backend, encoder.kernel                       # "native", "avx2" (or "torch", why)
    encoder.encode(X, out=Z)                              # writes into Z, returns it

Models whose encoder is a chain of Linear layers and elementwise activations (Autoencoder,
the VAE's mean head, fitted PCA, a plain nn.Sequential MLP) run on the native encoder
(latentspace._native.MlpEncoder: OpenMP + SIMD, the GIL released) when the work runs on the
CPU, and on a CUDA GPU (_native.CudaMlpEncoder, _cuda_encoder.py) unless LATENTSPACE_CUDA_ENCODER
is "torch" (or the build has no CUDA kernels); every other model, and other work on a GPU,
runs the model's own torch code under the same API.
`Encoder.backend` and `Encoder.reason` say which and why, and `encode()` logs
them on the "latentspace" logger at INFO.

(The module is encoding.py, not encode.py: a submodule named encode would be bound over
the function latentspace.encode when first imported, as train.py would over train.)
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _cuda_encoder, _native
from ._cuda_switch import kernels_run_everywhere
from ._arrays import (check_bool, check_int, finite_row_flags, first_false_row, first_nonfinite_row, is_torch_tensor,
                      resolve_device, rows_as_float32, rows_as_tensor)
from ._encode_export import MlpLayer, MlpSpec, NotExportable, export_layers
from ._encode_stream import Destination, NewArray, Source, UserOut, checked_out
from .models.base import LatentModel, module_device_dtype

__all__ = ["Encoder", "MlpLayer", "MlpSpec", "NotExportable", "encode", "export_layers"]

logger = logging.getLogger("latentspace")

PRECISIONS = ("fp32", "bf16")
# Rows per chunk. The native encoder blocks rows for its threads internally, so it gets
# large slices (fewer calls), up to NATIVE_BATCH_BYTES of float32 input, which bounds the
# conversion of non-float32 input (16 MiB at 64 features; at 20,000 features 65,536 rows
# took 5.2 GB); torch materialises every layer's activations, so it gets smaller ones.
NATIVE_BATCH_ROWS = 65536
NATIVE_BATCH_BYTES = 256 << 20  # 65,536 rows up to 1,024 features
# On a GPU the native encoder's chunk also bounds what it holds on the device: the chunk's
# rows, the hidden layers' activations (the workspace) and the codes, within this many bytes
# (65,536 rows of a 1024-1024-1024-128 MLP take 0.8 GiB). A GPU chunk costs one wait for the
# GPU, so chunks are kept as large as the CPU's.
CUDA_DEVICE_BATCH_BYTES = 1 << 30
# torch holds a chunk's private copy and every layer's activations: bounded by the chunk's
# float32 input too, or 4,096 images of 3x128x128 took 5.9 GB in a ConvAutoencoder.
TORCH_BATCH_ROWS = 4096
TORCH_BATCH_BYTES = 16 << 20  # 4,096 rows up to 1,024 values a sample
_NATIVE_BAD_ROW = re.compile(r"\brow (\d+)\b")


def _rows_within(rows: int, nbytes: int, values_per_row: int) -> int:
    """At most `rows` rows, and at most `nbytes` of them as float32 (at least one row)."""
    return max(1, min(rows, nbytes // (4 * max(1, values_per_row))))


def _where(row: int, origin: tuple[int, int] | None) -> str:
    """Row `row` of X, and for an iterable X also the chunk and the row within it."""
    return f"row {row}" + ("" if origin is None else f" (row {row - origin[1]} of chunk X[{origin[0]}])")


def _nonfinite_message(row: int, origin: tuple[int, int] | None, dtype: torch.dtype = torch.float32) -> str:
    # The check runs on the rows converted to the dtype the model computes in: a value may
    # be finite as given and still overflow a float16 model, which the message must say.
    if dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        return (f"X: {_where(row, origin)} contains NaN or Inf (or a value too large for {name}, the model's "
                "dtype); clean or rescale the data, or encode with a float32 copy of the model")
    too_large = " (or a value too large for float32)" if dtype == torch.float32 else ""
    return f"X: {_where(row, origin)} contains NaN or Inf{too_large}; clean the data before encoding"


def _nonfinite_codes_message(model_name: str, row: int, origin: tuple[int, int] | None) -> str:
    # The input row was checked finite first, so the model made the NaN / Inf: the words
    # of the export's weight check (model: ... contains NaN or Inf (a diverged training
    # run?)) and of add_encoded's check of the codes.
    return (f"model: {model_name} gave codes containing NaN or Inf for X's {_where(row, origin)}, a finite row: "
            "its weights contain NaN or Inf (a diverged training run?), or its computation overflows float32; "
            "it cannot encode this row")


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model (the torch backend's snapshot). A tensor that torch refuses
    to deep-copy, one computed from the parameters and kept as a plain attribute (as
    torch.nn.utils.weight_norm keeps `weight`, recomputed by a pre-hook before every
    forward), is copied detached: it is derived state, and the copy recomputes its own."""
    derived = {id(value): value.detach().clone()
               for module in model.modules() for value in vars(module).values()
               if isinstance(value, torch.Tensor) and not value.is_leaf}
    try:
        return copy.deepcopy(model, memo=derived)
    except Exception as error:  # whatever the module holds (a lock, a file) decides the type
        raise TypeError(f"model: the torch backend runs a private copy of the model (so that the caller's "
                        f"model is neither moved nor switched to eval mode), and this {type(model).__name__} "
                        f"cannot be copied with copy.deepcopy ({type(error).__name__}: {error})") from None


class Encoder:
    """A model's encoder, ready to encode any number of rows with bounded memory.

    Args:
        model: a latentspace model (Autoencoder, VAE, PCA, ConvAutoencoder), any other
            torch.nn.Module (called as model(x)), or an nn.Sequential. A VAE encodes to
            its posterior mean.
        device: where the work runs: None (the model's device), "cpu", "cuda", "cuda:N" or
            a torch.device. The native encoder runs on the CPU, and on a CUDA device unless
            LATENTSPACE_CUDA_ENCODER=torch (read here; unset, "auto" or "native": the CUDA
            encoder).
        precision: "fp32" (default) or "bf16": weights and activations rounded to bfloat16,
            accumulation in float32 (native), or torch.autocast(bfloat16) on the torch backend.

    The weights are snapshotted here (exported to native, or a private copy of the model in
    eval mode): train the model further and build a new Encoder to see the change. An Encoder
    pickles and deep-copies with its snapshot (the native kernel is picked again on loading).
    precision="fp32" holds inside a caller's torch.autocast too (both backends).

    Attributes: backend ("native" or "torch"), reason (why torch; None for native), kernel
    (the native kernel: the CPU's SIMD level, e.g. "avx2", or on a GPU "cuda_simt" / "cuda_wmma_bf16";
    "torch" for the torch backend), device, precision, latent_dim (None
    for a module of unknown output width until it has encoded a chunk).
    """

    def __init__(self, model: Any, *, device: Any = None, precision: str = "fp32"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a latentspace model or a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        if any(nn.parameter.is_lazy(tensor) for tensor in (*model.parameters(), *model.buffers())):
            # The private copy would draw its own weights on the first chunk, which the
            # caller's model never has.
            raise ValueError("model: it has uninitialised (lazy) parameters (nn.LazyLinear, ...); "
                             "run one forward pass, or load its weights, before encoding")
        if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
            # No data to export or copy: torch's own error ("Cannot copy out of meta tensor")
            # would not say which argument, nor the fix.
            raise ValueError("model: its parameters are on the 'meta' device (shapes without values); "
                             "materialise them first, e.g. model.to_empty(device='cpu') then load_state_dict")
        _refuse_batch_statistics(model)
        model_device, _ = module_device_dtype(model)
        self.device = model_device if device is None else resolve_device(device, allow_auto=False)
        self._model_name = type(model).__name__
        self._native: Any = None
        self._torch_model: nn.Module | None = None
        self.reason: str | None = None
        try:
            spec = export_layers(model)  # ValueError (unfitted PCA, NaN weights) propagates
        except NotExportable as why:
            spec, self.reason = None, why.reason
        if spec is not None and self.device.type != "cpu":
            self.reason = _gpu_refusal(self.device)  # None: the CUDA encoder takes it
        self._spec: MlpSpec | None = None  # kept for the native backend: pickling rebuilds from it
        if self.reason is None:
            self._spec = spec
            self._native = self._build_native()
            if self.device.type == "cuda":
                self.device = self._native.device  # with its index: the weights live there
            self.backend, self.kernel = "native", str(self._native.kernel)
            self.latent_dim: int | None = spec.output_dim
            self._sample_shapes: tuple[tuple[int, ...], ...] | None = _spec_sample_shapes(spec)
        else:
            self.backend, self.kernel = "torch", "torch"
            # A private copy, on the device, in eval mode: the snapshot, and the caller's
            # model is neither moved nor switched out of training mode.
            self._torch_model = _private_copy(model).to(self.device).eval()
            self._torch_dtype = module_device_dtype(self._torch_model)[1]
            if isinstance(model, LatentModel):
                self.latent_dim, self._sample_shapes = model.latent_dim, model._sample_shapes()
            elif spec is not None:
                self.latent_dim, self._sample_shapes = spec.output_dim, _spec_sample_shapes(spec)
            else:
                self.latent_dim, self._sample_shapes = None, None
        logger.debug("Encoder(%s): backend=%s kernel=%s%s", self._model_name, self.backend, self.kernel,
                     f" ({self.reason})" if self.reason else "")

    def _build_native(self) -> Any:
        spec = self._spec
        if self.device.type == "cuda":
            return _cuda_encoder.CudaEncoder(spec, self.device, self.precision)
        # The LayerNorm stages are passed only where the model has one (the call is otherwise
        # the plain chain of layers).
        norms: dict[str, Any] = {}
        if spec.has_norms:
            norms = {"norms": [layer.native_norm() for layer in spec.layers],
                     "input_norm": None if spec.input_norm is None else spec.input_norm.native()}
        return _native.MlpEncoder([layer.weight for layer in spec.layers], [layer.bias for layer in spec.layers],
                                  [layer.activation for layer in spec.layers],
                                  [float(layer.param) for layer in spec.layers], spec.input_offset, self.precision,
                                  **norms)

    # An Encoder pickles (and deep-copies) with its snapshot: the native object cannot be
    # pickled, so it is rebuilt from the exported layers, for the SIMD level active there (or,
    # on a GPU, uploaded again to the device it was built for).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_native": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.backend == "native":
            self._native = self._build_native()
            self.kernel = str(self._native.kernel)

    @property
    def default_batch_size(self) -> int:
        if self.backend == "native" and self.device.type == "cuda":
            # The chunk's rows as on the CPU, and what it holds on the device within its bound.
            on_device = self._spec.input_dim + self._native.workspace_bytes_per_row // 4 + self._spec.output_dim
            return min(_rows_within(NATIVE_BATCH_ROWS, NATIVE_BATCH_BYTES, self._spec.input_dim),
                       _rows_within(NATIVE_BATCH_ROWS, CUDA_DEVICE_BATCH_BYTES, on_device))
        if self.backend == "native":
            return _rows_within(NATIVE_BATCH_ROWS, NATIVE_BATCH_BYTES, self._spec.input_dim)
        if self._sample_shapes is None:  # a module of unknown input shape: rows alone
            return TORCH_BATCH_ROWS
        return _rows_within(TORCH_BATCH_ROWS, TORCH_BATCH_BYTES, math.prod(self._sample_shapes[0]))

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample (the first accepted one), None when the module does not say."""
        return None if self._sample_shapes is None else self._sample_shapes[0]

    def __repr__(self) -> str:
        why = f", reason={self.reason!r}" if self.reason else ""
        return (f"Encoder({self._model_name}, backend={self.backend!r}, kernel={self.kernel!r}, "
                f"latent_dim={self.latent_dim}, device='{self.device}', precision={self.precision!r}{why})")

    # -- encoding -----------------------------------------------------------------------
    def encode(self, X: Any, *, batch_size: int | None = None, out: Any = None, progress: bool = False) -> Any:
        """Codes of X's rows, (n, latent_dim) float32.

        X: a numpy array (any real dtype; converted chunk by chunk, never whole), a memory
            map (read chunk by chunk), a torch tensor (CPU or CUDA), or an iterable of such
            chunks (a generator, or iter(list_of_chunks): a list itself is read as one
            array). Rows of shape model.input_shape (ConvAutoencoder: images or flat rows).
        batch_size: rows per chunk (default 65,536 native, 4,096 torch; fewer for wide
            samples: a chunk holds at most 256 MiB (native) or 16 MiB (torch) of float32 input).
        out: optional float32 C-contiguous numpy array (or memory map, or CPU or CUDA
            tensor) of shape (n, latent_dim) to write into; it is returned. For an iterable X the
            chunks must fill it exactly. It must not share memory with X (not even out=X),
            nor be read-only (a tensor over a read-only memory map is refused, though torch
            itself cannot flag one). When encode raises (a bad row or chunk, an exception from
            X's iterator, or Ctrl-C, which stops the native encoder mid-chunk), the rows of the
            chunks encoded before it hold their codes and the rest of out is unspecified.
        progress: show a tqdm bar on stderr.

        Returns numpy for numpy input, a torch tensor on the input's device for torch input
        (an iterable: the type of its first chunk), `out` when given. No autograd (use
        model.encode for differentiable codes). numpy X is never written to, even by a model
        that works in place. Raises ValueError naming X and the row for NaN / Inf (or values
        the model's dtype cannot hold), ValueError naming model and the row when the model
        turns a finite row into NaN / Inf codes, TypeError / ValueError for a bad shape,
        dtype or out.
        """
        batch_size = check_int(self.default_batch_size if batch_size is None else batch_size, "batch_size")
        progress = check_bool(progress, "progress")
        if out is not None and not (isinstance(X, (np.ndarray, list, tuple)) or is_torch_tensor(X)):
            # An iterable X gives Source its first chunk (the result's type): refuse a bad out
            # before that, so that a retry with the same generator still sees every chunk.
            checked_out(out, None, self.latent_dim)
        source = Source(X, self._sample_shapes, out=out)  # refuses an out that overlaps X
        destination = (NewArray(source.rows, source.kind, source.device) if out is None
                       else UserOut(out, source.rows, self.latent_dim))
        return self._encode_to(source, destination, batch_size, progress)

    def _encode_to(self, source: Source, destination: Destination, batch_size: int, progress: bool) -> Any:
        """Encodes the source's chunks into the destination's blocks; returns its result.
        (FlatIndex.add_encoded passes its own buffer as the destination.)"""
        from tqdm import tqdm

        written = 0
        total = source.rows if source.rows is not None else getattr(destination, "expected_rows", None)
        with tqdm(total=total, unit="row", unit_scale=True, desc="encode", disable=not progress,
                  file=sys.stderr, dynamic_ncols=True, leave=True) as bar:
            for start, chunk, origin in source.chunks(batch_size):
                rows = int(chunk.shape[0])
                if rows == 0 and self.latent_dim is not None:
                    continue  # nothing to write (an empty chunk only teaches an unknown width)
                if self.backend == "native":
                    self._run_native(chunk, start, origin, destination.reserve(start, rows, self.latent_dim))
                else:
                    codes = self._run_torch(chunk, start, origin)
                    self._write(destination.reserve(start, rows, self.latent_dim), codes)
                written = start + rows
                bar.update(rows)
        return destination.finish(written, self.latent_dim)

    def _flat_rows(self, x: Any, origin: tuple[int, int] | None) -> Any:
        """x (numpy or torch) as rows of the first layer's width: the model's leading
        nn.Flatten() makes each sample a row (a view)."""
        if not self._spec.flattens_input:
            return x
        if math.prod(x.shape[1:]) != self._spec.input_dim:
            where = "X" if origin is None else f"X[{origin[0]}]"
            raise ValueError(f"{where}: expected samples of {self._spec.input_dim} values (the model's leading "
                             f"nn.Flatten makes each a row of its first Linear layer's width), got shape "
                             f"{tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def _run_native(self, chunk: Any, start: int, origin: tuple[int, int] | None, target: Any) -> None:
        if self.device.type == "cuda":
            self._run_cuda(chunk, start, origin, target)
            return
        x = self._flat_rows(rows_as_float32(chunk), origin)  # no copy for C-contiguous float32 numpy or CPU tensors
        staging = target if isinstance(target, np.ndarray) else np.empty(tuple(target.shape), np.float32)
        try:
            self._native.encode(x, staging)
        except ValueError as error:
            # The native check reports the row within this chunk; say it within X.
            message = str(error)
            bad = _NATIVE_BAD_ROW.search(message)
            if bad and ("NaN" in message or "Inf" in message):
                raise ValueError(_nonfinite_message(start + int(bad.group(1)), origin)) from None
            raise
        if not np.isfinite(staging).all():  # an overflow inside the model (rare: 86 us against 5 ms
            self._check_codes(torch.from_numpy(staging), start, origin)  # for torch's row search)
        if staging is not target:  # the result goes to a GPU tensor
            Encoder._write(target, torch.from_numpy(staging))

    def _run_cuda(self, chunk: Any, start: int, origin: tuple[int, int] | None, target: Any) -> None:
        # Host rows are copied to the device here; CUDA rows of another dtype, device or layout
        # are converted by torch; C-contiguous float32 rows on the device are used as they are.
        x = self._flat_rows(rows_as_tensor(chunk, torch.float32, self.device), origin).contiguous()
        direct = (isinstance(target, torch.Tensor) and target.device == self.device
                  and target.dtype == torch.float32 and target.is_contiguous())
        codes = target if direct else torch.empty((x.shape[0], self.latent_dim), dtype=torch.float32,
                                                  device=self.device)
        inputs_nonfinite = self._native.encode(x, codes)  # (a flag: the first layer checks the rows as it reads them)
        # One wait for the GPU per chunk: the rows' flag and the codes are checked together, and
        # the bad row is searched for only when one of them holds NaN / Inf.
        if not bool((inputs_nonfinite == 0) & torch.isfinite(codes).all()):
            bad = self._native.first_bad_row(x)
            if bad >= 0:
                raise ValueError(_nonfinite_message(start + bad, origin))
            self._check_codes(codes, start, origin)
        if codes is not target:
            self._write(target, codes)

    def _run_torch(self, chunk: Any, start: int, origin: tuple[int, int] | None) -> torch.Tensor:
        model = self._torch_model
        x = rows_as_tensor(chunk, self._torch_dtype, self.device)
        # fp32 turns a caller's autocast off: the native backend ignores it, and the codes must
        # not depend on the backend (nor on a training loop's context around encode).
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
               else torch.autocast(self.device.type, enabled=False))
        # The rows' flags are queued before the model runs (a model may change its input in
        # place: ReLU(inplace=True) turns -Inf into 0) and read with the codes' check below.
        rows_finite = finite_row_flags(x)
        try:
            with torch.no_grad(), amp:
                codes = model.encode(x) if isinstance(model, LatentModel) else model(x)
        except Exception:
            self._refuse_nonfinite_rows(rows_finite, start, origin)  # a model may refuse NaN itself: ours first
            raise
        shaped = isinstance(codes, torch.Tensor) and codes.dim() == 2 and codes.shape[0] == x.shape[0]
        if shaped:
            codes = codes.to(torch.float32)  # the codes' dtype: a float64 model may overflow it
        # One wait for the device a chunk, not two (the rows were checked before the model ran;
        # in GPU run 10 a chunk of 1,000 rows took 0.67 ms on this backend against the bare
        # forward's 0.15, not profiled): the rows and the codes are checked together, and the
        # rows' bad row, which outranks any complaint about the codes, is searched for only then.
        finite = shaped and bool(rows_finite.all() & torch.isfinite(codes).all())
        if not finite:
            self._refuse_nonfinite_rows(rows_finite, start, origin)
        if not shaped:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"model: {self._model_name} returned {shape} for {x.shape[0]} rows; "
                             "expected codes of shape (rows, latent_dim)")
        if self.latent_dim is None:
            self.latent_dim = int(codes.shape[1])
        elif codes.shape[1] != self.latent_dim:
            raise ValueError(f"model: {self._model_name} returned {codes.shape[1]} values per row, "
                             f"{self.latent_dim} before")
        if not finite:  # finite rows, and codes with NaN / Inf: the model made them
            self._check_codes(codes, start, origin)
        return codes

    def _refuse_nonfinite_rows(self, rows_finite: torch.Tensor, start: int, origin: tuple[int, int] | None) -> None:
        """Raises ValueError naming the first row of a chunk (starting at X's row `start`) whose
        flag (finite_row_flags) says it holds NaN or Inf, if any; raised from None: a model's
        own error about that row is no part of it."""
        bad = first_false_row(rows_finite)
        if bad >= 0:
            raise ValueError(_nonfinite_message(start + bad, origin, self._torch_dtype)) from None

    def _check_codes(self, codes: torch.Tensor, start: int, origin: tuple[int, int] | None) -> None:
        """Refuses NaN / Inf codes (from rows already checked finite), as the docs promise,
        instead of returning them: NaN weights, or an overflow, inside the model."""
        bad = first_nonfinite_row(codes)
        if bad >= 0:
            raise ValueError(_nonfinite_codes_message(self._model_name, start + bad, origin))

    @staticmethod
    def _write(target: Any, codes: torch.Tensor) -> None:
        if isinstance(target, np.ndarray):
            target[...] = codes.to("cpu", torch.float32).numpy()
        else:
            # Inside inference mode: a caller's out made under it takes no in-place write
            # outside it (torch's RuntimeError), and any other tensor takes one either way.
            with torch.inference_mode():
                target.copy_(codes)


def _gpu_refusal(device: torch.device) -> str | None:
    """Why an exported model runs torch on `device` (not the CPU), None when the CUDA encoder
    takes it."""
    if device.type == "cuda" and _cuda_encoder.backend() == "native":
        return None
    if device.type == "cuda" and not _native.cuda_compiled():
        why = "this build of latentspace has no CUDA kernels"
    elif device.type == "cuda" and os.environ.get(_cuda_encoder.BACKEND_VARIABLE, "") in ("", "auto") \
            and not kernels_run_everywhere():  # the default's fallback (_cuda_switch.choose_backend)
        why = (f"a GPU here runs none of this build's CUDA kernels (architectures {_native.cuda_architectures()}; "
               f"reinstall with LATENTSPACE_CUDA_ARCHITECTURES set for it)")
    elif device.type == "cuda" and os.environ.get(_cuda_encoder.BACKEND_VARIABLE) == "torch":
        why = f"{_cuda_encoder.BACKEND_VARIABLE}=torch asks for the model's torch code"
    elif device.type == "cuda":  # a default of "torch" (DEFAULT_BACKEND)
        why = f"the model's torch code is the default on GPUs ({_cuda_encoder.BACKEND_VARIABLE}=native: the CUDA encoder)"
    else:
        why = "the native encoder runs on the CPU and on CUDA GPUs only"
    return f"the work runs on '{device}': {why}"


def _refuse_batch_statistics(model: nn.Module) -> None:
    """Refuses a BatchNorm without running statistics on the encode path: even in eval mode it
    normalises each chunk by the chunk's own mean and variance, so a row's code would depend
    on the rows encoded beside it and on batch_size (and a 1-row chunk fails in torch)."""
    encoder = getattr(model, "encoder", None)
    scope, where = ((encoder, f"{type(model).__name__}.encoder")
                    if isinstance(model, LatentModel) and isinstance(encoder, nn.Module) else (model, "model"))
    for name, module in scope.named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.running_mean is None and module.running_var is None):  # torch's own test
            label = where + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part)
            raise ValueError(f"model: {label} (nn.{type(module).__name__}) keeps no running statistics "
                             "(track_running_stats=False), so it normalises each chunk by the chunk's own mean and "
                             "variance: a row's code would depend on the rows encoded beside it and on batch_size; "
                             "train it with running statistics, or call the model on the whole batch yourself")


def _spec_sample_shapes(spec: MlpSpec) -> tuple[tuple[int, ...], ...] | None:
    """The sample shapes an exported model takes: rows of its width, or (None) any shape
    holding that many values when it starts with nn.Flatten() (checked per chunk)."""
    return None if spec.flattens_input else ((spec.input_dim,),)


def encode(model: Any, X: Any, *, batch_size: int | None = None, device: Any = None, out: Any = None,
           precision: str = "fp32", progress: bool = False) -> Any:
    """Encoder(model, device=device, precision=precision).encode(X, batch_size=..., out=...,
    progress=...): see Encoder. `model` may also be an Encoder (reused as it is; device and
    precision must then be left at their defaults). Logs the backend (and why torch) on the
    "latentspace" logger at INFO."""
    encoder = as_encoder(model, device=device, precision=precision)
    logger.info("encode: backend=%s kernel=%s model=%s%s", encoder.backend, encoder.kernel,
                encoder._model_name, f" reason={encoder.reason}" if encoder.reason else "")
    return encoder.encode(X, batch_size=batch_size, out=out, progress=progress)


def as_encoder(model: Any, *, device: Any = None, precision: str = "fp32") -> Encoder:
    """`model` as an Encoder: an Encoder as it is, anything else wrapped."""
    if isinstance(model, Encoder):
        if device is not None or precision != "fp32":
            raise ValueError("device, precision: an Encoder already has them; build a new "
                             "Encoder(model, device=..., precision=...) to change them")
        return model
    return Encoder(model, device=device, precision=precision)

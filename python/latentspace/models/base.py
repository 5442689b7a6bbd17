"""The interface every latent model shares, and the pieces the learned models are built from.

Every model is a torch.nn.Module with

    encode(x) -> z          (n, *input_shape) -> (n, latent_dim)
    decode(z) -> x_hat      (n, latent_dim) -> (n, *input_shape)
    forward(x) -> x_hat     decode(encode(x)), in the shape x came in
    latent_dim, input_shape, config()

encode / decode / forward take numpy arrays or torch tensors. numpy in: the work runs without
autograd, in chunks, on a copy (a model that works in place never writes into the caller's
array), and a numpy array of the model's dtype comes back (float32 from a float32 model, and
from a bfloat16 one: numpy has no bfloat16). torch in: a tensor on the model's device comes
back, differentiable. Inputs are checked and converted in `_arrays.py` (other
real dtypes are converted to the model's dtype; bool, complex and object arrays are refused).
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import losses
from .._arrays import as_model_input, as_output, check_int, is_torch_tensor
from ._checks import MAX_PARAMETERS, check_objective_arguments

__all__ = ["LatentModel", "ReconstructionModel", "LOSSES", "OUTPUTS", "checked_config", "module_device_dtype"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}
OUTPUTS = ("linear", "sigmoid")
LOSSES = ("mse", "bce")
_NUMPY_CHUNK_ROWS = 8192  # numpy inputs are encoded in chunks so memory stays bounded
# ... of at most this many bytes of float32 samples (the larger of input and output: decode
# makes images): 8,192 rows of 64x64 images held ~0.9 GB of copies and activations at once
_NUMPY_CHUNK_BYTES = 16 << 20


def check_activation(activation: Any) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return activation


def check_output(output: Any) -> str:
    if not isinstance(output, str) or output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    return output


def check_sizes(sizes: Any, name: str, *, allow_empty: bool = True) -> tuple[int, ...]:
    """A tuple of layer widths: a tuple, list, range or 1-d numpy array of integers (an int is
    taken as a one-element tuple)."""
    if isinstance(sizes, (str, bytes)) or sizes is None:
        raise TypeError(f"{name}: expected a tuple of integers >= 1, got {sizes!r}")
    if isinstance(sizes, np.ndarray) and sizes.ndim == 1:
        sizes = sizes.tolist()  # (np.array([64, 32]) was read as one width, an array)
    if not isinstance(sizes, (tuple, list, range)):
        sizes = (sizes,)
    result = tuple(check_int(size, f"{name}[{i}]") for i, size in enumerate(sizes))
    if not result and not allow_empty:
        raise ValueError(f"{name}: expected at least one layer, got {sizes!r}")
    return result


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 (autocast activations) -> float32; float32 and float64 unchanged.
    The losses are always computed in full precision."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def mlp(sizes: tuple[int, ...], activation: str) -> nn.Sequential:
    """Linear layers of the given widths with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module computes and in which dtype its inputs are given: the device of its
    first parameter or buffer, the dtype of its first floating-point one (an integer buffer,
    such as a list of indices, must not turn the input into integers); the CPU and float32
    for a module that holds neither."""
    # Lazily, stopping at the first floating-point tensor: the training loop asks every batch.
    device = None
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        device = tensor.device if device is None else device
        if tensor.is_floating_point():
            return device, tensor.dtype
    return (device or torch.device("cpu")), torch.float32


def checked_config(cls: type, config: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`config` as from_config takes it: a dict whose keys are cls's constructor arguments,
    every required one present, plus the keys in `extra` (which from_config itself reads);
    TypeError naming config otherwise (Python's "argument after ** must be a mapping" and
    "unexpected keyword argument" named no argument)."""
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict of {cls.__name__}'s constructor arguments (what config() returns), "
                        f"got {type(config).__name__}")
    parameters = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return dict(config)
    known = {p.name for p in parameters if p.kind != p.VAR_POSITIONAL} | set(extra)
    unknown = [key for key in config if key not in known]
    if unknown:
        raise TypeError(f"config: unknown key {unknown[0]!r} for {cls.__name__} (it takes {', '.join(sorted(known))})")
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,)]
    missing = [key for key in (*required, *extra) if key not in config]
    if missing:
        raise TypeError(f"config: missing {missing[0]!r} for {cls.__name__}")
    return dict(config)


class LatentModel(nn.Module):
    """Base class: the shared interface (see the module docstring). Subclasses implement
    `_encode(x)` and `_decode(z)` on tensors already checked and converted, and `config()`."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self._latent_dim = check_int(latent_dim, "latent_dim")
        # A code of more than MAX_PARAMETERS numbers needs more weights than that in any model
        # (PCA's buffers too, sized only at fit): refused here, by name, not by torch.
        if self._latent_dim > MAX_PARAMETERS:
            raise ValueError(f"latent_dim: a code of {self._latent_dim} numbers needs at least as many parameters, "
                             "more than 2**40 (MAX_PARAMETERS, 4 TiB of float32 weights); use a smaller latent_dim")

    # -- what a subclass provides -------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. (64,) or (1, 28, 28)."""
        raise NotImplementedError

    def _sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample shapes encode() and forward() accept (the first is the canonical one)."""
        return (self.input_shape,)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable (saved beside the weights)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LatentModel":
        """A fresh (untrained) model built from `config()`'s output (TypeError naming config
        for anything but a dict of the constructor's arguments)."""
        return cls(**checked_config(cls, config))

    @property
    def warmup_epochs(self) -> float:
        """Epochs during which the training objective is still ramping up (0: none)."""
        return 0.0

    # -- the shared interface -----------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self._latent_dim

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        return module_device_dtype(self)

    def _run(self, function, x: Any, name: str, sample_shapes) -> Any:
        """Checks and converts x, applies function. numpy (or a memory map) is converted and
        processed chunk by chunk, without autograd, so memory stays bounded."""
        device, dtype = self._device_dtype()
        if is_torch_tensor(x):
            tensor, _ = as_model_input(x, name, sample_shapes=sample_shapes, dtype=dtype, device=device)
            return function(tensor)
        if not isinstance(x, np.ndarray) and not isinstance(x, (str, bytes)) and x is not None:
            x = np.asarray(x)
        step = self._numpy_chunk_rows(x)
        if not isinstance(x, np.ndarray) or x.ndim == 0 or x.shape[0] <= step:
            tensor, kind = as_model_input(x, name, sample_shapes=sample_shapes, dtype=dtype, device=device)
            with torch.no_grad():
                return as_output(function(tensor), kind)
        result = None  # allocated at the first chunk's output (its shape and dtype): the
        with torch.no_grad():  # outputs are held once, not as parts and then their concatenation
            for start in range(0, x.shape[0], step):
                tensor, kind = as_model_input(x[start : start + step], name,
                                              sample_shapes=sample_shapes, dtype=dtype, device=device)
                part = as_output(function(tensor), kind)
                if result is None:
                    result = np.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype)
                result[start : start + part.shape[0]] = part
        return result

    def _numpy_chunk_rows(self, x: Any) -> int:
        """Rows per chunk of a numpy x: _NUMPY_CHUNK_ROWS, fewer when they would hold more than
        _NUMPY_CHUNK_BYTES of float32 samples, in or out (a sample of the data: input_shape)."""
        shape = getattr(x, "shape", ())
        values = math.prod(shape[1:]) if len(shape) > 1 else 1
        try:
            values = max(values, math.prod(self.input_shape))
        except (NotImplementedError, ValueError):  # not known (yet): an unfitted PCA
            pass
        return max(1, min(_NUMPY_CHUNK_ROWS, _NUMPY_CHUNK_BYTES // (4 * max(1, values))))

    def encode(self, x: Any) -> Any:
        """Latent codes of x: (n, *input_shape) -> (n, latent_dim). numpy in: a numpy array
        of the model's dtype (float32 for a bfloat16 model: numpy has no bfloat16); torch in:
        a tensor, differentiable."""
        return self._run(self._encode, x, "x", self._sample_shapes())

    def decode(self, z: Any) -> Any:
        """Reconstructions from latent codes: (n, latent_dim) -> (n, *input_shape)."""
        return self._run(self._decode, z, "z", ((self.latent_dim,),))

    def forward(self, x: Any) -> Any:
        """decode(encode(x)), returned in the shape x came in."""
        return self._run(lambda t: self._decode(self._encode(t)).reshape(t.shape), x, "x",
                         self._sample_shapes())


class ReconstructionModel(LatentModel):
    """A learned model trained to reconstruct its input: its decoder ends in `output`
    ("linear", or "sigmoid" for data in [0, 1]) and it knows its training objective."""

    def __init__(self, latent_dim: int, output: str):
        super().__init__(latent_dim)
        self._output = check_output(output)

    @property
    def output(self) -> str:
        return self._output

    @property
    def default_loss(self) -> str:
        """"bce" for a sigmoid output (data in [0, 1]), "mse" for a linear one."""
        return "bce" if self._output == "sigmoid" else "mse"

    def check_loss(self, loss: Any) -> str:
        """Resolves loss=None to the default; refuses an unknown loss or "bce" on a linear output."""
        if loss is None:
            return self.default_loss
        if not isinstance(loss, str) or loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES} or None (the model's default), got {loss!r}")
        if loss == "bce" and self._output != "sigmoid":
            raise ValueError(
                "loss: 'bce' needs a model whose output is a probability (output='sigmoid'); "
                "this one's output is linear: use loss='mse' or build it with output='sigmoid'"
            )
        return loss

    def _decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output before the output function, (n, *input_shape)."""
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        logits = self._decode_logits(z)
        return torch.sigmoid(logits) if self._output == "sigmoid" else logits

    def reconstruction_term(self, logits: torch.Tensor, x: torch.Tensor, loss: str) -> torch.Tensor:
        """Per-sample reconstruction loss, (n,): summed over features, in float32 (float64
        for a float64 model; bf16 / fp16 activations under autocast are cast up first).

        loss="bce" is computed from the logits (kind "bce_logits": stable, and equal to
        "bce" on sigmoid(logits)); loss="mse" on the output, sigmoid(logits) or logits.
        """
        n = x.shape[0]
        logits = full_precision(logits).reshape(n, -1)
        target = x.to(logits.dtype).reshape(n, -1)
        if loss == "bce":
            return losses.reconstruction_loss(logits, target, kind="bce_logits", reduction="none")
        output = torch.sigmoid(logits) if self._output == "sigmoid" else logits
        return losses.reconstruction_loss(output, target, kind="mse", reduction="none")

    def objective(self, x: torch.Tensor, *, loss: str | None = None, progress: float | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training loss on a batch x (a tensor on the model's device).

        loss = mean over the batch of the per-sample reconstruction loss (summed over
        features). `progress` and `generator` are accepted for a uniform signature (a
        deterministic autoencoder ignores them). Returns {"loss", "reconstruction", "codes"}:
        "codes" are the batch's latent codes, (n, latent_dim), with their gradients (the
        training loop adds a metric-learning term on them when given labels).

        A training API: x must be a torch tensor of the model's dtype, on its device, of the
        model's per-sample shape, with n >= 1 rows (nothing is converted: encode() is the one
        that takes numpy and other dtypes); progress None or a number >= 0; generator None or
        a torch.Generator on the model's device. TypeError / ValueError naming the argument.
        """
        check_objective_arguments(self, x, progress, generator)
        loss = self.check_loss(loss)
        codes = self._encode(x)
        reconstruction = self.reconstruction_term(self._decode_logits(codes), x, loss).mean()
        return {"loss": reconstruction, "reconstruction": reconstruction.detach(), "codes": codes}

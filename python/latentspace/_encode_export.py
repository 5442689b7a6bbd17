"""Export of a model's encoder to the layer list the native encoder runs.

The native encoder (latentspace._native.MlpEncoder) runs a chain of Linear layers, each
followed by one elementwise activation, on rows from which an optional offset is first
subtracted. This module turns a model into that chain, or says why it cannot:

* Autoencoder: its `encoder` Sequential.
* VAE: its `encoder` Sequential, the last layer cut to the mean head (the first
  latent_dim rows of its weight and bias): `encode(x)` is the posterior mean.
* PCA (fitted): one layer, W = components (/ sqrt(explained_variance) per row when
  whitening), no bias, input offset = mean.
* A plain nn.Sequential of nn.Linear and supported activations (nested Sequentials are
  flattened; nn.Identity is dropped).

Anything else raises NotExportable with the reason, and the caller runs torch instead.
The checks are strict on purpose: exact types (a subclass may override forward), no
forward hooks, no class that overrides how it encodes, no method replaced on an instance
(model._encode = ..., module.forward = ...). A wrong native answer would be
silent; a torch fallback is only slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module_internals

from .models.autoencoder import Autoencoder
from .models.base import LatentModel
from .models.pca import PCA
from .models.vae import VAE

__all__ = ["MlpLayer", "MlpSpec", "NotExportable", "export_layers"]


class NotExportable(Exception):
    """The model cannot run on the native encoder; `reason` says why (shown to the user)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class MlpLayer:
    """One native layer: y = activation(x @ weight.T + bias).

    weight: (out, in) float32, C-contiguous (nn.Linear.weight's layout); bias: (out,)
    float32 or None; activation: a native activation name; param: negative_slope for
    "leaky_relu", alpha for "elu", 0.0 otherwise.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str
    param: float = 0.0


@dataclass(frozen=True)
class MlpSpec:
    """A model's encoder as native layers: z = layers(x - input_offset)."""

    layers: tuple[MlpLayer, ...]
    input_offset: np.ndarray | None = None  # (input_dim,) float32, or None for no offset

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.layers[-1].weight.shape[0])


def _activation(module: nn.Module) -> tuple[str, float] | None:
    """(native name, parameter) of a supported activation module, None for any other module.
    Exact types only: a subclass may compute something else."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.0
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.GELU:
        if module.approximate == "none":
            return "gelu", 0.0
        if module.approximate == "tanh":
            return "gelu_tanh", 0.0
        return None
    if kind is nn.ELU:
        return "elu", float(module.alpha)
    simple = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
    return (simple[kind], 0.0) if kind in simple else None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _check_no_instance_methods(module: nn.Module, what: str) -> None:
    """Refuses a module with a method replaced on the instance (model._encode = f): Python
    calls that attribute, not the class's method, so the exact-type checks do not see it.
    Any method counts (encode, _encode, forward, _run, ...): a replaced one is the caller's
    own code, which only torch can run."""
    for name, value in vars(module).items():
        if callable(value) and callable(getattr(type(module), name, None)):
            raise NotExportable(f"{what}'s {name}() is replaced on the instance: its own code runs, under torch")


def _global_hooks() -> bool:
    # torch's module-wide hooks (nn.modules.module.register_module_forward_hook) run on every
    # module call: the native encoder could not honour them.
    return bool(getattr(_module_internals, "_global_forward_hooks", None)
                or getattr(_module_internals, "_global_forward_pre_hooks", None))


def _float32_copy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy (the snapshot: later training does not reach it)."""
    return np.array(tensor.detach().to("cpu").numpy(), dtype=np.float32, order="C", copy=True)


def _check_dtype(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype != torch.float32:
        raise NotExportable(f"{what} is {str(tensor.dtype).replace('torch.', '')}; the native encoder "
                            "computes in float32")


def _check_finite(array: np.ndarray, what: str) -> None:
    # Raised, not a fallback: torch would silently return NaN codes from such a model.
    if not np.isfinite(array).all():
        raise ValueError(f"model: {what} contains NaN or Inf (a diverged training run?); "
                         "it cannot encode anything")


def _flatten(sequential: nn.Sequential) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for module in sequential:
        if _has_hooks(module):
            raise NotExportable(f"a {type(module).__name__} in the encoder has forward hooks")
        _check_no_instance_methods(module, f"a {type(module).__name__} in the encoder")
        if type(module) is nn.Sequential:
            modules.extend(_flatten(module))
        else:
            modules.append(module)
    return modules


def _sequential_layers(sequential: nn.Module, where: str) -> list[MlpLayer]:
    """The native layers of an exact nn.Sequential of Linear layers and activations."""
    if type(sequential) is not nn.Sequential:
        raise NotExportable(f"{where} is a {type(sequential).__name__}, not a plain nn.Sequential")
    if _has_hooks(sequential):
        raise NotExportable(f"{where} has forward hooks")
    _check_no_instance_methods(sequential, where)
    layers: list[MlpLayer] = []
    pending: nn.Linear | None = None  # a Linear layer still waiting for its activation
    previous = "the input"
    for module in _flatten(sequential):
        name = type(module).__name__
        if type(module) is nn.Identity:
            continue
        if type(module) is nn.Linear:
            if pending is not None:
                layers.append(_linear(pending, "identity", 0.0, len(layers)))
            pending = module
        else:
            activation = _activation(module)
            if activation is None:
                raise NotExportable(f"{where} holds a {name}: the native encoder runs only Linear layers "
                                    "and the activations ReLU, LeakyReLU, GELU, Tanh, Sigmoid, SiLU, ELU")
            if pending is None:
                raise NotExportable(f"{where} applies {name} right after {previous}: the native encoder "
                                    "runs one activation after each Linear layer")
            _check_parameter(activation[1], name, len(layers))
            layers.append(_linear(pending, *activation, len(layers)))
            pending = None
        previous = name
    if pending is not None:
        layers.append(_linear(pending, "identity", 0.0, len(layers)))
    if not layers:
        raise NotExportable(f"{where} has no Linear layer")
    for i in range(1, len(layers)):
        if layers[i].weight.shape[1] != layers[i - 1].weight.shape[0]:
            raise NotExportable(f"{where}: layer {i} takes {layers[i].weight.shape[1]} inputs but layer "
                                f"{i - 1} gives {layers[i - 1].weight.shape[0]}")
    return layers


def _check_parameter(value: float, name: str, index: int) -> None:
    # The native encoder holds the parameter (negative_slope, alpha) as a float32; torch runs
    # one that float32 cannot hold (NaN, Inf, beyond its range), its codes checked as any others.
    if not math.isfinite(value) or abs(value) > float(np.finfo(np.float32).max):
        raise NotExportable(f"layer {index}'s {name} has the parameter {value!r}, which the native encoder "
                            "cannot hold (it needs a finite float32)")


def _linear(module: nn.Linear, activation: str, param: float, index: int) -> MlpLayer:
    if module.weight.numel() == 0:  # torch gives bias-only (or empty) outputs; native has no such layer
        raise NotExportable(f"layer {index} is nn.Linear({module.in_features}, {module.out_features}): "
                            "the native encoder needs at least one input and one output per layer")
    _check_dtype(module.weight, f"layer {index}'s weight")
    weight = _float32_copy(module.weight)
    _check_finite(weight, f"layer {index}'s weight")
    bias = None
    if module.bias is not None:
        _check_dtype(module.bias, f"layer {index}'s bias")
        bias = _float32_copy(module.bias)
        _check_finite(bias, f"layer {index}'s bias")
    return MlpLayer(weight, bias, activation, param)


def _check_not_overridden(model: LatentModel, base: type, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(type(model), name) is not getattr(base, name):
            raise NotExportable(f"{type(model).__name__} overrides {name}(): its own code runs, under torch")
    _check_no_instance_methods(model, type(model).__name__)


# How each known model encodes: the methods on that path, which a subclass must not override.
_ENCODE_PATH = ("encode", "_encode", "_run")


def export_layers(model: nn.Module) -> MlpSpec:
    """The native layer chain equivalent to the model's encode (see the module docstring).

    Raises NotExportable(reason) for a model the native encoder cannot run, ValueError for an
    unfitted PCA or weights holding NaN / Inf.
    """
    if _global_hooks():
        raise NotExportable("global module forward hooks are registered")
    if isinstance(model, PCA):
        return _export_pca(model)
    if isinstance(model, VAE):
        _check_not_overridden(model, VAE, (*_ENCODE_PATH, "_posterior"))
        layers = _sequential_layers(model.encoder, "VAE.encoder")
        last = layers[-1]
        k = model.latent_dim
        if last.weight.shape[0] != 2 * k:
            raise NotExportable(f"VAE.encoder gives {last.weight.shape[0]} values, expected 2 * latent_dim")
        # encoder(x).chunk(2) -> (mu, logvar): mu is the first half of the last layer's outputs.
        mean_head = MlpLayer(last.weight[:k].copy(), None if last.bias is None else last.bias[:k].copy(),
                             last.activation, last.param)
        return _checked_input(model, MlpSpec((*layers[:-1], mean_head)))
    if isinstance(model, Autoencoder):
        _check_not_overridden(model, Autoencoder, _ENCODE_PATH)
        return _checked_input(model, MlpSpec(tuple(_sequential_layers(model.encoder, "Autoencoder.encoder"))))
    if isinstance(model, LatentModel):
        raise NotExportable(f"{type(model).__name__} is not a chain of Linear layers and elementwise "
                            "activations (the native encoder runs Autoencoder, VAE, PCA and plain "
                            "nn.Sequential MLPs)")
    if type(model) is nn.Sequential:
        return MlpSpec(tuple(_sequential_layers(model, "the nn.Sequential")))
    raise NotExportable(f"{type(model).__name__} is not a model the native encoder knows (Autoencoder, "
                        "VAE, PCA, or a plain nn.Sequential of Linear layers and activations)")


def _checked_input(model: LatentModel, spec: MlpSpec) -> MlpSpec:
    if (spec.input_dim,) != tuple(model.input_shape) or spec.output_dim != model.latent_dim:
        raise NotExportable(f"{type(model).__name__}'s encoder maps {spec.input_dim} -> {spec.output_dim}, "
                            f"not {model.input_shape} -> {model.latent_dim}")
    return spec


def _export_pca(model: PCA) -> MlpSpec:
    model._check_fitted()  # ValueError "PCA is not fitted: call fit(X) first"
    _check_not_overridden(model, PCA, (*_ENCODE_PATH, "_inverse_scale", "_spread"))
    for name in ("mean", "components", "explained_variance"):
        _check_dtype(getattr(model, name), f"PCA.{name}")
    components = model.components.detach().to("cpu", torch.float64)
    if model.whiten:
        # torch computes ((x - mean) @ C.T) * inverse_scale; scaling the rows of C instead,
        # in float64 and rounded once, agrees to float32 rounding (a row without spread: 0).
        components = components * model._inverse_scale().detach().to("cpu", torch.float64)[:, None]
    weight = np.ascontiguousarray(components.numpy(), dtype=np.float32)
    mean = _float32_copy(model.mean)
    _check_finite(weight, "PCA.components")
    _check_finite(mean, "PCA.mean")
    return MlpSpec((MlpLayer(weight, None, "identity", 0.0),), input_offset=mean)

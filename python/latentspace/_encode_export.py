"""Export of a model's encoder to the layer list the native encoder runs.

The native encoder (latentspace._native.MlpEncoder) runs a chain of Linear layers, each
followed by one elementwise activation and optionally a LayerNorm over its outputs (before or
after the activation), on rows that are optionally normalised (a leading LayerNorm) and from
which an optional offset is then subtracted. This module turns a model into that chain, or
says why it cannot:

* Autoencoder: its `encoder` Sequential.
* VAE: its `encoder` Sequential, the last layer cut to the mean head (the first
  latent_dim rows of its weight and bias): `encode(x)` is the posterior mean.
* PCA (fitted): one layer, W = components (/ sqrt(explained_variance) per row when
  whitening), no bias, input offset = mean.
* A plain nn.Sequential of nn.Linear and supported activations (nested Sequentials are
  flattened; nn.Identity is dropped).

In any of these encoders, also (see _encode_modules):
* dropout (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout) is dropped: the
  Encoder evaluates every model in eval mode (its torch backend runs an eval() copy, whatever
  the caller's mode), where dropout is the identity;
* nn.BatchNorm1d with running statistics (the ones eval mode uses) right after a Linear layer
  is folded into that layer's weight and bias, and one before the first Linear layer into its
  weight, its running mean becoming the input offset;
* in an Autoencoder's or VAE's encoder, whose values are (rows, features) throughout, an
  nn.Flatten that leaves such values as they are is dropped;
* nn.LayerNorm over the features (normalized_shape = (width,)) right after a Linear layer
  (before its activation), right after the activation, or before the first Linear layer, at
  most one per Linear layer, runs natively as that layer's (or the input's) LayerNorm stage.

Anything else raises NotExportable with the reason, and the caller runs torch instead.
The checks are strict on purpose: exact types (a subclass may override forward), no
forward hooks, no class that overrides how it encodes, no method replaced on an instance
(model._encode = ..., module.forward = ...). A wrong native answer would be
silent; a torch fallback is only slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module_internals

from ._encode_modules import (NotExportable, activation_of, check_dtype, check_finite, check_flatten, float32_copy,
                              fold_batch_norms, is_dropout, layer_norm_terms, type_name, unsupported)
from .models.autoencoder import Autoencoder
from .models.base import LatentModel
from .models.pca import PCA
from .models.vae import VAE

__all__ = ["MlpLayer", "MlpSpec", "NotExportable", "RowNorm", "export_layers"]


@dataclass(frozen=True)
class RowNorm:
    """An nn.LayerNorm over each row's n features, as torch computes it (eval and training
    alike): y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias, var the biased variance.

    eps: > 0, finite; weight, bias: (n,) float32, or None for 1 and 0 (elementwise_affine=False,
    bias=False)."""

    eps: float
    weight: np.ndarray | None
    bias: np.ndarray | None

    def native(self) -> tuple[float, np.ndarray | None, np.ndarray | None]:
        """(eps, weight, bias), as _native.MlpEncoder takes a LayerNorm."""
        return float(self.eps), self.weight, self.bias


@dataclass(frozen=True)
class MlpLayer:
    """One native layer: y = activation(x @ weight.T + bias), with norm (a LayerNorm over the
    outputs, or None) applied before the activation, or after it when norm_after_activation.

    weight: (out, in) float32, C-contiguous (nn.Linear.weight's layout); bias: (out,)
    float32 or None; activation: a native activation name; param: negative_slope for
    "leaky_relu", alpha for "elu", 0.0 otherwise.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str
    param: float = 0.0
    norm: RowNorm | None = None
    norm_after_activation: bool = False

    def native_norm(self) -> tuple[str, float, np.ndarray | None, np.ndarray | None] | None:
        """(place, eps, weight, bias), as _native.MlpEncoder takes a layer's LayerNorm; None."""
        if self.norm is None:
            return None
        return ("after_activation" if self.norm_after_activation else "before_activation", *self.norm.native())


@dataclass(frozen=True)
class MlpSpec:
    """A model's encoder as native layers: z = layers(input_norm(x) - input_offset).

    flattens_input: the model starts with nn.Flatten() (start_dim=1, end_dim=-1), so it takes
    samples of any shape holding input_dim values (images too), each flattened to a row."""

    layers: tuple[MlpLayer, ...]
    input_offset: np.ndarray | None = None  # (input_dim,) float32, or None for no offset
    flattens_input: bool = False
    input_norm: RowNorm | None = None  # a leading nn.LayerNorm, or None

    @property
    def has_norms(self) -> bool:
        return self.input_norm is not None or any(layer.norm is not None for layer in self.layers)

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.layers[-1].weight.shape[0])


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


def _flatten(sequential: nn.Sequential, where: str) -> list[tuple[str, nn.Module]]:
    """The modules, nested plain Sequentials opened, each with its label for reasons:
    where[i], where[i][j] in a nested one (how the caller would index it)."""
    modules: list[tuple[str, nn.Module]] = []
    for i, module in enumerate(sequential):
        label = f"{where}[{i}]"
        if _has_hooks(module):
            raise NotExportable(f"{label} ({type_name(type(module))}) has forward hooks")
        _check_no_instance_methods(module, label)
        if type(module) is nn.Sequential:
            modules.extend(_flatten(module, label))
        else:
            modules.append((label, module))
    return modules


class _PendingLinear:
    """A Linear layer waiting for its activation, with the nn.BatchNorm1d modules that fold
    into it (one before it, the first layer only; those right after it) and the nn.LayerNorm
    between it and its activation, if any."""

    def __init__(self, module: nn.Linear, before: tuple[str, nn.BatchNorm1d] | None):
        self.module, self.before = module, before
        self.after: list[tuple[str, nn.BatchNorm1d]] = []
        self.norm: tuple[str, nn.LayerNorm] | None = None

    def layer(self, activation: str, param: float, index: int) -> MlpLayer:
        weight, bias = _linear(self.module, index)
        if self.before is not None or self.after:
            weight, bias = fold_batch_norms(weight, bias, self.before, self.after, index)
        norm = None if self.norm is None else _row_norm(*self.norm, int(weight.shape[0]))
        return MlpLayer(weight, bias, activation, param, norm)


def _row_norm(label: str, module: nn.LayerNorm, features: int) -> RowNorm:
    return RowNorm(*layer_norm_terms(module, label, features))


def _sequential_spec(sequential: nn.Module, where: str, *, rows_only: bool) -> MlpSpec:
    """The native layers of an exact nn.Sequential of Linear layers and activations (with
    the modules _encode_modules knows between them). rows_only: the model's samples are rows,
    so the values in the Sequential are 2-d (Autoencoder, VAE; not a plain nn.Sequential,
    which torch runs on samples of any shape)."""
    if type(sequential) is not nn.Sequential:
        raise NotExportable(f"{where} is a {type(sequential).__name__}, not a plain nn.Sequential")
    if _has_hooks(sequential):
        raise NotExportable(f"{where} has forward hooks")
    _check_no_instance_methods(sequential, where)
    layers: list[MlpLayer] = []
    pending: _PendingLinear | None = None
    leading_norm: tuple[str, nn.BatchNorm1d] | None = None  # a BatchNorm1d before any Linear layer
    input_norm: nn.BatchNorm1d | None = None  # that one, folded into the first layer
    input_layer_norm: tuple[str, nn.LayerNorm] | None = None  # an nn.LayerNorm before any Linear layer
    norm_labels: dict[int, str] = {}  # layer index -> the label of the LayerNorm on its outputs, for reasons
    activated = False  # the last module (dropout aside) was an activation: a LayerNorm may follow it
    flattens_input = False
    input_dropout1d: str | None = None  # an nn.Dropout1d that sees the samples as they come
    previous = "the input"
    for label, module in _flatten(sequential, where):
        kind = type(module)
        name = kind.__name__
        if kind is nn.Identity or is_dropout(module, label):
            if kind is nn.Dropout1d and previous == "the input" and not flattens_input:
                input_dropout1d = input_dropout1d or label
            continue
        if kind is nn.Flatten:
            if previous == "the input" and not rows_only and (module.start_dim, module.end_dim) == (1, -1):
                if input_dropout1d is not None:  # torch's rule, in eval mode too
                    raise NotExportable(f"{input_dropout1d} (nn.Dropout1d) comes before the leading nn.Flatten(), "
                                        "where samples of any shape arrive, and torch refuses samples of more than "
                                        "2 dimensions there")
                # Samples of any shape become rows, as the native encoder takes them: the
                # Encoder reshapes each chunk (a view) instead. Later values are 2-d.
                flattens_input = True
            else:
                check_flatten(module, label, rows_only or flattens_input)
            continue
        if kind is nn.Linear:
            if pending is not None:
                layers.append(pending.layer("identity", 0.0, len(layers)))
            pending, leading_norm = _PendingLinear(module, leading_norm), None
        elif kind is nn.LayerNorm:
            if pending is not None or activated:  # on the outputs of the last Linear layer
                index = len(layers) if pending is not None else len(layers) - 1
                if index in norm_labels:
                    raise NotExportable(f"{label} (nn.LayerNorm) comes after {norm_labels[index]} on the same Linear "
                                        "layer's outputs: the native encoder runs one LayerNorm per Linear layer")
                norm_labels[index] = label
                if pending is not None:  # before the activation, if one follows
                    pending.norm = (label, module)
                else:
                    width = int(layers[-1].weight.shape[0])
                    layers[-1] = replace(layers[-1], norm=_row_norm(label, module, width), norm_after_activation=True)
            elif previous == "the input":
                input_layer_norm = (label, module)
            else:
                raise NotExportable(f"{label} (nn.LayerNorm) comes right after {previous}: only one right after a "
                                    "Linear layer or its activation, or before the first, runs natively")
        elif kind is nn.BatchNorm1d:
            if pending is not None and pending.norm is not None:
                raise NotExportable(f"{label} (nn.BatchNorm1d) comes after {pending.norm[0]} (nn.LayerNorm): only a "
                                    "BatchNorm1d right after a Linear layer, or before the first, folds into it")
            if pending is not None:
                pending.after.append((label, module))
            elif previous == "the input":
                leading_norm, input_norm = (label, module), module
            else:
                raise NotExportable(f"{label} (nn.BatchNorm1d) comes right after {previous}: only one right after a "
                                    "Linear layer, or before the first, folds into the native layers")
        else:
            found = activation_of(module)
            if found is None:
                raise unsupported(module, label)
            if pending is None:
                raise NotExportable(f"{label} applies {name} right after {previous}: the native encoder runs one "
                                    "activation after each Linear layer")
            _check_parameter(found[1], name, len(layers))
            layers.append(pending.layer(*found, len(layers)))
            pending = None
        activated = activation_of(module) is not None
        previous = name
    if pending is not None:
        layers.append(pending.layer("identity", 0.0, len(layers)))
    if not layers:
        raise NotExportable(f"{where} has no Linear layer")
    for i in range(1, len(layers)):
        if layers[i].weight.shape[1] != layers[i - 1].weight.shape[0]:
            raise NotExportable(f"{where}: layer {i} takes {layers[i].weight.shape[1]} inputs but layer "
                                f"{i - 1} gives {layers[i - 1].weight.shape[0]}")
    # The first layer's fold checked the running mean; subtracted first, as torch does.
    offset = None if input_norm is None else float32_copy(input_norm.running_mean)
    leading = None if input_layer_norm is None else _row_norm(*input_layer_norm, int(layers[0].weight.shape[1]))
    return MlpSpec(tuple(layers), input_offset=offset, flattens_input=flattens_input, input_norm=leading)


def _check_parameter(value: float, name: str, index: int) -> None:
    # The native encoder holds the parameter (negative_slope, alpha) as a float32; torch runs
    # one that float32 cannot hold (NaN, Inf, beyond its range), its codes checked as any others.
    if not math.isfinite(value) or abs(value) > float(np.finfo(np.float32).max):
        raise NotExportable(f"layer {index}'s {name} has the parameter {value!r}, which the native encoder "
                            "cannot hold (it needs a finite float32)")


def _linear(module: nn.Linear, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A Linear layer's (weight, bias) as float32 snapshots."""
    if module.weight.numel() == 0:  # torch gives bias-only (or empty) outputs; native has no such layer
        raise NotExportable(f"layer {index} is nn.Linear({module.in_features}, {module.out_features}): "
                            "the native encoder needs at least one input and one output per layer")
    check_dtype(module.weight, f"layer {index}'s weight")
    weight = float32_copy(module.weight)
    check_finite(weight, f"layer {index}'s weight")
    bias = None
    if module.bias is not None:
        check_dtype(module.bias, f"layer {index}'s bias")
        bias = float32_copy(module.bias)
        check_finite(bias, f"layer {index}'s bias")
    return weight, bias


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
        spec = _sequential_spec(model.encoder, "VAE.encoder", rows_only=True)
        layers = spec.layers
        last = layers[-1]
        k = model.latent_dim
        if last.norm is not None:
            raise NotExportable("VAE.encoder ends with an nn.LayerNorm over mu and logvar together: the native "
                                "encoder's mean head keeps the first latent_dim outputs, which that norm mixes "
                                "with the others")
        if last.weight.shape[0] != 2 * k:
            raise NotExportable(f"VAE.encoder gives {last.weight.shape[0]} values, expected 2 * latent_dim")
        # encoder(x).chunk(2) -> (mu, logvar): mu is the first half of the last layer's outputs.
        mean_head = MlpLayer(last.weight[:k].copy(), None if last.bias is None else last.bias[:k].copy(),
                             last.activation, last.param)
        return _checked_input(model, MlpSpec((*layers[:-1], mean_head), spec.input_offset,
                                             input_norm=spec.input_norm))
    if isinstance(model, Autoencoder):
        _check_not_overridden(model, Autoencoder, _ENCODE_PATH)
        return _checked_input(model, _sequential_spec(model.encoder, "Autoencoder.encoder", rows_only=True))
    if isinstance(model, LatentModel):
        raise NotExportable(f"{type(model).__name__} is not a chain of Linear layers and elementwise "
                            "activations (the native encoder runs Autoencoder, VAE, PCA and plain "
                            "nn.Sequential MLPs)")
    if type(model) is nn.Sequential:
        return _sequential_spec(model, "model", rows_only=False)
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
        check_dtype(getattr(model, name), f"PCA.{name}")
    components = model.components.detach().to("cpu", torch.float64)
    if model.whiten:
        # torch computes ((x - mean) @ C.T) * inverse_scale; scaling the rows of C instead,
        # in float64 and rounded once, agrees to float32 rounding (a row without spread: 0).
        components = components * model._inverse_scale().detach().to("cpu", torch.float64)[:, None]
    weight = np.ascontiguousarray(components.numpy(), dtype=np.float32)
    mean = float32_copy(model.mean)
    check_finite(weight, "PCA.components")
    check_finite(mean, "PCA.mean")
    return MlpSpec((MlpLayer(weight, None, "identity", 0.0),), input_offset=mean)

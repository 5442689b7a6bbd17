"""What one module of an encoder's nn.Sequential is to the native export (_encode_export).

Each module is one of: a Linear layer (read by _encode_export), an activation (its native
name and parameter), the identity when encoding (nn.Identity, dropout, a Flatten of 2-d
values), an nn.BatchNorm1d with running statistics (an affine map, folded into the Linear
layer beside it), an nn.LayerNorm over the features (a native per-row stage: its terms), or
something the native encoder cannot run: NotExportable, whose reason names the module (its
place, e.g. model[2], and its type) and what would run natively.

Eval mode throughout: the Encoder encodes with every model in eval mode (its torch backend
runs an eval() copy of the model, whatever mode the caller's model is in), so dropout is
the identity and nn.BatchNorm1d uses its running statistics, in training mode too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["NotExportable", "activation_of", "batch_norm_terms", "check_dtype", "check_finite", "check_flatten",
           "float32_copy", "fold_batch_norms", "is_dropout", "layer_norm_terms", "type_name", "unsupported"]


class NotExportable(Exception):
    """The model cannot run on the native encoder; `reason` says why (shown to the user)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# What the native encoder runs, for reasons that name a module it does not.
_SUPPORTED = ("the native encoder runs nn.Linear layers, each followed by at most one of the activations ReLU, "
              "LeakyReLU, GELU, Tanh, Sigmoid, SiLU, ELU, with nn.Identity, dropout, nn.BatchNorm1d (right "
              "after a Linear layer, or first) and nn.LayerNorm (one per Linear layer, before or after its "
              "activation, or first) between them")

# The identity in eval mode. Not Dropout2d / Dropout3d: on (rows, features) values torch
# warns that they are deprecated there and will become an error.
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def type_name(kind: type) -> str:
    """nn.ReLU for torch.nn's own types, the full path otherwise: a quantized Linear's class
    is also called Linear, so its name alone would not say which it is."""
    if getattr(nn, kind.__name__, None) is kind:
        return f"nn.{kind.__name__}"
    return f"{kind.__module__}.{kind.__qualname__}"


def activation_of(module: nn.Module) -> tuple[str, float] | None:
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


def is_dropout(module: nn.Module, label: str) -> bool:
    """True for a dropout module (the identity when encoding)."""
    if type(module) not in _DROPOUTS:
        return False
    if not 0.0 <= module.p <= 1.0:  # set after construction: torch refuses it at every call
        raise NotExportable(f"{label} ({type_name(type(module))}) has p={module.p!r}, which torch refuses "
                            "(it needs 0 <= p <= 1)")
    return True


def check_flatten(module: nn.Flatten, label: str, rows_only: bool) -> None:
    """Refuses an nn.Flatten that is not the identity on the encoder's values. rows_only: the
    model's samples are rows (Autoencoder, VAE), so every value in its encoder is 2-d."""
    if not rows_only:
        # Before this Flatten the nn.Sequential's values may have any shape (images too); the
        # native encoder flattens only the input, as a leading nn.Flatten() does.
        raise NotExportable(f"{label} is nn.Flatten(start_dim={module.start_dim!r}, end_dim={module.end_dim!r}) "
                            "where the values may have any shape (images too): the native encoder runs only a "
                            "leading nn.Flatten() (start_dim=1, end_dim=-1), which makes each sample a row")
    start, end = module.start_dim, module.end_dim
    # On 2-d values a Flatten of one dimension returns them as they are; one of both
    # (start_dim=0) makes them 1-d, and dimensions outside [-2, 1] make torch raise.
    if not (isinstance(start, int) and isinstance(end, int) and -2 <= start <= 1 and -2 <= end <= 1
            and start % 2 == end % 2):
        raise NotExportable(f"{label} is nn.Flatten(start_dim={start!r}, end_dim={end!r}), which changes the "
                            "encoder's 2-d (rows, features) values; only one leaving them as they are is dropped")


def unsupported(module: nn.Module, label: str) -> NotExportable:
    """The reason a module is not exportable, naming it and what would run natively."""
    kind = type(module)
    path = kind.__module__
    if ".quantized" in path:
        need = ("a quantized module (integer weights and activations), which the native encoder, float32 only, does "
                "not compute; encode with the float model (before quantize_dynamic / convert) to run natively")
    elif ".qat" in path or ".intrinsic" in path:
        need = ("a quantization-aware-training or fused module; encode with the float model (before prepare_qat / "
                "fuse_modules) to run natively")
    elif isinstance(module, nn.Linear) and parametrize.is_parametrized(module):
        need = ("an nn.Linear whose weight a parametrization computes at every call; "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') keeps the computed weight in "
                "a plain nn.Linear, which runs natively")
    elif not path.startswith("torch."):  # a class of the user's: what does it derive from?
        base = next((b for b in kind.__mro__[1:] if b.__module__.startswith("torch.nn.") and b is not nn.Module), None)
        need = _SUPPORTED if base is None else (f"a subclass of {type_name(base)}, whose forward may compute "
                                                "something else; the native encoder takes exact types only (a "
                                                f"plain {type_name(base)} with the same parameters runs natively)")
    else:
        need = _SUPPORTED
    return NotExportable(f"{label} is a {type_name(kind)}: {need}")


# ---------------------------------------------------------------------------------------
# nn.BatchNorm1d: in eval mode an affine map per feature, folded into the Linear layer beside it


def batch_norm_terms(norm: nn.BatchNorm1d, label: str, features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, mean, shift), float64 of shape (features,), of an eval-mode nn.BatchNorm1d:
    y = scale * (x - mean) + shift, scale = weight / sqrt(running_var + eps), shift = bias
    (weight 1, bias 0 when affine=False). features: the values it normalises (the width of
    the Linear layer beside it). momentum plays no part in eval mode."""
    if norm.running_mean is None or norm.running_var is None:
        # torch's rule: without running statistics, eval mode too normalises each batch by its own
        raise NotExportable(f"{label} (nn.BatchNorm1d) keeps no running statistics (track_running_stats=False): it "
                            "normalises every batch by that batch's own mean and variance, which only torch computes")
    values: dict[str, np.ndarray] = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        tensor = getattr(norm, name)
        if tensor is None:  # affine=False (or a bias removed)
            continue
        check_dtype(tensor, f"{label}'s {name}")
        if tuple(tensor.shape) != (features,):
            raise NotExportable(f"{label}'s {name} has shape {tuple(tensor.shape)}, but {features} values reach it "
                                "(torch raises)")
        values[name] = float32_copy(tensor).astype(np.float64)
        check_finite(values[name], f"{label}'s {name}")
    denominator = values["running_var"] + float(norm.eps)
    if not (denominator > 0).all():  # torch's codes would all be NaN or Inf: say why now
        j = int(np.flatnonzero(~(denominator > 0))[0])
        raise ValueError(f"model: {label}'s running_var + eps is {float(denominator[j])!r} for feature {j}, not "
                         "positive (a square root of a negative number, or a division by zero); it cannot encode "
                         "anything")
    scale = values.get("weight", 1.0) / np.sqrt(denominator)
    return scale, values["running_mean"], values.get("bias", np.zeros(features))


def fold_batch_norms(weight: np.ndarray, bias: np.ndarray | None, before: tuple[str, nn.BatchNorm1d] | None,
                     after: list[tuple[str, nn.BatchNorm1d]],
                     index: int) -> tuple[np.ndarray, np.ndarray]:
    """A Linear layer's (weight (out, in), bias (out,)) float32 with (label, BatchNorm1d) pairs
    folded in, computed in float64 and rounded once.

    before: the one normalising the layer's inputs (the first layer only), or None:
        W (s (x - m) + t) + b = (W diag(s)) (x - m) + (W t + b); the caller makes m the input
        offset, subtracted first as torch does (folded into the bias, x W^T - m W^T would cancel).
    after: those normalising its outputs, in order:
        s (W x + b - m) + t = (diag(s) W) x + (s (b - m) + t); torch too subtracts m from
        the layer's float32 output, so the fold loses nothing to it.
    """
    w = weight.astype(np.float64)
    b = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
    if before is not None:
        scale, mean, shift = batch_norm_terms(before[1], before[0], w.shape[1])
        b = b + w @ shift
        w = w * scale[None, :]
    for label, norm in after:
        scale, mean, shift = batch_norm_terms(norm, label, w.shape[0])
        w = scale[:, None] * w
        b = scale * (b - mean) + shift
    with np.errstate(over="ignore"):
        w32, b32 = np.ascontiguousarray(w, dtype=np.float32), b.astype(np.float32)
    if not (np.isfinite(w32).all() and np.isfinite(b32).all()):  # torch's codes are checked as any others
        raise NotExportable(f"layer {index}'s weight or bias with the BatchNorm1d folded in exceeds float32's range")
    return w32, b32


# ---------------------------------------------------------------------------------------
# nn.LayerNorm: each row normalised by its own mean and variance, a native stage (not foldable)


def layer_norm_terms(norm: nn.LayerNorm, label: str, features: int) -> tuple[float, np.ndarray | None,
                                                                              np.ndarray | None]:
    """(eps, weight, bias) of an nn.LayerNorm over rows of `features` values: weight and bias
    (features,) float32 snapshots, None where it has none (elementwise_affine=False, bias=False).
    Eval and training mode compute the same (no running statistics)."""
    shape = tuple(norm.normalized_shape)
    if shape != (features,):
        raise NotExportable(f"{label} is nn.LayerNorm({shape}) where rows of {features} features reach it: the native "
                            f"encoder normalises each row over its features only (normalized_shape=({features},))")
    eps = float(norm.eps)
    if not (np.isfinite(eps) and eps > 0):
        # eps = 0 makes a constant row 0 / 0 (NaN codes, torch's answer); torch runs it as it is.
        raise NotExportable(f"{label} (nn.LayerNorm) has eps={norm.eps!r}; the native encoder needs a finite eps > 0")
    terms: list[np.ndarray | None] = []
    for name in ("weight", "bias"):
        tensor = getattr(norm, name, None)  # None without elementwise_affine, or with bias=False
        if tensor is None:
            terms.append(None)
            continue
        check_dtype(tensor, f"{label}'s {name}")
        if tuple(tensor.shape) != shape:
            raise NotExportable(f"{label}'s {name} has shape {tuple(tensor.shape)}, but it normalises {shape} "
                                "(torch raises)")
        terms.append(float32_copy(tensor))
        check_finite(terms[-1], f"{label}'s {name}")
    return eps, terms[0], terms[1]


# ---------------------------------------------------------------------------------------
# Parameters: float32 snapshots, or NotExportable / ValueError


def float32_copy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy (the snapshot: later training does not reach it)."""
    return np.array(tensor.detach().to("cpu").numpy(), dtype=np.float32, order="C", copy=True)


def check_dtype(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype != torch.float32:
        raise NotExportable(f"{what} is {str(tensor.dtype).replace('torch.', '')}; the native encoder "
                            "computes in float32")


def check_finite(array: np.ndarray, what: str) -> None:
    # Raised, not a fallback: torch would silently return NaN codes from such a model.
    if not np.isfinite(array).all():
        raise ValueError(f"model: {what} contains NaN or Inf (a diverged training run?); "
                         "it cannot encode anything")

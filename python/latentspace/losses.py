"""Reconstruction and KL losses with fused native forward + gradient (Liger-Kernel style).

Each loss is one torch.autograd.Function: its forward runs a native kernel (CPU: OpenMP +
SIMD, csrc/cpu/losses.cpp; CUDA: csrc/cuda/losses.cu) that computes the loss and its gradient
in one pass over the data (the loss alone where no gradient can be asked for: torch.no_grad(),
or no input that requires grad); its backward scales that saved gradient by the incoming one
(on a GPU in place; exceptions: see below). float32 runs the SIMD kernels on the CPU; float64 runs plain
C++ (so torch.autograd.gradcheck can verify the gradients); float16 / bfloat16 are computed
in float32 and the gradient is returned in the input dtype. Two inputs of different dtypes
are first brought to their common one (torch.promote_types), as torch's own losses do.
CUDA tensors: the CUDA kernels by default (LATENTSPACE_CUDA_LOSSES unset, "auto" or
"native"), torch's own ops (same values, same API) with LATENTSPACE_CUDA_LOSSES=torch
(_cuda_losses.py); tensors on other devices: torch's ops.

reconstruction_loss(recon, target, kind="mse", reduction="mean")
    kind  "mse":        (r - t)^2
          "bce":        -(t log r + (1 - t) log(1 - r)), r in [0, 1]; the logs are clamped at
                        -100 and the gradient is (r - t) / max(r (1 - r), 1e-12), as in torch
          "bce_logits": the same with r = sigmoid(x), from the logits x, stably:
                        max(x, 0) - x t + log(1 + exp(-|x|)); gradient sigmoid(x) - t
    reduction "mean": over all elements (torch's convention); "sum"; "none": one value per
          sample (row), the loss summed over that row's features (so .sum() equals "sum").
    Rows are samples: recon and target are (N, ...) of the same shape; everything after the
    first dimension is the sample's features.

kl_normal(mu, logvar, reduction="mean")
    KL(N(mu, exp(logvar)) || N(0, 1)) = -0.5 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)),
    summed over the latent dimensions of each row; "mean" averages the per-row values over
    the batch (torch's "batchmean"), "sum" adds them, "none" returns them.

NaN: propagates (the loss and the gradient become NaN where an input is NaN), the same for
every loss; values of `recon` outside [0, 1] for "bce" raise ValueError (NaN excepted).
Gradients flow to `recon` and `target` (and `mu`, `logvar`); for "bce" the target's is
log(1 - r) - log(r) with the same -100 clamp of the logs, so finite at r = 0 or 1, where
torch's (-logit(r)) is +-inf. Second derivatives: a
backward with create_graph=True (a gradient penalty, a Hessian-vector product) does not use
the saved gradient, a constant to autograd, but recomputes the first derivative with torch
ops from the saved inputs (in the same compute dtype, float32 for float16 / bfloat16), times
the incoming gradient, so that autograd differentiates it again: with respect to recon,
target, mu, logvar and the incoming gradient. A second plain backward through the same graph (retain_graph=True)
reruns the native forward for its gradient (the same bits): the first handed the saved one
out (scaled in place on a GPU; as it is on the CPU for an incoming 1), and the caller may
have changed it in place since. torch's ops have second derivatives as well. Forward-mode
AD (dual tensors) and torch.func transforms (grad, vmap, jvp, jacrev, ...) take torch's own
ops, the same formulas (the autograd.Function has no jvp or vmap rule).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import _cuda_losses, _native
from ._arrays import check_dense, detached

__all__ = ["KLNormal", "ReconstructionLoss", "ReconstructionLossModule", "kl_normal", "reconstruction_loss"]

_KINDS = {"mse": 0, "bce": 1, "bce_logits": 2}
_REDUCTIONS = ("mean", "sum", "none")
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or kind not in _KINDS:  # (a list is unhashable: TypeError naming nothing)
        raise ValueError(f"kind: expected one of {tuple(_KINDS)}, got {kind!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def _check_pair(a, b, names: str) -> None:
    first, second = names.split(", ")
    for value, name in ((a, first), (b, second)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(value).__name__}")
        # sparse / nested: torch's reshape errors name nothing. (Not check_dense for every
        # tensor: it also refuses devices but CPU and CUDA, where torch's own ops run here.)
        if value.is_nested or value.layout != torch.strided:
            check_dense(value, name)
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        if value.dim() < 1:
            raise ValueError(f"{name}: expected a tensor with a batch dimension, got a scalar")
        if value.numel() == 0:  # no rows (or no features): no loss to average
            raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(value.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{names}: on different devices, {a.device} vs {b.device}")


def _promoted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in their common dtype, as torch's own losses compute (float32 against float64:
    float64), so that the native path, which computes in its first input's dtype, does not
    round the other one. The conversion is part of the graph: gradients return in each
    input's own dtype."""
    common = torch.promote_types(a.dtype, b.dtype)
    return a.to(common), b.to(common)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, ...) tensor -> C-contiguous (N, features) tensor in `dtype`, detached, on its
    device (a copy only if needed). A lazily negated view (torch's neg bit: z.conj().imag,
    torch._neg_view) is materialised: its memory holds the values un-negated, which the
    kernels would read as they are."""
    x = detached(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    x = x.reshape(x.shape[0], -1)
    return x if x.is_contiguous() else x.contiguous()


def _as_rows(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """_rows of a CPU tensor as a numpy view, for the CPU kernels."""
    return _rows(x, dtype).numpy()


# Gradients at least this large go on huge pages (see csrc/bindings/buffers.cpp): faulting in
# a fresh buffer 4 KiB at a time costs more than the loss kernel itself.
_HUGE_PAGE_BYTES = 4 << 20


def _empty_like(x: np.ndarray) -> np.ndarray:
    if x.nbytes < _HUGE_PAGE_BYTES:
        return np.empty_like(x)
    rows, cols = x.shape
    if x.dtype == np.float64:
        return _native.empty_huge_float64(rows, cols)
    return _native.empty_huge_float32(rows, cols)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _NATIVE_DTYPES else torch.float32


def _reduce(total, row_losses: torch.Tensor | None, reduction: str, count: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The loss the caller sees, from the kernel's float64 sum (a float from the CPU kernels, a
    0-d device tensor from the CUDA ones) or its per-row sums."""
    if reduction == "none":
        return row_losses.to(dtype)
    value = total / count if reduction == "mean" else total
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.tensor(value, dtype=dtype)


def _times_incoming(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """d(loss)/d(input) times the incoming gradient (per row for "none"); differentiable in both."""
    if reduction == "none":
        return grad * grad_output.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)
    return grad * grad_output.to(grad.dtype)


def _scale_saved(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """The saved d(loss)/d(input) times the incoming gradient (per row for "none"). On a GPU in
    place (_cuda_losses.scale_in_place: the incoming gradient is not read back, and a factor
    of 1 costs no pass; on the CPU a factor of 1 returns the buffer itself), so the caller
    hands the buffer out only once (see _take_saved)."""
    if grad.is_cuda:
        if grad.is_contiguous():
            return _cuda_losses.scale_in_place(grad, grad_output, per_row=reduction == "none")
        return _times_incoming(grad, grad_output, reduction)  # (bce_logits' target gradient of a strided recon)
    if reduction != "none" and grad_output.numel() == 1 and float(grad_output) == 1.0:
        return grad  # the usual loss.backward(): no extra pass over the gradient
    return _times_incoming(grad, grad_output, reduction)


def _take_saved(ctx) -> tuple[torch.Tensor | None, ...] | None:
    """The native forward's saved gradients, the first time a backward asks; None after.
    The fast path hands them out as they are (scaled in place on a GPU; on the CPU, for an
    incoming 1, the buffer itself), and the caller may change what it got in place (an
    in-place clip after torch.autograd.grad), so a second backward through the same graph
    (retain_graph=True) must not read them again: it reruns the native forward instead (the
    same bits). They live on ctx, not in save_for_backward, whose version check would refuse
    that second backward outright; and leaving ctx frees them with the backward."""
    saved, ctx.saved_gradients = ctx.saved_gradients, None
    return saved


# Grad mode is on inside a backward only under create_graph=True (a gradient penalty, a
# Hessian-vector product). The native forward's saved gradients are constants to autograd:
# a second derivative through them would silently lose its Hessian part. So that backward
# recomputes the first derivative with torch ops from the saved inputs instead (one more pass
# over the data, paid only there), and autograd records how it depends on them.


def _bce_target_grad(r: torch.Tensor) -> torch.Tensor:
    """d(bce)/d(target) = log(1 - r) - log(r), each log clamped at -100 as in the loss: the
    derivative of the value returned, finite at r = 0 or 1 (torch's -logit(r) is +-inf there)."""
    return torch.log1p(-r).clamp(min=-100) - torch.log(r).clamp(min=-100)


def _reconstruction_grads(recon: torch.Tensor, target: torch.Tensor, kind: str,
                          grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(loss)/d(recon) and d(loss)/d(target) per element, with torch ops in the native
    path's compute dtype."""
    dtype = _compute_dtype(recon)
    r, t = recon.to(dtype), target.to(dtype)
    if kind == "mse":
        grad_recon = 2 * (r - t) * grad_scale
        return grad_recon, -grad_recon
    if kind == "bce":  # torch's (and the kernel's) clamp of the denominator
        return (r - t) / torch.clamp(r * (1 - r), min=1e-12) * grad_scale, _bce_target_grad(r) * grad_scale
    return (torch.sigmoid(r) - t) * grad_scale, -r * grad_scale


def _kl_grads(mu: torch.Tensor, logvar: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(KL)/d(mu) and d(KL)/d(logvar) per element, with torch ops in the compute dtype."""
    dtype = _compute_dtype(mu)
    m, lv = mu.to(dtype), logvar.to(dtype)
    return m * grad_scale, 0.5 * (torch.exp(lv) - 1) * grad_scale


# The native forwards, one per device, the same contract: (sum, per-row sums or None,
# gradients * grad_scale or None). CPU: OpenMP + SIMD kernels on numpy views, the sum a float.
# CUDA: csrc/cuda/losses.cu through _cuda_losses, everything left on the device.


def _reconstruction_cpu(recon, target, kind, grad_scale, needs_grad, per_row):
    dtype = _compute_dtype(recon)
    r, t = _as_rows(recon, dtype), _as_rows(target, dtype)
    grad = _empty_like(r) if needs_grad else None
    row_losses = np.empty(r.shape[0], dtype=np.float64) if per_row else None
    total = _native.reconstruction_loss(r, t, _KINDS[kind], grad_scale, grad, row_losses)
    return total, _tensor_or_none(row_losses), _tensor_or_none(grad)


def _reconstruction_cuda(recon, target, kind, grad_scale, needs_grad, per_row):
    dtype = _compute_dtype(recon)
    return _cuda_losses.reconstruction_forward(_rows(recon, dtype), _rows(target, dtype), _KINDS[kind],
                                               grad_scale, needs_grad)


def _kl_cpu(mu, logvar, grad_scale, needs_grad_mu, needs_grad_logvar, per_row):
    dtype = _compute_dtype(mu)
    m, lv = _as_rows(mu, dtype), _as_rows(logvar, dtype)
    grad_mu = _empty_like(m) if needs_grad_mu else None
    grad_logvar = _empty_like(lv) if needs_grad_logvar else None
    row_losses = np.empty(m.shape[0], dtype=np.float64) if per_row else None
    total = _native.kl_normal(m, lv, grad_scale, grad_mu, grad_logvar, row_losses)
    return total, _tensor_or_none(row_losses), _tensor_or_none(grad_mu), _tensor_or_none(grad_logvar)


def _kl_cuda(mu, logvar, grad_scale, needs_grad_mu, needs_grad_logvar, per_row):
    dtype = _compute_dtype(mu)
    return _cuda_losses.kl_forward(_rows(mu, dtype), _rows(logvar, dtype), grad_scale, needs_grad_mu,
                                   needs_grad_logvar)


def _reconstruction_native(recon, target, kind, grad_scale, needs_grad, per_row):
    """The native forward for recon's device."""
    run = _reconstruction_cuda if recon.is_cuda else _reconstruction_cpu
    return run(recon, target, kind, grad_scale, needs_grad, per_row)


def _kl_native(mu, logvar, grad_scale, needs_grad_mu, needs_grad_logvar, per_row):
    """The native KL forward for mu's device."""
    run = _kl_cuda if mu.is_cuda else _kl_cpu
    return run(mu, logvar, grad_scale, needs_grad_mu, needs_grad_logvar, per_row)


def _tensor_or_none(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)


class ReconstructionLoss(torch.autograd.Function):
    """Native fused reconstruction loss; see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, recon, target, kind, reduction):
        count = recon.numel()
        grad_scale = 1.0 / count if (reduction == "mean" and count) else 1.0
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total, row_losses, grad = _reconstruction_native(recon, target, kind, grad_scale, needs_grad,
                                                         reduction == "none")
        ctx.kind, ctx.reduction, ctx.input_dtype, ctx.grad_scale = kind, reduction, recon.dtype, grad_scale
        ctx.saved_gradients = (grad.reshape(recon.shape),) if needs_grad else None
        # The inputs themselves (references, not copies): a backward with create_graph=True
        # recomputes the gradient from them.
        ctx.save_for_backward(recon, target)
        return _reduce(total, row_losses, reduction, count, recon.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        recon, target = ctx.saved_tensors
        saved = _take_saved(ctx)
        if torch.is_grad_enabled():  # create_graph=True: see _reconstruction_grads
            grad_recon, grad_target = (_times_incoming(g, grad_output, ctx.reduction)
                                       for g in _reconstruction_grads(recon, target, ctx.kind, ctx.grad_scale))
        else:
            if saved is None:  # a second backward (see _take_saved)
                saved = (_reconstruction_native(recon, target, ctx.kind, ctx.grad_scale, True, False)[2]
                         .reshape(recon.shape),)
            grad_recon, grad_target = ReconstructionLoss._from_saved(ctx, saved[0], recon, grad_output)
        return (grad_recon.to(ctx.input_dtype) if ctx.needs_input_grad[0] else None,
                grad_target.to(ctx.input_dtype) if ctx.needs_input_grad[1] else None,
                None, None)

    @staticmethod
    def _from_saved(ctx, grad, recon, grad_output):
        """The fast path: the native forward's gradient scaled; the target's only if needed."""
        grad_recon = _scale_saved(grad, grad_output, ctx.reduction)
        if not ctx.needs_input_grad[1]:
            return grad_recon, None
        if ctx.kind == "mse":
            return grad_recon, -grad_recon
        # Not from the saved gradient: bce_logits' d/dt = -x, bce's log(1 - r) - log(r) (one
        # more pass over recon, only for a target that requires grad)
        x = recon.to(grad.dtype)
        per_element = _bce_target_grad(x) if ctx.kind == "bce" else -x
        return grad_recon, _scale_saved(per_element * ctx.grad_scale, grad_output, ctx.reduction)


class KLNormal(torch.autograd.Function):
    """Native fused KL(N(mu, exp(logvar)) || N(0, 1)); see the module docstring."""

    @staticmethod
    def forward(ctx, mu, logvar, reduction):
        rows = mu.shape[0]
        grad_scale = 1.0 / rows if (reduction == "mean" and rows) else 1.0
        total, row_losses, grad_mu, grad_logvar = _kl_native(mu, logvar, grad_scale, ctx.needs_input_grad[0],
                                                             ctx.needs_input_grad[1], reduction == "none")
        ctx.reduction, ctx.input_dtype, ctx.grad_scale = reduction, mu.dtype, grad_scale
        ctx.saved_gradients = tuple(g.reshape(mu.shape) if g is not None else None for g in (grad_mu, grad_logvar))
        ctx.save_for_backward(mu, logvar)  # the inputs: for a create_graph=True backward
        return _reduce(total, row_losses, reduction, rows, mu.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        mu, logvar = ctx.saved_tensors
        saved = _take_saved(ctx)
        if torch.is_grad_enabled():  # create_graph=True: see _reconstruction_grads
            grad_mu, grad_logvar = _kl_grads(mu, logvar, ctx.grad_scale)
            scale = _times_incoming
        else:
            if saved is None:  # a second backward (see _take_saved)
                saved = tuple(None if g is None else g.reshape(mu.shape)
                              for g in _kl_native(mu, logvar, ctx.grad_scale, *ctx.needs_input_grad[:2], False)[2:])
            grad_mu, grad_logvar = saved
            scale = _scale_saved
        out = []
        for needed, grad in zip(ctx.needs_input_grad[:2], (grad_mu, grad_logvar)):
            out.append(scale(grad, grad_output, ctx.reduction).to(ctx.input_dtype) if needed else None)
        return out[0], out[1], None


def _runs_native(x: torch.Tensor) -> bool:
    """The native kernels take CPU tensors always, CUDA ones when LATENTSPACE_CUDA_LOSSES picks
    them (_cuda_losses.backend); any other device gets torch's own ops."""
    return x.device.type == "cpu" or (x.device.type == "cuda" and _cuda_losses.backend() == "native")


def _runs_native_here(*inputs: torch.Tensor) -> bool:
    """The native kernels for this device (_runs_native), unless forward-mode AD (dual
    tensors) or a torch.func transform (grad, vmap, jvp: wrapped tensors without storage)
    reaches an input: the autograd.Function has neither a jvp nor a vmap rule, and the
    kernels read memory, so those take torch's own ops (the same formulas), which support
    them all."""
    if not _runs_native(inputs[0]):
        return False
    return not any(forward_ad.unpack_dual(x).tangent is not None or _is_functorch_wrapped(x) for x in inputs)


def _needs_gradient(*inputs: torch.Tensor) -> bool:
    """Whether autograd may ask for a gradient: without one (evaluation, torch.no_grad()) the
    native forward neither computes nor stores it."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


def _functorch():
    return getattr(torch._C, "_functorch", None)


def _is_functorch_wrapped(x: torch.Tensor) -> bool:
    check = getattr(_functorch(), "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def _unwrapped(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func's wrappers (under vmap: every sample's values), so
    that a value check can raise in Python, where vmap refuses data-dependent control flow."""
    while _is_functorch_wrapped(x):
        x = _functorch().get_unwrapped(x)
    return x


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                        reduction: str = "mean") -> torch.Tensor:
    """Reconstruction loss of `recon` against `target`; see the module docstring."""
    _check_kind(kind)
    _check_reduction(reduction)
    _check_pair(recon, target, "recon, target")
    recon, target = _promoted(recon, target)
    if not _runs_native_here(recon, target):
        return _torch_reconstruction_loss(recon, target, kind, reduction)
    if not _needs_gradient(recon, target):  # (ctx.needs_input_grad ignores torch.no_grad())
        total, row_losses, _ = _reconstruction_native(recon, target, kind, 1.0, False, reduction == "none")
        return _reduce(total, row_losses, reduction, recon.numel(), recon.dtype)
    return ReconstructionLoss.apply(recon, target, kind, reduction)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL divergence of N(mu, exp(logvar)) from N(0, 1), per row; see the module docstring."""
    _check_reduction(reduction)
    _check_pair(mu, logvar, "mu, logvar")
    mu, logvar = _promoted(mu, logvar)
    if not _runs_native_here(mu, logvar):
        return _reduce_rows(-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()), reduction, mean_over="rows")
    if not _needs_gradient(mu, logvar):
        total, row_losses, _, _ = _kl_native(mu, logvar, 1.0, False, False, reduction == "none")
        return _reduce(total, row_losses, reduction, mu.shape[0], mu.dtype)
    return KLNormal.apply(mu, logvar, reduction)


def _torch_reconstruction_loss(recon, target, kind, reduction):
    """torch's own ops (CUDA tensors with LATENTSPACE_CUDA_LOSSES=torch or in a build without
    CUDA kernels; other devices; forward-mode AD and torch.func transforms)."""
    if kind == "mse":
        elementwise = F.mse_loss(recon, target, reduction="none")
    elif kind == "bce":
        # torch's CUDA kernel asserts on the device for a recon or a target outside [0, 1] and
        # for NaN in either (which leaves the CUDA context unusable). recon outside is refused
        # as the native path does; NaN in it is kept out of the kernel and put back after. The
        # target never enters it: the loss is linear in t, t bce(r, 1) + (1 - t) bce(r, 0),
        # so any target (NaN, or outside [0, 1], which the native path takes too) gets the
        # native path's value, and its gradient (r - t) / max(r (1 - r), 1e-12).
        nan = torch.isnan(recon)
        values = _unwrapped(recon)
        if bool(((values < 0) | (values > 1)).any()):
            raise ValueError("recon: kind='bce' expects probabilities in [0, 1], got values outside; "
                             "pass logits with kind='bce_logits' instead")
        safe = recon.masked_fill(nan, 0.5)
        positive = F.binary_cross_entropy(safe, torch.ones_like(safe), reduction="none")
        negative = F.binary_cross_entropy(safe, torch.zeros_like(safe), reduction="none")
        elementwise = target * positive + (1 - target) * negative
        elementwise = torch.where(nan, recon * recon, elementwise)  # NaN, and a NaN gradient (2 * recon)
    else:
        elementwise = F.binary_cross_entropy_with_logits(recon, target, reduction="none")
    return _reduce_rows(elementwise, reduction, mean_over="elements")


def _reduce_rows(elementwise: torch.Tensor, reduction: str, mean_over: str) -> torch.Tensor:
    """torch-side reductions with the native ones' conventions: "none" sums each row's
    features; "mean" averages over all elements (reconstruction) or over rows (KL)."""
    per_row = elementwise.reshape(elementwise.shape[0], -1).sum(dim=1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return elementwise.mean() if mean_over == "elements" else per_row.mean()


class ReconstructionLossModule(torch.nn.Module):
    """nn.Module form of reconstruction_loss (kind and reduction fixed at construction)."""

    def __init__(self, kind: str = "mse", reduction: str = "mean"):
        super().__init__()
        _check_kind(kind)
        _check_reduction(reduction)
        self.kind, self.reduction = kind, reduction

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(recon, target, self.kind, self.reduction)

"""The fused losses' forward on a CUDA GPU: csrc/cuda/losses.cu behind losses.py's functions.

Each call queues two kernels on torch's current stream for the inputs' device (the loss and
its gradient in one pass, then the per-row sums and the total) and returns device tensors:
nothing waits for the GPU, except kind "bce", which must read one flag back to refuse recon
values outside [0, 1] with a ValueError (torch's own kernel stops the process's CUDA context
with a device-side assert instead). Temporary memory comes from torch's caching allocator:
the per-row sums (rows float64), and for rows longer than 2,048 elements the per-segment sums
(rows x ceil(cols / 2048) float64).

Which implementation CUDA tensors get: LATENTSPACE_CUDA_LOSSES, read at every call,
"native" (these kernels), "torch" (torch's own ops, losses.py) or unset / "" / "auto" (the
default, DEFAULT_BACKEND: "native" since GPU run 10 checked them (tests, memcheck, racecheck)
and timed them faster than torch's ops through this library in every cell it timed (6 of 8;
docs/gpu-runs.md); a build without CUDA kernels gets "torch").
torch is imported by the functions that run kernels, not by this module: build_info() reports
backend() without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _native
from ._cuda_switch import choose_backend

if TYPE_CHECKING:
    import torch

__all__ = ["BACKEND_VARIABLE", "DEFAULT_BACKEND", "BCE_RANGE_MESSAGE", "backend", "kl_forward",
           "reconstruction_forward", "scale_in_place"]

BACKEND_VARIABLE = "LATENTSPACE_CUDA_LOSSES"
DEFAULT_BACKEND = "native"
BCE_RANGE_MESSAGE = ("recon: kind='bce' expects probabilities in [0, 1], got values outside; "
                     "pass logits with kind='bce_logits' instead")
_BCE = 1


def backend() -> str:
    """"native" or "torch": what CUDA tensors get now (see the module docstring)."""
    return choose_backend(BACKEND_VARIABLE, DEFAULT_BACKEND)


def _sums(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row sums, the total, and the per-segment workspace (None when not needed)."""
    import torch

    row_losses = torch.empty(rows, dtype=torch.float64, device=device)
    total = torch.empty((), dtype=torch.float64, device=device)
    doubles = _native.loss_cuda_workspace_doubles(rows, cols)
    workspace = torch.empty(doubles, dtype=torch.float64, device=device) if doubles else None
    return row_losses, total, workspace


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def reconstruction_forward(recon: torch.Tensor, target: torch.Tensor, kind: int, grad_scale: float,
                           needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """recon, target: C-contiguous (rows, cols) CUDA tensors of one dtype (float32 or float64)
    on one device. Returns (total, row_losses, grad): the summed loss (0-d float64), the
    per-row sums (float64) and d(loss)/d(recon) * grad_scale (recon's dtype; None unless
    needs_grad). kind: 0 mse, 1 bce (ValueError for recon outside [0, 1]), 2 bce_logits."""
    import torch

    rows, cols = recon.shape
    device = recon.device
    with torch.cuda.device(device):
        grad = torch.empty_like(recon) if needs_grad else None
        row_losses, total, workspace = _sums(rows, cols, device)
        out_of_range = torch.zeros(1, dtype=torch.int32, device=device) if kind == _BCE else None
        _native.reconstruction_loss_cuda(
            recon.data_ptr(), target.data_ptr(), rows, cols, kind, grad_scale, _address(grad),
            row_losses.data_ptr(), total.data_ptr(), _address(out_of_range), _address(workspace),
            torch.cuda.current_stream(device).cuda_stream, recon.dtype == torch.float64)
    if out_of_range is not None and bool(out_of_range.item()):
        raise ValueError(BCE_RANGE_MESSAGE)
    return total, row_losses, grad


def kl_forward(mu: torch.Tensor, logvar: torch.Tensor, grad_scale: float, needs_grad_mu: bool,
               needs_grad_logvar: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """mu, logvar as recon, target above. Returns (total, row_losses, grad_mu, grad_logvar),
    the gradients times grad_scale (None where not needed)."""
    import torch

    rows, cols = mu.shape
    device = mu.device
    with torch.cuda.device(device):
        grad_mu = torch.empty_like(mu) if needs_grad_mu else None
        grad_logvar = torch.empty_like(logvar) if needs_grad_logvar else None
        row_losses, total, workspace = _sums(rows, cols, device)
        _native.kl_normal_cuda(
            mu.data_ptr(), logvar.data_ptr(), rows, cols, grad_scale, _address(grad_mu), _address(grad_logvar),
            row_losses.data_ptr(), total.data_ptr(), _address(workspace),
            torch.cuda.current_stream(device).cuda_stream, mu.dtype == torch.float64)
    return total, row_losses, grad_mu, grad_logvar


def scale_in_place(grad: torch.Tensor, incoming: torch.Tensor, per_row: bool) -> torch.Tensor:
    """A backward's `grad * incoming` for a gradient the forward computed, in place and without
    reading `incoming` back (a plain loss.backward() passes a 1 that only the GPU knows):
    grad's rows times incoming's one value, or one value per row (per_row, reduction "none");
    rows whose factor is exactly 1 are not touched. grad: a C-contiguous (rows, ...) float32
    or float64 CUDA tensor the caller owns. Returns grad."""
    import torch

    if not grad.is_contiguous():
        raise ValueError("grad: expected a C-contiguous tensor")  # (the forward's own buffer always is)
    rows = grad.shape[0]
    factors = incoming.detach().to(grad.dtype).reshape(-1).contiguous()
    if factors.numel() != (rows if per_row else 1):
        raise ValueError(f"incoming: expected {rows if per_row else 1} values, got {factors.numel()}")
    device = grad.device
    with torch.cuda.device(device):
        _native.scale_rows_unless_one_cuda(grad.data_ptr(), rows, grad.numel() // rows, factors.data_ptr(),
                                           per_row, torch.cuda.current_stream(device).cuda_stream,
                                           grad.dtype == torch.float64)
    return grad

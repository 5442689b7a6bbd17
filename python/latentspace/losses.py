"""Reconstruction and KL losses for training latent models.

API (stable; the implementation is being moved onto fused native kernels):

reconstruction_loss(recon, target, kind="mse", reduction="mean")
    kind: "mse"        (recon - target)^2
          "bce"        -(t log p + (1 - t) log(1 - p)), p = recon in [0, 1], logs clamped at -100
          "bce_logits" the same with p = sigmoid(recon), computed stably from the logits
    reduction: "mean" (over all elements, like torch), "sum", or "none": one value per
    sample (row), the loss summed over that row's features.

kl_normal(mu, logvar, reduction="mean")
    KL(N(mu, exp(logvar)) || N(0, 1)) = -0.5 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)),
    summed over the latent dimensions of each row; reduction "mean" averages those per-row
    values over the batch (torch's "batchmean"), "sum" adds them, "none" returns them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kl_normal", "reconstruction_loss"]

_KINDS = ("mse", "bce", "bce_logits")
_REDUCTIONS = ("mean", "sum", "none")


def _check(recon: torch.Tensor, target: torch.Tensor, kind: str, reduction: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS}, got {kind!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(recon, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("recon, target: expected torch tensors")
    if recon.shape != target.shape:
        raise ValueError(f"recon, target: shapes differ, {tuple(recon.shape)} vs {tuple(target.shape)}")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                        reduction: str = "mean") -> torch.Tensor:
    _check(recon, target, kind, reduction)
    if kind == "mse":
        elementwise = F.mse_loss(recon, target, reduction="none")
    elif kind == "bce":
        elementwise = F.binary_cross_entropy(recon, target, reduction="none")
    else:
        elementwise = F.binary_cross_entropy_with_logits(recon, target, reduction="none")
    if reduction == "mean":
        return elementwise.mean()
    if reduction == "sum":
        return elementwise.sum()
    return elementwise.reshape(elementwise.shape[0], -1).sum(dim=1)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu, logvar: shapes differ, {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    per_row = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).reshape(mu.shape[0], -1).sum(dim=1)
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row

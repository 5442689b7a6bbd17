"""Metric-learning losses on latent codes: supervised contrastive and batch-hard triplet.

Plain torch functions (autograd does the gradients), used by latentspace.train(...,
labels=..., metric_loss=...) to shape the latent space so that squared-L2 distance follows
the labels. Both take a batch of codes z, (n, d) floating point, and integer labels, (n,),
and return a scalar.

supcon_loss(z, labels, temperature=1.0, similarity="sq_l2")
    Supervised contrastive loss (Khosla et al. 2020, "L_out"), with the similarity of two
    codes their negative squared Euclidean distance over the temperature:

        s_ij = -||z_i - z_j||^2 / temperature
        A(i) = {a != i},  P(i) = {p != i : y_p = y_i}
        L_i  = -1/|P(i)| * sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} exp(s_ia) ]
        loss = mean of L_i over the anchors i with |P(i)| > 0

    Khosla et al. use the cosine similarity of L2-normalised codes; that shapes angles only
    and leaves the norm of each code free, which the decoder then uses for reconstruction,
    so squared-L2 neighbours in the raw codes do not follow. With s = -d^2 / t the softmax
    over the batch is the one of neighbourhood components analysis (Goldberger et al. 2004):
    it directly asks each code's nearest codes, by the same squared L2 that knn and
    FlatIndex(metric="l2") use, to share its label. (similarity="cosine" gives the original
    loss, s_ij = cos(z_i, z_j) / temperature; docs/metric_learning.md compares the two.)

triplet_loss(z, labels, margin=1.0)
    Batch-hard triplet margin loss (Hermans et al. 2017) on squared Euclidean distances:

        d_ij = ||z_i - z_j||^2
        L_i  = max(0, max_{p in P(i)} d_ip - min_{n : y_n != y_i} d_in + margin)
        loss = mean of L_i over the anchors i with a positive and a negative in the batch

Anchors without a positive (a class with one sample in the batch) or, for the triplet
loss, without a negative (a batch of one class) have no term; a batch where no anchor has
one gives 0, still connected to z so that backward() works. Computed in float32 (float64
for float64 codes; bf16 / fp16 / fp8 codes are cast up first). Codes holding NaN give a loss of
NaN, as torch's losses do (training stops on a non-finite loss and says so). Finite codes give
no NaN: a distance (or a similarity over the temperature) beyond the dtype's range counts as
inf, so a loss beyond it is inf, and one within it (far classes, tight inside) comes out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._arrays import check_dense, check_float

__all__ = ["METRIC_LOSSES", "pairwise_sq_l2", "supcon_loss", "triplet_loss"]

METRIC_LOSSES = ("supcon", "triplet")
SIMILARITIES = ("sq_l2", "cosine")


def _check_codes(z: Any) -> None:
    """z: a dense floating-point torch tensor, (n, d); torch's own errors for others (numpy's
    sum() has no dim=, 1-d an IndexError, bool a NotImplementedError) name no argument."""
    if not isinstance(z, torch.Tensor):
        hint = "; pass torch.from_numpy(z)" if type(z).__module__ == "numpy" else ""
        raise TypeError(f"z: expected a torch tensor, got {type(z).__name__}{hint}")
    check_dense(z, "z")
    if not z.is_floating_point():
        raise TypeError(f"z: expected a floating-point tensor, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"z: expected shape (n, d), got {tuple(z.shape)}")


def _check_batch(z: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    _check_codes(z)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch tensor, got {type(labels).__name__}")
    check_dense(labels, "labels")  # (a sparse one reached torch's "Could not run 'aten::eq.Tensor'")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected integer class labels, got {labels.dtype}")
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels: expected shape ({z.shape[0]},) (one label per row of z), "
                         f"got {tuple(labels.shape)}")
    if labels.device != z.device:
        raise ValueError(f"labels: on {labels.device}, z on {z.device}; move them to the same device")
    if torch.finfo(z.dtype).bits < 32:  # fp16, bf16, fp8 (whose arithmetic torch lacks)
        z = z.float()
    return z, labels


def pairwise_sq_l2(z: torch.Tensor) -> torch.Tensor:
    """||z_i - z_j||^2 for all pairs, (n, n), as ||z_i||^2 + ||z_j||^2 - 2 z_i.z_j of the
    centred codes, clamped at 0 (n^2 memory, not n^2 d); the diagonal is set to exactly 0.
    z: a floating-point torch tensor, (n, d), computed in its own dtype (TypeError /
    ValueError naming z otherwise; float8, which has no arithmetic in torch, a TypeError)."""
    _check_codes(z)
    if torch.finfo(z.dtype).bits < 16:
        raise TypeError(f"z: torch has no arithmetic for {z.dtype}; pass z.float()")
    d, scale = _scaled_sq_l2(z)
    return d * scale * scale  # (in two steps: scale * scale alone can overflow)


def _scaled_sq_l2(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, scale): pairwise_sq_l2(z) = d * scale^2, d computed from the centred codes divided
    by scale, a power of two (0-d tensor) that brings their entries below 2, so d is finite
    for finite codes; the losses take differences of distances in these units, where two
    distances past the dtype's range still have one."""
    # Distances do not change under translation: centring first keeps ||z||^2 down to the
    # batch's spread, so the expansion does not cancel away distances that are small beside
    # the codes' norm (float32 codes near 1000, 0.01 apart, all came out 0). The centre is a
    # constant to autograd (the gradient is the same for any centre), finite (a NaN or Inf
    # code still spoils only its own row and column), and averaged in float64 (no overflow).
    centre = z.detach().double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).mean(dim=0)
    z = z - centre.to(z.dtype)
    # Squared norms can pass the dtype's range although a distance does not (float32 codes
    # +-1e20 whose classes are 1e19 wide): inf - inf gave NaN. Computed on the codes scaled by
    # a power of two (exact) to entries below 2, the distances scaled back round to inf only
    # where they pass the range themselves.
    scale = _power_of_two_scale(z)
    z = z / scale
    squared = (z * z).sum(dim=1)
    d = (squared[:, None] + squared[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    return d.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), 0.0), scale


def _power_of_two_scale(z: torch.Tensor) -> torch.Tensor:
    """2^(e - 1) with the largest finite |entry| of z = m 2^e (0.5 <= m < 1), a 0-d tensor of z's
    dtype on its device (no wait for the device); 1 for z without a nonzero finite entry.
    2^(e - 1) rather than 2^e: it stays within the dtype (float32's largest is below 2^128)."""
    if z.numel() == 0:
        return torch.ones((), dtype=z.dtype, device=z.device)
    largest = z.detach().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().amax()
    _, exponent = torch.frexp(largest)
    scale = torch.ldexp(torch.ones((), dtype=torch.float64, device=z.device), exponent - 1)
    return torch.where(largest > 0, scale, torch.ones_like(scale)).to(z.dtype)


def _zero(z: torch.Tensor) -> torch.Tensor:
    return (z * 0.0).sum()  # 0, differentiable (its gradient is 0)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                similarity: str = "sq_l2") -> torch.Tensor:
    """Supervised contrastive loss of a batch of codes (module docstring for the formula).

    Args:
        z: (n, d) codes.
        labels: (n,) integer class labels, on z's device.
        temperature: > 0; divides the similarities. A number, or a 0-d floating-point tensor
            on z's device, which may require grad (a learned temperature, e.g.
            log_t.exp() of an nn.Parameter): the loss is differentiable in it.
        similarity: "sq_l2" (default: -||z_i - z_j||^2) or "cosine" (cos(z_i, z_j), the
            original loss on L2-normalised codes).
    """
    z, labels = _check_batch(z, labels)
    temperature = _check_temperature(temperature, z)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    n = z.shape[0]
    if similarity == "sq_l2":
        d, scale = _scaled_sq_l2(z)
        s = -d
    else:
        unit = torch.nn.functional.normalize(z, dim=1)
        s, scale = unit @ unit.T, torch.ones((), dtype=z.dtype, device=z.device)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return _zero(z)
    # shifted in the scaled units, where every similarity of finite codes is finite
    s = _shifted_by_row_max(s, self_mask) * scale * scale / temperature
    log_denominator = torch.logsumexp(s.masked_fill(self_mask, -math.inf), dim=1)
    log_prob = s - log_denominator[:, None]
    mean_positive = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -mean_positive[anchors] / counts[anchors].to(z.dtype)
    return per_anchor.mean()


def _shifted_by_row_max(s: torch.Tensor, self_mask: torch.Tensor) -> torch.Tensor:
    """s minus each row's largest similarity to another code (a constant to autograd), so that
    s / temperature is at most 0 and its largest exactly 0, as torch's log_softmax shifts: a
    term is s_ip minus the log-sum-exp of its row, which a shift of the row leaves alone (and
    its gradient too), but unshifted the division could overflow every similarity of a row
    (float32 distances of 4 over a temperature of 1e-38: -inf - (-inf) gave NaN where the loss
    is 0), and similarities far from 0 absorbed the log-sum-exp's log(count) (two codes
    equally far, 2**134 away in float64: a term of 0, not log 2). A row without a finite
    maximum (a NaN or Inf code's) is left as it is."""
    largest = s.detach().masked_fill(self_mask, -math.inf).amax(dim=1, keepdim=True)
    return s - torch.where(torch.isfinite(largest), largest, torch.zeros_like(largest))


def _check_temperature(temperature: Any, z: torch.Tensor) -> Any:
    """A number > 0 (check_float's), or a 0-d floating-point tensor on z's device holding one
    (read once to check it: one wait for a GPU)."""
    if not isinstance(temperature, torch.Tensor):
        return check_float(temperature, "temperature", include_minimum=False)
    if temperature.dim() != 0 or not temperature.is_floating_point():
        raise TypeError(f"temperature: expected a number or a 0-d floating-point tensor, got a {temperature.dtype} "
                        f"tensor of shape {tuple(temperature.shape)}")
    if temperature.device != z.device:
        raise ValueError(f"temperature: on {temperature.device}, z on {z.device}; move them to the same device")
    value = float(temperature.detach())
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature: expected a finite number > 0, got {value!r}")
    return temperature


def triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Batch-hard triplet margin loss of a batch of codes on squared L2 distances (module
    docstring for the formula).

    Args:
        z: (n, d) codes.
        labels: (n,) integer class labels, on z's device.
        margin: >= 0, in units of squared distance.
    """
    z, labels = _check_batch(z, labels)
    margin = check_float(margin, "margin")
    n = z.shape[0]
    d, scale = _scaled_sq_l2(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    same = labels[:, None] == labels[None, :]
    positives = same & ~self_mask
    negatives = ~same
    anchors = positives.any(dim=1) & negatives.any(dim=1)
    if not bool(anchors.any()):
        return _zero(z)
    hardest_positive = d.masked_fill(~positives, -math.inf).amax(dim=1)
    hardest_negative = d.masked_fill(~negatives, math.inf).amin(dim=1)
    # the difference in the scaled units (finite for finite codes), then scaled back
    gap = (hardest_positive[anchors] - hardest_negative[anchors]) * scale * scale
    per_anchor = torch.relu(gap + margin)
    return per_anchor.mean()

"""The validation split of a training run: which rows are held out, drawn from the seed."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["held_out_count", "split_rows"]


def held_out_count(n: int, val_fraction: float) -> int:
    """How many of n rows validation holds out: at least one when val_fraction > 0, and never
    all of them."""
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"X: {n} rows leave none for training with val_fraction={val_fraction}")
    return n_val


def split_rows(n: int, n_val: int, labels: np.ndarray | None,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, training rows), n_val of them held out at random from `generator`;
    with labels, stratified: each class gives its share n_val * n_c / n, rounded so that the
    shares add up to n_val (largest remainders first, ties to the smaller label)."""
    if labels is None:
        order = torch.randperm(n, generator=generator)
        return order[:n_val], order[n_val:]
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    exact = n_val * sizes / n
    quota = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - quota), kind="stable")[: n_val - int(quota.sum())]
    quota[extra] += 1
    val, train = [], []
    for c in range(len(classes)):
        members = torch.from_numpy(np.flatnonzero(inverse == c))
        members = members[torch.randperm(len(members), generator=generator)]
        val.append(members[: quota[c]])
        train.append(members[quota[c] :])
    val_rows = torch.cat(val)
    # mixed classes in every validation batch, as in the shuffled training batches
    return val_rows[torch.randperm(len(val_rows), generator=generator)], torch.cat(train)

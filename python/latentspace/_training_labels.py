"""The metric-learning term of a training run with class labels: its options checked together,
and labels refused when the term could never shape the latent space with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ._arrays import as_labels, check_float
from .metric_learning import METRIC_LOSSES, supcon_loss, triplet_loss

__all__ = ["MetricTerm", "metric_term", "check_training_labels", "DEFAULT_METRIC_TEMPERATURE",
           "DEFAULT_METRIC_MARGIN"]

# Defaults of the metric-learning terms (docs/metric_learning.md: how they were chosen).
DEFAULT_METRIC_TEMPERATURE = 1.0  # supcon: similarities are -||z_i - z_j||^2 / temperature
DEFAULT_METRIC_MARGIN = 1.0  # triplet: in units of squared latent distance


@dataclass(frozen=True)
class MetricTerm:
    """The term added to each batch's objective: weight * loss(codes of the batch, their labels)."""

    name: str  # "supcon" or "triplet"
    labels: np.ndarray  # (n,) int64, one per row of X
    weight: float
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (codes, labels of the batch) -> scalar


def metric_term(labels: Any, n: int, metric_loss: Any, metric_weight: Any, metric_margin: Any,
                metric_temperature: Any, batch_size: int) -> MetricTerm | None:
    """The run's metric term (None: metric learning is off), after checking that the metric
    options come together and make sense."""
    if labels is None and metric_loss is None:
        for value, name in ((metric_margin, "metric_margin"), (metric_temperature, "metric_temperature")):
            if value is not None:
                raise ValueError(f"{name}: set only with labels and metric_loss (metric learning is off)")
        # (numpy scalars too: np.float32(1.0) is the default's value)
        if isinstance(metric_weight, (int, float, np.integer, np.floating)) and not isinstance(
                metric_weight, (bool, np.bool_)) and metric_weight == 1.0:
            return None
        raise ValueError(f"metric_weight: set only with labels and metric_loss (metric learning is off), "
                         f"got {metric_weight!r}")
    if metric_loss is None:
        raise ValueError(f"metric_loss: labels were given; choose how they shape the latent space, "
                         f"one of {METRIC_LOSSES}")
    if not isinstance(metric_loss, str) or metric_loss not in METRIC_LOSSES:
        raise ValueError(f"metric_loss: expected one of {METRIC_LOSSES} or None, got {metric_loss!r}")
    if labels is None:
        raise ValueError(f"labels: metric_loss={metric_loss!r} needs labels, one integer class label "
                         "per row of X")
    y = as_labels(labels, "labels", n)
    _check_labels_can_shape(y, batch_size)
    weight = check_float(metric_weight, "metric_weight")
    if metric_loss == "supcon":
        if metric_margin is not None:
            raise ValueError("metric_margin: applies to metric_loss='triplet'; 'supcon' has metric_temperature")
        temperature = DEFAULT_METRIC_TEMPERATURE if metric_temperature is None else check_float(
            metric_temperature, "metric_temperature", include_minimum=False)
        return MetricTerm(metric_loss, y, weight, lambda codes, y_batch: supcon_loss(codes, y_batch, temperature))
    if metric_temperature is not None:
        raise ValueError("metric_temperature: applies to metric_loss='supcon'; 'triplet' has metric_margin")
    margin = DEFAULT_METRIC_MARGIN if metric_margin is None else check_float(metric_margin, "metric_margin")
    return MetricTerm(metric_loss, y, weight, lambda codes, y_batch: triplet_loss(codes, y_batch, margin))


def _check_labels_can_shape(y: np.ndarray, batch_size: int) -> None:
    """Refuses labels (and batches) with which the metric term could never shape anything,
    rather than training silently without it: with one class the triplet term has no
    negatives and supcon only pulls every code together; with every class a single sample,
    or batches of one row, no code has a positive in its batch and both terms stay 0."""
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        every = f" (every label is {classes[0]})" if classes.size else ""
        raise ValueError(f"labels: metric learning needs at least 2 classes, got {classes.size}{every}; "
                         "train without labels and metric_loss")
    if counts.max() < 2:
        raise ValueError(f"labels: every class has a single sample ({classes.size} classes), so no code has a "
                         "positive and the metric term would stay 0; give each class two or more rows")
    if batch_size < 2:
        raise ValueError(f"batch_size: metric learning compares the codes within a batch and needs at least 2 "
                         f"rows in it, got batch_size={batch_size}")


def check_training_labels(y_train: np.ndarray, val_fraction: float) -> None:
    """As _check_labels_can_shape, for the rows left to train on once validation's share of
    each class is held out (ten classes of two rows and val_fraction=0.5 leave single samples)."""
    classes, counts = np.unique(y_train, return_counts=True)
    if classes.size < 2 or counts.max() < 2:
        what = "a single class" if classes.size < 2 else "every class a single sample"
        raise ValueError(f"labels: the training rows left after holding out val_fraction={val_fraction} have "
                         f"{what}, so the metric term could not shape the codes; lower val_fraction or give "
                         "each class more rows")

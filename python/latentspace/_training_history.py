"""History: the record of a training run that latentspace.train returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["History"]


@dataclass
class History:
    """What train() did.

    Losses are per sample: the objective summed over features (plus beta * KL for a VAE) and
    averaged over samples; train_loss[e] is the mean over epoch e's batches (with the KL
    warm-up weight in force then), val_loss[e] the full objective on the validation rows
    after epoch e (empty without validation). With labels and a metric_loss, both include
    metric_weight * the metric term, and train_metric[e] / val_metric[e] record the metric
    term itself (unweighted; mean over the batches, each weighted by its rows; validation
    batches have batch_size rows, as in training, so the two are comparable).
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    monitor: str = "val_loss"  # the loss that picks the best epoch: "val_loss" or "train_loss"
    best_epoch: int | None = None  # 0-based; the model holds this epoch's weights at the end
    best_loss: float | None = None
    epochs_run: int = 0  # completed epochs
    stopped_early: bool = False
    interrupted: bool = False  # Ctrl-C (KeyboardInterrupt) ended training
    seconds: float = 0.0
    samples_per_second: float = 0.0  # training samples per second of training time
    device: str = "cpu"
    seed: int = 0
    checkpoint: str | None = None  # the file holding the best weights, when one was asked for
    metric_loss: str | None = None  # "supcon", "triplet", or None (no labels)
    metric_weight: float = 0.0
    train_metric: list[float] = field(default_factory=list)
    val_metric: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        # The run in one line (the dataclass's own repr printed every epoch's losses: a
        # hundred-epoch run filled the screen); the per-epoch lists stay in the fields.
        best = ("none" if self.best_epoch is None
                else f"epoch {self.best_epoch} ({self.monitor} {self.best_loss:.6g})")
        how = "interrupted" if self.interrupted else "stopped early" if self.stopped_early else "completed"
        metric = "" if self.metric_loss is None else f", metric_loss={self.metric_loss!r}"
        return (f"History({self.epochs_run} epochs {how}, best {best}, {self.seconds:.1f} s on {self.device}, "
                f"{self.samples_per_second:,.0f} samples/s{metric}; per-epoch losses in .train_loss / .val_loss)")

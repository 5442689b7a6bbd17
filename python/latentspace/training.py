"""The training loop for the learned latent models: thin Python over model.objective.

    history = latentspace.train(model, X, epochs=100, batch_size=128, lr=1e-3, seed=0)

AdamW minimises the model's objective (reconstruction + beta * KL for a VAE, computed by
latentspace.losses), plus, given class labels, a weighted metric-learning term on the latent
codes (latentspace.metric_learning: supervised contrastive or batch-hard triplet), with a
held-out validation split (stratified by label when there are labels), early stopping, the
best weights kept (in memory and, with `checkpoint=path`, on disk), a tqdm progress bar, bf16
autocast on the GPU, and Ctrl-C handled: see train()'s docstring.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ._arrays import (as_labels, check_float, check_int, check_real_dtype, is_torch_tensor, numpy_to_tensor,
                      resolve_device)
from .metric_learning import METRIC_LOSSES, supcon_loss, triplet_loss
from .models.base import ReconstructionModel, module_device_dtype
from .models.io import MODEL_CLASSES, savable, save_model
from .models.pca import PCA

__all__ = ["History", "train"]

_CHECK_CHUNK_ROWS = 65536  # rows per pass when checking the data (works on memory maps)
_RESIDENT_MAX_BYTES = 1 << 30  # data up to this size is moved to the device once, whole
_VAL_BATCH_MIN = 1024  # validation batches (no gradients) can be larger than training ones
# Defaults of the metric-learning terms (docs/metric_learning.md: how they were chosen).
DEFAULT_METRIC_TEMPERATURE = 1.0  # supcon: similarities are -||z_i - z_j||^2 / temperature
DEFAULT_METRIC_MARGIN = 1.0  # triplet: in units of squared latent distance


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


# ---------------------------------------------------------------------------------------
# Data


_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class _Data:
    """The training rows, checked once, served in batches as tensors of the model's dtype
    (float32 unless the model was converted) on the device.

    In-memory data up to 1 GiB (in that dtype) is converted and moved to the device once, and
    data of that dtype in CPU memory is used in place for CPU training, whatever its size; a
    memory map, or other data, stays where it is and each batch is gathered from it (rows in
    ascending order, so a memory map is read front to back).
    """

    def __init__(self, X: Any, model: ReconstructionModel, loss: str, device: torch.device):
        self.dtype = module_device_dtype(model)[1]  # float32 unless the model was converted
        shapes = model._sample_shapes()
        if is_torch_tensor(X):
            X = X.detach()
        elif not isinstance(X, np.ndarray):  # a np.memmap is an ndarray: never copied whole
            if isinstance(X, (str, bytes)) or X is None:
                raise TypeError(f"X: expected a numpy array or torch tensor, got {type(X).__name__}")
            X = np.asarray(X)
        check_real_dtype(X, "X")
        if X.ndim < 2 or tuple(X.shape[1:]) not in shapes:
            want = " or ".join("(n, " + ", ".join(map(str, s)) + ")" for s in shapes)
            raise ValueError(f"X: expected shape {want} for this {type(model).__name__}, got {tuple(X.shape)}")
        self.n = int(X.shape[0])
        self._check_values(X, loss, self.dtype)
        self.device = device
        nbytes = self.n * int(np.prod(X.shape[1:])) * self.dtype.itemsize
        in_memory = is_torch_tensor(X) or not isinstance(X, np.memmap)
        # data of the model's dtype already in CPU memory is used in place, however large
        zero_copy = device.type == "cpu" and (
            (is_torch_tensor(X) and X.device.type == "cpu" and X.dtype == self.dtype)
            or (not is_torch_tensor(X) and X.dtype == _NUMPY_OF.get(self.dtype) and X.flags.c_contiguous
                and X.flags.writeable))
        self.resident = in_memory and (zero_copy or nbytes <= _RESIDENT_MAX_BYTES)
        if self.resident:
            tensor = X if is_torch_tensor(X) else numpy_to_tensor(X)
            self.tensor = tensor.to(device=device, dtype=self.dtype)
        else:
            self.source = X

    @staticmethod
    def _check_values(X: Any, loss: str, dtype: torch.dtype) -> None:
        low, high = math.inf, -math.inf
        largest = torch.finfo(dtype).max  # the model's dtype: values beyond it become inf
        for start in range(0, X.shape[0], _CHECK_CHUNK_ROWS):
            chunk = X[start : start + _CHECK_CHUNK_ROWS]
            if is_torch_tensor(chunk):
                chunk = chunk.to("cpu", torch.float64).numpy()
            rows = chunk.reshape(chunk.shape[0], -1)
            finite = np.isfinite(rows).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise ValueError(f"X: row {row} contains NaN or Inf; clean the data before training")
            # (only where the data's dtype reaches past the model's: a float32 array cannot
            # exceed a float64 model's range, nor be compared with it without overflowing)
            reaches = rows.dtype.kind != "f" or float(np.finfo(rows.dtype).max) > largest
            beyond = (np.abs(rows) > largest).any(axis=1) if reaches else np.zeros(rows.shape[0], dtype=bool)
            if beyond.any():
                row = start + int(np.flatnonzero(beyond)[0])
                name = str(dtype).removeprefix("torch.")
                raise ValueError(f"X: row {row} has values beyond {name}'s range (|x| > {largest:.4g}), the model's "
                                 "dtype; rescale the data")
            if chunk.size:
                low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        if loss == "bce" and (low < 0 or high > 1):
            raise ValueError(
                f"X: loss='bce' needs data in [0, 1] (probabilities, such as pixel intensities), got "
                f"values in [{low:g}, {high:g}]; rescale the data or use loss='mse' (with output='linear')"
            )

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        """The batch's samples in the order of `rows` (an int64 CPU tensor of row numbers), as
        the labels are gathered."""
        if self.resident:
            return self.tensor[rows.to(self.device)]
        # Read in ascending row order (a memory map pages forward), then put the samples back in
        # the order asked: the metric term pairs them with labels[rows].
        order = np.argsort(rows.numpy(), kind="stable")
        ordered = rows.numpy()[order]
        chunk = self.source[torch.from_numpy(ordered)] if is_torch_tensor(self.source) else self.source[ordered]
        tensor = chunk if is_torch_tensor(chunk) else torch.from_numpy(np.asarray(chunk))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return tensor[torch.from_numpy(back)].to(device=self.device, dtype=self.dtype)


def _checkpoint_path(checkpoint: Any, model: ReconstructionModel) -> Path:
    """`checkpoint` as a Path, checked before any training: a bad path or a model that
    save_model cannot write would otherwise only fail at the first best epoch."""
    path = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    if not isinstance(path, str):  # bytes paths too: Path() takes only str
        raise TypeError(f"checkpoint: expected a file path (str or os.PathLike), got "
                        f"{type(checkpoint).__name__} {checkpoint!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint: {path} is a folder; pass a file path")
    if not path.parent.is_dir():
        raise ValueError(f"checkpoint: folder {path.parent} does not exist")
    if not savable(model):  # save_model's own test
        raise TypeError(f"model: checkpoint= saves with latentspace.save_model, which takes only "
                        f"{', '.join(MODEL_CLASSES)}, got {type(model).__name__}; train without checkpoint= "
                        "(and save model.state_dict() yourself)")
    return path


class _Kept:
    """The weights train() ends with: the best epoch's or, while the KL warm-up lasts (no epoch
    can be best yet), the last finished epoch's. Copied into buffers allocated once, so that
    keeping every warm-up epoch costs a copy, not an allocation."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch: int | None = None
        self.loss: float | None = None
        self._copying: tuple[int, float] | None = None

    def keep(self, model: torch.nn.Module, epoch: int, loss: float) -> None:
        # Marked first: a copy cut short (Ctrl-C) is completed by settle() from the model,
        # which still holds this epoch's weights then, never left half-overwritten.
        self._copying = (epoch, loss)
        self.epoch = self.loss = None
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            for key, value in model.state_dict().items():
                self.state[key].copy_(value.detach())
        self.epoch, self.loss = epoch, loss
        self._copying = None

    def settle(self, model: torch.nn.Module) -> None:
        """Completes a copy that an exception cut short."""
        if self._copying is not None:
            self.keep(model, *self._copying)


def _add_note(error: BaseException, note: str) -> None:
    """error.add_note where Python has it (3.11+)."""
    if hasattr(error, "add_note"):
        error.add_note(note)


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused when this torch has the fused kernel for the device (CPU: torch >= 2.4;
    3.5x faster steps than the default on the small models here, measured on 2 cores)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------
# Labels: the metric-learning term and the stratified split


def _metric_term(labels: Any, n: int, metric_loss: Any, metric_weight: Any, metric_margin: Any,
                 metric_temperature: Any, batch_size: int) -> tuple[Callable | None, np.ndarray | None, float]:
    """(term(codes, labels) -> scalar or None, the labels as int64 numpy or None, weight),
    after checking that the metric options come together and make sense."""
    if labels is None and metric_loss is None:
        for value, name in ((metric_margin, "metric_margin"), (metric_temperature, "metric_temperature")):
            if value is not None:
                raise ValueError(f"{name}: set only with labels and metric_loss (metric learning is off)")
        # (numpy scalars too: np.float32(1.0) is the default's value)
        if isinstance(metric_weight, (int, float, np.integer, np.floating)) and not isinstance(
                metric_weight, (bool, np.bool_)) and metric_weight == 1.0:
            return None, None, 0.0
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
        return (lambda codes, y_batch: supcon_loss(codes, y_batch, temperature)), y, weight
    if metric_temperature is not None:
        raise ValueError("metric_temperature: applies to metric_loss='supcon'; 'triplet' has metric_margin")
    margin = DEFAULT_METRIC_MARGIN if metric_margin is None else check_float(metric_margin, "metric_margin")
    return (lambda codes, y_batch: triplet_loss(codes, y_batch, margin)), y, weight


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


def _check_training_labels(y_train: np.ndarray, val_fraction: float) -> None:
    """As _check_labels_can_shape, for the rows left to train on once validation's share of
    each class is held out (ten classes of two rows and val_fraction=0.5 leave single samples)."""
    classes, counts = np.unique(y_train, return_counts=True)
    if classes.size < 2 or counts.max() < 2:
        what = "a single class" if classes.size < 2 else "every class a single sample"
        raise ValueError(f"labels: the training rows left after holding out val_fraction={val_fraction} have "
                         f"{what}, so the metric term could not shape the codes; lower val_fraction or give "
                         "each class more rows")


def _split(n: int, n_val: int, labels: np.ndarray | None,
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


# ---------------------------------------------------------------------------------------
# The loop


def train(model: ReconstructionModel, X: Any, *, epochs: int = 100, batch_size: int = 128,
          lr: float = 1e-3, weight_decay: float = 0.01, val_fraction: float = 0.1,
          early_stopping: int | None = 10, seed: int | None = 0, device: Any = "auto",
          loss: str | None = None, autocast: bool | None = None,
          checkpoint: str | os.PathLike | None = None, progress: bool = True,
          callback: Callable[[dict[str, Any]], None] | None = None, labels: Any = None,
          metric_loss: str | None = None, metric_weight: float = 1.0, metric_margin: float | None = None,
          metric_temperature: float | None = None) -> History:
    """Trains a learned latent model (Autoencoder, VAE, ConvAutoencoder) on X with AdamW.

    Args:
        model: the model; trained in place, moved to `device`, left in eval mode holding the
            best epoch's weights.
        X: (n, *model.input_shape) numpy array, memory map or torch tensor (a
            ConvAutoencoder also takes flattened rows). Checked once for NaN / Inf (and for
            values outside [0, 1] when the loss is "bce").
        epochs: at most this many passes over the training rows.
        batch_size: rows per optimizer step (the last batch of an epoch may be smaller).
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        val_fraction: share of X's rows held out (at random, from `seed`) for validation,
            0 <= val_fraction < 1; with labels, stratified (each class gives its share). The
            validation loss picks the best epoch and drives early stopping; with
            val_fraction=0 the training loss does.
        early_stopping: stop after this many epochs without a better monitored loss; None
            (or 0) trains all `epochs`.
        seed: an integer in [0, 2^63); seeds the split, the shuffling and the VAE's noise
            (None: a fresh random seed, recorded in the History). On the CPU, two runs with the same seed and the
            same initial weights give identical weights (seed the weights with
            torch.manual_seed before building the model).
        device: "auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda", "cuda:N".
        loss: "mse" or "bce" (the model's default when None: "bce" for output="sigmoid").
        autocast: bf16 autocast of the forward pass (the losses stay float32); None: on
            for CUDA, off on the CPU.
        checkpoint: a file path (str or os.PathLike); each new best epoch is saved there with
            latentspace.save_model (atomically: an interrupted write keeps the previous file).
            The model must be one save_model can write (not a subclass): checked before
            training.
        progress: show a tqdm bar (epoch, train and validation loss, samples per second).
        callback: called after every epoch with a dict (epoch, train_loss, val_loss,
            train_metric, val_metric, best_epoch, seconds, samples_per_second).
        labels: (n,) integer class labels of X's rows (numpy or torch), for supervised
            shaping of the latent space; needs metric_loss. Floats, NaN, booleans or another
            length raise TypeError / ValueError naming `labels`; so do labels the metric term
            could not learn from (one class, or every class a single sample, also among the
            rows left to train on after val_fraction), as does
            batch_size=1 (ValueError naming batch_size): the term compares codes in a batch.
        metric_loss: "supcon" or "triplet" (needs labels): the batch objective becomes
                model objective + metric_weight * metric term(codes of the batch, their labels)
            on the codes encode() returns (a VAE's posterior mean mu). "supcon": supervised
            contrastive, with similarity -||z_i - z_j||^2 / metric_temperature (default
            1.0); "triplet": batch-hard triplet margin loss on squared L2 distances,
            margin metric_margin (default 1.0). Formulas: latentspace.metric_learning.
        metric_weight: >= 0, the weight of the metric term against the reconstruction
            objective (which is summed over features, per sample).
        metric_margin, metric_temperature: as above; each only with its loss.
    Best epoch: the lowest monitored loss. The KL warm-up of a VAE changes the objective
    while it lasts, so epochs before it is over are neither picked as best nor counted by
    early stopping (a run shorter than the warm-up keeps its last epoch). Without validation
    that includes an epoch whose first batches were still in it: its training loss averages
    batches with a lower KL weight.

    Ctrl-C: a KeyboardInterrupt during training (from the keyboard or from `callback`) stops
    it cleanly: the best weights so far are restored into the model, written to
    `checkpoint` if given, and train returns the History with interrupted=True (it does not
    re-raise; check `history.interrupted`). If it comes before the first epoch ends, the model
    keeps its weights of that moment and no checkpoint is written. Ctrl-C in the middle of an
    epoch drops that epoch (during the warm-up too: the last finished epoch is kept).

    Any other exception (from `callback`, say) leaves the model the same way (the kept weights
    restored and checkpointed, eval mode), then propagates unchanged; should that restore fail
    too, its error is added to the exception as a note (Python 3.11+), never raised instead.

    Raises TypeError / ValueError naming the argument for bad arguments (and TypeError for a
    PCA, which is fitted in closed form: PCA.fit(X)); FloatingPointError when the loss
    becomes NaN or Inf (the best weights so far, or during the warm-up the last finished
    epoch's, are restored and checkpointed first; the message says which).
    """
    if isinstance(model, PCA):
        raise TypeError("model: PCA is fitted in closed form, not trained: call model.fit(X)")
    if not isinstance(model, ReconstructionModel):
        raise TypeError(f"model: expected an Autoencoder, VAE or ConvAutoencoder, got {type(model).__name__}")
    epochs = check_int(epochs, "epochs")
    batch_size = check_int(batch_size, "batch_size")
    lr = check_float(lr, "lr", include_minimum=False)
    weight_decay = check_float(weight_decay, "weight_decay")
    val_fraction = check_float(val_fraction, "val_fraction", maximum=1.0, include_maximum=False)
    early_stopping = 0 if early_stopping is None else check_int(early_stopping, "early_stopping", minimum=0)
    # (below 2^63: the generators are seeded with seed + 1 and seed + 2, which torch takes as
    # 64-bit integers)
    seed = secrets.randbits(63) if seed is None else check_int(seed, "seed", minimum=0, below=1 << 63)
    if autocast is not None and not isinstance(autocast, bool):
        raise TypeError(f"autocast: expected True, False or None, got {autocast!r}")
    if checkpoint is not None:
        checkpoint = _checkpoint_path(checkpoint, model)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
    device = resolve_device(device)
    loss = model.check_loss(loss)
    data = _Data(X, model, loss, device)
    metric, y, metric_weight = _metric_term(labels, data.n, metric_loss, metric_weight, metric_margin,
                                            metric_temperature, batch_size)
    label_tensor = None if y is None else torch.from_numpy(y).to(device)

    # Split and generators, all from the seed.
    split = torch.Generator().manual_seed(seed)
    n_val = max(1, round(val_fraction * data.n)) if val_fraction > 0 else 0
    if data.n - n_val < 1:
        raise ValueError(f"X: {data.n} rows leave none for training with val_fraction={val_fraction}")
    val_rows, train_rows = _split(data.n, n_val, y, split)
    if y is not None and n_val:  # the check above saw every row; the term sees the training rows only
        _check_training_labels(y[train_rows.numpy()], val_fraction)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    val_noise = torch.Generator(device=device)

    model.to(device)
    optimizer = _adamw(model, lr, weight_decay)
    use_autocast = (device.type == "cuda") if autocast is None else autocast
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast else nullcontext
    n_batches = math.ceil(len(train_rows) / batch_size)
    warmup = float(model.warmup_epochs)

    def final(epoch: int) -> bool:
        """Whether epoch's monitored loss is of the final objective, the KL warm-up over: the
        validation loss is computed after the epoch, the training loss averages its batches,
        each with the weight of its moment (its first batch's progress is the earliest)."""
        return (epoch + 1 if n_val else epoch + 1 / n_batches) >= warmup

    history = History(monitor="val_loss" if n_val else "train_loss", device=str(device), seed=seed,
                      checkpoint=None, metric_loss=metric_loss if metric else None, metric_weight=metric_weight)
    kept = _Kept()
    written_epoch: int | None = None
    bad_epochs = 0
    train_seconds = 0.0
    diverged: str | None = None
    started = time.perf_counter()

    from tqdm import tqdm

    bar = tqdm(total=epochs * n_batches, unit="batch", desc=type(model).__name__, disable=not progress,
               file=sys.stderr, dynamic_ncols=True, leave=True)

    def batch_objective(rows: torch.Tensor, progress: float | None,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the batch's training objective, its metric term or None)."""
        with amp():
            out = model.objective(data.batch(rows), loss=loss, progress=progress, generator=generator)
        if metric is None:
            return out["loss"], None
        if "codes" not in out:
            raise TypeError(f"labels: {type(model).__name__}.objective returns no 'codes' for the metric term")
        term = metric(out["codes"], label_tensor[rows.to(device)])  # float32, outside autocast
        return out["loss"] + metric_weight * term, term

    def restore() -> None:
        """The kept weights (see _Kept) back into the model and, if that has not happened yet,
        onto disk; the model in eval mode whatever happens."""
        try:
            kept.settle(model)
            if kept.state is None:
                return  # stopped before the first epoch ended: the model keeps its weights
            history.best_epoch, history.best_loss = kept.epoch, kept.loss
            model.load_state_dict(kept.state)
            if checkpoint is not None:
                if written_epoch != kept.epoch:
                    save_model(model, checkpoint)
                history.checkpoint = str(checkpoint)
        finally:
            model.eval()

    def evaluate() -> tuple[float, float | None]:
        val_noise.manual_seed(seed + 2)  # the same noise every epoch: comparable values
        total = torch.zeros((), device=device)
        metric_total = torch.zeros((), device=device)
        # the metric term depends on the batch: validate in training-sized batches then
        step = batch_size if metric is not None else max(batch_size, _VAL_BATCH_MIN)
        with torch.no_grad():
            for start in range(0, n_val, step):
                rows = val_rows[start : start + step]
                objective, term = batch_objective(rows, None, val_noise)
                total += objective.float() * len(rows)
                if term is not None:
                    metric_total += term * len(rows)
        return float(total) / n_val, (float(metric_total) / n_val if metric is not None else None)

    try:
        for epoch in range(epochs):
            model.train()
            epoch_start = time.perf_counter()
            shuffled = train_rows[torch.randperm(len(train_rows), generator=split)]
            total = torch.zeros((), device=device)
            metric_total = torch.zeros((), device=device)
            for b in range(n_batches):
                rows = shuffled[b * batch_size : (b + 1) * batch_size]
                objective, term = batch_objective(rows, epoch + (b + 1) / n_batches, noise)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                total += objective.detach().float() * len(rows)
                if term is not None:
                    metric_total += term.detach() * len(rows)
                bar.update(1)
            train_loss = float(total) / len(train_rows)  # one device sync per epoch
            train_metric = float(metric_total) / len(train_rows) if metric is not None else None
            seconds = time.perf_counter() - epoch_start
            train_seconds += seconds
            if not math.isfinite(train_loss):
                diverged = f"the training loss became {train_loss} in epoch {epoch}"
                break
            model.eval()
            val_loss, val_metric = evaluate() if n_val else (None, None)
            history.train_loss.append(train_loss)
            if val_loss is not None:
                history.val_loss.append(val_loss)
            if train_metric is not None:
                history.train_metric.append(train_metric)
            if val_metric is not None:
                history.val_metric.append(val_metric)
            history.epochs_run = epoch + 1

            monitored = val_loss if n_val else train_loss
            if monitored is not None and not math.isfinite(monitored):
                diverged = f"the validation loss became {monitored} in epoch {epoch}"
                break
            if final(epoch):  # the objective is final from here on
                if history.best_loss is None or monitored < history.best_loss:
                    kept.keep(model, epoch, monitored)
                    history.best_epoch, history.best_loss = epoch, monitored
                    bad_epochs = 0
                    if checkpoint is not None:
                        save_model(model, checkpoint)
                        written_epoch = epoch
                else:
                    bad_epochs += 1
            else:  # a run that ends (or is stopped) in the warm-up keeps its last finished epoch
                kept.keep(model, epoch, monitored)
            speed = len(train_rows) / seconds if seconds > 0 else float("inf")
            val_text = f" val {val_loss:.5g}" if val_loss is not None else ""
            if train_metric is not None:
                val_text += f" {metric_loss} {train_metric:.4g}"
            bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} train {train_loss:.5g}{val_text} "
                                f"{speed:,.0f} samples/s", refresh=False)
            if callback is not None:
                callback({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                          "train_metric": train_metric, "val_metric": val_metric,
                          "best_epoch": history.best_epoch, "seconds": seconds,
                          "samples_per_second": speed})
            if early_stopping and bad_epochs >= early_stopping:
                history.stopped_early = True
                break
    except KeyboardInterrupt:
        history.interrupted = True
    except BaseException as error:
        # Any other exception (from callback, say) still leaves the model as documented, then
        # propagates unchanged: a failure of the restore itself must not hide it.
        try:
            restore()
        except BaseException as failure:
            _add_note(error, f"latentspace.train: restoring the kept weights after this error failed "
                             f"too: {type(failure).__name__}: {failure}")
        raise
    finally:
        bar.close()

    restore()
    history.seconds = time.perf_counter() - started
    trained = history.epochs_run * len(train_rows)
    history.samples_per_second = trained / train_seconds if train_seconds > 0 else 0.0
    if diverged is not None:
        raise FloatingPointError(f"training diverged: {diverged}; {_restored(kept, final, checkpoint)}. "
                                 f"Lower lr (was {lr:g}) or check the data's scale")
    return history


def _restored(kept: _Kept, final: Callable[[int], bool], checkpoint: Path | None) -> str:
    """What the model holds after a divergence, for the error message."""
    if kept.epoch is None:
        return "no epoch finished cleanly, so there were no weights to restore (the model holds the diverged ones)"
    where = " and checkpointed" if checkpoint is not None else ""
    if not final(kept.epoch):  # no epoch could be best yet
        return (f"the weights of epoch {kept.epoch}, the last finished one (the KL warm-up was not over), "
                f"were restored{where}")
    return f"the weights of epoch {kept.epoch}, the best, were restored{where}"

"""The training loop for the learned latent models: thin Python over model.objective.

    history = latentspace.train(model, X, epochs=100, batch_size=128, lr=1e-3, seed=0)

AdamW minimises the model's objective (reconstruction + beta * KL for a VAE, computed by
latentspace.losses), plus, given class labels, a weighted metric-learning term on the latent
codes (latentspace.metric_learning: supervised contrastive or batch-hard triplet), with a
held-out validation split (stratified by label when there are labels), early stopping, the
best weights kept (in memory and, with `checkpoint=path`, on disk), a tqdm progress bar, bf16
autocast on the GPU, and Ctrl-C handled: see train()'s docstring.

This file is the loop over epochs and what it decides (the best epoch, early stopping, how a
run ends); the pieces it runs live beside it:
    _training_history.py     History, what train() returns
    _training_data.py        X checked once, served in batches on the device
    _training_labels.py      the metric-learning term and its label checks
    _training_split.py       the validation split
    _training_epoch.py       a batch's objective, a training epoch, the validation pass
    _training_checkpoint.py  the kept weights, in memory and in the checkpoint file
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from typing import Any, Callable

import torch

from ._arrays import check_bool, check_float, check_int, resolve_device
from ._training_checkpoint import KeptWeights, check_not_the_data, checkpoint_path
from ._training_data import TrainingData
from ._training_epoch import BatchObjective, adamw, batches_per_epoch, run_training_epoch, run_validation
from ._training_history import History
from ._training_labels import check_training_labels, metric_term
from ._training_split import held_out_count, split_rows
from .models.base import ReconstructionModel
from .models.pca import PCA

__all__ = ["History", "train"]


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
            ConvAutoencoder also takes flattened rows; not a masked array with masked entries,
            nor a generator). Checked once for NaN / Inf (and for
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
            The model must be one save_model can write (not a subclass), and the path one it
            can write (its folder existing and writable, a name the file system takes, not the
            file X is memory-mapped from): checked before training (ValueError / TypeError
            naming checkpoint or model).
        progress: True or False: show a tqdm bar (epoch, train and validation loss, samples
            per second).
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
    PCA, which is fitted in closed form: PCA.fit(X), and for a float16 model, whose AdamW
    moments would underflow: train in float32, convert after; ValueError naming model for one
    whose parameters are all frozen or hold NaN / Inf); FloatingPointError when the loss
    or, after an epoch, the weights become NaN or Inf (the best weights so far, or during the
    warm-up the last finished epoch's, are restored and checkpointed first; the message says
    which, and says so when the data itself no longer passes X's checks by then, naming the
    row that holds NaN / Inf: a memory map written during training).
    """
    _check_model(model)
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
        checkpoint = checkpoint_path(checkpoint, model)
    progress = check_bool(progress, "progress")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
    device = resolve_device(device)
    loss = model.check_loss(loss)
    data = TrainingData(X, model, loss, device)
    if checkpoint is not None:
        check_not_the_data(checkpoint, data.mapped_file)
    metric = metric_term(labels, data.n, metric_loss, metric_weight, metric_margin, metric_temperature, batch_size)

    # Split and generators, all from the seed.
    shuffler = torch.Generator().manual_seed(seed)  # draws the split, then each epoch's order
    n_val = held_out_count(data.n, val_fraction)
    val_rows, train_rows = split_rows(data.n, n_val, None if metric is None else metric.labels, shuffler)
    if metric is not None and n_val:  # the check above saw every row; the term sees the training rows only
        check_training_labels(metric.labels[train_rows.numpy()], val_fraction)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    val_noise = torch.Generator(device=device)

    model.to(device)
    # The weights train() was given, put back if it diverges before any epoch is kept (a NaN
    # model left the caller with nothing usable: every encode refused it). One copy of the
    # weights, as KeptWeights holds.
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = adamw(model, lr, weight_decay)
    use_autocast = (device.type == "cuda") if autocast is None else autocast
    objective = BatchObjective(model, data, loss, metric, device, use_autocast)
    n_batches = batches_per_epoch(len(train_rows), batch_size)
    warmup = float(model.warmup_epochs)

    def final(epoch: int) -> bool:
        """Whether epoch's monitored loss is of the final objective, the KL warm-up over: the
        validation loss is computed after the epoch, the training loss averages its batches,
        each with the weight of its moment (its first batch's progress is the earliest)."""
        return (epoch + 1 if n_val else epoch + 1 / n_batches) >= warmup

    history = History(monitor="val_loss" if n_val else "train_loss", device=str(device), seed=seed,
                      checkpoint=None, metric_loss=None if metric is None else metric.name,
                      metric_weight=0.0 if metric is None else metric.weight)
    kept = KeptWeights(checkpoint)
    bad_epochs = 0
    train_seconds = 0.0
    diverged: str | None = None
    started = time.perf_counter()

    from tqdm import tqdm

    bar = tqdm(total=epochs * n_batches, unit="batch", desc=type(model).__name__, disable=not progress,
               file=sys.stderr, dynamic_ncols=True, leave=True)
    try:
        for epoch in range(epochs):
            model.train()
            epoch_start = time.perf_counter()
            train_loss, train_metric = run_training_epoch(objective, optimizer, train_rows, batch_size, epoch,
                                                          shuffler, noise, on_batch=lambda: bar.update(1))
            seconds = time.perf_counter() - epoch_start
            if not math.isfinite(train_loss):
                diverged = f"the training loss became {train_loss} in epoch {epoch}"
                break
            # The epoch's loss averages its batches before their steps: a step with NaN or Inf
            # gradients on the last batch leaves NaN weights under a finite loss, which would
            # be kept as the best when the training loss picks it (no validation).
            if not _weights_finite(model):
                diverged = f"the weights became NaN or Inf in epoch {epoch} (a step with NaN or Inf gradients)"
                break
            model.eval()
            val_loss, val_metric = run_validation(objective, val_rows, batch_size, val_noise,
                                                  seed + 2) if n_val else (None, None)
            _record_epoch(history, epoch, train_loss, val_loss, train_metric, val_metric)
            train_seconds += seconds  # only the epochs that count in epochs_run (samples_per_second)

            monitored = val_loss if n_val else train_loss
            if monitored is not None and not math.isfinite(monitored):
                diverged = f"the validation loss became {monitored} in epoch {epoch}"
                break
            if final(epoch):  # the objective is final from here on
                if history.best_loss is None or monitored < history.best_loss:
                    kept.keep_best(model, epoch, monitored)
                    history.best_epoch, history.best_loss = epoch, monitored
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            else:  # a run that ends (or is stopped) in the warm-up keeps its last finished epoch
                kept.keep(model, epoch, monitored)
            speed = len(train_rows) / seconds if seconds > 0 else float("inf")
            bar.set_postfix_str(_progress_text(epoch, epochs, train_loss, val_loss, history.metric_loss,
                                               train_metric, speed), refresh=False)
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
            _restore(model, kept, history)
        except BaseException as failure:
            _add_note(error, f"latentspace.train: restoring the kept weights after this error failed "
                             f"too: {type(failure).__name__}: {failure}")
        raise
    finally:
        bar.close()

    _restore(model, kept, history)
    if diverged is not None and kept.epoch is None:
        model.load_state_dict(initial)
    history.seconds = time.perf_counter() - started
    trained = history.epochs_run * len(train_rows)
    history.samples_per_second = trained / train_seconds if train_seconds > 0 else 0.0
    if diverged is not None:
        changed = data.recheck()  # data changed under the run (a memory map written) says so
        if changed is not None:
            raise FloatingPointError(f"{changed} now, not when training started (the data changed during training: a "
                                     f"memory map written meanwhile?), and {diverged}; {_restored(kept, final)}")
        raise FloatingPointError(f"training diverged: {diverged}; {_restored(kept, final)}. "
                                 f"Lower lr (was {lr:g}) or check the data's scale")
    return history


def _check_model(model: Any) -> None:
    if isinstance(model, PCA):
        raise TypeError("model: PCA is fitted in closed form, not trained: call model.fit(X)")
    if not isinstance(model, ReconstructionModel):
        raise TypeError(f"model: expected an Autoencoder, VAE or ConvAutoencoder, got {type(model).__name__}")
    if any(parameter.dtype == torch.float16 for parameter in model.parameters()):
        # AdamW keeps its moments in the parameters' dtype: float16 squared gradients underflow
        # to 0 and the steps blow up (plain torch too), which read as a too-high lr before.
        raise TypeError("model: its parameters are float16, which AdamW cannot train (its second moments "
                        "underflow in float16 and the steps blow up); train it in float32 (autocast=True "
                        "computes the forward in bfloat16) and convert with .half() afterwards")
    spoiled = next((name for name, p in model.named_parameters()
                    if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if spoiled is not None:  # (it would train into "training diverged ... Lower lr")
        raise ValueError(f"model: its weights hold NaN or Inf ({spoiled}) before training; build a fresh model "
                         "or load finite weights")
    if not any(parameter.requires_grad for parameter in model.parameters()):
        # (torch's own error, at the first batch's backward, named nothing)
        raise ValueError("model: none of its parameters requires grad (all frozen), so there is nothing to "
                         "train; unfreeze some with parameter.requires_grad_(True)")


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (what an optimizer step with NaN gradients spoils;
    buffers are left out: a subclass may hold an -inf mask on purpose); one device sync."""
    flags = [torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _record_epoch(history: History, epoch: int, train_loss: float, val_loss: float | None,
                  train_metric: float | None, val_metric: float | None) -> None:
    """A finished epoch's losses into the History."""
    history.train_loss.append(train_loss)
    if val_loss is not None:
        history.val_loss.append(val_loss)
    if train_metric is not None:
        history.train_metric.append(train_metric)
    if val_metric is not None:
        history.val_metric.append(val_metric)
    history.epochs_run = epoch + 1


def _progress_text(epoch: int, epochs: int, train_loss: float, val_loss: float | None, metric_loss: str | None,
                   train_metric: float | None, speed: float) -> str:
    """The progress bar's postfix after an epoch."""
    val_text = f" val {val_loss:.5g}" if val_loss is not None else ""
    if train_metric is not None:
        val_text += f" {metric_loss} {train_metric:.4g}"
    return f"epoch {epoch + 1}/{epochs} train {train_loss:.5g}{val_text} {speed:,.0f} samples/s"


def _restore(model: ReconstructionModel, kept: KeptWeights, history: History) -> None:
    """The kept weights back into the model (and the checkpoint file), the History told which
    epoch they are; the model in eval mode whatever happens."""
    try:
        if kept.restore(model):
            history.best_epoch, history.best_loss = kept.epoch, kept.loss
            if kept.path is not None:
                history.checkpoint = str(kept.path)
    finally:
        model.eval()


def _add_note(error: BaseException, note: str) -> None:
    """error.add_note where Python has it (3.11+)."""
    if hasattr(error, "add_note"):
        error.add_note(note)


def _restored(kept: KeptWeights, final: Callable[[int], bool]) -> str:
    """What the model holds after a divergence, for the error message."""
    if kept.epoch is None:
        return "no epoch finished cleanly, so the weights the model had before training were put back"
    where = " and checkpointed" if kept.path is not None else ""
    if not final(kept.epoch):  # no epoch could be best yet
        return (f"the weights of epoch {kept.epoch}, the last finished one (the KL warm-up was not over), "
                f"were restored{where}")
    return f"the weights of epoch {kept.epoch}, the best, were restored{where}"

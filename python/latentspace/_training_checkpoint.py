"""The weights a training run ends with: kept in memory as the epochs go and, given a
checkpoint path, written to that file with save_model (atomically) each time they change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._atomic import unwritable
from .models.base import ReconstructionModel
from .models.io import MODEL_CLASSES, savable, save_model

__all__ = ["checkpoint_path", "check_not_the_data", "KeptWeights"]


def checkpoint_path(checkpoint: Any, model: ReconstructionModel) -> Path:
    """`checkpoint` as a Path, checked before any training: a bad path or a model that
    save_model cannot write would otherwise only fail at the first best epoch."""
    path = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    if not isinstance(path, str):  # bytes paths too: Path() takes only str
        raise TypeError(f"checkpoint: expected a file path (str or os.PathLike), got "
                        f"{type(checkpoint).__name__} {checkpoint!r}")
    path = Path(path)
    # save_model's own checks (a name too long for the file system, a folder there, a missing
    # or read-only folder), made now: the OS's words at the first best epoch named no argument.
    problem = unwritable(path)
    if problem is not None:
        raise ValueError(f"checkpoint: {problem[1]}")
    if not savable(model):  # save_model's own test
        raise TypeError(f"model: checkpoint= saves with latentspace.save_model, which takes only "
                        f"{', '.join(MODEL_CLASSES)}, got {type(model).__name__}; train without checkpoint= "
                        "(and save model.state_dict() yourself)")
    return path


def check_not_the_data(path: Path, mapped_file: str | None) -> None:
    """Refuses a checkpoint path that is the file the training data is memory-mapped from:
    the first best epoch would replace the user's data with the model."""
    if mapped_file is None or not path.exists():
        return
    try:
        same = os.path.samefile(path, mapped_file)
    except OSError:  # the map's file gone or unreadable: not the checkpoint's file then
        return
    if same:
        raise ValueError(f"checkpoint: {path} is the file X is memory-mapped from; saving the model there "
                         "would replace the data: pass another path")


class KeptWeights:
    """The weights train() ends with: the best epoch's or, while the KL warm-up lasts (no epoch
    can be best yet), the last finished epoch's. Copied into buffers allocated once, so that
    keeping every warm-up epoch costs a copy, not an allocation. With a checkpoint path, every
    best epoch is also written there, and restore() writes what the file does not hold yet."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch: int | None = None
        self.loss: float | None = None
        self._copying: tuple[int, float] | None = None
        self._written_epoch: int | None = None  # the epoch whose weights the file holds

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

    def keep_best(self, model: ReconstructionModel, epoch: int, loss: float) -> None:
        """keep(), then the checkpoint written (marked written only once save_model returns:
        a write cut short is redone by restore())."""
        self.keep(model, epoch, loss)
        if self.path is not None:
            save_model(model, self.path)
            self._written_epoch = epoch

    def settle(self, model: torch.nn.Module) -> None:
        """Completes a copy that an exception cut short."""
        if self._copying is not None:
            self.keep(model, *self._copying)

    def restore(self, model: ReconstructionModel) -> bool:
        """The kept weights back into the model and, if that has not happened yet, onto disk;
        False when there are none (stopped before the first epoch ended)."""
        self.settle(model)
        if self.state is None:
            return False
        model.load_state_dict(self.state)
        if self.path is not None and self._written_epoch != self.epoch:
            save_model(model, self.path)
            self._written_epoch = self.epoch
        return True

"""Model files: the weights in safetensors, the config as JSON in the same file's metadata.

A model file is a plain safetensors file (readable by any safetensors reader) whose
`__metadata__` holds three strings:

    "latentspace"         JSON {"format": "latentspace-model", "format_version": 1,
                          "class": "VAE", "config": {constructor arguments}, "writer": version}
    "latentspace_crc32"   CRC-32 of that JSON string (8 hex digits)
    "tensors_crc32"       CRC-32 of the tensors: name, dtype, shape and bytes, in name order

One file, so the config and the weights can never disagree; written atomically (temporary
file, fsync, rename: see _atomic.py). Loading never unpickles anything: the header is parsed
as JSON and the tensors by safetensors; the model is rebuilt from its registered class and
config and the weights loaded strictly (every tensor present, none extra, shapes equal).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .._arrays import check_int, resolve_device
from .._atomic import atomic_write
from .._paths import as_path, stat_regular_file
from .autoencoder import Autoencoder
from .base import LatentModel
from .conv import ConvAutoencoder
from .pca import PCA
from .vae import VAE

__all__ = ["ModelFileError", "load_model", "save_model"]

FORMAT = "latentspace-model"
FORMAT_VERSION = 1
MODEL_CLASSES: dict[str, type[LatentModel]] = {
    cls.__name__: cls for cls in (PCA, Autoencoder, VAE, ConvAutoencoder)
}
_CONFIG_KEY, _CONFIG_CRC_KEY, _TENSORS_CRC_KEY = "latentspace", "latentspace_crc32", "tensors_crc32"
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class ModelFileError(ValueError):
    """The file is not a latentspace model, or it is truncated, corrupted or too new."""


def _tensors_crc32(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        crc = zlib.crc32(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def savable(model: Any) -> bool:
    """Whether save_model can write `model`: one of MODEL_CLASSES exactly (a file rebuilds its
    model by class name, so a subclass would come back as its base class)."""
    return MODEL_CLASSES.get(type(model).__name__) is type(model)


def save_model(model: LatentModel, path: str | os.PathLike) -> None:
    """Writes `model` (PCA, Autoencoder, VAE, ConvAutoencoder) to `path` atomically.

    The weights go in safetensors format, the class and constructor arguments in the same
    file's metadata. A crash mid-save leaves the previous file intact. Raises TypeError for
    a model latentspace cannot rebuild, ValueError for an unfitted PCA.
    """
    import safetensors.torch

    if not savable(model):
        raise TypeError(f"model: expected one of {', '.join(MODEL_CLASSES)}, got {type(model).__name__}")
    if getattr(model, "_fitted", True) is False:  # an unfitted PCA: no weights to save
        raise ValueError("model: PCA is not fitted: call fit(X) first")
    path = as_path(path)  # (bytes taken; None, '' and NUL refused by name)
    config = model.config()
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()}
    from .. import _native

    header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "class": type(model).__name__,
                         "config": config, "writer": _native.__version__}, sort_keys=True)
    metadata = {_CONFIG_KEY: header, _CONFIG_CRC_KEY: f"{zlib.crc32(header.encode()):08x}",
                _TENSORS_CRC_KEY: f"{_tensors_crc32(tensors):08x}"}
    blob = safetensors.torch.save(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(blob)


def _read_header(path: Path, f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """(the safetensors JSON header, its length in bytes), read from the start of the open
    file `f` of `size` bytes, and nothing more of it; ModelFileError when the file is not one."""
    start = f.read(8)
    if len(start) < 8:
        raise ModelFileError(f"{path}: not a latentspace model file (only {len(start)} bytes)")
    length = int.from_bytes(start, "little")
    if length > _MAX_HEADER_BYTES or f.read(1) != b"{":
        raise ModelFileError(f"{path}: not a latentspace model file (not in safetensors format)")
    if 8 + length > size:
        raise ModelFileError(f"{path}: truncated model file ({size} bytes)")
    f.seek(8)
    try:
        header = json.loads(f.read(length))
    except (ValueError, RecursionError):  # RecursionError: a crafted, deeply nested header
        raise ModelFileError(f"{path}: corrupted model file (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupted model file (unreadable safetensors header)")
    return header, length


def _check_size(path: Path, header: dict[str, Any], length: int, size: int) -> None:
    """The file ends where the header says its last tensor does (ModelFileError otherwise),
    checked before the weights are read: a file cut short, or with a large tail, is refused
    without reading it. Offsets that are not a pair of integers are left to safetensors'
    own checks."""
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(offset) is int and offset >= 0 for offset in offsets)):
            return
        ends.append(offsets[1])
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise ModelFileError(f"{path}: truncated model file ({size} bytes, its header describes {expected})")
    if size > expected:
        raise ModelFileError(f"{path}: corrupted model file ({size - expected} bytes after its weights)")


def _read_weights(path: Path, f: BinaryIO) -> dict[str, torch.Tensor]:
    """The tensors of the open model file `f` (its header checked), by safetensors."""
    import safetensors
    import safetensors.torch

    f.seek(0)
    try:
        return safetensors.torch.load(f.read())
    except safetensors.SafetensorError as error:
        raise ModelFileError(f"{path}: corrupted or truncated model file ({error})") from None


def _read_info(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The checked latentspace config from the header's metadata."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or _CONFIG_KEY not in metadata:
        raise ModelFileError(
            f"{path}: a safetensors file without a latentspace model config (saved by another "
            "program?); latentspace.load_model reads files written by latentspace.save_model"
        )
    text = metadata[_CONFIG_KEY]
    if not isinstance(text, str) or metadata.get(_CONFIG_CRC_KEY) != f"{zlib.crc32(text.encode()):08x}":
        raise ModelFileError(f"{path}: corrupted model file (config checksum mismatch)")
    try:
        info = json.loads(text)
        # check_int, not int(): 1.5 would pass as 1 and 1e400 raise OverflowError
        version, name, config = check_int(info["format_version"], "format_version"), info["class"], info["config"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ModelFileError(f"{path}: corrupted model file (unreadable config)") from None
    if info.get("format") != FORMAT or not isinstance(config, dict):
        raise ModelFileError(f"{path}: not a latentspace model file (format {info.get('format')!r})")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format v{version} was written by a newer latentspace (this one reads "
            f"up to v{FORMAT_VERSION}); upgrade latentspace"
        )
    if not isinstance(name, str) or name not in MODEL_CLASSES:  # a list is unhashable
        raise ModelFileError(f"{path}: unknown model type {name!r} (known: {', '.join(MODEL_CLASSES)})")
    return info


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LatentModel:
    """Loads a model written by save_model, on `device` (default the CPU), in eval mode.

    Never unpickles. Raises ModelFileError (a ValueError) for a file that is not a
    latentspace model (a foreign safetensors file, a pickle, random bytes), or that is
    truncated, corrupted (also bytes after its weights), of an unknown model type or written
    by a newer version: the header, and the file's size against the one it describes, are
    checked before the weights are read (a large file that is not a model is not read whole);
    FileNotFoundError when there is none, IsADirectoryError for a folder; ModelFileError
    for a FIFO or device too (reading one with no writer would block forever). `device` is
    checked first, as train() and encode() check theirs: ValueError for one that is not
    'cpu', 'cuda' or 'cuda:N', or CUDA when torch sees no GPU.
    """
    device = resolve_device(device, allow_auto=False)  # before reading: a bad device fails fast
    path = as_path(path)  # (bytes taken; None, '' and NUL refused by name)
    stat_regular_file(path, "a model file", ModelFileError)  # before opening: a FIFO would block
    # The header first, and the weights only once it is a latentspace model's of this size: a
    # large data file passed by mistake was read whole (its size in memory) only to be refused.
    # One open file throughout: a save_model replacing the file meanwhile is not seen.
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, length = _read_header(path, f, size)
        info = _read_info(path, header)
        _check_size(path, header, length, size)
        tensors = _read_weights(path, f)
    if f"{_tensors_crc32(tensors):08x}" != header["__metadata__"].get(_TENSORS_CRC_KEY):
        raise ModelFileError(f"{path}: corrupted model file (weights checksum mismatch)")
    cls = MODEL_CLASSES[info["class"]]
    try:
        # Built without memory first: the config's sizes are checked against the file's own
        # tensors before anything is allocated (a crafted 1 KB config could otherwise ask for
        # any amount, or for more than torch can count: a RuntimeError).
        with torch.device("meta"):
            model = cls.from_config(info["config"])
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise ModelFileError(f"{path}: corrupted model file (bad {cls.__name__} config: {error})") from None
    _check_shapes(path, model, tensors)
    # The saved weights' dtype (a model converted with .double() stays float64): from_config
    # builds float32, and load_state_dict would cast into it.
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to_empty(device=device)  # memory at last; every tensor is overwritten below
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: corrupted model file (weights do not match the config: {error})") from None
    return model.eval()


def _check_shapes(path: Path, model: LatentModel, tensors: dict[str, torch.Tensor]) -> None:
    """The file's tensors are exactly the model's, by name and shape (ModelFileError)."""
    wanted = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in tensors.items()}
    if wanted == found:
        return
    missing, extra = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if missing or extra:
        detail = f"missing {missing}" if missing else f"unexpected {extra}"
    else:
        name = next(name for name in sorted(wanted) if wanted[name] != found[name])
        detail = f"{name} has shape {found[name]} in the file, {wanted[name]} for the config"
    raise ModelFileError(f"{path}: corrupted model file (weights do not match the config: {detail})")

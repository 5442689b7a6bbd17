"""Checks shared by the learned models (Autoencoder, VAE, ConvAutoencoder): their sizes, and
the arguments of objective(), the training API, which converts nothing and so refuses what
torch would fail on, or silently take, with an error naming the argument."""

from __future__ import annotations

from typing import Any

import torch

from .._arrays import check_dense, check_float, check_sample_shape
from .._memory_limit import memory_limit

# The most parameters a model may hold: 2**40 is 4 TiB of float32 weights, beyond any one
# machine. Sizes past it would reach torch's allocator ("can't allocate memory") or overflow
# int64 inside torch ("empty(): argument 'size' failed to unpack"), naming no argument.
MAX_PARAMETERS = 2**40


def mlp_parameters(widths: tuple[int, ...]) -> int:
    """Weights and biases of mlp(widths), in Python integers (no overflow)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def check_parameter_count(count: int, sizes: dict[str, Any]) -> None:
    """Refuses a model of more than MAX_PARAMETERS weights (ValueError), or whose weights the
    memory this process may use cannot hold (_memory_limit) (MemoryError), naming the largest of `sizes` (argument
    name -> an int or a tuple of ints)."""
    name = max(sizes, key=lambda key: max((sizes[key],) if isinstance(sizes[key], int) else (*sizes[key], 0)))
    shown = ", ".join(f"{key}={value!r}" for key, value in sizes.items())
    if count > MAX_PARAMETERS:
        approx = f"{count:.3g}" if count < 10**300 else f"about 2**{count.bit_length() - 1}"
        raise ValueError(f"{name}: {shown} would need {approx} parameters, more than 2**40 (MAX_PARAMETERS, "
                         "4 TiB of float32 weights); use smaller sizes")
    _check_fits_in_memory(count, name, shown)


def _check_fits_in_memory(count: int, name: str, shown: str) -> None:
    """Weights built in CPU memory (the default device; not under a meta device, as
    load_model builds) beyond the memory this process may use: torch allocates them lazily and the
    kernel killed Python as they were initialised, with no exception at all."""
    memory = memory_limit()
    dtype = torch.get_default_dtype()
    nbytes = count * dtype.itemsize
    if memory is None or nbytes <= memory.nbytes or torch.empty(0).device.type != "cpu":
        return
    raise MemoryError(f"{name}: {shown} would need {nbytes / 2**30:,.1f} GiB of "
                      f"{str(dtype).removeprefix('torch.')} weights, more than {memory}; use smaller sizes")


def check_objective_arguments(model: Any, x: Any, progress: Any, generator: Any) -> None:
    """objective()'s checks: it runs on the training loop's batches as they are, so it
    converts nothing (unlike encode) and refuses what torch would fail on, or silently take,
    with an error naming the argument."""
    device, dtype = model._device_dtype()
    _check_batch_tensor(x, device, dtype, model._sample_shapes())
    if progress is not None:
        check_float(progress, "progress")  # refuses "1", True, NaN and negative epochs
    check_generator(generator, device)


def _check_batch_tensor(x: Any, device: torch.device, dtype: torch.dtype,
                        sample_shapes: tuple[tuple[int, ...], ...]) -> None:
    if not isinstance(x, torch.Tensor):
        hint = "; pass torch.from_numpy(x)" if type(x).__module__ == "numpy" else ""
        raise TypeError(f"x: objective() is a training API and expects a torch tensor, got "
                        f"{type(x).__name__}{hint} (encode() takes numpy)")
    check_dense(x, "x")
    if not _same_device(x.device, device):
        raise ValueError(f"x: expected a tensor on the model's device '{device}', got one on '{x.device}'; "
                         f"pass x.to('{device}')")
    if x.dtype != dtype:
        raise TypeError(f"x: expected a {str(dtype).removeprefix('torch.')} tensor (the model's dtype), got "
                        f"{str(x.dtype).removeprefix('torch.')}; pass x.to({dtype})")
    check_sample_shape(tuple(x.shape), "x", sample_shapes)
    if x.shape[0] < 1:
        raise ValueError(f"x: expected at least one row, got shape {tuple(x.shape)}")


def check_generator(generator: Any, device: torch.device) -> None:
    """None or a torch.Generator on `device` (torch.randn's errors for others name nothing)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__} "
                        f"{generator!r}")
    if not _same_device(generator.device, device):
        raise ValueError(f"generator: expected one on the model's device '{device}', got one on "
                         f"'{generator.device}'; make it with torch.Generator(device='{device}')")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """'cuda' and 'cuda:0' are the same device when 0 is the current one."""
    def index(d: torch.device) -> int | None:
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index
    return a.type == b.type and index(a) == index(b)

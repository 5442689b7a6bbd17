"""encode's `out` when it is a tensor on a GPU: checked up front, written in place.

The host-side `out` (a numpy array, a memory map or a CPU tensor) is checked by
_arrays.check_encode_out, which hands back a numpy view; a GPU tensor has none, so the
encoder writes the tensor itself: the CUDA encoder straight into it when it is on the work's
device, otherwise a copy of each chunk's codes (torch's copy_, on the current stream).
"""

from __future__ import annotations

from typing import Any

from ._arrays import check_out_tensor, is_torch_tensor

__all__ = ["check_device_out", "check_apart_on_device", "device_byte_span", "is_device_tensor"]


def is_device_tensor(x: Any) -> bool:
    """A torch tensor whose memory is not the host's (CUDA, or a device with no memory: meta)."""
    return is_torch_tensor(x) and x.device.type != "cpu"


def check_device_out(out: Any, rows: int | None, dim: int | None) -> Any:
    """`out` itself, after the checks check_encode_out makes of a CPU tensor: float32,
    C-contiguous, 2-d, shaped (rows, dim), no autograd, holding its own values. Only CUDA
    tensors: a 'meta' tensor has no memory to write, and other devices are not supported by
    the encoder."""
    want = f"({'n' if rows is None else rows}, {'latent_dim' if dim is None else dim})"
    if out.device.type != "cuda":
        raise ValueError(f"out: expected a numpy array, a CPU tensor or a CUDA tensor, got a tensor on '{out.device}'")
    check_out_tensor(out, want)
    if (rows is not None and out.shape[0] != rows) or (dim is not None and out.shape[1] != dim):
        raise ValueError(f"out: expected shape {want}, got {tuple(out.shape)}")
    if out.data_ptr() % 4:  # (a view at an odd byte offset of a byte tensor's storage)
        raise ValueError("out: expected an aligned tensor (its address a multiple of 4 bytes); "
                         "pass a freshly allocated one")
    return out


def device_byte_span(x: Any) -> tuple[str, int, int] | None:
    """(device, first, last) addresses a torch tensor's elements lie within, last exclusive;
    None for a tensor with no elements or anything else. Addresses on different devices are
    unrelated, hence the device with them."""
    if not is_torch_tensor(x) or x.numel() == 0:
        return None
    itemsize = x.element_size()
    reach = [(size - 1) * stride * itemsize for size, stride in zip(x.shape, x.stride())]
    start = x.data_ptr()
    return (str(x.device), start + sum(r for r in reach if r < 0), start + sum(r for r in reach if r > 0) + itemsize)


def check_apart_on_device(x: Any, name: str, out: Any) -> None:
    """Refuses a GPU `out` whose memory overlaps a GPU input's (as given or a view of the same
    allocation): its codes would overwrite rows not yet read. By the bounds each occupies, as
    check_apart does for host memory."""
    if not (is_device_tensor(x) and is_device_tensor(out)):
        return
    a, b = device_byte_span(x), device_byte_span(out)
    if a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]:
        raise ValueError(f"out: shares memory with {name}; pass a separate tensor")

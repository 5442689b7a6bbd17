"""encode's `out` as a GPU tensor: the host-side checks (_encode_device_out.py), which run
without a GPU. Writing into a CUDA `out` is tested in tests/gpu/test_encode_cuda_native.py
(the CUDA encoder) and tests/gpu/test_encode_cuda.py (torch on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import latentspace
from latentspace._encode_device_out import check_apart_on_device, device_byte_span, is_device_tensor
from latentspace._encode_stream import checked_out


def _numpy_bounds(a: np.ndarray) -> tuple[int, int]:
    byte_bounds = getattr(np.lib, "array_utils", np).byte_bounds  # (numpy < 2: np.byte_bounds)
    return tuple(byte_bounds(a))


@pytest.mark.parametrize("view", [
    lambda t: t,
    lambda t: t[3:17],
    lambda t: t[:, 2:5],
    lambda t: t.T,
    lambda t: t[::3, ::2],
    lambda t: t[5],
    lambda t: t[4:5, 1:2],
    lambda t: t.flatten()[7:40:4],
])
def test_the_byte_span_of_a_tensor_is_numpys_byte_bounds(view):
    """device_byte_span is arithmetic on the tensor's address, shape and strides, the same on
    any device: checked on CPU tensors against numpy's byte bounds of the same memory."""
    base = torch.arange(20 * 8, dtype=torch.float32).reshape(20, 8)
    t = view(base)
    device, first, last = device_byte_span(t)
    assert device == "cpu"
    assert (first, last) == _numpy_bounds(t.numpy())


def test_a_tensor_without_elements_has_no_span():
    assert device_byte_span(torch.empty((0, 4))) is None
    assert device_byte_span(np.zeros((3, 4), np.float32)) is None  # not a tensor


def test_host_tensors_are_not_device_tensors():
    assert not is_device_tensor(torch.zeros(3))
    assert not is_device_tensor(np.zeros(3))
    assert is_device_tensor(torch.zeros(3, device="meta"))


def test_a_meta_out_is_refused_naming_the_devices_taken():
    """A 'meta' tensor has no memory to write into: refused before anything runs."""
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"^out: expected a numpy array, a CPU tensor or a CUDA tensor, "
                                         r"got a tensor on 'meta'"):
        latentspace.encode(model, np.zeros((5, 4), np.float32), out=torch.empty((5, 3), device="meta"))


def test_checked_out_gives_a_numpy_view_of_host_outs():
    out = torch.zeros((6, 2))
    view = checked_out(out, 6, 2)
    assert isinstance(view, np.ndarray) and view.ctypes.data == out.data_ptr()
    array = np.zeros((6, 2), np.float32)
    assert checked_out(array, None, None) is array


class _FakeDeviceTensor:
    """Stands for a GPU tensor in the overlap check, which reads only these attributes."""

    def __init__(self, t: torch.Tensor, device: str):
        self._t, self.device = t, torch.device(device)

    def numel(self):
        return self._t.numel()

    def element_size(self):
        return self._t.element_size()

    @property
    def shape(self):
        return self._t.shape

    def stride(self):
        return self._t.stride()

    def data_ptr(self):
        return self._t.data_ptr()


@pytest.fixture
def fake_device_tensors(monkeypatch):
    """The overlap check's view of torch tensors, with _FakeDeviceTensor counted as one."""
    from latentspace import _encode_device_out

    monkeypatch.setattr(_encode_device_out, "is_torch_tensor",
                        lambda x: isinstance(x, (torch.Tensor, _FakeDeviceTensor)))
    return lambda t, device="cuda:0": _FakeDeviceTensor(t, device)


def test_overlapping_device_memory_is_refused(fake_device_tensors):
    on_gpu = fake_device_tensors
    y = torch.zeros((300, 4))
    for x, out in [(y[:-1], y[1:]), (y[1:], y[:-1]), (y, y), (y[:10], y[5:15]), (y[:, :2], y[:, 2:])]:
        # ([:, :2] and [:, 2:] interleave without touching: refused by bounds, as numpy's
        # may_share_memory does, never a wrong answer)
        with pytest.raises(ValueError, match=r"^out: shares memory with X; pass a separate tensor"):
            check_apart_on_device(on_gpu(x), "X", on_gpu(out))
    check_apart_on_device(on_gpu(y[:100]), "X", on_gpu(y[100:200]))  # disjoint rows: fine
    check_apart_on_device(on_gpu(y[:0]), "X", on_gpu(y))  # no elements: nothing to overlap
    # The same addresses on two devices are different memory.
    check_apart_on_device(on_gpu(y, "cuda:0"), "X", on_gpu(y, "cuda:1"))
    # A host tensor against a device one: host memory is check_apart's (by host addresses).
    check_apart_on_device(y, "X", on_gpu(y))

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


# ---------------------------------------------------------------------------------------
# Through encode, on the CPU: a CPU tensor that says it is on 'cuda:0' stands for a CUDA out.
# The checks read only .device, dtype, layout and address; the CPU encoders write it by copy_,
# as they write a real one. (The CUDA encoder's direct write needs a GPU.)


class _SaysCuda(torch.Tensor):
    """A CPU tensor whose .device is 'cuda:0' (views of it too, through torch's subclassing)."""

    @property
    def device(self):
        return torch.device("cuda:0")


def _says_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(_SaysCuda)


def test_the_stand_in_passes_for_a_cuda_tensor():
    out = _says_cuda(torch.zeros((5, 3)))
    assert is_device_tensor(out) and is_device_tensor(out[1:3]) and out[1:3].device.type == "cuda"
    assert checked_out(out, 5, 3) is out  # a CUDA out is written as it is, not through numpy


# The refusals tests/gpu/test_encode_cuda_native.py expects of a CUDA out, with its patterns
# (an iterable X's row count is not known up front: "n").
BAD_DEVICE_OUTS = {
    "float64": (lambda: torch.zeros((5, 3), dtype=torch.float64), TypeError,
                "out: expected float32, got torch.float64"),
    "shape": (lambda: torch.zeros((5, 4)), ValueError, r"out: expected shape \((5|n), 3\), got \(5, 4\)"),
    "transposed": (lambda: torch.zeros((3, 5)).T, ValueError, "non-contiguous"),
    "grad": (lambda: torch.zeros((5, 3), requires_grad=True), ValueError, "does not require grad"),
    "negated": (lambda: torch.zeros((5, 3))._neg_view(), ValueError, "negated view"),
    "1-d": (lambda: torch.zeros(15), ValueError,
            r"out: expected a C-contiguous 2-d tensor of shape \((5|n), 3\), got shape \(15,\)$"),
    # 2 bytes into a buffer: an address no allocation has (bytearray's are 8-byte aligned)
    "misaligned": (lambda: torch.frombuffer(bytearray(64), dtype=torch.float32, offset=2, count=15).reshape(5, 3),
                   ValueError, r"^out: expected an aligned tensor"),
}


@pytest.mark.parametrize("case", list(BAD_DEVICE_OUTS))
@pytest.mark.parametrize("inputs", ["array", "chunks"])
def test_a_bad_cuda_out_is_refused_before_anything_runs(case, inputs):
    make, error, pattern = BAD_DEVICE_OUTS[case]
    out = _says_cuda(make())
    chunks = [np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)]
    X = np.zeros((5, 4), np.float32) if inputs == "array" else iter(chunks)
    with pytest.raises(error, match=pattern):
        latentspace.Encoder(nn.Sequential(nn.Linear(4, 3)), device="cpu").encode(X, out=out)
    if inputs == "chunks":
        assert len(list(X)) == 2  # refused before the first chunk was read


class _NotExportable(nn.Module):
    """A Linear layer behind a forward export_layers cannot read: the torch backend's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x) * 1.0


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_cuda_out_gets_each_chunks_codes_copied(backend, rng):
    """The CPU encoders write a CUDA out by a copy of each chunk's codes: the codes of a new
    result, and (out a slice of a bigger tensor) the rows around it untouched."""
    linear = nn.Linear(12, 7)
    model = nn.Sequential(linear) if backend == "native" else _NotExportable(linear)
    encoder = latentspace.Encoder(model, device="cpu")
    assert encoder.backend == backend
    x = rng.standard_normal((77, 12)).astype(np.float32)
    whole = _says_cuda(torch.full((79, 7), float("nan")))
    out = whole[1:78]
    assert encoder.encode(x, out=out, batch_size=30) is out
    np.testing.assert_array_equal(out.as_subclass(torch.Tensor).numpy(), encoder.encode(x, batch_size=30))
    assert torch.isnan(whole[0]).all() and torch.isnan(whole[78]).all()


def test_an_out_overlapping_a_cuda_x_is_refused_through_encode(rng):
    """The case tests/gpu/test_encode_cuda_native.py runs on a GPU, here by the stand-in."""
    y = _says_cuda(torch.from_numpy(rng.standard_normal((300, 4)).astype(np.float32)))
    encoder = latentspace.Encoder(nn.Sequential(nn.Linear(4, 4)), device="cpu")
    for X, out in [(y[:-1], y[1:]), (y[1:], y[:-1]), (y, y)]:
        with pytest.raises(ValueError, match="^out: shares memory with X; pass a separate tensor"):
            encoder.encode(X, out=out, batch_size=64)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_cuda_out_made_under_inference_mode_is_written(backend, rng):
    """A tensor made under torch.inference_mode() takes no in-place write outside it: the
    copies into a CUDA out are made inside it (they raised torch's RuntimeError, naming
    nothing, after the first chunk)."""
    linear = nn.Linear(12, 7)
    model = nn.Sequential(linear) if backend == "native" else _NotExportable(linear)
    encoder = latentspace.Encoder(model, device="cpu")
    x = rng.standard_normal((50, 12)).astype(np.float32)
    with torch.inference_mode():
        out = _says_cuda(torch.full((50, 7), float("nan")))
    assert encoder.encode(x, out=out, batch_size=20) is out
    np.testing.assert_array_equal(out.as_subclass(torch.Tensor).numpy(), encoder.encode(x, batch_size=20))

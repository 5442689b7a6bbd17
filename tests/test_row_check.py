"""The row check of tensors, on the CPU: the setting that picks the CUDA row check's
implementation (python/latentspace/_cuda_row_check.py), the native entry point's argument
checks (csrc/cuda/norms.cu), and torch's ops in bounded steps (_arrays.unusable_row_flag,
_cuda_row_check.squared_norms_into), which run on CPU tensors as they do on a GPU.

The kernel itself is tested in tests/gpu/test_row_check_cuda.py (marked "cuda")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentspace
from latentspace import _arrays, _cuda_row_check, _cuda_switch, _native

GPU_VISIBLE = latentspace.cuda_available()


def test_the_default_is_the_kernel_since_gpu_run_12_where_the_build_has_it(monkeypatch):
    """Unset, "" and "auto": the kernel ("native") where the build has CUDA kernels that run
    on every visible GPU, torch's ops elsewhere (a CPU-only build)."""
    assert _cuda_row_check.DEFAULT_BACKEND == "native"
    expected = "native" if _cuda_switch.kernels_run_everywhere() else "torch"
    monkeypatch.delenv(_cuda_row_check.BACKEND_VARIABLE, raising=False)
    assert _cuda_row_check.backend() == expected
    for value in ("", "auto"):
        monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, value)
        assert _cuda_row_check.backend() == expected


def test_a_build_without_cuda_kernels_checks_on_torchs_ops(monkeypatch):
    monkeypatch.delenv(_cuda_row_check.BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(_cuda_switch, "kernels_run_everywhere", lambda: False)
    assert _cuda_row_check.backend() == "torch"


@pytest.mark.parametrize("value", ["native", "torch"])
def test_either_backend_can_be_asked_for(monkeypatch, value):
    monkeypatch.setenv("LATENTSPACE_CUDA_ROW_CHECK", value)
    assert _cuda_row_check.backend() == value


@pytest.mark.parametrize("value", ["1", "Native", "cuda", " native"])
def test_other_values_are_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("LATENTSPACE_CUDA_ROW_CHECK", value)
    with pytest.raises(ValueError, match=r"LATENTSPACE_CUDA_ROW_CHECK: expected 'auto', 'native' or 'torch'"):
        _cuda_row_check.backend()


def test_cpu_tensors_never_take_the_kernel(monkeypatch):
    monkeypatch.setenv("LATENTSPACE_CUDA_ROW_CHECK", "native")
    assert not _cuda_row_check.takes(torch.zeros(5, 3))


@pytest.mark.parametrize("tensor", [torch.zeros(5, 3), torch.zeros(5, 3, dtype=torch.float64), torch.zeros(15)],
                         ids=["host", "float64", "1-d"])
def test_the_kernel_entry_refuses_what_the_kernel_cannot_read(tensor):
    # (a host pointer or strided rows handed to the kernel would fault or be read wrong; every
    # caller asks takes() first, and first_unusable_row refuses them itself, naming them)
    with pytest.raises(ValueError, match=r"tensor: expected a contiguous 2-d float32, float16 or bfloat16 CUDA tensor"):
        _cuda_row_check.first_unusable_row(tensor)


@pytest.mark.parametrize("kwargs, message", [
    ({"storage": 3}, r"storage: expected 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 3"),
    ({"storage": -1}, r"storage: expected 0 \(float32\)"),
    ({"dim": 0}, r"dim: expected >= 1, got 0"),
    ({"count": -2}, r"count: expected >= 0, got -2"),
    ({"first_row": -1}, r"first_row: expected >= 0, got -1"),
    ({"first_bad": 0}, r"first_bad: expected a device pointer to one int64, got 0"),
    ({"rows": 0}, r"rows: expected a device pointer, got 0"),
])
def test_the_native_entry_point_refuses_bad_arguments_before_any_cuda_call(kwargs, message):
    # Checked before the device is touched: the same ValueError with or without a GPU.
    arguments = dict(rows=4096, count=3, dim=4, storage=0, weights=0, first_row=0, out=0, first_bad=8192,
                     stream=0)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        _native.sq_norms_cuda(**arguments)


@pytest.mark.skipif(GPU_VISIBLE, reason="a usable GPU is visible here")
def test_without_a_gpu_the_entry_point_raises_instead_of_crashing():
    with pytest.raises(RuntimeError, match=r"CUDA|built without CUDA"):
        _native.sq_norms_cuda(rows=4096, count=3, dim=4, storage=0, weights=0, first_row=0, out=0, first_bad=8192,
                              stream=0)


def _rows_with_bad_ones(rng, n, dim, bad_rows):
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    kinds = [np.nan, np.inf, -np.inf, 3e19]  # 3e19 squared passes FLT_MAX / 8: too large
    for i, row in enumerate(bad_rows):
        rows[row, rng.integers(dim)] = kinds[i % len(kinds)]
    return torch.from_numpy(rows)


@pytest.mark.parametrize("step_rows", [1, 7, 64, 10_000])
def test_torch_steps_find_the_first_bad_row_wherever_the_steps_cut(monkeypatch, rng, step_rows):
    n, dim = 500, 40  # above the host check's size: torch's ops run
    assert n * dim > _arrays._HOST_CHECK_ELEMENTS
    monkeypatch.setattr(_arrays, "NORM_BYTES_PER_STEP", step_rows * dim * 4)
    bad = sorted(rng.choice(np.arange(1, n), size=3, replace=False).tolist())
    rows = _rows_with_bad_ones(rng, n, dim, bad)
    assert int(_arrays.unusable_row_flag(rows).item()) == bad[0]
    assert int(_arrays.unusable_row_flag(rows, first_row=1000).item()) == 1000 + bad[0]
    assert int(_arrays.unusable_row_flag(rows[bad[-1] + 1 :]).item()) == -1


@pytest.mark.parametrize("step_rows", [1, 9, 10_000])
def test_torch_steps_weighted_check(monkeypatch, rng, step_rows):
    n, dim = 300, 60
    monkeypatch.setattr(_arrays, "NORM_BYTES_PER_STEP", step_rows * dim * 4)
    weights = np.ones(dim, dtype=np.float32)
    weights[5] = 1e30
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    rows[:, 5] = 1e-3  # weighted: about 1e24, usable
    heavy = int(rng.integers(100, n))
    rows[heavy, 5] = 1e5  # weighted: about 1e40, too large; plain: usable
    flag = _arrays.unusable_row_flag(torch.from_numpy(rows), weights=weights)
    assert int(flag.item()) == heavy
    assert int(_arrays.unusable_row_flag(torch.from_numpy(rows)).item()) == -1


@pytest.mark.parametrize("step_rows", [1, 13, 10_000])
def test_squared_norms_in_bounded_torch_steps_match_float64(monkeypatch, rng, step_rows):
    n, dim = 257, 33
    monkeypatch.setattr(_cuda_row_check, "NORM_BYTES_PER_STEP", step_rows * dim * 4)
    rows = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    out = torch.full((n,), float("nan"))
    _cuda_row_check.squared_norms_into(rows, out)
    expected = (rows.double() ** 2).sum(dim=1)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5)

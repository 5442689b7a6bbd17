"""The torch backend's checks of each chunk (encoding.Encoder._run_torch): the rows and the
codes are checked for NaN / Inf together, once the model has run, so that on a GPU the host
waits for the device once a chunk, not twice; the bad row is searched for only when one of
them holds NaN / Inf, the rows first, and an error names what it named before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import latentspace
from latentspace import encoding


class _TorchOnly(nn.Identity):
    """The identity, as a type the exporter does not know: its model runs on torch."""


class _WrongShape(nn.Module):
    """A model whose codes have the wrong number of rows."""

    def forward(self, x):
        return x[:-1]


def _rows(rng, n, d):
    return (rng.standard_normal((n, d)) * 1.5).astype(np.float32)


def _torch_encoder():
    torch.manual_seed(0)
    encoder = latentspace.Encoder(nn.Sequential(nn.Linear(16, 4), _TorchOnly()))
    assert encoder.backend == "torch"
    return encoder


def test_finite_chunks_search_for_no_bad_row(monkeypatch, rng):
    searched = []
    for name in ("first_nonfinite_row", "first_false_row"):  # the codes' row search, the rows'
        real = getattr(encoding, name)
        monkeypatch.setattr(encoding, name, lambda t, real=real: (searched.append(t.shape), real(t))[1])
    encoder = _torch_encoder()
    codes = encoder.encode(_rows(rng, 50, 16), batch_size=8)
    assert codes.shape == (50, 4) and np.isfinite(codes).all()
    assert searched == []  # one combined check a chunk, no row search


def test_a_bad_row_is_named_within_x(rng):
    x = _rows(rng, 30, 16)
    x[21, 5] = np.inf
    with pytest.raises(ValueError, match=r"^X: row 21 contains NaN or Inf"):
        _torch_encoder().encode(x, batch_size=8)


def test_a_refused_first_chunk_leaves_the_width_unknown(rng):
    encoder = latentspace.Encoder(nn.Sequential(_TorchOnly()))  # its width is learnt from its codes
    assert encoder.backend == "torch" and encoder.latent_dim is None
    x = _rows(rng, 30, 16)
    x[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"^X: row 5 contains NaN or Inf"):
        encoder.encode(x, batch_size=8)
    assert encoder.latent_dim is None  # the refused chunk taught it nothing
    assert encoder.encode(_rows(rng, 3, 12)).shape == (3, 12)


class _RefusesNaN(nn.Module):
    def forward(self, x):
        if not torch.isfinite(x).all():
            raise RuntimeError("this model refuses NaN")
        return x


@pytest.mark.parametrize("last", [_WrongShape, _RefusesNaN])
def test_a_bad_row_outranks_the_models_own_complaint(rng, last):
    encoder = latentspace.Encoder(nn.Sequential(nn.Linear(16, 4), last()))
    assert encoder.backend == "torch"
    x = _rows(rng, 6, 16)
    x[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"^X: row 2 contains NaN or Inf") as error:
        encoder.encode(x)
    assert error.value.__suppress_context__  # (the model's own error is no part of it)


def test_codes_of_the_wrong_shape_are_refused(rng):
    encoder = latentspace.Encoder(nn.Sequential(nn.Linear(16, 4), _WrongShape()))
    with pytest.raises(ValueError, match=r"model: Sequential returned \(5, 4\) for 6 rows"):
        encoder.encode(_rows(rng, 6, 16))


def test_nan_codes_from_finite_rows_are_refused(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), _TorchOnly(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gave codes containing NaN or Inf for X's row 0, a finite row"):
        latentspace.encode(model, _rows(rng, 10, 16))


def test_codes_that_overflow_float32_from_a_float64_model_are_refused(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 2), _TorchOnly()).double()
    with torch.no_grad():
        model[0].weight.fill_(1e300)
    x = _rows(rng, 5, 16)
    with pytest.raises(ValueError, match=r"gave codes containing NaN or Inf for X's row 0"):
        latentspace.encode(model, x)


def test_the_models_own_errors_on_finite_rows_propagate(rng):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken model")

    with pytest.raises(RuntimeError, match="broken model"):
        latentspace.Encoder(nn.Sequential(nn.Linear(16, 4), Broken())).encode(_rows(rng, 3, 16))


class _ClampsInPlace(nn.Module):
    """Changes its input in place, as ReLU(inplace=True) or clamp_ do."""

    def forward(self, x):
        return x.clamp_(-10, 10)


@pytest.mark.parametrize("model", [lambda: nn.Sequential(_ClampsInPlace(), nn.Linear(16, 4)),
                                   lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(16, 4))])
def test_a_model_that_changes_its_input_in_place_cannot_hide_a_bad_row(rng, model):
    torch.manual_seed(0)
    encoder = latentspace.Encoder(model())
    x = _rows(rng, 7, 16)
    x[3, 2] = -np.inf  # clamped to -10 or made 0 in place: finite codes
    with pytest.raises(ValueError, match=r"^X: row 3 contains NaN or Inf"):
        encoder.encode(torch.from_numpy(x.copy()) if encoder.backend == "torch" else x)

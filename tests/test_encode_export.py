"""The native export of encoders users write (_encode_export, _encode_modules): dropout,
nn.BatchNorm1d folded into the Linear layer beside it, nn.LayerNorm as a native stage,
nn.Flatten, and the reasons naming a module the native encoder cannot run.

Every exported model is checked on the real native encoder (Encoder.backend == "native")
against the model's float64 forward in eval mode, the mode the Encoder always encodes in:
its torch backend runs an eval() copy of the model, so a model in training mode gives the
same codes on both backends (checked too).
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import latentspace
from latentspace.encoding import NotExportable, export_layers
from test_encode import ACTIVATIONS, _apply, _ReLUPlus  # _ReLUPlus: a subclass of nn.ReLU, for a reason's wording

WIDTHS = (97, 3, 1)  # odd widths: SIMD tails, a single column
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@pytest.fixture(autouse=True)
def _one_torch_thread(single_threaded):
    """Tiny models: one thread each for torch and latentspace (see conftest.single_threaded)."""


def _eval64(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's encode (or forward) in float64 and eval mode, on a copy."""
    double = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        tensor = torch.from_numpy(np.asarray(x, dtype=np.float64))
        z = double.encode(tensor) if isinstance(double, latentspace.models.LatentModel) else double(tensor)
    return z.numpy()


def _normalised_with_scale(norm, h: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A LayerNorm (spec RowNorm) of float64 values h whose computed values may be off by
    c * m (c the caller's factor): (its float64 result, the scale m' such that the computed
    result may be off by c * m'). Linearised: y_j = g_j (h_j - mean) / s + b_j moves by
    |g_j| / s (|e_j| + mean|e| + |xhat_j| * 2 max|e|) for errors e (the mean's share, and the
    standard deviation's, which moves by at most mean|xhat| (max|e| + mean|e|)); plus the
    norm's own rounding, relative to its terms |g_j xhat_j| + |b_j|."""
    mean = h.mean(axis=1, keepdims=True)
    s = np.sqrt(((h - mean) ** 2).mean(axis=1, keepdims=True) + norm.eps)
    xhat = (h - mean) / s
    g = np.ones(h.shape[1]) if norm.weight is None else norm.weight.astype(np.float64)
    b = np.zeros(h.shape[1]) if norm.bias is None else norm.bias.astype(np.float64)
    spread = m + m.mean(axis=1, keepdims=True) + 2 * np.abs(xhat) * m.max(axis=1, keepdims=True)
    return xhat * g + b, np.abs(g) * spread / s + np.abs(g * xhat) + np.abs(b)


def _error_scale(spec, x) -> np.ndarray:
    """Per output element, the size of the terms its float32 computation sums, starting from
    |x - input_offset| (a BatchNorm1d's mean is subtracted first, as torch does; folding it
    into the bias would lose to cancellation what this scale then catches). A LayerNorm
    divides the errors before it by its row's standard deviation (_normalised_with_scale), so
    the scale follows the float64 values through the layers too."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)  # a leading nn.Flatten: samples as rows
    h, m = x, np.zeros_like(x)
    if spec.input_norm is not None:
        h, m = _normalised_with_scale(spec.input_norm, x, m)
    offset = 0.0 if spec.input_offset is None else spec.input_offset.astype(np.float64)
    h, m = h - offset, m + np.abs(h - offset)
    for layer in spec.layers:
        w = layer.weight.astype(np.float64)
        h, m = h @ w.T, m @ np.abs(w).T  # activations here are at most ~1.13-Lipschitz
        if layer.bias is not None:
            h, m = h + layer.bias, m + np.abs(layer.bias.astype(np.float64))
        if layer.norm is not None and not layer.norm_after_activation:
            h, m = _normalised_with_scale(layer.norm, h, m)
        h = _apply(layer.activation, h, layer.param)
        if layer.norm is not None and layer.norm_after_activation:
            h, m = _normalised_with_scale(layer.norm, h, m)
    return m


def _assert_native_exact(model: nn.Module, x: np.ndarray, precision: str = "fp32",
                         **encode_args) -> latentspace.Encoder:
    """The model runs on the native encoder, and its codes equal the float64 eval-mode
    forward up to float32 rounding (within 4e-6 of the terms summed, as test_encode's
    _assert_float32_exact). precision "bf16": within 4 L 2^-9 of them (L layers; bf16 keeps
    8 significant bits of each weight and layer input, as test_encode_kernels' bf16 bound).
    Returns the Encoder."""
    encoder = latentspace.Encoder(model, precision=precision)
    assert (encoder.backend, encoder.reason) == ("native", None), encoder.reason
    assert encoder.kernel != "torch"
    codes = encoder.encode(x, **encode_args)
    expected = _eval64(model, x)
    spec = export_layers(model)
    factor = 4e-6 if precision == "fp32" else 4 * len(spec.layers) * 2.0**-9
    bound = factor * _error_scale(spec, x) + 1e-30
    error = np.abs(codes.astype(np.float64) - expected)
    worst = np.unravel_index(np.argmax(error / bound), error.shape)
    assert np.all(error <= bound), (f"element {worst}: got {codes[worst]!r}, float64 {expected[worst]!r}, "
                                    f"allowed error {bound[worst]:.3g}")
    return encoder


def _torch_backend_codes(model: nn.Module, x: np.ndarray, monkeypatch) -> np.ndarray:
    """The codes of the torch backend (the export refused), for the same model."""
    def refuse(model):
        raise NotExportable("the test takes the torch path")

    with monkeypatch.context() as patch:
        patch.setattr(latentspace.encoding, "export_layers", refuse)
        encoder = latentspace.Encoder(model)
        assert encoder.backend == "torch"
        return encoder.encode(x)


def _with_running_stats(norm: nn.BatchNorm1d, generator: torch.Generator, center: float = 0.0) -> nn.BatchNorm1d:
    """Non-trivial running statistics (and affine parameters): a fold that ignores one of
    them, swaps scale and shift or forgets eps gives other codes."""
    n = norm.num_features
    with torch.no_grad():
        norm.running_mean.copy_(center + 3.0 * torch.randn(n, generator=generator))
        norm.running_var.copy_(0.05 + 4.0 * torch.rand(n, generator=generator))
        if norm.affine:
            norm.weight.copy_(2.0 * torch.randn(n, generator=generator))
            norm.bias.copy_(torch.randn(n, generator=generator))
    norm.eps = 0.3  # large enough to matter
    return norm


def _rows(rng, n, d, scale=1.5, center=0.0):
    return (center + rng.standard_normal((n, d)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Dropout: the identity when encoding, in either mode


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda kind: kind.__name__)
def test_dropout_runs_natively_as_the_identity(dropout, mode, rng, monkeypatch):
    torch.manual_seed(0)
    a, b, c = WIDTHS
    model = nn.Sequential(dropout(0.5), nn.Linear(a, b), dropout(0.3), nn.GELU(), nn.Linear(b, c), dropout(0.9))
    model.train(mode == "train")
    x = _rows(rng, 300, a)
    for rows in (1, 7, 300):
        encoder = _assert_native_exact(model, x[:rows])
    assert [layer.activation for layer in export_layers(model).layers] == ["gelu", "identity"]
    assert model.training == (mode == "train")  # the caller's model keeps its mode
    # the same codes as the torch backend, which encodes an eval() copy of the model
    np.testing.assert_allclose(encoder.encode(x), _torch_backend_codes(model, x, monkeypatch), rtol=1e-5, atol=1e-6)
    if mode == "train":  # where dropout is not the identity: the test would see it applied
        with torch.no_grad():
            drawn = model(torch.from_numpy(x)).numpy()
        assert not np.allclose(drawn, encoder.encode(x), rtol=1e-3, atol=1e-3)


def test_a_dropout_probability_torch_refuses_is_not_exported():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model[1].p = 1.5  # set after construction, which checks it; torch refuses it at every call
    with pytest.raises(NotExportable, match=re.escape("model[1] (nn.Dropout) has p=1.5, which torch refuses")):
        export_layers(model)


# ---------------------------------------------------------------------------------------
# nn.BatchNorm1d: folded in float64 into the Linear layer beside it


def _norm_models(generator):
    """name -> a model with BatchNorm1d modules where they fold, widths 97, 3, 1."""
    a, b, c = WIDTHS
    bn = lambda n, **kwargs: _with_running_stats(nn.BatchNorm1d(n, **kwargs), generator)  # noqa: E731
    return {
        "after-linear": nn.Sequential(nn.Linear(a, b), bn(b), nn.ReLU(), nn.Linear(b, c), bn(c)),
        "not-affine": nn.Sequential(nn.Linear(a, b, bias=False), bn(b, affine=False), nn.Tanh(), nn.Linear(b, c)),
        "two-and-dropout": nn.Sequential(nn.Linear(a, b), nn.Dropout(0.2), bn(b), bn(b, momentum=None), nn.SiLU(),
                                         nn.Sequential(nn.Linear(b, c), bn(c)), nn.ELU(0.7)),
        "leading": nn.Sequential(_with_running_stats(nn.BatchNorm1d(a), generator, center=40.0), nn.Linear(a, b),
                                 nn.LeakyReLU(0.1), nn.Linear(b, c)),
        "leading-not-affine": nn.Sequential(
            _with_running_stats(nn.BatchNorm1d(a, affine=False), generator, center=40.0), nn.Dropout(0.1),
            nn.Linear(a, b, bias=False), bn(b), nn.Sigmoid(), nn.Linear(b, c)),
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["after-linear", "not-affine", "two-and-dropout", "leading", "leading-not-affine"])
def test_batch_norm_folds_into_the_linear_layer(name, mode, rng, monkeypatch):
    torch.manual_seed(1)
    model = _norm_models(torch.Generator().manual_seed(2))[name]
    model.train(mode == "train")
    state = {key: value.clone() for key, value in model.state_dict().items()}
    leading = name.startswith("leading")
    x = _rows(rng, 300, WIDTHS[0], center=40.0 if leading else 0.0)  # the leading norm's mean is near 40
    for rows in (1, 7, 300):
        encoder = _assert_native_exact(model, x[:rows], batch_size=128)
    spec = export_layers(model)
    assert len(spec.layers) == 2 and (spec.input_offset is not None) == leading
    if leading:  # the running mean itself, subtracted first
        np.testing.assert_array_equal(spec.input_offset, model[0].running_mean.numpy())
    assert model.training == (mode == "train")
    for key, value in model.state_dict().items():  # no running statistic moved
        assert torch.equal(value, state[key]), key
    # the same codes as the torch backend, which encodes an eval() copy: running statistics
    torch_codes = _torch_backend_codes(model, x, monkeypatch)
    scale = np.abs(_eval64(model, x)).max()
    np.testing.assert_allclose(encoder.encode(x), torch_codes, rtol=1e-4, atol=1e-5 * scale)


def test_batch_norm_in_the_models_encoders(rng):
    """Autoencoder and VAE encoders (the VAE's mean head is cut after the fold)."""
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    ae = latentspace.Autoencoder(97, 3, hidden=(5,), activation="relu")
    ae.encoder.insert(1, _with_running_stats(nn.BatchNorm1d(5), generator))
    ae.encoder.insert(0, _with_running_stats(nn.BatchNorm1d(97), generator, center=-7.0))
    vae = latentspace.VAE(97, 1, hidden=(3,), activation="gelu")
    vae.encoder.append(_with_running_stats(nn.BatchNorm1d(2), generator))  # after the (mu, logvar) layer
    x = _rows(rng, 257, 97, center=-7.0)
    for model in (ae.train(), vae.train()):
        _assert_native_exact(model, x)
    assert export_layers(vae).output_dim == 1 and export_layers(ae).input_offset is not None


@pytest.mark.parametrize("make, reason", [
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3)),
     "model[2] (nn.BatchNorm1d) comes right after ReLU: only one right after a Linear layer"),
    (lambda: nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)),
     "model[1] applies ReLU right after BatchNorm1d"),
    (lambda: nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
     "model[1] (nn.BatchNorm1d) comes right after BatchNorm1d"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)),
     "model[1] (nn.BatchNorm1d) keeps no running statistics (track_running_stats=False)"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(4)),
     "model[1]'s running_mean has shape (4,), but 3 values reach it"),
    (lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Linear(4, 3)),
     "model[0]'s running_mean has shape (3,), but 4 values reach it"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3).double()), "model[1]'s running_mean is float64"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm2d(3)), "model[1] is a nn.BatchNorm2d: the native encoder"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.SyncBatchNorm(3)), "model[1] is a nn.SyncBatchNorm"),
])
def test_batch_norm_where_it_does_not_fold(make, reason):
    with pytest.raises(NotExportable, match=re.escape(reason)):
        export_layers(make().eval())
    if "keeps no running statistics" in reason:  # the Encoder refuses that model outright (below)
        with pytest.raises(ValueError, match=re.escape(f"model: {reason}")):
            latentspace.Encoder(make().eval())
    else:
        assert reason in latentspace.Encoder(make().eval()).reason


@pytest.mark.parametrize("where", ["sequential", "autoencoder"])
def test_batch_norm_without_running_statistics_is_refused(where, rng):
    """In eval mode such a BatchNorm normalises each batch by its own statistics: a row's
    code would depend on the rows encoded beside it and on batch_size (the torch backend
    gave codes 1.1 apart for batch_size 40 and 7, and torch's own error for a 1-row chunk)."""
    torch.manual_seed(0)
    if where == "sequential":
        model, label = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval(), "model[1]"
    else:
        model, label = latentspace.Autoencoder(5, 2, hidden=(3,)).eval(), "Autoencoder.encoder[1]"
        model.encoder.insert(1, nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=re.escape(f"model: {label} (nn.BatchNorm1d) keeps no running statistics")):
        latentspace.Encoder(model)
    with pytest.raises(ValueError, match="depend on the rows encoded beside it"):
        latentspace.encode(model, _rows(rng, 40, 5))


def test_batch_norm_without_running_statistics_in_a_decoder_does_not_matter(rng):
    torch.manual_seed(0)
    model = latentspace.Autoencoder(5, 2, hidden=(3,)).eval()
    model.decoder.insert(1, nn.BatchNorm1d(3, track_running_stats=False))
    _assert_native_exact(model, _rows(rng, 40, 5))


def test_batch_norm_statistics_that_cannot_encode_are_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
    with pytest.raises(ValueError, match=re.escape("model: model[1]'s running_var contains NaN or Inf")):
        latentspace.Encoder(model)
    with torch.no_grad():
        model[1].running_var.fill_(-1.0)  # var + eps < 0: torch's codes would all be NaN
    with pytest.raises(ValueError, match=re.escape("model[1]'s running_var + eps is -0.99999 for feature 0, not "
                                                   "positive")):
        latentspace.Encoder(model)


def test_a_fold_beyond_float32_runs_on_torch():
    # each factor fits float32, their product (the folded weight) does not
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e30)
        model[1].weight.fill_(1e20)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and "layer 0's weight or bias with the BatchNorm1d folded in exceeds" \
        in encoder.reason


# ---------------------------------------------------------------------------------------
# nn.LayerNorm: a native stage after a layer's kernel (before or after its activation), or first

NORM_WIDTHS = (1, 3, 97, 300)  # a single feature (var = 0: every row constant), SIMD tails, a wide row


def _layer_norm(n: int, generator: torch.Generator, **kwargs) -> nn.LayerNorm:
    """nn.LayerNorm(n) with non-trivial weight and bias (where it has them): a norm that
    ignores or swaps one gives other codes."""
    norm = nn.LayerNorm(n, **kwargs)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(1.0 + torch.randn(n, generator=generator))
        if norm.bias is not None:
            norm.bias.copy_(torch.randn(n, generator=generator))
    return norm


def _far_linear(i: int, o: int, generator: torch.Generator, center: float = 1e3, spread: float = 1.0) -> nn.Linear:
    """nn.Linear(i, o) whose outputs sit near `center`, about `spread` apart: what a norm after
    it sees is far from 0 (a one-pass variance, E[h^2] - E[h]^2, would cancel)."""
    linear = nn.Linear(i, o)
    with torch.no_grad():
        linear.weight.mul_(spread)
        linear.bias.copy_(center + spread * torch.randn(o, generator=generator))
    return linear


def _around_activation(place: str, activation: str, width: int, generator: torch.Generator) -> nn.Sequential:
    """97 -> width -> 3 with a LayerNorm over the hidden layer before or after its activation,
    and one as the last module (no activation) or after a dropout."""
    act = ACTIVATIONS[activation]()
    if place == "before":  # the norm sees values near 1e3
        return nn.Sequential(_far_linear(97, width, generator), _layer_norm(width, generator), act,
                             nn.Linear(width, 3), _layer_norm(3, generator, eps=0.1))
    return nn.Sequential(nn.Linear(97, width), act, nn.Dropout(0.2), _layer_norm(width, generator),
                         nn.Linear(width, 3))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("place", ["before", "after"])
def test_layer_norm_around_an_activation_runs_natively(place, activation, rng, monkeypatch):
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(6)
    x = _rows(rng, 300, 97)
    for width in NORM_WIDTHS:
        model = _around_activation(place, activation, width, generator).eval()
        for rows in (1, 7, 300):
            encoder = _assert_native_exact(model, x[:rows])
        spec = export_layers(model)
        assert [layer.norm is not None for layer in spec.layers] == [True, place == "before"]
        # after the activation only where there is one (nn.Identity is dropped: the norm then
        # comes right after the Linear layer)
        assert spec.layers[0].norm_after_activation == (place == "after" and activation != "identity")
        assert spec.layers[0].activation == activation
    # the same codes as the torch backend (torch's float32 LayerNorm), where both are within
    # float32 rounding of the float64 codes (near 1e3, that rounding is 6e-5 before the norm)
    error = np.abs(encoder.encode(x) - _torch_backend_codes(model, x, monkeypatch))
    assert np.all(error <= 8e-6 * _error_scale(export_layers(model), x) + 1e-30)


def _layer_norm_variants(generator: torch.Generator) -> dict[str, tuple[nn.Module, float]]:
    """name -> (model, the inputs' centre): the other ways a LayerNorm appears."""
    ln = lambda n, **kwargs: _layer_norm(n, generator, **kwargs)  # noqa: E731
    ae = latentspace.Autoencoder(97, 3, hidden=(300,), activation="gelu")
    ae.encoder.insert(1, ln(300))  # Linear -> LayerNorm -> GELU
    vae = latentspace.VAE(97, 3, hidden=(300, 7), activation="elu")
    vae.encoder.insert(2, ln(300, bias=False))  # Linear -> ELU -> LayerNorm
    return {
        "last-module": (nn.Sequential(nn.Linear(97, 300), nn.ReLU(), nn.Linear(300, 3), ln(3)), 0.0),
        "not-affine": (nn.Sequential(_far_linear(97, 300, generator), ln(300, elementwise_affine=False), nn.Tanh(),
                                     nn.Linear(300, 3)), 0.0),
        "no-bias": (nn.Sequential(nn.Linear(97, 300), nn.GELU(), ln(300, bias=False), nn.Linear(300, 3),
                                  ln(3, bias=False)), 0.0),
        "tiny-spread": (nn.Sequential(_far_linear(97, 300, generator, spread=1e-2), ln(300, eps=1e-12), nn.SiLU(),
                                      nn.Linear(300, 3)), 0.0),
        "large-eps": (nn.Sequential(nn.Linear(97, 300), ln(300, eps=5.0), nn.Sigmoid(), nn.Linear(300, 3)), 0.0),
        "leading": (nn.Sequential(ln(97), nn.Linear(97, 300), nn.SiLU(), nn.Linear(300, 3)), 1e3),
        "leading-after-flatten": (nn.Sequential(nn.Flatten(), ln(97, elementwise_affine=False), nn.Linear(97, 3)), -1e3),
        "with-batch-norm": (nn.Sequential(nn.Linear(97, 300), _with_running_stats(nn.BatchNorm1d(300), generator),
                                          ln(300), nn.LeakyReLU(0.1), nn.Linear(300, 3)), 0.0),
        "autoencoder": (ae, 0.0),
        "vae": (vae, 0.0),
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["last-module", "not-affine", "no-bias", "tiny-spread", "large-eps", "leading",
                                  "leading-after-flatten", "with-batch-norm", "autoencoder", "vae"])
def test_layer_norm_variants_run_natively(name, mode, simd_level, rng):
    torch.manual_seed(7)
    model, center = _layer_norm_variants(torch.Generator().manual_seed(8))[name]
    model.train(mode == "train")  # a LayerNorm computes the same in both (no running statistics)
    x = _rows(rng, 300, 97, center=center)
    for rows in (1, 7, 300):
        encoder = _assert_native_exact(model, x[:rows])
    assert encoder.kernel == simd_level
    assert export_layers(model).has_norms
    assert (export_layers(model).input_norm is not None) == name.startswith("leading")


@pytest.mark.parametrize("place", ["before", "after"])
def test_layer_norm_bf16(place, simd_level, rng):
    """bf16 rounds each layer's input and weights; the norm runs on the float32 layer output
    (its output rounded to bf16 only as the next layer's input)."""
    torch.manual_seed(9)
    generator = torch.Generator().manual_seed(10)
    if place == "before":  # centred layers: the bound (relative to the terms summed) stays tight
        model = nn.Sequential(nn.Linear(97, 97), _layer_norm(97, generator), nn.SiLU(), nn.Linear(97, 3),
                              _layer_norm(3, generator, eps=0.1)).eval()
    else:
        model = _around_activation(place, "silu", 97, generator).eval()
    x = _rows(rng, 300, 97)
    for rows in (1, 7, 300):
        encoder = _assert_native_exact(model, x[:rows], precision="bf16")
    assert encoder.precision == "bf16"
    codes, expected = encoder.encode(x), _eval64(model, x)
    # the bound above is loose after a 3-wide norm (tiny spreads): overall, bf16-sized errors
    # (measured: under 1% of the largest code)
    assert np.abs(codes - expected).max() <= 2e-2 * np.abs(expected).max()
    assert not np.array_equal(codes, latentspace.Encoder(model).encode(x))  # it did round


def test_layer_norm_threads_agree_bitwise(rng):
    torch.manual_seed(11)
    generator = torch.Generator().manual_seed(12)
    model = nn.Sequential(_layer_norm(97, generator), _far_linear(97, 300, generator), _layer_norm(300, generator),
                          nn.GELU(), nn.Linear(300, 3)).eval()
    x = _rows(rng, 2000, 97, center=40.0)
    encoder = _assert_native_exact(model, x)
    one = encoder.encode(x)
    latentspace.set_num_threads(2)  # restored after the test (conftest)
    np.testing.assert_array_equal(encoder.encode(x), one)


def test_an_encoder_with_layer_norms_pickles(rng):
    torch.manual_seed(13)
    generator = torch.Generator().manual_seed(14)
    model = nn.Sequential(_layer_norm(97, generator), nn.Linear(97, 30), _layer_norm(30, generator, bias=False),
                          nn.Tanh(), nn.Linear(30, 3), nn.ReLU(), _layer_norm(3, generator)).eval()
    encoder = _assert_native_exact(model, _rows(rng, 50, 97))
    x = _rows(rng, 300, 97)
    for copied in (pickle.loads(pickle.dumps(encoder)), copy.deepcopy(encoder)):
        assert (copied.backend, copied.reason) == ("native", None)
        np.testing.assert_array_equal(copied.encode(x), encoder.encode(x))


def test_layer_norm_first_names_the_non_finite_row(rng):
    model = nn.Sequential(nn.LayerNorm(97), nn.Linear(97, 3)).eval()
    x = _rows(rng, 300, 97)
    x[211, 4] = np.inf
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native"
    with pytest.raises(ValueError, match=re.escape("X: row 211 contains NaN or Inf")):
        encoder.encode(x, batch_size=50)


def _with_weight(norm: nn.LayerNorm, weight: torch.Tensor) -> nn.LayerNorm:
    norm.weight = nn.Parameter(weight)
    return norm


@pytest.mark.parametrize("make, reason", [
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(4)),
     "model[1] is nn.LayerNorm((4,)) where rows of 3 features reach it: the native encoder normalises each row "
     "over its features only (normalized_shape=(3,))"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm((2, 3))), "model[1] is nn.LayerNorm((2, 3)) where rows of 6"),
    (lambda: nn.Sequential(nn.LayerNorm((1, 4)), nn.Linear(4, 3)), "model[0] is nn.LayerNorm((1, 4)) where rows of 4"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Dropout(0.1), nn.LayerNorm(3)),
     "model[3] (nn.LayerNorm) comes after model[1] on the same Linear layer's outputs: the native encoder runs one "
     "LayerNorm per Linear layer"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.ReLU(), nn.LayerNorm(3)),
     "model[3] (nn.LayerNorm) comes after model[1] on the same Linear layer's outputs"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.LayerNorm(3), nn.LayerNorm(3)),
     "model[3] (nn.LayerNorm) comes right after LayerNorm: only one right after a Linear layer or its activation, "
     "or before the first, runs natively"),
    (lambda: nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(4, 3)),
     "model[1] (nn.LayerNorm) comes right after LayerNorm"),
    (lambda: nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4), nn.Linear(4, 3)),
     "model[1] (nn.LayerNorm) comes right after BatchNorm1d"),
    (lambda: nn.Sequential(nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
     "model[1] (nn.BatchNorm1d) comes right after LayerNorm"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.BatchNorm1d(3), nn.ReLU()),
     "model[2] (nn.BatchNorm1d) comes after model[1] (nn.LayerNorm): only a BatchNorm1d right after a Linear layer, "
     "or before the first, folds into it"),
    (lambda: nn.Sequential(nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 3)), "model[1] applies ReLU right after LayerNorm"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3, eps=0.0)),
     "model[1] (nn.LayerNorm) has eps=0.0; the native encoder needs a finite eps > 0"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3, eps=-1e-5)), "model[1] (nn.LayerNorm) has eps=-1e-05"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3).double()), "model[1]'s weight is float64"),
    (lambda: nn.Sequential(nn.Linear(4, 3), _with_weight(nn.LayerNorm(3), torch.ones(5))),
     "model[1]'s weight has shape (5,), but it normalises (3,) (torch raises)"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3)), "model[1] is a nn.GroupNorm: the native encoder runs"),
])
def test_layer_norm_where_it_does_not_run_natively(make, reason):
    model = make().eval()
    with pytest.raises(NotExportable, match=re.escape(reason)):
        export_layers(model)
    assert reason in latentspace.Encoder(model).reason


def test_a_layer_norm_subclass_and_a_vae_mean_head_norm_stay_on_torch(rng):
    class ScaledNorm(nn.LayerNorm):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = nn.Sequential(nn.Linear(97, 3), ScaledNorm(3)).eval()
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and "a subclass of nn.LayerNorm" in encoder.reason
    x = _rows(rng, 7, 97)
    np.testing.assert_allclose(encoder.encode(x), _eval64(model, x), rtol=1e-5, atol=1e-5)
    # a norm over the VAE's (mu, logvar) outputs mixes them: cutting the mean head would change it
    torch.manual_seed(0)
    vae = latentspace.VAE(97, 2, hidden=(5,))
    vae.encoder.append(nn.LayerNorm(4))
    encoder = latentspace.Encoder(vae)
    assert encoder.backend == "torch"
    assert encoder.reason.startswith("VAE.encoder ends with an nn.LayerNorm over mu and logvar together")
    np.testing.assert_allclose(encoder.encode(x), _eval64(vae, x), rtol=1e-5, atol=1e-5)


def test_layer_norm_parameters_that_cannot_encode_are_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).eval()
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    with pytest.raises(ValueError, match=re.escape("model: model[1]'s bias contains NaN or Inf")):
        latentspace.Encoder(model)


# ---------------------------------------------------------------------------------------
# nn.Flatten


def _flatten_keeps_2d(start: int, end: int) -> bool:
    """torch's answer: does Flatten(start, end) return a (rows, features) tensor as it is?"""
    x = torch.zeros(2, 3)
    try:
        return nn.Flatten(start, end)(x).shape == x.shape
    except (IndexError, RuntimeError):
        return False


@pytest.mark.parametrize("start, end", [(s, e) for s in range(-3, 3) for e in range(-3, 3)])
def test_flatten_in_a_models_encoder(start, end, rng):
    """An Autoencoder's or VAE's encoder sees rows (the model's input shape): a Flatten that
    leaves them as they are is dropped, any other is refused."""
    torch.manual_seed(0)
    model = latentspace.Autoencoder(97, 1, hidden=(3,), activation="tanh").eval()
    model.encoder.insert(0, nn.Flatten(start, end))
    model.encoder.insert(3, nn.Flatten(start, end))
    if _flatten_keeps_2d(start, end):
        _assert_native_exact(model, _rows(rng, 33, 97))
    else:
        with pytest.raises(NotExportable, match=re.escape(f"Autoencoder.encoder[0] is nn.Flatten(start_dim={start}, "
                                                          f"end_dim={end}), which changes")):
            export_layers(model)


@pytest.mark.parametrize("shape", [(1, 8, 8), (64,), (4, 16), (2, 2, 2, 8)])
def test_a_sequential_starting_with_flatten_runs_natively_on_any_sample_shape(shape, rng):
    """nn.Flatten() first makes each sample a row, whatever its shape: the Encoder reshapes
    each chunk (a view) and runs the layers natively, as torch would on the same input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    samples = rng.random((9, *shape)).astype(np.float32)
    encoder = _assert_native_exact(model, samples)
    assert encoder.input_shape is None  # any shape holding 64 values
    expected = encoder.encode(samples)
    np.testing.assert_array_equal(encoder.encode(torch.from_numpy(samples)).numpy(), expected)
    np.testing.assert_array_equal(encoder.encode(iter([samples[:4], samples[4:]]), batch_size=3), expected)
    np.testing.assert_array_equal(encoder.encode(samples.astype(np.float64)), expected)


def test_a_leading_flatten_names_samples_of_the_wrong_size(rng):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native"
    with pytest.raises(ValueError, match=re.escape("X: expected samples of 64 values (the model's leading "
                                                   "nn.Flatten makes each a row of its first Linear layer's "
                                                   "width), got shape (2, 7, 9)")):
        encoder.encode(np.zeros((2, 7, 9), np.float32))
    good = rng.random((3, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=re.escape("X[0]: expected samples of 64 values")):
        encoder.encode(iter([good[:, :4]]))
    with pytest.raises(ValueError, match=re.escape("X[1]: expected shape (n, 8, 8) like the first chunk")):
        encoder.encode(iter([good, good[:, :4]]))



def test_dropout1d_before_a_leading_flatten_stays_on_torch(rng):
    """nn.Dropout1d refuses samples of more than 2 dimensions, in eval mode too (torch:
    'Expected 2D or 3D input'): before a leading Flatten, where samples of any shape arrive,
    the native encoder answered for images that torch (and the GPU) refuse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout1d(0.5), nn.Flatten(), nn.Linear(64, 3)).eval()
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and encoder.reason.startswith("model[0] (nn.Dropout1d) comes before")
    images = rng.random((5, 1, 8, 8)).astype(np.float32)
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input"):
        model(torch.from_numpy(images))
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input"):
        encoder.encode(images)
    rows = rng.random((5, 4, 16)).astype(np.float32)  # what torch takes: the same codes
    np.testing.assert_allclose(encoder.encode(rows), _eval64(model, rows), rtol=1e-5, atol=1e-6)
    # without the Flatten the samples are rows, which Dropout1d takes: native
    _assert_native_exact(nn.Sequential(nn.Dropout1d(0.5), nn.Linear(64, 3)).eval(), rows.reshape(5, 64))

@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Flatten(2), nn.Linear(64, 3)),  # (n, c, h*w): not one row per sample
    lambda: nn.Sequential(nn.Linear(8, 8), nn.Flatten(), nn.Linear(64, 3)),  # what the Linear gives may be n-d
])
def test_a_flatten_that_is_not_leading_and_whole_stays_on_torch(make):
    encoder = latentspace.Encoder(make().eval())
    assert encoder.backend == "torch" and "the native encoder runs only a leading nn.Flatten()" in encoder.reason


# ---------------------------------------------------------------------------------------
# Reasons that name the module and what would run natively


def test_a_quantized_linear_is_named_with_its_full_type(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(97, 3), nn.ReLU(), nn.Linear(3, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        try:
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        except (AttributeError, RuntimeError) as error:  # no quantization engine in this torch
            pytest.skip(f"quantize_dynamic unavailable: {error}")
    encoder = latentspace.Encoder(quantized)
    assert encoder.backend == "torch"
    # its class is also called Linear: the reason gives the full type, and the fix
    assert encoder.reason.startswith(f"model[0] is a {type(quantized[0]).__module__}.Linear: a quantized module")
    assert "encode with the float model" in encoder.reason
    x = _rows(rng, 7, 97)
    with torch.no_grad():
        expected = quantized(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(encoder.encode(x), expected, rtol=1e-6, atol=1e-6)


def test_a_parametrized_linear_names_the_fix_and_the_fix_runs_natively(rng):
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, weight):
            return 2.0 * weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(97, 3), nn.SiLU(), nn.Linear(3, 1))
    parametrize.register_parametrization(model[2], "weight", Double())
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch"
    assert encoder.reason.startswith("model[2] is a torch.nn.utils.parametrize.ParametrizedLinear: an nn.Linear whose "
                                     "weight a parametrization computes")
    assert "remove_parametrizations(module, 'weight')" in encoder.reason
    x = _rows(rng, 7, 97)
    before = _eval64(model, x)
    parametrize.remove_parametrizations(model[2], "weight")  # what the reason says
    _assert_native_exact(model, x)
    np.testing.assert_allclose(_eval64(model, x), before, rtol=1e-12)


def test_a_subclass_is_named_with_its_base_and_place_in_a_model():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 3.0 * super().forward(x)

    model = latentspace.Autoencoder(6, 2, hidden=(4,))
    model.encoder[2] = ScaledLinear(4, 2)
    with pytest.raises(NotExportable) as raised:
        export_layers(model)
    assert raised.value.reason == (
        f"Autoencoder.encoder[2] is a {ScaledLinear.__module__}.{ScaledLinear.__qualname__}: a subclass of nn.Linear, "
        "whose forward may compute something else; the native encoder takes exact types only (a plain nn.Linear "
        "with the same parameters runs natively)")
    model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Identity(), _ReLUPlus()))
    assert latentspace.Encoder(model).reason.startswith("model[1][1] is a ")
    assert "._ReLUPlus: a subclass of nn.ReLU" in latentspace.Encoder(model).reason


@pytest.mark.parametrize("module", [nn.Dropout2d(0.5), nn.Dropout3d(0.5)], ids=lambda m: type(m).__name__)
def test_dropout_for_images_stays_on_torch(module):
    # torch deprecates them on (rows, features) values, to become an error
    model = nn.Sequential(nn.Linear(4, 3), module).eval()
    assert latentspace.Encoder(model).reason.startswith(f"model[1] is a nn.{type(module).__name__}: ")

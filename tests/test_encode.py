"""latentspace.encode / Encoder: export to the native layer chain, backend choice, every
input kind, out=, bad input, and (when the build has it) the native encoder against torch.

Three kinds of checks:
* export: the exported layer spec, evaluated by a float64 numpy reference, equals the
  model's own encode in float64 (runs everywhere: it needs no native code);
* plumbing: chunking, conversion, out=, NaN rows, through the torch backend and through
  FakeMlpEncoder, a numpy stand-in for _native.MlpEncoder that enforces its contract;
* native: the real _native.MlpEncoder against the torch forward (skipped until it exists).
"""

from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import nn

import latentspace
from latentspace import _native
from latentspace.encoding import NotExportable, export_layers


WIDTHS = (1, 3, 97, 130)  # odd sizes: SIMD tails, a single column, more than a 128 block
# name -> module factory; "identity" is a chain of Linear layers with nothing between.
ACTIVATIONS = {
    "identity": lambda: nn.Identity(),
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.07),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "silu": lambda: nn.SiLU(),
    "elu": lambda: nn.ELU(alpha=0.6),
}


@pytest.fixture(autouse=True)
def _one_torch_thread(single_threaded):
    """Tiny models: one thread each for torch and latentspace (see conftest.single_threaded)."""


# ---------------------------------------------------------------------------------------
# References


def _bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def _apply(name: str, z: np.ndarray, param: float) -> np.ndarray:
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z >= 0, z, param * z)
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "elu":
        return np.where(z > 0, z, param * np.expm1(np.minimum(z, 0.0)))
    raise AssertionError(f"unknown activation {name}")


def _reference_forward(spec, x, precision: str = "fp32") -> np.ndarray:
    """The exported layer chain in float64: z = layers(x - input_offset). precision "bf16"
    rounds each layer's input and weights to bfloat16 first (the native bf16 contract)."""
    h = np.asarray(x, dtype=np.float64)
    if spec.input_offset is not None:
        h = h - spec.input_offset.astype(np.float64)
    for layer in spec.layers:
        w = layer.weight.astype(np.float64)
        if precision == "bf16":
            h, w = _bf16(h), _bf16(w)
        h = h @ w.T
        if layer.bias is not None:
            h = h + layer.bias.astype(np.float64)
        h = _apply(layer.activation, h, layer.param)
    return h


class FakeMlpEncoder:
    """_native.MlpEncoder's contract in numpy: the same arguments, checked as strictly as
    the contract states, and float32 results from the float64 reference. Records every
    encode call's buffers, so tests can see what was passed (and that nothing was copied)."""

    NAMES = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu", "elu")
    instances: list["FakeMlpEncoder"] = []

    def __init__(self, weights, biases, activations, activation_params, input_offset, precision):
        from latentspace.encoding import MlpLayer, MlpSpec

        if not (len(weights) == len(biases) == len(activations) == len(activation_params) >= 1):
            raise ValueError("weights, biases, activations, activation_params: one entry per layer")
        for i, w in enumerate(weights):
            self._check_array(w, f"weights[{i}]", 2)
            if i and w.shape[1] != weights[i - 1].shape[0]:
                raise ValueError(f"weights[{i}]: does not chain")
            if biases[i] is not None:
                self._check_array(biases[i], f"biases[{i}]", 1)
                if biases[i].shape != (w.shape[0],):
                    raise ValueError(f"biases[{i}]: wrong length")
            if activations[i] not in self.NAMES:
                raise ValueError(f"activations[{i}]: unknown {activations[i]!r}")
            if not isinstance(activation_params[i], float):
                raise TypeError(f"activation_params[{i}]: expected a float")
        if input_offset is not None:
            self._check_array(input_offset, "input_offset", 1)
            if input_offset.shape != (weights[0].shape[1],):
                raise ValueError("input_offset: wrong length")
        if precision not in ("fp32", "bf16"):
            raise ValueError("precision: expected 'fp32' or 'bf16'")
        layers = tuple(MlpLayer(w.copy(), None if b is None else b.copy(), a, p)
                       for w, b, a, p in zip(weights, biases, activations, activation_params))
        self.spec = MlpSpec(layers, None if input_offset is None else input_offset.copy())
        self.input_dim, self.output_dim = self.spec.input_dim, self.spec.output_dim
        self.num_layers, self.precision, self.kernel = len(layers), precision, "fake"
        self.calls: list[tuple[int, int, int]] = []  # (x data pointer, out data pointer, rows)
        FakeMlpEncoder.instances.append(self)

    @staticmethod
    def _check_array(a, name, ndim):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous {ndim}-d float32 array")

    def encode(self, x, out):
        self._check_array(x, "x", 2)
        self._check_array(out, "out", 2)
        if not out.flags.writeable or x.shape[1] != self.input_dim or out.shape != (x.shape[0], self.output_dim):
            raise ValueError("x, out: wrong shapes or read-only out")
        self.calls.append((x.ctypes.data, out.ctypes.data, x.shape[0]))
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise ValueError(f"x: row {int(np.flatnonzero(~finite)[0])} contains NaN or Inf; clean the data")
        out[...] = _reference_forward(self.spec, x, self.precision).astype(np.float32)


@pytest.fixture(params=["fake-native", "torch"])
def backend(request, monkeypatch):
    """Runs a test through both paths of encoding.py: the native one (with FakeMlpEncoder
    standing in for the extension) and the torch fallback (the export refused, as it is for
    a model the native encoder cannot run)."""
    if request.param == "fake-native":
        monkeypatch.setattr(_native, "MlpEncoder", FakeMlpEncoder, raising=False)
        return "native"

    def refuse(model):
        raise NotExportable("the test takes the torch path")

    monkeypatch.setattr(latentspace.encoding, "export_layers", refuse)
    return "torch"


@pytest.fixture
def fake_native(monkeypatch):
    FakeMlpEncoder.instances.clear()
    monkeypatch.setattr(_native, "MlpEncoder", FakeMlpEncoder, raising=False)
    return FakeMlpEncoder


def _sequential(activation: str, depth: int, shift: int = 0, *, last_activation: bool = True) -> nn.Sequential:
    widths = [WIDTHS[(j + shift) % len(WIDTHS)] for j in range(depth + 1)]
    modules: list[nn.Module] = []
    for j in range(depth):
        modules.append(nn.Linear(widths[j], widths[j + 1], bias=(j + shift) % 3 != 2))
        if last_activation or j < depth - 1:
            modules.append(ACTIVATIONS[activation]())
    return nn.Sequential(*modules)


def _torch64(model: nn.Module, x: np.ndarray, method: str = "forward") -> np.ndarray:
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        z = getattr(double, method)(torch.from_numpy(np.asarray(x, dtype=np.float64)))
    return z.numpy()


def _rows(rng, n, d, scale=1.5):
    return (rng.standard_normal((n, d)) * scale).astype(np.float32)


def _close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, dtype=np.float64)
    atol = rtol * max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


def _rounding_scale(spec, x) -> np.ndarray:
    """Per output element, the size of the terms its float32 computation sums: the layer
    chain run on magnitudes (|x| + |offset|, then |W| m + |b| per layer). A float32 result's
    rounding error is a small multiple of eps32 times this, however much the terms cancel;
    an output near zero after cancellation would make a tolerance relative to the output
    itself fail on correct code."""
    m = np.abs(np.asarray(x, dtype=np.float64))
    if spec.input_offset is not None:
        m = m + np.abs(spec.input_offset.astype(np.float64))
    for layer in spec.layers:
        # every activation here is at most ~1.13-Lipschitz, so it leaves the error scale as is
        m = m @ np.abs(layer.weight.astype(np.float64)).T
        if layer.bias is not None:
            m = m + np.abs(layer.bias.astype(np.float64))
    return m


def _assert_float32_exact(actual, model, x):
    """actual (the native float32 encode of x) equals the model's float64 encode up to float32
    rounding: per element within 4e-6 of the terms summed (about 30 eps32; the measured
    errors over every chain here stay below 3e-7 of it). A wrong activation, bias, layer
    order or transposition moves outputs by a sizeable share of that scale and fails."""
    spec = export_layers(model)
    expected = _torch64(model, x, "encode" if hasattr(model, "encode") else "forward")
    bound = 4e-6 * _rounding_scale(spec, x) + 1e-30
    error = np.abs(np.asarray(actual, dtype=np.float64) - expected)
    worst = np.unravel_index(np.argmax(error / bound), error.shape)
    assert np.all(error <= bound), (f"element {worst}: got {actual[worst]!r}, float64 "
                                    f"{expected[worst]!r}, allowed error {bound[worst]:.3g}")


@pytest.fixture
def autoencoder():
    torch.manual_seed(0)
    return latentspace.Autoencoder(10, 3, hidden=(7,), activation="gelu").eval()


# ---------------------------------------------------------------------------------------
# Export: the spec, evaluated in float64, is the model's encode in float64


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_export_sequential_matches_float64_forward(activation, depth, rng):
    torch.manual_seed(depth)
    shift = list(ACTIVATIONS).index(activation)
    model = _sequential(activation, depth, shift)
    spec = export_layers(model)
    assert len(spec.layers) == depth and spec.input_offset is None
    assert all(layer.activation == activation for layer in spec.layers)
    x = _rows(rng, 33, spec.input_dim, scale=3.0)
    np.testing.assert_allclose(_reference_forward(spec, x), _torch64(model, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "elu", "leaky_relu", "tanh"])
def test_export_autoencoder_and_vae_mean_head(activation, rng):
    torch.manual_seed(1)
    x = _rows(rng, 20, 13)
    ae = latentspace.Autoencoder(13, 5, hidden=(97, 3), activation=activation)
    spec = export_layers(ae)
    assert [layer.activation for layer in spec.layers] == [activation, activation, "identity"]
    np.testing.assert_allclose(_reference_forward(spec, x), _torch64(ae, x, "encode"), rtol=1e-12, atol=1e-12)

    vae = latentspace.VAE(13, 4, hidden=(9,), activation=activation)
    spec = export_layers(vae)
    assert spec.output_dim == 4 and spec.layers[-1].weight.shape == (4, 9)
    mean = _torch64(vae, x, "encode")
    np.testing.assert_allclose(_reference_forward(spec, x), mean, rtol=1e-12, atol=1e-12)
    # the mean head, not logvar: the other half of the last layer differs
    full = _torch64(vae.encoder, x)
    assert not np.allclose(full[:, 4:], mean)


@pytest.mark.parametrize("whiten", [False, True])
def test_export_pca(whiten, rng):
    data = rng.standard_normal((300, 97)) @ rng.standard_normal((97, 97)) + 5.0
    pca = latentspace.PCA(7, whiten=whiten).fit(data)
    spec = export_layers(pca)
    assert len(spec.layers) == 1 and spec.layers[0].bias is None and spec.layers[0].activation == "identity"
    np.testing.assert_array_equal(spec.input_offset, pca.mean.numpy())
    x = data[:50]
    # the weights are rounded to float32 once (components / scale): float32-level agreement
    _close(_reference_forward(spec, x), _torch64(pca, x, "encode"), rtol=1e-6)


def test_export_activation_parameters_and_bias_free_layers():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.LeakyReLU(0.31), nn.Linear(4, 2), nn.ELU(alpha=0.25),
                          nn.Sequential(nn.Identity(), nn.Linear(2, 5)), nn.GELU(approximate="tanh"))
    spec = export_layers(model)
    assert [(layer.activation, layer.param) for layer in spec.layers] == [
        ("leaky_relu", pytest.approx(0.31)), ("elu", 0.25), ("gelu_tanh", 0.0)]
    assert spec.layers[0].bias is None and spec.layers[1].bias is not None
    for layer in spec.layers:
        assert layer.weight.dtype == np.float32 and layer.weight.flags.c_contiguous


def test_export_is_a_snapshot():
    model = nn.Sequential(nn.Linear(3, 2))
    spec = export_layers(model)
    before = spec.layers[0].weight.copy()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    np.testing.assert_array_equal(spec.layers[0].weight, before)


class _ShiftedAutoencoder(latentspace.Autoencoder):
    def _encode(self, x):
        return super()._encode(x) + 1.0


class _ScaledVAE(latentspace.VAE):
    def encode(self, x, **kwargs):
        return super().encode(x, **kwargs) * 2.0


class _ReLUPlus(nn.ReLU):
    def forward(self, x):
        return super().forward(x) + 1.0


class _TorchOnly(nn.Identity):
    """The identity, as a type the exporter does not know: its model runs on torch."""


def _replaced(model, name):
    """The model with method `name` replaced on the instance by one that doubles its result
    (Python calls the instance's attribute, whatever the class says)."""
    original = getattr(model, name)
    setattr(model, name, lambda x, **kwargs: original(x, **kwargs) * 2.0)
    return model


def _hooked():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    model[0].register_forward_hook(lambda module, args, out: out * 3.0)
    return model


@pytest.mark.parametrize("make, reason", [
    (lambda: latentspace.ConvAutoencoder((1, 8, 8), 3, channels=(2,)), "not a chain of Linear layers"),
    (lambda: _ShiftedAutoencoder(4, 3, hidden=(5,)), "overrides _encode()"),
    (lambda: _ScaledVAE(4, 3, hidden=(5,)), "overrides encode()"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh()), "Tanh right after ReLU"),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 3)), "ReLU right after the input"),
    (lambda: nn.Sequential(nn.Linear(4, 3), _ReLUPlus()), "_ReLUPlus: a subclass of nn.ReLU"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Softplus()), "model[1] is a nn.Softplus"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Identity(), nn.Softplus())),
     "model[1][1] is a nn.Softplus"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3)),
     "model[2] (nn.BatchNorm1d) comes right after ReLU"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Flatten(), nn.Linear(4, 3)),
     "model[1] is nn.Flatten(start_dim=1, end_dim=-1) where the values may have any shape"),
    (lambda: nn.Sequential(nn.Identity()), "no Linear layer"),
    (_hooked, "forward hooks"),
    (lambda: nn.Sequential(nn.Linear(4, 3)).double(), "is float64"),
    (lambda: latentspace.Autoencoder(4, 3, hidden=(5,)).half(), "is float16"),
    (lambda: nn.Linear(4, 3), "Linear is not a model the native encoder knows"),
    (lambda: _replaced(latentspace.Autoencoder(4, 3, hidden=(5,)), "_encode"),
     "Autoencoder's _encode() is replaced on the instance"),
    (lambda: _replaced(latentspace.VAE(4, 3, hidden=(5,)), "encode"), "VAE's encode() is replaced on the instance"),
    (lambda: _replaced(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), "forward"),
     "model's forward() is replaced on the instance"),
    (lambda: nn.Sequential(_replaced(nn.Linear(4, 3), "forward"), nn.ReLU()),
     "model[0]'s forward() is replaced on the instance"),
    (lambda: nn.Sequential(nn.Linear(4, 0)), "layer 0 is nn.Linear(4, 0)"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 0), nn.Linear(0, 3)),
     "layer 1 is nn.Linear(5, 0)"),
])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # nn.Linear(n, 0)
def test_not_exportable_falls_back_to_torch_with_the_reason(make, reason, fake_native, rng):
    torch.manual_seed(0)
    model = make().eval()
    with pytest.raises(NotExportable, match=re.escape(reason)):
        export_layers(model)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and encoder.kernel == "torch" and reason in encoder.reason
    assert not fake_native.instances
    x = rng.random((9, 64 if isinstance(model, latentspace.ConvAutoencoder) else 4))
    z = encoder.encode(x)
    dtype = next(model.parameters(), torch.zeros(())).dtype
    with torch.no_grad():
        tensor = torch.from_numpy(x).to(dtype)
        expected = model.encode(tensor) if isinstance(model, latentspace.models.LatentModel) else model(tensor)
    assert z.dtype == np.float32
    _close(z, expected.float().numpy(), rtol=1e-2 if dtype == torch.float16 else 1e-6)


def test_export_refuses_an_unfitted_pca_and_nan_weights():
    with pytest.raises(ValueError, match="PCA is not fitted"):
        latentspace.Encoder(latentspace.PCA(2))
    with pytest.raises(ValueError, match="PCA is not fitted"):
        latentspace.encode(latentspace.PCA(2), np.zeros((3, 4)))
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="model: layer 0's weight contains NaN or Inf"):
        latentspace.Encoder(model)


# ---------------------------------------------------------------------------------------
# Backend choice, reason, logging, snapshot


def test_native_backend_when_available(fake_native, autoencoder, rng, caplog):
    encoder = latentspace.Encoder(autoencoder)
    assert (encoder.backend, encoder.kernel, encoder.reason) == ("native", "fake", None)
    assert encoder.latent_dim == 3 and encoder.input_shape == (10,) and encoder.device == torch.device("cpu")
    (native,) = fake_native.instances
    assert native.precision == "fp32" and native.num_layers == 2
    x = _rows(rng, 50, 10)
    with caplog.at_level(logging.INFO, logger="latentspace"):
        z = latentspace.encode(autoencoder, x)
    assert "backend=native kernel=fake model=Autoencoder" in caplog.text
    _close(z, _torch64(autoencoder, x, "encode"))


def test_bf16_is_passed_to_native(fake_native, autoencoder):
    encoder = latentspace.Encoder(autoencoder, precision="bf16")
    assert encoder.precision == "bf16" and fake_native.instances[-1].precision == "bf16"


def test_bf16_on_the_torch_backend_uses_autocast(monkeypatch, rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(97, 130), nn.ReLU(), nn.Linear(130, 8), nn.Softplus())  # not exportable
    assert latentspace.Encoder(model).backend == "torch"
    x = _rows(rng, 64, 97)
    exact = latentspace.encode(model, x)
    low = latentspace.encode(model, x, precision="bf16")
    assert low.dtype == np.float32
    error = np.abs(low - exact).max() / np.abs(exact).max()
    assert 0 < error < 3e-2  # bfloat16 has 8 significant bits: it must differ, a little


def test_fp32_is_not_lowered_by_the_callers_autocast(backend, rng):
    # precision="fp32" on the torch backend ran in bfloat16 inside a caller's torch.autocast
    # (a training loop's), where the native backend stays float32: the two must agree.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(97, 130), nn.ReLU(), nn.Linear(130, 8))
    x = _rows(rng, 64, 97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = latentspace.encode(model, x)
    _close(codes, _torch64(model, x))


@pytest.mark.parametrize("precision", ["fp16", "FP32", None, 32])
def test_bad_precision(precision, autoencoder):
    with pytest.raises(ValueError, match="precision: expected 'fp32' or 'bf16'"):
        latentspace.Encoder(autoencoder, precision=precision)


def test_bad_model_and_device(autoencoder):
    with pytest.raises(TypeError, match="model: expected a latentspace model or a torch.nn.Module"):
        latentspace.encode(lambda x: x, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N'"):
        latentspace.Encoder(autoencoder, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            latentspace.Encoder(autoencoder, device="cuda")


def test_an_encoder_can_be_reused_by_encode(fake_native, autoencoder, rng):
    encoder = latentspace.Encoder(autoencoder)
    x = _rows(rng, 8, 10)
    np.testing.assert_array_equal(latentspace.encode(encoder, x), encoder.encode(x))
    assert len(fake_native.instances) == 1  # not exported again
    with pytest.raises(ValueError, match="an Encoder already has them"):
        latentspace.encode(encoder, x, precision="bf16")


def test_weights_are_snapshotted_and_the_model_left_alone(backend, rng):
    torch.manual_seed(0)
    model = latentspace.Autoencoder(10, 3, hidden=(7,)).train()
    x = _rows(rng, 12, 10)
    encoder = latentspace.Encoder(model)
    before = encoder.encode(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    np.testing.assert_array_equal(encoder.encode(x), before)
    assert model.training  # the caller's model keeps its mode
    _close(latentspace.Encoder(model).encode(x), _torch64(model, x, "encode"))  # a new one sees the change


# ---------------------------------------------------------------------------------------
# Inputs


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32, np.uint8])
def test_numpy_dtypes(backend, autoencoder, dtype, rng):
    x = (rng.standard_normal((37, 10)) * 4).astype(dtype)
    z = latentspace.encode(autoencoder, x, batch_size=8)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (37, 3)
    _close(z, _torch64(autoencoder, x.astype(np.float32), "encode"))


def test_memmap_is_read_in_chunks(backend, autoencoder, rng, tmp_path):
    x = _rows(rng, 1000, 10)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    z = latentspace.encode(autoencoder, mapped, batch_size=99)
    _close(z, _torch64(autoencoder, x, "encode"))


def test_c_contiguous_float32_goes_to_native_without_a_copy(fake_native, autoencoder, rng):
    x = _rows(rng, 100, 10)
    out = np.empty((100, 3), dtype=np.float32)
    latentspace.encode(autoencoder, x, batch_size=40, out=out)
    calls = fake_native.instances[-1].calls
    assert [rows for _, _, rows in calls] == [40, 40, 20]
    assert [x_ptr for x_ptr, _, _ in calls] == [x.ctypes.data + s * 40 for s in (0, 40, 80)]
    assert [o_ptr for _, o_ptr, _ in calls] == [out.ctypes.data + s * 12 for s in (0, 40, 80)]
    tensor = torch.from_numpy(_rows(rng, 30, 10))
    latentspace.encode(autoencoder, tensor)
    assert fake_native.instances[-1].calls[0][0] == tensor.data_ptr()


def test_torch_tensors_in_torch_tensors_out(backend, autoencoder, rng):
    x = _rows(rng, 21, 10)
    tensor = torch.from_numpy(x).requires_grad_(True)
    z = latentspace.encode(autoencoder, tensor, batch_size=5)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert not z.requires_grad
    _close(z.numpy(), _torch64(autoencoder, x, "encode"))
    z = latentspace.encode(autoencoder, torch.from_numpy(x).double())
    _close(z.numpy(), _torch64(autoencoder, x, "encode"))


def test_non_contiguous_inputs(backend, autoencoder, rng):
    wide = _rows(rng, 30, 20)
    for x in (wide[:, ::2], np.asfortranarray(wide[:, :10]), wide[::-1, 5:15]):
        _close(latentspace.encode(autoencoder, x, batch_size=7), _torch64(autoencoder, x, "encode"))
    t = torch.from_numpy(wide)[:, 1::2]
    _close(latentspace.encode(autoencoder, t).numpy(), _torch64(autoencoder, t.numpy(), "encode"))


def test_iterable_of_uneven_chunks(backend, autoencoder, rng):
    sizes = (1, 0, 17, 64, 5, 130, 3)
    chunks = [_rows(rng, n, 10) for n in sizes]
    expected = _torch64(autoencoder, np.concatenate(chunks), "encode")
    z = latentspace.encode(autoencoder, (c for c in chunks), batch_size=16)  # splits the big ones
    assert isinstance(z, np.ndarray) and z.shape == (sum(sizes), 3)
    _close(z, expected)
    z = latentspace.encode(autoencoder, iter([torch.from_numpy(c) for c in chunks]))
    assert isinstance(z, torch.Tensor)
    _close(z.numpy(), expected)
    # mixed chunk types and dtypes: converted one by one; the first decides the result's type
    mixed = iter([chunks[2].astype(np.float64), torch.from_numpy(chunks[3]), chunks[4].tolist()])
    z = latentspace.encode(autoencoder, mixed)
    assert isinstance(z, np.ndarray)
    _close(z, _torch64(autoencoder, np.concatenate(chunks[2:5]), "encode"))


def test_a_list_is_one_array(backend, autoencoder, rng):
    x = _rows(rng, 4, 10)
    _close(latentspace.encode(autoencoder, x.tolist()), _torch64(autoencoder, x, "encode"))
    with pytest.raises(ValueError, match=r"pass iter\(chunks\)"):
        latentspace.encode(autoencoder, [_rows(rng, 3, 10), _rows(rng, 2, 10)])


def test_empty_inputs(backend, autoencoder):
    z = latentspace.encode(autoencoder, np.empty((0, 10), dtype=np.float64))
    assert isinstance(z, np.ndarray) and z.shape == (0, 3) and z.dtype == np.float32
    z = latentspace.encode(autoencoder, torch.empty((0, 10)))
    assert isinstance(z, torch.Tensor) and z.shape == (0, 3)
    z = latentspace.encode(autoencoder, iter([]))
    assert isinstance(z, np.ndarray) and z.shape == (0, 3)
    out = np.empty((0, 3), dtype=np.float32)
    assert latentspace.encode(autoencoder, iter([np.empty((0, 10))]), out=out) is out


def test_conv_autoencoder_takes_images_or_rows(rng):
    torch.manual_seed(0)
    model = latentspace.ConvAutoencoder((1, 8, 8), 3, channels=(4,)).eval()
    images = rng.random((23, 1, 8, 8)).astype(np.float32)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and encoder.input_shape == (1, 8, 8)
    expected = model.encode(images)
    _close(encoder.encode(images, batch_size=5), expected)
    _close(encoder.encode(images.reshape(23, 64), batch_size=5), expected)
    with pytest.raises(ValueError, match=r"X: expected shape \(n, 1, 8, 8\) or \(n, 64\), got \(23, 65\)"):
        encoder.encode(rng.random((23, 65)))


def test_module_of_unknown_width_learns_it_from_the_first_chunk(rng):
    class FirstTwoDoubled(nn.Module):
        def forward(self, x):
            return x[:, :2] * 2.0

    encoder = latentspace.Encoder(FirstTwoDoubled())
    assert encoder.backend == "torch" and encoder.latent_dim is None and encoder.input_shape is None
    x = _rows(rng, 10, 5)
    np.testing.assert_array_equal(encoder.encode(iter([x[:4], x[4:]])), x[:, :2] * 2)
    assert encoder.latent_dim == 2
    fresh = latentspace.Encoder(FirstTwoDoubled())
    assert fresh.encode(np.empty((0, 5))).shape == (0, 2)  # asked once, on no rows
    with pytest.raises(ValueError, match="output width is unknown"):
        latentspace.Encoder(FirstTwoDoubled()).encode(iter([]))
    with pytest.raises(ValueError, match=r"X\[1\]: expected shape \(n, 5\) like the first chunk"):
        latentspace.Encoder(FirstTwoDoubled()).encode(iter([x, _rows(rng, 3, 6)]))


def test_model_returning_the_wrong_shape(rng):
    class Flat(nn.Module):
        def forward(self, x):
            return x.sum()

    with pytest.raises(ValueError, match=r"model: Flat returned \(\) for 4 rows"):
        latentspace.encode(Flat(), _rows(rng, 4, 3))


# ---------------------------------------------------------------------------------------
# out=


def test_out_is_filled_and_returned(backend, autoencoder, rng, tmp_path):
    x = _rows(rng, 50, 10)
    expected = _torch64(autoencoder, x, "encode")
    out = np.full((50, 3), np.nan, dtype=np.float32)
    assert latentspace.encode(autoencoder, x, out=out, batch_size=16) is out
    _close(out, expected)
    out_t = torch.full((50, 3), float("nan"))
    assert latentspace.encode(autoencoder, torch.from_numpy(x), out=out_t) is out_t
    _close(out_t.numpy(), expected)
    mapped = np.lib.format.open_memmap(tmp_path / "z.npy", mode="w+", dtype=np.float32, shape=(50, 3))
    latentspace.encode(autoencoder, x, out=mapped, batch_size=7)
    mapped.flush()
    _close(np.load(tmp_path / "z.npy"), expected)
    out = np.full((50, 3), np.nan, dtype=np.float32)
    chunks = iter([x[:20], x[20:21], x[21:]])
    assert latentspace.encode(autoencoder, chunks, out=out, batch_size=8) is out
    _close(out, expected)


@pytest.mark.parametrize("make_out, error, message", [
    (lambda: np.empty((49, 3), np.float32), ValueError, r"out: expected shape \(50, 3\), got \(49, 3\)"),
    (lambda: np.empty((50, 4), np.float32), ValueError, r"out: expected shape \(50, 3\), got \(50, 4\)"),
    (lambda: np.empty(150, np.float32), ValueError, r"out: expected a C-contiguous 2-d array of shape \(50, 3\)"),
    (lambda: np.empty((50, 3), np.float64), TypeError, "out: expected float32, got float64"),
    (lambda: np.empty((3, 50), np.float32).T, ValueError, "non-contiguous"),
    (lambda: torch.empty((50, 3), dtype=torch.float64), TypeError, "out: expected float32, got torch.float64"),
    (lambda: torch.empty((50, 3), requires_grad=True), ValueError, "does not require grad"),
    (lambda: torch.empty((3, 50)).T, ValueError, "non-contiguous"),
    (lambda: [[0.0] * 3] * 50, TypeError, "out: expected a float32 numpy array or torch tensor \\(CPU or CUDA\\), got list"),
])
def test_bad_out(backend, autoencoder, rng, make_out, error, message):
    with pytest.raises(error, match=message):
        latentspace.encode(autoencoder, _rows(rng, 50, 10), out=make_out())


def test_read_only_out(backend, autoencoder, rng):
    out = np.empty((5, 3), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        latentspace.encode(autoencoder, _rows(rng, 5, 10), out=out)


def test_a_bad_out_is_refused_before_the_iterable_is_read(backend, autoencoder, rng):
    # The first chunk was read (to learn the result's type) before out was checked: a retry
    # with the same generator and a corrected out then silently lacked those rows.
    x = _rows(rng, 6, 10)
    chunks = iter([x[:3], x[3:]])
    with pytest.raises(TypeError, match="out: expected float32, got float64"):
        latentspace.encode(autoencoder, chunks, out=np.zeros((6, 3)))
    assert len(list(chunks)) == 2  # both chunks still there


def test_out_with_chunks_that_overflow_or_underfill_it(backend, autoencoder, rng):
    x = _rows(rng, 30, 10)
    with pytest.raises(ValueError, match=r"out: has room for 25 rows, but X holds more \(at least 30\)"):
        latentspace.encode(autoencoder, iter([x[:20], x[20:]]), out=np.empty((25, 3), np.float32))
    with pytest.raises(ValueError, match=r"out: has 40 rows, but X held only 30; pass out\[:30\]"):
        latentspace.encode(autoencoder, iter([x[:20], x[20:]]), out=np.empty((40, 3), np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(n, 3\)"):
        latentspace.encode(autoencoder, iter([x]), out=np.empty((30, 2), np.float32))


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad_row", [0, 6, 7, 8, 20, 49])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_row_is_reported_within_X(backend, autoencoder, rng, bad_row, bad_value):
    x = _rows(rng, 50, 10)
    x[bad_row, 3] = bad_value
    x[min(bad_row + 9, 49), 0] = np.nan  # a later bad row: the first is reported
    with pytest.raises(ValueError, match=rf"X: row {bad_row} contains NaN or Inf"):
        latentspace.encode(autoencoder, x, batch_size=7)


def test_nonfinite_row_in_an_iterable_names_row_and_chunk(backend, autoencoder, rng):
    chunks = [_rows(rng, n, 10) for n in (5, 12, 9)]
    chunks[2][4, 1] = np.nan
    with pytest.raises(ValueError, match=r"X: row 21 \(row 4 of chunk X\[2\]\) contains NaN or Inf"):
        latentspace.encode(autoencoder, iter(chunks), batch_size=3)


def test_float64_beyond_float32_range_is_refused(backend, autoencoder, rng):
    x = rng.standard_normal((10, 10))
    x[6, 2] = 1e300
    with pytest.raises(ValueError, match="X: row 6 contains NaN or Inf \\(or a value too large for float32\\)"):
        latentspace.encode(autoencoder, x)


@pytest.mark.parametrize("X, error, message", [
    (None, TypeError, "X: expected a numpy array, a torch tensor or an iterable of 2-d chunks, got NoneType"),
    ("x.npy", TypeError, "got str"),
    (5, TypeError, "got int"),
    ({"a": 1}, TypeError, "got dict"),
    (np.zeros(10), ValueError, r"X: expected shape \(n, 10\), got \(10,\) \(for one sample use x.reshape\(1, -1\)\)"),
    (np.zeros((4, 11)), ValueError, r"X: expected shape \(n, 10\), got \(4, 11\)"),
    (np.zeros((4, 10), dtype=bool), TypeError, "X: expected a real numeric dtype"),
    (np.zeros((4, 10), dtype=complex), TypeError, "X: expected a real numeric dtype"),
    (torch.zeros((4, 10), dtype=torch.bool), TypeError, "X: expected a real numeric dtype"),
    (lambda: iter([np.zeros((2, 10)), np.zeros((2, 9))]), ValueError,
     r"X\[1\]: expected shape \(n, 10\), got \(2, 9\)"),
    (lambda: iter([np.zeros((2, 10)), "rows"]), TypeError, r"X\[1\]: expected a numpy array or torch tensor, got str"),
    # None is a bad chunk, not the end of the stream
    (lambda: iter([np.zeros((2, 10)), None, np.zeros((2, 10))]), TypeError,
     r"X\[1\]: expected a numpy array or torch tensor, got NoneType"),
    (lambda: iter([None, np.zeros((2, 10))]), TypeError,
     r"X\[0\]: expected a numpy array or torch tensor, got NoneType"),
])
def test_bad_X(backend, autoencoder, X, error, message):
    with pytest.raises(error, match=message):
        latentspace.encode(autoencoder, X() if callable(X) else X)  # iterators: fresh per run


def test_none_in_an_iterable_adds_nothing_to_an_index(backend, autoencoder, rng):
    x = _rows(rng, 5, 10)
    index = latentspace.FlatIndex(3)
    with pytest.raises(TypeError, match=r"X\[1\]: expected a numpy array or torch tensor, got NoneType"):
        index.add_encoded(autoencoder, iter([x, None, x]))
    assert index.ntotal == 0


def _square_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


def test_a_misaligned_out_is_refused_before_any_chunk_is_read(backend, rng):
    # The native encoder cannot write floats through a misaligned pointer and refuses such an
    # out, but only at its first chunk: a generator X would have lost that chunk by then.
    model = _square_mlp()
    out = np.zeros(300 * 4 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(300, 4)
    assert not out.flags.aligned
    chunks = iter([rng.random((300, 4)).astype(np.float32)])
    for X, tensor_out in ((rng.random((300, 4)).astype(np.float32), False), (chunks, False),
                          (rng.random((300, 4)).astype(np.float32), True)):
        with pytest.raises(ValueError, match="out: expected an aligned array"):
            latentspace.encode(model, X, out=torch.from_numpy(out) if tensor_out else out)
    assert next(chunks).shape == (300, 4)  # the generator's chunk is still there


@pytest.mark.parametrize("batch_size", [None, 7])
def test_out_overlapping_X_is_refused(backend, rng, batch_size):
    model = _square_mlp()
    y = rng.random((300, 4)).astype(np.float32)
    before = y.copy()
    for X, out in [(y[:-1], y[1:]), (y[1:], y[:-1]), (y, y), (y[:10], y[5:15])]:
        with pytest.raises(ValueError, match="out: shares memory with X; pass a separate array"):
            latentspace.encode(model, X, out=out, batch_size=batch_size)
    t = torch.from_numpy(y)
    with pytest.raises(ValueError, match="out: shares memory with X"):
        latentspace.encode(model, t[:-1], out=t[1:], batch_size=batch_size)
    with pytest.raises(ValueError, match="out: shares memory with X"):
        latentspace.encode(model, y[:-1], out=t[1:], batch_size=batch_size)  # numpy X, a tensor over it
    np.testing.assert_array_equal(y, before)  # refused before anything was written
    # Disjoint rows of one buffer are fine.
    codes = latentspace.encode(model, y[:100], out=y[100:200], batch_size=batch_size)
    _close(codes, _torch64(model, before[:100]))
    # An iterable's chunks are checked as they arrive (rows of out written before then
    # hold codes, as after any error midway).
    with pytest.raises(ValueError, match=r"out: shares memory with X\[1\]"):
        latentspace.encode(model, iter([y[:5].copy(), y[5:10]]), out=y[:10], batch_size=batch_size)


def test_numpy_input_is_never_written_by_an_in_place_model(rng, tmp_path):
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2))  # torch: ReLU before any Linear
    x = _rows(rng, 6, 4)
    before = x.copy()
    expected = _torch64(model, before)
    _close(latentspace.encode(model, x), expected)
    np.testing.assert_array_equal(x, before)
    np.save(tmp_path / "x.npy", before)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r+")
    _close(latentspace.encode(model, mapped, batch_size=4), expected)
    del mapped
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), before)
    autoencoder = latentspace.Autoencoder(4, 2, hidden=(3,))
    autoencoder.encoder.insert(0, nn.ReLU(inplace=True))
    _close(latentspace.encode(autoencoder, x), _torch64(autoencoder, before, "encode"))
    np.testing.assert_array_equal(x, before)


def test_integer_buffers_do_not_set_the_input_dtype(rng):
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("keep", torch.tensor([0, 2, 4]))

        def forward(self, x):
            return x[:, self.keep]

    from latentspace.models.base import module_device_dtype

    assert module_device_dtype(Pick()) == (torch.device("cpu"), torch.float32)
    x = _rows(rng, 9, 6) * 3
    np.testing.assert_array_equal(latentspace.encode(Pick(), x), x[:, [0, 2, 4]])  # not truncated to integers


def test_nan_weights_on_the_torch_backend_are_refused(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), _TorchOnly(), nn.Linear(8, 3))  # torch: _TorchOnly
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    x = _rows(rng, 10, 16)
    message = (r"model: Sequential gave codes containing NaN or Inf for X's row 0, a finite row: its weights "
               r"contain NaN or Inf \(a diverged training run\?\)")
    with pytest.raises(ValueError, match=message):
        latentspace.encode(model, x)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # FakeMlpEncoder
def test_codes_beyond_float32_are_refused(backend, rng):
    """A model whose computation overflows float32 on finite rows (here row 3): refused by
    encode as add_encoded refuses such codes, on either backend."""
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = np.ones((6, 4), dtype=np.float32)
    x[3] = 1e20
    with pytest.raises(ValueError, match="model: Sequential gave codes containing NaN or Inf for X's row 3"):
        latentspace.encode(model, x, batch_size=2)
    with pytest.raises(ValueError, match=r"for X's row 3 \(row 1 of chunk X\[1\]\), a finite row"):
        latentspace.encode(model, iter([x[:2], x[2:]]))
    index = latentspace.FlatIndex(2)
    with pytest.raises(ValueError, match="model: Sequential gave codes containing NaN or Inf for X's row 3"):
        index.add_encoded(model, x)
    assert index.ntotal == 0


def test_float64_model_overflowing_float32_codes_is_refused(rng):
    model = nn.Sequential(nn.Linear(16, 3)).double()  # torch: float64 weights
    with torch.no_grad():
        model[0].weight.mul_(1e300)
    with pytest.raises(ValueError, match="model: Sequential gave codes containing NaN or Inf for X's row 0"):
        latentspace.encode(model, _rows(rng, 5, 16))


def test_float16_model_names_its_dtype_when_rows_overflow_it(rng):
    model = nn.Sequential(nn.Linear(16, 4), nn.Dropout(0.0)).half()
    x = _rows(rng, 5, 16)
    x[2] *= 1e5  # fits float32, not float16
    with pytest.raises(ValueError, match=r"X: row 2 contains NaN or Inf \(or a value too large for float16, "
                                         r"the model's dtype\)"):
        latentspace.encode(model, x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_weight_norm_model_is_copied_and_snapshotted(rng):
    torch.manual_seed(0)
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(16, 3)), nn.Tanh())
    x = _rows(rng, 7, 16)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and "forward hooks" in encoder.reason
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()  # (deepcopy, as _torch64 does, fails here)
    _close(encoder.encode(x), expected)
    with torch.no_grad():
        model[0].weight_g.mul_(3.0)
    _close(encoder.encode(x), expected)  # the snapshot: the caller's model changed, not the copy


def test_a_model_that_cannot_be_copied_is_named():
    import threading

    model = nn.Sequential(nn.Linear(4, 2), _TorchOnly())
    model.lock = threading.Lock()
    with pytest.raises(TypeError, match="model: the torch backend runs a private copy of the model .* this "
                                        "Sequential cannot be copied with copy.deepcopy"):
        latentspace.Encoder(model)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i4", ">f2"])
def test_big_endian_input(backend, autoencoder, rng, dtype):
    x = (rng.standard_normal((9, 10)) * 4).astype(dtype)
    _close(latentspace.encode(autoencoder, x, batch_size=4), _torch64(autoencoder, x.astype(np.float32), "encode"))


def test_big_endian_input_to_a_torch_only_module(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4), _TorchOnly())
    x = _rows(rng, 5, 16)
    _close(latentspace.encode(model, x.astype(">f4")), _torch64(model, x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_zero_input_linear_runs_on_torch(rng):
    model = nn.Sequential(nn.Linear(0, 3))
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and "layer 0 is nn.Linear(0, 3)" in encoder.reason
    with torch.no_grad():
        expected = model(torch.empty(4, 0)).numpy()
    np.testing.assert_array_equal(encoder.encode(np.empty((4, 0), np.float32)), expected)


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                                (True, TypeError), ("8", TypeError)])
def test_bad_batch_size(backend, autoencoder, batch_size, error):
    with pytest.raises(error, match="batch_size: expected an integer >= 1"):
        latentspace.encode(autoencoder, np.zeros((3, 10)), batch_size=batch_size)


def test_numpy_integer_batch_size(backend, autoencoder, rng):
    x = _rows(rng, 9, 10)
    _close(latentspace.encode(autoencoder, x, batch_size=np.int64(2)), _torch64(autoencoder, x, "encode"))


def test_unpickled_float32_arrays_reach_the_native_encoder(autoencoder, rng):
    # An unpickled array (one received from another process) has a float32 dtype equal to,
    # but not the same object as, np.dtype(np.float32); the native binding compared identity
    # and refused X and out with "x: expected dtype float32, got float32".
    import pickle

    x = pickle.loads(pickle.dumps(_rows(rng, 20, 10)))
    out = pickle.loads(pickle.dumps(np.zeros((20, 3), np.float32)))
    assert x.dtype == np.float32 and x.dtype is not np.dtype(np.float32)
    encoder = latentspace.Encoder(autoencoder)
    assert encoder.backend == "native"
    expected = encoder.encode(np.array(x, dtype=np.float32))
    np.testing.assert_array_equal(encoder.encode(x), expected)
    assert encoder.encode(x, out=out) is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("torch_only", [False, True], ids=["native", "torch"])
def test_an_encoder_can_be_pickled_and_deep_copied(torch_only, autoencoder, rng):
    # The native object cannot be pickled: an Encoder inside anything deep-copied, or sent to
    # worker processes, failed with "cannot pickle 'latentspace._native.MlpEncoder' object".
    import pickle

    if torch_only:  # not exportable: the torch backend
        autoencoder.encoder.append(_TorchOnly())
    encoder = latentspace.Encoder(autoencoder)
    assert encoder.backend == ("torch" if torch_only else "native")
    x = _rows(rng, 20, 10)
    expected = encoder.encode(x)
    for clone in (pickle.loads(pickle.dumps(encoder)), copy.deepcopy(encoder)):
        assert (clone.backend, clone.kernel, clone.latent_dim) == (encoder.backend, encoder.kernel, 3)
        np.testing.assert_array_equal(clone.encode(x), expected)


@pytest.mark.parametrize("progress", ["no", None, 0])
def test_a_progress_flag_that_is_not_a_bool_is_named(backend, autoencoder, progress):
    # "no" showed a bar (any truthy value did), None and 0 silently hid it
    with pytest.raises(TypeError, match="progress: expected True or False"):
        latentspace.encode(autoencoder, np.zeros((3, 10)), progress=progress)


def test_an_hdf5_dataset_is_named_with_the_fix(backend, autoencoder, rng, tmp_path):
    # An array-like that is not numpy or torch (h5py.Dataset, zarr) was iterated as chunks,
    # its rows one by one, and refused as "X[0]: expected shape (n, 10), got (10,) (for one
    # sample use x.reshape(1, -1))": advice about a chunk the caller never passed.
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "rows.h5", "w") as f:
        f["x"] = _rows(rng, 6, 10)
        with pytest.raises(TypeError, match=r"X: a Dataset of shape \(6, 10\) is neither a numpy array nor a torch "
                                            r"tensor.*np.asarray\(X\)"):
            latentspace.encode(autoencoder, f["x"])


def test_masked_entries_are_refused_by_name(backend, autoencoder, rng):
    # np.asarray (and the buffer the native encoder reads) keeps a masked entry's hidden
    # value and drops the mask: the codes would silently use values the caller masked out.
    x = _rows(rng, 6, 10)
    masked = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
    _close(latentspace.encode(autoencoder, masked), _torch64(autoencoder, x, "encode"))  # no entry masked: fine
    masked[4, 2] = np.ma.masked
    with pytest.raises(TypeError, match=r"X: a masked array with masked entries \(its mask would be ignored\)"):
        latentspace.encode(autoencoder, masked)
    with pytest.raises(TypeError, match=r"X\[1\]: a masked array with masked entries"):
        latentspace.encode(autoencoder, iter([x, masked]))


def test_a_ragged_chunk_is_named(backend, autoencoder):
    with pytest.raises(ValueError, match=r"X\[1\]: a list or tuple is read as one array and this one is not"):
        latentspace.encode(autoencoder, iter([np.zeros((2, 10)), [[0.0] * 10, [0.0] * 9]]))


@pytest.mark.parametrize("activation, torch_runs_it", [(nn.LeakyReLU(float("nan")), True), (nn.LeakyReLU(1e40), False),
                                                      (nn.ELU(float("inf")), True)],
                         ids=["leaky-nan", "leaky-beyond-float32", "elu-inf"])
def test_activation_parameter_float32_cannot_hold_runs_on_torch(activation, torch_runs_it, rng):
    # The native encoder refused it with its own argument name ("activation_params[0]"), which
    # the caller never passed; torch runs such a model (its codes checked like any other's).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 3), activation)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "torch" and "layer 0's" in encoder.reason
    if not torch_runs_it:  # in float32 torch refuses it too ("cannot be converted ... without overflow")
        return
    x = np.abs(_rows(rng, 4, 10))
    with torch.no_grad():
        positive = model[0](torch.from_numpy(x)) > 0
    rows = positive.all(dim=1).numpy()
    if rows.any():  # rows whose pre-activations are all positive never meet the parameter
        _close(encoder.encode(x[rows]), _torch64(model[:1], x[rows]))


def test_a_model_with_uninitialised_lazy_parameters_is_named(rng):
    # The private copy initialised its own random weights on the first chunk: codes from
    # weights the caller's model never has (its own are drawn later, differently).
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    with pytest.raises(ValueError, match=r"model: it has uninitialised \(lazy\) parameters"):
        latentspace.Encoder(model)


def test_a_model_on_the_meta_device_is_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(10, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"model: its parameters are on the 'meta' device"):
        latentspace.Encoder(model)


def test_public_api_is_lazy_and_encode_stays_a_function():
    import subprocess
    import sys

    code = ("import sys, latentspace as ls; assert 'torch' not in sys.modules; "
            "import latentspace.encoding; assert callable(ls.encode) and "
            "ls.encode.__module__ == 'latentspace.encoding' and ls.Encoder.__name__ == 'Encoder'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------------------------------
# The native encoder itself (runs once the build has _native.MlpEncoder)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_native_matches_torch_forward(activation, depth, rng):
    torch.manual_seed(10 + depth)
    shift = list(ACTIVATIONS).index(activation) + 1
    model = _sequential(activation, depth, shift).eval()
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native", encoder.reason
    for rows in (1, 7, 1024):
        x = _rows(rng, rows, encoder.input_shape[0], scale=2.0)
        _assert_float32_exact(encoder.encode(x), model, x)


@pytest.mark.parametrize("make", [
    lambda: latentspace.Autoencoder(97, 8, hidden=(130, 3), activation="elu"),
    lambda: latentspace.VAE(97, 5, hidden=(64,), activation="leaky_relu"),
])
def test_native_models_match_their_encode(make, rng):
    torch.manual_seed(0)
    model = make().eval()
    x = rng.random((333, 97)).astype(np.float32)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native", encoder.reason
    _assert_float32_exact(encoder.encode(x, batch_size=100), model, x)


@pytest.mark.parametrize("whiten", [False, True])
def test_native_pca_matches_its_encode(whiten, rng):
    data = (rng.standard_normal((500, 130)) @ rng.standard_normal((130, 130)) + 3.0).astype(np.float32)
    pca = latentspace.PCA(9, whiten=whiten).fit(data)
    encoder = latentspace.Encoder(pca)
    assert encoder.backend == "native", encoder.reason
    _assert_float32_exact(encoder.encode(data), pca, data)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_native_bf16_follows_the_bf16_reference(activation, rng):
    torch.manual_seed(3)
    model = _sequential(activation, 3, 2).eval()
    encoder = latentspace.Encoder(model, precision="bf16")
    assert encoder.backend == "native" and encoder.precision == "bf16"
    x = _rows(rng, 257, encoder.input_shape[0])
    z = encoder.encode(x).astype(np.float64)
    spec = export_layers(model)
    low, exact = _reference_forward(spec, x, "bf16"), _reference_forward(spec, x)
    scale = np.abs(exact).max()
    # within a few bf16 steps of the bf16 reference (rounding order may differ), and
    # measurably closer to it than a float32 result would be where the two differ
    assert np.abs(z - low).max() <= 2e-2 * scale
    assert np.abs(z - exact).max() <= 4e-2 * scale


def test_native_reports_the_nonfinite_row_within_X(rng):
    torch.manual_seed(0)
    model = latentspace.Autoencoder(10, 3, hidden=(7,))
    x = _rows(rng, 300, 10)
    x[211, 4] = np.inf
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native"
    with pytest.raises(ValueError, match="X: row 211 contains NaN or Inf"):
        encoder.encode(x, batch_size=50)
    assert isinstance(encoder.kernel, str) and encoder.kernel


def test_the_native_default_batch_is_bounded_in_bytes_for_wide_inputs():
    # 65,536 rows of 20,000 float64 features converted to float32 took 5.2 GB at once: the
    # default batch holds at most NATIVE_BATCH_BYTES of float32 input, and stays 65,536 rows
    # up to 1,024 features.
    from latentspace import encoding

    for width, rows in ((64, 65536), (1024, 65536), (1025, 65472), (20_000, 3355)):
        encoder = latentspace.Encoder(nn.Sequential(nn.Linear(width, 2)))
        assert encoder.backend == "native"
        assert encoder.default_batch_size == rows
        assert rows * width * 4 <= encoding.NATIVE_BATCH_BYTES


def test_add_encoded_checks_progress_like_encode(autoencoder):
    index = latentspace.FlatIndex(autoencoder.latent_dim)
    with pytest.raises(TypeError, match="progress: expected True or False, got 'no'"):
        index.add_encoded(autoencoder, np.zeros((3, autoencoder.input_shape[0]), np.float32), progress="no")
    assert index.ntotal == 0


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ELU(), nn.LeakyReLU(0.1)])
def test_a_nan_made_inside_the_model_reaches_the_codes_check_as_under_torch(activation):
    """A finite row whose first layer overflows to inf, then inf - inf = NaN in the second:
    torch's ReLU / ELU / LeakyReLU keep the NaN, and so must the native activations, or the
    native backend returns a code of 0 where the torch backend refuses the row."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), activation, nn.Linear(2, 2, bias=False), copy.deepcopy(activation))
    with torch.no_grad():
        model[0].weight.fill_(3e38)
        model[2].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    x = np.ones((3, 2), np.float32)
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native"
    with pytest.raises(ValueError, match="model: Sequential gave codes containing NaN or Inf for X's row 0"):
        encoder.encode(x)
    with torch.no_grad():
        assert torch.isnan(model(torch.from_numpy(x))).all()  # torch's own answer


def test_the_progress_bar_of_an_iterable_into_out_knows_its_total(autoencoder, rng, capsys):
    """An iterable has no length, but the out it must fill exactly has: the bar shows
    "n/total" and a percentage, not a bare count."""
    chunks = [_rows(rng, n, 10) for n in (300, 200)]
    out = np.empty((500, 3), np.float32)
    latentspace.encode(autoencoder, iter(chunks), out=out, progress=True)
    bar = capsys.readouterr().err
    assert "500/500" in bar and "100%" in bar, bar
    latentspace.encode(autoencoder, iter(chunks), progress=True)  # no out: no total to show
    assert "100%" not in capsys.readouterr().err

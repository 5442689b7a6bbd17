"""The CUDA encoder's kernels (csrc/cuda/encode.cu, through _cuda_encoder.py and Encoder) against
float64 references, on a GPU.

Every test asks for the native CUDA encoder (LATENTSPACE_CUDA_ENCODER=native, the default since
GPU run 10, docs/gpu-runs.md), so that the environment cannot change what they test. Weights and inputs are
fresh random values each run, drawn from conftest's `rng` (its seed is printed; a failure
replays with LATENTSPACE_TEST_SEED=<seed>). Buffers the kernels write directly are poisoned
with NaN first, so an element they forget shows up.

Three kinds of reference:
* small integer data, where every sum is exact in float32 (and bfloat16 holds the data): the
  codes must equal float64's bit for bit, or within an ulp where a LayerNorm (computed in
  double, rounded once) comes last;
* random data: float32 codes within 4e-6 (about 34 float32 eps) of `scale`, per element: the
  size of the terms its float32 computation sums and of the errors it inherits, carried
  through the layers by _reference (a LayerNorm's 1 / sigma amplification, an activation's
  slope). The CPU native encoder's errors stay within 1 eps of it (its dry run: DEVICE); a
  wrong bias, layer, activation, transposition or misread input is off by far more;
* bf16: _bf16_reference (one layer: inputs and weights rounded, float32 sums), and deeper
  models against their layers run one by one.
Marked "cuda": skipped where torch sees no GPU (run with `pytest -m cuda`).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from scipy.special import erfc, expit
from torch import nn

import latentspace as ls
from latentspace._encode_stream import Source
from latentspace.encoding import NATIVE_BATCH_ROWS, export_layers
from latentspace.models.base import LatentModel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU"),
    pytest.mark.skipif(not ls.build_info()["cuda_compiled"], reason="latentspace was built without CUDA"),
]

# Where the Encoders run. Only the tests that hold on any device use it: pointing it at "cpu"
# runs them on the CPU native encoder, a dry run of the references and bounds without a GPU.
DEVICE = "cuda"
FLOAT32_BOUND = 4e-6
KERNELS = {"fp32": "cuda_simt", "bf16": "cuda_wmma_bf16"}

ACTIVATIONS = {
    "identity": lambda: None,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.07),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": lambda: nn.ELU(alpha=0.6),
}


@pytest.fixture(autouse=True)
def native_cuda_encoder(monkeypatch):
    monkeypatch.setenv("LATENTSPACE_CUDA_ENCODER", "native")


# ---------------------------------------------------------------------------------------
# Models, drawn from the test's rng

def _linear(rng, inputs: int, outputs: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.standard_normal((outputs, inputs)) / np.sqrt(inputs)))
        if bias:
            layer.bias.copy_(torch.from_numpy(0.3 * rng.standard_normal(outputs)))
    return layer


def _layer_norm(rng, width: int, affine: bool = True, bias: bool = True) -> nn.LayerNorm:
    norm = nn.LayerNorm(width, eps=float(rng.choice([1e-5, 1e-3])), elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(1 + 0.3 * rng.standard_normal(width)))
            if bias:
                norm.bias.copy_(torch.from_numpy(0.3 * rng.standard_normal(width)))
    return norm


def _blocks(rng, widths, activations, norms=None, leading_norm=False) -> list[nn.Sequential]:
    """One nn.Sequential per Linear layer widths[l] -> widths[l + 1]: the layer, then
    activations[l] (a name of ACTIVATIONS), with norms[l] None, "before" or "after" it (a
    LayerNorm; "before*" / "after*" without its affine terms); leading_norm: a LayerNorm
    over the input first."""
    norms = norms or [None] * len(activations)
    blocks = []
    for l, (name, norm) in enumerate(zip(activations, norms, strict=True)):
        width = widths[l + 1]
        modules = [_layer_norm(rng, widths[0])] if l == 0 and leading_norm else []
        modules.append(_linear(rng, widths[l], width, bias=l % 3 != 2))
        affine = norm is not None and not norm.endswith("*")
        activation = ACTIVATIONS[name]()
        stages = [] if activation is None else [activation]
        if norm is not None:
            stage = _layer_norm(rng, width, affine=affine, bias=affine and l % 2 == 0)
            stages.insert(0 if norm.startswith("before") else len(stages), stage)
        blocks.append(nn.Sequential(*modules, *stages))
    return blocks


def _mlp(rng, widths, activations, norms=None, leading_norm=False) -> nn.Sequential:
    return nn.Sequential(*[m for block in _blocks(rng, widths, activations, norms, leading_norm) for m in block])


def _rows(rng, n: int, d: int, scale: float = 1.5) -> np.ndarray:
    return (rng.standard_normal((n, d)) * scale).astype(np.float32)


def _integer_linear(rng, inputs: int, outputs: int, bias: bool = True) -> nn.Linear:
    """Weights in -3..3 and biases in -5..5: with small integer rows every product and sum is
    exact in float32 (and the weights and rows in bfloat16 too)."""
    layer = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.integers(-3, 4, (outputs, inputs)).astype(np.float64)))
        if bias:
            layer.bias.copy_(torch.from_numpy(rng.integers(-5, 6, outputs).astype(np.float64)))
    return layer


def _dyadic_layer_norm(rng, width: int, affine: bool = True, bias: bool = True) -> nn.LayerNorm:
    """A LayerNorm with eps 1e-3 (large enough to matter at the last bit) and weights and biases
    in steps of 1/8 (exact in float32)."""
    norm = nn.LayerNorm(width, eps=1e-3, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(1 + rng.integers(-4, 5, width) / 8))
            if bias:
                norm.bias.copy_(torch.from_numpy(rng.integers(-4, 5, width) / 8))
    return norm


def _integer_rows(rng, n: int, d: int) -> np.ndarray:
    return rng.integers(-4, 5, (n, d)).astype(np.float32)


def _host(z) -> np.ndarray:
    return z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)


# ---------------------------------------------------------------------------------------
# References

def _activate(name: str, z: np.ndarray, param: float) -> np.ndarray:
    """torch's activations in float64 (GELU's tanh form as sigmoid(2u) = (1 + tanh u) / 2)."""
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z < 0, param * z, z)
    if name == "gelu":
        return z * 0.5 * erfc(-z / np.sqrt(2.0))
    if name == "gelu_tanh":
        return z * expit(2.0 * np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return expit(z)
    if name == "silu":
        return z * expit(z)
    if name == "elu":
        return np.where(z > 0, z, param * np.expm1(np.minimum(z, 0.0)))
    raise AssertionError(f"unknown activation {name}")


def _layer_norm64(stage, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch.nn.LayerNorm in float64, and its output's error scale: y_j = w_j (h_j - mean) /
    sigma + b_j takes h_j's error and the mean's (at most the row's root-mean-square error r)
    divided by sigma, and sigma's relative error (at most r / sigma) times |w_j (h_j - mean) /
    sigma|; plus its own rounding."""
    width = h.shape[1]
    mean = h.mean(axis=1, keepdims=True)
    sigma = np.sqrt(h.var(axis=1, keepdims=True) + stage.eps)
    normed = (h - mean) / sigma
    weight = np.ones(width) if stage.weight is None else stage.weight.astype(np.float64)
    bias = np.zeros(width) if stage.bias is None else stage.bias.astype(np.float64)
    y = normed * weight + bias
    rms = np.sqrt((scale**2).mean(axis=1, keepdims=True))
    return y, (np.abs(weight) * (scale + rms) + np.abs(normed * weight) * rms) / sigma + np.abs(y)


def _reference(spec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exported layers in float64 (z = layers(input_norm(x) - input_offset)), and per code
    the scale of a float32 computation's error (module docstring)."""
    h = np.asarray(x, dtype=np.float64)
    scale = np.zeros_like(h)  # the float32 rows are exact
    if spec.input_norm is not None:
        h, scale = _layer_norm64(spec.input_norm, h, scale)
    if spec.input_offset is not None:
        h = h - spec.input_offset.astype(np.float64)  # formed first: one rounding of the difference
        scale = scale + np.abs(h)
    for layer in spec.layers:
        weight = layer.weight.astype(np.float64)
        z = h @ weight.T
        if layer.bias is not None:
            z = z + layer.bias.astype(np.float64)
        # the products' and sums' rounding (at most about eps32 of the summed magnitudes), the
        # inputs' errors carried through the weights (as root-sum-square: they are not of one
        # sign), the bias's addition
        scale = np.abs(h) @ np.abs(weight).T + np.sqrt(scale**2 @ (weight**2).T) + np.abs(z)
        if layer.norm is not None and not layer.norm_after_activation:
            z, scale = _layer_norm64(layer.norm, z, scale)
        y = _activate(layer.activation, z, layer.param)
        scale = max(1.2, abs(layer.param)) * scale + np.abs(y)  # every activation's slope is at most 1.13 or |param|
        if layer.norm is not None and layer.norm_after_activation:
            y, scale = _layer_norm64(layer.norm, y, scale)
        h = y
    return h, scale


def _float64_codes(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's own encode (forward) in float64 on the CPU."""
    twin = copy.deepcopy(model).cpu().double().eval()
    with torch.no_grad():
        rows = torch.from_numpy(np.asarray(x, dtype=np.float64))
        codes = twin.encode(rows) if isinstance(twin, LatentModel) else twin(rows)
    return codes.numpy()


def _expected(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale) from the exported layers, checked first against the model's own float64
    forward (the export only rounds folded weights to float32)."""
    codes, scale = _reference(export_layers(model), x)
    own = _float64_codes(model, x)
    assert np.all(np.abs(own - codes) <= 1e-6 * scale + 1e-12), "the two float64 references disagree"
    return codes, scale


def _assert_within(actual, expected: np.ndarray, bound: np.ndarray, what: str = "codes") -> None:
    actual = _host(actual).astype(np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = np.abs(actual - expected)
    fine = error <= bound  # False for NaN
    if not fine.all():
        worst = np.unravel_index(np.argmax(np.where(fine, 0, 1) + np.nan_to_num(error / bound, nan=np.inf)),
                                 error.shape)
        raise AssertionError(f"{what}: {int((~fine).sum())} elements off; element {worst}: got {actual[worst]!r}, "
                             f"float64 {expected[worst]!r}, allowed error {bound[worst]:.3g}")


def _assert_float32_codes(actual, model, x) -> None:
    expected, scale = _expected(model, x)
    _assert_within(actual, expected, FLOAT32_BOUND * scale + 1e-30)


def _bf16(a) -> np.ndarray:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def _bf16_reference(spec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One exported layer under the bf16 contract, and the allowed error: the layer's input
    (x minus the offset, formed in float32 as the kernel stages it) and weights rounded to
    bfloat16 (to nearest even), the products (exact in float32: 8-bit significands) summed in
    float32, then bias and activation in float32. The sum here is float64; the tensor cores'
    float32 sums round (or truncate) about once per 16-deep step, well within
    (8 + depth / 2) eps32 of the summed magnitudes; the bias, the activation and the store add
    a few eps32 of the values. A rounding skipped, or done before the offset, is off by
    ~2^-9 of the magnitudes; anything worse by far more."""
    (layer,) = spec.layers
    assert spec.input_norm is None and layer.norm is None
    h = np.asarray(x, dtype=np.float32)
    if spec.input_offset is not None:
        h = h - spec.input_offset  # float32 arithmetic
    a, w = _bf16(h), _bf16(layer.weight)
    z = a @ w.T
    if layer.bias is not None:
        z = z + layer.bias.astype(np.float64)
    y = _activate(layer.activation, z, layer.param)
    eps32 = 2.0**-24
    sums = np.abs(a) @ np.abs(w).T
    slope = max(1.2, abs(layer.param))
    bound = eps32 * (slope * ((8 + a.shape[1] / 2) * sums + 4 * np.abs(z)) + 8 * np.abs(y)) + 1e-30
    return y, bound


# ---------------------------------------------------------------------------------------
# Which encoder, which kernel

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_exported_model_gets_the_cuda_kernels(rng, precision):
    model = _mlp(rng, (13, 40, 6), ["gelu", "identity"])
    encoder = ls.Encoder(model, device="cuda", precision=precision)
    assert encoder.backend == "native" and encoder.reason is None
    assert encoder.kernel == KERNELS[precision] and encoder._native.kernel == KERNELS[precision]
    assert encoder.device == torch.device("cuda", torch.cuda.current_device())
    assert 1 <= encoder.default_batch_size <= NATIVE_BATCH_ROWS
    assert encoder._native.workspace_bytes_per_row == 4 * encoder._native.native.workspace_floats(1) > 0
    on_the_gpu = ls.Encoder(copy.deepcopy(model).cuda(), precision=precision)  # device None: the model's
    assert (on_the_gpu.backend, on_the_gpu.kernel, on_the_gpu.device.type) == ("native", KERNELS[precision], "cuda")


def test_a_latentspace_autoencoder_on_the_gpu(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = ls.Autoencoder(64, 4, hidden=(32,)).eval()
    x = _rows(rng, 300, 64)
    encoder = ls.Encoder(model.cuda())
    assert encoder.backend == "native" and encoder.kernel == "cuda_simt"
    _assert_float32_codes(encoder.encode(x), model.cpu(), x)


# ---------------------------------------------------------------------------------------
# float32 codes against float64

@pytest.mark.parametrize("rows", [1, 65, 129, 1000])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_activation(rng, activation, rows):
    """13 inputs (not a multiple of 4: the unaligned loads), a hidden layer of 200 outputs (two
    float32 tiles, the second partial) and 70 codes, the activation after both layers (the
    last one's runs in the kernel that stores the codes)."""
    model = _mlp(rng, (13, 200, 70), [activation, activation])
    x = _rows(rng, rows, 13)
    z = ls.Encoder(model, device=DEVICE).encode(x)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    _assert_float32_codes(z, model, x)


@pytest.mark.parametrize("depth, width, rows", [(13, 5, 1), (16, 64, 63), (17, 65, 128), (100, 130, 129),
                                                (64, 300, 257), (1001, 7, 65), (20, 32, 130), (36, 33, 129)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_integer_data_is_exact(rng, precision, depth, width, rows):
    """Small integers: every product and sum is exact (in bfloat16 too, which holds the rows
    and weights exactly), so the codes must equal the float64 ones bit for bit, whatever the
    order of the sums: any misplaced, missed or doubled term shows. float32 runs two layers
    (hidden values beyond bfloat16's integers), bf16 one."""
    if precision == "fp32":
        model = nn.Sequential(_integer_linear(rng, depth, width), nn.ReLU(), _integer_linear(rng, width, 6))
    else:
        model = nn.Sequential(_integer_linear(rng, depth, width), nn.ReLU())
    x = _integer_rows(rng, rows, depth)
    expected, _ = _reference(export_layers(model), x)
    np.testing.assert_array_equal(ls.Encoder(model, device=DEVICE, precision=precision).encode(x), expected)


# Linear layers on small integers (exact sums) around LayerNorms: the LayerNorm, computed in
# double and rounded once, must come within one float32 ulp of float64.
EXACT_NORM_MODELS = {
    "before": lambda rng: nn.Sequential(_integer_linear(rng, 20, 37), _dyadic_layer_norm(rng, 37), nn.ReLU()),
    "before, no bias": lambda rng: nn.Sequential(_integer_linear(rng, 20, 37), _dyadic_layer_norm(rng, 37, bias=False),
                                                 nn.Tanh()),
    "after": lambda rng: nn.Sequential(_integer_linear(rng, 20, 37), nn.ReLU(), _dyadic_layer_norm(rng, 37)),
    "after, no affine": lambda rng: nn.Sequential(_integer_linear(rng, 20, 130), nn.ReLU(),
                                                  _dyadic_layer_norm(rng, 130, affine=False)),
    "leading": lambda rng: nn.Sequential(_dyadic_layer_norm(rng, 20), _identity_linear(20)),
}


def _identity_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(width))
    return layer


@pytest.mark.parametrize("case, precision", [(case, precision) for precision in ("fp32", "bf16")
                                             for case in EXACT_NORM_MODELS if (case, precision) != ("leading", "bf16")])
def test_layer_norms_to_the_last_bit(rng, case, precision):
    """(tanh adds its few ulps. bf16 rounds a leading norm's output before the products: that
    case runs in float32 only; elsewhere the norms see exact sums in both precisions.)"""
    model = EXACT_NORM_MODELS[case](rng)
    x = _integer_rows(rng, 129, 20)
    expected, _ = _reference(export_layers(model), x)
    ulps = 4 if "no bias" in case else 1
    bound = ulps * np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    _assert_within(ls.Encoder(model, device=DEVICE, precision=precision).encode(x), expected, bound)


@pytest.mark.parametrize("norms, leading", [
    (["before", "after", None], False),
    (["after", None, "before"], True),
    (["before*", "after*", "after"], True),  # without the affine terms
    ([None, None, None], True),  # only the input's
])
def test_layer_norms(rng, norms, leading):
    model = _mlp(rng, (24, 150, 37, 9), ["gelu", "silu", "tanh"], norms, leading_norm=leading)
    spec = export_layers(model)
    assert (spec.input_norm is not None) == leading
    x = _rows(rng, 333, 24, scale=3.0) + 2.0  # rows with a mean the leading norm removes
    _assert_float32_codes(ls.Encoder(model, device=DEVICE).encode(x, batch_size=100), model, x)


@pytest.mark.parametrize("dim", [37, 64])
@pytest.mark.parametrize("whiten", [False, True])
def test_pca_subtracts_the_mean_before_the_products(rng, dim, whiten):
    """Data 1e4 away from the origin: the bound is relative to |x - mean|, so forming x W^T and
    mean W^T apart (each ~1e4, cancelling) would be caught."""
    data = _rows(rng, 500, dim) + np.float32(1e4)
    pca = ls.PCA(7, whiten=whiten).fit(data)
    assert export_layers(pca).input_offset is not None
    x = _rows(rng, 200, dim) + np.float32(1e4)
    _assert_float32_codes(ls.Encoder(pca, device=DEVICE).encode(x), pca, x)


@pytest.mark.parametrize("depth, width", [(1, 1), (3, 65), (4, 64), (16, 129), (17, 128), (64, 300), (1000, 130),
                                          (1001, 7), (8, 31), (20, 32), (21, 33)])
@pytest.mark.parametrize("rows", [1, 63, 128, 257])
def test_depths_widths_and_rows(rng, depth, width, rows):
    """Depths that are multiples of 4 (16-byte loads) and not, of 16 (whole staging steps) and
    not; widths around the tiles (64 bf16, 128 float32, and 32: float32 layers of at most 32
    outputs run the narrow tile); rows around them too."""
    model = _mlp(rng, (depth, width, 5), ["elu", "identity"])
    x = _rows(rng, rows, depth)
    _assert_float32_codes(ls.Encoder(model, device=DEVICE).encode(x), model, x)


def test_many_layers(rng):
    """Six layers: the hidden activations ping-pong between two buffers of the widest hidden
    layer (260), each layer reading the one the previous wrote, narrower and wider in turn."""
    widths = (19, 300, 7, 150, 33, 260, 5)
    model = _mlp(rng, widths, ["relu", "gelu_tanh", "leaky_relu", "sigmoid", "elu", "identity"],
                 [None, "after", None, "before", None, None])
    x = _rows(rng, 333, 19)
    encoder = ls.Encoder(model, device=DEVICE)
    _assert_float32_codes(encoder.encode(x, batch_size=200), model, x)


def test_no_rows(rng):
    model = _mlp(rng, (6, 9, 3), ["tanh", "identity"])
    encoder = ls.Encoder(model, device="cuda")
    z = encoder.encode(np.empty((0, 6), np.float32))
    assert isinstance(z, np.ndarray) and z.shape == (0, 3)
    zt = encoder.encode(torch.empty((0, 6), device="cuda"))
    assert zt.shape == (0, 3) and zt.device.type == "cuda"
    encoder._native.encode(torch.empty((0, 6), device="cuda"), torch.empty((0, 3), device="cuda"))  # launches nothing
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# Inputs and outputs on the GPU

@pytest.mark.parametrize("depth", [16, 13])
def test_a_cuda_input_that_starts_off_16_bytes(rng, depth):
    """A contiguous CUDA slice whose first row starts 4 bytes past a 16-byte boundary is used as
    it is (no copy): the kernels must not take the 16-byte loads for it, even when the depth
    is a multiple of 4."""
    model = _mlp(rng, (depth, 70, 6), ["gelu", "identity"])
    x = _rows(rng, 150, depth)
    storage = torch.zeros(150 * depth + 1, device="cuda")
    storage[1:] = torch.from_numpy(x.reshape(-1)).cuda()
    sliced = storage[1:].view(150, depth)
    assert sliced.is_contiguous() and sliced.data_ptr() % 16 == 4
    z = ls.Encoder(model, device="cuda").encode(sliced)
    assert isinstance(z, torch.Tensor) and z.device == sliced.device
    _assert_float32_codes(z, model, x)


def test_numpy_in_numpy_out_and_cuda_tensors_in_tensors_out(rng):
    index = torch.cuda.device_count() - 1  # the last GPU: not the current one where there are several
    model = _mlp(rng, (10, 33, 4), ["silu", "identity"])
    encoder = ls.Encoder(model, device=f"cuda:{index}")
    assert encoder.device == torch.device("cuda", index)
    x = _rows(rng, 210, 10)
    z = encoder.encode(x, batch_size=64)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    _assert_float32_codes(z, model, x)
    for tensor in (torch.from_numpy(x).to(f"cuda:{index}"), torch.from_numpy(x).double().to(f"cuda:{index}"),
                   torch.from_numpy(np.ascontiguousarray(np.repeat(x, 2, axis=1))).to(f"cuda:{index}")[:, ::2]):
        zt = encoder.encode(tensor, batch_size=64)
        assert isinstance(zt, torch.Tensor) and zt.device == tensor.device and zt.dtype == torch.float32
        _assert_float32_codes(zt, model, x)
    zc = encoder.encode(torch.from_numpy(x))  # a CPU tensor comes back on the CPU
    assert isinstance(zc, torch.Tensor) and zc.device.type == "cpu"
    _assert_float32_codes(zc, model, x)


def test_a_negated_view_is_read_as_its_values(rng):
    """torch's lazy negation leaves the memory un-negated: the kernels read memory by address,
    so they must get the values (a copy), not the memory."""
    model = _mlp(rng, (8, 20, 3), ["tanh", "identity"])
    x = _rows(rng, 50, 8)
    negated = torch._neg_view(torch.from_numpy(-x).cuda())
    assert negated.is_neg()
    _assert_float32_codes(ls.Encoder(model, device="cuda").encode(negated), model, x)


class _PoisonedRows:
    """A Destination (encoding._encode_to, as FlatIndex.add_encoded uses it) whose blocks are
    rows of one CUDA tensor filled with NaN first: each chunk's codes are written straight
    into its block, which starts wherever the previous one ended."""

    def __init__(self, rows: int, dim: int):
        self.buffer = torch.full((rows, dim), float("nan"), device="cuda")

    def reserve(self, start: int, rows: int, dim: int) -> torch.Tensor:
        return self.buffer[start : start + rows]

    def finish(self, rows: int, dim: int | None) -> torch.Tensor:
        return self.buffer


@pytest.mark.parametrize("latent", [5, 8])  # blocks that start off 16 bytes (5) or on them (8)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_output_element_is_written(rng, latent, precision):
    """Into a NaN-poisoned tensor, through CudaEncoder.encode directly and through the path
    FlatIndex.add_encoded takes (chunks of 37 rows written into one device buffer). Integer
    data (hidden values up to 149: exact in bfloat16 too) makes the codes exact in both
    precisions."""
    model = nn.Sequential(_integer_linear(rng, 12, 130), nn.ReLU(), _integer_linear(rng, 130, latent))
    x = _integer_rows(rng, 301, 12)
    expected, _ = _reference(export_layers(model), x)
    encoder = ls.Encoder(model, device="cuda", precision=precision)
    out = torch.full((301, latent), float("nan"), device="cuda")
    encoder._native.encode(torch.from_numpy(x).cuda(), out)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(_host(out), expected)
    destination = _PoisonedRows(301, latent)
    codes = encoder._encode_to(Source(x, encoder._sample_shapes), destination, 37, False)
    assert codes is destination.buffer
    np.testing.assert_array_equal(_host(codes), expected)


@pytest.mark.parametrize("kind", ["numpy", "cpu tensor"])
def test_out_is_filled(rng, kind):
    model = _mlp(rng, (12, 40, 7), ["gelu", "identity"])
    x = _rows(rng, 99, 12)
    out = np.full((99, 7), np.nan, np.float32)
    out = torch.from_numpy(out) if kind == "cpu tensor" else out
    encoder = ls.Encoder(model, device="cuda")
    assert encoder.encode(torch.from_numpy(x).cuda(), out=out, batch_size=40) is out
    _assert_float32_codes(out, model, x)


@pytest.mark.parametrize("inputs", ["cuda tensor", "numpy", "chunks"])
def test_out_on_the_gpu_is_written_in_place(rng, inputs):
    """A CUDA out on the work's device is the kernels' own destination (its rows written
    directly, chunk by chunk): poisoned first, so a row left unwritten shows; the rows around
    it (out is a slice of a bigger tensor) are untouched."""
    model = _mlp(rng, (12, 40, 7), ["gelu", "identity"])
    x = _rows(rng, 99, 12)
    whole = torch.full((101, 7), float("nan"), device="cuda")
    out = whole[1:100]
    X = {"cuda tensor": torch.from_numpy(x).cuda(), "numpy": x,
         "chunks": iter([torch.from_numpy(x[:30]).cuda(), torch.from_numpy(x[30:]).cuda()])}[inputs]
    encoder = ls.Encoder(model, device="cuda")
    assert encoder.backend == "native"
    assert encoder.encode(X, out=out, batch_size=40) is out
    _assert_float32_codes(out, model, x)
    assert torch.isnan(whole[0]).all() and torch.isnan(whole[100]).all()


def test_out_on_another_device_or_the_cpu_encoder_gets_the_codes_copied(rng):
    """The CPU encoder (and a CUDA out on another GPU than the work's) writes a CUDA out
    through a copy of each chunk's codes: the same codes as a new result."""
    model = _mlp(rng, (12, 40, 7), ["tanh", "identity"])
    x = _rows(rng, 77, 12)
    out = torch.full((77, 7), float("nan"), device="cuda")
    assert ls.Encoder(model, device="cpu").encode(x, out=out, batch_size=30) is out
    np.testing.assert_array_equal(_host(out), ls.Encoder(model, device="cpu").encode(x, batch_size=30))
    if torch.cuda.device_count() > 1:
        other = torch.full((77, 7), float("nan"), device="cuda:1")
        assert ls.Encoder(model, device="cuda:0").encode(x, out=other, batch_size=30) is other
        _assert_float32_codes(other, model, x)


def test_a_bad_out_on_the_gpu_is_refused_before_anything_runs(rng):
    encoder = ls.Encoder(_mlp(rng, (4, 3), ["identity"]), device="cuda")
    x = torch.zeros((5, 4), device="cuda")
    cases = [
        (torch.zeros((5, 3), device="cuda", dtype=torch.float64), TypeError, "out: expected float32, got torch.float64"),
        (torch.zeros((5, 4), device="cuda"), ValueError, r"out: expected shape \(5, 3\), got \(5, 4\)"),
        (torch.zeros((3, 5), device="cuda").T, ValueError, "non-contiguous"),
        (torch.zeros((5, 3), device="cuda", requires_grad=True), ValueError, "does not require grad"),
        (torch.zeros((5, 3), device="cuda")._neg_view(), ValueError, "negated view"),
    ]
    for out, error, message in cases:
        with pytest.raises(error, match=message):
            encoder.encode(x, out=out)


def test_an_out_overlapping_X_on_the_gpu_is_refused(rng):
    """Its codes would overwrite rows not yet read (the check is by the bounds each occupies,
    as on the host)."""
    model = _mlp(rng, (4, 4), ["identity"])
    y = torch.from_numpy(_rows(rng, 300, 4)).cuda()
    before = y.clone()
    encoder = ls.Encoder(model, device="cuda")
    for X, out in [(y[:-1], y[1:]), (y[1:], y[:-1]), (y, y)]:
        with pytest.raises(ValueError, match="out: shares memory with X; pass a separate tensor"):
            encoder.encode(X, out=out, batch_size=64)
    assert torch.equal(y, before)  # refused before anything was written
    _assert_float32_codes(encoder.encode(y[:100], out=y[100:200]), model, _host(before[:100]))


def test_a_stream_other_than_the_default(rng):
    """The kernels run on the caller's current stream: here the input is written on stream s
    after a long sleep, so kernels queued on any other stream would read the zeros it held."""
    model = _mlp(rng, (32, 96, 8), ["silu", "identity"])
    encoder = ls.Encoder(model, device="cuda")
    x = _rows(rng, 2000, 32)
    source = torch.from_numpy(x).cuda()
    rows = torch.zeros_like(source)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the rows arrive
        rows.copy_(source)
        z = encoder.encode(rows)
    s.synchronize()
    _assert_float32_codes(z, model, x)
    # An Encoder built while another stream is current (its weights uploaded there) encodes on s.
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda._sleep(200_000_000)
        late = ls.Encoder(model, device="cuda")
    with torch.cuda.stream(s):
        z = late.encode(source)
    s.synchronize()
    _assert_float32_codes(z, model, x)


# ---------------------------------------------------------------------------------------
# bf16

@pytest.mark.parametrize("depth, width", [(13, 5), (16, 64), (100, 65), (33, 200)])
@pytest.mark.parametrize("activation", ["identity", "gelu", "elu", "sigmoid"])
def test_bf16_rounds_inputs_and_weights_and_sums_in_float32(rng, depth, width, activation):
    model = _mlp(rng, (depth, width), [activation])
    x = _rows(rng, 150, depth)
    expected, bound = _bf16_reference(export_layers(model), x)
    _assert_within(ls.Encoder(model, device=DEVICE, precision="bf16").encode(x), expected, bound)


@pytest.mark.parametrize("dim", [37, 64])
def test_bf16_rounds_x_minus_the_mean(rng, dim):
    """PCA with data 1e3 away from the origin: rounding x to bfloat16 before subtracting the
    mean (bf16's spacing there is 4) would lose every digit."""
    pca = ls.PCA(6).fit(_rows(rng, 400, dim) + np.float32(1e3))
    x = _rows(rng, 150, dim) + np.float32(1e3)
    expected, bound = _bf16_reference(export_layers(pca), x)
    _assert_within(ls.Encoder(pca, device=DEVICE, precision="bf16").encode(x), expected, bound)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layers_compose_as_single_layer_encoders(rng, precision):
    """A deep model's codes equal, bit for bit, those of its layers run one by one as separate
    encoders (each block's codes, float32 on the device, fed to the next): the same kernels on
    the same float32 values, whether the hidden values sit in the workspace or in a tensor."""
    blocks = _blocks(rng, (21, 130, 70, 9, 40), ["gelu", "elu", "identity", "tanh"],
                     ["before", "after*", None, "after"], leading_norm=True)
    model = nn.Sequential(*[m for block in blocks for m in block])
    x = _rows(rng, 257, 21)
    z = ls.Encoder(model, device=DEVICE, precision=precision).encode(x)
    hidden = torch.from_numpy(x).to(DEVICE)
    for block in blocks:
        hidden = ls.Encoder(block, device=DEVICE, precision=precision).encode(hidden)
    np.testing.assert_array_equal(z, _host(hidden))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_same_codes_as_the_cpu_encoder(rng, precision):
    """float32: both within the float64 bound, so within twice it of each other. bf16: their
    float32 sums differ in order, so a hidden value may round to the neighbouring bfloat16
    in the next layer (2^-8 of itself): 2^-7 of the scale covers a few of those."""
    model = _mlp(rng, (30, 100, 64, 12), ["gelu", "relu", "identity"], ["before", None, None])
    x = _rows(rng, 400, 30)
    gpu = ls.Encoder(model, device="cuda", precision=precision).encode(x)
    cpu = ls.Encoder(model, device="cpu", precision=precision).encode(x)
    expected, scale = _expected(model, x)
    bound = (2 * FLOAT32_BOUND if precision == "fp32" else 2.0**-7) * scale + 1e-30
    _assert_within(gpu, cpu.astype(np.float64), bound, "GPU against CPU codes")
    if precision == "fp32":
        _assert_within(gpu, expected, FLOAT32_BOUND * scale + 1e-30)


# ---------------------------------------------------------------------------------------
# Bad rows, bad models

@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_row_is_named_with_its_chunk(rng, bad_value):
    """The first layer flags the row as it reads it (ReLU(-inf) = 0 would hide it in the codes)."""
    model = _mlp(rng, (8, 20, 3), ["relu", "identity"])
    encoder = ls.Encoder(model, device=DEVICE)
    x = _rows(rng, 300, 8)
    x[[171, 250], 3] = bad_value
    rows = torch.from_numpy(x).to(DEVICE)
    for X in (x, rows):
        with pytest.raises(ValueError, match=r"^X: row 171 contains NaN or Inf"):
            encoder.encode(X, batch_size=64)
    with pytest.raises(ValueError, match=r"^X: row 171 \(row 71 of chunk X\[1\]\) contains NaN or Inf"):
        encoder.encode(iter([rows[:100], rows[100:]]), batch_size=30)


def test_a_row_whose_difference_from_the_pca_mean_overflows_is_named(rng):
    """x - mean is formed while the first layer stages its inputs: a finite row whose
    difference from the mean overflows float32 is a bad row (the CPU encoder's words)."""
    pca = ls.PCA(3).fit(_rows(rng, 100, 8))
    with torch.no_grad():
        pca.mean.fill_(-3e38)
    x = np.zeros((40, 8), np.float32)
    x[17, 5] = 3e38
    for device in (DEVICE, "cpu"):
        with pytest.raises(ValueError, match=r"^X: row 17 contains NaN or Inf \(or a value too large for float32\)"):
            ls.Encoder(pca, device=device).encode(x)


def test_a_finite_row_that_overflows_names_the_model(rng):
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = rng.uniform(-1e-3, 1e-3, (200, 4)).astype(np.float32)
    x[133] = 1e10  # 4e40: beyond float32
    with pytest.raises(ValueError, match=r"^model: Sequential gave codes containing NaN or Inf for X's row 133, "
                                         r"a finite row"):
        ls.Encoder(model, device=DEVICE).encode(x, batch_size=50)


def test_a_nan_made_inside_the_model_passes_a_relu(rng):
    """inf - inf inside the model is NaN, and a ReLU keeps it (as torch's): the codes' check
    then names the model instead of returning the finite codes a NaN -> 0 ReLU would give."""
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
        model[1].weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = rng.uniform(0.5, 2.0, (70, 1)).astype(np.float32)
    x[42] = 1e10
    with pytest.raises(ValueError, match=r"^model: Sequential gave codes containing NaN or Inf for X's row 42"):
        ls.Encoder(model, device=DEVICE).encode(x)


# ---------------------------------------------------------------------------------------
# Pickling, indexes

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_pickled_encoder_is_rebuilt_on_its_device(rng, precision):
    model = _mlp(rng, (9, 30, 4), ["gelu", "identity"], ["after", None], leading_norm=True)
    encoder = ls.Encoder(model, device="cuda", precision=precision)
    x = _rows(rng, 120, 9)
    z = encoder.encode(x)
    for twin in (pickle.loads(pickle.dumps(encoder)), copy.deepcopy(encoder)):
        assert (twin.backend, twin.kernel, twin.device) == ("native", KERNELS[precision], encoder.device)
        assert twin._native is not encoder._native
        np.testing.assert_array_equal(twin.encode(x), z)  # the same kernels on the same weights


@pytest.mark.skipif(not ls.cuda_available(), reason="latentspace's CUDA search is not usable here")
@pytest.mark.parametrize("dim", [5, 8])
@pytest.mark.parametrize("iterable", [False, True])
def test_add_encoded_into_a_gpu_index(rng, dim, iterable):
    """The CUDA encoder writes each chunk's codes straight into the index's device buffer, after
    the rows already there (3: the first block starts off 16 bytes for dim 5)."""
    model = _mlp(rng, (20, 50, dim), ["tanh", "identity"])
    x = _rows(rng, 250, 20)
    index = ls.FlatIndex(dim, device="cuda")
    index.add(np.zeros((3, dim), np.float32))
    source = iter([x[:101], x[101:102], x[102:]]) if iterable else x
    assert index.add_encoded(model, source, batch_size=64, device="cuda") == 250
    vectors = index.vectors()
    assert vectors.shape == (253, dim) and not vectors[:3].any()
    _assert_float32_codes(vectors[3:], model, x)

"""The native MLP encoder (latentspace._native.MlpEncoder) against a float64 reference.

Every SIMD level, every activation, depths 1 to 4 with widths that reach the register tiles'
tails (1, 3, 97, 130) and the depth blocking (> 256 and > 512 inputs), row counts around the
96-row blocks, the bf16 precision, NaN reporting and bad arguments. The Python layer
(latentspace.encode) is tested in test_encode.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentspace
from latentspace import _native

ACTIVATIONS = {
    "identity": lambda x, p: x,
    "relu": lambda x, p: F.relu(x),
    "leaky_relu": lambda x, p: F.leaky_relu(x, p),
    "gelu": lambda x, p: F.gelu(x),
    "gelu_tanh": lambda x, p: F.gelu(x, approximate="tanh"),
    "tanh": lambda x, p: torch.tanh(x),
    "sigmoid": lambda x, p: torch.sigmoid(x),
    "silu": lambda x, p: F.silu(x),
    "elu": lambda x, p: F.elu(x, p),
}
PARAMETERS = {"leaky_relu": 0.13, "elu": 0.7}
SHAPES = [(5, 3), (97, 1, 130), (130, 97, 3, 40), (3, 17, 130, 64, 31), (600, 33), (1030, 40, 8)]


def make_layers(rng, dims, activation, bias=True):
    weights = [(rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32) for i, o in zip(dims[:-1], dims[1:])]
    biases = [rng.standard_normal(o).astype(np.float32) if bias else None for o in dims[1:]]
    activations = [activation] * len(weights)
    return weights, biases, activations, [PARAMETERS.get(activation, 0.0)] * len(weights)


def reference(x, weights, biases, activations, params, offset=None, bf16=False):
    """float64 forward; with bf16, weights and each layer's input rounded as the kernel does."""
    h = torch.from_numpy(x).double()
    if offset is not None:
        h = (torch.from_numpy(x) - torch.from_numpy(offset)).double()  # formed in float32, as the kernel
    for w, b, act, p in zip(weights, biases, activations, params):
        w = torch.from_numpy(w)
        if bf16:
            w, h = w.bfloat16(), h.float().bfloat16()
        h = h.double() @ w.double().T
        if b is not None:
            h = h + torch.from_numpy(b).double()
        h = ACTIVATIONS[act](h, p)
    return h.numpy()


def encode(encoder, x):
    out = np.full((x.shape[0], encoder.output_dim), np.nan, dtype=np.float32)  # poisoned
    encoder.encode(x, out)
    return out


def assert_close_to(out, ref, tolerance):
    scale = max(float(np.abs(ref).max()), 1e-30)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "-".join(map(str, d)))
def test_matches_float64_reference(simd_level, activation, dims, rng):
    layers = make_layers(rng, dims, activation)
    rows = int(rng.integers(1, 230))
    x = (2 * rng.standard_normal((rows, dims[0]))).astype(np.float32)
    encoder = _native.MlpEncoder(*layers, None, "fp32")
    assert (encoder.input_dim, encoder.output_dim, encoder.num_layers) == (dims[0], dims[-1], len(dims) - 1)
    assert_close_to(encode(encoder, x), reference(x, *layers), 1e-5)


@pytest.mark.parametrize("rows", [1, 11, 12, 13, 95, 96, 97, 191, 192, 1000])
def test_row_counts_around_tiles_and_blocks(simd_level, rows, rng, num_threads):
    layers = make_layers(rng, (70, 45, 19), "tanh")
    x = rng.standard_normal((rows, 70)).astype(np.float32)
    encoder = _native.MlpEncoder(*layers, None, "fp32")
    out = encode(encoder, x)
    assert_close_to(out, reference(x, *layers), 1e-5)
    # Rows are independent: each row alone gives the same values (blocking does not leak).
    np.testing.assert_array_equal(encode(encoder, x[-1:]), out[-1:])


def test_mixed_activations_no_bias_and_input_offset(simd_level, rng):
    dims = (300, 129, 64, 10)
    weights, _, _, _ = make_layers(rng, dims, "relu")
    biases = [None, rng.standard_normal(64).astype(np.float32), None]
    activations, params = ["elu", "leaky_relu", "identity"], [1.3, 0.02, 0.0]
    # A large common offset: x - offset must be formed before the products, or it cancels.
    offset = (1000 + rng.standard_normal(300)).astype(np.float32)
    x = (offset + rng.standard_normal((150, 300))).astype(np.float32)
    encoder = _native.MlpEncoder(weights, biases, activations, params, offset, "fp32")
    assert_close_to(encode(encoder, x), reference(x, weights, biases, activations, params, offset), 1e-5)


def test_threads_and_levels_agree_to_rounding(rng, num_threads):
    layers = make_layers(rng, (784, 256, 32), "gelu")
    x = rng.random((1000, 784), dtype=np.float32)
    encoder = _native.MlpEncoder(*layers, None, "fp32")
    results = []
    for threads in (1, 2):
        latentspace.set_num_threads(threads)
        results.append(encode(encoder, x))
    # Each row's arithmetic does not depend on which thread runs its block: bitwise equal.
    np.testing.assert_array_equal(results[0], results[1])


def test_extreme_inputs_stay_finite(simd_level, rng):
    """Saturating activations at +-1e4 (exp under- and overflow inside) give their limits."""
    x = np.array([[-1e4], [-50.0], [-1e-6], [0.0], [1e-6], [50.0], [1e4]], dtype=np.float32)
    for activation in sorted(ACTIVATIONS):
        w, b = [np.ones((1, 1), np.float32)], [np.zeros(1, np.float32)]
        p = [PARAMETERS.get(activation, 0.0)]
        encoder = _native.MlpEncoder(w, b, [activation], p, None, "fp32")
        out = encode(encoder, x)
        ref = reference(x, w, b, [activation], p)
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30, err_msg=activation)


@pytest.mark.parametrize("dims", [(784, 512, 256, 32), (97, 130, 3), (1031, 64)], ids=str)
def test_bf16_precision(rng, dims, simd_level):
    layers = make_layers(rng, dims, "relu")
    # A linear last layer: a ReLU there could zero every output of a narrow layer (3 outputs),
    # and zeros cannot show whether the kernel rounded.
    layers[2][-1] = "identity"
    x = rng.random((300, dims[0]), dtype=np.float32)
    encoder = _native.MlpEncoder(*layers, None, "bf16")
    assert encoder.precision == "bf16"
    expected_kernel = "avx512_bf16" if simd_level == "avx512" and _has_avx512_bf16() else simd_level
    assert encoder.kernel == expected_kernel
    out = encode(encoder, x)
    # Same rounding as the kernel, float64 sums: only the summation order differs.
    assert_close_to(out, reference(x, *layers, bf16=True), 2e-3)
    # Against full precision: bf16 keeps 8 significant bits (relative rounding 2^-9 per weight
    # and input), so each output is off by at most a few 2^-9 of the sum of its terms' sizes,
    # |W_L| (... |W_1| |x| + |b_1| ...) + |b_L| (ReLU shrinks magnitudes), whatever cancels.
    exact = reference(x, *layers)
    weights, biases = layers[0], layers[1]
    scale = np.abs(x.astype(np.float64))
    for w, b in zip(weights, biases):
        scale = scale @ np.abs(w.astype(np.float64)).T + np.abs(b)
    assert (np.abs(out - exact) <= 4 * len(weights) * 2.0**-9 * scale + 1e-6).all()
    assert np.abs(out - exact).max() > 0  # it did round


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_reported_lowest_first(simd_level, bad, rng, num_threads):
    layers = make_layers(rng, (600, 20), "relu")
    x = rng.standard_normal((500, 600)).astype(np.float32)
    x[450, 599] = bad  # a late block, in the last depth block
    x[130, 300] = bad  # an earlier block, middle depth block
    encoder = _native.MlpEncoder(*layers, None, "fp32")
    with pytest.raises(ValueError, match=r"x: row 130 contains NaN or Inf"):
        encoder.encode(x, np.empty((500, 20), np.float32))
    x[130, 300] = 0
    with pytest.raises(ValueError, match=r"x: row 450 "):
        encoder.encode(x, np.empty((500, 20), np.float32))


def test_offset_that_makes_input_infinite_is_reported(rng):
    w = [np.ones((2, 3), np.float32)]
    offset = np.array([0, -3e38, 0], np.float32)
    encoder = _native.MlpEncoder(w, [None], ["identity"], [0.0], offset, "fp32")
    with pytest.raises(ValueError, match="row 1 "):
        encoder.encode(np.array([[0, 0, 0], [0, 3e38, 0]], np.float32), np.empty((2, 2), np.float32))


def test_concurrent_calls_share_one_encoder(rng):
    import threading

    layers = make_layers(rng, (200, 64, 16), "silu")
    encoder = _native.MlpEncoder(*layers, None, "fp32")
    inputs = [rng.standard_normal((300, 200)).astype(np.float32) for _ in range(4)]
    expected = [encode(encoder, x) for x in inputs]
    results = [None] * 4

    def work(i):
        results[i] = encode(encoder, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_weights_are_copied_at_construction(rng):
    layers = make_layers(rng, (10, 4), "identity")
    encoder = _native.MlpEncoder(*layers, None, "fp32")
    x = rng.standard_normal((5, 10)).astype(np.float32)
    before = encode(encoder, x)
    layers[0][0][:] = 0
    np.testing.assert_array_equal(encode(encoder, x), before)


def test_zero_rows(rng):
    encoder = _native.MlpEncoder(*make_layers(rng, (4, 2), "relu"), None, "fp32")
    encoder.encode(np.empty((0, 4), np.float32), np.empty((0, 2), np.float32))


def _layers(*dims):
    return [np.ones((o, i), np.float32) for i, o in zip(dims[:-1], dims[1:])]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(weights=[], biases=[], activations=[], activation_params=[]), ValueError, "at least one layer"),
        (dict(weights=_layers(4, 3, 2), biases=[None]), ValueError, "one entry per layer"),
        (dict(weights=[np.ones((3, 4)), np.ones((2, 3), np.float32)]), TypeError, r"weights\[0\]: expected dtype float32"),
        (dict(weights=[np.ones((3, 4), np.float32), np.ones((2, 5), np.float32)]), ValueError,
         r"weights\[1\]: expected 3 inputs"),
        (dict(weights=[np.ones((3, 4), np.float32).T, np.ones((2, 3), np.float32)]), ValueError, "C-contiguous"),
        (dict(biases=[np.ones(2, np.float32), None]), ValueError, r"biases\[0\]: expected 3 values"),
        (dict(activations=["relu", "swish"]), ValueError, r"activations\[1\]: unknown activation 'swish'"),
        (dict(activation_params=[float("nan"), 0.0]), ValueError, r"activation_params\[0\]"),
        (dict(input_offset=np.ones(5, np.float32)), ValueError, "input_offset: expected 4 values"),
        (dict(input_offset=np.array([0, np.nan, 0, 0], np.float32)), ValueError, "input_offset contains NaN"),
        (dict(weights=[np.full((3, 4), np.inf, np.float32), np.ones((2, 3), np.float32)]), ValueError,
         r"weights\[0\] contains NaN or Inf"),
        (dict(precision="fp16"), ValueError, "precision: expected 'fp32' or 'bf16'"),
    ],
)
def test_bad_construction_arguments(kwargs, error, message):
    arguments = dict(weights=_layers(4, 3, 2), biases=[None, None], activations=["relu", "identity"],
                     activation_params=[0.0, 0.0], input_offset=None, precision="fp32")
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        _native.MlpEncoder(**arguments)


@pytest.mark.parametrize(
    "x, out, error, message",
    [
        (np.ones((2, 5), np.float32), np.empty((2, 2), np.float32), ValueError, "x: expected 4 features"),
        (np.ones((2, 4)), np.empty((2, 2), np.float32), TypeError, "x: expected dtype float32"),
        (np.ones((2, 4), np.float32), np.empty((3, 2), np.float32), ValueError, r"out: expected shape \(2, 2\)"),
        (np.ones((2, 4), np.float32), np.empty((2, 2)), TypeError, "out: expected dtype float32"),
        (np.ones((4, 2), np.float32).T, np.empty((2, 2), np.float32), ValueError, "x: expected a C-contiguous"),
        (np.ones(4, np.float32), np.empty((1, 2), np.float32), ValueError, "x: expected a 2-d array"),
    ],
)
def test_bad_encode_arguments(x, out, error, message):
    encoder = _native.MlpEncoder(_layers(4, 3, 2), [None, None], ["relu", "identity"], [0.0, 0.0])
    with pytest.raises(error, match=message):
        encoder.encode(x, out)


def test_read_only_out_is_refused():
    encoder = _native.MlpEncoder(_layers(4, 2), [None], ["relu"], [0.0])
    out = np.empty((1, 2), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writable array"):
        encoder.encode(np.ones((1, 4), np.float32), out)

"""The native MLP encoder (latentspace._native.MlpEncoder) against a float64 reference.

Every SIMD level, every activation, depths 1 to 4 with widths that reach the register tiles'
tails (1, 3, 97, 130) and the depth blocking (> 256 and > 512 inputs), row counts around the
96-row blocks, the bf16 precision, the LayerNorm stages (norms=, input_norm=), NaN reporting and
bad arguments. The Python layer
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


def _misaligned(a):
    """A C-contiguous copy of `a` one byte past an aligned address (float32 alignment broken)."""
    view = np.zeros(a.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


def test_misaligned_arrays_encode_like_aligned_ones(simd_level, rng):
    # Reading floats through misaligned pointers is undefined behaviour: the bindings take aligned
    # copies of weights, biases, offset, LayerNorm parameters and rows, and keep each copy alive
    # until the encoder has packed it (under ASan, a copy freed too early would be a use-after-free).
    weights, biases, activations, params = make_layers(rng, (37, 19, 5), "tanh")
    offset = rng.standard_normal(37).astype(np.float32)
    norms = [("after_activation", 1e-5, rng.random(19).astype(np.float32) + 0.5,
              rng.standard_normal(19).astype(np.float32)), None]
    x = rng.standard_normal((50, 37)).astype(np.float32)
    expected = encode(_native.MlpEncoder(weights, biases, activations, params, offset, "fp32", norms), x)
    odd_norms = [(norms[0][0], norms[0][1], _misaligned(norms[0][2]), _misaligned(norms[0][3])), None]
    encoder = _native.MlpEncoder([_misaligned(w) for w in weights], [_misaligned(b) for b in biases], activations,
                                 params, _misaligned(offset), "fp32", odd_norms)
    np.testing.assert_array_equal(encode(encoder, _misaligned(x)), expected)
    with pytest.raises(ValueError, match="out: expected an aligned array"):
        encoder.encode(x, _misaligned(np.empty((50, 5), np.float32)))


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


# ---------------------------------------------------------------------------------------
# LayerNorm stages: norms=[(place, eps, weight, bias) or None per layer], input_norm=(eps, weight, bias)

NORM_PLACES = ("before_activation", "after_activation")


def layer_norm64(h, eps, weight, bias):
    """torch's own LayerNorm over the last axis, in float64 (biased variance)."""
    h = torch.as_tensor(h, dtype=torch.float64)
    w = None if weight is None else torch.from_numpy(weight).double()
    b = None if bias is None else torch.from_numpy(bias).double()
    return F.layer_norm(h, (h.shape[-1],), w, b, eps).numpy()


def make_norm(rng, width, kind="affine", eps=1e-5):
    """(eps, weight, bias) with non-trivial terms: a norm that ignores or swaps one gives
    other values. kind: "affine", "weight-only" (LayerNorm(bias=False)) or "plain" (no affine)."""
    weight = (1.0 + rng.standard_normal(width)).astype(np.float32) if kind != "plain" else None
    bias = rng.standard_normal(width).astype(np.float32) if kind == "affine" else None
    return eps, weight, bias


def reference_with_norms(x, weights, biases, activations, params, norms, input_norm=None, bf16=False):
    """reference() with a LayerNorm stage per layer (None, or (place, eps, weight, bias)) and a
    leading one; the norms run in float64 on the float64 layer outputs."""
    h = np.asarray(x, dtype=np.float64)
    if input_norm is not None:
        h = layer_norm64(h, *input_norm).astype(np.float32)  # the kernel's float32 normalised rows
    for w, b, act, p, norm in zip(weights, biases, activations, params, norms):
        w = torch.from_numpy(w)
        t = torch.from_numpy(np.asarray(h)).double()
        if bf16:
            w, t = w.bfloat16(), t.float().bfloat16()
        t = t.double() @ w.double().T
        if b is not None:
            t = t + torch.from_numpy(b).double()
        if norm is not None and norm[0] == "before_activation":
            t = torch.from_numpy(layer_norm64(t, *norm[1:]))
        t = ACTIVATIONS[act](t, p)
        if norm is not None and norm[0] == "after_activation":
            t = torch.from_numpy(layer_norm64(t, *norm[1:]))
        h = t.numpy()
    return h


@pytest.mark.parametrize("kind", ["affine", "weight-only", "plain"])
@pytest.mark.parametrize("width", [1, 3, 97, 300])
@pytest.mark.parametrize("center, spread", [(0.0, 1.0), (1e3, 1e-3), (-1e3, 5.0)], ids=["centred", "tiny-spread",
                                                                                        "far"])
def test_layer_norm_is_the_float64_norm_of_its_input(simd_level, kind, width, center, spread, rng, num_threads):
    """An identity layer hands the norm its input exactly: the output must be the float64
    LayerNorm of the float32 rows to float32 rounding, however far from 0 the rows are
    (a one-pass float32 variance, E[h^2] - E[h]^2, loses every digit at 1e3 +- 1e-3)."""
    eps, weight, bias = make_norm(rng, width, kind, eps=float(rng.choice([1e-5, 1e-12, 0.3])))
    identity = [np.eye(width, dtype=np.float32)]
    for rows, threads in ((1, 1), (7, 1), (300, 2)):
        num_threads(threads)
        x = (center + spread * rng.standard_normal((rows, width))).astype(np.float32)
        expected = layer_norm64(x, eps, weight, bias)
        for place in NORM_PLACES:
            encoder = _native.MlpEncoder(identity, [None], ["identity"], [0.0], None, "fp32",
                                         norms=[(place, eps, weight, bias)])
            out = encode(encoder, x)
            assert np.isfinite(out).all()
            # rounded once from a double result: within an ulp of the exact value, plus the
            # double's own error relative to the terms (|weight| (1 + |normalised|) + |bias|):
            # about 1e-16 |center| / spread from the double mean's rounding, far below float32's 6e-8
            terms = (1.0 + np.abs(layer_norm64(x, eps, None, None))) * (1.0 if weight is None else np.abs(weight))
            terms = terms + (0.0 if bias is None else np.abs(bias))
            np.testing.assert_array_less(np.abs(out - expected), 2.0**-23 * np.abs(expected) + 1e-8 * terms + 1e-38)
    # width 1 (and any constant row): var = 0, so (h - mean) / sqrt(eps) = 0, then the bias, as torch


@pytest.mark.parametrize("place", NORM_PLACES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_layer_norm_before_or_after_each_activation(simd_level, activation, place, rng):
    dims = (97, 300, 3, 1)
    layers = make_layers(rng, dims, activation)
    layers[2][-1] = "identity"  # a ReLU there could zero every code, and zeros show no order
    # (a norm over the last layer's single output would make every code its bias: kept out)
    norms = [(place, *make_norm(rng, 300, "affine")), (place, *make_norm(rng, 3, "weight-only", eps=0.3)), None]
    x = (3.0 + 2 * rng.standard_normal((230, dims[0]))).astype(np.float32)
    encoder = _native.MlpEncoder(*layers, None, "fp32", norms=norms)
    expected = reference_with_norms(x, *layers, norms)
    assert_close_to(encode(encoder, x), expected, 1e-5)
    # the other order computes something else: the test sees where the norm runs. Its codes
    # differ by at least 100 times the tolerance above (relative to the largest code: random
    # layers can leave every code within 0.006 of -0.94, where a fixed 0.01 failed, CI of the
    # eighteenth session), so a kernel running the norm in the wrong place fails that check.
    if activation not in ("identity", "leaky_relu", "elu"):  # nearly affine on normalised values
        other = [("after_activation" if place == "before_activation" else "before_activation", *n[1:]) for n in norms[:2]]
        other.append(None)
        assert np.abs(reference_with_norms(x, *layers, other) - expected).max() > 100 * 1e-5 * np.abs(expected).max()


def test_layer_norm_on_some_layers_only(rng):
    layers = make_layers(rng, (300, 129, 64, 10), "gelu")
    norms = [None, ("after_activation", *make_norm(rng, 64)), None]
    x = rng.standard_normal((150, 300)).astype(np.float32)
    encoder = _native.MlpEncoder(*layers, None, "fp32", norms=norms)
    assert_close_to(encode(encoder, x), reference_with_norms(x, *layers, norms), 1e-5)
    # norms=None and a list of None: the chain without any norm
    plain = encode(_native.MlpEncoder(*layers, None, "fp32"), x)
    np.testing.assert_array_equal(encode(_native.MlpEncoder(*layers, None, "fp32", norms=[None] * 3), x), plain)


@pytest.mark.parametrize("kind", ["affine", "weight-only", "plain"])
def test_leading_layer_norm_then_offset(simd_level, kind, rng):
    """input_norm normalises each input row first; the offset is subtracted from its result."""
    layers = make_layers(rng, (300, 97, 3), "tanh")
    input_norm = make_norm(rng, 300, kind)
    offset = rng.standard_normal(300).astype(np.float32)
    x = (1e3 + rng.standard_normal((200, 300))).astype(np.float32)  # far from 0
    encoder = _native.MlpEncoder(*layers, offset, "fp32", input_norm=input_norm)
    normalised = layer_norm64(x, *input_norm).astype(np.float32)
    assert_close_to(encode(encoder, x), reference(normalised, *layers, offset=offset), 1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_leading_layer_norm_reports_non_finite_rows_lowest_first(simd_level, bad, rng, num_threads):
    layers = make_layers(rng, (600, 20), "relu")
    x = rng.standard_normal((500, 600)).astype(np.float32)
    x[450, 599] = bad
    x[130, 300] = bad
    encoder = _native.MlpEncoder(*layers, None, "fp32", input_norm=make_norm(rng, 600))
    num_threads(2)
    with pytest.raises(ValueError, match=r"x: row 130 contains NaN or Inf"):
        encoder.encode(x, np.empty((500, 20), np.float32))
    x[130, 300] = 0
    with pytest.raises(ValueError, match=r"x: row 450 "):
        encoder.encode(x, np.empty((500, 20), np.float32))
    # a constant (or huge but finite) row is finite: var = 0 gives the bias
    x[450, :] = 3e38
    assert np.isfinite(encode(encoder, x)).all()


@pytest.mark.parametrize("place", NORM_PLACES)
def test_layer_norm_bf16(rng, place, simd_level):
    """bf16 rounds each layer's input and weights; the norm runs on the float32 layer output
    (in double), its output rounded to bf16 only as the next layer's input."""
    layers = make_layers(rng, (97, 300, 33), "silu")
    norms = [(place, *make_norm(rng, 300)), (place, *make_norm(rng, 33, "weight-only"))]
    x = rng.standard_normal((300, 97)).astype(np.float32)
    encoder = _native.MlpEncoder(*layers, None, "bf16", norms=norms)
    out = encode(encoder, x)
    assert_close_to(out, reference_with_norms(x, *layers, norms, bf16=True), 2e-3)
    assert np.abs(out - reference_with_norms(x, *layers, norms)).max() > 0  # it did round


def test_threads_agree_bitwise_with_norms(rng, num_threads):
    layers = make_layers(rng, (784, 256, 32), "gelu")
    norms = [("before_activation", *make_norm(rng, 256)), ("after_activation", *make_norm(rng, 32))]
    x = rng.random((1000, 784), dtype=np.float32)
    encoder = _native.MlpEncoder(*layers, None, "fp32", norms=norms, input_norm=make_norm(rng, 784))
    results = []
    for threads in (1, 2):
        num_threads(threads)
        results.append(encode(encoder, x))
    np.testing.assert_array_equal(results[0], results[1])


def test_norm_parameters_are_copied_at_construction(rng):
    layers = make_layers(rng, (10, 4), "identity")
    norm = make_norm(rng, 4)
    encoder = _native.MlpEncoder(*layers, None, "fp32", norms=[("after_activation", *norm)])
    x = rng.standard_normal((5, 10)).astype(np.float32)
    before = encode(encoder, x)
    norm[1][:] = 0
    norm[2][:] = 0
    np.testing.assert_array_equal(encode(encoder, x), before)


_W = np.ones((3, 4), np.float32)
_ONES3 = np.ones(3, np.float32)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(norms=[None]), ValueError, r"norms: expected one entry per layer \(None for none\), got 1 for 2"),
        (dict(norms="before_activation"), TypeError, r"norms: expected a list with one entry per layer"),
        (dict(norms=[("after", 1e-5, None, None), None]), ValueError,
         r"norms\[0\]: expected the place 'before_activation' or 'after_activation', got 'after'"),
        (dict(norms=[(1e-5, None, None), None]), TypeError, r"norms\[0\]: expected a tuple \(place, eps, weight, bias\)"),
        (dict(norms=[(0, 1e-5, None, None), None]), TypeError, r"norms\[0\]: expected the place as a str"),
        (dict(norms=[("before_activation", "1e-5", None, None), None]), TypeError, r"norms\[0\]: expected eps as a float"),
        (dict(norms=[("before_activation", 0.0, None, None), None]), ValueError, r"norms\[0\]: expected eps > 0"),
        (dict(norms=[("before_activation", float("nan"), None, None), None]), ValueError, r"norms\[0\]: expected eps > 0"),
        (dict(norms=[("before_activation", 1e-5, np.ones(2, np.float32), None), None]), ValueError,
         r"norms\[0\] weight: expected 3 values \(the features it normalises\), got 2"),
        (dict(norms=[("before_activation", 1e-5, None, np.ones(3)), None]), TypeError,
         r"norms\[0\] bias: expected dtype float32"),
        (dict(norms=[None, ("after_activation", 1e-5, np.array([1, np.inf], np.float32), None)]), ValueError,
         r"norms\[1\]: the scale \(weight\) contains NaN or Inf"),
        (dict(norms=[("after_activation", 1e-5, None, np.array([0, np.nan, 0], np.float32)), None]), ValueError,
         r"norms\[0\]: the shift \(bias\) contains NaN or Inf"),
        (dict(input_norm=(1e-5, _ONES3, None)), ValueError, r"input_norm weight: expected 4 values"),
        (dict(input_norm=(-1.0, None, None)), ValueError, r"input_norm: expected eps > 0 \(finite\), got -1"),
        (dict(input_norm=("before_activation", 1e-5, None, None)), TypeError,
         r"input_norm: expected a tuple \(eps, weight, bias\)"),
    ],
)
def test_bad_norm_arguments(kwargs, error, message):
    arguments = dict(weights=_layers(4, 3, 2), biases=[None, None], activations=["relu", "identity"],
                     activation_params=[0.0, 0.0], input_offset=None, precision="fp32")
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        _native.MlpEncoder(**arguments)

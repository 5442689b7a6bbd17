"""The CUDA encoder's host side, on any machine (no GPU needed):

* the activations the kernels run (csrc/cuda/encode_math.cuh), compiled for the host by nvcc
  and checked against long double references (tests/cuda_host/encode_math_check.cu), and
  checked to fail when the header is mutated;
* _native.CudaMlpEncoder's argument checks and workspace sizes, all made before anything
  reaches a GPU: the device addresses given here are fake and never read;
* which encoder an exported model gets on a GPU (LATENTSPACE_CUDA_ENCODER, build_info, the
  Encoder's reason), in builds with and without CUDA;
* encoding.py's CUDA glue (Encoder on a CUDA device, _run_cuda) with stand-ins for the CUDA
  encoder: construction, batch size and pickling with a recording fake, and _run_cuda on CPU
  tensors with the CPU native encoder behind the CUDA encoder's contract.

The kernels themselves: tests/gpu/test_encode_cuda_native.py, on a GPU.
"""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import latentspace as ls
from conftest import NVCC, build_cuda_host_check
from latentspace import _cuda_encoder, _native, encoding
from latentspace.encoding import Encoder, export_layers
from latentspace._arrays import first_nonfinite_row

ROOT = Path(__file__).resolve().parent.parent
MATH_HEADER = ROOT / "csrc" / "cuda" / "encode_math.cuh"
MATH_CHECK = ROOT / "tests" / "cuda_host" / "encode_math_check.cu"
CUDA_BUILT = ls.build_info()["cuda_compiled"]
VARIABLE = "LATENTSPACE_CUDA_ENCODER"

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILT, reason="a build without CUDA has only the stubs")


@pytest.fixture(autouse=True)
def _one_torch_thread(single_threaded):
    """Tiny models: one thread each for torch and latentspace (see conftest.single_threaded)."""


def _set_backend(monkeypatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, value)


# ---------------------------------------------------------------------------------------
# The activations (csrc/cuda/encode_math.cuh) on the host

# Lines the check prints per activation: one per parameter it tries (slopes, alphas).
ACTIVATION_LINES = {"identity": 1, "relu": 1, "leaky_relu": 4, "gelu": 1, "gelu_tanh": 1, "tanh": 1,
                    "sigmoid": 1, "silu": 1, "elu": 4}


def _build_math_check(directory: Path, include_first: Path | None = None) -> Path:
    """nvcc-compiles the check for the host; include_first: a folder searched before csrc/
    (its cuda/encode_math.cuh then shadows the real one)."""
    return build_cuda_host_check("encode_math_check", directory, include_first)


def _run(program: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert re.search(r"^failures \d+$", result.stdout, re.M), result.stdout + result.stderr  # ran to the end
    return result


def _lines_of(output: str, name: str) -> list[str]:
    """The summary lines of one activation ("gelu: ...", "elu(0.6): ..."; not gelu_tanh's for gelu)."""
    return [line for line in output.splitlines() if line.startswith((f"{name}:", f"{name}("))]


@pytest.fixture(scope="module")
def math_check_output(tmp_path_factory):
    if NVCC is None:
        pytest.skip("no nvcc on this machine")
    return _run(_build_math_check(tmp_path_factory.mktemp("encode_math"))).stdout


def test_the_check_covers_every_activation_of_the_header():
    """A new Activation in ops/encode.h must get a reference and a line in the check."""
    header = (ROOT / "csrc" / "ops" / "encode.h").read_text()
    body = re.search(r"enum class Activation : int \{(.*?)\};", header, re.S).group(1)
    enumerators = re.findall(r"\bk([A-Za-z]+) = \d+", body)
    assert {re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower() for name in enumerators} == set(ACTIVATION_LINES)
    main = MATH_CHECK.read_text().split("int main(")[1]
    assert all(f"Activation::k{name}," in main for name in enumerators)


@needs_nvcc
@pytest.mark.parametrize("name", ACTIVATION_LINES)
def test_each_activation_matches_torchs_formula_on_the_host(math_check_output, name):
    """encode_math::activate, compiled for the host, against torch's formula in long double over
    edge and random values, NaN exactly where torch gives NaN (the bounds: the .cu file's
    header comment). The output starts with the seed that replays a failure."""
    lines = _lines_of(math_check_output, name)
    assert len(lines) == ACTIVATION_LINES[name], math_check_output
    assert all(", wrong 0," in line for line in lines), math_check_output


# Each replaces one piece of the header by a plausible slip; the check must then fail for the
# activation that uses it: a constant off in the 4th digit, two forms that lose accuracy in a
# tail (the cancelling 1 - 1 / (1 + e) for sigmoid at x << 0, e^x - 1 for ELU near 0), and
# the ReLU that turned NaN into 0 (so an overflow inside the model gave finite codes).
MUTATIONS = {
    "relu": ("return x < 0.0f ? 0.0f : x;", "return x > 0.0f ? x : 0.0f;"),
    "gelu": ("0.70710678118654752f", "0.7072f"),
    "gelu_tanh": ("0.044715f", "0.04472f"),
    "sigmoid": ("return x < 0.0f ? e * inverse : inverse;", "return x < 0.0f ? 1.0f - inverse : inverse;"),
    "elu": ("parameter * expm1f(x)", "parameter * (expf(x) - 1.0f)"),
}


@needs_nvcc
@pytest.mark.parametrize("name", MUTATIONS)
def test_the_check_fails_for_a_mutated_header(tmp_path, name):
    original, mutated = MUTATIONS[name]
    header = MATH_HEADER.read_text()
    assert header.count(original) == 1, f"the header changed: update MUTATIONS[{name!r}]"
    shadow = tmp_path / "include" / "cuda"
    shadow.mkdir(parents=True)
    (shadow / "encode_math.cuh").write_text(header.replace(original, mutated))
    result = _run(_build_math_check(tmp_path, include_first=tmp_path / "include"))
    assert result.returncode == 1, result.stdout
    lines = _lines_of(result.stdout, name)
    assert lines and any(", wrong 0," not in line for line in lines), result.stdout


# ---------------------------------------------------------------------------------------
# _native.CudaMlpEncoder: the checks before any launch (fake addresses, never read)

ADDRESS = 0x7F00_0000_0000  # a 256-byte aligned "device address": nothing here dereferences it
GRID_Y = 65535  # CUDA's limit on gridDim.y, where cuda/encode.cu puts a layer's output tiles
TILE_OUTPUTS = {"fp32": 128, "bf16": 64}  # outputs per block: SimtTile, WmmaTile<bf16> (knn_tiles.cuh)


def _layers(*shapes: tuple[int, int], **changes):
    """Constructor arguments for layers of the given (out, in) shapes, with `changes`."""
    count = len(shapes)
    arguments = dict(weights=[ADDRESS] * count, shapes=list(shapes), biases=[ADDRESS if l % 2 else None
                                                                            for l in range(count)],
                     activations=["relu"] * count, activation_params=[0.0] * count)
    arguments.update(changes)
    return arguments


def _encoder(*shapes: tuple[int, int], **changes):
    return _native.CudaMlpEncoder(**_layers(*(shapes or ((5, 3), (2, 5))), **changes))


def _piece(floats: int) -> int:
    """A workspace piece of `floats` float32 values, rounded up to 256 bytes (cuda/common.cuh,
    WorkspaceCarver: every piece starts aligned)."""
    return -(-4 * floats // 256) * 256 // 4


@needs_cuda_build
@pytest.mark.parametrize("changes, error, match", [
    (dict(weights=[], shapes=[], biases=[], activations=[], activation_params=[]), ValueError,
     r"^weights: expected at least one layer"),
    (dict(shapes=[(5, 3)]), ValueError, r"weights, shapes, biases, activations, activation_params: expected one "
                                        r"entry per layer, got 2, 1, 2, 2, 2"),
    (dict(shapes=[(5, 3), (2, 4)]), ValueError, r"^weights\[1\]: expected 5 inputs \(the previous layer's outputs\), "
                                                r"got 4"),
    (dict(shapes=[(5, 3), (0, 5)]), ValueError,
     r"^weights\[1\]: expected a non-empty \(out, in\) matrix, got \(0, 5\)"),
    (dict(shapes=[(5, 0), (2, 5)]), ValueError, r"^weights\[0\]: expected a non-empty"),
    (dict(weights=[ADDRESS, 0]), ValueError, r"^weights\[1\]: expected the layer's weights, got none"),
    (dict(activations=["relu", "swish"]), ValueError, r"^activations\[1\]: unknown activation 'swish'; expected one "
                                                      r"of identity, relu, leaky_relu, gelu, gelu_tanh"),
    (dict(activations=["ReLU", "relu"]), ValueError, r"^activations\[0\]: unknown activation 'ReLU'"),
    (dict(activation_params=[0.0, float("nan")]), ValueError, r"^activation_params\[1\]: expected a finite number"),
    (dict(activation_params=[float("inf"), 0.0]), ValueError, r"^activation_params\[0\]: expected a finite number"),
    (dict(precision="fp16"), ValueError, r"^precision: expected 'fp32' or 'bf16', got 'fp16'"),
    (dict(precision="FP32"), ValueError, r"^precision: expected 'fp32' or 'bf16', got 'FP32'"),
    (dict(norms="before_activation"), TypeError, r"^norms: expected a list with one entry per layer"),
    # addresses: ints (a tensor's data_ptr()) or None; pybind's own "Unable to cast" named nothing
    (dict(biases=[None, "0x1000"]), TypeError, r"^biases\[1\]: expected a device address \(int\) or None, got str"),
    (dict(input_offset=4096.0), TypeError, r"^input_offset: expected a device address \(int\) or None, got float"),
    (dict(norms=[("before_activation", 1e-5, [4096], None), None]), TypeError,
     r"^norms\[0\] weight: expected a device address \(int\) or None, got list"),
    (dict(norms=[None, ("after_activation", 1e-5, None, b"x")]), TypeError,
     r"^norms\[1\] bias: expected a device address \(int\) or None, got bytes"),
    (dict(norms=[None]), ValueError, r"^norms: expected one entry per layer \(None for none\), got 1 for 2 layers"),
    (dict(norms=[None, ("middle", 1e-5, None, None)]), ValueError,
     r"^norms\[1\]: expected the place 'before_activation' or 'after_activation', got 'middle'"),
    (dict(norms=[("before_activation", 1e-5, None), None]), TypeError, r"^norms\[0\]: expected a tuple \(place, eps, "
                                                                       r"weight address, bias address\)"),
    (dict(norms=[(1, 1e-5, None, None), None]), TypeError, r"^norms\[0\]: expected the place as a str"),
    (dict(norms=[("after_activation", "1e-5", None, None), None]), TypeError, r"^norms\[0\]: expected eps as a float"),
    (dict(norms=[None, ("after_activation", 0.0, None, None)]), ValueError,
     r"^norms\[1\]: expected eps > 0 \(finite\), got 0"),
    (dict(norms=[("before_activation", -1e-5, ADDRESS, ADDRESS), None]), ValueError,
     r"^norms\[0\]: expected eps > 0 \(finite\), got -1e-05"),
    (dict(norms=[("before_activation", float("nan"), None, None), None]), ValueError,
     r"^norms\[0\]: expected eps > 0 \(finite\), got nan"),
    (dict(norms=[("before_activation", float("inf"), None, None), None]), ValueError,
     r"^norms\[0\]: expected eps > 0 \(finite\), got inf"),
    (dict(input_norm=(0.0, None, None)), ValueError, r"^input_norm: expected eps > 0 \(finite\), got 0"),
    (dict(input_norm=(float("nan"), ADDRESS, None)), ValueError, r"^input_norm: expected eps > 0 \(finite\), got nan"),
    (dict(input_norm=(-3, None, None)), ValueError, r"^input_norm: expected eps > 0 \(finite\), got -3"),
    (dict(input_norm=(1e-5, None)), TypeError, r"^input_norm: expected a tuple \(eps, weight address, bias address\)"),
])
def test_the_constructor_checks_the_layers(changes, error, match):
    with pytest.raises(error, match=match):
        _encoder(**changes)


@needs_cuda_build
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_layer_may_have_as_many_outputs_as_one_launchs_grid_holds(precision):
    """A layer's output tiles go in grid.y (at most 65,535): 65,535 x 128 outputs for the
    float32 tile, 65,535 x 64 for bf16's; one more is refused, naming the layer."""
    most = GRID_Y * TILE_OUTPUTS[precision]
    assert _encoder((4, 2), (most, 4), precision=precision).output_dim == most
    assert _encoder((most, 2), (3, most), precision=precision).input_dim == 2
    for shapes, layer in (([(4, 2), (most + 1, 4)], 1), ([(most + 1, 2), (3, most + 1)], 0)):
        with pytest.raises(ValueError, match=rf"^weights\[{layer}\]: {most + 1} outputs; the CUDA encoder takes at "
                                             rf"most {most} per layer"):
            _encoder(*shapes, precision=precision)


@needs_cuda_build
@pytest.mark.parametrize("precision, kernel", [("fp32", "cuda_simt"), ("bf16", "cuda_wmma_bf16")])
def test_properties_and_kernel_names(precision, kernel):
    encoder = _encoder((7, 3), (9, 7), (4, 9), precision=precision, activations=["gelu", "elu", "identity"],
                       activation_params=[0.0, 0.5, 0.0], input_offset=ADDRESS,
                       norms=[("before_activation", 1e-5, ADDRESS, None), None, ("after_activation", 1, None, None)],
                       input_norm=(1e-3, None, ADDRESS))
    assert (encoder.input_dim, encoder.output_dim, encoder.num_layers) == (3, 4, 3)
    assert encoder.precision == precision and encoder.kernel == kernel


@needs_cuda_build
@pytest.mark.parametrize("rows", [0, 1, 3, 64, 65, 1001])
@pytest.mark.parametrize("shapes, input_norm, expected", [
    # one layer: its input is x and its output the codes
    (((5, 3),), False, lambda rows: 0),
    (((5, 3),), True, lambda rows: _piece(rows * 3)),  # the normalised input
    # two layers: one hidden buffer of the hidden layer's width
    (((6, 3), (2, 6)), False, lambda rows: _piece(rows * 6)),
    (((6, 3), (2, 6)), True, lambda rows: _piece(rows * 3) + _piece(rows * 6)),
    # three layers and more: two ping-pong buffers of the widest hidden layer (not the last)
    (((7, 3), (100, 7), (5, 100)), False, lambda rows: 2 * _piece(rows * 100)),
    (((7, 3), (9, 7), (500, 9)), False, lambda rows: 2 * _piece(rows * 9)),
    (((7, 3), (100, 7), (5, 100), (300, 5), (4, 300)), True, lambda rows: _piece(rows * 3) + 2 * _piece(rows * 300)),
])
def test_workspace_floats(rows, shapes, input_norm, expected):
    encoder = _encoder(*shapes, input_norm=(1e-5, None, None) if input_norm else None)
    assert encoder.workspace_floats(rows) == expected(rows)


@needs_cuda_build
def test_negative_rows_are_refused():
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"^rows: expected a count >= 0, got -1"):
        encoder.workspace_floats(-1)
    with pytest.raises(ValueError, match=r"^rows: expected a count >= 0, got -5"):
        encoder.encode(ADDRESS, -5, ADDRESS, ADDRESS, 0, 0)


@needs_cuda_build
def test_encoding_no_rows_does_nothing():
    """rows = 0 returns before any pointer is looked at (no launch: none could run here)."""
    assert _encoder().encode(0, 0, 0, 0, 0, 0) is None
    assert _encoder().encode(ADDRESS, 0, ADDRESS, 0, 0, 0) is None


@needs_cuda_build
@pytest.mark.parametrize("x, out", [(0, ADDRESS), (ADDRESS, 0), (0, 0)])
def test_missing_input_or_output_is_refused_before_any_launch(x, out):
    with pytest.raises(ValueError, match=r"^x, out: expected device pointers"):
        _encoder().encode(x, 3, out, ADDRESS, 0, 0)
    with pytest.raises(ValueError, match=r"^x, out: expected device pointers"):  # before the workspace's check
        _encoder().encode(x, 3, out, 0, 0, 0)


@needs_cuda_build
@pytest.mark.parametrize("shapes, input_norm", [(((5, 3), (2, 5)), None), (((5, 3),), (1e-5, None, None)),
                                                (((5, 3), (4, 5), (2, 4)), None)])
def test_a_missing_workspace_is_refused_before_any_launch(shapes, input_norm):
    encoder = _encoder(*shapes, input_norm=input_norm)
    floats = encoder.workspace_floats(3)
    assert floats > 0
    with pytest.raises(ValueError, match=rf"^workspace: expected {floats} float32 elements of device memory "
                                         rf"\(workspace_floats\(3\)\), got none"):
        encoder.encode(ADDRESS, 3, ADDRESS, 0, 0, 0)


@pytest.mark.skipif(CUDA_BUILT, reason="the stubs exist only in a build without CUDA")
def test_a_build_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _encoder()


# ---------------------------------------------------------------------------------------
# Which encoder an exported model gets on a GPU

@pytest.mark.parametrize("value, expected", [
    (None, _cuda_encoder.DEFAULT_BACKEND), ("", _cuda_encoder.DEFAULT_BACKEND),
    ("auto", _cuda_encoder.DEFAULT_BACKEND), ("native", "native"), ("torch", "torch"),
])
@needs_cuda_build
def test_backend_setting(monkeypatch, value, expected):
    _set_backend(monkeypatch, value)
    assert _cuda_encoder.backend() == expected
    assert ls.build_info()["cuda_encoder"] == expected


@pytest.mark.parametrize("value", ["Native", "1", "cuda", " native", "native ", "gpu"])
def test_a_bad_backend_setting_names_the_variable(monkeypatch, value):
    _set_backend(monkeypatch, value)
    message = f"LATENTSPACE_CUDA_ENCODER: expected 'auto', 'native' or 'torch', got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        _cuda_encoder.backend()
    with pytest.raises(ValueError, match=re.escape(message)):
        encoding._gpu_refusal(torch.device("cuda"))
    assert ls.build_info()["cuda_encoder"] == f"invalid ({message})"  # reported, not raised


def test_the_encoder_setting_is_not_the_losses_setting(monkeypatch):
    monkeypatch.setenv(VARIABLE, "no such backend")
    monkeypatch.setenv("LATENTSPACE_CUDA_LOSSES", "torch")
    info = ls.build_info()
    assert info["cuda_losses"] == "torch" and info["cuda_encoder"].startswith("invalid (")


@pytest.mark.parametrize("value", [None, "", "auto"])
def test_a_build_without_cuda_gets_torch_whatever_the_default(monkeypatch, value):
    """The default is native (GPU run 10); a build without CUDA still gets torch, and says why."""
    _set_backend(monkeypatch, value)
    monkeypatch.setattr(_cuda_encoder, "DEFAULT_BACKEND", "native")
    if CUDA_BUILT:
        assert _cuda_encoder.backend() == "native"  # the default is what the setting changes
    monkeypatch.setattr(_native, "cuda_compiled", lambda: False)
    assert _cuda_encoder.backend() == "torch"
    assert ls.build_info()["cuda_encoder"] == "torch"
    assert encoding._gpu_refusal(torch.device("cuda")) == \
        "the work runs on 'cuda': this build of latentspace has no CUDA kernels"


@needs_cuda_build
@pytest.mark.parametrize("value, native", [(None, None), ("", None), ("auto", None), ("native", True),
                                           ("torch", False)])
@pytest.mark.parametrize("default", ["torch", "native"])
def test_the_reason_on_a_cuda_device_follows_the_setting(monkeypatch, value, native, default):
    _set_backend(monkeypatch, value)
    monkeypatch.setattr(_cuda_encoder, "DEFAULT_BACKEND", default)
    native = default == "native" if native is None else native
    for device, name in ((torch.device("cuda"), "'cuda'"), (torch.device("cuda", 1), "'cuda:1'")):
        reason = encoding._gpu_refusal(device)
        if native:
            assert reason is None
        else:
            why = ("LATENTSPACE_CUDA_ENCODER=torch asks for the model's torch code" if value == "torch" else
                   "the model's torch code is the default on GPUs (LATENTSPACE_CUDA_ENCODER=native: the CUDA encoder)")
            assert reason == f"the work runs on {name}: {why}"


def test_the_setting_is_not_read_for_the_cpu(monkeypatch, rng):
    """A CPU Encoder never reads the variable: a bad value only matters on a GPU."""
    monkeypatch.setenv(VARIABLE, "no such backend")
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    encoder = Encoder(model, device="cpu")
    assert encoder.backend == "native" and encoder.reason is None
    x = rng.standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(encoder.encode(x), model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Encoder on a CUDA device, with a fake CUDA encoder (construction, batch size, pickling)

class RecordingCudaEncoder:
    """_cuda_encoder.CudaEncoder's interface as Encoder uses it when it builds one: records the
    arguments, reports a kernel, a device with its index and a workspace per row; never encodes."""

    built: list["RecordingCudaEncoder"] = []
    workspace_bytes_per_row = 4 * 1000

    def __init__(self, spec, device, precision):
        self.spec, self.asked_device, self.precision = spec, device, precision
        self.device = torch.device("cuda", 0 if device.index is None else device.index)
        self.kernel = {"fp32": "cuda_simt", "bf16": "cuda_wmma_bf16"}[precision]
        RecordingCudaEncoder.built.append(self)

    def encode(self, x, out):
        raise AssertionError("the construction tests encode nothing")


@pytest.fixture
def cuda_without_a_gpu(monkeypatch):
    """device='cuda' accepted without a GPU (resolve_device's availability check skipped), the
    native CUDA encoder asked for, and RecordingCudaEncoder built in its place."""
    real = encoding.resolve_device

    def resolve(device, *, allow_auto=True):
        if isinstance(device, str) and device.startswith("cuda"):
            return torch.device(device)
        return real(device, allow_auto=allow_auto)

    monkeypatch.setenv(VARIABLE, "native")
    monkeypatch.setattr(encoding, "resolve_device", resolve)
    monkeypatch.setattr(_cuda_encoder, "CudaEncoder", RecordingCudaEncoder)
    RecordingCudaEncoder.built.clear()
    return RecordingCudaEncoder


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 9), nn.LayerNorm(9), nn.GELU(), nn.Linear(9, 4), nn.ELU(0.5))


def _terms(spec) -> tuple:
    """Everything an exported spec holds, arrays as lists: two specs compare with ==."""
    def values(array):
        return None if array is None else np.asarray(array).tolist()

    def norm(stage):
        return None if stage is None else (stage.eps, values(stage.weight), values(stage.bias))

    return (values(spec.input_offset), norm(spec.input_norm), spec.flattens_input,
            [(values(layer.weight), values(layer.bias), layer.activation, layer.param, norm(layer.norm),
              layer.norm_after_activation) for layer in spec.layers])


@pytest.mark.parametrize("device, index", [("cuda", 0), ("cuda:1", 1)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_exported_model_on_a_cuda_device_gets_the_cuda_encoder(cuda_without_a_gpu, device, index, precision):
    model = _mlp()
    encoder = Encoder(model, device=device, precision=precision)
    (built,) = cuda_without_a_gpu.built
    assert built.asked_device == torch.device(device) and built.precision == precision
    assert _terms(built.spec) == _terms(export_layers(model))
    assert encoder.backend == "native" and encoder.reason is None and encoder._torch_model is None
    assert encoder.kernel == built.kernel and encoder.device == torch.device("cuda", index)
    assert encoder.latent_dim == 4 and encoder.input_shape == (6,)
    assert "backend='native'" in repr(encoder) and f"device='cuda:{index}'" in repr(encoder)


@pytest.mark.parametrize("workspace_floats, full", [(0, True), (2000, True), (4000, True), (4100, False),
                                                    (300_000, False), (10**12, False)])
def test_the_default_batch_on_a_gpu_counts_the_workspace(cuda_without_a_gpu, monkeypatch, workspace_floats, full):
    """Rows per chunk on a GPU: the chunk's input within NATIVE_BATCH_BYTES (as on the CPU), and
    its input, hidden activations (the workspace) and codes, all float32, within
    CUDA_DEVICE_BATCH_BYTES on the device; at most NATIVE_BATCH_ROWS, at least one."""
    monkeypatch.setattr(RecordingCudaEncoder, "workspace_bytes_per_row", 4 * workspace_floats)
    encoder = Encoder(_mlp(), device="cuda")
    per_row = 4 * (6 + workspace_floats + 4)
    expected = max(1, min(encoding.NATIVE_BATCH_ROWS, encoding.CUDA_DEVICE_BATCH_BYTES // per_row))
    assert encoder.default_batch_size == expected
    assert (encoder.default_batch_size == encoding.NATIVE_BATCH_ROWS) == full


@pytest.mark.parametrize("clone", [lambda e: pickle.loads(pickle.dumps(e)), copy.deepcopy])
def test_a_cuda_encoder_is_rebuilt_when_unpickled(cuda_without_a_gpu, clone):
    """The native object is not pickled: loading builds the CUDA encoder again, on the device
    the first one ran on (with its index), from the same exported layers."""
    encoder = Encoder(_mlp(), device="cuda", precision="bf16")
    twin = clone(encoder)
    first, second = cuda_without_a_gpu.built
    assert second is not first and twin._native is second and encoder._native is first
    assert second.asked_device == torch.device("cuda", 0) and second.precision == "bf16"
    assert _terms(second.spec) == _terms(first.spec)
    assert (twin.backend, twin.kernel, twin.device, twin.latent_dim) == ("native", "cuda_wmma_bf16",
                                                                         torch.device("cuda", 0), 4)


# ---------------------------------------------------------------------------------------
# Encoder._run_cuda on CPU tensors, the CPU native encoder behind the CUDA encoder's contract

class CudaContractOnTheCpu:
    """CudaEncoder's contract served by the CPU native encoder: encode(x, out) takes float32
    C-contiguous 2-d tensors on the encoder's device with matching rows, writes out (NaN codes
    for a row holding NaN or Inf) and returns the 0-d int32 flag the first layer sets for such
    rows; first_bad_row(x) names the lowest one (the models here have no input offset)."""

    def __init__(self, cpu_native, device, bad_rows_give_nan=True):
        self._cpu, self.device, self.kernel = cpu_native, device, "cpu-stand-in"
        self._bad_rows_give_nan = bad_rows_give_nan  # False: as a ReLU(-inf) = 0 hides them
        self.calls: list[tuple[int, int, int]] = []  # (x data pointer, out data pointer, rows)

    def encode(self, x, out):
        for tensor in (x, out):
            assert isinstance(tensor, torch.Tensor) and tensor.device == self.device
            assert tensor.dtype == torch.float32 and tensor.dim() == 2 and tensor.is_contiguous()
        assert x.shape[0] == out.shape[0] and x.shape[1] == self._cpu.input_dim and out.shape[1] == self._cpu.output_dim
        self.calls.append((x.data_ptr(), out.data_ptr(), int(x.shape[0])))
        rows = x.numpy()
        finite = np.isfinite(rows).all(axis=1)
        codes = out.numpy()
        self._cpu.encode(np.where(finite[:, None], rows, 0).astype(np.float32), codes)
        if self._bad_rows_give_nan:
            codes[~finite] = np.nan
        return torch.tensor(int(not finite.all()), dtype=torch.int32)

    def first_bad_row(self, x):
        return first_nonfinite_row(x)


def _through_run_cuda(monkeypatch, model, bad_rows_give_nan=True):
    """An Encoder on the CPU whose chunks take _run_cuda (the CUDA path) with the CPU native
    encoder behind CudaEncoder's contract: what runs on a GPU, but with CPU tensors."""
    encoder = Encoder(model, device="cpu")
    assert encoder.backend == "native"
    stand_in = CudaContractOnTheCpu(encoder._native, encoder.device, bad_rows_give_nan)
    monkeypatch.setattr(encoder, "_native", stand_in)
    monkeypatch.setattr(encoder, "_run_native", encoder._run_cuda)  # _run_native's test of device.type == "cuda"
    return encoder, stand_in


@pytest.mark.parametrize("kind", ["float32", "float64 strided", "tensor", "iterable"])
def test_run_cuda_gives_the_cpu_encoders_codes(monkeypatch, rng, kind):
    model = _mlp()
    data = rng.standard_normal((257, 12))
    X = {"float32": data[:, :6].astype(np.float32).copy(), "float64 strided": data[:, ::2],
         "tensor": torch.from_numpy(data[:, 6:].astype(np.float32)),
         "iterable": None}[kind]
    chunks = [data[:100, :6], data[100:101, :6], data[101:, :6]]
    expected = Encoder(model, device="cpu").encode(iter(chunks) if X is None else X, batch_size=64)
    encoder, stand_in = _through_run_cuda(monkeypatch, model)
    z = encoder.encode(iter(chunks) if X is None else X, batch_size=64)
    assert type(z) is type(expected) and z.dtype == expected.dtype and tuple(z.shape) == (257, 4)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(expected))  # the same CPU kernels on the same chunks
    assert [rows for _, _, rows in stand_in.calls] == ([64, 36, 1, 64, 64, 28] if X is None else [64] * 4 + [1])


@pytest.mark.parametrize("out_kind", ["numpy", "tensor"])
def test_run_cuda_fills_every_row_of_out(monkeypatch, rng, out_kind):
    model = _mlp()
    x = rng.standard_normal((131, 6)).astype(np.float32)
    out = np.full((131, 4), np.nan, np.float32)
    out = torch.from_numpy(out) if out_kind == "tensor" else out
    encoder, _ = _through_run_cuda(monkeypatch, model)
    assert encoder.encode(x, out=out, batch_size=50) is out
    np.testing.assert_array_equal(np.asarray(out), Encoder(model, device="cpu").encode(x, batch_size=50))


def test_run_cuda_writes_a_contiguous_float32_target_in_place(monkeypatch, rng):
    """A float32 C-contiguous target tensor on the encoder's device gets the codes directly (no
    second buffer, no copy); any other target gets them copied from a buffer of the codes."""
    model = _mlp()
    x = torch.from_numpy(rng.standard_normal((40, 6)).astype(np.float32))
    expected = Encoder(model, device="cpu").encode(x.numpy())
    encoder, stand_in = _through_run_cuda(monkeypatch, model)
    direct = torch.full((40, 4), float("nan"))
    encoder._run_cuda(x, 0, None, direct)
    assert stand_in.calls[-1][1] == direct.data_ptr()
    np.testing.assert_array_equal(direct.numpy(), expected)
    for target in (torch.full((4, 40), float("nan")).T, torch.full((40, 4), float("nan"), dtype=torch.float64)):
        encoder._run_cuda(x, 0, None, target)
        assert stand_in.calls[-1][1] != target.data_ptr()
        np.testing.assert_array_equal(target.numpy(), expected)


@pytest.mark.parametrize("bad_rows_give_nan", [True, False])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_run_cuda_names_the_first_nonfinite_row(monkeypatch, rng, bad_value, bad_rows_give_nan):
    """Named from the encode's flag, also when the codes of the bad row come out finite."""
    model = _mlp()
    x = rng.standard_normal((200, 6)).astype(np.float32)
    x[[137, 180], 2] = bad_value
    encoder, _ = _through_run_cuda(monkeypatch, model, bad_rows_give_nan)
    with pytest.raises(ValueError, match=r"^X: row 137 contains NaN or Inf"):
        encoder.encode(x, batch_size=64)
    chunks = iter([x[:100], x[100:]])
    with pytest.raises(ValueError, match=r"^X: row 137 \(row 37 of chunk X\[1\]\) contains NaN or Inf"):
        encoder.encode(chunks, batch_size=30)


def test_run_cuda_names_the_model_when_a_finite_row_overflows(monkeypatch, rng):
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = rng.uniform(-1e-3, 1e-3, (90, 3)).astype(np.float32)
    x[71] = 1e10  # 3e40: beyond float32
    encoder, _ = _through_run_cuda(monkeypatch, model)
    with pytest.raises(ValueError, match=r"^model: Sequential gave codes containing NaN or Inf for X's row 71, a "
                                         r"finite row"):
        encoder.encode(x, batch_size=40)


def test_run_cuda_flattens_samples_for_a_leading_flatten(monkeypatch, rng):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.Tanh())
    images = rng.standard_normal((20, 2, 3)).astype(np.float32)
    encoder, stand_in = _through_run_cuda(monkeypatch, model)
    z = encoder.encode(images, batch_size=8)
    np.testing.assert_array_equal(z, Encoder(model, device="cpu").encode(images.reshape(20, 6), batch_size=8))
    assert [rows for _, _, rows in stand_in.calls] == [8, 8, 4]


def test_run_cuda_names_the_model_when_a_nan_is_made_behind_a_relu(monkeypatch):
    """A NaN made inside the model (inf - inf) must reach the codes through a ReLU, as in torch,
    so that the check of the codes names the model instead of returning finite codes."""
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # a row of 1e10 gives (inf, inf), then inf - inf = NaN
        model[1].weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = np.array([[1.0], [2.0], [1e10], [3.0]], np.float32)
    with torch.no_grad():
        assert torch.isnan(model(torch.from_numpy(x))[2]).all()
    encoder, _ = _through_run_cuda(monkeypatch, model)
    with pytest.raises(ValueError, match=r"^model: Sequential gave codes containing NaN or Inf for X's row 2, a "
                                         r"finite row"):
        encoder.encode(x)

"""latentspace.encode with CUDA: models and tensors on the GPU run the torch backend there
(LATENTSPACE_CUDA_ENCODER=torch, pinned below: the default is the CUDA encoder since GPU run
10), results come back where the input lives, and the native (CPU) encoder takes CUDA tensors
when asked to. Marked "cuda": skipped where torch sees no GPU (run with `pytest -m cuda`)."""

import numpy as np
import pytest
import torch

import latentspace as ls

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]


@pytest.fixture(autouse=True)
def torch_encoder_on_the_gpu(monkeypatch):
    """These tests are about the torch backend on a GPU (the default was torch until GPU run
    10 verified the CUDA encoder; tests/gpu/test_encode_cuda_native.py covers that one):
    pinned, so that neither the environment nor the default changes what they test."""
    monkeypatch.setenv("LATENTSPACE_CUDA_ENCODER", "torch")


@pytest.fixture(params=["torch", "native"])
def encoder_backend(request, torch_encoder_on_the_gpu, monkeypatch):
    """For the tests both backends must pass alike: the pinned torch, then the CUDA encoder
    (the default since GPU run 10). Set after the module's pin, which it overrides."""
    if request.param == "native" and not ls.build_info()["cuda_compiled"]:
        pytest.skip("latentspace was built without CUDA")
    monkeypatch.setenv("LATENTSPACE_CUDA_ENCODER", request.param)
    return request.param


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ls.Autoencoder(64, 4, hidden=(32,)).eval()


@pytest.fixture
def digits():
    return ls.datasets.load_digits()[0][:500]


def _close(actual, expected, rtol=1e-4):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max())


def test_a_model_on_the_gpu_runs_torch_there(model, digits):
    expected = model.encode(digits)
    gpu = model.cuda()
    encoder = ls.Encoder(gpu)
    assert encoder.backend == "torch" and encoder.device.type == "cuda"
    assert encoder.reason == "the work runs on 'cuda:0': LATENTSPACE_CUDA_ENCODER=torch asks for the model's torch code"
    z = encoder.encode(digits, batch_size=128)
    assert isinstance(z, np.ndarray)
    _close(z, expected)
    zt = encoder.encode(torch.from_numpy(digits).cuda())
    assert zt.device.type == "cuda" and zt.dtype == torch.float32
    _close(zt.cpu().numpy(), expected)
    chunks = iter([torch.from_numpy(digits[:100]).cuda(), torch.from_numpy(digits[100:]).cuda()])
    zc = encoder.encode(chunks)
    assert zc.device.type == "cuda"
    _close(zc.cpu().numpy(), expected)


def test_device_argument_moves_a_private_copy(model, digits):
    encoder = ls.Encoder(model, device="cuda")
    assert encoder.backend == "torch" and encoder.device.type == "cuda"
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays
    _close(encoder.encode(digits), model.encode(digits))


def test_cuda_tensors_through_the_cpu_encoder(model, digits):
    encoder = ls.Encoder(model, device="cpu")
    z = encoder.encode(torch.from_numpy(digits).cuda(), batch_size=64)
    assert z.device.type == "cuda"  # the result goes back where the input was
    _close(z.cpu().numpy(), model.encode(digits), rtol=1e-5)


def test_bf16_autocast_and_nan_rows_on_the_gpu(model, digits):
    gpu = model.cuda()
    exact = ls.encode(gpu, digits)
    low = ls.encode(gpu, digits, precision="bf16")
    error = np.abs(low - exact).max() / np.abs(exact).max()
    assert 0 < error < 3e-2
    x = torch.from_numpy(digits).cuda()
    x[321, 5] = float("nan")
    with pytest.raises(ValueError, match="X: row 321 contains NaN or Inf"):
        ls.encode(gpu, x, batch_size=100)


def test_add_encoded_from_a_gpu_model(model, digits, encoder_backend):
    """A GPU model's codes into a CPU index equal encode's, for either backend (the default,
    native, copies each chunk's codes from the device into the index's rows)."""
    gpu = model.cuda()
    assert ls.Encoder(gpu).backend == encoder_backend
    index = ls.FlatIndex(4)
    assert index.add_encoded(gpu, digits, batch_size=100) == 500
    np.testing.assert_array_equal(index.vectors(), ls.encode(gpu, digits, batch_size=100))


@pytest.mark.skipif(not ls.cuda_available(), reason="latentspace's CUDA search is not usable here")
@pytest.mark.parametrize("iterable", [False, True])
def test_add_encoded_into_a_gpu_index(model, digits, iterable):
    """The codes go straight into the index's device tensor (grown as chunks arrive for an
    iterable) and search there equals a CPU index built from the same codes."""
    cpu = ls.FlatIndex(4)
    cpu.add(np.zeros((3, 4), np.float32))
    cpu.add(model.encode(digits))
    gpu = ls.FlatIndex(4, device="cuda")
    gpu.add(np.zeros((3, 4), np.float32))  # rows already present stay in place
    source = iter([digits[:123], digits[123:124], digits[124:]]) if iterable else digits
    assert gpu.add_encoded(model, source, batch_size=64) == len(digits)
    assert gpu.ntotal == cpu.ntotal == len(digits) + 3
    _close(gpu.vectors(), cpu.vectors())
    queries = cpu.vectors()[::50]
    D_cpu, I_cpu = cpu.search(queries, 7)
    D_gpu, I_gpu = gpu.search(queries, 7)
    _close(D_gpu, D_cpu)
    assert (I_gpu[:, 0] == I_cpu[:, 0]).mean() > 0.9  # codes agree to rounding: near-ties may swap


def test_out_on_the_gpu_takes_the_torch_encoders_codes(model, digits):
    """torch on a GPU writes a CUDA out by a copy of each chunk's codes (a slice of a bigger
    tensor here: the rows around it stay as they were)."""
    gpu = model.cuda()
    whole = torch.full((len(digits) + 2, 4), float("nan"), device="cuda")
    out = whole[1:-1]
    encoder = ls.Encoder(gpu)
    assert encoder.encode(torch.from_numpy(digits).cuda(), out=out, batch_size=128) is out
    _close(out.cpu().numpy(), model.cpu().encode(digits))
    assert torch.isnan(whole[0]).all() and torch.isnan(whole[-1]).all()

"""Training on a CUDA GPU: device="auto" picks it, bf16 autocast, models and files move
between devices. Marked "cuda": skipped where torch sees no GPU (run with `pytest -m cuda`)."""

import math

import numpy as np
import pytest
import torch

import latentspace as ls

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]


@pytest.fixture(scope="module")
def digits():
    return ls.datasets.load_digits()[0][:600]


def test_auto_picks_cuda_and_trains_with_bf16_autocast(digits, tmp_path):
    torch.manual_seed(0)
    model = ls.VAE(64, 4, hidden=(64,))
    history = ls.train(model, digits, epochs=5, batch_size=64, lr=3e-3, progress=False,
                       checkpoint=tmp_path / "m.safetensors")
    assert history.device.startswith("cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # autocast keeps float32 weights
    assert all(map(math.isfinite, history.train_loss))
    assert history.train_loss[-1] < history.train_loss[0]
    z = model.encode(digits)  # numpy in: moved to the GPU and back
    assert isinstance(z, np.ndarray) and z.shape == (600, 4)
    loaded = ls.load_model(tmp_path / "m.safetensors")  # on the CPU
    np.testing.assert_allclose(loaded.encode(digits), z, rtol=1e-4, atol=1e-5)


def test_cuda_tensor_inputs_stay_on_the_gpu(digits):
    model = ls.Autoencoder(64, 4, hidden=(32,)).cuda()
    x = torch.from_numpy(digits).cuda()
    assert model.encode(x).device.type == "cuda"
    with pytest.raises(ValueError, match="expected a tensor on the model's device"):
        model.encode(x.cpu())


def test_conv_trains_on_cuda_without_autocast(digits):
    torch.manual_seed(0)
    model = ls.ConvAutoencoder((1, 8, 8), 4, channels=(8, 16))
    history = ls.train(model, digits, epochs=3, device="cuda", autocast=False, progress=False)
    assert history.device.startswith("cuda") and history.train_loss[-1] < history.train_loss[0]

"""Training on a CUDA GPU: device="auto" picks it, bf16 autocast, models and files move
between devices. Marked "cuda": skipped where torch sees no GPU (run with `pytest -m cuda`)."""

import math

import numpy as np
import pytest
import torch

import latentspace as ls

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]


@pytest.fixture(params=["native", "torch"])
def losses_backend(request, monkeypatch):
    """Both implementations of the losses on CUDA tensors (LATENTSPACE_CUDA_LOSSES; native is
    the default since GPU run 10, torch's ops the other choice)."""
    monkeypatch.setenv("LATENTSPACE_CUDA_LOSSES", request.param)
    return request.param


@pytest.fixture(scope="module")
def digits():
    return ls.datasets.load_digits()[0][:600]


def test_auto_picks_cuda_and_trains_with_bf16_autocast(digits, tmp_path, losses_backend):
    # Both losses backends: native became the default in GPU run 10, and torch's ops (still
    # a choice) would otherwise no longer run in a training loop on any GPU test.
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


def test_conv_trains_on_cuda_without_autocast(digits, losses_backend):
    torch.manual_seed(0)
    model = ls.ConvAutoencoder((1, 8, 8), 4, channels=(8, 16))
    history = ls.train(model, digits, epochs=3, device="cuda", autocast=False, progress=False)
    assert history.device.startswith("cuda") and history.train_loss[-1] < history.train_loss[0]


def test_bce_on_cuda_refuses_like_the_cpu_and_keeps_nan_out_of_torch_kernel(losses_backend):
    """kind="bce" on CUDA tensors: torch's kernel asserts on the device for values outside
    [0, 1] and for NaN (the CUDA context is unusable after), so the torch path refuses them
    first; both paths give the CPU's message, and keep NaN to its own row as on the CPU."""
    from latentspace.losses import reconstruction_loss

    target = torch.full((3, 5), 0.5)
    recon = torch.full((3, 5), 0.25)
    recon[2, 4] = 1.5
    messages = []
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=r"recon.*\[0, 1\]") as caught:
            reconstruction_loss(recon.to(device), target.to(device), "bce", "none")
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    recon[2, 4] = float("nan")
    cpu = reconstruction_loss(recon, target, "bce", "none")
    gpu_recon = recon.cuda().requires_grad_()
    gpu = reconstruction_loss(gpu_recon, target.cuda(), "bce", "none")
    gpu.sum().backward()
    torch.cuda.synchronize()  # a device-side assert would surface here
    assert torch.isnan(gpu[2]) and torch.isnan(cpu[2])
    torch.testing.assert_close(gpu[:2].cpu(), cpu[:2])
    assert torch.isnan(gpu_recon.grad[2, 4]) and torch.isfinite(gpu_recon.grad[:2]).all()
    assert float(torch.ones(4, device="cuda").sum()) == 4.0  # the context still works


def test_bce_on_cuda_takes_any_target_like_the_cpu(losses_backend):
    """The target also reaches torch's CUDA kernel, which asserts 'target_val >= zero &&
    target_val <= one' on the device (NaN included): the torch path keeps it out of the
    kernel; both paths give the CPU's values and gradient."""
    from latentspace.losses import reconstruction_loss

    recon = torch.full((3, 5), 0.25, dtype=torch.float64)
    target = torch.full((3, 5), 0.5, dtype=torch.float64)
    target[0, 1], target[2, 4] = 2.0, float("nan")
    grads = []
    for device in ("cpu", "cuda"):
        # A leaf of its own on each device: recon.to("cpu") is recon itself, and once it
        # requires grad, recon.to("cuda") would be a non-leaf whose .grad stays None.
        r = recon.detach().to(device).requires_grad_()
        rows = reconstruction_loss(r, target.to(device), "bce", "none")
        rows.sum().backward()
        grads.append((rows.detach().cpu(), r.grad.cpu()))
    torch.cuda.synchronize()  # a device-side assert would surface here
    torch.testing.assert_close(grads[1][0], grads[0][0], equal_nan=True)
    torch.testing.assert_close(grads[1][1], grads[0][1], equal_nan=True)
    assert float(torch.ones(4, device="cuda").sum()) == 4.0  # the context still works

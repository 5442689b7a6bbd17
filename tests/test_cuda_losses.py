"""The CUDA losses' host side, on any machine: which implementation CUDA tensors get, and the
native entry points' argument checks, which run before anything reaches a GPU. (The kernels
themselves: tests/gpu/test_losses_cuda.py, on a GPU.)"""

import pytest
import torch

import latentspace as ls
from conftest import NVCC, run_cuda_host_check
from latentspace import _cuda_losses, _native
from latentspace.losses import kl_normal, reconstruction_loss

CUDA_BUILT = ls.build_info()["cuda_compiled"]


# The default for unset / "" / "auto": DEFAULT_BACKEND where the build has CUDA kernels, torch's
# ops in a build without them (_cuda_switch.choose_backend).
DEFAULT = _cuda_losses.DEFAULT_BACKEND if CUDA_BUILT else "torch"


@pytest.mark.parametrize("value, expected", [
    (None, DEFAULT), ("", DEFAULT), ("auto", DEFAULT), ("native", "native"), ("torch", "torch"),
])
def test_backend_setting(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(_cuda_losses.BACKEND_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(_cuda_losses.BACKEND_VARIABLE, value)
    assert _cuda_losses.backend() == expected


@pytest.mark.parametrize("value", ["Native", "1", "cuda", " native"])
def test_a_bad_backend_setting_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(_cuda_losses.BACKEND_VARIABLE, value)
    with pytest.raises(ValueError, match="LATENTSPACE_CUDA_LOSSES: expected 'auto', 'native' or 'torch'"):
        _cuda_losses.backend()


def test_the_setting_does_not_touch_cpu_tensors(monkeypatch):
    """CPU tensors always take the CPU kernels; the variable is read for CUDA tensors only."""
    monkeypatch.setenv(_cuda_losses.BACKEND_VARIABLE, "no such backend")
    recon, target = torch.rand(4, 6), torch.rand(4, 6)
    expected = torch.nn.functional.mse_loss(recon, target)
    torch.testing.assert_close(reconstruction_loss(recon, target), expected)
    assert torch.isfinite(kl_normal(recon, target))


needs_cuda_build = pytest.mark.skipif(not CUDA_BUILT, reason="a build without CUDA has only the stubs")


@needs_cuda_build
@pytest.mark.parametrize("rows, cols, expected", [
    (1, 1, 0), (5, 2048, 0), (5, 2049, 10), (3, 5000, 9), (2, 70_001, 2 * 35),
])
def test_workspace_holds_a_sum_per_segment_of_rows_longer_than_one(rows, cols, expected):
    assert _native.loss_cuda_workspace_doubles(rows, cols) == expected


def _reconstruction(**changes):
    """reconstruction_loss_cuda with arguments that pass every check, except `changes`."""
    arguments = dict(recon=8, target=8, rows=3, cols=4, kind=0, grad_scale=1.0, grad=0, row_losses=8, total=8,
                     out_of_range=0, workspace=0, stream=0, float64=False)
    arguments.update(changes)
    return _native.reconstruction_loss_cuda(**arguments)


@needs_cuda_build
@pytest.mark.parametrize("changes, match", [
    (dict(rows=0), "rows, cols: expected at least 1 each"),
    (dict(cols=0), "rows, cols: expected at least 1 each"),
    (dict(kind=3), "kind: expected 0 \\(mse\\), 1 \\(bce\\) or 2 \\(bce_logits\\)"),
    (dict(kind=-1), "kind: expected"),
    (dict(recon=0, target=0), "recon: expected a device pointer"),
    (dict(target=0), "target: expected a device pointer"),
    (dict(row_losses=0), "row_losses, total: expected device buffers"),
    (dict(total=0), "row_losses, total: expected device buffers"),
    (dict(kind=1), "out_of_range: kind='bce' needs a zeroed device flag"),
    (dict(cols=2049), "workspace: expected loss_cuda_workspace_doubles\\(3, 2049\\) doubles"),
])
def test_reconstruction_arguments_are_checked_before_any_launch(changes, match):
    with pytest.raises(ValueError, match=match):
        _reconstruction(**changes)


@needs_cuda_build
@pytest.mark.parametrize("changes, match", [
    (dict(rows=0), "rows, cols: expected at least 1 each"),
    (dict(mu=0), "mu: expected a device pointer"),
    (dict(logvar=0), "logvar: expected a device pointer"),
    (dict(total=0), "row_losses, total: expected device buffers"),
    (dict(cols=5000), "workspace: expected"),
])
def test_kl_arguments_are_checked_before_any_launch(changes, match):
    arguments = dict(mu=8, logvar=8, rows=3, cols=4, grad_scale=1.0, grad_mu=0, grad_logvar=0, row_losses=8,
                     total=8, workspace=0, stream=0, float64=True)
    arguments.update(changes)
    with pytest.raises(ValueError, match=match):
        _native.kl_normal_cuda(**arguments)


@pytest.mark.skipif(CUDA_BUILT, reason="the stubs exist only in a build without CUDA")
def test_a_build_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _native.loss_cuda_workspace_doubles(3, 4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_cuda_forward_contract_gives_the_same_losses(monkeypatch, reduction):
    """The CUDA forwards return the sum as a 0-d float64 device tensor and always the per-row
    sums (nothing is read back); the CPU ones return a float. Run the CPU kernels under the
    CUDA contract: the loss and the gradients the caller sees must not change."""
    from latentspace import losses

    generator = torch.Generator().manual_seed(7)
    recon = torch.rand(5, 3, 4, generator=generator, requires_grad=True)
    target = torch.rand(5, 3, 4, generator=generator, requires_grad=True)
    mu, logvar = (torch.randn(5, 6, generator=generator, requires_grad=True) for _ in range(2))

    def run():
        values = (reconstruction_loss(recon, target, "bce_logits", reduction), kl_normal(mu, logvar, reduction))
        grads = torch.autograd.grad(sum(v.sum() for v in values), (recon, target, mu, logvar))
        return values, grads

    expected_values, expected_grads = run()
    cpu_reconstruction, cpu_kl = losses._reconstruction_cpu, losses._kl_cpu

    def reconstruction_as_cuda(recon, target, kind, grad_scale, needs_grad, per_row):
        total, row_losses, grad = cpu_reconstruction(recon, target, kind, grad_scale, needs_grad, True)
        return torch.tensor(total, dtype=torch.float64), row_losses, grad

    def kl_as_cuda(mu, logvar, grad_scale, needs_mu, needs_logvar, per_row):
        total, row_losses, grad_mu, grad_logvar = cpu_kl(mu, logvar, grad_scale, needs_mu, needs_logvar, True)
        return torch.tensor(total, dtype=torch.float64), row_losses, grad_mu, grad_logvar

    monkeypatch.setattr(losses, "_reconstruction_cpu", reconstruction_as_cuda)
    monkeypatch.setattr(losses, "_kl_cpu", kl_as_cuda)
    values, grads = run()
    for value, expected in zip(values, expected_values):
        assert value.dtype == expected.dtype and value.shape == expected.shape
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@needs_cuda_build
@pytest.mark.parametrize("changes, match", [
    (dict(rows=0), "rows, cols: expected at least 1 each"),
    (dict(cols=0), "rows, cols: expected at least 1 each"),
    (dict(grad=0), "grad, factors: expected device pointers"),
    (dict(factors=0), "grad, factors: expected device pointers"),
])
def test_scaling_arguments_are_checked_before_any_launch(changes, match):
    arguments = dict(grad=8, rows=3, cols=4, factors=8, per_row=False, stream=0, float64=False)
    arguments.update(changes)
    with pytest.raises(ValueError, match=match):
        _native.scale_rows_unless_one_cuda(**arguments)


@pytest.mark.parametrize("kind", ["mse", "bce", "bce_logits"])
def test_no_gradient_is_computed_without_autograd(monkeypatch, kind):
    """Under torch.no_grad(), or for inputs that need no gradient, the native forward gets no
    gradient buffer (ctx.needs_input_grad says True under no_grad; the buffer and its write
    were paid for nothing in an evaluation loop)."""
    from latentspace import losses

    calls = []
    native = _native.reconstruction_loss

    def recording(recon, target, kind_code, grad_scale, grad=None, row_losses=None):
        calls.append(grad)
        return native(recon, target, kind_code, grad_scale, grad, row_losses)

    monkeypatch.setattr(losses._native, "reconstruction_loss", recording)
    recon = torch.rand(6, 5, requires_grad=True)
    target = torch.rand(6, 5)
    with torch.no_grad():
        quiet = [reconstruction_loss(recon, target, kind, reduction) for reduction in ("mean", "sum", "none")]
    plain = [reconstruction_loss(recon.detach(), target, kind, reduction) for reduction in ("mean", "sum", "none")]
    assert calls == [None] * 6
    graded = [reconstruction_loss(recon, target, kind, reduction) for reduction in ("mean", "sum", "none")]
    assert all(grad is not None for grad in calls[6:]) and len(calls) == 9
    for a, b, c in zip(quiet, plain, graded):
        assert not a.requires_grad and not b.requires_grad and c.requires_grad
        torch.testing.assert_close(a, c.detach(), rtol=0, atol=0)
        torch.testing.assert_close(b, c.detach(), rtol=0, atol=0)


def test_kl_without_autograd_computes_no_gradient(monkeypatch):
    from latentspace import losses

    calls = []
    native = _native.kl_normal

    def recording(mu, logvar, grad_scale, grad_mu=None, grad_logvar=None, row_losses=None):
        calls.append((grad_mu, grad_logvar))
        return native(mu, logvar, grad_scale, grad_mu, grad_logvar, row_losses)

    monkeypatch.setattr(losses._native, "kl_normal", recording)
    mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        quiet = kl_normal(mu, logvar, "none")
    graded = kl_normal(mu, logvar, "none")
    assert calls[0] == (None, None) and all(g is not None for g in calls[1])
    torch.testing.assert_close(quiet, graded.detach(), rtol=0, atol=0)


def test_a_second_backward_through_the_same_graph_on_the_cpu():
    recon = torch.rand(5, 7, requires_grad=True)
    target = torch.rand(5, 7)
    loss = 3 * reconstruction_loss(recon, target, "mse", "sum") + 2 * kl_normal(recon, target, "mean")
    loss.backward(retain_graph=True)
    once = recon.grad.clone()
    loss.backward()
    torch.testing.assert_close(recon.grad, 2 * once)


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_the_kernels_formulas_and_segments_on_the_host(tmp_path):
    """csrc/cuda/losses_math.cuh, the code the kernels run, compiled for the host and checked
    against long double references: every kind and the KL in float32 and float64 over edge
    values (0, 1, denormals, +-inf, NaN, logits of +-1e4) and random ones, NaN exactly where the
    formula gives it, and every element of a row in exactly one segment."""
    result = run_cuda_host_check("losses_math_check", tmp_path)
    assert result.returncode == 0 and "failures 0" in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("wrong 0") == 9  # four checks for each of two types, and the segments


@pytest.mark.parametrize("no_grad", [False, True])
def test_forward_mode_ad_gets_its_tangent_not_a_loss_without_one(no_grad):
    """A dual tensor does not require grad: the no-gradient shortcut took it and returned a
    loss without a tangent (a silently wrong jvp). Dual tensors take torch's own ops (the same
    formulas), under torch.no_grad() too: the tangent is the directional derivative."""
    import torch.autograd.forward_ad as forward_ad

    recon, target = torch.rand(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    direction = torch.rand(4, 3, dtype=torch.float64)
    expected_mse = (2 * (recon - target) * direction).sum() / recon.numel()
    expected_kl = (recon * direction).sum() / recon.shape[0]  # d/dmu of 0.5 (mu^2 + e^lv - 1 - lv), summed per row
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(recon, direction)
        with torch.no_grad() if no_grad else torch.enable_grad():
            mse = reconstruction_loss(dual, target)
            kl = kl_normal(dual, target)
        torch.testing.assert_close(forward_ad.unpack_dual(mse).tangent, expected_mse)
        torch.testing.assert_close(forward_ad.unpack_dual(kl).tangent, expected_kl)


@pytest.mark.parametrize("transform", ["vmap", "jvp"])
def test_torch_func_transforms_never_hand_wrapped_tensors_to_the_kernels(transform):
    """(The shortcut handed functorch's wrapped tensors to the kernel: "Cannot access data
    pointer of Tensor that doesn't have storage"; then the autograd.Function refused them.)
    They take torch's own ops: the per-sample losses, and the jvp's tangent."""
    recon, target = torch.rand(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    if transform == "vmap":
        batch = torch.stack([recon, recon * 0.5])
        got = torch.func.vmap(lambda r: reconstruction_loss(r, target))(batch)
        torch.testing.assert_close(got, torch.stack([reconstruction_loss(r, target) for r in batch]))
    else:
        value, tangent = torch.func.jvp(lambda r: kl_normal(r, target), (recon,), (torch.ones_like(recon),))
        torch.testing.assert_close(value, kl_normal(recon, target))
        torch.testing.assert_close(tangent, recon.sum() / recon.shape[0])


def test_a_negated_view_is_read_as_its_values():
    """torch's lazy negation (z.conj().imag, torch._neg_view) leaves the memory un-negated: the
    kernels, which read memory (and on a GPU take the data pointer as it is), must get the
    values. (The CPU path raised torch's "Can't call numpy() on Tensor that has negative bit
    set", naming nothing.)"""
    generator = torch.Generator().manual_seed(3)
    recon = torch.randn(6, 5, generator=generator)
    target = torch.rand(6, 5, generator=generator)
    negated = torch._neg_view(recon)
    assert negated.is_neg()
    for kind in ("mse", "bce_logits"):
        torch.testing.assert_close(reconstruction_loss(negated, target, kind, "none"),
                                   reconstruction_loss(-recon, target, kind, "none"), rtol=0, atol=0)
    torch.testing.assert_close(kl_normal(negated, target, "none"), kl_normal(-recon, target, "none"),
                               rtol=0, atol=0)

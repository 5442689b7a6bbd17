"""The fused losses' CUDA kernels (csrc/cuda/losses.cu) against float64 references.

Every test forces the native kernels (LATENTSPACE_CUDA_LOSSES=native, the default since GPU
run 10, docs/gpu-runs.md), so that the environment cannot change what they test. Inputs are fresh
random values each run; outputs handed to the kernels directly are poisoned first, so an
element the kernel forgets to write shows up as NaN. Marked "cuda": skipped where torch sees
no GPU (run with `pytest -m cuda`)."""

import math

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace import _native
from latentspace.losses import kl_normal, reconstruction_loss

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]

KINDS = ("mse", "bce", "bce_logits")
REDUCTIONS = ("mean", "sum", "none")
# (rows, cols): one element; a short row; the digits' width; a row of exactly one segment
# (2,048 elements) and one just past it; rows of several segments with a partial last one.
SHAPES = [(1, 1), (7, 13), (64, 784), (3, 2048), (3, 2049), (5, 5000), (2, 70_001)]


@pytest.fixture(autouse=True)
def native_cuda_losses(monkeypatch):
    monkeypatch.setenv("LATENTSPACE_CUDA_LOSSES", "native")


@pytest.fixture
def generator():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _inputs(kind, shape, generator, dtype=torch.float32):
    """recon (probabilities for bce, logits otherwise) and target, on the CPU in float64."""
    if kind == "bce":
        recon = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    else:
        recon = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    return recon.to(dtype).to(torch.float64), target.to(dtype).to(torch.float64)


def _reference_elementwise(kind, r, t):
    """Elementwise loss in float64 with the library's formulas."""
    if kind == "mse":
        return (r - t) ** 2
    if kind == "bce":
        return -(t * torch.clamp(torch.log(r), min=-100) + (1 - t) * torch.clamp(torch.log1p(-r), min=-100))
    # softplus(r) - r t: its autograd derivative is sigmoid(r) - t everywhere. The stable
    # max(r, 0) - r t + log1p(exp(-|r|)) has the same value, but autograd takes clamp's and
    # abs's derivatives at r = 0 as 1 and 0, which gives 1 - t instead of 0.5 - t there
    # (float32 randn draws exact zeros: GPU run 10's bce_logits cells hit 1 and 9 of them).
    # threshold=50: log1p(exp(r)) up to r = 50, well inside float64.
    return torch.nn.functional.softplus(r, threshold=50) - r * t


def _reference(kind, reduction, r, t):
    """The loss and d(loss)/d(recon), in float64 on the CPU, by autograd over the formulas."""
    r = r.clone().requires_grad_(True)
    elementwise = _reference_elementwise(kind, r, t)
    per_row = elementwise.reshape(elementwise.shape[0], -1).sum(dim=1)
    value = {"none": per_row, "sum": per_row.sum(), "mean": elementwise.mean()}[reduction]
    (grad,) = torch.autograd.grad(value.sum(), r)
    return value.detach(), grad


def _assert_close(actual, expected, rtol, floor=0.0):
    """floor: the size of the terms behind one expected value (1 for a loss, grad_scale for a
    gradient). float32 rounds each term relative to its own size, so where the terms nearly
    cancel (sigmoid(x) - t, exp(lv) - 1 near 0, a single element) the error is relative to
    them, not to the small result."""
    actual = actual.detach().cpu().to(torch.float64)
    scale = max(expected.abs().max().item(), floor) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def _grad_scale(reduction, count):
    return 1.0 / count if reduction == "mean" else 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradient_match_float64(kind, reduction, shape, dtype, generator):
    r64, t64 = _inputs(kind, shape, generator, dtype)
    expected, expected_grad = _reference(kind, reduction, r64, t64)
    recon = r64.to(dtype).cuda().requires_grad_(True)
    loss = reconstruction_loss(recon, t64.to(dtype).cuda(), kind, reduction)
    assert loss.device.type == "cuda" and loss.dtype == dtype
    loss.sum().backward()
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    _assert_close(loss, expected, rtol, floor=1.0)
    _assert_close(recon.grad, expected_grad, rtol, floor=_grad_scale(reduction, r64.numel()))


@pytest.mark.parametrize("kind", KINDS)  # bce: log(1 - r) - log(r), torch ops on the saved recon
def test_target_gradient(kind, generator):
    r64, t64 = _inputs(kind, (9, 3000), generator, torch.float64)
    r = r64.clone().requires_grad_(True)
    t = t64.clone().requires_grad_(True)
    _reference_elementwise(kind, r, t).mean().backward()
    recon, target = r64.cuda().requires_grad_(True), t64.cuda().requires_grad_(True)
    reconstruction_loss(recon, target, kind, "mean").backward()
    _assert_close(target.grad, t.grad, 1e-10)
    _assert_close(recon.grad, r.grad, 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_matches_float64(shape, reduction, dtype, generator):
    mu64 = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(torch.float64)
    lv64 = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(torch.float64)
    m, lv = mu64.clone().requires_grad_(True), lv64.clone().requires_grad_(True)
    per_row = (-0.5 * (1 + lv - m**2 - lv.exp())).sum(dim=1)
    expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.mean()}[reduction]
    expected.sum().backward()
    mu, logvar = mu64.to(dtype).cuda().requires_grad_(True), lv64.to(dtype).cuda().requires_grad_(True)
    value = kl_normal(mu, logvar, reduction)
    value.sum().backward()
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    grad_floor = _grad_scale(reduction, shape[0])
    _assert_close(value, expected.detach(), rtol, floor=1.0)
    _assert_close(mu.grad, m.grad, rtol, floor=grad_floor)
    _assert_close(logvar.grad, lv.grad, rtol, floor=grad_floor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype, generator):
    r64, t64 = _inputs("bce_logits", (33, 700), generator, dtype)
    expected, expected_grad = _reference("bce_logits", "mean", r64, t64)
    recon = r64.to(dtype).cuda().requires_grad_(True)
    loss = reconstruction_loss(recon, t64.to(dtype).cuda(), "bce_logits")
    loss.backward()
    assert loss.dtype == dtype and recon.grad.dtype == dtype
    _assert_close(loss.float(), expected, 1e-2)
    _assert_close(recon.grad.float(), expected_grad, 1e-2)


# One pass of the segment kernels' grid: kMaxSegmentBlocks (2^20) blocks of 8 warps, a warp per
# (row, segment) item (csrc/cuda/losses.cu).
ITEMS_PER_GRID_PASS = 2**20 * 8


def test_many_rows_loop_over_the_grid_and_the_finish_block(generator):
    """More rows than the finish block has threads, and more items (rows of one segment) than
    one pass of the grid has warps: the grid-stride loop runs twice."""
    r64, t64 = _inputs("mse", (ITEMS_PER_GRID_PASS + 4099, 1), generator)
    expected, expected_grad = _reference("mse", "none", r64, t64)
    recon = r64.float().cuda().requires_grad_(True)
    per_row = reconstruction_loss(recon, t64.float().cuda(), "mse", "none")
    per_row.sum().backward()
    _assert_close(per_row, expected, 2e-5)
    _assert_close(recon.grad, expected_grad, 2e-5)


def test_non_contiguous_and_multidimensional_inputs(generator):
    r64, t64 = _inputs("mse", (40, 3, 8, 8), generator)
    expected, expected_grad = _reference("mse", "none", r64.reshape(40, -1), t64.reshape(40, -1))
    recon = r64.float().cuda().transpose(2, 3).requires_grad_(True)  # a strided view
    target = t64.float().cuda().transpose(2, 3)
    per_row = reconstruction_loss(recon, target, "mse", "none")
    per_row.sum().backward()
    _assert_close(per_row, expected, 2e-5)
    _assert_close(recon.grad.transpose(2, 3).reshape(40, -1), expected_grad, 2e-5)


def test_same_bits_every_call(generator):
    r64, t64 = _inputs("bce_logits", (1000, 5000), generator)
    recon, target = r64.float().cuda(), t64.float().cuda()
    first = [reconstruction_loss(recon, target, "bce_logits", reduction) for reduction in REDUCTIONS]
    second = [reconstruction_loss(recon, target, "bce_logits", reduction) for reduction in REDUCTIONS]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_nan_propagates_to_its_row_and_element_only(generator):
    for kind in KINDS:
        r64, t64 = _inputs(kind, (4, 3000), generator)
        r64[2, 2500] = float("nan")
        recon = r64.float().cuda().requires_grad_(True)
        per_row = reconstruction_loss(recon, t64.float().cuda(), kind, "none")
        per_row.sum().backward()
        finite_rows = torch.isfinite(per_row.cpu())
        assert finite_rows.tolist() == [True, True, False, True], kind
        nan_grad = torch.isnan(recon.grad.cpu())
        assert nan_grad[2, 2500] and nan_grad.sum() == 1, kind


def test_bce_edges_follow_torch_clamps():
    recon = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.25]], dtype=torch.float64)
    expected = torch.nn.functional.binary_cross_entropy(recon, target, reduction="sum")
    r = recon.cuda().requires_grad_(True)
    loss = reconstruction_loss(r, target.cuda(), "bce", "sum")
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)  # 200 from the two clamped logs
    r_cpu = recon.clone().requires_grad_(True)
    torch.nn.functional.binary_cross_entropy(r_cpu, target, reduction="sum").backward()
    torch.testing.assert_close(r.grad.cpu(), r_cpu.grad)


@pytest.mark.parametrize("bad", [-1e-6, 1.5, float("inf")])
def test_bce_outside_the_unit_interval_raises_and_the_gpu_stays_usable(bad):
    recon = torch.full((3, 4000), 0.5, device="cuda")
    recon[1, 3999] = bad
    with pytest.raises(ValueError, match="recon: kind='bce' expects probabilities in \\[0, 1\\]"):
        reconstruction_loss(recon, torch.zeros_like(recon), "bce")
    ok = reconstruction_loss(torch.full((3, 4000), 0.5, device="cuda"), torch.zeros(3, 4000, device="cuda"), "bce")
    assert ok.item() == pytest.approx(math.log(2), rel=1e-6)


def test_a_side_stream_is_followed(generator):
    """The inputs arrive on a side stream held busy first: a kernel queued anywhere else runs
    before they are there and sums whatever the fresh memory held."""
    r64, t64 = _inputs("mse", (512, 4096), generator)
    expected, _ = _reference("mse", "sum", r64, t64)
    recon_host, target_host = r64.float().pin_memory(), t64.float().pin_memory()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time on the side stream
        recon = recon_host.to("cuda", non_blocking=True)
        target = target_host.to("cuda", non_blocking=True)
        value = reconstruction_loss(recon, target, "mse", "sum")
    stream.synchronize()
    _assert_close(value, expected, 2e-5)


def test_native_and_torch_paths_agree(monkeypatch, generator):
    r64, t64 = _inputs("bce", (128, 784), generator)
    recon, target = r64.float().cuda(), t64.float().cuda()
    native = [reconstruction_loss(recon, target, kind, "none") for kind in ("mse", "bce")]
    monkeypatch.setenv("LATENTSPACE_CUDA_LOSSES", "torch")
    torch_path = [reconstruction_loss(recon, target, kind, "none") for kind in ("mse", "bce")]
    for a, b in zip(native, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_on_the_gpu(generator):
    for kind in KINDS:
        r64, t64 = _inputs(kind, (3, 5), generator)
        recon = r64.cuda().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda r: reconstruction_loss(r, t64.cuda(), kind, "none"), (recon,))
    mu = torch.randn(3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, lv: kl_normal(m, lv, "none"), (mu, logvar))


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("cols", [1, 2048, 2049, 9000])
def test_every_output_element_is_written(cols, generator):
    """Straight through the binding, into outputs filled with NaN."""
    rows = 37
    r64, t64 = _inputs("mse", (rows, cols), generator)
    recon, target = r64.float().cuda(), t64.float().cuda()
    grad, row_losses, total = _poisoned((rows, cols), torch.float32), _poisoned((rows,), torch.float64), \
        _poisoned((), torch.float64)
    doubles = _native.loss_cuda_workspace_doubles(rows, cols)
    workspace = _poisoned((max(doubles, 1),), torch.float64)
    stream = torch.cuda.current_stream().cuda_stream
    _native.reconstruction_loss_cuda(recon.data_ptr(), target.data_ptr(), rows, cols, 0, 0.5, grad.data_ptr(),
                                     row_losses.data_ptr(), total.data_ptr(), 0,
                                     workspace.data_ptr() if doubles else 0, stream, False)
    expected, expected_grad = _reference("mse", "none", r64, t64)
    _assert_close(row_losses, expected, 2e-5)
    _assert_close(total, expected.sum(), 2e-5)
    _assert_close(grad, 0.5 * expected_grad, 2e-5)
    grad_mu, grad_logvar = _poisoned((rows, cols), torch.float32), _poisoned((rows, cols), torch.float32)
    row_losses.fill_(float("nan"))
    total.fill_(float("nan"))
    _native.kl_normal_cuda(recon.data_ptr(), target.data_ptr(), rows, cols, 1.0, grad_mu.data_ptr(),
                           grad_logvar.data_ptr(), row_losses.data_ptr(), total.data_ptr(),
                           workspace.data_ptr() if doubles else 0, stream, False)
    expected_kl = (-0.5 * (1 + t64 - r64**2 - t64.exp())).sum(dim=1)
    _assert_close(row_losses, expected_kl, 2e-5)
    _assert_close(total, expected_kl.sum(), 2e-5)
    _assert_close(grad_mu, r64, 2e-6)
    _assert_close(grad_logvar, 0.5 * (t64.exp() - 1), 2e-5)


def test_no_gradient_is_computed_without_autograd(monkeypatch, generator):
    """Under torch.no_grad() (an evaluation loop) the kernel gets no gradient buffer to fill."""
    r64, t64 = _inputs("mse", (50, 300), generator)
    expected, _ = _reference("mse", "mean", r64, t64)
    grads_passed = []
    native = _native.reconstruction_loss_cuda

    def recording(*args, **kwargs):
        grads_passed.append(args[6])
        return native(*args, **kwargs)

    monkeypatch.setattr(_native, "reconstruction_loss_cuda", recording)
    with torch.no_grad():
        value = reconstruction_loss(r64.float().cuda().requires_grad_(True), t64.float().cuda())
    _assert_close(value, expected, 2e-5, floor=1.0)
    assert grads_passed == [0]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_incoming_gradient_other_than_one(reduction, generator):
    """loss * 3 (or per-row weights for "none", some of them exactly 1): the saved gradient
    is scaled on the device, in place, rows of factor 1 left as they are."""
    r64, t64 = _inputs("bce_logits", (6, 3000), generator)
    weights = torch.tensor([3.0, 1.0, -0.5, 1.0, 0.0, 2.5], dtype=torch.float64)
    r = r64.clone().requires_grad_(True)
    expected_value = _reference_elementwise("bce_logits", r, t64)
    per_row = expected_value.sum(dim=1)
    reference = {"none": (per_row * weights).sum(), "sum": 3 * per_row.sum(), "mean": 3 * expected_value.mean()}
    reference[reduction].backward()
    recon = r64.float().cuda().requires_grad_(True)
    loss = reconstruction_loss(recon, t64.float().cuda(), "bce_logits", reduction)
    (loss * weights.float().cuda()).sum().backward() if reduction == "none" else (3 * loss).backward()
    _assert_close(recon.grad, r.grad, 2e-5, floor=_grad_scale(reduction, r64.numel()))
    mu = torch.randn(6, 40, device="cuda", requires_grad=True)
    logvar = torch.randn(6, 40, device="cuda", requires_grad=True)
    value = kl_normal(mu, logvar, reduction)
    (value * weights.float().cuda()).sum().backward() if reduction == "none" else (3 * value).backward()
    factor = weights.float().cuda()[:, None] if reduction == "none" else 3.0
    scale = 1.0 / 6 if reduction == "mean" else 1.0
    torch.testing.assert_close(mu.grad, factor * scale * mu.detach())
    torch.testing.assert_close(logvar.grad, factor * scale * 0.5 * (logvar.detach().exp() - 1))


def test_a_second_backward_through_the_same_graph(generator):
    """retain_graph=True: the first backward scaled the saved gradient in place; the second
    recomputes it, so the gradients add up to twice the reference instead of 3 * 3."""
    r64, t64 = _inputs("mse", (8, 2500), generator)
    _, expected_grad = _reference("mse", "sum", r64, t64)
    recon = r64.float().cuda().requires_grad_(True)
    loss = 3 * reconstruction_loss(recon, t64.float().cuda(), "mse", "sum")
    loss.backward(retain_graph=True)
    loss.backward()
    _assert_close(recon.grad, 6 * expected_grad, 2e-5, floor=1.0)


def test_a_training_step_never_waits_for_the_gpu(generator):
    """mse, bce_logits and the KL, forward and backward, under torch's sync debug mode (which
    raises on any read-back through torch: a .item(), a float() of a CUDA tensor)."""
    r64, t64 = _inputs("bce_logits", (64, 784), generator)
    recon = r64.float().cuda().requires_grad_(True)
    target = t64.float().cuda()
    mu = torch.randn(64, 8, device="cuda", requires_grad=True)
    logvar = torch.randn(64, 8, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = (reconstruction_loss(recon, target, "mse") + reconstruction_loss(recon, target, "bce_logits")
                + 0.5 * kl_normal(mu, logvar))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(recon.grad).all() and torch.isfinite(logvar.grad).all()


def _assert_same_bits(actual, expected):
    """Equal element for element, NaN where NaN is expected (torch.equal calls NaN unequal to
    itself: a row scaled by NaN never passes it)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def test_the_in_place_scaling_directly(generator):
    rows, cols = 5, 3001
    grad = torch.randn(rows, cols, device="cuda", dtype=torch.float64)
    original = grad.clone()
    factors = torch.tensor([1.0, 2.0, 1.0, float("nan"), -3.0], device="cuda", dtype=torch.float64)
    stream = torch.cuda.current_stream().cuda_stream
    _native.scale_rows_unless_one_cuda(grad.data_ptr(), rows, cols, factors.data_ptr(), True, stream, True)
    _assert_same_bits(grad, original * factors[:, None])
    assert torch.isnan(grad[3]).all() and torch.equal(grad[[0, 2]], original[[0, 2]])
    one = torch.ones(1, device="cuda")
    poisoned = torch.full((rows, cols), float("nan"), device="cuda")
    _native.scale_rows_unless_one_cuda(poisoned.data_ptr(), rows, cols, one.data_ptr(), False, stream, False)
    assert torch.isnan(poisoned).all()  # a factor of 1 leaves the buffer as it was: not even read
    # float64 like grad: the kernel reads `factors` in grad's type (a float32 2.0 read as a
    # double is 5.3e-315 or garbage, and a read past its 4 bytes)
    two = torch.full((1,), 2.0, device="cuda", dtype=torch.float64)
    _native.scale_rows_unless_one_cuda(grad.data_ptr(), rows, cols, two.data_ptr(), False, stream, True)
    _assert_same_bits(grad, 2 * original * factors[:, None])


def test_training_a_vae_on_the_gpu_with_the_native_losses():
    digits = ls.datasets.load_digits()[0][:600]
    torch.manual_seed(0)
    model = ls.VAE(64, 4, hidden=(64,))
    history = ls.train(model, digits, epochs=5, batch_size=64, lr=3e-3, progress=False, device="cuda")
    assert all(map(math.isfinite, history.train_loss))
    assert history.train_loss[-1] < history.train_loss[0]

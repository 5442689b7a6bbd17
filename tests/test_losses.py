"""Fused native losses against torch's own ops: values, gradients, edge cases, bad inputs.

Every SIMD level the CPU supports is covered (the `simd_level` fixture); odd feature counts
reach the vector tails. float64 gradients are verified with torch.autograd.gradcheck.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import latentspace
from latentspace.losses import ReconstructionLossModule, kl_normal, reconstruction_loss

KINDS = ("mse", "bce", "bce_logits")
REDUCTIONS = ("mean", "sum", "none")
TORCH_OPS = {
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy,
    "bce_logits": F.binary_cross_entropy_with_logits,
}


def torch_reference(recon, target, kind, reduction):
    elementwise = TORCH_OPS[kind](recon, target, reduction="none")
    if reduction == "mean":
        return elementwise.mean()
    if reduction == "sum":
        return elementwise.sum()
    return elementwise.reshape(elementwise.shape[0], -1).sum(dim=1)


def make_inputs(kind, shape, generator, dtype=torch.float32):
    target = torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)
    if kind == "bce":
        recon = torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)
    elif kind == "bce_logits":
        recon = (torch.randn(shape, generator=generator, dtype=torch.float64) * 4).to(dtype)
    else:
        recon = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return recon, target


@pytest.fixture
def generator(rng):
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def check_against_torch(recon, target, kind, reduction, rtol=2e-5, atol=1e-6):
    ours_in = recon.clone().requires_grad_()
    ref_in = recon.clone().requires_grad_()
    ours = reconstruction_loss(ours_in, target, kind, reduction)
    ref = torch_reference(ref_in, target, kind, reduction)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    weights = torch.rand(ref.shape, dtype=ref.dtype) + 0.5  # a non-trivial incoming gradient
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (5, 17), (64, 784), (3, 2, 5, 5), (2, 5000)])
def test_matches_torch(simd_level, kind, reduction, shape, generator):
    recon, target = make_inputs(kind, shape, generator)
    check_against_torch(recon, target, kind, reduction)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_backward_matches_torch(kind, generator):
    """loss.backward() with no weights: the saved gradient is returned unscaled."""
    recon, target = make_inputs(kind, (33, 21), generator)
    ours_in, ref_in = recon.clone().requires_grad_(), recon.clone().requires_grad_()
    reconstruction_loss(ours_in, target, kind).backward()
    torch_reference(ref_in, target, kind, "mean").backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(kind, reduction, generator):
    recon, target = make_inputs(kind, (4, 7), generator, torch.float64)
    if kind == "bce":
        recon = recon * 0.8 + 0.1  # keep finite differences inside (0, 1)
    recon.requires_grad_()
    assert torch.autograd.gradcheck(lambda r: reconstruction_loss(r, target, kind, reduction), (recon,))


@pytest.mark.parametrize("kind", ("mse", "bce_logits"))
def test_gradient_to_target(kind, generator):
    recon, target = make_inputs(kind, (6, 9), generator, torch.float64)
    target.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: reconstruction_loss(recon, t, kind, "mean"), (target,))
    ours_t, ref_t = target.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    reconstruction_loss(recon, ours_t, kind, "none").sum().backward()
    torch_reference(recon, ref_t, kind, "none").sum().backward()
    torch.testing.assert_close(ours_t.grad, ref_t.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_gradient_to_target(reduction, generator):
    """A target that requires grad (a teacher's soft labels) raised ValueError for "bce",
    claiming torch has no such gradient; torch's binary_cross_entropy has one (-logit(r)),
    and the refusal even hit torch.no_grad(), where no gradient can be asked for."""
    recon, target = make_inputs("bce", (6, 9), generator, torch.float64)
    recon = (recon * 0.9 + 0.05).requires_grad_()
    target.requires_grad_()
    loss = lambda r, t: reconstruction_loss(r, t, "bce", reduction)  # noqa: E731
    assert torch.autograd.gradcheck(loss, (recon, target))
    assert torch.autograd.gradgradcheck(loss, (recon, target))
    for dtype in (torch.float32, torch.float64):
        ours_t, ref_t = (target.detach().to(dtype).requires_grad_() for _ in range(2))
        r = recon.detach().to(dtype)
        weights = torch.rand(loss(r, ours_t.detach()).shape, generator=generator, dtype=torch.float64).to(dtype)
        (loss(r, ours_t) * weights).sum().backward()
        (torch_reference(r, ref_t, "bce", reduction) * weights).sum().backward()
        torch.testing.assert_close(ours_t.grad, ref_t.grad)
    with torch.no_grad():
        torch.testing.assert_close(loss(recon, target), torch_reference(recon, target, "bce", reduction))


def test_bce_target_gradient_at_probabilities_zero_and_one():
    """At r = 0 or 1 the logs are clamped at -100 (as torch does): the loss is linear in t
    there, 100 t or 100 (1 - t), and its derivative is finite, where torch's -logit(r) is
    +-inf (which would turn a training step into NaN)."""
    recon = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([[0.3, 0.3, 0.3]], dtype=torch.float64, requires_grad=True)
    reconstruction_loss(recon, target, "bce", "sum").backward()
    torch.testing.assert_close(target.grad, torch.tensor([[100.0, -100.0, 0.0]], dtype=torch.float64))


def test_extreme_logits_are_stable(simd_level):
    recon = torch.tensor([[100.0, -100.0, 50.0, -50.0, 0.0, 1e-30, 88.0, -88.0, 20.0]])
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.3]])
    check_against_torch(recon, target, "bce_logits", "sum", rtol=1e-6, atol=1e-6)
    loss = reconstruction_loss(recon, target, "bce_logits", "none")
    assert torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(float(torch_reference(recon, target, "bce_logits", "sum")), rel=1e-6)


def test_probabilities_exactly_zero_and_one(simd_level):
    """torch clamps the logs at -100 and the gradient's denominator at 1e-12: so do we."""
    recon = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5, 1e-30, 1.0 - 2**-24]])
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0]])
    check_against_torch(recon, target, "bce", "sum", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates(simd_level, kind):
    recon = torch.full((2, 19), 0.25)
    target = torch.full((2, 19), 0.5)
    recon[1, 17] = float("nan")
    recon.requires_grad_()
    per_row = reconstruction_loss(recon, target, kind, "none")
    assert torch.isfinite(per_row[0]) and torch.isnan(per_row[1])
    per_row.sum().backward()
    assert torch.isnan(recon.grad[1, 17])
    assert torch.isfinite(recon.grad[0]).all() and torch.isfinite(recon.grad[1, :17]).all()
    assert torch.isnan(reconstruction_loss(recon, target, kind, "mean"))


@pytest.mark.parametrize("bad", [-1e-6, 1.0 + 1e-6, float("inf"), -float("inf")])
def test_bce_rejects_values_outside_unit_interval(simd_level, bad):
    recon = torch.full((3, 21), 0.5)
    recon[2, 20] = bad  # in the vector tail for every SIMD width
    with pytest.raises(ValueError, match="recon.*\\[0, 1\\]"):
        reconstruction_loss(recon, torch.zeros(3, 21), "bce")


def test_low_precision_and_non_contiguous_inputs(generator):
    recon, target = make_inputs("mse", (16, 24), generator)
    for dtype in (torch.float16, torch.bfloat16):
        r = recon.to(dtype).requires_grad_()
        loss = reconstruction_loss(r, target.to(dtype), "mse")
        assert loss.dtype == dtype
        loss.backward()
        assert r.grad.dtype == dtype
        # The loss is accumulated in float32 and rounded once to the input dtype, so it may differ
        # from the float32 reference by one rounding step of that dtype (eps: 2**-7 for bf16).
        reference = F.mse_loss(r.detach().float(), target.to(dtype).float(), reduction="none")
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss.float(), reference.mean(), rtol=eps, atol=0.0)
        torch.testing.assert_close(r.grad.float(), (2.0 * (r.detach().float() - target.to(dtype).float())
                                                     / r.numel()), rtol=eps, atol=eps * 1e-3)
    strided = recon.t()  # non-contiguous (24, 16)
    check_against_torch(strided, target.t().contiguous(), "mse", "none")


def test_reduction_none_sums_features_per_sample(generator):
    recon, target = make_inputs("mse", (5, 3, 4), generator)
    per_row = reconstruction_loss(recon, target, "mse", "none")
    assert per_row.shape == (5,)
    torch.testing.assert_close(per_row.sum(), reconstruction_loss(recon, target, "mse", "sum"))
    torch.testing.assert_close(per_row.sum() / recon.numel(), reconstruction_loss(recon, target, "mse", "mean"))


def test_threads_do_not_change_the_result(generator):
    recon, target = make_inputs("bce_logits", (257, 300), generator)
    results = []
    for threads in (1, 2):
        latentspace.set_num_threads(threads)
        r = recon.clone().requires_grad_()
        loss = reconstruction_loss(r, target, "bce_logits", "none")
        loss.sum().backward()
        results.append((loss, r.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_module_form(generator):
    recon, target = make_inputs("bce", (4, 6), generator)
    module = ReconstructionLossModule("bce", "sum")
    torch.testing.assert_close(module(recon, target), torch_reference(recon, target, "bce", "sum"))
    with pytest.raises(ValueError, match="kind"):
        ReconstructionLossModule("l1")


@pytest.mark.parametrize(
    "call, exception, match",
    [
        (lambda: reconstruction_loss(torch.rand(3, 4), torch.rand(3, 5)), ValueError, "shapes differ"),
        (lambda: reconstruction_loss(torch.rand(3, 4), torch.rand(3, 4), kind="l1"), ValueError, "kind"),
        (lambda: reconstruction_loss(torch.rand(3, 4), torch.rand(3, 4), reduction="avg"), ValueError, "reduction"),
        (lambda: reconstruction_loss(torch.ones(3, 4, dtype=torch.int64), torch.rand(3, 4)), TypeError, "recon"),
        (lambda: reconstruction_loss(torch.rand(3, 4), torch.ones(3, 4, dtype=torch.bool)), TypeError, "target"),
        (lambda: reconstruction_loss(np.random.rand(3, 4), torch.rand(3, 4)), TypeError, "recon"),
        (lambda: reconstruction_loss(torch.tensor(0.5), torch.tensor(0.5)), ValueError, "batch dimension"),
        # empty batches: torch's reshape error, or a ZeroDivisionError for mean over 0 features
        (lambda: reconstruction_loss(torch.rand(0, 4), torch.rand(0, 4)), ValueError, "recon: expected a non-empty"),
        (lambda: reconstruction_loss(torch.rand(3, 0), torch.rand(3, 0)), ValueError, "recon: expected a non-empty"),
        (lambda: kl_normal(torch.rand(0, 4), torch.rand(0, 4)), ValueError, "mu: expected a non-empty"),
        (lambda: kl_normal(torch.rand(3, 4), torch.rand(3, 2)), ValueError, "shapes differ"),
        (lambda: kl_normal(torch.rand(3, 4), torch.rand(3, 4), reduction="batch"), ValueError, "reduction"),
    ],
)
def test_bad_inputs(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


# --- KL --------------------------------------------------------------------------------


def hand_kl(mu, logvar):
    """Per-row KL(N(mu, sigma^2) || N(0, 1)) from the textbook formula, in float64."""
    mu, var = mu.double(), logvar.double().exp()
    return (0.5 * (var + mu**2 - 1 - var.log())).sum(dim=1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_matches_formula(reduction, generator):
    mu = torch.randn(9, 5, generator=generator)
    logvar = torch.randn(9, 5, generator=generator)
    per_row = hand_kl(mu, logvar)
    expected = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    torch.testing.assert_close(kl_normal(mu, logvar, reduction).double(), expected, rtol=1e-5, atol=1e-6)
    assert (per_row >= 0).all()  # a KL divergence is never negative


def test_kl_is_zero_at_the_prior():
    mu, logvar = torch.zeros(4, 3), torch.zeros(4, 3)
    assert kl_normal(mu, logvar, "sum").item() == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_gradcheck(reduction, generator):
    mu = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, lv: kl_normal(m, lv, reduction), (mu, logvar))


def test_kl_float32_gradients_match_autograd(generator):
    mu = torch.randn(16, 8, generator=generator)
    logvar = torch.randn(16, 8, generator=generator)
    m1, l1 = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    m2, l2 = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    kl_normal(m1, l1).backward()
    (-0.5 * (1 + l2 - m2.pow(2) - l2.exp()).sum(1)).mean().backward()
    torch.testing.assert_close(m1.grad, m2.grad)
    torch.testing.assert_close(l1.grad, l2.grad)


def test_kl_nan_propagates(simd_level):
    # exp(NaN) must give NaN without converting the NaN exponent to an int on the way (undefined
    # behaviour that UBSan reported in the scalar kernels' vec_scale_pow2); 19 columns reach the
    # vector tail at every level.
    mu = torch.full((2, 19), 0.5)
    logvar = torch.full((2, 19), -0.25)
    logvar[1, 17] = float("nan")
    logvar.requires_grad_()
    per_row = kl_normal(mu, logvar, "none")
    assert torch.isfinite(per_row[0]) and torch.isnan(per_row[1])
    per_row.sum().backward()
    assert torch.isnan(logvar.grad[1, 17])
    assert torch.isfinite(logvar.grad[0]).all() and torch.isfinite(logvar.grad[1, :17]).all()


def test_large_gradients_live_on_huge_page_buffers(generator):
    """Gradients >= 4 MiB come from 2 MiB-aligned native buffers that numpy/torch own."""
    recon, target = make_inputs("mse", (1100, 1000), generator)
    expected = 2 * (recon - target)
    recon.requires_grad_()
    reconstruction_loss(recon, target, "mse", "sum").backward()
    grad = recon.grad
    assert grad.data_ptr() % (2 << 20) == 0
    del recon  # the gradient keeps its buffer alive on its own
    torch.testing.assert_close(grad, expected)
    latentspace_buffer = latentspace._native.empty_huge_float64(3, 5)
    assert latentspace_buffer.shape == (3, 5) and latentspace_buffer.dtype == np.float64


# --- second derivatives, argument types, the torch (GPU) path ----------------------------


def second_order_inputs(kind, generator, dtype=torch.float64):
    """recon and target for a second-derivative check; recon for "bce" stays inside
    (0.05, 0.95), where finite differences of its 1 / (r (1 - r)) stay accurate."""
    recon, target = make_inputs(kind, (3, 5), generator, dtype)
    if kind == "bce":
        recon = recon * 0.9 + 0.05
    return recon.requires_grad_(), target.requires_grad_()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_float64(kind, reduction, generator):
    """The backward only scaled a gradient saved by the native forward, a constant to autograd:
    backward with create_graph=True raised RuntimeError (before that, the Hessian part of a
    gradient penalty was silently dropped). Under create_graph it now recomputes the first
    derivative with torch ops from the inputs: second derivatives with respect to recon,
    target and the incoming gradient (gradgradcheck checks all three)."""
    recon, target = second_order_inputs(kind, generator)
    inputs = (recon, target) if target.requires_grad else (recon,)

    def loss(*args):
        return reconstruction_loss(args[0], args[1] if len(args) > 1 else target, kind, reduction)

    assert torch.autograd.gradgradcheck(loss, inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_gradgradcheck_float64(reduction, generator):
    mu = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda m, lv: kl_normal(m, lv, reduction), (mu, logvar))


def torch_kl(mu, logvar, reduction):
    per_row = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).reshape(mu.shape[0], -1).sum(dim=1)
    return {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]


def second_order_terms(loss, inputs, direction):
    """A gradient penalty's gradient and a Hessian-vector product (along `direction`, with
    respect to the first input), both through create_graph=True, for every input."""
    grads = torch.autograd.grad(loss(*inputs), inputs, create_graph=True)
    penalty = sum((g.float() ** 2).sum() for g in grads)
    penalty_grads = torch.autograd.grad(penalty, inputs, retain_graph=True)
    # (KL: d/dmu does not depend on logvar; that part of the product is zero)
    hvp = torch.autograd.grad((grads[0] * direction).sum(), inputs, allow_unused=True, materialize_grads=True)
    return grads, penalty_grads, hvp


@pytest.mark.parametrize("kind", KINDS + ("kl",))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_penalty_and_hvp_match_torch(kind, reduction, dtype, generator):
    """float32 (and bfloat16, computed in float32 and returned in bfloat16, as the first
    derivatives are): the same second-order terms as torch's own losses give."""
    if kind == "kl":
        a = torch.randn(6, 9, generator=generator).to(dtype).requires_grad_()
        b = torch.randn(6, 9, generator=generator).to(dtype).requires_grad_()
        ours, reference = (lambda m, lv: kl_normal(m, lv, reduction)), (lambda m, lv: torch_kl(m, lv, reduction))
    else:
        a, b = second_order_inputs(kind, generator, torch.float32)
        a, b = a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_(kind != "bce")
        ours = lambda r, t: reconstruction_loss(r, t, kind, reduction)  # noqa: E731
        reference = lambda r, t: torch_reference(r.float(), t.float(), kind, reduction)  # noqa: E731
    inputs = (a, b) if b.requires_grad else (a,)
    weights = torch.rand(6 if kind == "kl" else 3, generator=generator) + 0.5  # per row for "none"

    def weighted(loss):
        def call(*args):
            out = loss(*(args + (b,))[:2]).float()
            return (out * weights).sum() if reduction == "none" else out * 1.5  # grad_output != 1
        return call

    direction = torch.randn(a.shape, generator=generator)
    got = second_order_terms(weighted(ours), inputs, direction)
    reference_inputs = tuple(x.detach().float().requires_grad_() for x in inputs)
    expected = second_order_terms(weighted(reference), reference_inputs, direction)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 1e-3}
    for got_terms, expected_terms in zip(got, expected):
        for x, g, e in zip(inputs, got_terms, expected_terms):
            assert g.dtype == x.dtype and g.shape == x.shape
            torch.testing.assert_close(g.float(), e, **tolerance)


@pytest.mark.parametrize("loss", [
    lambda a, b: reconstruction_loss(a, b, "mse", "mean"),
    lambda a, b: reconstruction_loss(a, b, "bce_logits", "sum"),
    lambda a, b: kl_normal(a, b, "mean"),
])
def test_incoming_gradient_of_one_stays_in_the_graph(loss, generator):
    """The plain backward skips multiplying by an incoming gradient of exactly 1; under
    create_graph that would drop the gradient's dependence on it (here: linear, so the
    derivative of sum(grad) with respect to it is sum(grad) itself, not an error or zero)."""
    a = torch.rand(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(a, b), a, grad_outputs=one, create_graph=True)
    (d_one,) = torch.autograd.grad(grad.sum(), one)
    torch.testing.assert_close(d_one, grad.sum().detach())


def nan_second_derivatives(loss, kind):
    """The gradient (create_graph=True) and the Hessian's diagonal, NaN at recon[1, 17]."""
    recon = torch.full((2, 19), 0.25, dtype=torch.float64)
    recon[1, 17] = float("nan")
    recon.requires_grad_()
    target = torch.full((2, 19), 0.5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss(recon, target, kind, "none").sum(), recon, create_graph=True)
    (hessian_diagonal,) = torch.autograd.grad(grad.sum(), recon)
    return grad.detach(), hessian_diagonal


@pytest.mark.parametrize("kind", KINDS)
def test_second_derivatives_propagate_nan(kind):
    """Under create_graph the recomputed gradient is NaN where recon is, as the saved one is,
    and only there. The second derivatives are torch's: NaN where they depend on recon (mse's
    is the constant 2); torch's CPU "bce" refuses NaN, so there: NaN at that element alone."""
    grad, hessian_diagonal = nan_second_derivatives(reconstruction_loss, kind)
    assert torch.isnan(grad[1, 17]) and torch.isfinite(grad[0]).all() and torch.isfinite(grad[1, :17]).all()
    if kind == "bce":
        assert torch.isnan(hessian_diagonal[1, 17])
        assert torch.isfinite(hessian_diagonal[0]).all() and torch.isfinite(hessian_diagonal[1, :17]).all()
        return
    torch_grad, torch_hessian_diagonal = nan_second_derivatives(torch_reference, kind)
    torch.testing.assert_close(grad, torch_grad, equal_nan=True)
    torch.testing.assert_close(hessian_diagonal, torch_hessian_diagonal, equal_nan=True)


def native_reconstruction_gradient(recon, target, kind, scale):
    """The native kernel's own gradient buffer, called directly (not through autograd)."""
    r, t = recon.detach().numpy().copy(), target.detach().numpy().copy()
    grad = np.empty_like(r)
    latentspace._native.reconstruction_loss(r, t, {"mse": 0, "bce": 1, "bce_logits": 2}[kind], scale, grad, None)
    return torch.from_numpy(grad)


def refuse_recompute(monkeypatch):
    """Makes the create_graph recomputation an error: a plain backward must never reach it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the create_graph recomputation ran in a plain backward")
    for name in ("_reconstruction_grads", "_kl_grads"):
        monkeypatch.setattr(latentspace.losses, name, refuse)


def backward_weighted(loss, row_weights):
    """A plain backward with an incoming gradient other than 1 (per row for "none")."""
    if loss.dim():
        (loss * row_weights).sum().backward()
    else:
        (loss * 1.5).backward()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_backward_returns_the_native_gradient_exactly(kind, reduction, generator, monkeypatch):
    """Without create_graph the backward is the fast path it was: the native forward's gradient
    times the incoming one, bit for bit (the torch recomputation never runs)."""
    refuse_recompute(monkeypatch)
    recon, target = make_inputs(kind, (7, 13), generator)
    weights = torch.rand(7, generator=generator) + 0.5
    r, t = recon.clone().requires_grad_(), target.clone().requires_grad_(kind != "bce")
    backward_weighted(reconstruction_loss(r, t, kind, reduction), weights)
    native = native_reconstruction_gradient(recon, target, kind, 1.0 / recon.numel() if reduction == "mean" else 1.0)
    expected = native * weights[:, None] if reduction == "none" else native * torch.tensor(1.5)
    assert torch.equal(r.grad, expected)
    if kind == "mse":
        assert torch.equal(t.grad, -expected)
    ref_in = recon.clone().requires_grad_()
    backward_weighted(torch_reference(ref_in, target, kind, reduction), weights)
    torch.testing.assert_close(r.grad, ref_in.grad, rtol=2e-5, atol=1e-6)


def test_kl_plain_backward_returns_the_native_gradient_exactly(generator, monkeypatch):
    refuse_recompute(monkeypatch)
    mu = torch.randn(9, 5, generator=generator)
    logvar = torch.randn(9, 5, generator=generator)
    m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    kl_normal(m, lv, "mean").backward()
    grad_mu, grad_logvar = np.empty((9, 5), np.float32), np.empty((9, 5), np.float32)
    latentspace._native.kl_normal(mu.numpy().copy(), logvar.numpy().copy(), 1.0 / 9, grad_mu, grad_logvar, None)
    assert torch.equal(m.grad, torch.from_numpy(grad_mu)) and torch.equal(lv.grad, torch.from_numpy(grad_logvar))
    torch.testing.assert_close(lv.grad, 0.5 * (logvar.exp() - 1) / 9)


@pytest.mark.parametrize("call, exception, match", [
    # (a list kind gave "unhashable type: 'list'", naming nothing)
    (lambda: reconstruction_loss(torch.rand(3, 4), torch.rand(3, 4), kind=["mse"]), ValueError, "kind"),
    (lambda: ReconstructionLossModule(["mse"]), ValueError, "kind"),
    # (sparse tensors gave torch's "reshape is not implemented for sparse tensors")
    (lambda: reconstruction_loss(torch.rand(3, 4).to_sparse(), torch.rand(3, 4)), TypeError, "recon"),
    (lambda: reconstruction_loss(torch.rand(3, 4), torch.rand(3, 4).to_sparse()), TypeError, "target"),
    (lambda: kl_normal(torch.rand(3, 4), torch.rand(3, 4).to_sparse()), TypeError, "logvar"),
])
def test_bad_argument_types_are_named(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


def test_torch_path_bce_refuses_values_outside_unit_interval():
    """The non-CPU path (torch's own ops, CUDA) must refuse what the native one refuses, with
    the same message: torch's CUDA binary_cross_entropy asserts inside the kernel instead
    (a device-side assert, which leaves the CUDA context unusable). Checked here on CPU
    tensors, where torch raises a RuntimeError naming nothing at the same spot."""
    from latentspace.losses import _torch_reconstruction_loss

    recon = torch.full((3, 5), 0.5)
    recon[2, 4] = 1.5
    with pytest.raises(ValueError, match="recon.*\\[0, 1\\]"):
        _torch_reconstruction_loss(recon, torch.zeros(3, 5), "bce", "mean")


def test_torch_path_bce_propagates_nan_like_the_native_one():
    from latentspace.losses import _torch_reconstruction_loss

    recon = torch.full((2, 5), 0.25)
    recon[1, 3] = float("nan")
    recon.requires_grad_()
    per_row = _torch_reconstruction_loss(recon, torch.full((2, 5), 0.5), "bce", "none")
    native = reconstruction_loss(recon.detach(), torch.full((2, 5), 0.5), "bce", "none")
    assert torch.isnan(per_row[1]) and torch.isnan(native[1])
    torch.testing.assert_close(per_row[0], native[0])
    per_row.sum().backward()
    assert torch.isnan(recon.grad[1, 3])
    assert torch.isfinite(recon.grad[0]).all()


@pytest.mark.parametrize("loss", [
    lambda a, b: reconstruction_loss(a, b, "mse", "none"),
    lambda a, b: reconstruction_loss(a, b, "bce_logits", "mean"),
    lambda a, b: kl_normal(a, b, "sum"),
])
def test_tensors_on_other_devices_still_take_torch_path(loss):
    """Tensors off the CPU take torch's own ops, on any device torch has (MPS, XPU; 'meta'
    for shapes alone, as torch's FLOP counters and dry runs use it). The check added for
    sparse and nested tensors (check_dense) also refused every device but CPU and CUDA:
    'recon: expected a CPU or CUDA tensor, got one on 'meta''."""
    a = torch.empty(3, 4, device="meta", requires_grad=True)
    b = torch.empty(3, 4, device="meta")
    out = loss(a, b)
    assert out.device.type == "meta" and out.shape == ((3,) if out.dim() else ())


def test_torch_path_bce_takes_any_target_like_the_native_one(generator):
    """torch's binary_cross_entropy checks the target as well: on the CPU a RuntimeError
    naming nothing, and on CUDA a device-side assert ('target_val >= zero && target_val <=
    one', NaN included) that leaves the CUDA context unusable; the fix for recon kept the
    user's target in the kernel. The native path takes any target, NaN propagating to its
    row; so must the torch path, with the same values and gradient."""
    from latentspace.losses import _torch_reconstruction_loss

    recon = torch.rand(4, 6, generator=generator, dtype=torch.float64)
    recon[0, 0], recon[1, 1] = 0.0, 1.0  # the clamped logs
    target = torch.rand(4, 6, generator=generator, dtype=torch.float64) * 3 - 1  # in [-1, 2]
    target[3, 2] = float("nan")
    results = []
    for loss in (_torch_reconstruction_loss, reconstruction_loss):
        r = recon.clone().requires_grad_()
        per_row = loss(r, target, "bce", "none")
        per_row[:3].sum().backward()
        results.append((per_row.detach(), r.grad))
    (torch_rows, torch_grad), (native_rows, native_grad) = results
    assert torch.isnan(torch_rows[3]) and torch.isnan(native_rows[3])
    torch.testing.assert_close(torch_rows[:3], native_rows[:3])
    torch.testing.assert_close(torch_grad, native_grad, equal_nan=True)  # (NaN at the NaN target: 0 * NaN)



@pytest.mark.parametrize("first,second", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                          (torch.bfloat16, torch.float32)])
def test_mixed_dtypes_compute_in_the_common_dtype_like_torch(first, second):
    # The native path computed in recon's dtype: float32 ones against float64 ones + 1e-9
    # gave 0.0 where torch's F.mse_loss gives 1e-18.
    recon = torch.ones(2, 3, dtype=first, requires_grad=True)
    target = (torch.ones(2, 3, dtype=torch.float64) + 1e-9).to(second).requires_grad_()
    loss = reconstruction_loss(recon, target, "mse", "sum")
    expected = F.mse_loss(recon.detach(), target.detach(), reduction="sum")
    assert loss.dtype == expected.dtype == torch.promote_types(first, second)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert recon.grad.dtype == first and target.grad.dtype == second
    mu, logvar = torch.zeros(2, 3, dtype=first), torch.zeros(2, 3, dtype=second)
    assert kl_normal(mu, logvar).dtype == torch.promote_types(first, second)


@pytest.mark.parametrize("kind", KINDS + ("kl",))
def test_torch_func_transforms_and_forward_ad(kind, generator):
    """torch.func.grad / vmap / jvp and forward-mode AD raised torch's errors about the
    autograd.Function ("it must override the setup_context staticmethod", "You must implement
    the jvp function"), which read as if the caller had to change the library. Under them
    the losses take torch's own ops (the same formulas): the same values and derivatives."""
    recon, target = make_inputs("bce" if kind == "kl" else kind, (4, 6), generator, torch.float64)
    if kind == "bce":
        recon = recon * 0.9 + 0.05
    loss = ((lambda r, t: kl_normal(r, t, "sum")) if kind == "kl"
            else (lambda r, t: reconstruction_loss(r, t, kind, "sum")))
    r = recon.clone().requires_grad_()
    t = target.clone().requires_grad_()
    expected = loss(r, t)
    expected_r, expected_t = torch.autograd.grad(expected, (r, t))
    grad_r, grad_t = torch.func.grad(loss, argnums=(0, 1))(recon, target)
    torch.testing.assert_close(grad_r, expected_r)
    torch.testing.assert_close(grad_t, expected_t)
    per_sample = torch.vmap(lambda a, b: loss(a[None], b[None]))(recon, target)
    torch.testing.assert_close(per_sample, torch.stack([loss(a[None], b[None]) for a, b in zip(recon, target)]))
    direction = torch.rand(recon.shape, generator=generator, dtype=torch.float64)
    value, tangent = torch.func.jvp(lambda a: loss(a, target), (recon,), (direction,))
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(tangent, (expected_r * direction).sum())
    with forward_ad.dual_level():
        dual = loss(forward_ad.make_dual(recon, direction), target)
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, (expected_r * direction).sum())


def test_bce_under_vmap_still_refuses_probabilities_outside_unit_interval():
    recon = torch.full((2, 3), 0.5)
    recon[1, 2] = 1.5
    with pytest.raises(ValueError, match="recon.*\\[0, 1\\]"):
        torch.vmap(lambda a, b: reconstruction_loss(a[None], b[None], "bce"))(recon, torch.zeros(2, 3))


@pytest.mark.parametrize("loss", [
    lambda a, b: reconstruction_loss(a, b, "mse", "sum"),
    lambda a, b: reconstruction_loss(a, b, "bce_logits", "mean"),
    lambda a, b: kl_normal(a, b, "sum"),
])
def test_gradient_returned_by_a_backward_may_be_changed_in_place(loss, generator):
    """A plain backward on the CPU returned the saved gradient buffer itself: clipping it in
    place (torch.autograd.grad(..., retain_graph=True), then g.clamp_()) made the second
    backward through the same graph raise "modified by an inplace operation" (torch's own
    losses take it), and a write the version counter does not see (g.numpy()[:] = 0) made
    that backward silently return the changed values."""
    a = torch.randn(3, 4, generator=generator, requires_grad=True)
    b = torch.rand(3, 4, generator=generator, requires_grad=True)
    value = loss(a, b)
    first = torch.autograd.grad(value, (a, b), retain_graph=True)
    expected = [g.clone() for g in first]
    first[0].clamp_(-1e-3, 1e-3)
    first[1].numpy()[:] = 0
    second = torch.autograd.grad(value, (a, b))
    for got, want in zip(second, expected):
        torch.testing.assert_close(got, want)


def test_every_public_name_is_exported():
    """ReconstructionLossModule, the nn.Module form, was left out of __all__: a star import
    (and tools that read __all__ for the API) missed it."""
    import latentspace.losses as losses

    public = {name for name, value in vars(losses).items()
              if not name.startswith("_") and getattr(value, "__module__", None) == losses.__name__}
    assert public <= set(losses.__all__)


@pytest.mark.parametrize("kind, value", [("mse", 3e18), ("bce_logits", 1e36)])
def test_a_float32_mean_within_range_is_not_inf_when_its_sum_overflows(kind, value):
    """float32 inputs whose segment sums pass float32's range (1000 elements of 9e36 or 1e36 a
    row) but whose mean fits: the sums were float32 before moving to double, so "mean" came out
    inf (torch's own does too); now such a segment is summed again in double."""
    recon = torch.full((1000, 1000), value)
    target = torch.zeros_like(recon)
    mean = reconstruction_loss(recon, target, kind, "mean")
    reference = reconstruction_loss(recon.double(), target.double(), kind, "mean")
    assert torch.isfinite(mean) and mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), reference, rtol=1e-6, atol=0)
    assert torch.isinf(reconstruction_loss(recon, target, kind, "sum"))  # 9e42: past float32 itself
    rows = reconstruction_loss(recon, target, kind, "none")
    assert torch.isinf(rows).all()  # each row's 9e39: past float32
    x = recon.clone().requires_grad_()
    reconstruction_loss(x, target, kind, "mean").backward()
    assert torch.isfinite(x.grad).all()


def test_a_float32_kl_within_range_is_not_inf_when_its_row_sum_overflows():
    """A row's float32 sum of 1 + logvar - mu^2 - exp(logvar) past float32's range (two
    dimensions of -2.25e38) while the row's KL (2.25e38) fits: it came out inf; now such a row
    is summed again in double."""
    mu = torch.full((4, 2), 1.5e19)
    logvar = torch.zeros_like(mu)
    rows = kl_normal(mu, logvar, "none")
    reference = kl_normal(mu.double(), logvar.double(), "none")
    assert torch.isfinite(rows).all() and rows.dtype == torch.float32
    torch.testing.assert_close(rows.double(), reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(kl_normal(mu, logvar, "mean").double(), reference.mean(), rtol=1e-6, atol=0)
    assert torch.isinf(kl_normal(mu, logvar, "sum"))  # 9e38: past float32 itself

"""The VAE objective against a hand-computed negative ELBO (numpy, float64).

Wrong KL scaling (a mean over latent dimensions instead of a sum, a sum over the batch
instead of a mean) and wrong signs are the most common bugs in public VAE code: these tests
pin the reduction stated in VAE.objective's docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentspace.models import VAE

pytestmark = pytest.mark.usefixtures("single_threaded")


def _linear(layer, x):
    return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()


def _hand_elbo(model: VAE, x: np.ndarray, eps: np.ndarray, loss: str, weight: float):
    """(loss, reconstruction, kl) computed by hand from the model's weights."""
    enc = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    dec = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    h = x
    for layer in enc[:-1]:
        h = np.maximum(_linear(layer, h), 0.0)
    out = _linear(enc[-1], h)
    d = model.latent_dim
    mu, logvar = out[:, :d], out[:, d:]
    z = mu + np.exp(0.5 * logvar) * eps
    for layer in dec[:-1]:
        z = np.maximum(_linear(layer, z), 0.0)
    logits = _linear(dec[-1], z)
    p = 1.0 / (1.0 + np.exp(-logits))
    if loss == "bce":
        per_sample = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=1)  # Bernoulli log-likelihood
    else:
        per_sample = ((p - x) ** 2).sum(axis=1)
    kl = (-0.5 * (1 + logvar - mu**2 - np.exp(logvar))).sum(axis=1)  # summed over latent dims
    reconstruction, kl_mean = per_sample.mean(), kl.mean()  # both averaged over the batch
    return reconstruction + weight * kl_mean, reconstruction, kl_mean


@pytest.mark.parametrize("loss", ["bce", "mse"])
@pytest.mark.parametrize("beta", [1.0, 0.25, 4.0])
def test_objective_matches_hand_computed_elbo(rng, loss, beta):
    """A float64 model: the objective must equal the formula to float64 rounding."""
    torch.manual_seed(3)
    model = VAE(10, 3, hidden=(7, 5), beta=beta).double()
    x = rng.random((6, 10))
    out = model.objective(torch.from_numpy(x), loss=loss, generator=torch.Generator().manual_seed(11))
    eps = torch.randn((6, 3), generator=torch.Generator().manual_seed(11), dtype=torch.float64).numpy()
    expected, reconstruction, kl = _hand_elbo(model, x, eps, loss, beta)
    np.testing.assert_allclose(out["loss"].item(), expected, rtol=1e-10)
    np.testing.assert_allclose(out["reconstruction"].item(), reconstruction, rtol=1e-10)
    np.testing.assert_allclose(out["kl"].item(), kl, rtol=1e-10)
    assert out["kl_weight"].item() == beta
    assert kl > 0 and reconstruction > 0


def test_float32_objective_matches_too(rng):
    torch.manual_seed(3)
    model = VAE(10, 3, hidden=(7,))
    x = rng.random((6, 10)).astype(np.float32)
    out = model.objective(torch.from_numpy(x), generator=torch.Generator().manual_seed(5))
    eps = torch.randn((6, 3), generator=torch.Generator().manual_seed(5)).double().numpy()
    expected, _, _ = _hand_elbo(model, x.astype(np.float64), eps, "bce", 1.0)
    np.testing.assert_allclose(out["loss"].item(), expected, rtol=1e-5)


def test_kl_is_summed_over_latent_dims_and_averaged_over_the_batch():
    """Independent check with torch.distributions on a batch with known posteriors."""
    torch.manual_seed(0)
    model = VAE(5, 4, hidden=())
    x = torch.rand(9, 5)
    out = model.objective(x, generator=torch.Generator().manual_seed(0))
    mu, logvar = model.posterior(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    per_sample = torch.distributions.kl_divergence(q, p).sum(dim=1)
    torch.testing.assert_close(out["kl"], per_sample.mean(), rtol=1e-5, atol=1e-6)
    # doubling the batch by repeating it leaves the objective unchanged (a mean, not a sum)
    doubled = model.objective(torch.cat([x, x]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(doubled["kl"], out["kl"], rtol=1e-5, atol=1e-6)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    model = VAE(4, 2, hidden=())
    with torch.no_grad():
        model.encoder[0].weight.zero_()
        model.encoder[0].bias.zero_()  # mu = 0, logvar = 0: q = p
    out = model.objective(torch.rand(5, 4))
    assert out["kl"].item() == 0.0
    with torch.no_grad():
        model.encoder[0].bias.copy_(torch.tensor([0.5, -0.5, 0.3, -1.0]))
    assert model.objective(torch.rand(5, 4))["kl"].item() > 0


def test_bce_objective_is_the_negative_elbo_a_bound_on_log_likelihood():
    """With beta = 1 the loss is -ELBO >= -log p(x): check it against a Monte Carlo
    importance-sampled log-likelihood on a tiny model (the bound must hold)."""
    torch.manual_seed(1)
    model = VAE(6, 2, hidden=(8,)).double()
    x = (torch.rand(4, 6, dtype=torch.float64) > 0.5).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        elbos = torch.stack([model.objective(x, generator=gen)["loss"] for _ in range(2000)]).mean()
        mu, logvar = model.posterior(x)
        std = torch.exp(0.5 * logvar)
        draws = 4000
        eps = torch.randn(draws, *mu.shape, generator=gen, dtype=torch.float64)
        z = mu + std * eps
        q = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        logits = model.decoder(z)
        lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)
        log_px = torch.logsumexp(lik + prior - q, dim=0) - np.log(draws)
    assert elbos.item() >= -log_px.mean().item() - 1e-3


def test_kl_warmup_ramps_the_weight_linearly():
    model = VAE(4, 2, beta=2.0, kl_warmup=4)
    assert model.warmup_epochs == 4
    assert model.kl_weight(0.0) == 0.0
    assert model.kl_weight(1.0) == 0.5
    assert model.kl_weight(2.0) == 1.0
    assert model.kl_weight(4.0) == 2.0
    assert model.kl_weight(10.0) == 2.0
    assert model.kl_weight(None) == 2.0  # evaluation: the full objective
    x = torch.rand(3, 4)
    ramp = model.objective(x, progress=1.0, generator=torch.Generator().manual_seed(0))
    full = model.objective(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ramp["loss"], ramp["reconstruction"] + 0.5 * ramp["kl"])
    torch.testing.assert_close(full["loss"], full["reconstruction"] + 2.0 * full["kl"])
    assert VAE(4, 2, beta=2.0).kl_weight(0.0) == 2.0  # no warm-up


def test_objective_gradients_reach_every_parameter():
    model = VAE(6, 2, hidden=(5,))
    model.objective(torch.rand(8, 6))["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_progress_and_generator_are_checked():
    # float("1") took a string silently; torch.randn's TypeError for generator=3 named nothing
    model = VAE(4, 2, kl_warmup=4)
    x = torch.rand(3, 4)
    for bad in ("1", True):
        with pytest.raises(TypeError, match=r"^progress: expected a number"):
            model.kl_weight(bad)
        with pytest.raises(TypeError, match=r"^progress: expected a number"):
            model.objective(x, progress=bad)
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match=r"^progress: expected a finite number in \[0, inf\]"):
            model.kl_weight(bad)
    with pytest.raises(TypeError, match=r"^generator: expected None or a torch.Generator, got int 3"):
        model.objective(x, generator=3)
    with pytest.raises(TypeError, match=r"^x: objective\(\) is a training API"):
        model.objective(x.numpy())
    assert model.kl_weight(np.float32(2.0)) == 0.5

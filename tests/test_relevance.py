"""Relevance of latent dimensions: Fisher scores against scikit-learn's f_classif, mutual
information against mutual_info_classif, variance against numpy, a VAE's KL per dimension
against a hand computation; the weight helpers; the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.feature_selection import f_classif, mutual_info_classif

import latentspace as ls
from latentspace import feature_relevance


def _labelled(rng, n=240, d=6, classes=4):
    """Codes whose first dimensions depend on the class (more for lower dimensions) and
    whose last is noise. The first two and the last two are far enough apart that the Fisher
    ranking's ends hold for every seed (0 misses in 50,000 seeds at n = 240; the class shift of
    0.2 used before lost to the noise dimension about 3 times in 100)."""
    y = rng.integers(0, classes, size=n)
    z = rng.normal(size=(n, d))
    z[:, : d - 1] += y[:, None] * np.geomspace(3.0, 0.5, d - 1)[None, :]
    return z, y


def test_fisher_matches_f_classif(rng):
    z, y = _labelled(rng)
    expected, _ = f_classif(z, y)
    scores = ls.relevance(z, y, method="fisher")
    assert scores.dtype == np.float64 and scores.shape == (6,)
    np.testing.assert_allclose(scores, expected, rtol=1e-10)
    np.testing.assert_array_equal(ls.relevance(z, y), scores)  # the default with labels
    np.testing.assert_allclose(ls.relevance(torch.from_numpy(z), torch.from_numpy(y)), scores, rtol=1e-12)
    assert np.argmax(scores) == 0 and np.argmin(scores) == 5


def test_fisher_constant_and_separating_dimensions():
    y = np.array([0, 0, 1, 1, 2, 2])
    z = np.stack([np.full(6, 3.0),                      # constant: tells nothing apart -> 0
                  np.array([0, 0, 1, 1, 2, 2.0]),        # no spread within a class -> +inf
                  np.array([0, 1, 0, 1, 0, 1.0])], 1)    # same means in every class -> 0
    scores = ls.relevance(z, y)
    assert scores[0] == 0.0 and scores[1] == np.inf and scores[2] == 0.0


def test_fisher_refuses_a_one_sample_class(rng):
    z = rng.normal(size=(7, 3))
    y = np.array([0, 0, 0, 1, 1, 1, 5])
    with pytest.raises(ValueError, match="y: class 5 has a single sample .* drop or merge it"):
        ls.relevance(z, y)
    ls.relevance(z[:6], y[:6])  # without it: fine
    assert ls.relevance(np.tile(z, (4, 1)), np.tile(y, 4), method="mutual_info").shape == (3,)


def test_mutual_info_matches_sklearn_with_the_fixed_seed(rng):
    z, y = _labelled(rng, n=300)
    scores = ls.relevance(z, y, method="mutual_info")
    expected = mutual_info_classif(z, y, random_state=feature_relevance.MUTUAL_INFO_RANDOM_STATE)
    assert feature_relevance.MUTUAL_INFO_RANDOM_STATE == 0
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    np.testing.assert_array_equal(ls.relevance(z, y, method="mutual_info"), scores)  # reproducible
    # Informative against noise. The k-NN estimate of a noise dimension's MI scatters above 0
    # (up to 0.15 over 1,000 seeds at n=300, which made a 0.1 bound fail 1 run in 75); the
    # informative one stays above 0.7.
    assert scores[0] > 0.5 and scores[-1] < 0.25 and scores[0] > 3 * scores[-1]


def test_variance_matches_numpy(rng):
    z = rng.normal(size=(50, 5)) * np.arange(1, 6)
    np.testing.assert_allclose(ls.relevance(z), z.var(axis=0), rtol=1e-12)  # the default without labels
    np.testing.assert_allclose(ls.relevance(z, np.arange(50) % 2, method="variance"), z.var(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(ls.relevance(z[:1]), np.zeros(5))
    z32 = z.astype(np.float32)
    np.testing.assert_allclose(ls.relevance(z32), z32.astype(np.float64).var(axis=0), rtol=1e-12)


def test_kl_per_dimension_of_a_vae(rng, single_threaded):
    torch.manual_seed(0)
    vae = ls.VAE(10, 4, hidden=(16,))
    x = rng.random((40, 10)).astype(np.float32)
    scores = ls.relevance(None, model=vae, X=x, method="kl")
    mu, logvar = (a.astype(np.float64) for a in vae.posterior(x))
    hand = np.mean(0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar), axis=0)
    np.testing.assert_allclose(scores, hand, rtol=1e-12)
    prior = torch.distributions.Normal(0.0, 1.0)
    posterior = torch.distributions.Normal(torch.from_numpy(mu), torch.from_numpy(np.exp(0.5 * logvar)))
    np.testing.assert_allclose(scores, torch.distributions.kl_divergence(posterior, prior).mean(0).numpy(),
                               rtol=1e-10)
    assert (scores >= 0).all()
    # Z, when given, is checked against the latent size (and otherwise unused)
    np.testing.assert_array_equal(ls.relevance(vae.encode(x), model=vae, X=x, method="kl"), scores)
    with pytest.raises(ValueError, match=r"Z: expected 4 columns \(the model's latent_dim\)"):
        ls.relevance(np.zeros((40, 3)), model=vae, X=x, method="kl")
    assert feature_relevance.ACTIVE_UNIT_THRESHOLD == 0.01


def test_relevance_errors(rng):
    z, y = _labelled(rng, n=20)
    with pytest.raises(ValueError, match="method: expected one of 'fisher', 'mutual_info', 'variance', 'kl'"):
        ls.relevance(z, y, method="anova")
    with pytest.raises(ValueError, match=r"y: expected shape \(20,\) \(one label per row\)"):
        ls.relevance(z, y[:19])
    with pytest.raises(TypeError, match="y: expected integer class labels"):
        ls.relevance(z, y.astype(float))
    with pytest.raises(ValueError, match="y: expected at least 2 classes, got 1 .every label is 7."):
        ls.relevance(z, np.full(20, 7))
    with pytest.raises(ValueError, match="y: method='mutual_info' needs class labels"):
        ls.relevance(z, method="mutual_info")
    bad = z.copy()
    bad[13, 2] = np.nan
    with pytest.raises(ValueError, match="Z: row 13 contains NaN or Inf"):
        ls.relevance(bad, y)
    with pytest.raises(ValueError, match="Z: row 13 contains NaN or Inf"):
        ls.relevance(bad)
    with pytest.raises(ValueError, match="Z: expected a 2-d array"):
        ls.relevance(z[:, 0], y)
    with pytest.raises(ValueError, match="Z: method='variance' needs the codes Z"):
        ls.relevance(None)
    with pytest.raises(ValueError, match="model: method='kl' needs a VAE .*, got no model"):
        ls.relevance(z, method="kl", X=z)
    pca = ls.PCA(2).fit(rng.random((10, 4)))
    with pytest.raises(ValueError, match="model: method='kl' needs a VAE .*, got PCA"):
        ls.relevance(None, method="kl", model=pca, X=rng.random((10, 4)))
    with pytest.raises(ValueError, match="X: method='kl' needs the inputs X"):
        ls.relevance(None, method="kl", model=ls.VAE(4, 2, hidden=(4,)))
    with pytest.raises(ValueError, match="model, X: used only by method='kl'"):
        ls.relevance(z, y, model=pca)


class _Posterior:
    """A stand-in model whose posterior(x) returns what it was given."""

    def __init__(self, result):
        self.result = result

    def posterior(self, x):
        return self.result


def test_kl_checks_what_the_model_returns():
    x = np.zeros((5, 2))
    mu, logvar = np.zeros((5, 3)), np.zeros((5, 3))
    # logvar with one row was broadcast over mu's five (a silently wrong mean); with four,
    # numpy's "operands could not be broadcast" named nothing
    for rows in (1, 4):
        with pytest.raises(ValueError, match=r"^model.posterior\(X\) logvar: expected shape \(5, 3\)"):
            ls.relevance(None, method="kl", model=_Posterior((mu, np.zeros((rows, 3)))), X=x)
    # a posterior of other rows than X's was averaged as if it were X's
    with pytest.raises(ValueError, match=r"^model.posterior\(X\): returned 4 rows for the 5 rows of X"):
        ls.relevance(None, method="kl", model=_Posterior((mu[:4], logvar[:4])), X=x)
    # not a pair: "too many values to unpack (expected 2)"
    for bad in (mu, (mu,), (mu, logvar, logvar), None):
        with pytest.raises(TypeError, match=r"^model.posterior\(X\): expected a pair \(mu, logvar\)"):
            ls.relevance(None, method="kl", model=_Posterior(bad), X=x)
    # exp(logvar) past float64: inf with numpy's overflow warning; named like "variance"'s
    huge = logvar.copy()
    huge[2, 1] = 800.0
    with pytest.raises(ValueError, match=r"^model.posterior\(X\) logvar: the KL of dimension 1 exceeds"):
        ls.relevance(None, method="kl", model=_Posterior((mu, huge)), X=x)
    far = mu.copy()
    far[3, 2] = 1e155  # its square past float64
    with pytest.raises(ValueError, match=r"^model.posterior\(X\) mu: the KL of dimension 2 exceeds"):
        ls.relevance(None, method="kl", model=_Posterior((far, logvar)), X=x)
    np.testing.assert_allclose(ls.relevance(None, method="kl", model=_Posterior((mu + 1.0, logvar)), X=x.tolist()),
                               [0.5, 0.5, 0.5], rtol=1e-15)


# ---------------------------------------------------------------------------------------
# From scores to weights


def test_relevance_weights():
    scores = np.array([4.0, -1.0, 0.0, 2.0])
    w = ls.relevance_weights(scores)
    assert w.dtype == np.float32 and w.shape == (4,)
    np.testing.assert_allclose(w, [8 / 3, 0, 0, 4 / 3], rtol=1e-6)  # negative clipped, mean 1
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(ls.relevance_weights(scores, normalize="max"), [1, 0, 0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(ls.relevance_weights(scores, power=2.0, normalize="max"), [1, 0, 0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(ls.relevance_weights(scores, power=0.5, normalize="max"),
                               [1, 0, 0, np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(ls.relevance_weights(torch.tensor([1.0, 3.0])), [0.5, 1.5], rtol=1e-6)


def test_relevance_weights_do_not_overflow_or_underflow():
    """Scores raised to a large power overflow float64 (10 ** 400) or underflow to 0 (tiny
    scores); the weights are scale-free, so they come out finite and exact all the same."""
    np.testing.assert_array_equal(ls.relevance_weights([10.0, 1.0, 2.0], power=400), [3, 0, 0])
    np.testing.assert_array_equal(ls.relevance_weights([0.1, 0.2], power=2000), [0, 2])
    np.testing.assert_array_equal(ls.relevance_weights([5e-324, 0.0]), [2, 0])
    np.testing.assert_allclose(ls.relevance_weights([1e300, 1e300, 1e290]), [1.5, 1.5, 0], atol=1e-9)


def test_relevance_weights_errors():
    with pytest.raises(ValueError, match="scores: every score is <= 0"):
        ls.relevance_weights(np.zeros(3))
    with pytest.raises(ValueError, match="scores: every score is <= 0"):
        ls.relevance_weights([-1.0, 0.0])
    with pytest.raises(ValueError, match=r"scores: dimension 1 has a non-finite score \(inf\)"):
        ls.relevance_weights([1.0, np.inf])
    with pytest.raises(ValueError, match="scores: dimension 0 has a non-finite score"):
        ls.relevance_weights([np.nan, 1.0])
    with pytest.raises(ValueError, match="scores: expected a non-empty 1-d array"):
        ls.relevance_weights(np.ones((2, 2)))
    with pytest.raises(ValueError, match="power: expected a finite number in"):
        ls.relevance_weights([1.0, 2.0], power=0)
    with pytest.raises(ValueError, match="normalize: expected 'mean' or 'max'"):
        ls.relevance_weights([1.0, 2.0], normalize="sum")


def test_top_dimensions_and_keep_top():
    scores = np.array([1.0, 3.0, 3.0, 2.0, -5.0])
    top = ls.top_dimensions(scores, 2)
    assert top.dtype == np.int64
    np.testing.assert_array_equal(top, [1, 2])  # a tie goes to the lower index, best first
    np.testing.assert_array_equal(ls.top_dimensions(scores, 5), [1, 2, 3, 0, 4])
    np.testing.assert_array_equal(ls.top_dimensions([2.0, 2.0, 2.0], 1), [0])
    keep = ls.keep_top(scores, 3)
    assert keep.dtype == np.float32
    np.testing.assert_array_equal(keep, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(ls.top_dimensions([1.0, np.inf, 5.0], 2), [1, 2])  # +inf: the best
    np.testing.assert_array_equal(ls.keep_top([1.0, np.inf, 5.0], 1), [0, 1, 0])
    with pytest.raises(ValueError, match="scores: dimension 1 has a non-finite score .nan."):
        ls.top_dimensions([1.0, np.nan], 1)
    with pytest.raises(ValueError, match="n: expected at most 5 .the number of scores., got 6"):
        ls.top_dimensions(scores, 6)
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        ls.keep_top(scores, 0)


def test_public_names():
    for name in ("relevance", "relevance_weights", "top_dimensions", "keep_top"):
        assert getattr(ls, name) is getattr(feature_relevance, name)
    assert callable(ls.relevance)  # a function, not the module behind it


@pytest.mark.parametrize("scale", [1e-300, 1e150, 1e300])
def test_scale_free_scores_survive_extreme_magnitudes(scale, rng):
    # Fisher's ratio and mutual information do not depend on a dimension's scale: codes near
    # float64's limits give the scores of the unscaled codes (no overflow to inf / NaN).
    z, y = _labelled(rng)
    with np.errstate(all="raise"):  # any overflow or invalid operation fails the test
        np.testing.assert_allclose(ls.relevance(z * scale, y), ls.relevance(z, y), rtol=1e-9)
        np.testing.assert_allclose(ls.relevance(z * scale, y, method="mutual_info"),
                                   ls.relevance(z, y, method="mutual_info"), rtol=1e-9, atol=1e-12)


def test_variance_of_huge_codes(rng):
    z = rng.normal(size=(50, 3))
    np.testing.assert_allclose(ls.relevance(z * 1e150), z.var(axis=0) * 1e300, rtol=1e-12)
    z[:, 1] *= 1e300  # its variance (about 1e600) has no float64 value
    with pytest.raises(ValueError, match=r"Z: the variance of dimension 1 exceeds float64's range \(values up to"):
        ls.relevance(z)



@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, 1.1, 2.2, 123.456, -0.9, 1e-5])
@pytest.mark.parametrize("n", [7, 13, 30, 101])
def test_constant_dimension_scores_exactly_zero(value, n):
    # The class means and overall mean of n copies of 1.1 differ in the last bit; that must
    # not make a constant dimension the best (+inf) or a good one (scores in the thousands).
    rng = np.random.default_rng(n)
    y = rng.integers(0, 3, n)
    y[:6] = [0, 0, 1, 1, 2, 2]
    z = np.c_[rng.normal(size=n), np.full(n, value)]
    for method in ("fisher", "mutual_info"):
        assert ls.relevance(z, y, method=method)[1] == 0.0, method
    assert ls.relevance(z)[1] == 0.0


def test_constant_dimension_is_not_picked_as_top():
    z = np.c_[np.arange(7.0), np.full(7, 1.1)]
    y = np.array([0, 0, 1, 1, 2, 2, 0])
    scores = ls.relevance(z, y)
    assert scores[1] == 0.0 and scores[0] > 0
    assert ls.top_dimensions(scores, 1).tolist() == [0]
    assert ls.keep_top(scores, 1).tolist() == [1.0, 0.0]


def test_dimension_constant_inside_each_class_scores_inf():
    # no within-class spread, different class means: +inf, even where the rounded class
    # mean of 1.1s is not exactly 1.1
    y = np.repeat([0, 1, 2], 7)
    z = np.c_[np.repeat([1.1, 2.2, 0.3], 7), np.random.default_rng(0).normal(size=21)]
    assert ls.relevance(z, y)[0] == np.inf


def test_mutual_info_of_a_constant_dimension_is_zero():
    # mutual_info_classif's tie-breaking noise gave a constant column a positive score
    y = np.repeat([0, 1], 10)
    z = np.random.default_rng(0).normal(size=(20, 3))
    z[:, 1] = 3.0
    scores = ls.relevance(z, y, method="mutual_info")
    assert scores[1] == 0.0 and scores[0] >= 0
    assert ls.relevance(np.ones((20, 3)), y, method="mutual_info").tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("n", [2, 20])
def test_mutual_info_with_every_class_a_single_sample(n):
    z = np.random.default_rng(0).normal(size=(n, 3))
    with pytest.raises(ValueError, match=r"^y: every class has a single sample"):
        ls.relevance(z, np.arange(n), method="mutual_info")


def test_mutual_info_accepts_some_one_sample_classes():
    # as documented: the lone samples are left out of the estimate, the rest is scored
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 3))
    y = np.r_[np.zeros(19, int), 1]
    scores = ls.relevance(z, y, method="mutual_info")
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_scores_do_not_depend_on_a_common_offset():
    # Every score is shift-invariant. Codes 2**27 + m * 2**-25 (m small integers: exactly
    # representable, so z is exactly m shifted and scaled) lost their class means' differences
    # to rounding: Fisher 3.75 and 2.08 instead of 3.67 and 1.72, variances 1-2 % off.
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [11, 10, 10])
    m = rng.integers(-8, 9, size=(31, 2)).astype(np.float64)
    m[:, 0] += 3 * y
    z = 2.0**27 + m * 2.0**-25
    np.testing.assert_allclose(ls.relevance(z, y), ls.relevance(m, y), rtol=1e-12)
    np.testing.assert_allclose(ls.relevance(z), m.var(axis=0) * 2.0**-50, rtol=1e-12)
    np.testing.assert_allclose(ls.relevance(-z, y), ls.relevance(m, y), rtol=1e-12)


def test_mutual_info_does_not_depend_on_a_common_offset():
    # scikit-learn adds tie-breaking noise of 1e-10 times a column's mean magnitude (in units
    # of its spread): an offset of 2**33 (~1e10) spreads made it as large as the spread itself
    # and the informative dimension scored 0.13 instead of 0.58. The codes lie on a grid of
    # 2**-19 so that adding 2**33 is exact.
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 301)
    z = np.c_[y + rng.normal(size=301) * 0.5, rng.normal(size=301)]
    z = np.round(z * 2.0**19) / 2.0**19
    expected = ls.relevance(z, y, method="mutual_info")
    assert expected[0] > 0.5
    for offset in (2.0**20, 2.0**33):
        np.testing.assert_allclose(ls.relevance(z + offset, y, method="mutual_info"), expected, rtol=1e-12,
                                   atol=1e-15)


def test_kl_names_X_for_inputs_of_the_wrong_shape():
    """The VAE's own check named its argument 'x'; the caller passed X."""
    vae = ls.VAE(6, 2, hidden=(8,))
    for bad in (np.zeros((5, 7), np.float32), np.zeros(6, np.float32), torch.zeros((3, 2, 3))):
        with pytest.raises(ValueError, match=r"^X: expected"):
            ls.relevance(None, method="kl", model=vae, X=bad)
    assert ls.relevance(None, method="kl", model=vae, X=np.zeros((4, 6), np.float32)).shape == (2,)

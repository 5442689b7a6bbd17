"""Which latent dimensions matter: one score per dimension, and weights made from scores.

    relevance(Z, y)                    Fisher / ANOVA F score per dimension (labels given)
    relevance(Z, y, method="mutual_info")   mutual information with the labels, in nats
    relevance(Z)                       variance per dimension (no labels)
    relevance(None, model=vae, X=X, method="kl")   mean KL(q(z|x) || N(0, 1)) per dimension
    relevance_weights(scores)          non-negative weights for a weighted squared L2
    top_dimensions(scores, n), keep_top(scores, n)   the n best dimensions

The weights plug into metrics.knn_label_agreement(..., weights=w) (and, natively, into the
weighted metric of knn / FlatIndex). Formulas and examples: docs/similarity.md.

(This module is feature_relevance.py, not relevance.py: a submodule named `relevance` would
be bound over the function latentspace.relevance by the import system when first imported,
as training.py explains for `train`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_float64_matrix, as_labels, as_scores, check_float, check_int, check_sample_shape

__all__ = ["ACTIVE_UNIT_THRESHOLD", "MUTUAL_INFO_RANDOM_STATE", "METHODS", "keep_top", "relevance",
           "relevance_weights", "top_dimensions"]

METHODS = ("fisher", "mutual_info", "variance", "kl")
# Burda et al. (2016) call a VAE's latent dimension "active" when its posterior mean varies
# with x; the mean KL to the prior measures the same thing. Above 0.01 nats we count it active.
ACTIVE_UNIT_THRESHOLD = 0.01
# mutual_info_classif adds a little noise to continuous features (to break ties) from this
# seed, so the scores are reproducible run to run.
MUTUAL_INFO_RANDOM_STATE = 0


def relevance(Z: Any, y: Any = None, *, method: str | None = None, model: Any = None, X: Any = None) -> np.ndarray:
    """One relevance score per latent dimension, (latent_dim,) float64; higher is more relevant.

    Args:
        Z: (n, d) latent codes (numpy or torch); may be None for method="kl".
        y: (n,) integer class labels, for "fisher" and "mutual_info" (ignored by the others).
        method: "fisher" (default when y is given), "mutual_info", "variance" (default
            without y) or "kl".
        model: for "kl": a VAE (a model with posterior(x) -> (mu, logvar)).
        X: for "kl": the inputs whose posteriors are averaged, (n, *model.input_shape).

    Methods (computed in float64):
        "fisher": the one-way ANOVA F statistic of each dimension against the classes, as
            sklearn.feature_selection.f_classif: F = [sum_c n_c (m_c - m)^2 / (K - 1)] /
            [sum_c sum_{i in c} (z_i - m_c)^2 / (n - K)] (between-class over within-class
            variance, K classes). Every class needs two samples or more: a class with one
            sample has no within-class spread to measure, and raises ValueError naming it
            (drop or merge it). A constant dimension scores 0; one with no within-class
            spread but different class means scores +inf (it separates the classes alone).
        "mutual_info": sklearn.feature_selection.mutual_info_classif (k-NN estimator, 3
            neighbours), in nats, with random_state=MUTUAL_INFO_RANDOM_STATE (0) so the
            result is reproducible. One-sample classes are accepted: the estimator leaves
            their samples out (they have no same-class neighbour); when every class has a
            single sample nothing is left, and ValueError names y.
        "variance": the variance of each dimension over the rows (ddof=0).
        "kl": mean over the rows of KL(q(z_j|x) || N(0, 1)) = (mu_j^2 + exp(logvar_j) - 1 -
            logvar_j) / 2 in nats, from model.posterior(X). Dimensions above
            ACTIVE_UNIT_THRESHOLD (0.01 nats) are the VAE's "active units"; the rest carry
            (almost) no information about x. Z, when given, must have the model's latent_dim.

    A constant dimension (all its values equal) scores exactly 0 for "fisher",
    "mutual_info" and "variance", whatever rounding in the means or the estimator's noise
    would give. The three are computed from each column shifted by one of its middle values
    (its lower median), so a common offset changes nothing: codes near 1e8 that vary by 1e-8
    keep their scores, and mutual_info_classif's tie-breaking noise (1e-10 times a column's
    mean magnitude in units of its spread) stays 1e-10 of the spread.

    Raises ValueError naming the argument for: an unknown method, y of the wrong length,
    fewer than two classes, a one-sample class ("fisher"), every class a single sample
    ("mutual_info"), NaN / Inf in Z, a variance beyond
    float64's range ("variance"; the scale-free "fisher" and "mutual_info" scale each dimension
    by a power of two, so codes up to float64's limits work), a missing y
    ("fisher", "mutual_info"), "kl" without a VAE and X, or model / X given to another method;
    for "kl" also X of a shape a latentspace model does not take (naming X), a posterior that
    is not a pair (mu, logvar) of equal shapes with one row per row of X (TypeError /
    ValueError), and a KL beyond float64's range (logvar above ~709, or |mu| above ~1e154).
    """
    method = _resolve_method(method, y)
    if method == "kl":
        return _kl_scores(Z, model, X)
    if model is not None or X is not None:
        raise ValueError(f"model, X: used only by method='kl' (got method={method!r}); pass Z instead")
    if Z is None:
        raise ValueError(f"Z: method={method!r} needs the codes Z, (n, latent_dim); got None")
    codes = as_float64_matrix(Z, "Z")
    z, exponents = _scaled_columns(codes)
    if method == "variance":
        if z.shape[0] < 1:
            raise ValueError(f"Z: expected at least one row, got shape {z.shape}")
        with np.errstate(over="ignore"):  # an overflow is reported below, by name
            variance = np.ldexp(z.var(axis=0), 2 * exponents)
        # the mean of n copies of 1.1 need not round to 1.1, which leaves a variance of ~1e-32
        variance[_constant_columns(z)] = 0.0
        if not np.isfinite(variance).all():
            column = int(np.flatnonzero(~np.isfinite(variance))[0])
            raise ValueError(f"Z: the variance of dimension {column} exceeds float64's range (values up to "
                             f"{np.abs(codes[:, column]).max():.3g}); rescale Z")
        return variance
    if y is None:
        raise ValueError(f"y: method={method!r} needs class labels, (n,) integers; pass y or use "
                         "method='variance' (or 'kl' for a VAE)")
    labels = as_labels(y, "y", z.shape[0])
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"y: expected at least 2 classes, got {classes.size}"
                         + (f" (every label is {classes[0]})" if classes.size else ""))
    if method == "fisher":
        scores = _fisher_scores(z, labels, classes, counts)
    else:
        scores = _mutual_info_scores(z, labels, counts)
    # A constant dimension tells nothing apart, but rounding says otherwise: its class means
    # and overall mean can differ in the last bit (Fisher: a tiny between over a zero within
    # gives +inf), and mutual_info_classif's tie-breaking noise gives it random neighbours.
    scores[_constant_columns(z)] = 0.0
    return scores


def _constant_columns(z: np.ndarray) -> np.ndarray:
    """(d,) bool: the columns of z (at least one row) whose values are all equal."""
    return z.max(axis=0, initial=-np.inf) == z.min(axis=0, initial=np.inf)


def _scaled_columns(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z with each column shifted by one of its own middle values and scaled by a power of two
    to a largest magnitude in [0.5, 1), and the exponents that undo the scaling (z - shift =
    ldexp(scaled, exponents)). Every score is shift-invariant and Fisher's ratio and mutual
    information are scale-free, so they come out as from z itself; but from z itself, codes
    far from 0 compared with their spread (2**27 + small multiples of 2**-25) lose their class
    means' differences to rounding, and scikit-learn's tie-breaking noise grows with a
    column's mean magnitude (an offset of 1e10 spreads swamped the spread). Scaling by powers
    of two is exact, so squares and sums of codes as large as 1e300 no longer overflow."""
    def scaled(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, exponents = np.frexp(np.abs(x).max(axis=0, initial=0.0))  # largest = m * 2^e, 0.5 <= m < 1
        return np.ldexp(x, -exponents), exponents

    z, exponents = scaled(z)  # first, so that the shift below cannot overflow
    if z.shape[0] == 0:
        return z, exponents
    # A data value (not an average of two), so that codes moved by an exact offset move their
    # shift by the same offset; a subtraction is correctly rounded, so the differences keep
    # their precision whatever the offset.
    z, more = scaled(z - np.quantile(z, 0.5, axis=0, method="lower"))
    return z, exponents + more


def _resolve_method(method: Any, y: Any) -> str:
    if method is None:
        return "fisher" if y is not None else "variance"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(repr(m) for m in METHODS)} or None, got {method!r}")
    return method


def _fisher_scores(z: np.ndarray, labels: np.ndarray, classes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    single = classes[counts < 2]
    if single.size:
        raise ValueError(f"y: class {single[0]} has a single sample ({single.size} such classes); the Fisher score "
                         "needs two or more per class to measure within-class spread: drop or merge it, or use "
                         "method='mutual_info'")
    n, k = z.shape[0], classes.size
    mean = z.mean(axis=0)
    between = np.zeros(z.shape[1])
    within = np.zeros(z.shape[1])
    for label, count in zip(classes, counts):
        members = z[labels == label]
        centre = members.mean(axis=0)
        between += count * (centre - mean) ** 2
        # a column constant inside the class has no spread there, although its rounded mean
        # may differ from its values: count exactly 0 so that the score is +inf, as documented
        spread = ((members - centre) ** 2).sum(axis=0)
        within += np.where(_constant_columns(members), 0.0, spread)
    between /= k - 1
    within /= n - k
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = between / within
    # 0 / 0: a dimension constant within every class and across them tells nothing apart
    scores[(within == 0) & (between == 0)] = 0.0
    return scores


def _mutual_info_scores(z: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    # The k-NN estimator leaves out the samples of one-sample classes (they have no
    # same-class neighbour); with every class a single sample nothing is left to estimate
    # from, and scikit-learn's own error ("Found array with 0 sample(s)") names no argument.
    if counts.max() < 2:
        raise ValueError(f"y: every class has a single sample ({counts.size} classes, {labels.size} rows); "
                         "mutual information needs at least one class with two or more samples "
                         "(one-sample classes are left out of the estimate)")
    from sklearn.feature_selection import mutual_info_classif

    return np.asarray(mutual_info_classif(z, labels, discrete_features=False,
                                          random_state=MUTUAL_INFO_RANDOM_STATE), dtype=np.float64)


def _kl_scores(Z: Any, model: Any, X: Any) -> np.ndarray:
    if model is None or not callable(getattr(model, "posterior", None)):
        got = "no model" if model is None else type(model).__name__
        raise ValueError(f"model: method='kl' needs a VAE (a model with posterior(x) -> (mu, logvar)), got {got}")
    if X is None:
        raise ValueError("X: method='kl' needs the inputs X whose posteriors q(z|x) are averaged; got None")
    sample_shapes = getattr(model, "_sample_shapes", None)  # a latentspace model: X checked by its name
    shape = getattr(X, "shape", None)
    if callable(sample_shapes) and isinstance(shape, tuple):
        check_sample_shape(tuple(shape), "X", sample_shapes())
    mu, logvar = _posterior_pair(model, X)
    if mu.shape[0] < 1:
        raise ValueError("X: expected at least one row, got none")
    if Z is not None:
        z = as_float64_matrix(Z, "Z")
        if z.shape[1] != mu.shape[1]:
            raise ValueError(f"Z: expected {mu.shape[1]} columns (the model's latent_dim), got shape {z.shape}")
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        kl = 0.5 * (mu * mu + np.exp(logvar) - 1.0 - logvar).mean(axis=0)
    if not np.isfinite(kl).all():
        column = int(np.flatnonzero(~np.isfinite(kl))[0])
        with np.errstate(over="ignore"):  # which of the two overflows: exp(logvar), or mu^2
            cause = "logvar" if not np.isfinite(np.exp(logvar[:, column])).all() else "mu"
        raise ValueError(f"model.posterior(X) {cause}: the KL of dimension {column} exceeds float64's range "
                         f"(logvar up to {logvar[:, column].max():.3g}, |mu| up to {np.abs(mu[:, column]).max():.3g})")
    return kl


def _posterior_pair(model: Any, X: Any) -> tuple[np.ndarray, np.ndarray]:
    """model.posterior(X) as two float64 (n, latent_dim) matrices, one row per row of X: a
    model of one's own returning something else would be averaged wrongly (a one-row logvar
    broadcast over mu) or fail in numpy's words, naming nothing."""
    result = model.posterior(X)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = f"{len(result)} values" if isinstance(result, (tuple, list)) else type(result).__name__
        raise TypeError(f"model.posterior(X): expected a pair (mu, logvar), got {got}")
    mu = as_float64_matrix(result[0], "model.posterior(X) mu")
    logvar = as_float64_matrix(result[1], "model.posterior(X) logvar", dim=mu.shape[1])
    if logvar.shape != mu.shape:
        raise ValueError(f"model.posterior(X) logvar: expected shape {mu.shape} (mu's), got {logvar.shape}")
    rows = _row_count(X)
    if rows is not None and rows != mu.shape[0]:
        raise ValueError(f"model.posterior(X): returned {mu.shape[0]} rows for the {rows} rows of X")
    return mu, logvar


def _row_count(X: Any) -> int | None:
    shape = getattr(X, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    try:
        return len(X)
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------
# From scores to weights


_NORMALIZE = ("mean", "max")


def relevance_weights(scores: Any, *, power: float = 1.0, normalize: str = "mean") -> np.ndarray:
    """Per-dimension weights from relevance scores, (d,) float32, all >= 0:

        w_j = max(0, s_j) ** power,  then scaled so that mean(w) = 1 ("mean") or max(w) = 1 ("max")

    Negative scores count as 0 (irrelevant). power > 1 sharpens the contrast between
    dimensions, power < 1 flattens it. "mean" keeps the average scale of distances (a
    weighted squared L2 with weights all 1 is the plain one); "max" keeps the best
    dimension's scale. Raises ValueError for non-finite scores (a Fisher score of +inf:
    use keep_top, or clip it) and for scores all <= 0.
    """
    s = as_scores(scores)
    power = check_float(power, "power", include_minimum=False)
    if not isinstance(normalize, str) or normalize not in _NORMALIZE:
        raise ValueError(f"normalize: expected 'mean' or 'max', got {normalize!r}")
    w = np.maximum(s, 0.0)
    if not w.max() > 0:
        raise ValueError("scores: every score is <= 0, so every weight would be 0; nothing to weight by")
    # The weights are scale-free: scaling the scores to max 1 first keeps s ** power from
    # overflowing (10 ** 400) or underflowing to all zeros (0.1 ** 2000).
    w = (w / w.max()) ** power
    scale = w.mean() if normalize == "mean" else w.max()
    return (w / scale).astype(np.float32)


def top_dimensions(scores: Any, n: int) -> np.ndarray:
    """The indices of the n highest scores, best first, (n,) int64; equal scores go to the
    lower index, and a score of +inf (a Fisher score that separates the classes alone) is
    the best. 1 <= n <= len(scores)."""
    s = as_scores(scores, allow_inf=True)
    n = check_int(n, "n")
    if n > s.size:
        raise ValueError(f"n: expected at most {s.size} (the number of scores), got {n}")
    return np.argsort(-s, kind="stable")[:n].astype(np.int64)


def keep_top(scores: Any, n: int) -> np.ndarray:
    """Weights that keep the n best dimensions: 1.0 on top_dimensions(scores, n), 0.0
    elsewhere, (d,) float32."""
    weights = np.zeros(as_scores(scores, allow_inf=True).size, dtype=np.float32)
    weights[top_dimensions(scores, n)] = 1.0
    return weights

"""Metric learning: the losses against loop references (values, gradients, edge cases), and
latentspace.train(..., labels=..., metric_loss=...): runs, reproducible, records the metric
term, stratifies the validation split, shapes the latent space, refuses bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace._training_split import split_rows
from latentspace.metric_learning import METRIC_LOSSES, pairwise_sq_l2, supcon_loss, triplet_loss
from latentspace.models import VAE, Autoencoder, ConvAutoencoder

pytestmark = pytest.mark.usefixtures("single_threaded")


# ---------------------------------------------------------------------------------------
# References: the formulas of metric_learning's docstring, one anchor at a time, float64


def _similarity(a: np.ndarray, b: np.ndarray, similarity: str) -> float:
    if similarity == "sq_l2":
        return -float(((a - b) ** 2).sum())
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def supcon_reference(z: np.ndarray, y: np.ndarray, temperature: float, similarity: str = "sq_l2") -> float:
    n = len(z)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        s = {a: _similarity(z[i], z[a], similarity) / temperature for a in range(n) if a != i}
        log_denominator = math.log(sum(math.exp(v) for v in s.values()))
        per_anchor.append(-sum(s[p] - log_denominator for p in positives) / len(positives))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


def triplet_reference(z: np.ndarray, y: np.ndarray, margin: float) -> float:
    n = len(z)
    per_anchor = []
    for i in range(n):
        d_pos = [((z[i] - z[p]) ** 2).sum() for p in range(n) if p != i and y[p] == y[i]]
        d_neg = [((z[i] - z[q]) ** 2).sum() for q in range(n) if y[q] != y[i]]
        if d_pos and d_neg:
            per_anchor.append(max(0.0, max(d_pos) - min(d_neg) + margin))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


LABELINGS = {
    "mixed": [0, 0, 1, 1, 1, 2, 2],
    "singleton": [0, 0, 1, 1, 1, 2, 0],  # class 2 has one sample: no positives for it
    "one_class": [3, 3, 3, 3, 3, 3, 3],  # no negatives anywhere
    "all_distinct": [0, 1, 2, 3, 4, 5, 6],  # no positives anywhere
    "negative_labels": [-5, -5, 7, 7, 0, 0, 0],
}


def _batch(labeling: str, seed: int = 0, dim: int = 3):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((len(LABELINGS[labeling]), dim))
    return z, np.array(LABELINGS[labeling])


@pytest.mark.parametrize("labeling", LABELINGS)
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("similarity", ["sq_l2", "cosine"])
def test_supcon_matches_reference(labeling, temperature, similarity):
    z, y = _batch(labeling)
    got = supcon_loss(torch.from_numpy(z), torch.from_numpy(y), temperature, similarity=similarity)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(supcon_reference(z, y, temperature, similarity), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("labeling", LABELINGS)
@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0])
def test_triplet_matches_reference(labeling, margin):
    z, y = _batch(labeling)
    got = triplet_loss(torch.from_numpy(z), torch.from_numpy(y), margin)
    assert got.item() == pytest.approx(triplet_reference(z, y, margin), rel=1e-10, abs=1e-12)


def test_edge_cases_have_the_expected_values():
    z, y = _batch("all_distinct")
    assert supcon_loss(torch.from_numpy(z), torch.from_numpy(y)).item() == 0.0
    assert triplet_loss(torch.from_numpy(z), torch.from_numpy(y)).item() == 0.0
    z, y = _batch("one_class")
    assert triplet_loss(torch.from_numpy(z), torch.from_numpy(y)).item() == 0.0
    # all one class: every other code is a positive; the loss is still defined, and at least
    # log(n - 1) (equal similarities reach it)
    assert supcon_loss(torch.from_numpy(z), torch.from_numpy(y)).item() > math.log(len(y) - 1)
    same = torch.zeros(5, 2, dtype=torch.float64)
    assert supcon_loss(same, torch.zeros(5, dtype=torch.int64)).item() == pytest.approx(math.log(4))
    # a batch of one
    one = torch.ones(1, 4, requires_grad=True)
    for loss in (supcon_loss(one, torch.zeros(1, dtype=torch.int64)),
                 triplet_loss(one, torch.zeros(1, dtype=torch.int64))):
        assert loss.item() == 0.0


@pytest.mark.parametrize("loss, labeling", [(supcon_loss, "all_distinct"), (triplet_loss, "all_distinct"),
                                             (triplet_loss, "one_class")])  # (supcon has a term for one class)
def test_no_term_still_backpropagates_zero(loss, labeling):
    z, y = _batch(labeling)
    tensor = torch.from_numpy(z).requires_grad_()
    loss(tensor, torch.from_numpy(y)).backward()
    assert torch.equal(tensor.grad, torch.zeros_like(tensor))


@pytest.mark.parametrize("labeling", ["mixed", "singleton", "one_class"])
@pytest.mark.parametrize("similarity", ["sq_l2", "cosine"])
def test_supcon_gradcheck(labeling, similarity):
    z, y = _batch(labeling, seed=1)
    tensor = torch.from_numpy(z).requires_grad_()
    labels = torch.from_numpy(y)
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, labels, 0.7, similarity=similarity), (tensor,))


@pytest.mark.parametrize("labeling", ["mixed", "singleton"])
def test_triplet_gradcheck(labeling):
    z, y = _batch(labeling, seed=2)  # random codes: no ties among the hardest pairs
    tensor = torch.from_numpy(z).requires_grad_()
    labels = torch.from_numpy(y)
    assert torch.autograd.gradcheck(lambda t: triplet_loss(t, labels, 5.0), (tensor,))


def test_pairwise_sq_l2_and_low_precision_inputs():
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(pairwise_sq_l2(z), torch.cdist(z, z) ** 2, rtol=1e-10, atol=1e-10)
    assert torch.all(pairwise_sq_l2(z).diagonal() == 0)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2])
    for loss in (supcon_loss, triplet_loss):
        reference = loss(z.bfloat16().double(), labels)
        got = loss(z.bfloat16(), labels)
        assert got.dtype == torch.float32  # computed in float32
        assert got.item() == pytest.approx(reference.item(), rel=1e-5)


def test_loss_arguments_are_checked():
    z, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            supcon_loss(z, y, bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="temperature"):
            supcon_loss(z, y, bad)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="margin"):
            triplet_loss(z, y, bad)
    assert triplet_loss(z, y, 0).item() >= 0
    with pytest.raises(ValueError, match="similarity"):
        supcon_loss(z, y, similarity="dot")
    for loss in (supcon_loss, triplet_loss):
        with pytest.raises(TypeError, match="labels"):
            loss(z, y.float())
        with pytest.raises(TypeError, match="labels"):
            loss(z, y.bool())
        with pytest.raises(ValueError, match="labels"):
            loss(z, y[:3])
        with pytest.raises(ValueError, match="z"):
            loss(z[0], y)
        with pytest.raises(TypeError, match="z"):
            loss(z.numpy(), y)
        with pytest.raises(TypeError, match="z"):
            loss(y[:, None], y)



def test_pairwise_sq_l2_keeps_small_distances_between_far_codes():
    """||a||^2 + ||b||^2 - 2 a.b cancels away distances that are small beside the codes' norm:
    float32 codes near 1000, 0.01 apart, all came out 0 (and so did the metric terms'
    gradients). Distances do not change under translation: against float64 on the same codes."""
    generator = torch.Generator().manual_seed(0)
    z = (1000.0 + 0.01 * torch.randn(12, 3, generator=generator)).requires_grad_()
    reference = torch.cdist(z.detach().double(), z.detach().double()) ** 2
    torch.testing.assert_close(pairwise_sq_l2(z).double(), reference, rtol=1e-3, atol=1e-9)
    labels = torch.tensor([0, 1, 2] * 4)
    for loss in (lambda t: supcon_loss(t, labels, 1e-3), lambda t: triplet_loss(t, labels, 1e-4)):
        z64 = z.detach().double().requires_grad_()
        loss(z).backward()
        loss(z64).backward()
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-2, atol=1e-3 * z64.grad.abs().max().item())
        z.grad = None
    # a NaN or Inf code still spoils only its own row and column
    bad = torch.randn(4, 2, generator=generator)
    bad[1, 0] = float("nan")
    bad[2, 1] = float("inf")
    d = pairwise_sq_l2(bad)
    assert torch.isfinite(d[0, 3]) and torch.isfinite(d[3, 0])
    torch.testing.assert_close(d[0, 3], ((bad[0] - bad[3]) ** 2).sum())


def test_pairwise_sq_l2_checks_its_argument():
    # torch's own errors: numpy's sum() has no dim=, IndexError, RuntimeError, NotImplementedError
    with pytest.raises(TypeError, match=r"^z: expected a torch tensor, got ndarray"):
        pairwise_sq_l2(np.zeros((3, 2)))
    for bad in (torch.zeros(3), torch.zeros(2, 3, 4)):
        with pytest.raises(ValueError, match=r"^z: expected shape \(n, d\)"):
            pairwise_sq_l2(bad)
    for bad in (torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.int64)):
        with pytest.raises(TypeError, match=r"^z: expected a floating-point tensor"):
            pairwise_sq_l2(bad)
    with pytest.raises(TypeError, match=r"^z: expected a dense tensor"):
        pairwise_sq_l2(torch.zeros(3, 2).to_sparse())
    assert pairwise_sq_l2(torch.zeros(0, 3)).shape == (0, 0)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float64, 1e155)])
def test_squared_norms_past_the_dtype_do_not_turn_finite_distances_into_nan(dtype, scale):
    """||a||^2 + ||b||^2 - 2 a.b overflows (inf - inf = NaN) once the codes' squared norms pass
    the dtype's range, although a distance itself may not: float32 codes near +-1e20 whose
    classes are 1e19 wide (1e38 < 3.4e38) gave NaN distances and NaN losses."""
    z = torch.tensor([[1.0, 0.0], [1.1, 0.0], [-1.0, 0.0], [-1.1, 0.0]], dtype=torch.float64) * scale
    d = pairwise_sq_l2(z.to(dtype))
    reference = torch.cdist(z, z) ** 2
    finite = reference < torch.finfo(dtype).max
    assert finite.sum() == 8 and not torch.isnan(d).any()
    # (rtol: the expansion cancels the squared norms, 100 times the distances here)
    torch.testing.assert_close(d[finite].double(), reference[finite], rtol=1e-4, atol=0)
    assert torch.all(d[~finite] == math.inf)  # distances beyond the dtype round to inf
    # classes far apart, tight inside: both losses are 0 (exp(-inf) = 0, relu(-inf) = 0)
    labels = torch.tensor([0, 0, 1, 1])
    codes = z.to(dtype).requires_grad_()
    for loss in (supcon_loss, triplet_loss):
        value = loss(codes, labels)
        assert value.item() == 0.0
        value.backward()
        assert torch.isfinite(codes.grad).all()
        codes.grad = None


@pytest.mark.parametrize("similarity", ["sq_l2", "cosine"])
def test_similarities_over_a_tiny_temperature_do_not_give_nan(similarity):
    """s / temperature past float32 (-inf for every pair, or +inf for cos = 1) gave
    -inf - (-inf) = NaN where the loss is 0: each positive is its anchor's nearest by far.
    The loss is shifted by each anchor's largest similarity, which changes neither it nor
    its gradient; against float64."""
    z = torch.tensor([[0.0, 1.0], [2.0, 1.0], [-3.0, -1.0], [-5.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    for temperature in (1e-38, 1e-45):
        codes = z.clone().requires_grad_()
        value = supcon_loss(codes, labels, temperature, similarity=similarity)
        expected = supcon_loss(z.double(), labels, temperature, similarity=similarity)
        assert not torch.isnan(value)
        assert value.item() == pytest.approx(expected.item(), abs=1e-30)
        value.backward()
        assert torch.isfinite(codes.grad).all()
    # where the float64 loss itself is past float32, inf (not NaN)
    far = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0], [-5.0, -1.0]])
    assert supcon_loss(far, labels, 1e-38).item() == math.inf
    assert supcon_loss(far.double(), labels, 1e-38).item() > 1e38


def test_distances_all_beyond_float32_still_give_the_loss():
    """Every distance past float32 (codes 2**67 apart, powers of two so that float32 holds
    them exactly): inf - inf gave NaN in both losses, though each term is a difference of
    distances: the triplet term max(0, d_ip - d_in + 1) = 1 where d_ip = d_in, the supcon
    term log 2 for an anchor whose two other codes are equally far. As in float64. (The
    gradient, through a factor 2**134, may still overflow: a value, not a training regime.)"""
    z = torch.tensor([[2.0**66], [-(2.0**66)], [3 * 2.0**66]])
    labels = torch.tensor([0, 0, 1])
    assert torch.all(pairwise_sq_l2(z)[~torch.eye(3, dtype=torch.bool)] == math.inf)
    for loss, expected in ((triplet_loss, 0.5), (supcon_loss, math.log(2) / 2)):
        assert loss(z, labels).item() == pytest.approx(expected, rel=1e-6)
        assert loss(z.double(), labels).item() == pytest.approx(expected, rel=1e-12)


def test_labels_must_be_dense():
    # a sparse labels tensor reached torch's "Could not run 'aten::eq.Tensor' ... SparseCPU"
    z, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    for loss in (supcon_loss, triplet_loss):
        with pytest.raises(TypeError, match=r"^labels: expected a dense tensor"):
            loss(z, y.to_sparse())


@pytest.mark.parametrize("dtype", [name for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)])
def test_float8_codes_are_computed_in_float32(dtype):
    # "add_stub not implemented for 'Float8_e4m3fn'" escaped before: narrower floats are cast up
    z, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    narrow = z.to(getattr(torch, dtype))
    for loss in (supcon_loss, triplet_loss):
        got = loss(narrow, y)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(loss(narrow.float(), y).item(), rel=1e-6)
    # pairwise_sq_l2 computes in the codes' own dtype, which has no arithmetic in torch
    with pytest.raises(TypeError, match=r"^z: .*float8.*z\.float\(\)"):
        pairwise_sq_l2(narrow)


def test_nan_codes_give_a_nan_loss():
    # torch's convention for losses (documented in the module docstring); training stops on it
    z, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    z[1, 0] = float("nan")
    assert torch.isnan(supcon_loss(z, y)) and torch.isnan(triplet_loss(z, y))


# ---------------------------------------------------------------------------------------
# Training with labels


from conftest import digits_400 as digits  # noqa: E402,F401  (a fixture, used by name)
from conftest import fit_briefly as _fit  # noqa: E402


@pytest.mark.parametrize("weight", [1.0, 1, np.float32(1.0), np.float64(1.0), np.int64(1)])
def test_the_default_metric_weight_is_taken_in_any_numeric_type_without_labels(digits, weight):
    """metric_weight equal to its default (1) is no metric-learning setting, whatever its
    numeric type (np.float32(1.0) was refused as 'set only with labels')."""
    x, _ = digits
    torch.manual_seed(0)
    history = _fit(Autoencoder(64, 4, hidden=(8,)), x, epochs=1, metric_weight=weight)
    assert history.metric_loss is None


@pytest.mark.parametrize("metric_loss", ["supcon", "triplet"])
def test_memory_mapped_data_meets_its_own_labels(digits, tmp_path, metric_loss):
    """Data too large to hold (a memory map here) is gathered batch by batch in ascending row
    order; each sample must still meet its own label in the metric term, so training on the
    map gives the model that training on the same data in memory gives, bit for bit."""
    x, y = digits
    np.save(tmp_path / "x.npy", x)
    mapped = ls.datasets.load_npy(tmp_path / "x.npy", mmap=True)
    codes = []
    for data in (x, mapped):
        torch.manual_seed(0)
        model = Autoencoder(64, 4, hidden=(16,))
        _fit(model, data, epochs=3, labels=y, metric_loss=metric_loss)
        codes.append(model.encode(x))
    np.testing.assert_array_equal(codes[1], codes[0])


@pytest.mark.parametrize("metric_loss", ["supcon", "triplet"])
@pytest.mark.parametrize("make", [
    lambda: Autoencoder(64, 4, hidden=(32,), output="sigmoid"),
    lambda: VAE(64, 4, hidden=(32,)),
    lambda: ConvAutoencoder((1, 8, 8), 4, channels=(8,)),
], ids=["ae", "vae", "conv"])
def test_train_with_labels_records_the_metric_term(digits, make, metric_loss):
    x, y = digits
    torch.manual_seed(0)
    model = make()
    seen = []
    history = _fit(model, x, epochs=6, labels=y, metric_loss=metric_loss, metric_weight=2.0,
                   callback=lambda record: seen.append(record))
    assert history.metric_loss == metric_loss and history.metric_weight == 2.0
    assert len(history.train_metric) == len(history.val_metric) == len(history.train_loss) == 6
    assert all(math.isfinite(v) and v >= 0 for v in history.train_metric + history.val_metric)
    assert [r["train_metric"] for r in seen] == history.train_metric
    assert [r["val_metric"] for r in seen] == history.val_metric
    assert history.to_dict()["train_metric"] == history.train_metric
    # the term is minimised: lower than in the same run with weight 0 (the code's scale grows
    # with training, so a triplet term on squared distances need not fall in absolute terms)
    torch.manual_seed(0)
    unshaped = _fit(make(), x, epochs=6, labels=y, metric_loss=metric_loss, metric_weight=0.0)
    assert history.val_metric[-1] < unshaped.val_metric[-1]


def test_without_labels_the_history_has_no_metric(digits):
    x, _ = digits
    history = _fit(Autoencoder(64, 4, hidden=(16,)), x, epochs=2)
    assert history.metric_loss is None and history.train_metric == [] and history.val_metric == []
    assert history.metric_weight == 0.0


def test_objective_returns_the_codes_the_metric_term_uses():
    x = torch.rand(6, 10)
    vae = VAE(10, 3, hidden=(8,))
    out = vae.objective(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["codes"], torch.from_numpy(vae.posterior(x.numpy())[0]))
    assert out["codes"].requires_grad  # the posterior mean, not the noisy draw, with gradients
    ae = Autoencoder(10, 3, hidden=(8,))
    torch.testing.assert_close(ae.objective(x)["codes"], ae.encode(x))


def test_same_seed_same_weights_with_labels(digits):
    x, y = digits
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(7)
        model = Autoencoder(64, 4, hidden=(16,), output="sigmoid")
        history = _fit(model, x, seed=seed, labels=y, metric_loss="supcon")
        runs.append((model.state_dict(), history))
    (a, ha), (b, hb), (c, _) = runs
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert ha.train_loss == hb.train_loss and ha.train_metric == hb.train_metric
    assert ha.val_metric == hb.val_metric
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_metric_weight_zero_leaves_the_objective_alone(digits):
    """weight 0: the same weights as a run whose term is computed but not used; the loss is
    then the reconstruction alone (the stratified split and shuffling are the labelled ones)."""
    x, y = digits
    states = []
    for metric_loss in ("supcon", "triplet"):
        torch.manual_seed(0)
        model = Autoencoder(64, 4, hidden=(16,))
        _fit(model, x, labels=y, metric_loss=metric_loss, metric_weight=0.0)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_stratified_split():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 7], [50, 30, 19, 1])
    rng.shuffle(labels)
    gen = torch.Generator().manual_seed(0)
    val, train = split_rows(len(labels), 10, labels, gen)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([val, train]).tolist()) == list(range(100))
    counts = np.bincount(labels[val.numpy()], minlength=8)
    assert counts[[0, 1, 2, 7]].tolist() == [5, 3, 2, 0]  # 5, 3, 1.9 -> 2, 0.1 -> 0
    again = split_rows(len(labels), 10, labels, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], val) and torch.equal(again[1], train)
    # remainders decide when the floors fall short: 4 classes of 25, 10 held out -> 3, 3, 2, 2
    even = np.repeat([0, 1, 2, 3], 25)
    val, _ = split_rows(100, 10, even, torch.Generator().manual_seed(1))
    assert sorted(np.bincount(even[val.numpy()]).tolist()) == [2, 2, 3, 3]
    # one held out of a singleton-heavy set
    val, train = split_rows(3, 1, np.array([4, 5, 6]), torch.Generator().manual_seed(0))
    assert len(val) == 1 and len(train) == 2


def test_unlabelled_split_is_unchanged():
    """Without labels the split draws exactly what train() drew before labels existed."""
    order = torch.randperm(50, generator=torch.Generator().manual_seed(9))
    val, train = split_rows(50, 5, None, torch.Generator().manual_seed(9))
    assert torch.equal(val, order[:5]) and torch.equal(train, order[5:])


def _nuisance_data(n: int, seed: int):
    """4 classes told apart by 2 low-variance features (class means +-0.3, noise 0.05), hidden
    among 8 features of variance 1 that carry no label. A 2-d code that reconstructs best
    spends itself on the loud nuisance features; only supervision puts the labels in it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    signal = 0.3 * np.stack([np.where(y & 1, 1.0, -1.0), np.where(y & 2, 1.0, -1.0)], axis=1)
    x = np.concatenate([signal + 0.05 * rng.standard_normal((n, 2)), rng.standard_normal((n, 8))], axis=1)
    return x.astype(np.float32), y


# The weights are where each term wins the trade-off against the 8 loud features' squared
# error (supcon at 5 and triplet at 20-50 tip over, seeds 0-2; at 1 neither does).
@pytest.mark.parametrize("metric_loss, metric_weight", [("supcon", 10.0), ("triplet", 50.0)])
def test_metric_term_puts_the_labels_into_the_latent_space(metric_loss, metric_weight):
    x, y = _nuisance_data(600, seed=0)
    x_new, y_new = _nuisance_data(300, seed=1)  # new points, encoded by the trained encoder
    agreement = {}
    for shaped in (False, True):
        torch.manual_seed(0)
        model = Autoencoder(10, 2, hidden=(32,))
        extra = dict(labels=y, metric_loss=metric_loss, metric_weight=metric_weight) if shaped else {}
        _fit(model, x, epochs=40, batch_size=64, lr=3e-3, early_stopping=None, **extra)
        agreement[shaped] = ls.knn_label_agreement(model.encode(x_new), y_new, k=5)
    assert agreement[False] < 0.5  # near chance (0.25): the code holds nuisance
    assert agreement[True] > 0.9
    assert agreement[True] > agreement[False] + 0.4


# ---------------------------------------------------------------------------------------
# Bad arguments


def test_bad_label_arguments(digits):
    x, y = digits
    model = Autoencoder(64, 2, hidden=(8,))
    cases = [
        (dict(labels=y[:-1], metric_loss="supcon"), ValueError, r"labels: expected shape \(400,\)"),
        (dict(labels=y[:, None], metric_loss="supcon"), ValueError, "labels: expected shape"),
        (dict(labels=y.astype(np.float64), metric_loss="supcon"), TypeError, "labels: expected integer"),
        (dict(labels=np.where(np.arange(400) == 3, np.nan, y), metric_loss="triplet"), TypeError,
         r"labels: .*NaN \(row 3\)"),
        (dict(labels=y > 4, metric_loss="supcon"), TypeError, "labels: expected integer"),
        (dict(labels=list(map(str, y)), metric_loss="supcon"), TypeError, "labels: expected integer"),
        (dict(labels=y), ValueError, "metric_loss: labels were given"),
        (dict(metric_loss="supcon"), ValueError, "labels: metric_loss='supcon' needs labels"),
        (dict(labels=y, metric_loss="contrastive"), ValueError, "metric_loss: expected one of"),
        (dict(labels=y, metric_loss="supcon", metric_weight=-1), ValueError, "metric_weight"),
        (dict(labels=y, metric_loss="supcon", metric_weight=float("nan")), ValueError, "metric_weight"),
        (dict(labels=y, metric_loss="supcon", metric_margin=1.0), ValueError, "metric_margin: applies to"),
        (dict(labels=y, metric_loss="triplet", metric_temperature=1.0), ValueError,
         "metric_temperature: applies to"),
        (dict(labels=y, metric_loss="supcon", metric_temperature=0), ValueError, "metric_temperature"),
        (dict(labels=y, metric_loss="triplet", metric_margin=-1), ValueError, "metric_margin"),
        (dict(metric_weight=2.0), ValueError, "metric_weight: set only with"),
        (dict(metric_margin=1.0), ValueError, "metric_margin: set only with"),
        (dict(metric_temperature=1.0), ValueError, "metric_temperature: set only with"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            _fit(model, x, epochs=1, **kwargs)
    _fit(model, x, epochs=1, labels=torch.from_numpy(y).int(), metric_loss="triplet")  # torch ints work


@pytest.mark.parametrize("metric_loss", METRIC_LOSSES)
def test_labels_that_cannot_shape_anything_are_refused(digits, metric_loss):
    """With one class the triplet term is 0 in every batch (no negatives) and supcon only
    pulls every code together; with every class a single sample, or a batch of one row, no
    code ever has a positive and both terms are 0 throughout. Training ran anyway, silently
    without the metric learning asked for (a History of zeros, or a collapsed space)."""
    x, y = digits
    model = Autoencoder(64, 2, hidden=(8,))
    with pytest.raises(ValueError, match=r"labels: .*2 classes.*every label is 7"):
        _fit(model, x, epochs=1, labels=np.full(len(x), 7), metric_loss=metric_loss)
    with pytest.raises(ValueError, match="labels: every class has a single sample"):
        _fit(model, x, epochs=1, labels=np.arange(len(x)), metric_loss=metric_loss)
    with pytest.raises(ValueError, match="batch_size: .*at least 2"):
        _fit(model, x, epochs=1, batch_size=1, labels=y, metric_loss=metric_loss)
    _fit(model, x[:40], epochs=1, batch_size=2, labels=y[:40], metric_loss=metric_loss)  # the least that works


def test_labels_whose_training_rows_cannot_shape_anything_are_refused():
    """The check above looked at all the labels, before validation rows are held out: ten
    classes of two rows with val_fraction=0.5 leave each class one training row (the split is
    stratified), so no training code had a positive and the metric term was 0 in every
    epoch, silently, as it is for labels that are all single samples."""
    x = np.random.default_rng(0).random((20, 8), dtype=np.float32)
    y = np.repeat(np.arange(10), 2)
    model = Autoencoder(8, 2, hidden=(8,))
    for metric_loss in METRIC_LOSSES:
        with pytest.raises(ValueError, match=r"labels: .*training rows.*val_fraction=0.5"):
            _fit(model, x, epochs=1, batch_size=20, val_fraction=0.5, labels=y, metric_loss=metric_loss)
    history = _fit(model, x, epochs=1, batch_size=20, val_fraction=0.0, labels=y, metric_loss="triplet")
    assert history.train_metric[0] > 0  # the same labels, all rows training: the term is there


def test_a_model_without_codes_is_refused_with_labels(digits, monkeypatch):
    x, y = digits
    model = Autoencoder(64, 2, hidden=(8,))
    real = model.objective
    monkeypatch.setattr(model, "objective", lambda *a, **k: {key: v for key, v in real(*a, **k).items()
                                                             if key != "codes"})
    with pytest.raises(TypeError, match="codes"):
        _fit(model, x, epochs=1, labels=y, metric_loss="supcon")


@pytest.mark.parametrize("similarity", ["sq_l2", "cosine"])
def test_a_learned_temperature_gets_its_gradient(similarity, rng):
    """A 0-d tensor temperature (a learned one): the same loss as the number, and d loss / d t
    matches a central difference of the float64 reference."""
    z = rng.standard_normal((12, 3))
    y = rng.integers(0, 3, 12)
    log_t = torch.tensor(np.log(0.7), dtype=torch.float64, requires_grad=True)
    loss = supcon_loss(torch.from_numpy(z), torch.from_numpy(y), log_t.exp(), similarity=similarity)
    assert loss.item() == pytest.approx(supcon_reference(z, y, 0.7, similarity), rel=1e-10)
    loss.backward()
    h = 1e-6
    slope = (supcon_reference(z, y, 0.7 + h, similarity) - supcon_reference(z, y, 0.7 - h, similarity)) / (2 * h)
    assert log_t.grad.item() == pytest.approx(slope * 0.7, rel=1e-5)  # d/d log t = t d/dt


def test_a_tensor_temperature_is_checked():
    z, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    for bad, error, message in [
        (torch.tensor([0.5]), TypeError, r"temperature: expected a number or a 0-d floating-point tensor"),
        (torch.tensor(1), TypeError, r"temperature: expected a number or a 0-d floating-point tensor"),
        (torch.tensor(0.0), ValueError, r"temperature: expected a finite number > 0, got 0.0"),
        (torch.tensor(-1.0), ValueError, r"temperature: expected a finite number > 0"),
        (torch.tensor(float("nan")), ValueError, r"temperature: expected a finite number > 0"),
        (torch.tensor(1.0, device="meta"), ValueError, r"temperature: on meta, z on cpu"),
    ]:
        with pytest.raises(error, match=message):
            supcon_loss(z, y, bad)

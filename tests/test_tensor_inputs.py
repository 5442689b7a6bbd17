"""torch tensors at every public entry point: a tensor without data ('meta') is a ValueError
naming the argument, never torch's own error; torch's unsigned integer dtypes are taken as
numpy's are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentspace as ls


def _meta(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device="meta")


CASES = {
    "knn queries": ("queries", lambda q: ls.knn(_meta(5, 4), q, 3)),
    "knn weights": ("weights", lambda q: ls.knn(q, q, 3, "weighted_l2", weights=_meta(4))),
    "FlatIndex.add": ("x", lambda q: ls.FlatIndex(4).add(_meta(5, 4))),
    "relevance": ("Z", lambda q: ls.relevance(_meta(5, 2))),
    "relevance_weights": ("scores", lambda q: ls.relevance_weights(_meta(3))),
    "knn_label_agreement labels": ("labels", lambda q: ls.knn_label_agreement(q, _meta(5, dtype=torch.long), 2)),
    "trustworthiness": ("X", lambda q: ls.trustworthiness(_meta(5, 4), q, 1)),
    "PCA.fit": ("X", lambda q: ls.PCA(1).fit(_meta(5, 4))),
    "train": ("X", lambda q: ls.train(ls.Autoencoder(4, 2, hidden=(3,)), _meta(10, 4), progress=False)),
    "encode": ("X", lambda q: ls.encode(ls.Autoencoder(4, 2, hidden=(3,)), _meta(10, 4))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_meta_tensor_is_refused_by_name(case, rng):
    name, call = CASES[case]
    q = rng.random((5, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=f"^{name}: expected a CPU or CUDA tensor, got one on 'meta'"):
        call(q)


@pytest.mark.parametrize("dtype", [name for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)])
def test_unsigned_torch_tensors_are_searched_like_numpy_ones(dtype, rng):
    """torch >= 2.3's uint16 / uint32 / uint64 tensors convert to float32 as numpy's unsigned
    arrays do: the same results, returned as torch tensors."""
    x = rng.integers(0, 50, (40, 6)).astype(np.uint16)
    q = x[:7]
    expected = ls.knn(q.astype(getattr(np, dtype)), x, 5)
    found = ls.knn(torch.from_numpy(q.astype(np.int64)).to(getattr(torch, dtype)), torch.from_numpy(x.astype(np.int64)), 5)
    assert isinstance(found[0], torch.Tensor)
    np.testing.assert_array_equal(found[0].numpy(), expected[0])
    np.testing.assert_array_equal(found[1].numpy(), expected[1])


def test_cpu_results_stay_on_the_cpu_whatever_torch_default_device_says(rng):
    # The results are filled by the CPU kernels through numpy views: under
    # torch.set_default_device("meta") (or "cuda") they were allocated there and failed.
    q = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    expected = ls.knn(q.numpy(), x.numpy(), 3)
    index = ls.FlatIndex(8)
    index.add(x)
    torch.set_default_device("meta")
    try:
        for distances, indices in (ls.knn(q, x, 3), index.search(q, 3)):
            assert distances.device.type == indices.device.type == "cpu"
            np.testing.assert_array_equal(indices.numpy(), expected[1])
    finally:
        torch.set_default_device(None)


def test_masked_arrays_with_masked_entries_are_refused(rng):
    # np.asarray drops the mask and keeps the hidden values: they would be searched as data.
    x = rng.standard_normal((50, 8)).astype(np.float32)
    q = np.ma.masked_array(rng.standard_normal((5, 8)).astype(np.float32))
    np.testing.assert_array_equal(ls.knn(q, x, 2)[1], ls.knn(q.data, x, 2)[1])  # nothing masked: fine
    q[0, 1] = np.ma.masked
    with pytest.raises(TypeError, match=r"queries: a masked array with masked entries .* queries\.filled\(value\)"):
        ls.knn(q, x, 2)
    with pytest.raises(TypeError, match="database: a masked array"):
        ls.knn(x[:5], np.ma.masked_invalid(np.where(x > 2, np.nan, x)), 2)



def test_masked_labels_with_masked_entries_are_refused(rng):
    z = rng.standard_normal((30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    masked = np.ma.masked_array(y, mask=y > 1)
    for call in (lambda: ls.relevance(z, masked), lambda: ls.knn_label_agreement(z, masked, k=2)):
        with pytest.raises(TypeError, match=r"^y: a masked array|^labels: a masked array"):
            call()
    assert ls.knn_label_agreement(z, np.ma.masked_array(y), k=2) == ls.knn_label_agreement(z, y, k=2)


def _negated(x):
    """A tensor whose values are -x, held as a lazy negation of x's memory (torch's neg bit,
    as z.conj().imag of a complex z gives): .numpy() refuses it, and code that reads its
    memory directly sees x, not -x."""
    view = torch._neg_view(torch.as_tensor(x))
    assert view.is_neg()
    return view


def _same_result(found, expected):
    for a, b in zip(found if isinstance(found, tuple) else (found,), expected if isinstance(expected, tuple) else (expected,)):
        np.testing.assert_allclose(np.asarray(torch.as_tensor(a).detach()), np.asarray(torch.as_tensor(b).detach()),
                                   rtol=1e-6, atol=1e-6)


def _model():
    torch.manual_seed(0)
    return ls.Autoencoder(6, 2, hidden=(5,))


NEGATED = {  # name: call(x, labels, wrap), with wrap the identity or _negated applied to -x
    "knn queries": lambda x, y, w: ls.knn(w(x[:5]), x, 3),
    "knn database": lambda x, y, w: ls.knn(x[:5], w(x), 3),
    "knn weights": lambda x, y, w: ls.knn(x[:5], x, 3, "weighted_l2", weights=w(np.linspace(0.5, 2, 6))),
    "FlatIndex.add": lambda x, y, w: (lambda index: (index.add(w(x)), index.search(x[:5], 3))[1])(ls.FlatIndex(6)),
    "FlatIndex.search": lambda x, y, w: (lambda index: (index.add(x), index.search(w(x[:5]), 3))[1])(ls.FlatIndex(6)),
    "knn_label_agreement labels": lambda x, y, w: ls.knn_label_agreement(x, w(y), 3),
    "trustworthiness": lambda x, y, w: ls.trustworthiness(w(x), x[:, :2], 3),
    "neighbor_recall": lambda x, y, w: ls.neighbor_recall(x, w(x[:, :2]), 3),
    "relevance float64": lambda x, y, w: ls.relevance(w(x.astype(np.float64)), y),
    "relevance_weights": lambda x, y, w: ls.relevance_weights(w(np.linspace(0.1, 1, 6))),
    "encode": lambda x, y, w: ls.encode(_model(), w(x)),
    "PCA.fit": lambda x, y, w: ls.PCA(2).fit(w(x)).encode(x),
}


@pytest.mark.parametrize("case", sorted(NEGATED))
def test_negated_views_are_read_as_their_values(case, rng):
    """A tensor with torch's neg bit set holds -memory: every entry point takes its values
    (as the same tensor materialised), never torch's 'negative bit set' RuntimeError."""
    x = rng.standard_normal((40, 6)).astype(np.float32)
    labels = np.arange(40) % 3
    call = NEGATED[case]
    plain = lambda a: torch.as_tensor(np.asarray(a)).clone()  # noqa: E731
    negated = lambda a: _negated(-torch.as_tensor(np.asarray(a)))  # noqa: E731
    _same_result(call(x, labels, negated), call(x, labels, plain))


def test_a_device_matrix_is_never_a_negated_view(rng):
    """The GPU search hands as_device_matrix's tensor to native code by address: a neg-bit
    tensor must come back with its values in memory (on a GPU it was searched un-negated)."""
    from latentspace._arrays import as_device_matrix

    x = rng.standard_normal((5, 3)).astype(np.float32)
    tensor, _ = as_device_matrix(_negated(torch.from_numpy(-x)), "queries", "cpu")
    assert not tensor.is_neg()
    np.testing.assert_array_equal(tensor.numpy(), x)


def test_a_negated_out_tensor_is_refused_by_name(rng):
    x = rng.standard_normal((10, 6)).astype(np.float32)
    out = _negated(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="^out: "):
        ls.encode(_model(), x, out=out)

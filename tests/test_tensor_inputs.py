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

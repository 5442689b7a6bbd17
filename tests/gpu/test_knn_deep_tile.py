"""DeepMmaTile (csrc/cuda/knn_deep_tile.cuh; the default tensor-core tile since GPU run 12,
LATENTSPACE_CUDA_TENSOR_TILE unset, "" or "deep"): the tensor-core tile whose rows reach shared
memory by cp.async and are rounded there, once per block. It rounds the same inputs the same
way as MmaTile (the default until run 12, LATENTSPACE_CUDA_TENSOR_TILE=mma) and runs the same mma.sync shapes in the same order, so every search must return
MmaTile's distances and indices bit for bit: in every precision (tf32, bf16, fp16), every
storage (float32, and float16 / bfloat16 rows, copied straight into the rounded tile when
they are the precision's own type), every metric, whole and partial tiles, dimensions that end
inside a step or are shorter than one, a depth of 2048, and with the opt-in family's cut-backs
by warps (whose histograms live in this tile's dynamic shared memory). Where the tile does not
apply (weights, rows that are not 16-byte aligned, 16-bit rows of a dimension that is not a
multiple of 8) the search takes MmaTile, which must give the same results too. Every search
checks which scan ran (_native._cuda_last_scan), so a fallback cannot pass unseen.

Exactness against the CPU's float32 search on small integers (every fragment layout) is in
test_knn_cuda.py, whose tensor_tile fixture includes "deep"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentspace

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not latentspace.cuda_available(), reason="no usable CUDA GPU (latentspace.cuda_available())"),
]

DEVICE = "cuda"
METRICS = ("l2", "ip", "cosine")
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TILE = "LATENTSPACE_CUDA_TENSOR_TILE"
# Whether tf32's tile (104 KiB of dynamic shared memory, under 4 KiB static: 3,776 bytes in
# the sm_90 build) fits what this device lets one block take: not on sm_86 / sm_89 cards
# (99 KiB), where tf32 takes MmaTile.
_OPTIN = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 232_448) \
    if torch.cuda.is_available() else 0
TF32_FITS = _OPTIN >= 104 * 1024 + 4 * 1024


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, device=DEVICE)


def _deep_equals_mma(monkeypatch, searches, applies=True):
    """searches() (a list of (distances, indices) results) under MmaTile and under the "deep"
    setting: bit-identical. The setting's searches must have run DeepMmaTile where it
    `applies`, MmaTile where it does not (the native layer's record of its last scan: a
    fallback must not pass unseen). Returns the setting's results."""
    results = {}
    for tile in ("mma", "deep"):
        monkeypatch.setenv(TILE, tile)
        results[tile] = searches()
        torch.cuda.synchronize()
        ran = latentspace._native._cuda_last_scan()
        assert ran == ("deep" if tile == "deep" and applies else "mma"), f"{tile} setting ran the {ran} scan"
    for (d0, i0), (d1, i1) in zip(results["mma"], results["deep"], strict=True):
        assert torch.equal(i0, i1), "indices differ from MmaTile's"
        assert torch.equal(d0, d1), "distances differ from MmaTile's"
    return results["deep"]


# (queries, rows, dimension, k): whole tiles only; a partial query tile and database tiles
# cut by the splits; dimensions that end inside a 32-dimension step (36, no multiple of 8:
# 16-bit rows take MmaTile; 40: every storage, the second step's copies zero-filled past the
# dimension); one shorter than a step; faiss #3045's depth; k = 100.
SHAPES = [(128, 4096, 128, 10), (300, 5000, 64, 20), (130, 3000, 36, 5), (150, 3000, 40, 9), (200, 2000, 8, 7),
          (64, 1000, 2048, 32), (257, 10_000, 96, 100)]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("storage", sorted(STORAGE_DTYPES))
@pytest.mark.parametrize("nq,n,dim,k", SHAPES)
def test_small_deep_tile_equals_mma_tile(precision, storage, nq, n, dim, k, gen, monkeypatch):
    queries = _randn(gen, nq, dim)
    database = _randn(gen, n, dim).to(STORAGE_DTYPES[storage])
    applies = dim % (4 if storage == "fp32" else 8) == 0  # (16-bit rows: 8-element chunks)
    applies = applies and (precision != "tf32" or TF32_FITS)
    for metric in METRICS:
        (d, i), = _deep_equals_mma(monkeypatch,
                                   lambda: [latentspace.knn(queries, database, k, metric, precision=precision)],
                                   applies)
        kept = min(k, n)
        assert ((i[:, :kept] >= 0) & (i[:, :kept] < n)).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_small_deep_tile_half_index_equals_mma_tile(precision, gen, monkeypatch):
    """A FlatIndex stored in the precision's own 16-bit type (its rows copied straight into
    the rounded tile) and in the other one (widened and rounded), searched after two adds
    (1000 + 3000 rows: tiles cut at neither 128 nor the splits' bounds)."""
    dim = 64
    queries = _randn(gen, 300, dim)
    parts = [_randn(gen, 1000, dim), _randn(gen, 3000, dim)]
    for storage in ("bf16", "fp16"):
        index = latentspace.FlatIndex(dim, "l2", device=DEVICE, storage=storage)
        for part in parts:
            index.add(part)
        _deep_equals_mma(monkeypatch, lambda: [index.search(queries, 50, precision=precision)])


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("k", [5, 1024])
def test_small_deep_tile_with_the_opt_in_family_equals_mma_tile(precision, k, gen, monkeypatch):
    """The opt-in family's kernels on DeepMmaTile: cut-backs by warps (8 x 256 counters in the
    tile's dynamic shared memory, between the tiles' steps), thresholds shared across splits,
    scores compared as floats first; the split rule's plan, so that lists fill and are cut
    back mid-split at k = 1024."""
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    monkeypatch.setenv("LATENTSPACE_CUDA_WARP_CUT_BACKS", "1")
    monkeypatch.setenv("LATENTSPACE_CUDA_SHARED_THRESHOLDS", "1")
    queries, database = _randn(gen, 300, 64), _randn(gen, 50_000, 64)
    for metric in ("l2", "cosine"):
        _deep_equals_mma(monkeypatch, lambda: [latentspace.knn(queries, database, k, metric, precision=precision)],
                         precision != "tf32" or TF32_FITS)


def test_small_deep_tile_falls_back_where_it_does_not_apply(gen, rng, monkeypatch):
    """Weights (weighted l2); a float32 database view one element past its allocation's start
    (not even the quad loads' alignment); a bf16 database 8 bytes past a 16-byte boundary (the
    quad loads' alignment, not the cp.async chunks': only the deep tile's own check sees it);
    and 16-bit rows of a dimension that is a multiple of 4 but not of 8: the search takes
    MmaTile, the same results."""
    dim = 20
    queries, database = _randn(gen, 140, dim), _randn(gen, 3000, dim)
    weights = rng.uniform(0.0, 2.0, dim).astype(np.float32)
    _deep_equals_mma(monkeypatch, lambda: [latentspace.knn(queries, database, 10, "weighted_l2", weights=weights,
                                                           precision="bf16")], applies=False)
    flat = torch.empty(3000 * 64 + 1, device=DEVICE)
    misaligned = flat[1:].view(3000, 64)
    misaligned.copy_(_randn(gen, 3000, 64))
    q64 = _randn(gen, 140, 64)
    _deep_equals_mma(monkeypatch, lambda: [latentspace.knn(q64, misaligned, 10, precision="bf16")], applies=False)
    flat_half = torch.empty(3000 * 64 + 4, dtype=torch.bfloat16, device=DEVICE)
    half_off_16 = flat_half[4:].view(3000, 64)
    half_off_16.copy_(_randn(gen, 3000, 64))
    assert half_off_16.data_ptr() % 8 == 0 and half_off_16.data_ptr() % 16 != 0
    _deep_equals_mma(monkeypatch, lambda: [latentspace.knn(q64, half_off_16, 10, precision="bf16")], applies=False)
    half = database.to(torch.bfloat16)
    _deep_equals_mma(monkeypatch, lambda: [latentspace.knn(queries, half, 10, precision="bf16")], applies=False)


@pytest.mark.parametrize("unset", [True, False])
def test_small_the_default_tile_is_deep_where_it_applies(unset, gen, rng, monkeypatch):
    """With LATENTSPACE_CUDA_TENSOR_TILE unset or empty, a tensor-core search takes DeepMmaTile
    where it applies (aligned rows, no weights) and MmaTile where it does not (weighted l2), with
    the results of the explicit settings bit for bit."""
    queries, database = _randn(gen, 140, 64), _randn(gen, 3000, 64)
    weights = rng.uniform(0.0, 2.0, 64).astype(np.float32)
    for search, ran in ((lambda: latentspace.knn(queries, database, 10, precision="bf16"), "deep"),
                        (lambda: latentspace.knn(queries, database, 10, "weighted_l2", weights=weights,
                                                 precision="bf16"), "mma")):
        monkeypatch.setenv(TILE, ran)
        d0, i0 = search()
        if unset:
            monkeypatch.delenv(TILE)
        else:
            monkeypatch.setenv(TILE, "")
        d, i = search()
        torch.cuda.synchronize()
        assert latentspace._native._cuda_last_scan() == ran
        assert torch.equal(i, i0) and torch.equal(d, d0)


def test_small_deep_tile_results_are_near_the_float64_ones(gen, monkeypatch):
    """Not only MmaTile's: the distances DeepMmaTile returns are the exact (float64) distances
    of the returned rows to within bf16's rounding of the inputs."""
    monkeypatch.setenv(TILE, "deep")
    queries, database = _randn(gen, 256, 128), _randn(gen, 8192, 128)
    d, i = latentspace.knn(queries, database, 16, precision="bf16")
    assert latentspace._native._cuda_last_scan() == "deep"
    q, x = queries.double(), database.double()
    exact = ((q[:, None, :] - x[i]) ** 2).sum(-1)
    scale = (q * q).sum(1)[:, None] + (x * x).sum(1)[i]
    assert ((d.double() - exact).abs() <= 8 * 2.0**-8 * scale + 1e-6).all()

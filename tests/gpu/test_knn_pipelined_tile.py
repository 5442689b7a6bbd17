"""The pipelined deep tile (csrc/cuda/knn_pipelined_tile.cuh; opt-in,
LATENTSPACE_CUDA_TENSOR_TILE=pipelined, in the opt-in family's kernels only): DeepMmaTile with
the next tile's first step and database norms in flight between tiles and the block's query
norms held in shared memory. It rounds the same inputs the same way and runs the same mma.sync
shapes in the same order as DeepMmaTile, and offers the scores with the opt-in family's
epilogue, so every search must return the deep tile's distances and indices bit for bit: every
precision, storage and metric; dimensions of 1, 2, 3 and 64 steps of 32 (the rounded buffers
alternate across tiles, so an odd step count shifts them tile by tile); splits of many tiles
and of one, partial tiles at a split's end; lists cut back mid-split (k = 1024); a FlatIndex's
16-bit rows. On small integers, exact in bf16 with exact float32 sums, it must equal the CPU's
float32 search bit for bit (ties by index). Where it does not apply (the default family;
cut-backs by warps; what the deep tile does not take) the search takes the deep tile, or
MmaTile, and the same results. Every search checks which scan ran
(_native._cuda_last_scan), so a fallback cannot pass unseen.

The resident-queries tile (csrc/cuda/knn_resident_tile.cuh; opt-in,
LATENTSPACE_CUDA_TENSOR_TILE=resident: the pipelined kernel with the block's queries rounded
once into shared memory for its split, bf16 / fp16 at a dimension of at most 128) is held to
the same: the deep tile's results bit for bit where it applies, the CPU's on integers, the
pipelined tile where it does not (tf32, dimensions past 128)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import METRICS

import latentspace

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not latentspace.cuda_available(), reason="no usable CUDA GPU (latentspace.cuda_available())"),
]

DEVICE = "cuda"
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TILE = "LATENTSPACE_CUDA_TENSOR_TILE"
# tf32's pipelined tile takes 104 KiB + 1.5 KiB of dynamic shared memory and under 4 KiB
# static: not on sm_86 / sm_89 cards (99 KiB a block), where tf32 takes MmaTile either way.
_OPTIN = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 232_448) \
    if torch.cuda.is_available() else 0
TF32_FITS = _OPTIN >= 106 * 1024 + 4 * 1024


@pytest.fixture
def opt_in_family(monkeypatch):
    """Every search in the opt-in family's kernels (its float compare alone picks them; a
    search of several splits takes them by default, with shared thresholds)."""
    monkeypatch.setenv("LATENTSPACE_CUDA_FLOAT_THRESHOLDS", "1")


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, device=DEVICE)


def _pipelined_equals_deep(monkeypatch, searches, ran="pipelined", deep_ran="deep", setting="pipelined"):
    """searches() (a list of (distances, indices) results) under the "deep" setting and under
    `setting` ("pipelined" or "resident"): bit-identical. The setting's searches must have
    run the `ran` scan, the deep setting's `deep_ran`. Returns the setting's results."""
    results = {}
    for tile, expected in (("deep", deep_ran), (setting, ran)):
        monkeypatch.setenv(TILE, tile)
        results[tile] = searches()
        torch.cuda.synchronize()
        scan = latentspace._native._cuda_last_scan()
        assert scan == expected, f"the {tile} setting ran the {scan} scan, expected {expected}"
    for (d0, i0), (d1, i1) in zip(results["deep"], results[setting], strict=True):
        assert torch.equal(i0, i1), f"indices differ from the deep tile's ({setting})"
        assert torch.equal(d0, d1), f"distances differ from the deep tile's ({setting})"
    return results[setting]


# The searches sized for compute-sanitizer, first in the file: pytest runs a selection in the
# file's order, and benchmarks/gpu_run.sh's memcheck and racecheck runs have a time limit.


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("storage", ["fp32", "bf16"])
@pytest.mark.parametrize("setting", ["pipelined", "resident"])
def test_small_pipelined_tile_integer_data_is_exact(setting, storage, metric, rng, monkeypatch, opt_in_family):
    """Small integers are exact in bf16 and their sums exact in float32, so the pipelined
    tile's distances and indices (ties by index) must equal the CPU's float32 search bit for
    bit: 128 queries over one split of 9 tiles (the last of 76 rows), 72 dimensions (3 steps a
    tile: the rounded buffers alternate tile by tile), k = 16 (lists of 528 cut back every few
    tiles while the next tile's copies are in flight), float32 rows landed and rounded, and
    bf16 rows copied straight into the rounded tile; on the pipelined and on the resident-queries
    tile (whose queries are loaded and rounded once, before the first tile). Sized for
    racecheck: one setting a test."""
    monkeypatch.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "65536")  # one split ...
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")  # ... not the large-k plan's
    monkeypatch.setenv(TILE, setting)
    queries = rng.integers(-2, 3, (128, 72)).astype(np.float32)
    database = rng.integers(-2, 3, (1100, 72)).astype(np.float32)
    d0, i0 = latentspace.knn(queries, database, 16, metric)
    gpu_database = torch.from_numpy(database).to(DEVICE).to(STORAGE_DTYPES[storage])
    d, i = latentspace.knn(torch.from_numpy(queries).to(DEVICE), gpu_database, 16, metric, precision="bf16")
    torch.cuda.synchronize()
    assert latentspace._native._cuda_last_scan() == setting
    assert torch.equal(i.cpu(), torch.from_numpy(i0)), "indices differ from the CPU's"
    assert torch.equal(d.cpu(), torch.from_numpy(d0)), "distances differ from the CPU's"


@pytest.mark.parametrize("setting", ["pipelined", "resident"])
def test_small_pipelined_tile_falls_back_to_the_deep_tile(setting, gen, monkeypatch):
    """Outside the opt-in family (one split a query, no opt-in set) and with cut-backs by warps
    (whose histograms take the staging buffer) either setting runs the deep tile."""
    monkeypatch.setenv("LATENTSPACE_CUDA_SHARED_THRESHOLDS", "0")
    queries, database = _randn(gen, 140, 64), _randn(gen, 3000, 64)
    _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, database, 10, precision="bf16")], "deep",
                           setting=setting)
    monkeypatch.setenv("LATENTSPACE_CUDA_WARP_CUT_BACKS", "1")
    _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, database, 10, precision="bf16")], "deep",
                           setting=setting)


@pytest.mark.parametrize("setting", ["pipelined", "resident"])
def test_small_pipelined_tile_falls_back_where_the_deep_tile_does(setting, gen, rng, monkeypatch, opt_in_family):
    """In the opt-in family, where neither deep tile applies (weighted l2; a float32 database
    view one element past its allocation's start) both settings take MmaTile."""
    queries = _randn(gen, 140, 64)
    weights = rng.uniform(0.0, 2.0, 64).astype(np.float32)
    database = _randn(gen, 3000, 64)
    _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, database, 10, "weighted_l2", weights=weights,
                                                                 precision="bf16")], "mma", "mma", setting)
    flat = torch.empty(3000 * 64 + 1, device=DEVICE)
    misaligned = flat[1:].view(3000, 64)
    misaligned.copy_(database)
    _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, misaligned, 10, precision="bf16")],
                           "mma", "mma", setting)


# (queries, rows, dimension, k): whole tiles; a partial query tile and database tiles cut by
# the splits; 36 (16-bit rows: neither deep tile applies, MmaTile), 40 and 72 (2 and 3 steps,
# the last ending inside the step); 8 (one short step a tile); faiss #3045's depth (64 steps);
# 96 (3 steps) with k = 100 over 10,000 rows.
SHAPES = [(128, 4096, 128, 10), (300, 5000, 64, 20), (130, 3000, 36, 5), (150, 3000, 40, 9), (200, 2000, 8, 7),
          (140, 6000, 72, 12), (64, 1000, 2048, 32), (257, 10_000, 96, 100)]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("storage", sorted(STORAGE_DTYPES))
@pytest.mark.parametrize("nq,n,dim,k", SHAPES)
def test_small_pipelined_tile_equals_deep_tile(precision, storage, nq, n, dim, k, gen, monkeypatch, opt_in_family):
    queries = _randn(gen, nq, dim)
    database = _randn(gen, n, dim).to(STORAGE_DTYPES[storage])
    applies = dim % (4 if storage == "fp32" else 8) == 0  # (16-bit rows: 8-element chunks)
    fits = precision != "tf32" or TF32_FITS
    ran = "pipelined" if applies and fits else "mma"
    for metric in METRICS:
        (d, i), = _pipelined_equals_deep(
            monkeypatch, lambda: [latentspace.knn(queries, database, k, metric, precision=precision)], ran,
            "deep" if applies and fits else "mma")
        kept = min(k, n)
        assert ((i[:, :kept] >= 0) & (i[:, :kept] < n)).all()


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("storage", sorted(STORAGE_DTYPES))
@pytest.mark.parametrize("nq,n,dim,k", [shape for shape in SHAPES if shape[2] <= 128] + [(130, 3000, 136, 5)])
def test_small_resident_tile_equals_deep_tile(precision, storage, nq, n, dim, k, gen, monkeypatch, opt_in_family):
    """The resident-queries setting: the resident tile for bf16 / fp16 up to 128 dimensions,
    the pipelined tile for tf32 and past 128 (136: one more step than the resident rows
    hold), MmaTile where neither deep tile applies; the deep tile's results throughout."""
    queries = _randn(gen, nq, dim)
    database = _randn(gen, n, dim).to(STORAGE_DTYPES[storage])
    applies = dim % (4 if storage == "fp32" else 8) == 0
    fits = precision != "tf32" or TF32_FITS
    if not (applies and fits):
        ran = deep_ran = "mma"
    else:
        ran, deep_ran = ("resident" if precision != "tf32" and dim <= 128 else "pipelined"), "deep"
    for metric in METRICS:
        (d, i), = _pipelined_equals_deep(
            monkeypatch, lambda: [latentspace.knn(queries, database, k, metric, precision=precision)], ran, deep_ran,
            setting="resident")
        kept = min(k, n)
        assert ((i[:, :kept] >= 0) & (i[:, :kept] < n)).all()


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("shared", ["0", "1"])
def test_small_pipelined_tile_cuts_lists_back_mid_split(precision, shared, gen, monkeypatch, opt_in_family):
    """k = 1024 over 50,000 rows: the lists fill and are cut back between tiles while the next
    tile's copies are in flight; with thresholds shared across splits and without."""
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    monkeypatch.setenv("LATENTSPACE_CUDA_SHARED_THRESHOLDS", shared)
    queries, database = _randn(gen, 300, 64), _randn(gen, 50_000, 64)
    fits = precision != "tf32" or TF32_FITS
    for metric in ("l2", "cosine"):
        _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, database, 1024, metric,
                                                                     precision=precision)],
                               "pipelined" if fits else "mma", "deep" if fits else "mma")
    if precision == "bf16":
        _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, database, 1024, "l2",
                                                                     precision=precision)],
                               "resident", setting="resident")


@pytest.mark.parametrize("setting", ["pipelined", "resident"])
@pytest.mark.parametrize("rule", ["2", "64"])
def test_small_pipelined_tile_over_short_and_long_splits(rule, setting, gen, monkeypatch, opt_in_family):
    """The split rule at 2 and 64 rows a neighbour: many splits of a tile or two (some ending
    inside their first tile: the resident tile loads its queries and issues no next tile) and
    few of many tiles (the norm buffers alternate tile by tile)."""
    monkeypatch.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", rule)
    queries, database = _randn(gen, 260, 128), _randn(gen, 30_011, 128)
    for metric in METRICS:
        _pipelined_equals_deep(monkeypatch, lambda: [latentspace.knn(queries, database, 10, metric,
                                                                     precision="bf16")], setting, setting=setting)


@pytest.mark.parametrize("setting", ["pipelined", "resident"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_small_pipelined_tile_half_index_equals_deep_tile(precision, setting, gen, monkeypatch, opt_in_family):
    """A FlatIndex stored in the precision's own 16-bit type (rows copied straight into the
    rounded tile, the next tile's into the buffer the last step did not read) and in the other
    one, searched after two adds (1000 + 3000 rows)."""
    dim = 64
    queries = _randn(gen, 300, dim)
    parts = [_randn(gen, 1000, dim), _randn(gen, 3000, dim)]
    for storage in ("bf16", "fp16"):
        index = latentspace.FlatIndex(dim, "l2", device=DEVICE, storage=storage)
        for part in parts:
            index.add(part)
        _pipelined_equals_deep(monkeypatch, lambda: [index.search(queries, 50, precision=precision)], setting,
                               setting=setting)


def test_small_pipelined_tile_results_are_near_the_float64_ones(gen, monkeypatch, opt_in_family):
    """Not only the deep tile's: the distances the pipelined tile returns are the exact
    (float64) distances of the returned rows to within bf16's rounding of the inputs, over a
    split of many tiles whose norms come from the double buffer."""
    monkeypatch.setenv(TILE, "pipelined")
    queries, database = _randn(gen, 256, 128), _randn(gen, 8192, 128)
    for metric in ("l2", "cosine"):
        d, i = latentspace.knn(queries, database, 16, metric, precision="bf16")
        assert latentspace._native._cuda_last_scan() == "pipelined"
        q, x = queries.double(), database.double()
        if metric == "l2":
            exact = ((q[:, None, :] - x[i]) ** 2).sum(-1)
            scale = (q * q).sum(1)[:, None] + (x * x).sum(1)[i]
        else:
            qn, xn = q / q.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True)
            exact = (qn[:, None, :] * xn[i]).sum(-1)  # (cosine returns the similarity)
            scale = torch.ones_like(exact)
        assert ((d.double() - exact).abs() <= 8 * 2.0**-8 * scale + 1e-6).all()

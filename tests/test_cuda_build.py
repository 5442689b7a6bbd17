"""The CUDA build path: compiled in when nvcc was found, and harmless without a GPU."""

import os

import pytest

import latentspace as ls
from conftest import NVCC, run_cuda_host_check


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine, so the build had no CUDA")
@pytest.mark.skipif(os.environ.get("LATENTSPACE_EXPECT_CUDA") == "0",
                    reason="LATENTSPACE_EXPECT_CUDA=0: built with -C cmake.define.LATENTSPACE_CUDA=OFF")
def test_cuda_sources_were_compiled_where_nvcc_exists():
    info = ls.build_info()
    assert info["cuda_compiled"] is True
    assert {"80", "90"} <= set(info["cuda_architectures"])


def test_no_gpu_is_reported_cleanly():
    info = ls.build_info()
    if info["gpu_visible"]:
        pytest.skip("a GPU is visible here")
    assert ls.cuda_available() is False
    assert info["cuda_devices"] == []
    assert isinstance(info["cuda_unavailable_reason"], str) and info["cuda_unavailable_reason"]


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_float_thresholds_keep_every_key_the_default_takes(tmp_path):
    """The opt-in family compares a score as a float with threshold_score(threshold) before it
    forms the score's key (knn_scan.cuh, offer_scores_first). Built from the real header and
    run on the host (no GPU needed): over 2 million pairs, equal scores, -0, denormals, NaN and
    the empty key among them, no key the default `key < threshold` takes may fail the float
    compare."""
    result = run_cuda_host_check("float_threshold_check", tmp_path, "2000000")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dropped wrongly 0" in result.stdout and "taken 0," not in result.stdout


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_pipelined_l2_reject_keeps_every_key_the_deep_tile_takes(tmp_path):
    """The pipelined tile's epilogue rejects an l2 score on its unclamped fused form
    (knn_pipelined_tile.cuh, l2_score_above) where the deep tile's clamps first. Built from the
    real header and run on the host (no GPU needed): over 2 million cases, -0, denormals, NaN
    products, scores of 0 and norms up to the row check's FLT_MAX / 8 among them, no key that
    the deep tile's `key < threshold` takes may be rejected."""
    result = run_cuda_host_check("l2_reject_check", tmp_path, "2000000")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dropped wrongly 0" in result.stdout and "taken 0," not in result.stdout, result.stdout


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_deep_tile_layout_feeds_the_mma_fragments(tmp_path):
    """DeepMmaTile (csrc/cuda/knn_deep_tile.cuh, the default tensor-core tile since GPU run 12) copies
    a step in 16-byte chunks and reads its fragments with ldmatrix. Built from the real header
    and run on the host (no GPU needed): every element of a step is copied once, and ldmatrix,
    emulated as the PTX ISA describes it, hands every lane of every warp the registers of the
    mma.m16n8k16 A and B layouts that MmaTile builds word by word; the row addresses fall on
    distinct banks."""
    result = run_cuda_host_check("deep_tile_layout_check", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "A and B fragments of 8 warps, banks: 0 mismatches" in result.stdout, result.stdout

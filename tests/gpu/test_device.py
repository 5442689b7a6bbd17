"""CUDA device query (the first CUDA source; the CUDA search kernels come with issue 6).

Marked "cuda": skipped where no GPU is visible. Run on a GPU machine with `pytest -m cuda`.
"""

import pytest

import latentspace as ls

pytestmark = pytest.mark.cuda

requires_gpu = pytest.mark.skipif(not ls.cuda_available(), reason="no CUDA GPU visible")


@requires_gpu
def test_device_query_reports_visible_gpus():
    info = ls.build_info()
    assert info["cuda_compiled"] and info["gpu_visible"]
    assert info["cuda_unavailable_reason"] == ""
    for device in info["cuda_devices"]:
        major, minor = device["compute_capability"]
        assert major >= 5 and 0 <= minor <= 9
        assert device["total_memory_bytes"] > 2**30
        assert device["multiprocessors"] > 0
        assert device["name"]


@requires_gpu
def test_compiled_architectures_cover_the_gpu():
    info = ls.build_info()
    archs = {int(a) for a in info["cuda_architectures"]}
    for device in info["cuda_devices"]:
        major, minor = device["compute_capability"]
        # Code for sm_XY runs on the same major version with minor >= Y.
        assert any(a // 10 == major and a % 10 <= minor for a in archs), (archs, device)

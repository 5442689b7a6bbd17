"""The CUDA build path: compiled in when nvcc was found, and harmless without a GPU."""

import os
import shutil

import pytest

import latentspace as ls

NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc") if os.path.exists(p)), None
)


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

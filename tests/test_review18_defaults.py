"""Review of the eighteenth session's new GPU defaults (the CUDA encoder on a GPU by default):
what a machine without a usable GPU sees."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import latentspace as ls
from latentspace import _cuda_device
from latentspace.encoding import Encoder


def _pickled_as_if_built_on_a_gpu() -> bytes:
    """An Encoder as the native CUDA encoder leaves it (backend 'native', device 'cuda:0', the
    exported layers kept), pickled: the native object is not part of the pickle."""
    encoder = Encoder(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), device="cpu")
    assert encoder.backend == "native"
    encoder.device = torch.device("cuda", 0)
    return pickle.dumps(encoder)


def test_unpickling_a_gpu_encoder_where_cuda_is_unusable_says_why(monkeypatch):
    """Loaded where CUDA cannot run, the CUDA encoder is not rebuilt: a CudaUnavailableError
    names the device it was built for and every reason (before: torch's bare 'compiled without
    CUDA support' RuntimeError from inside __setstate__, or a failed upload)."""
    monkeypatch.setattr(_cuda_device, "cuda_unavailable_reasons", lambda: ["torch sees no CUDA GPU"])

    blob = _pickled_as_if_built_on_a_gpu()
    with pytest.raises(ls.CudaUnavailableError, match=r"'cuda:0'.*CUDA is unavailable here: torch sees no CUDA GPU"):
        pickle.loads(blob)


@pytest.mark.skipif(not _cuda_device.cuda_unavailable_reasons(), reason="CUDA is usable here")
def test_unpickling_a_gpu_encoder_on_this_machine_raises_the_clear_error():
    """The same without stand-ins, on a machine where CUDA is unusable (this one)."""
    with pytest.raises(ls.CudaUnavailableError, match=r"Encoder.*'cuda:0'"):
        pickle.loads(_pickled_as_if_built_on_a_gpu())


# A GPU older than every architecture built: the native defaults fall back to torch's code
# (_cuda_switch.kernels_run_everywhere), where the kernels would fail their first launch with
# "no kernel image is available" (found in review: a T4 against the default 80;90).
needs_cuda_build = pytest.mark.skipif(not ls.build_info()["cuda_compiled"], reason="a CPU-only build has no kernels")


@pytest.fixture
def visible_gpu(monkeypatch):
    """Sets the one GPU the process sees (its compute capability) and the build's architectures."""
    from latentspace import _cuda_switch, _native

    def set_gpu(capability, architectures="80;90"):
        monkeypatch.setattr(_native, "cuda_devices",
                            lambda: [{"index": 0, "name": "a GPU", "compute_capability": list(capability)}])
        monkeypatch.setattr(_native, "cuda_architectures", lambda: architectures)
        _cuda_switch._visible_gpus_run_the_kernels.cache_clear()

    for variable in ("LATENTSPACE_CUDA_LOSSES", "LATENTSPACE_CUDA_ENCODER"):
        monkeypatch.delenv(variable, raising=False)
    yield set_gpu
    _cuda_switch._visible_gpus_run_the_kernels.cache_clear()


@needs_cuda_build
@pytest.mark.parametrize("capability, architectures, native", [
    ((7, 5), "80;90", False), ((8, 6), "80;90", True), ((9, 0), "80;90", True), ((12, 0), "80-real;90-real", False), ((12, 0), "80;90", True),
    ((7, 5), "75;80", True), ((12, 0), "90-virtual", True),
])
def test_the_native_defaults_fall_back_to_torch_on_a_gpu_the_build_has_no_kernels_for(
        visible_gpu, monkeypatch, capability, architectures, native):
    from latentspace import _cuda_encoder, _cuda_losses, encoding

    visible_gpu(capability, architectures)
    expected = "native" if native else "torch"
    assert _cuda_losses.backend() == expected and _cuda_encoder.backend() == expected
    assert ls.build_info()["cuda_losses"] == expected
    reason = encoding._gpu_refusal(torch.device("cuda", 0))
    if native:
        assert reason is None
    else:
        assert reason == (f"the work runs on 'cuda:0': a GPU here runs none of this build's CUDA kernels "
                          f"(architectures {architectures}; reinstall with LATENTSPACE_CUDA_ARCHITECTURES set for it)")
    for value in ("native", "torch"):  # asked for by name: as asked
        monkeypatch.setenv("LATENTSPACE_CUDA_LOSSES", value)
        assert _cuda_losses.backend() == value

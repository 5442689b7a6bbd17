"""The native encoder on a CUDA GPU: csrc/cuda/encode.cu behind encoding.Encoder.

An exported model (encoding.export_layers: Linear layers, activations, LayerNorms, PCA's
mean) is uploaded once to the device as torch tensors, the snapshot, which this object keeps
alive: the native encoder holds their addresses. Each encode() queues one kernel per layer (and
one per LayerNorm) on torch's current stream for the device and waits for nothing; the hidden
layers' activations use a workspace from torch's caching allocator (two buffers of rows x the
widest hidden layer for three layers or more, one for two, none for one; plus rows x input_dim
for a model that starts with a LayerNorm).

Which encoder an exported model gets on a GPU: LATENTSPACE_CUDA_ENCODER, read when an Encoder
is built, "native" (these kernels), "torch" (the model's own torch code) or unset / "" /
"auto" (the default, DEFAULT_BACKEND: "native" since GPU run 10 checked the kernels (tests,
memcheck, racecheck) and timed them 1.3-20x faster than the torch backend in every cell,
docs/gpu-runs.md; a build without CUDA kernels gets "torch"). torch is imported by the code
that uploads and runs, not by this module: build_info() reports backend() without importing
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _native
from ._arrays import first_nonfinite_row
from ._cuda_switch import choose_backend

if TYPE_CHECKING:
    import torch

    from ._encode_export import MlpSpec

__all__ = ["BACKEND_VARIABLE", "DEFAULT_BACKEND", "CudaEncoder", "backend"]

BACKEND_VARIABLE = "LATENTSPACE_CUDA_ENCODER"
DEFAULT_BACKEND = "native"


def backend() -> str:
    """"native" or "torch": what an exported model gets on a GPU now (see the module docstring)."""
    return choose_backend(BACKEND_VARIABLE, DEFAULT_BACKEND)


class CudaEncoder:
    """An exported model's layers on one CUDA device, and the native encoder over them.

    spec: the export (finite weights, checked by export_layers); device: a torch.device of type
    cuda (the current device when it has no index); precision: "fp32" or "bf16".
    """

    def __init__(self, spec: MlpSpec, device: torch.device, precision: str):
        # Refused by name where CUDA cannot run (an Encoder built on a GPU, the CUDA encoder's
        # default there, then unpickled on a machine without one), not with torch's bare error
        # from the first upload. (A new Encoder is refused before this, by resolve_device.)
        from ._cuda_device import require_cuda

        require_cuda(f"Encoder: the CUDA encoder on '{device}' asked for (an Encoder built on a GPU, or unpickled)",
                     "Build or unpickle it where that GPU is usable, or build the Encoder with device='cpu' "
                     "(the same model on the CPU's native encoder).")
        import torch

        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self._tensors: list[torch.Tensor] = []  # the snapshot: alive as long as the native encoder

        def upload_tensor(array: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
            self._tensors.append(tensor)
            return tensor

        def upload(array: np.ndarray | None) -> int | None:
            """The address of the array's copy on the device (None for None)."""
            return None if array is None else upload_tensor(array).data_ptr()

        def device_norm(stage: Any) -> tuple[float, int | None, int | None] | None:
            return None if stage is None else (float(stage.eps), upload(stage.weight), upload(stage.bias))

        # PCA's mean: its address goes to the kernels, the tensor to first_bad_row
        self._offset = None if spec.input_offset is None else upload_tensor(spec.input_offset)
        layers = spec.layers
        norms = None
        if spec.has_norms:
            # (place, eps, weight address, bias address): the CPU encoder's tuple, uploaded
            norms = [None if layer.norm is None else (layer.native_norm()[0], *device_norm(layer.norm)) for layer in layers]
        with torch.cuda.device(self.device):
            self.native = _native.CudaMlpEncoder(
                [upload(layer.weight) for layer in layers], [tuple(layer.weight.shape) for layer in layers],
                [upload(layer.bias) for layer in layers], [layer.activation for layer in layers],
                [float(layer.param) for layer in layers], None if self._offset is None else self._offset.data_ptr(),
                precision, norms,
                device_norm(spec.input_norm))
            # The uploads ran on the stream current now; encode() may run on another: wait for
            # them once, here, so that no kernel can read a weight before it has arrived.
            torch.cuda.current_stream(self.device).synchronize()
        self.kernel = str(self.native.kernel)

    @property
    def workspace_bytes_per_row(self) -> int:
        return 4 * int(self.native.workspace_floats(1))

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Queues out = encoder(x) on the current stream. x: (rows, input_dim), out: (rows,
        output_dim), both float32, C-contiguous, on this encoder's device (the caller checks).
        Returns a 0-d int32 device tensor, nonzero when an input value (minus the input offset)
        is NaN or Inf (found as the first layer reads its inputs: the check costs no pass of its
        own; first_bad_row then says which row). The caller keeps this object (its weights)
        alive until the stream has run the kernels (Encoder waits for each chunk's codes)."""
        import torch

        rows = int(x.shape[0])
        with torch.cuda.device(self.device):
            nonfinite = torch.zeros((), dtype=torch.int32, device=self.device)
            floats = int(self.native.workspace_floats(rows))
            workspace = torch.empty(floats, dtype=torch.float32, device=self.device) if floats else None
            self.native.encode(x.data_ptr(), rows, out.data_ptr(), 0 if workspace is None else workspace.data_ptr(),
                               nonfinite.data_ptr(), torch.cuda.current_stream(self.device).cuda_stream)
        # The workspace goes back to torch's caching allocator on return, on the stream its
        # kernels were queued on: a later allocation on that stream runs after them (stream order).
        return nonfinite

    def first_bad_row(self, x: torch.Tensor) -> int:
        """The lowest row of x holding NaN or Inf, or a value whose difference from the input
        offset overflows float32 (what the encode's flag reports), -1 when there is none."""
        return first_nonfinite_row(x if self._offset is None else x - self._offset)

"""Type stub for the native extension (csrc/bindings/). Call it through the public API."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

def knn(
    queries: npt.NDArray[np.float32],
    database: npt.NDArray[np.float32],
    k: int,
    metric: int,
    distances: npt.NDArray[np.float32],
    indices: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float32] | None = None,
) -> None: ...
def _set_row_query_limit(limit: int) -> None: ...
def _row_query_limit() -> int: ...
def sq_norms(x: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> int: ...
def hardware_simd_level() -> str: ...
def simd_level() -> str: ...
def set_simd_level(level: str) -> None: ...
def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def cuda_compiled() -> bool: ...
def cuda_architectures() -> str: ...
def cuda_unavailable_reason() -> str: ...
def cuda_devices() -> list[dict[str, Any]]: ...
def reconstruction_loss(
    recon: npt.NDArray[Any],
    target: npt.NDArray[Any],
    kind: int,
    grad_scale: float,
    grad: npt.NDArray[Any] | None = None,
    row_losses: npt.NDArray[np.float64] | None = None,
) -> float: ...
def kl_normal(
    mu: npt.NDArray[Any],
    logvar: npt.NDArray[Any],
    grad_scale: float,
    grad_mu: npt.NDArray[Any] | None = None,
    grad_logvar: npt.NDArray[Any] | None = None,
    row_losses: npt.NDArray[np.float64] | None = None,
) -> float: ...
def knn_cuda_workspace_bytes(num_queries: int, num_database: int, k: int, device: int) -> int: ...
def _cuda_tensor_tile() -> str: ...
def _cuda_fused_finish() -> bool: ...
def knn_cuda(
    queries: int,
    num_queries: int,
    database: int,
    num_database: int,
    dim: int,
    k: int,
    metric: int,
    distances: int,
    indices: int,
    workspace: int,
    workspace_bytes: int,
    stream: int,
    precision: int = 0,
    weights: int = 0,
    storage: int = 0,
    database_norms: int = 0,
) -> None: ...  # device pointers and a cudaStream_t as integers (see _cuda_search.py)

class MlpEncoder:
    def __init__(
        self,
        weights: list[npt.NDArray[np.float32]],
        biases: list[npt.NDArray[np.float32] | None],
        activations: list[str],
        activation_params: list[float],
        input_offset: npt.NDArray[np.float32] | None = None,
        precision: str = "fp32",
    ) -> None: ...
    @property
    def input_dim(self) -> int: ...
    @property
    def output_dim(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def precision(self) -> str: ...
    @property
    def kernel(self) -> str: ...
    def encode(self, x: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None: ...

def empty_huge_float32(rows: int, cols: int, cached: bool = True) -> npt.NDArray[np.float32]: ...
def empty_huge_float64(rows: int, cols: int, cached: bool = True) -> npt.NDArray[np.float64]: ...

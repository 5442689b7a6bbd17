"""latentspace: learn compact latent spaces from data and search them fast.

The public API, re-exported from the modules that implement it.
"""

from . import datasets
from ._native import __version__
from .indexes import FlatIndex, IndexFileError, load_index
from .runtime import (
    _warn_about_bad_simd_env,
    build_info,
    cuda_available,
    get_num_threads,
    set_num_threads,
    set_simd_level,
    simd_level,
)
from .search import knn

_warn_about_bad_simd_env()
del _warn_about_bad_simd_env

__all__ = [
    "FlatIndex",
    "IndexFileError",
    "__version__",
    "build_info",
    "cuda_available",
    "datasets",
    "get_num_threads",
    "knn",
    "load_index",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
]

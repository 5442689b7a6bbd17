"""latentspace: learn compact latent spaces from data and search them fast.

The public API, re-exported from the modules that implement it. The torch-based parts
(models, train, encode, losses, metrics), the relevance scores and the plots (matplotlib) are
imported on first use, so `import latentspace` for search alone does not load torch.
"""

from importlib import import_module
from typing import Any

from . import datasets
from ._arrays import CudaUnavailableError
from ._native import __version__
from .indexes import FlatIndex, IndexFileError, load_index
from .runtime import (
    _fit_default_threads_to_address_limit,
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
_fit_default_threads_to_address_limit()  # (libgomp would end the process at the first search)
del _warn_about_bad_simd_env, _fit_default_threads_to_address_limit

# name -> module that defines it, imported on first access (PEP 562). The training loop
# lives in training.py, not train.py: a submodule named train would be bound over the
# function latentspace.train by the import system whenever it is first imported.
_LAZY = {
    "Autoencoder": ".models",
    "ConvAutoencoder": ".models",
    "Encoder": ".encoding",
    "History": ".training",
    "ModelFileError": ".models",
    "PCA": ".models",
    "VAE": ".models",
    "encode": ".encoding",
    "load_model": ".models",
    "save_model": ".models",
    "train": ".training",
    "knn_label_agreement": ".metrics",
    "neighbor_recall": ".metrics",
    "trustworthiness": ".metrics",
    "keep_top": ".feature_relevance",
    "relevance": ".feature_relevance",
    "relevance_weights": ".feature_relevance",
    "top_dimensions": ".feature_relevance",
    "losses": ".losses",
    "metric_learning": ".metric_learning",
    "metrics": ".metrics",
    "models": ".models",
    "plots": ".plots",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = import_module(_LAZY[name], __name__)
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'latentspace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Autoencoder",
    "ConvAutoencoder",
    "CudaUnavailableError",
    "Encoder",
    "FlatIndex",
    "History",
    "IndexFileError",
    "ModelFileError",
    "PCA",
    "VAE",
    "__version__",
    "build_info",
    "cuda_available",
    "datasets",
    "encode",
    "get_num_threads",
    "keep_top",
    "knn",
    "knn_label_agreement",
    "load_index",
    "load_model",
    "losses",
    "metric_learning",
    "metrics",
    "models",
    "neighbor_recall",
    "plots",
    "relevance",
    "relevance_weights",
    "save_model",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "top_dimensions",
    "train",
    "trustworthiness",
]

"""PCA: the closed-form linear latent model, the baseline every learned model is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._arrays import as_model_input, check_bool, check_dense, check_int, is_torch_tensor
from .._memory_limit import memory_limit
from .base import LatentModel, checked_config

__all__ = ["PCA"]

# Up to this many matrix elements the centred data is decomposed by SVD in one piece (float64:
# 128 MiB); beyond it, X^T X is accumulated in chunks and eigendecomposed (its eigenvectors
# are the right singular vectors), so the data can be a memory map larger than RAM, unless
# the data has more features than rows (X^T X would be the larger): SVD in one piece then.
_SVD_MAX_ELEMENTS = 1 << 24
_CHUNK_ROWS = 65536
# ... and at most this many bytes of them in float64 (the chunk is converted to float64, and a
# few chunk-sized temporaries live at once): 65,536 rows of 1,024 features took 2.2 GB while
# fitting a memory map
_CHUNK_BYTES = 16 << 20


def _check_memory(nbytes: int, n: int, d: int) -> None:
    """MemoryError naming X when decomposing it whole needs more than the memory
    this process may use (_memory_limit)
    (torch allocates lazily: the kernel killed Python, with no exception)."""
    memory = memory_limit()
    if memory is not None and nbytes > memory.nbytes:
        raise MemoryError(f"X: {n} rows of {d} features are decomposed whole, in float64, "
                          f"which needs {nbytes / 2**30:,.2f} GiB, more than {memory}; "
                          "use fewer features or fit a sample of them")


class PCA(LatentModel):
    """Principal component analysis, fitted in closed form (SVD), never by gradient descent.

    Args:
        latent_dim: components kept, 1 <= latent_dim <= min(n_samples, n_features) at fit.
        whiten: scale each component to unit variance in the latent space (decode undoes it).

    encode(x) = (x - mean) @ components.T [/ sqrt(explained_variance) when whitening];
    decode(z) = z [* sqrt(explained_variance)] @ components + mean. Whitening maps a component
    without spread (variance <= the buffers' eps, float32's by default, times the largest;
    every one for constant data) to
    0 for every input, and decode maps it back to 0: finite, never a division by zero. Each component's sign is
    fixed so that its largest-magnitude entry is positive (deterministic across runs).
    Computed in float64, stored as float32 buffers, or in the model's dtype when it was
    converted (PCA(k).double().fit(X) stays float64). Saved by latentspace.save_model; the
    state_dict also loads into a fresh PCA of the same latent_dim, which it leaves fitted.
    """

    def __init__(self, latent_dim: int, whiten: bool = False):
        super().__init__(latent_dim)
        self.whiten = check_bool(whiten, "whiten")
        self._allocate(0)
        self._fitted = False

    def _allocate(self, input_dim: int, **like: Any) -> None:
        """Zeroed buffers for `input_dim` features (float32 on the CPU unless `like` gives
        device= and dtype=)."""
        k = self.latent_dim
        self.register_buffer("mean", torch.zeros(input_dim, **like))
        self.register_buffer("components", torch.zeros(k, input_dim, **like))
        self.register_buffer("explained_variance", torch.zeros(k if input_dim else 0, **like))
        self.register_buffer("explained_variance_ratio", torch.zeros(k if input_dim else 0, **like))
        self.register_buffer("singular_values", torch.zeros(k if input_dim else 0, **like))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """load_state_dict copies into the buffers as they are, and a fresh PCA's are empty (its
        input dimension is known only at fit): sized first to a fitted state's dimension, when
        every buffer's shape agrees with one, so that torch's round trip works. Any other state
        meets torch's own size checks (an unfitted PCA stays unfitted). A load that fails after
        the resizing leaves the buffers the PCA had (not zeroed ones under a fitted flag).
        `whiten` is a constructor argument, not state: build PCA(k, whiten=...) as saved."""
        d = self._fitted_dimension(state_dict, prefix)
        before = dict(self._buffers)
        if d is not None and d != self.mean.shape[0]:
            self._allocate(d, device=self.mean.device, dtype=self.mean.dtype)
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) > errors:
            self._buffers.update(before)  # load_state_dict raises with these messages
        elif d is not None:
            self._fitted = True

    def _fitted_dimension(self, state_dict, prefix) -> int | None:
        """d when the state holds a fitted PCA of this latent_dim: mean (d,), components (k, d),
        the three per-component vectors (k,), d >= 1; None otherwise."""
        k = self.latent_dim
        shapes = {name: getattr(state_dict.get(prefix + name), "shape", None) for name in self._buffers}
        mean = shapes.get("mean")
        if mean is None or len(mean) != 1 or mean[0] < 1:
            return None
        d = int(mean[0])
        wanted = {"mean": (d,), "components": (k, d), "explained_variance": (k,),
                  "explained_variance_ratio": (k,), "singular_values": (k,)}
        return d if all(tuple(shapes.get(name) or ()) == shape for name, shape in wanted.items()) else None

    # -- LatentModel --------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        self._check_fitted()
        return (int(self.mean.shape[0]),)

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def config(self) -> dict[str, Any]:
        self._check_fitted()
        return {"latent_dim": self.latent_dim, "whiten": self.whiten, "input_dim": int(self.mean.shape[0])}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PCA":
        """A fresh PCA with buffers for config's input_dim, not fitted: load_state_dict (as
        load_model does) fills them and marks it fitted. (Marked fitted here, its zeroed
        buffers encoded every input to 0, silently.)"""
        config = checked_config(cls, config, extra=("input_dim",))
        input_dim = check_int(config.pop("input_dim"), "input_dim")
        model = cls(**config)
        model._allocate(input_dim)
        return model

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ValueError("PCA is not fitted: call fit(X) first")

    def _spread(self) -> torch.Tensor:
        """Whether each component has a (numerically) nonzero variance: above its dtype's eps
        (float32's unless the model was converted) times the largest (all False for constant data)."""
        info = torch.finfo(self.explained_variance.dtype)
        floor = info.eps * self.explained_variance.max()
        return self.explained_variance > floor.clamp_min(info.tiny)

    def _scale(self) -> torch.Tensor:
        """Whitening's per-component standard deviations, 0 for a component without spread."""
        spread = self._spread()
        return torch.where(spread, self.explained_variance, torch.zeros_like(self.explained_variance)).sqrt()

    def _inverse_scale(self) -> torch.Tensor:
        """What whitening multiplies codes by: 1 / standard deviation, and 0 for a component
        without spread (the pseudo-inverse): the fitted data holds no information along it, so
        every input, new ones included, maps to 0 there rather than to a huge or infinite value."""
        spread = self._spread()
        safe = torch.where(spread, self.explained_variance, torch.ones_like(self.explained_variance))
        return torch.where(spread, safe.rsqrt(), torch.zeros_like(safe))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) @ self.components.T
        return z * self._inverse_scale() if self.whiten else z

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.whiten:
            z = z * self._scale()
        return z @ self.components + self.mean

    def encode(self, x: Any) -> Any:
        self._check_fitted()
        return super().encode(x)

    def decode(self, z: Any) -> Any:
        self._check_fitted()
        return super().decode(z)

    def forward(self, x: Any) -> Any:
        self._check_fitted()
        return super().forward(x)

    # -- fitting ------------------------------------------------------------------------
    def fit(self, X: Any) -> "PCA":
        """Fits the components to X, (n, d) numpy array (a memory map is fine) or torch tensor,
        n >= 2 and latent_dim <= min(n, d). Returns self.

        Raises ValueError for latent_dim > d (or > n), NaN / Inf values, too few rows, and data
        whose values or variances the fitted buffers' dtype (float32 unless the model was
        converted) cannot hold; TypeError for X that is not an array (a generator, a string)
        or a masked array with masked entries; MemoryError for data with more features than
        rows (decomposed whole) too large for the memory this process may use.
        """
        if is_torch_tensor(X):
            check_dense(X, "X")  # (a meta tensor has no data to copy to the CPU)
            X = X.detach().cpu()
        elif not isinstance(X, np.ndarray):  # a np.memmap is an ndarray: never copied whole
            if isinstance(X, (str, bytes)) or X is None:
                raise TypeError(f"X: expected a numpy array or torch tensor, got {type(X).__name__}")
            given, X = type(X).__name__, np.asarray(X)
            if X.ndim == 0 and X.dtype == object:  # a generator, a dict: np.asarray wraps it whole
                raise TypeError(f"X: expected a numpy array, memory map or torch tensor of shape (n, d), got {given}")
        if X.ndim != 2:
            raise ValueError(f"X: expected a 2-d array of shape (n, d), got shape {tuple(X.shape)}")
        n, d = X.shape
        k = self.latent_dim
        dtype = self.mean.dtype  # float32 unless the model was converted (.double()): kept
        name, largest = str(dtype).removeprefix("torch."), float(torch.finfo(dtype).max)
        if k > d:
            raise ValueError(f"latent_dim: PCA(latent_dim={k}) cannot exceed the input dimension; "
                             f"X has {d} columns")
        if n < 2 or k > n:
            raise ValueError(f"X: PCA(latent_dim={k}) needs at least max(2, {k}) rows, got {n}")

        step = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // (8 * d)))

        def chunks():
            for start in range(0, n, step):
                chunk, _ = as_model_input(X[start : start + step], "X", sample_shapes=((d,),),
                                          dtype=torch.float64, device="cpu")
                if not torch.isfinite(chunk).all():
                    row = start + int((~torch.isfinite(chunk)).any(dim=1).nonzero()[0, 0])
                    raise ValueError(f"X: row {row} contains NaN or Inf; clean the data before fitting")
                beyond = (chunk.abs() > largest).any(dim=1)
                if beyond.any():  # the fitted mean and components have the model's dtype, as encode's input
                    row = start + int(beyond.nonzero()[0, 0])
                    raise ValueError(f"X: row {row} has values beyond {name}'s range (|x| > {largest:.4g}); "
                                     "rescale the data")
                yield chunk.detach()

        mean = sum(chunk.sum(dim=0) for chunk in chunks()) / n
        # X^T X is d x d: for data wider than it is long, larger than the data itself (300 rows
        # of 60,000 features asked for 29 GB), so such data is decomposed whole.
        if n * d <= _SVD_MAX_ELEMENTS or d > n:
            _check_memory(3 * 8 * n * d, n, d)  # float64: the chunks, the centred copy, the SVD's
            centred = torch.cat(list(chunks())) - mean
            _, s, vt = torch.linalg.svd(centred, full_matrices=False)
            singular, vectors = s[:k], vt[:k]
            total_variance = (centred * centred).sum() / (n - 1)
        else:
            gram = torch.zeros(d, d, dtype=torch.float64)
            for chunk in chunks():
                centred = chunk.sub_(mean)  # in place: the chunk is a private copy
                gram += centred.T @ centred
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
            order = torch.argsort(eigenvalues, descending=True)[:k]
            singular = eigenvalues[order].clamp_min(0).sqrt()
            vectors = eigenvectors[:, order].T
            total_variance = torch.diagonal(gram).sum() / (n - 1)
        # Deterministic signs: each component's largest-magnitude entry is positive.
        biggest = vectors.abs().argmax(dim=1)
        signs = torch.sign(vectors[torch.arange(k), biggest])
        vectors = vectors * torch.where(signs == 0, 1.0, signs)[:, None]
        variance = singular**2 / (n - 1)
        ratio = variance / total_variance if total_variance > 0 else torch.zeros_like(variance)
        self._check_variance(variance, dtype)

        device = self._device_dtype()[0]
        self._allocate(d)
        self.mean = mean.to(device=device, dtype=dtype)
        self.components = vectors.to(device=device, dtype=dtype).contiguous()
        self.explained_variance = variance.to(device=device, dtype=dtype)
        self.explained_variance_ratio = ratio.to(device=device, dtype=dtype)
        self.singular_values = singular.to(device=device, dtype=dtype)
        self._fitted = True
        return self

    def _check_variance(self, variance: torch.Tensor, dtype: torch.dtype) -> None:
        """The variances are stored in `dtype` (float32 unless the model was converted): refuse
        data whose spread does not survive that (it would read as infinite, or, when whitening
        divides by it, as none at all)."""
        largest, name, info = float(variance.max()), str(dtype).removeprefix("torch."), torch.finfo(dtype)
        if largest > info.max:
            raise ValueError(f"X: the largest component's variance, {largest:.4g}, is beyond {name}'s range "
                             f"({info.max:.4g}); rescale the data")
        if self.whiten and 0 < largest < info.tiny:
            raise ValueError(f"X: with whiten=True the components' variances (the largest {largest:.4g}) fall below "
                             f"{name}'s smallest normal number ({info.tiny:.4g}), so whitening would map every input "
                             "to 0; rescale the data")

    def extra_repr(self) -> str:
        fitted = f", input_dim={int(self.mean.shape[0])}" if self._fitted else ", not fitted"
        return f"latent_dim={self.latent_dim}, whiten={self.whiten}{fitted}"

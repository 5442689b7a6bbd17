"""Datasets. The default is embedded: the handwritten digits bundled with scikit-learn."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 handwritten 8x8 digits bundled with scikit-learn (no download).

    Returns:
        images: (1797, 64) float32 in [0, 1] (pixel intensities 0..16 divided by 16),
            row-major 8x8.
        labels: (1797,) int64, the digit 0..9.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    bunch = _sklearn_digits()
    images = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return np.ascontiguousarray(images), labels

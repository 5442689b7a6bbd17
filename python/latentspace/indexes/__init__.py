"""Indexes over latent vectors. Exact search (FlatIndex) is the oracle for all others."""

from .flat import FlatIndex, load_index
from .io import IndexFileError

__all__ = ["FlatIndex", "IndexFileError", "load_index"]

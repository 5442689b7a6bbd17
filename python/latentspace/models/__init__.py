"""Latent models with one interface: encode(x), decode(z), forward(x), latent_dim.

PCA is fitted in closed form (`fit`); the learned models (Autoencoder, VAE,
ConvAutoencoder) are trained with latentspace.train. save_model / load_model write and read
them as safetensors with their config (never pickles).
"""

from .autoencoder import Autoencoder
from .base import LatentModel
from .conv import ConvAutoencoder
from .io import ModelFileError, load_model, save_model
from .pca import PCA
from .vae import VAE

__all__ = ["Autoencoder", "ConvAutoencoder", "LatentModel", "ModelFileError", "PCA", "VAE",
           "load_model", "save_model"]

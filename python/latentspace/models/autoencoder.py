"""Autoencoder: an MLP encoder and decoder, trained to reconstruct its input."""

from __future__ import annotations

from typing import Any

import torch

from .._arrays import check_int
from ._checks import check_parameter_count, mlp_parameters
from .base import ReconstructionModel, check_activation, check_sizes, mlp

__all__ = ["Autoencoder"]


class Autoencoder(ReconstructionModel):
    """A deterministic MLP autoencoder.

    Args:
        input_dim: features per sample (D).
        latent_dim: size of the code (may exceed input_dim; usually much smaller).
        hidden: widths of the encoder's hidden layers; the decoder mirrors them.
            () gives a linear autoencoder.
        activation: "relu", "gelu", "silu", "elu", "leaky_relu" or "tanh", between layers.
            The code itself is linear (no activation on the last encoder layer).
        output: "linear" (any real data; default loss "mse") or "sigmoid" (data in [0, 1],
            such as pixel intensities; default loss "bce").

    encoder: D -> hidden[0] -> ... -> latent_dim; decoder: latent_dim -> ... -> hidden[0] -> D.
    Raises ValueError, naming the largest size, when the weights would number more than
    2**40 (models._checks.MAX_PARAMETERS: 4 TiB of float32), sizes no machine holds, and
    MemoryError, naming it too, when they would take more than the memory this process may use
    (the machine's, or its cgroup's limit).
    """

    def __init__(self, input_dim: int, latent_dim: int, hidden: tuple[int, ...] = (256, 128),
                 activation: str = "relu", *, output: str = "linear"):
        super().__init__(latent_dim, output)
        self.input_dim = check_int(input_dim, "input_dim")
        self.hidden = check_sizes(hidden, "hidden")
        self.activation = check_activation(activation)
        widths = (self.input_dim, *self.hidden, self.latent_dim)
        check_parameter_count(mlp_parameters(widths) + mlp_parameters(widths[::-1]),
                               {"input_dim": self.input_dim, "latent_dim": self.latent_dim, "hidden": self.hidden})
        self.encoder = mlp((self.input_dim, *self.hidden, self.latent_dim), self.activation)
        self.decoder = mlp((self.latent_dim, *reversed(self.hidden), self.input_dim), self.activation)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_dim,)

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "latent_dim": self.latent_dim, "hidden": list(self.hidden),
                "activation": self.activation, "output": self.output}

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def _decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

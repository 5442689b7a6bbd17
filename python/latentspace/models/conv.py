"""ConvAutoencoder: a convolutional autoencoder for images shaped (C, H, W)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._arrays import check_int
from ._checks import check_parameter_count
from .base import ACTIVATIONS, ReconstructionModel, check_activation, check_sizes

__all__ = ["ConvAutoencoder"]

_KERNEL, _STRIDE, _PADDING = 3, 2, 1  # each conv halves H and W (rounding up)


class ConvAutoencoder(ReconstructionModel):
    """A convolutional autoencoder for images, e.g. the 8x8 digits (1, 8, 8) or 28x28 images.

    Args:
        input_shape: (C, H, W) of one image.
        latent_dim: size of the code.
        channels: output channels of the encoder's convolutions (3x3, stride 2, padding 1:
            each halves H and W, rounding up); the decoder mirrors them with transposed
            convolutions sized to give back exactly (H, W).
        activation: "relu", "gelu", "silu", "elu", "leaky_relu" or "tanh".
        output: "sigmoid" (default: pixel intensities in [0, 1], loss "bce") or "linear".

    encoder: conv x len(channels) -> flatten -> linear -> latent_dim.
    decoder: linear -> reshape -> transposed conv x len(channels) -> (C, H, W).

    Inputs may be (n, C, H, W) or flattened rows (n, C*H*W) (as datasets.load_digits()
    returns them); forward(x) answers in the shape x came in, decode(z) as (n, C, H, W).

    Raises ValueError, naming the largest size, when the weights would number more than
    2**40 (models._checks.MAX_PARAMETERS: 4 TiB of float32), sizes no machine holds (the
    linear layers hold channels[-1] * ceil(H / 2**k) * ceil(W / 2**k) * latent_dim each,
    k = len(channels)), and MemoryError, naming it too, when they would take more than the
    memory this process may use (the machine's, or its cgroup's limit).
    """

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int,
                 channels: tuple[int, ...] = (32, 64), activation: str = "relu", *,
                 output: str = "sigmoid"):
        super().__init__(latent_dim, output)
        if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (tuple, list)) \
                or len(input_shape) != 3:
            raise ValueError(f"input_shape: expected (C, H, W), three integers >= 1, got {input_shape!r}")
        self._input_shape = tuple(check_int(v, f"input_shape[{i}]") for i, v in enumerate(input_shape))
        self.channels = check_sizes(channels, "channels", allow_empty=False)
        self.activation = check_activation(activation)
        act = ACTIVATIONS[self.activation]

        c, h, w = self._input_shape
        sizes = [(h, w)]
        for _ in self.channels:
            sizes.append(tuple((s + 2 * _PADDING - _KERNEL) // _STRIDE + 1 for s in sizes[-1]))
        self._bottleneck = (self.channels[-1], *sizes[-1])
        flat = self.channels[-1] * sizes[-1][0] * sizes[-1][1]
        check_parameter_count(self._parameter_count(flat), {
            "input_shape": self._input_shape, "latent_dim": self.latent_dim, "channels": self.channels})

        encoder: list[nn.Module] = []
        previous = c
        for width in self.channels:
            encoder += [nn.Conv2d(previous, width, _KERNEL, _STRIDE, _PADDING), act()]
            previous = width
        encoder += [nn.Flatten(), nn.Linear(flat, self.latent_dim)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [nn.Linear(self.latent_dim, flat), act(), nn.Unflatten(1, self._bottleneck)]
        outputs = [c, *self.channels[:-1]]  # the channels each transposed conv gives back
        for i in reversed(range(len(self.channels))):
            target, source = sizes[i], sizes[i + 1]
            # (in - 1) * stride - 2 * padding + kernel + output_padding == target size
            padding = tuple(t - ((s - 1) * _STRIDE - 2 * _PADDING + _KERNEL) for t, s in zip(target, source))
            decoder.append(nn.ConvTranspose2d(self.channels[i], outputs[i], _KERNEL, _STRIDE, _PADDING,
                                              output_padding=padding))
            if i > 0:
                decoder.append(act())
        self.decoder = nn.Sequential(*decoder)

    def _parameter_count(self, flat: int) -> int:
        """Weights and biases of the layers built below, in Python integers (no overflow)."""
        widths = (self._input_shape[0], *self.channels)
        convs = sum(2 * a * b * _KERNEL * _KERNEL + a + b for a, b in zip(widths[:-1], widths[1:]))
        linears = 2 * flat * self.latent_dim + flat + self.latent_dim
        return convs + linears

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def _sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        c, h, w = self._input_shape
        return (self._input_shape, (c * h * w,))

    def config(self) -> dict[str, Any]:
        return {"input_shape": list(self._input_shape), "latent_dim": self.latent_dim,
                "channels": list(self.channels), "activation": self.activation, "output": self.output}

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(x.shape[0], *self._input_shape))

    def _decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

"""VAE: a variational autoencoder with a diagonal Gaussian posterior."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from .._arrays import check_bool, check_float, check_int
from ._checks import check_generator, check_objective_arguments, check_parameter_count, mlp_parameters
from .base import ReconstructionModel, check_activation, check_sizes, full_precision, mlp

__all__ = ["VAE"]


class VAE(ReconstructionModel):
    """Variational autoencoder: q(z|x) = N(mu(x), diag(exp(logvar(x)))), prior N(0, I).

    Args:
        input_dim: features per sample (D).
        latent_dim: size of z.
        hidden: widths of the encoder's hidden layers; the decoder mirrors them.
        beta: weight of the KL term (1: the ELBO; > 1: a beta-VAE).
        activation: "relu", "gelu", "silu", "elu", "leaky_relu" or "tanh".
        output: "sigmoid" (default: a Bernoulli decoder for data in [0, 1], loss "bce") or
            "linear" (loss "mse").
        kl_warmup: epochs over which the KL weight ramps linearly from 0 to beta (0: none).

    The encoder's last layer emits mu and logvar (2 * latent_dim values); the decoder maps z
    back to D values (logits for a sigmoid output).

    `encode(x)` returns the posterior mean mu(x), deterministic; `encode(x, sample=True)`
    draws z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (the reparameterisation trick).
    `forward(x)` = decode(mu(x)): the deterministic reconstruction.

    Raises ValueError, naming the largest size, when the weights would number more than
    2**40 (models._checks.MAX_PARAMETERS: 4 TiB of float32), sizes no machine holds, and
    MemoryError, naming it too, when they would take more than the memory this process may use
    (the machine's, or its cgroup's limit).
    """

    def __init__(self, input_dim: int, latent_dim: int, hidden: tuple[int, ...] = (256, 128),
                 beta: float = 1.0, *, activation: str = "relu", output: str = "sigmoid",
                 kl_warmup: float = 0.0):
        super().__init__(latent_dim, output)
        self.input_dim = check_int(input_dim, "input_dim")
        self.hidden = check_sizes(hidden, "hidden")
        self.beta = check_float(beta, "beta")
        self.kl_warmup = check_float(kl_warmup, "kl_warmup")
        self.activation = check_activation(activation)
        count = (mlp_parameters((self.input_dim, *self.hidden, 2 * self.latent_dim))
                 + mlp_parameters((self.latent_dim, *reversed(self.hidden), self.input_dim)))
        check_parameter_count(count, {"input_dim": self.input_dim, "latent_dim": self.latent_dim,
                                       "hidden": self.hidden})
        self.encoder = mlp((self.input_dim, *self.hidden, 2 * self.latent_dim), self.activation)
        self.decoder = mlp((self.latent_dim, *reversed(self.hidden), self.input_dim), self.activation)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_dim,)

    @property
    def warmup_epochs(self) -> float:
        return self.kl_warmup

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "latent_dim": self.latent_dim, "hidden": list(self.hidden),
                "beta": self.beta, "activation": self.activation, "output": self.output,
                "kl_warmup": self.kl_warmup}

    # -- posterior ----------------------------------------------------------------------
    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def posterior(self, x: Any) -> tuple[Any, Any]:
        """(mu, logvar) of q(z|x), each (n, latent_dim); numpy in, numpy out."""
        both = self._run(lambda t: torch.cat(self._posterior(t), dim=-1), x, "x", self._sample_shapes())
        return both[:, : self.latent_dim], both[:, self.latent_dim :]

    @staticmethod
    def _sample(mu: torch.Tensor, logvar: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._posterior(x)[0]

    def encode(self, x: Any, *, sample: bool = False, generator: torch.Generator | None = None) -> Any:
        """The posterior mean mu(x), (n, latent_dim); with sample=True a draw from q(z|x)
        (reproducible with a seeded torch.Generator on the model's device; generator is
        None or a torch.Generator there, else TypeError / ValueError)."""
        if not check_bool(sample, "sample"):
            return super().encode(x)
        check_generator(generator, self._device_dtype()[0])
        return self._run(lambda t: self._sample(*self._posterior(t), generator), x, "x",
                         self._sample_shapes())

    def _decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    # -- objective ----------------------------------------------------------------------
    def kl_weight(self, progress: float | None) -> float:
        """beta * min(1, progress / kl_warmup); progress (epochs done, fractional: a number
        >= 0, else TypeError / ValueError) None or no warm-up: beta."""
        if progress is None:
            return self.beta
        progress = check_float(progress, "progress")  # float("1") would take a string silently
        return self.beta if self.kl_warmup == 0 else self.beta * min(1.0, progress / self.kl_warmup)

    def objective(self, x: torch.Tensor, *, loss: str | None = None, progress: float | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO (beta-weighted) on a batch x, (n, D) on the model's device.

            mu, logvar = encoder(x);  z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I) (one draw)
            reconstruction_i = sum_d  l(decoder(z)_id, x_id)          summed over the D features
            kl_i = -1/2 sum_j (1 + logvar_ij - mu_ij^2 - exp(logvar_ij))   summed over latent dims
            loss = mean_i reconstruction_i + w * mean_i kl_i            both averaged over the batch
            w = beta * min(1, progress / kl_warmup)   (w = beta without warm-up or progress=None)

        l is binary cross-entropy on the decoder's logits (loss="bce", the Bernoulli
        log-likelihood; the default for output="sigmoid") or the squared error (loss="mse").
        With beta = 1 and no warm-up, loss is the negative ELBO per sample in nats (for "bce"),
        so its minimum maximises a lower bound on log p(x). Both terms are computed in full
        precision (float32; float64 for a float64 model) by latentspace.losses (reconstruction_loss(..., reduction="none"), kl_normal(...,
        reduction="mean")). `generator` draws eps (a seeded one makes it reproducible).

        Returns {"loss", "reconstruction", "kl", "kl_weight"} (scalars; only "loss" carries
        gradients) and "codes": the posterior means mu, (n, latent_dim), with their
        gradients (what encode() returns, so a metric-learning term in training shapes the
        codes that are searched; the noisy draw z is for the reconstruction only).

        A training API: x must be a torch tensor of the model's dtype, on its device, shaped
        (n, input_dim) with n >= 1 (nothing is converted: encode() is the one that takes numpy
        and other dtypes); progress None or a number >= 0; generator None or a
        torch.Generator on the model's device. TypeError / ValueError naming the argument.
        """
        check_objective_arguments(self, x, progress, generator)
        loss = self.check_loss(loss)
        mu, logvar = self._posterior(x)
        z = self._sample(mu, logvar, generator)
        reconstruction = self.reconstruction_term(self._decode_logits(z), x, loss).mean()
        kl = losses.kl_normal(full_precision(mu), full_precision(logvar), reduction="mean")
        weight = self.kl_weight(progress)
        total = reconstruction + weight * kl
        return {"loss": total, "reconstruction": reconstruction.detach(), "kl": kl.detach(),
                "kl_weight": torch.tensor(weight), "codes": mu}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, kl_warmup={self.kl_warmup}, output={self.output!r}"


"""A small MLP hierarchical VAE: the lecture's Markovian hierarchical VAE (MHVAE), the bridge from
the VAE to the DDPM (CS492D lecture 3, shared/seeds/000_*.txt, "Markovian Hierarchical VAEs").

With L latent levels z_1..z_L (each of size latent_dim) and x = z_0:

  generative (top-down):   p(z_L) = N(0, I),  p(z_{l-1} | z_l) = N(mu_p(z_l), diag exp(logvar_p(z_l))),
                           p(x | z_1) the VAE's discretized Gaussian decoder;
  inference (bottom-up):   q(z_1 | x) = N(mu(x), ...),  q(z_l | z_{l-1}) = N(mu_q(z_{l-1}), ...),

the lecture's q(x_{1:T} | x_0) = prod_t q(x_t | x_{t-1}) with learned transitions (a DDPM fixes
them and keeps the data's dimension). No ladder / top-down inference: the lecture describes the
bottom-up Markov chain, and since z_L -> ... -> z_1 -> x is a Markov chain the true posterior
factorizes the same way, p(z_{1:L} | x) = p(z_1 | x) prod_l p(z_l | z_{l-1}), so this family loses
nothing structurally.

Level 1 (q(z_1 | x) and p(x | z_1)) *is* a `ddpm_jax.models.vae.VAE` (its encoder and decoder,
parameters under "vae"): with num_levels = 1 the model is the VAE baseline, parameter for
parameter. Each further level adds two Gaussian MLPs: "posterior_{l}" for q(z_l | z_{l-1}),
l = 2..L, and "prior_{l}" for p(z_l | z_{l+1}), l = 1..L-1. The losses live in `ddpm_jax.core.hvae`;
this module is only the network, and keeps no randomness of its own (the caller passes the
reparameterization noise).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ddpm_jax.core.hvae import HVAEOutputs, hvae_latent_shape_of  # noqa: F401 - re-exported
from ddpm_jax.core.vae import reparameterize
from ddpm_jax.models.layers import DTYPES, dense
from ddpm_jax.models.vae import VAE, _mlp


class GaussianMLP(nn.Module):
    """z [B, k] -> (mean, logvar), each float32 [B, latent_dim]: a conditional diagonal Gaussian.

    The output layer starts small (init_scale 0.1), so every conditional starts near N(0, I): the
    hierarchy starts at the prior with every KL term ~ 0, like the VAE's encoder.
    """

    latent_dim: int
    hidden: int
    num_hidden_layers: int
    dtype: Any = jnp.float32

    def setup(self):
        self.hidden_layers = [dense(self.hidden, self.dtype, name=f"hidden_{i}") for i in range(self.num_hidden_layers)]
        self.out = dense(2 * self.latent_dim, self.dtype, init_scale=0.1, name="out")

    def __call__(self, z: chex.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
        out = self.out(_mlp(z, self.hidden_layers, self.dtype)).astype(jnp.float32)
        mean, logvar = jnp.split(out, 2, axis=-1)
        return mean, logvar


class HVAE(nn.Module):
    """Markovian hierarchical VAE for images [B, H, W, C] in [-1, 1].

    Use `__call__(x, z_noise)` (training), `generate(z_noise)` (sampling), or the pieces
    `encode`, `decode` (level 1), `posterior(l, z)`, `prior(l, z)`.

    Attributes:
      num_levels: L, the number of latent levels (>= 1; 1 is the VAE).
      latent_dim: size of each z_l.
      hidden: width of every hidden layer.
      num_hidden_layers: hidden layers of every MLP (>= 1).
      image_size, channels: H = W and C of the images.
      dtype: compute dtype of the dense layers; parameters and every output are float32.
    """

    num_levels: int
    latent_dim: int
    hidden: int
    num_hidden_layers: int
    image_size: int
    channels: int
    dtype: Any = jnp.float32

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def noise_size(self) -> int:
        """Standard-normal numbers per example: one latent_dim draw per level."""
        return self.num_levels * self.latent_dim

    def setup(self):
        k, h, n, d = self.latent_dim, self.hidden, self.num_hidden_layers, self.dtype
        self.vae = VAE(
            latent_dim=k, hidden=h, num_hidden_layers=n, image_size=self.image_size, channels=self.channels, dtype=d
        )
        self.posteriors = [GaussianMLP(k, h, n, d, name=f"posterior_{j}") for j in range(2, self.num_levels + 1)]
        self.priors = [GaussianMLP(k, h, n, d, name=f"prior_{j}") for j in range(1, self.num_levels)]

    # ------------------------------------------------------------------ pieces
    def encode(self, x: chex.Array):
        """q(z_1 | x): the VAE's encoder."""
        return self.vae.encode(x)

    def decode(self, z1: chex.Array):
        """p(x | z_1): the VAE's decoder, (means, log_scales) [B, H, W, C]."""
        return self.vae.decode(z1)

    def posterior(self, level: int, z_below: chex.Array):
        """q(z_level | z_{level-1}) for level = 2..L (a static int)."""
        return self.posteriors[level - 2](z_below)

    def prior(self, level: int, z_above: chex.Array):
        """p(z_level | z_{level+1}) for level = 1..L-1 (a static int)."""
        return self.priors[level - 1](z_above)

    def _split_noise(self, z_noise: chex.Array) -> list[jnp.ndarray]:
        chex.assert_shape(z_noise, (None, self.noise_size))
        return [z_noise[:, i * self.latent_dim : (i + 1) * self.latent_dim] for i in range(self.num_levels)]

    # ------------------------------------------------------------------ passes
    def __call__(self, x: chex.Array, z_noise: chex.Array) -> HVAEOutputs:
        """Bottom-up draws z_1 ~ q(z_1 | x), z_l ~ q(z_l | z_{l-1}) (reparameterized), then the
        top-down conditionals p(z_{l-1} | z_l) at those draws and the decoder at z_1.

        Args:
          x: images [B, H, W, C] in [-1, 1].
          z_noise: standard-normal noise [B, num_levels * latent_dim], drawn by the caller;
            columns [(l-1) k, l k) drive z_l. With num_levels = 1 this is exactly the VAE's noise.
        """
        noise = self._split_noise(z_noise)
        q_params, zs = [], []
        for level in range(1, self.num_levels + 1):
            mean, logvar = self.encode(x) if level == 1 else self.posterior(level, zs[-1])
            q_params.append((mean, logvar))
            zs.append(reparameterize(mean, logvar, noise[level - 1]))
        p_params = [self.prior(level, zs[level]) for level in range(1, self.num_levels)]
        means, log_scales = self.decode(zs[0])
        batch = x.shape[0]

        def stack(arrays):
            if not arrays:
                return jnp.zeros((batch, 0, self.latent_dim), jnp.float32)
            return jnp.stack(arrays, axis=1)

        return HVAEOutputs(
            q_means=stack([m for m, _ in q_params]),
            q_logvars=stack([v for _, v in q_params]),
            zs=stack(zs),
            p_means=stack([m for m, _ in p_params]),
            p_logvars=stack([v for _, v in p_params]),
            means=means,
            log_scales=log_scales,
        )

    def generate(self, z_noise: chex.Array) -> jnp.ndarray:
        """Ancestral sampling: z_L = noise_L ~ N(0, I), z_{l-1} = mu_p(z_l) + sigma_p(z_l) * noise_{l-1},
        down to the decoder *mean* D(z_1) [B, H, W, C] (as the VAE shows it)."""
        noise = self._split_noise(z_noise)
        z = noise[-1]
        for level in range(self.num_levels - 1, 0, -1):
            mean, logvar = self.prior(level, z)
            z = reparameterize(mean, logvar, noise[level - 1])
        return self.decode(z)[0]


def create_hvae(hvae_config: ml_collections.ConfigDict, image_size: int, channels: int) -> HVAE:
    """Builds the HVAE from a config (num_levels, latent_dim, hidden, num_hidden_layers, dtype).

    Raises:
      ValueError: naming the offending config field (config.hvae.<field>).
    """
    c = hvae_config
    for field in ("num_levels", "latent_dim", "hidden", "num_hidden_layers"):
        value = c.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.hvae.{field}: must be a positive integer, got {value!r}.")
    if c.get("dtype") not in DTYPES:
        raise ValueError(f"config.hvae.dtype: must be one of {sorted(DTYPES)}, got {c.get('dtype')!r}.")
    return HVAE(
        num_levels=int(c.num_levels),
        latent_dim=int(c.latent_dim),
        hidden=int(c.hidden),
        num_hidden_layers=int(c.num_hidden_layers),
        image_size=int(image_size),
        channels=int(channels),
        dtype=DTYPES[c.dtype],
    )

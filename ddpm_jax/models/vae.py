"""A small MLP VAE, the likelihood baseline for the DDPM (Kingma & Welling 2014).

Encoder q(z|x) = N(mean(x), diag exp(logvar(x))), prior p(z) = N(0, I), decoder p(x|z) a Gaussian
with mean D(z) and a learned per-pixel scale, integrated over the 256 bins of [-1, 1] by
`ddpm_jax.core.diffusion.discretized_gaussian_log_likelihood` (the DDPM's own L_0 decoder), so that the
VAE's negative ELBO in bits/dim is directly comparable with the DDPM's bound. The losses live in
`ddpm_jax.core.vae`; this module is only the network.

The module keeps no randomness of its own: `__call__(x, z_noise)` takes the standard-normal noise
of the reparameterization trick from the caller, who draws it from an explicit key.

References:
  Kingma, Welling. Auto-Encoding Variational Bayes (ICLR 2014), sections 2.3-2.4 and appendix C.
  CS492D lecture 3 (shared/seeds/000_*.txt): ELBO, reparameterization trick, Gaussian decoder.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ddpm_jax.core.vae import latent_dim_of, reparameterize  # noqa: F401 - latent_dim_of re-exported
from ddpm_jax.models.layers import DTYPES, dense

# Floor of the decoder's log standard deviation: a quarter of the half bin width (1/255 on
# [-1, 1]). A bin centred on the decoder mean then already holds 1 - 2 Phi(-4) = 0.99994 of the
# mass, so the floor costs at most ~1e-4 bits/dim of likelihood and never binds in practice, while
# it caps 1/sigma at 1020: the gradient of an off-bin pixel, ~(x - mean) / sigma^2, stays finite
# (the 17-level digits would otherwise let sigma collapse towards 0 on exactly-fit pixels).
LOG_SCALE_MIN = math.log(1.0 / 255.0 / 4.0)
# Initial decoder scale: sigma = 0.5 is broad enough that no pixel starts with a vanishing
# likelihood (the untrained means are ~0 and the data fill [-1, 1]).
LOG_SCALE_INIT = math.log(0.5)


def _mlp(x: jnp.ndarray, layers, dtype) -> jnp.ndarray:
    for layer in layers:
        x = nn.swish(layer(x.astype(dtype)))
    return x


class VAE(nn.Module):
    """MLP encoder/decoder VAE for images [B, H, W, C] in [-1, 1].

    Use `encode`, `decode` (via apply(..., method="encode"/"decode")) or `__call__`.

    Attributes:
      latent_dim: size of z.
      hidden: width of every hidden layer.
      num_hidden_layers: hidden layers in the encoder, and as many in the decoder (>= 1).
      image_size: H = W of the images.
      channels: C of the images.
      dtype: compute dtype of the dense layers (float32 or bfloat16); parameters and every
        output are float32.
    """

    latent_dim: int
    hidden: int
    num_hidden_layers: int
    image_size: int
    channels: int
    dtype: Any = jnp.float32

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def setup(self):
        n, d = self.num_hidden_layers, self.dtype
        self.encoder_hidden = [dense(self.hidden, d, name=f"encoder_{i}") for i in range(n)]
        # Small final layers: q(z|x) starts near the prior (KL ~ 0) and the decoder mean near 0.
        self.encoder_out = dense(2 * self.latent_dim, d, init_scale=0.1, name="encoder_out")
        self.decoder_hidden = [dense(self.hidden, d, name=f"decoder_{i}") for i in range(n)]
        self.decoder_out = dense(math.prod(self.image_shape), d, init_scale=0.1, name="decoder_out")
        # One learned log-scale per pixel and channel, shared by all z (as in the DDPM's decoder,
        # whose variance does not depend on the sample either). Stored unbounded under the name
        # "log_scale"; `decode` floors it smoothly at LOG_SCALE_MIN.
        self.log_scale_raw = self.param(
            "log_scale", nn.initializers.constant(LOG_SCALE_INIT), self.image_shape, jnp.float32
        )

    def encode(self, x: chex.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
        """q(z|x): images [B, H, W, C] -> (mean, logvar), each float32 [B, latent_dim]."""
        chex.assert_shape(x, (None, *self.image_shape))
        h = _mlp(x.reshape(x.shape[0], -1), self.encoder_hidden, self.dtype)
        out = self.encoder_out(h).astype(jnp.float32)
        mean, logvar = jnp.split(out, 2, axis=-1)
        return mean, logvar

    def decode(self, z: chex.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
        """p(x|z): latents [B, latent_dim] -> (means, log_scales), each float32 [B, H, W, C].

        The means are squashed by tanh into (-1, 1), the data range. The log-scales are the
        per-pixel parameter, smoothly floored at LOG_SCALE_MIN (LOG_SCALE_MIN + softplus(raw -
        LOG_SCALE_MIN): ~raw above the floor, and unlike a hard clip its gradient never vanishes,
        so a scale that overshoots the floor can come back). No ceiling is needed: with means in
        (-1, 1) every error is below 2, and the NLL-optimal sigma (about the RMS error of the
        pixel) stays below that, so nothing pushes the scale up without bound.
        """
        chex.assert_shape(z, (None, self.latent_dim))
        h = _mlp(z, self.decoder_hidden, self.dtype)
        means = jnp.tanh(self.decoder_out(h).astype(jnp.float32)).reshape(z.shape[0], *self.image_shape)
        log_scales = LOG_SCALE_MIN + nn.softplus(self.log_scale_raw - LOG_SCALE_MIN)
        return means, jnp.broadcast_to(log_scales, means.shape)

    def __call__(self, x: chex.Array, z_noise: chex.Array):
        """Encodes, samples z = mean + exp(logvar / 2) * z_noise (reparameterization), decodes.

        Args:
          x: images [B, H, W, C] in [-1, 1].
          z_noise: standard-normal noise [B, latent_dim], drawn by the caller.

        Returns:
          (mean, logvar) of q(z|x), [B, latent_dim]; (means, log_scales) of p(x|z), [B, H, W, C].
        """
        mean, logvar = self.encode(x)
        chex.assert_equal_shape([mean, z_noise])
        means, log_scales = self.decode(reparameterize(mean, logvar, z_noise))
        return mean, logvar, means, log_scales


def create_vae(vae_config: ml_collections.ConfigDict, image_size: int, channels: int) -> VAE:
    """Builds the VAE from a config (latent_dim, hidden, num_hidden_layers, dtype).

    Args:
      vae_config: ConfigDict with latent_dim, hidden, num_hidden_layers (ints >= 1) and dtype
        ("float32" or "bfloat16").
      image_size: H = W of the images.
      channels: C of the images.

    Returns:
      An unbound `VAE`.

    Raises:
      ValueError: naming the offending config field.
    """
    c = vae_config
    for field in ("latent_dim", "hidden", "num_hidden_layers"):
        if isinstance(c[field], bool) or not isinstance(c[field], int) or c[field] < 1:
            raise ValueError(f"config.vae.{field}: must be a positive integer, got {c[field]!r}.")
    if c.dtype not in DTYPES:
        raise ValueError(f"config.vae.dtype: must be one of {sorted(DTYPES)}, got {c.dtype!r}.")
    return VAE(
        latent_dim=int(c.latent_dim),
        hidden=int(c.hidden),
        num_hidden_layers=int(c.num_hidden_layers),
        image_size=int(image_size),
        channels=int(channels),
        dtype=DTYPES[c.dtype],
    )

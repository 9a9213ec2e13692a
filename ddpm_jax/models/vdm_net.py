"""VDM's noise-prediction network input: z_t with its Fourier features, and t (Kingma et al. 2021).

`VDMScoreNet(network)` wraps any `network(h, t, train) -> [B, H, W, C]` (e.g. the DDPM UNet with
out_ch = C): it feeds concat(z_t, fourier_features(z_t)) and time_scale * t, so the UNet's
sinusoidal timestep embedding sees t in [0, time_scale] as it sees the discrete steps. The
wrapper's `__call__(z_t, t, train)` is an `eps_fn` for `ddpm_jax.core.vdm` once params are bound.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.core.vdm import fourier_features


class VDMScoreNet(nn.Module):
    """eps_hat(z_t; t) = network(concat(z_t, fourier_features(z_t)), time_scale * t)."""

    network: nn.Module
    n_min: int = 3
    n_max: int = 7
    time_scale: float = 1000.0

    def __call__(self, z: jnp.ndarray, t: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        h = jnp.concatenate([z, fourier_features(z, self.n_min, self.n_max)], axis=-1)
        return self.network(h, self.time_scale * t, train=train)

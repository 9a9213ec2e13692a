"""The hierarchical VAE's objective and sampler: pure, jit-able functions.

The lecture's Markovian hierarchical VAE (shared/seeds/000_*.txt, "Markovian Hierarchical VAEs"),
with x = z_0, generative p(z_L) prod_l p(z_{l-1} | z_l) p(x | z_1) and bottom-up inference
q(z_1 | x) prod_{l>=2} q(z_l | z_{l-1}) (network: `ddpm_jax.models.hvae`). Its negative ELBO,

  -ELBO(x) = E_q[ -log p(x | z_1) + sum_{l=1}^{L} (log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})) ]
           >= -log p(x),                  (p(z_L | z_{L+1}) := p(z_L) = N(0, I))

is split into a reconstruction term and one term per level, each in bits/dim (nats / (D log 2),
D = H*W*C) with the VAE's / DDPM's discretized decoder, so `total_bpd` sits beside theirs:

- recon_bpd: -log p(x | z_1) at the drawn z_1 (one-sample estimate, as in the VAE).
- kl_{L}_bpd (top level): KL(q(z_L | z_{L-1}) || N(0, I)) in closed form given the drawn z_{L-1}
  (the lecture's prior matching term; exact conditional expectation over z_L).
- kl_{l}_bpd, l < L: log q(z_l | z_{l-1}) - log p(z_l | z_{l+1}) at the drawn z_l, z_{l+1}: a
  *single-sample* estimate. No closed form applies: q is a density of z_l given z_{l-1}, p one of
  z_l given z_{l+1}, and z_{l+1} is drawn from q(z_{l+1} | z_l), i.e. depends on z_l. (The lecture's
  "consistency term" E_{q(z_{l-1}, z_{l+1} | x)} KL(q(z_l | z_{l-1}) || p(z_l | z_{l+1})) treats z_l
  and z_{l+1} as independent given z_{l-1}; a closed-form KL evaluated at an independently drawn
  z_{l+1} is not the ELBO and not a bound.) Each such term is unbiased for its expectation but can be
  negative on a single draw.
- kl_bpd: their sum; loss = total: recon_bpd + kl_bpd.

log q(z_l | .) at its own draw z_l = mean + sigma * eps is -0.5 sum(log 2 pi + logvar + eps^2),
computed from eps (no (z - mean) / sigma cancellation).

With num_levels = 1 every term is the VAE's (`ddpm_jax.core.vae.vae_terms_from_noise`), for the same
parameters and noise.

References:
  Sonderby et al. Ladder Variational Autoencoders (NeurIPS 2016), section 2 (the bottom-up hierarchy).
  Luo. Understanding Diffusion Models: A Unified Perspective (2022), the Markovian HVAE and the
    ELBO decomposition the lecture follows.
  Kingma, Welling. Auto-Encoding Variational Bayes (ICLR 2014).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from ddpm_jax.core.diffusion import mean_flat, normal_kl
from ddpm_jax.core.vae import _nats_to_bpd, _recon_bpd, gaussian_kl_standard, latent_dim_of


class HVAEOutputs(NamedTuple):
    """One bottom-up pass and the top-down conditionals at its draws (level l is index l - 1).

    q_means, q_logvars: [B, L, k] parameters of q(z_1 | x), q(z_l | z_{l-1}).
    zs: [B, L, k] the draws z_l = q_mean + exp(q_logvar / 2) * noise_l.
    p_means, p_logvars: [B, L - 1, k] parameters of p(z_l | z_{l+1}) at the drawn z_{l+1}, l = 1..L-1.
    means, log_scales: [B, H, W, C] the decoder p(x | z_1).
    """

    q_means: jnp.ndarray
    q_logvars: jnp.ndarray
    zs: jnp.ndarray
    p_means: jnp.ndarray
    p_logvars: jnp.ndarray
    means: jnp.ndarray
    log_scales: jnp.ndarray


def hvae_latent_shape_of(params) -> tuple[int, int]:
    """(num_levels, latent_dim) of an HVAE from its parameters."""
    return 1 + sum(name.startswith("posterior_") for name in params), latent_dim_of(params["vae"])


ApplyFn = Callable[..., HVAEOutputs]
LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, diag exp(logvar1)) || N(mean2, diag exp(logvar2))) in nats, summed over the last axis."""
    return jnp.sum(normal_kl(mean1, logvar1, mean2, logvar2), axis=-1)


def gaussian_log_prob(z, mean, logvar) -> jnp.ndarray:
    """log N(z; mean, diag exp(logvar)) in nats, summed over the last axis."""
    return -0.5 * jnp.sum(LOG_2PI + logvar + (z - mean) ** 2 * jnp.exp(-logvar), axis=-1)


def gaussian_log_prob_of_draw(logvar, eps) -> jnp.ndarray:
    """log N(mean + exp(logvar / 2) * eps; mean, diag exp(logvar)) from the draw's noise, summed over the last axis."""
    return -0.5 * jnp.sum(LOG_2PI + logvar + eps**2, axis=-1)


def level_terms(q_means, q_logvars, eps, zs, p_means, p_logvars) -> jnp.ndarray:
    """The latent part of the negative ELBO, one term per level, in nats.

    Args:
      q_means, q_logvars, eps, zs: [B, L, k] q(z_1 | x), q(z_l | z_{l-1}), the draws' standard
        normal noise and the draws z_l = q_mean + exp(q_logvar / 2) * eps.
      p_means, p_logvars: [B, L - 1, k] p(z_l | z_{l+1}) at the drawn z_{l+1}, l = 1..L-1.

    Returns:
      [B, L]: column l - 1 is log q(z_l | z_{l-1}) - log p(z_l | z_{l+1}) at the draw (l < L, a
      single-sample estimate) and KL(q(z_L | z_{L-1}) || N(0, I)) in closed form (l = L).
    """
    chex.assert_equal_shape([q_means, q_logvars, eps, zs])
    chex.assert_equal_shape([p_means, p_logvars])
    top = gaussian_kl_standard(q_means[:, -1], q_logvars[:, -1])  # [B]
    lower = gaussian_log_prob_of_draw(q_logvars[:, :-1], eps[:, :-1]) - gaussian_log_prob(
        zs[:, :-1], p_means, p_logvars
    )  # [B, L - 1]
    return jnp.concatenate([lower, top[:, None]], axis=1)


def hvae_terms_from_noise(apply_fn: ApplyFn, params, x: chex.Array, z_noise: chex.Array) -> dict:
    """Training terms per example, from the draws' standard normal noise.

    Args:
      apply_fn: the HVAE's `apply`.
      params: its parameters (the "params" collection).
      x: images [B, H, W, C] in [-1, 1], on the 256 bin centres.
      z_noise: [B, num_levels * latent_dim] standard normal; columns [(l-1) k, l k) drive z_l. The
        training loop draws it from each example's own key (same terms on 1 or N devices).

    Returns:
      dict of [B] float32 arrays: loss (the negative ELBO in bits/dim) = recon_bpd + kl_bpd,
      kl_bpd = sum over levels of kl_{l}_bpd (l = 1..L; see the module docstring for which are
      closed form), and mse (of the decoder mean, for logging).
    """
    out = apply_fn({"params": params}, x, z_noise)
    batch, num_levels, k = out.zs.shape
    eps = z_noise.reshape(batch, num_levels, k)
    recon = _recon_bpd(x, out.means, out.log_scales)
    per_level = _nats_to_bpd(level_terms(out.q_means, out.q_logvars, eps, out.zs, out.p_means, out.p_logvars), x)
    kl = jnp.sum(per_level, axis=1)
    terms = {"loss": recon + kl, "recon_bpd": recon, "kl_bpd": kl, "mse": mean_flat((out.means - x) ** 2)}
    terms.update({f"kl_{j + 1}_bpd": per_level[:, j] for j in range(num_levels)})
    return terms


def hvae_terms(apply_fn: ApplyFn, params, x: chex.Array, rng: chex.PRNGKey) -> dict:
    """`hvae_terms_from_noise` with noise = jax.random.normal(rng, [B, num_levels * latent_dim])."""
    num_levels, k = hvae_latent_shape_of(params)
    noise = jax.random.normal(rng, (x.shape[0], num_levels * k), jnp.float32)
    return hvae_terms_from_noise(apply_fn, params, x, noise)


def hvae_sample(apply_fn: ApplyFn, params, rng: chex.PRNGKey, num: int) -> jnp.ndarray:
    """Ancestral sampling: z_L ~ N(0, I), z_{l-1} ~ p(z_{l-1} | z_l), down to the decoder mean D(z_1).

    Returns:
      float32 [num, H, W, C], clipped to [-1, 1].
    """
    num_levels, k = hvae_latent_shape_of(params)
    noise = jax.random.normal(rng, (num, num_levels * k), jnp.float32)
    means = apply_fn({"params": params}, noise, method="generate")
    return jnp.clip(means, -1.0, 1.0)

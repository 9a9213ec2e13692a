"""The VAE baseline's objective, evaluation bound and sampler: pure, jit-able functions.

The negative ELBO (lecture 3; Kingma & Welling 2014, eq. 3),

  -ELBO(x) = E_q(z|x)[-log p(x|z)] + KL(q(z|x) || p(z))  >=  -log p(x),

is reported per example in bits/dim (nats / (D log 2), D = H*W*C) with the DDPM's discretized
decoder (`diffusion.discretized_gaussian_log_likelihood`: 256 bins on [-1, 1], open edge bins),
so `total_bpd` here and the DDPM's `total_bpd` bound the same discrete log-likelihood and can be
compared directly.

Every function takes `apply_fn` (a `VAE`'s `.apply`) and the bare `params`; keys come in
explicitly and are never reused. Images are NHWC in [-1, 1].

References:
  Kingma, Welling. Auto-Encoding Variational Bayes (ICLR 2014), eq. 10 and appendix B.
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models (2020), eq. 13 (the decoder).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core.diffusion import discretized_gaussian_log_likelihood, mean_flat

ApplyFn = Callable[..., tuple]


def reparameterize(mean: chex.Array, logvar: chex.Array, noise: chex.Array) -> jnp.ndarray:
    """z = mean + exp(logvar / 2) * noise: a draw of N(mean, diag exp(logvar)) that is
    differentiable in (mean, logvar) (Kingma & Welling 2014, section 2.4; lecture 3)."""
    return mean + jnp.exp(0.5 * logvar) * noise


def latent_dim_of(params) -> int:
    """latent_dim of a VAE from its parameters (the encoder's output is 2 * latent_dim wide)."""
    return params["encoder_out"]["kernel"].shape[-1] // 2


def gaussian_kl_standard(mean: chex.Array, logvar: chex.Array) -> jnp.ndarray:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per example, in nats.

    Closed form 0.5 * sum_j (mean_j^2 + exp(logvar_j) - logvar_j - 1): the lecture's
    0.5 (k (sigma^2 - 1 - log sigma^2) + ||mu||^2) with a per-dimension sigma.

    Args:
      mean, logvar: [B, k] parameters of q(z|x).

    Returns:
      [B] KL in nats, summed over the k latent dims.

    References:
      Kingma, Welling (2014), appendix B (the negative of its -D_KL expression).
    """
    chex.assert_equal_shape([mean, logvar])
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - logvar - 1.0, axis=-1)


def _nats_to_bpd(nats_per_example: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """[B] nats summed over an example -> bits/dim of images x [B, H, W, C]."""
    return nats_per_example / (np.prod(x.shape[1:]) * np.log(2.0))


def _decode_sample(apply_fn: ApplyFn, params, mean, logvar, rng: chex.PRNGKey):
    """Decoder (means, log_scales) at z = mean + sigma * noise, noise = normal(rng, mean.shape)."""
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return apply_fn({"params": params}, reparameterize(mean, logvar, noise), method="decode")


def _recon_bpd(x, means, log_scales) -> jnp.ndarray:
    """-log p(x|z) per example in bits/dim (the DDPM's discretized decoder)."""
    return -mean_flat(discretized_gaussian_log_likelihood(x, means, log_scales)) / np.log(2.0)


def vae_terms(apply_fn: ApplyFn, params, x: chex.Array, rng: chex.PRNGKey) -> dict:
    """Training terms per example, with one reparameterized draw of z.

    The draw is z = mean + exp(logvar / 2) * jax.random.normal(rng, mean.shape) (float32).

    Args:
      apply_fn: the VAE's `apply`.
      params: its parameters (the "params" collection).
      x: images [B, H, W, C] in [-1, 1], on the 256 bin centres.
      rng: key for the one draw of z.

    Returns:
      dict of [B] float32 arrays: recon_bpd (-log p(x|z), a one-sample estimate of
      -E_q log p(x|z)), kl_bpd (KL(q(z|x) || N(0, I)), closed form), loss = recon_bpd + kl_bpd
      (the negative ELBO in bits/dim, comparable with the DDPM's total_bpd), and mse (of the
      decoder mean, for logging).
    """
    mean, logvar = apply_fn({"params": params}, x, method="encode")
    return vae_terms_from_noise(apply_fn, params, x, jax.random.normal(rng, mean.shape, jnp.float32))


def vae_terms_from_noise(apply_fn: ApplyFn, params, x: chex.Array, z_noise: chex.Array) -> dict:
    """`vae_terms` with the draw's standard normal noise [B, latent_dim] given: the training loop draws it
    from each example's own key, so a global batch gives the same terms on 1 or N devices."""
    mean, logvar, means, log_scales = apply_fn({"params": params}, x, z_noise)
    recon = _recon_bpd(x, means, log_scales)
    kl = _nats_to_bpd(gaussian_kl_standard(mean, logvar), x)
    return {"loss": recon + kl, "recon_bpd": recon, "kl_bpd": kl, "mse": mean_flat((means - x) ** 2)}


def vae_bpd(apply_fn: ApplyFn, params, x: chex.Array, rng: chex.PRNGKey, num_samples: int = 1) -> dict:
    """The negative ELBO per example in bits/dim, its reconstruction term averaged over z draws.

    Encodes once; draw i uses the key jax.random.split(rng, num_samples)[i] and decodes in turn
    (lax.map), so memory does not grow with num_samples. The KL is exact (closed form).

    Args:
      apply_fn, params: the VAE's `apply` and parameters.
      x: images [B, H, W, C] in [-1, 1].
      rng: key for the draws of z.
      num_samples: draws of z per example (a static Python int >= 1).

    Returns:
      dict of [B] float32 arrays: total_bpd = recon_bpd + kl_bpd, recon_bpd, kl_bpd.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1.")
    mean, logvar = apply_fn({"params": params}, x, method="encode")

    def recon(key):
        return _recon_bpd(x, *_decode_sample(apply_fn, params, mean, logvar, key))

    recon_bpd = jnp.mean(jax.lax.map(recon, jax.random.split(rng, num_samples)), axis=0)  # [B]
    kl_bpd = _nats_to_bpd(gaussian_kl_standard(mean, logvar), x)
    return {"total_bpd": recon_bpd + kl_bpd, "recon_bpd": recon_bpd, "kl_bpd": kl_bpd}


def vae_sample(apply_fn: ApplyFn, params, rng: chex.PRNGKey, num: int) -> jnp.ndarray:
    """Generates images: z ~ N(0, I), decoded (lecture 3, "Generation").

    Shows the decoder *mean* D(z), not a noisy draw from p(x|z), as is customary for VAEs: the
    per-pixel noise of the decoder would only add speckle.

    Args:
      apply_fn, params: the VAE's `apply` and parameters.
      rng: key for z.
      num: number of images (static).

    Returns:
      float32 [num, H, W, C], clipped to [-1, 1].
    """
    z = jax.random.normal(rng, (num, latent_dim_of(params)), jnp.float32)
    means, _ = apply_fn({"params": params}, z, method="decode")
    return jnp.clip(means, -1.0, 1.0)

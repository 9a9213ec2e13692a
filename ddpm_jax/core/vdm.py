"""The pure core of continuous-time VDM: bound, losses, t sampler, Fourier features, sampler.

Variance preserving, t in [0, 1], gamma(t) = -log SNR(t) increasing in t:

    z_t = alpha_t x + sigma_t eps,   alpha_t^2 = sigmoid(-gamma_t),   sigma_t^2 = sigmoid(gamma_t).

Data x are NHWC in [-1, 1] on the 256-level grid v_k = k / 127.5 - 1 (k = 0..255). The
negative ELBO is the sum of three per-example terms, each in nats summed over the
D = H*W*C dims and reported in bits/dim (nats / (D log 2)):

    recon     = E_q(z_0|x)[-log p(x | z_0)]       (VDM's 256-way decoder)
    prior     = KL(q(z_1 | x) || N(0, I))         (closed form)
    diffusion = 0.5 E_{t~U(0,1), eps}[gamma'(t) ||eps - eps_hat(z_t; t)||^2]   (VDM eq. 17)

`gamma_fn(t [B]) -> gamma [B]` must act elementwise on t (gamma'(t) is taken with one jvp);
`eps_fn(z_t, t) -> eps_hat` is any noise predictor with its params closed over. Every function is
pure and jit-able given those callables; random keys are explicit.

Reference: Kingma, Salimans, Poole, Ho. Variational Diffusion Models (2021).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 256
BIN_VALUES = np.arange(NUM_BINS, dtype=np.float32) / 127.5 - 1.0  # v_k, the decoder's support
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0  # VDM's initial endpoints gamma(0), gamma(1)

GammaFn = Callable[[jnp.ndarray], jnp.ndarray]
EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# --- schedule helpers -----------------------------------------------------------------------


class FixedLinearGamma(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) t, no parameters (VDM's fixed linear schedule)."""

    gamma_0: float = GAMMA_MIN
    gamma_1: float = GAMMA_MAX

    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * t


def _bcast(g: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """A scalar or [B] array shaped to broadcast against x [B, ...]."""
    g = jnp.asarray(g, x.dtype)
    return g.reshape(g.shape + (1,) * (x.ndim - g.ndim))


def alpha_sigma(gamma: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) (VP)."""
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def _sum_flat(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def nats_to_bpd(nats: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Per-example nats summed over dims -> bits/dim."""
    return nats / (np.prod(x.shape[1:]) * np.log(2.0))


# --- the three terms (per example, nats) -----------------------------------------------------


def recon_loss(gamma_0: jnp.ndarray, x0: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """-log p(x | z_0) per example (nats), z_0 = alpha_0 x + sigma_0 eps (one-sample estimate).

    VDM's decoder factorises over dims: p(x_i = v_k | z_0) is proportional to
    q(z_0,i | x_i = v_k), a softmax over the 256 bin values of
    logit_k = -0.5 (z_0 - alpha_0 v_k)^2 / sigma_0^2 = -0.5 e^{-gamma_0} (z_0 / alpha_0 - v_k)^2.
    With z_0 / alpha_0 = x + e, e = e^{gamma_0 / 2} eps, and d_k = x - v_k, logit_k - logit_x =
    -0.5 e^{-gamma_0} d_k (d_k + 2 e), so -log p(x | z_0) = logsumexp_k of that. d_k is taken
    from bin indices, (k_x - k) / 127.5, so the x term is exactly 0 and no O(1) logits cancel:
    float32-accurate even at gamma_0 = -13.3, where one ulp of x would shift it by ~1e-4 nats.

    Args:
      gamma_0: gamma(0), scalar or [B].
      x0: [B, H, W, C] on the bin centres v_k; eps: like x0.
    """
    chex.assert_equal_shape([x0, eps])
    g0 = _bcast(gamma_0, x0)[..., None]
    e = jnp.exp(0.5 * g0) * eps[..., None]
    k_x = jnp.round((x0 + 1.0) * 127.5)[..., None]
    d = (k_x - jnp.arange(NUM_BINS, dtype=x0.dtype)) / 127.5
    return _sum_flat(jax.nn.logsumexp(-0.5 * jnp.exp(-g0) * d * (d + 2.0 * e), axis=-1))


def prior_loss(gamma_1: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
    """KL(q(z_1 | x) || N(0, I)) per example (nats), closed form.

    KL = 0.5 sum_i (sigma_1^2 + alpha_1^2 x_i^2 - 1 - log sigma_1^2)
       = 0.5 sum_i (alpha_1^2 (x_i^2 - 1) + softplus(-gamma_1)),  as 1 - sigma^2 = alpha^2, free of
    the cancellation in sigma_1^2 - 1 when gamma_1 is large.
    """
    g1 = _bcast(gamma_1, x0)
    return _sum_flat(0.5 * (jax.nn.sigmoid(-g1) * (x0**2 - 1.0) + jax.nn.softplus(-g1)))


def _squared_error(gamma_fn: GammaFn, eps_fn: EpsFn, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray):
    """(gamma(t), gamma'(t), ||eps - eps_hat(z_t; t)||^2) per example: one network call, one jvp."""
    chex.assert_equal_shape([x0, eps])
    chex.assert_rank(t, 1)
    gamma, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
    alpha, sigma = alpha_sigma(_bcast(gamma, x0))
    eps_hat = eps_fn(alpha * x0 + sigma * eps, t)
    chex.assert_equal_shape([eps_hat, x0])
    return gamma, dgamma, _sum_flat((eps - eps_hat) ** 2)


def diffusion_loss(gamma_fn: GammaFn, eps_fn: EpsFn, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """The continuous-time diffusion loss at one t per example (nats), VDM eq. 17:

        L_inf(x) ~ 0.5 gamma'(t) ||eps - eps_hat(z_t; t)||^2,  z_t = alpha_t x + sigma_t eps,

    an unbiased estimate of the integral over t ~ U(0, 1). gamma'(t) is one forward-mode jvp of
    gamma_fn with tangent ones (exact for an elementwise gamma_fn).

    Args:
      gamma_fn, eps_fn: see the module docstring.
      x0: [B, H, W, C]; t: [B] floats in [0, 1]; eps: like x0.
    """
    _, dgamma, sq = _squared_error(gamma_fn, eps_fn, x0, t, eps)
    return 0.5 * dgamma * sq


def weighted_diffusion_loss(gamma_fn: GammaFn, eps_fn: EpsFn, x0, t, eps, weight_fn) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(diffusion_loss, its weighted form) at one t per example (nats), from one network call:
    0.5 gamma'(t) ||eps - eps_hat||^2 and the same times w(lambda_t, gamma'(t)), lambda = -gamma
    (`ddpm_jax.core.weighting`: Kingma & Gao's family; w = 1 is the ELBO)."""
    gamma, dgamma, sq = _squared_error(gamma_fn, eps_fn, x0, t, eps)
    elbo = 0.5 * dgamma * sq
    return elbo, weight_fn(-gamma, dgamma) * elbo


# --- samplers of t, the bound and the training loss ------------------------------------------


def low_discrepancy_t(rng: chex.PRNGKey, batch: int) -> jnp.ndarray:
    """t_i = mod(u + i / B, 1), u ~ U(0, 1): VDM's low-discrepancy sampler.

    Each t_i is marginally U(0, 1) and each stratum [i/B, (i+1)/B) holds exactly one t.
    """
    u = jax.random.uniform(rng, ())
    return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)


def _endpoint_terms(gamma_fn: GammaFn, x0: jnp.ndarray, rng: chex.PRNGKey):
    """(recon, prior) per example in nats, at gamma(0) and gamma(1)."""
    batch = x0.shape[0]
    recon = recon_loss(gamma_fn(jnp.zeros((batch,))), x0, jax.random.normal(rng, x0.shape, x0.dtype))
    return recon, prior_loss(gamma_fn(jnp.ones((batch,))), x0)


def _terms_bpd(recon, prior, diffusion, x0) -> dict:
    out = dict(recon_bpd=recon, diffusion_bpd=diffusion, prior_bpd=prior)
    out = {k: nats_to_bpd(v, x0) for k, v in out.items()}
    out["total_bpd"] = out["recon_bpd"] + out["diffusion_bpd"] + out["prior_bpd"]
    return out


def bound_bpd(gamma_fn: GammaFn, eps_fn: EpsFn, x0: jnp.ndarray, rng: chex.PRNGKey, *, num_t: int) -> dict:
    """The negative ELBO per example in bits/dim (diffusion term: VDM eq. 17), an unbiased estimate.

    The prior term is exact; recon uses one eps; the diffusion term averages num_t values of t per
    example on a randomly shifted lattice t_j = mod(u_b + j / num_t, 1) (u_b ~ U(0, 1) independent
    per example, so examples are i.i.d. and the per-example totals give a valid standard error),
    each with its own eps. One lax.scan over j: memory of one eps_fn call.

    Args:
      gamma_fn, eps_fn: see the module docstring.
      x0: [B, H, W, C] in [-1, 1] on the 256-level grid.
      rng: PRNG key.
      num_t: t samples per example (static).

    Returns:
      dict of [B] arrays total_bpd = recon_bpd + diffusion_bpd + prior_bpd.
    """
    batch = x0.shape[0]
    k_rec, k_t, k_diff = jax.random.split(rng, 3)
    recon, prior = _endpoint_terms(gamma_fn, x0, k_rec)
    u = jax.random.uniform(k_t, (batch,))

    def step(acc, j):
        t = jnp.mod(u + j / num_t, 1.0)
        eps = jax.random.normal(jax.random.fold_in(k_diff, j), x0.shape, x0.dtype)
        return acc + diffusion_loss(gamma_fn, eps_fn, x0, t, eps), None

    diffusion, _ = jax.lax.scan(step, jnp.zeros((batch,), x0.dtype), jnp.arange(num_t))
    return _terms_bpd(recon, prior, diffusion / num_t, x0)


def training_loss(gamma_fn: GammaFn, eps_fn: EpsFn, x0: jnp.ndarray, rng: chex.PRNGKey) -> dict:
    """VDM's training objective: the same bound with one t per example, from low_discrepancy_t
    over the batch. Returns bound_bpd's dict; the mean of its total_bpd is the loss."""
    k_rec, k_t, k_diff = jax.random.split(rng, 3)
    recon, prior = _endpoint_terms(gamma_fn, x0, k_rec)
    eps = jax.random.normal(k_diff, x0.shape, x0.dtype)
    diffusion = diffusion_loss(gamma_fn, eps_fn, x0, low_discrepancy_t(k_t, x0.shape[0]), eps)
    return _terms_bpd(recon, prior, diffusion, x0)


# --- network input features ------------------------------------------------------------------


def fourier_features(z: jnp.ndarray, n_min: int = 3, n_max: int = 7) -> jnp.ndarray:
    """VDM's Fourier features: sin and cos of 2 pi 2^n z for n = n_min..n_max.

    On [-1, 1] data the feature of order n has period 2^-n: n = 3 gives 1/8, the spacing 2/16 of
    17 grey levels; n = 7 gives 1/128, about the spacing 2/255 of 256 levels.

    Args:
      z: [..., C].

    Returns:
      [..., 2 C F] with F = n_max - n_min + 1: first all sines, then all cosines, each laid out
      channel-major (index c * F + (n - n_min)).
    """
    freqs = 2.0 * np.pi * 2.0 ** np.arange(n_min, n_max + 1, dtype=np.float32)
    h = (z[..., None] * freqs).reshape(z.shape[:-1] + (-1,))
    return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


# --- ancestral sampling ----------------------------------------------------------------------


def sample_loop(
    gamma_fn: GammaFn,
    eps_fn: EpsFn,
    shape,
    rng: chex.PRNGKey,
    *,
    num_steps: int,
    clip_denoised: bool = False,
    eta: float = 1.0,
    num_frames: int = 0,
) -> dict:
    """VDM's T-step sampler, z_1 ~ N(0, I) down to z_0, then decode: ancestral (eta = 1) or DDIM.

    Step t = (i+1)/T -> s = i/T, with x_hat = (z_t - sigma_t eps_hat) / alpha_t (clipped when
    asked, eps_hat then recomputed from it) and c = 1 - SNR_t / SNR_s = -expm1(gamma_s - gamma_t):

        z_s = alpha_s x_hat + sqrt(sigma_s^2 - v) eps_hat + sqrt(v) noise,   v = eta^2 sigma_s^2 c

    (Song et al. 2021, eq. 12, in VDM's notation). With eta = 1 this is the posterior
    q(z_s | z_t, x = x_hat): mean (alpha_s / alpha_t)(1 - c) z_t + alpha_s c x_hat, variance
    sigma_s^2 c, since sigma_s sqrt(1 - c) = (alpha_s sigma_t / alpha_t)(1 - c). eta = 0 is the
    deterministic DDIM. The output is the decoder's argmax (its mode): the bin value v_k nearest
    z_0 / alpha_0.

    Args:
      gamma_fn, eps_fn: see the module docstring.
      shape: (B, H, W, C).
      rng: PRNG key; step i uses fold_in(rng, i), z_1 uses fold_in(rng, num_steps).
      num_steps: T (static).
      clip_denoised: clip x_hat to [-1, 1] at each step.
      eta: in [0, 1]; the share of the posterior's noise each step adds (1: ancestral).
      num_frames: if > 0, also return that many evenly spaced frames of z_s and x_hat.

    Returns:
      {"samples": [shape] on the 256-level grid in [-1, 1]} and, with frames, "frames" and
      "pred_x0" [num_frames, *shape] plus "frame_t" (the s of each frame), as sampling.py's samplers.
    """
    batch = shape[0]
    z = jax.random.normal(jax.random.fold_in(rng, num_steps), shape)

    def step(z, i):
        t = jnp.full((batch,), (i + 1) / num_steps)
        s = jnp.full((batch,), i / num_steps)
        g_t, g_s = _bcast(gamma_fn(t), z), _bcast(gamma_fn(s), z)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(g_t), alpha_sigma(g_s)
        eps_hat = eps_fn(z, t)
        x_hat = (z - sigma_t * eps_hat) / alpha_t
        if clip_denoised:
            x_hat = jnp.clip(x_hat, -1.0, 1.0)
            eps_hat = (z - alpha_t * x_hat) / sigma_t
        var = eta**2 * sigma_s**2 * -jnp.expm1(g_s - g_t)
        z_s = alpha_s * x_hat + jnp.sqrt(jnp.maximum(sigma_s**2 - var, 0.0)) * eps_hat
        if eta != 0:
            z_s = z_s + jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(rng, i), shape)
        return z_s, ((z_s, x_hat) if num_frames else None)

    steps = jnp.arange(num_steps - 1, -1, -1)
    z, trajectory = jax.lax.scan(step, z, steps)
    frames = {}
    if num_frames:
        idx = np.unique(np.linspace(0, num_steps - 1, num_frames).round().astype(int))
        frames = {"frames": trajectory[0][idx], "pred_x0": trajectory[1][idx], "frame_t": steps[idx] / num_steps}
    alpha_0, _ = alpha_sigma(_bcast(gamma_fn(jnp.zeros((batch,))), z))
    k = jnp.clip(jnp.round((z / alpha_0 + 1.0) * 127.5), 0, NUM_BINS - 1)
    # Clipped: XLA may divide by multiplying with 1 / 127.5, which puts bin 255 at 1.0000001.
    return {"samples": jnp.clip(k / 127.5 - 1.0, -1.0, 1.0), **frames}


# --- a reference denoiser --------------------------------------------------------------------


def bayes_eps_fn_for_histogram(probs: jnp.ndarray, gamma_fn: GammaFn) -> EpsFn:
    """The exact posterior-mean noise predictor of independent per-dim categoricals over v_k.

    With p(x_i = v_k) = probs[h, w, c, k], the posterior over k given z_t is a softmax of
    log probs_k + log N(z_t; alpha_t v_k, sigma_t^2); eps_hat = E[eps | z_t] = sum_k
    P(k | z_t) (z_t - alpha_t v_k) / sigma_t, which equals (z_t - alpha_t E[x | z_t]) / sigma_t
    (taken in this form for float32 precision at high SNR). Minimises eq. 17 for that data.

    Args:
      probs: [H, W, C, 256] concrete (NumPy) array, summing to 1 over the last axis; zeros are
        allowed, and bins that are zero everywhere are dropped from the softmax (exactly).
      gamma_fn: the schedule.

    Returns:
      eps_fn(z_t [B, H, W, C], t [B]) -> eps_hat [B, H, W, C].
    """
    probs = np.asarray(probs, np.float64)
    keep = np.flatnonzero(np.any(probs > 0, axis=tuple(range(probs.ndim - 1))))  # zero-prob bins add 0
    with np.errstate(divide="ignore"):
        log_probs = jnp.asarray(np.log(probs[..., keep]), jnp.float32)
    values = BIN_VALUES[keep]

    def eps_fn(z, t):
        alpha, sigma = alpha_sigma(_bcast(gamma_fn(t), z)[..., None])
        eps_k = (z[..., None] - alpha * values) / sigma
        post = jax.nn.softmax(log_probs - 0.5 * eps_k**2, axis=-1)
        return jnp.sum(post * eps_k, axis=-1)

    return eps_fn

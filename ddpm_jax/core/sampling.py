"""Samplers: ancestral DDPM (Ho et al. Algorithm 2) and DDIM (Song et al. 2021), each one lax.scan.

Each step's noise comes from fold_in(rng, t), so a sampler is a pure function of its key.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import diffusion, schedules
from ddpm_jax.core.schedules import Schedule


def _initial_noise(sched: Schedule, rng, shape, x_T=None):
    """x_T ~ p(x_T) = N(0, prior_variance I) (1 for VP, 1 + sigma_max^2 for VE), or the given x_T."""
    if x_T is not None:
        chex.assert_shape(x_T, tuple(shape))
        return jnp.asarray(x_T, jnp.float32)
    return jax.random.normal(jax.random.fold_in(rng, -1 % 2**31), shape) * jnp.sqrt(sched.prior_variance)


def _frame_steps(num_timesteps: int, num_frames: int) -> np.ndarray:
    """Indices into the scan's outputs (step T-1 first) of `num_frames` evenly spaced frames."""
    return np.unique(np.linspace(0, num_timesteps - 1, num_frames).round().astype(int))


def sample_loop(
    sched: Schedule,
    model_fn: diffusion.ModelFn,
    shape,
    rng: chex.PRNGKey,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    num_frames: int = 0,
    x_T: chex.Array | None = None,
) -> dict:
    """Ancestral sampling x_T -> x_0: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t = 0.

    Args:
      sched: schedule.
      model_fn: `model_fn(x_t, t) -> output` (params closed over).
      shape: [B, H, W, C] of the samples.
      rng: key; step t uses fold_in(rng, t).
      parameterization, variance: as in `diffusion.p_mean_variance`.
      clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
      num_frames: if > 0, also return that many evenly spaced frames of x_t (and the predicted
        x_0) from x_T to x_0, for denoising strips.
      x_T: optional starting point [B, H, W, C]; by default drawn from p(x_T) with
        fold_in(rng, -1 % 2**31). rng then drives only the per-step noise.

    Returns:
      dict with "samples" [B, H, W, C] in [-1, 1] and, with frames, "frames" and "pred_x0"
      [num_frames, B, H, W, C] plus "frame_t" (the t of each frame).
    """
    diffusion.check_choice("parameterization", parameterization, diffusion.PARAMETERIZATIONS)
    diffusion.check_choice("variance", variance, diffusion.VARIANCES)

    def step(x, t_scalar):
        t = jnp.full((shape[0],), t_scalar, dtype=jnp.int32)
        out = diffusion.p_mean_variance(sched, model_fn(x, t), x, t, parameterization, variance, clip_denoised)
        z = jax.random.normal(jax.random.fold_in(rng, t_scalar), shape)
        x_prev = out["mean"] + (t_scalar > 0) * jnp.exp(0.5 * out["log_variance"]) * z
        return x_prev, ((x_prev, out["pred_x0"]) if num_frames else None)

    ts = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    x, traj = jax.lax.scan(step, _initial_noise(sched, rng, shape, x_T), ts)
    result = {"samples": jnp.clip(x, -1.0, 1.0)}
    if num_frames:
        idx = _frame_steps(sched.num_timesteps, num_frames)
        result.update(frames=traj[0][idx], pred_x0=traj[1][idx], frame_t=ts[idx])
    return result


def ddim_sample_loop(
    sched: Schedule,
    model_fn: diffusion.ModelFn,
    shape,
    rng: chex.PRNGKey,
    *,
    num_steps: int,
    eta: float = 0.0,
    parameterization: str = "eps",
    clip_denoised: bool = True,
    x_T: chex.Array | None = None,
) -> dict:
    """DDIM (Song et al. 2021, eq. 12) over `num_steps` evenly spaced timesteps of a VP schedule.

    eta = 0 is a deterministic map of x_T (rng only draws x_T, unless x_T is given); eta = 1
    with num_steps = T is ancestral sampling with the posterior variance. x_T: as in `sample_loop`.
    """
    use = kept_timesteps(sched.num_timesteps, num_steps)
    abar_all = sched.alphas_cumprod
    ts = jnp.asarray(use[::-1])
    prev = jnp.asarray(np.append(-1, use[:-1])[::-1])

    def step(x, i):
        t_scalar, p_scalar = ts[i], prev[i]
        t = jnp.full((shape[0],), t_scalar, dtype=jnp.int32)
        output, _ = diffusion.split_variance_output(model_fn(x, t), "fixed_small")
        x0 = diffusion.predict_x0(sched, output[..., : shape[-1]], x, t, parameterization)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        abar, abar_prev = abar_all[t_scalar], jnp.where(p_scalar >= 0, abar_all[p_scalar], 1.0)
        eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        z = jax.random.normal(jax.random.fold_in(rng, t_scalar), shape)
        x_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps + sigma * z
        return x_prev, None

    x, _ = jax.lax.scan(step, _initial_noise(sched, rng, shape, x_T), jnp.arange(len(use)))
    return {"samples": jnp.clip(x, -1.0, 1.0)}


def kept_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced timesteps of 0..T-1, always keeping 0 and T-1."""
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, (int, np.integer))
        or not 1 <= num_steps <= num_timesteps
    ):
        raise ValueError(
            f"the number of sampling steps must be a whole number in [1, T={num_timesteps}], got {num_steps!r}."
        )
    return np.unique(np.linspace(0, num_timesteps - 1, num_steps).round().astype(np.int32))


def respaced_sample_loop(
    sched: Schedule,
    model_fn: diffusion.ModelFn,
    shape,
    rng: chex.PRNGKey,
    *,
    num_steps: int,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    num_frames: int = 0,
    x_T: chex.Array | None = None,
) -> dict:
    """Ancestral sampling over K = num_steps of the T steps (Nichol & Dhariwal sec. 4).

    The short chain keeps the marginals q(x_t | x_0) = N(a_t x_0, s_t^2) at the kept steps, so its
    betas and posterior are recomputed from them (VP: beta_k = 1 - abar_k / abar_{k-1}; VE alike);
    the network still sees the original t. Works on a traced (learned) schedule too.

    eps, x0 and v outputs mean the same thing on either chain. A "mean" output is the one-step
    posterior mean of the full T-step chain at the original t, so it is turned into x_0 with the
    full chain's coefficients, and the short chain forms its own posterior mean from that x_0.
    """
    diffusion.check_choice("parameterization", parameterization, diffusion.PARAMETERIZATIONS)
    use = kept_timesteps(sched.num_timesteps, num_steps)
    idx = jnp.asarray(use)
    short = Schedule(
        **schedules.schedule_tables(sched.sqrt_alphas_cumprod[idx], sched.sqrt_one_minus_alphas_cumprod[idx], xp=jnp)
    )

    def short_model_fn(x, k):
        t = idx[k]
        output = model_fn(x, t)
        if parameterization != "mean":
            return output
        mean, var_output = diffusion.split_variance_output(output, variance)
        x0 = diffusion.predict_x0_from_mean(sched, x, t, mean)
        return x0 if var_output is None else jnp.concatenate([x0, var_output], axis=-1)

    # A learned variance interpolates between the step's beta and posterior variance: use the short chain's.
    out = sample_loop(
        short,
        short_model_fn,
        shape,
        rng,
        parameterization="x0" if parameterization == "mean" else parameterization,
        variance=variance,
        clip_denoised=clip_denoised,
        num_frames=num_frames,
        x_T=x_T,
    )
    if num_frames:
        out["frame_t"] = idx[out["frame_t"]]
    return out

"""Noise schedules: beta tables and the `Schedule` pytree every core function takes.

One representation serves both forward processes of the lecture. A Gaussian diffusion is
fixed by its marginals q(x_t | x_0) = N(a_t x_0, s_t^2 I) for t = 0..T-1:

- variance preserving (VP, Ho et al. 2020):  a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t);
- variance exploding (VE, Song & Ermon):      a_t = 1,            s_t = sigma_t.

The one-step transition q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I) follows with
alpha_t = (a_t / a_{t-1})^2 and beta_t = s_t^2 - alpha_t s_{t-1}^2 (with a_{-1} = 1, s_{-1} = 0),
and so does the posterior q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7). VP and VE differ only
in how (a_t, s_t) are made; every derived table is computed here once, in float64, and stored
as float32 in the pytree.

Index t is the lecture's step t + 1 (the improved-diffusion convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "quadratic", "cosine", "constant", "sigmoid")
SCHEDULE_NAMES = BETA_SCHEDULES + ("ve",)


def _check_num_timesteps(num_timesteps) -> int:
    if num_timesteps is None or isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    return int(num_timesteps)


def _linear_range(num_timesteps: int, beta_start, beta_end):
    # DDPM's range is tuned for T = 1000; rescale so other T keep the same abar_T (improved-diffusion).
    scale = 1000.0 / num_timesteps
    start = 1e-4 * scale if beta_start is None else beta_start
    end = 0.02 * scale if beta_end is None else beta_end
    return start, end


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """abar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2) (Nichol & Dhariwal eq. 17), t = 0..T."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def betas_for(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    s: float = 0.008,
    max_beta: float = 0.999,
    value: float | None = None,
) -> np.ndarray:
    """Returns the float64 beta table of a named schedule.

    Args:
      name: one of "linear", "quadratic", "cosine", "constant", "sigmoid".
      num_timesteps: T >= 1.
      beta_start, beta_end: range for linear / quadratic / sigmoid; default 1e-4 and 0.02,
        both scaled by 1000 / T.
      s: cosine offset (Nichol & Dhariwal 2021).
      max_beta: every beta is clipped to at most this (0.999), as the cosine schedule does.
      value: the constant beta; default beta_end (0.02 * 1000 / T).

    Returns:
      np.ndarray [T] float64, every entry in (0, 1).
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"Unknown beta schedule {name!r}; valid names are {', '.join(BETA_SCHEDULES)} "
            "(or pass your own betas array / callable to make_schedule, or 've' for variance exploding)."
        )
    num_timesteps = _check_num_timesteps(num_timesteps)
    start, end = _linear_range(num_timesteps, beta_start, beta_end)
    if name == "linear":
        betas = np.linspace(start, end, num_timesteps, dtype=np.float64)
    elif name == "quadratic":
        betas = np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "constant":
        betas = np.full(num_timesteps, end if value is None else value, dtype=np.float64)
    elif name == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_timesteps)))
        betas = start + (end - start) * sig
    else:  # cosine
        abar = cosine_alphas_cumprod(num_timesteps, s)
        betas = 1.0 - abar[1:] / abar[:-1]
    # Short chains scale the linear range past 1 (T < 20): clip as the cosine schedule does.
    return _check_betas(np.minimum(betas, max_beta))


def ve_sigmas(num_timesteps: int, sigma_min: float = 0.01, sigma_max: float = 50.0) -> np.ndarray:
    """Geometric noise levels sigma_min .. sigma_max of the VE process (Song & Ermon 2019), float64."""
    num_timesteps = _check_num_timesteps(num_timesteps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"VE schedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
    return np.geomspace(sigma_min, sigma_max, num_timesteps, dtype=np.float64)


def _check_betas(betas) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
        bad = betas[~((betas > 0) & (betas < 1))]
        raise ValueError(f"every beta must lie in (0, 1); got values such as {bad[:3].tolist()}.")
    return betas


@flax.struct.dataclass
class Schedule:
    """Per-step tables of a Gaussian diffusion, all float32 arrays of shape [T].

    For VP, alphas_cumprod is abar_t; in general it is a_t^2, and sqrt_alphas_cumprod /
    sqrt_one_minus_alphas_cumprod hold the marginal's signal scale a_t and noise std s_t
    (for VE, a_t = 1 and s_t = sigma_t). prior_variance is the variance of p(x_T) = N(0, .),
    a_T^2 + s_T^2: 1 for VP, 1 + sigma_max^2 for VE (the marginal of x_T for unit-variance data).
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    prior_variance: jnp.ndarray  # scalar

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[-1]

    @property
    def signal_scale(self) -> jnp.ndarray:
        return self.sqrt_alphas_cumprod

    @property
    def noise_std(self) -> jnp.ndarray:
        return self.sqrt_one_minus_alphas_cumprod


def schedule_tables(signal_scale, noise_std, betas=None, xp=np) -> dict:
    """All derived tables from the marginals a_t (signal_scale) and s_t (noise_std).

    `betas` may be given to keep a VP table exact instead of re-deriving it from (a, s).
    With xp=np (fixed schedules) everything is float64 and checked; with xp=jax.numpy the same
    formulas are traced, so a learned schedule gets gradients through every table.
    """
    # Traced tables keep their inputs' precision: float32, or float64 under jax_enable_x64 (gradient checks).
    dtype = np.float64 if xp is np else jnp.result_type(jnp.asarray(signal_scale), jnp.asarray(noise_std), jnp.float32)
    a = xp.asarray(signal_scale, dtype)
    s = xp.asarray(noise_std, dtype)
    a_prev = xp.concatenate([xp.ones(1, dtype), a[:-1]])
    s2_prev = xp.concatenate([xp.zeros(1, dtype), s[:-1] ** 2])
    alphas = (a / a_prev) ** 2
    if betas is None:  # the step variance; above 1 is fine for VE
        betas = s**2 - alphas * s2_prev
    betas = xp.asarray(betas, dtype)
    if xp is np and (np.any(betas <= 0) or np.any(s <= 0) or np.any(a <= 0)):
        raise ValueError("the noise std must increase strictly with t and the signal scale stay positive.")
    s2 = s**2
    # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_t s_{t-1}^2 / s_t^2) (Ho et al. eq. 7).
    posterior_variance = betas * s2_prev / s2
    # At t = 0 the posterior variance is 0: clip the log to the next step's (improved-diffusion).
    clipped = xp.concatenate([posterior_variance[1:2], posterior_variance[1:]]) if a.size > 1 else betas
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=a**2,
        alphas_cumprod_prev=a_prev**2,
        sqrt_alphas_cumprod=a,
        sqrt_one_minus_alphas_cumprod=s,
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=xp.log(clipped),
        posterior_mean_coef1=a_prev * betas / s2,
        posterior_mean_coef2=xp.sqrt(alphas) * s2_prev / s2,
        prior_variance=xp.asarray(a[-1] ** 2 + s[-1] ** 2),
    )


def vp_schedule_from_log_snr(log_snr: jnp.ndarray) -> Schedule:
    """A VP `Schedule` from log SNR_t = log(abar_t / (1 - abar_t)), t = 0..T-1, strictly decreasing.

    Traceable and differentiable (a learned schedule, VDM). a_t^2 = sigmoid(log SNR_t) and
    s_t^2 = sigmoid(-log SNR_t) avoid 1 - abar_t cancelling near t = 0, and
    beta_t = 1 - abar_t / abar_{t-1} = -expm1(log abar_t - log abar_{t-1}) stays accurate where it is tiny.
    """
    log_abar = jax.nn.log_sigmoid(log_snr)
    log_abar_prev = jnp.concatenate([jnp.zeros(1, log_abar.dtype), log_abar[:-1]])
    betas = -jnp.expm1(log_abar - log_abar_prev)
    signal = jnp.exp(0.5 * log_abar)
    noise = jnp.exp(0.5 * jax.nn.log_sigmoid(-log_snr))
    return Schedule(**schedule_tables(signal, noise, betas=betas, xp=jnp))


def _to_schedule(tables: dict[str, np.ndarray]) -> Schedule:
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


BetasLike = str | Sequence[float] | np.ndarray | Callable[[int], np.ndarray]


def make_schedule(name_or_betas: BetasLike, num_timesteps: int | None = None, **kwargs) -> Schedule:
    """Builds the `Schedule` pytree.

    Args:
      name_or_betas: a name from `SCHEDULE_NAMES` ("ve" for variance exploding), an array of
        betas, or a callable `f(num_timesteps) -> betas`.
      num_timesteps: T; required with a name or a callable, checked against an array's length.
      **kwargs: forwarded to `betas_for` (or `ve_sigmas` for "ve").

    Returns:
      Schedule with float32 tables of shape [T].
    """
    if isinstance(name_or_betas, str):
        if name_or_betas == "ve":
            sigmas = ve_sigmas(num_timesteps, **kwargs)
            return _to_schedule(schedule_tables(np.ones_like(sigmas), sigmas))
        betas = betas_for(name_or_betas, num_timesteps, **kwargs)
    elif callable(name_or_betas):
        betas = _check_betas(name_or_betas(_check_num_timesteps(num_timesteps)))
        if betas.size != num_timesteps:
            raise ValueError(f"the betas callable returned {betas.size} values for num_timesteps={num_timesteps}.")
    else:
        betas = _check_betas(name_or_betas)
        if num_timesteps is not None and betas.size != num_timesteps:
            raise ValueError(f"got {betas.size} betas but num_timesteps={num_timesteps}.")
    abar = np.cumprod(1.0 - betas)
    return _to_schedule(schedule_tables(np.sqrt(abar), np.sqrt(1.0 - abar), betas=betas))

"""The exact likelihood of the probability-flow ODE, beside VDM's bound (`vdm.bound_bpd`).

The process is VDM's variance-preserving one (see `ddpm_jax.core.vdm`): z_t = alpha_t x + sigma_t eps with
alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), t in [0, 1], gamma increasing.

The ODE (Song et al. 2021, eq. 13, in t and gamma). The forward SDE dz = f(t) z dt + g(t) dw with
these marginals has f = d log alpha_t / dt and g^2 = d sigma_t^2 / dt - 2 f sigma_t^2. With
d log sigmoid(x) / dx = sigmoid(-x):

    f   = 0.5 d log sigmoid(-gamma) / dt = -0.5 gamma' sigma^2,
    g^2 = gamma' sigma^2 alpha^2 + gamma' sigma^4 = gamma' sigma^2,

and with score(z, t) = -eps_hat(z, t) / sigma_t the probability-flow ODE dz/dt = f z - 0.5 g^2 score is

    dz/dt = v(z, t) = 0.5 gamma'(t) sigma_t (eps_hat(z, t) - sigma_t z),
    div v          = 0.5 gamma'(t) sigma_t (tr d eps_hat / dz - sigma_t D).

Its density obeys d log p_t(z_t) / dt = -div v along a path (instantaneous change of variables), so

    log p_ode(z at t_min) = log N(z_1; 0, I) + int_{t_min}^1 div v(z_t, t) dt,

which is integrated together with z_t from t_min to 1. With the exact eps_hat = E[eps | z_t], the ODE
carries the true marginal q_t to q_s for every pair of times, so p_ode differs from q_{t_min} only by
the prior's mismatch at t = 1: log p_ode(z) - log q_{t_min}(z) = log N(z_1; 0, I) - log q_1(z_1).

Integrator: classical RK4 with num_steps fixed steps, uniform in t, in one lax.scan (memory of one
step; num_steps static). RK4 rather than Heun because the velocity is smooth in t for a smooth
gamma (and, along a path, scales like e^{gamma/2}, i.e. exponentially in t for a linear gamma): RK4
is 4th order for 4 evaluations a step against Heun's 2nd order for 2, so for the same cost its
error is far smaller (measured in tests/test_likelihood.py: error / 16 per doubling of num_steps
against / 4 for Heun). `method="heun"` is kept for comparison. The trace is carried as an extra
state component, so log p gets the same order as z.

Divergence: exact (`exact_trace=True`): tr(d eps_hat / dz) = sum_i e_i^T J e_i, one jvp per basis
vector e_i of the D = H*W*C dims (a vmap over D tangents of one `jax.linearize`; D + 1 network
evaluations per RK stage; `trace_chunk` bounds how many run at once). The basis vector e_i is put in
every example at once, which gives each example's own diagonal as long as eps_fn treats examples
independently (no batch statistics). Or Hutchinson: v^T J v with num_probes Rademacher probes v, each
fixed for the whole path, so each probe gives an unbiased estimate of the whole integral; their mean
is the estimate and their spread over sqrt(num_probes) its per-example standard error.

Discrete data (x on the 256-level grid v_k = k / 127.5 - 1, bin width DELTA = 2/255): the ODE gives
a density, so the NLL of x needs a dequantizer q(z | x) and a decoder p(x | z). Both choices below are
variational dequantization, the same bound

    -log P(x) <= E_{z ~ q(z | x)}[ -log p_ode(z) + log q(z | x) - log p(x | z) ]     (Jensen),

with z the state at t_min (gamma_min = gamma(t_min)):

- "decoder" (VDM's route): q(z | x) = N(alpha x, sigma^2 I) at gamma_min and p(x | z) VDM's 256-way
  decoder (`vdm.recon_loss`). The model bounded is P_dec(x) = int p_ode(z) p(x | z) dz, and the
  bound's slack is KL(q(z | x) || p_ode(z) p(x | z) / P_dec(x)). With p_ode = q_{t_min} (the exact
  denoiser) that is E_q[log q(x | z) - log p(x | z)]: the data's posterior over bins against the
  decoder's (a uniform prior over all 256 bins), small when the bins are many
  sigma / alpha = e^{gamma_min / 2} apart (at gamma_min = -13.3 they are 6 apart: about 5e-3 nats per
  dim for the histogram in the tests).
- "uniform" (Song et al., Ho et al.): z = alpha (x + u), u ~ U(-DELTA/2, DELTA/2)^D, so
  log q(z | x) = -D log(alpha DELTA) and p(x | z) = 1 (the scaled bins tile space). The model bounded
  is P_unif(x) = int_{alpha bin(x)} p_ode(z) dz (mass outside the 256^D bins is lost, so it sums to
  at most 1); the result is the usual continuous NLL E_u[-log p_y(x + u)] plus D log(1 / DELTA),
  with p_y(y) = alpha^D p_ode(alpha y) the ODE's density on the data scale. For a network trained on
  the discrete data, p_ode puts its mass in spikes of width e^{gamma_min / 2} around the bin centres,
  and the uniform dequantizer pays KL(U(bin) || p restricted to the bin) for that: about 0.65 nats
  (0.94 bits) per dim at gamma_min = -13.3 (see the tests). Use "decoder" for such models.

One draw of z (and, with Hutchinson, of the probes) gives an unbiased estimate of the bound, not a
bound itself; the fixed-step integrator adds a deterministic error that vanishes as num_steps grows
(check by doubling it). p_ode is the likelihood of the deterministic flow built from the network, a
different model from the one the ELBO bounds (the ancestral / SDE sampler), so the two numbers need
not be ordered.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import vdm
from ddpm_jax.core.vdm import EpsFn, GammaFn, alpha_sigma, nats_to_bpd

DELTA = 2.0 / 255.0  # bin width of the 256-level grid on [-1, 1] (v_{k+1} - v_k)
DEQUANTIZERS = ("decoder", "uniform")
METHODS = ("rk4", "heun")


def _sum_flat(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _bcast(g: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    return g.reshape(g.shape + (1,) * (x.ndim - g.ndim))


def _std_normal_logp(z: jnp.ndarray) -> jnp.ndarray:
    d = np.prod(z.shape[1:])
    return -0.5 * _sum_flat(z**2) - 0.5 * d * np.log(2.0 * np.pi)


def _quad_forms(f_jvp, vec_fn, n: int, chunk: int | None) -> jnp.ndarray:
    """[n, B] of u_j^T J u_j (summed over each example's dims), u_j = vec_fn(j)."""

    def one(j):
        u = vec_fn(j)
        return _sum_flat(u * f_jvp(u))

    idx = jnp.arange(n)
    return jax.vmap(one)(idx) if chunk is None else jax.lax.map(one, idx, batch_size=chunk)


def _dynamics(gamma_fn, eps_fn, z, t, probes, chunk):
    """(v(z, t), div v [K, B]) at the scalar time t; probes None for the exact trace."""
    batch, shape = z.shape[0], z.shape[1:]
    d = int(np.prod(shape))
    tb = jnp.full((batch,), t, z.dtype)
    gamma, dgamma = jax.jvp(gamma_fn, (tb,), (jnp.ones_like(tb),))
    _, sigma = alpha_sigma(gamma)
    eps, f_jvp = jax.linearize(lambda zz: eps_fn(zz, tb), z)
    chex.assert_equal_shape([eps, z])
    if probes is None:  # basis vector e_i in every example: each example's J_ii
        basis = lambda i: jnp.broadcast_to(jax.nn.one_hot(i, d, dtype=z.dtype).reshape(shape), z.shape)
        tr = jnp.sum(_quad_forms(f_jvp, basis, d, chunk), axis=0, keepdims=True)
    else:
        tr = _quad_forms(f_jvp, lambda j: probes[j], probes.shape[0], chunk)
    c = 0.5 * dgamma * sigma  # [B]
    v = _bcast(c, z) * (eps - _bcast(sigma, z) * z)
    return v, c * (tr - sigma * d)


def _check_args(num_steps, t_min, exact_trace, num_probes, method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if not 0.0 <= float(t_min) < 1.0:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min!r}.")
    if not exact_trace and num_probes < 2:
        raise ValueError(f"Hutchinson needs num_probes >= 2 for its standard error, got {num_probes}.")


def ode_log_prob(
    gamma_fn: GammaFn,
    eps_fn: EpsFn,
    z: jnp.ndarray,
    rng: chex.PRNGKey | None = None,
    *,
    num_steps: int,
    t_min: float = 0.0,
    exact_trace: bool = True,
    num_probes: int = 8,
    method: str = "rk4",
    trace_chunk: int | None = None,
) -> dict:
    """log p_ode(z) of points z at time t_min under the probability-flow ODE (module docstring).

    Args:
      gamma_fn, eps_fn: as in `ddpm_jax.core.vdm` (eps_fn must act on each example independently).
      z: [B, H, W, C] points at t_min.
      rng: key for the Hutchinson probes (unused, may be None, with exact_trace).
      num_steps: fixed integrator steps from t_min to 1 (static).
      t_min: start time in [0, 1) (static).
      exact_trace: the exact divergence (D jvps) or Hutchinson's estimate.
      num_probes: Rademacher probes per example for Hutchinson (>= 2, for the standard error).
      method: "rk4" (default) or "heun".
      trace_chunk: at most this many jvps at once (lax.map); None = all at once (vmap).

    Returns:
      dict of [B] arrays: log_prob = prior_logp + delta_logp; prior_logp = log N(z_1; 0, I);
      delta_logp = int div v dt (Hutchinson: the mean over probes); delta_logp_se (its standard
      error over probes; 0 for the exact trace); and z_1 [B, H, W, C], the path's end.
    """
    _check_args(num_steps, t_min, exact_trace, num_probes, method)
    probes = None
    if not exact_trace:
        if rng is None:
            raise ValueError("Hutchinson's estimate needs an rng for its probes.")
        probes = jax.random.rademacher(rng, (num_probes,) + z.shape, z.dtype)
    num_k = 1 if probes is None else num_probes
    h = (1.0 - float(t_min)) / num_steps
    field = lambda zz, t: _dynamics(gamma_fn, eps_fn, zz, t, probes, trace_chunk)

    def step(carry, n):
        zz, acc = carry
        # the stage times, computed once: XLA may otherwise round t + h differently (FMA or not) in
        # the fusions that use it, which matters where gamma or eps_fn has a kink (knots of a table).
        t, t_mid, t_end = jax.lax.optimization_barrier((t_min + n * h, t_min + (n + 0.5) * h, t_min + (n + 1) * h))
        if method == "rk4":
            v1, d1 = field(zz, t)
            v2, d2 = field(zz + 0.5 * h * v1, t_mid)
            v3, d3 = field(zz + 0.5 * h * v2, t_mid)
            v4, d4 = field(zz + h * v3, t_end)
            zz = zz + (h / 6.0) * (v1 + 2.0 * v2 + 2.0 * v3 + v4)
            acc = acc + (h / 6.0) * (d1 + 2.0 * d2 + 2.0 * d3 + d4)
        else:
            v1, d1 = field(zz, t)
            v2, d2 = field(zz + h * v1, t_end)
            zz = zz + 0.5 * h * (v1 + v2)
            acc = acc + 0.5 * h * (d1 + d2)
        return (zz, acc), None

    acc0 = jnp.zeros((num_k, z.shape[0]), z.dtype)
    (z1, acc), _ = jax.lax.scan(step, (z, acc0), jnp.arange(num_steps, dtype=z.dtype))
    delta = jnp.mean(acc, axis=0)
    se = jnp.zeros_like(delta) if probes is None else jnp.std(acc, axis=0, ddof=1) / np.sqrt(num_k)
    prior = _std_normal_logp(z1)
    return {"log_prob": prior + delta, "prior_logp": prior, "delta_logp": delta, "delta_logp_se": se, "z_1": z1}


def ode_nll_bpd(
    gamma_fn: GammaFn,
    eps_fn: EpsFn,
    x0: jnp.ndarray,
    rng: chex.PRNGKey,
    *,
    num_steps: int = 128,
    t_min: float = 0.0,
    exact_trace: bool = True,
    num_probes: int = 8,
    dequantize: str = "decoder",
    method: str = "rk4",
    trace_chunk: int | None = None,
) -> dict:
    """A one-sample estimate of the dequantized probability-flow-ODE NLL per example, bits/dim.

    Estimates E_{z ~ q(z | x)}[-log p_ode(z) + log q(z | x) - log p(x | z)] >= -log P(x) for the
    discrete model P named by `dequantize` (see the module docstring for what each bounds).

    Args:
      gamma_fn, eps_fn: as in `ddpm_jax.core.vdm`.
      x0: [B, H, W, C] on the 256-level grid in [-1, 1].
      rng: key for z's draw and the Hutchinson probes.
      num_steps, t_min, exact_trace, num_probes, method, trace_chunk: see `ode_log_prob`.
      dequantize: "decoder" (N(alpha x, sigma^2) at gamma(t_min) with VDM's 256-way decoder) or
        "uniform" (z = alpha (x + u), u uniform over the bin).

    Returns:
      dict of [B] arrays in bits/dim: total_bpd = prior_bpd + flow_bpd + dequant_bpd + recon_bpd,
      with prior_bpd = -log N(z_1; 0, I), flow_bpd = -int div v dt (so the two sum to
      -log p_ode(z)), dequant_bpd = log q(z | x), recon_bpd = -log p(x | z) (0 for "uniform");
      and total_se_bpd, Hutchinson's per-example standard error (0 for the exact trace; it leaves
      out the draw of z).
    """
    if dequantize not in DEQUANTIZERS:
        raise ValueError(f"dequantize must be one of {DEQUANTIZERS}, got {dequantize!r}.")
    _check_args(num_steps, t_min, exact_trace, num_probes, method)
    chex.assert_rank(x0, 4)
    k_z, k_probe = jax.random.split(rng)
    batch, d = x0.shape[0], int(np.prod(x0.shape[1:]))
    gamma_min = gamma_fn(jnp.full((batch,), t_min, x0.dtype))
    log_alpha = 0.5 * jax.nn.log_sigmoid(-gamma_min)  # [B]
    log_sigma = 0.5 * jax.nn.log_sigmoid(gamma_min)
    alpha, sigma = alpha_sigma(_bcast(gamma_min, x0))
    if dequantize == "uniform":
        u = jax.random.uniform(k_z, x0.shape, x0.dtype, -0.5 * DELTA, 0.5 * DELTA)
        z = alpha * (x0 + u)
        log_q = -d * (log_alpha + np.log(DELTA))
        recon = jnp.zeros((batch,), x0.dtype)
    else:
        eps = jax.random.normal(k_z, x0.shape, x0.dtype)
        z = alpha * x0 + sigma * eps
        log_q = -0.5 * _sum_flat(eps**2) - d * (log_sigma + 0.5 * np.log(2.0 * np.pi))
        recon = vdm.recon_loss(gamma_min, x0, eps)
    out = ode_log_prob(
        gamma_fn,
        eps_fn,
        z,
        k_probe,
        num_steps=num_steps,
        t_min=t_min,
        exact_trace=exact_trace,
        num_probes=num_probes,
        method=method,
        trace_chunk=trace_chunk,
    )
    terms = {"prior_bpd": -out["prior_logp"], "flow_bpd": -out["delta_logp"], "dequant_bpd": log_q, "recon_bpd": recon}
    terms = {k: nats_to_bpd(v, x0) for k, v in terms.items()}
    terms["total_bpd"] = terms["prior_bpd"] + terms["flow_bpd"] + terms["dequant_bpd"] + terms["recon_bpd"]
    terms["total_se_bpd"] = nats_to_bpd(out["delta_logp_se"], x0)
    return terms


# --- the discrete DDPM as a continuous-time model ----------------------------------------------


def _pchip_slopes(y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson (PCHIP) slopes per unit index of increasing knots y_i at i = 0..n-1: the
    harmonic mean of the neighbouring secants inside, the end secants at the ends. The Hermite cubic
    through (y_i, slope_i) is then C1 and monotone."""
    sec = np.diff(y)
    slopes = np.empty_like(y)
    slopes[1:-1] = 2.0 / (1.0 / sec[:-1] + 1.0 / sec[1:])
    slopes[0], slopes[-1] = sec[0], sec[-1]
    return slopes


def continuous_from_schedule(sched, eps_model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]):
    """(gamma_fn, eps_fn) on t in [0, 1] from a discrete VP `Schedule` and its eps predictor.

    Step i = 0..T-1 sits at t_i = i / (T - 1), tau = t (T - 1). gamma interpolates
    gamma_i = -log SNR_i = log(s_i^2 / a_i^2) with a monotone cubic Hermite (PCHIP) in tau, so that
    gamma' is continuous (with a piecewise-linear gamma, gamma' jumps at every knot, and an RK4 stage
    sitting on a knot takes the wrong side's slope: first-order error); eps_hat(z, t) is the linear
    interpolation in tau of eps_model_fn(z, i) and eps_model_fn(z, i + 1) (two network calls), which
    is continuous. The velocity is then continuous in t and smooth between knots: with num_steps a
    multiple of T - 1 every RK4 step lies inside one segment and keeps its 4th order; other grids
    converge at a lower order (kinks inside steps). For DDPM's linear T = 1000 schedule and Gaussian
    data (tests/test_ode_likelihood.py) 500 or more steps, aligned or not, sit at the floor set by the
    interpolation of eps_hat itself (~2e-4 nats per dim against the exact flow); 100 steps are 30x off.

    This is a legitimate eps_fn, so ode_log_prob gives the exact density of the flow it defines; but
    between the knots the network is queried only through the interpolation (it was trained at
    integer steps), and the data end is gamma_0 = log(beta_0 / (1 - beta_0)) (-9.2 for DDPM's linear
    T = 1000), where e^{gamma_0 / 2} = 0.01 exceeds the bin width 2/255: both dequantizers then pay
    for bins that overlap. The schedule must be VP (a_t^2 + s_t^2 = 1).

    Args:
      sched: a VP `ddpm_jax.core.schedules.Schedule` with T >= 2.
      eps_model_fn: eps_hat = eps_model_fn(x_t [B, H, W, C], t [B] int32); wrap a model with another
        parameterization (v, x0, learned variance) to return eps first.

    Returns:
      (gamma_fn, eps_fn) for ode_log_prob / ode_nll_bpd.
    """
    a = np.asarray(sched.sqrt_alphas_cumprod, np.float64)
    s = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)
    if a.size < 2:
        raise ValueError("the schedule needs T >= 2 steps.")
    if np.max(np.abs(a**2 + s**2 - 1.0)) > 1e-4:
        raise ValueError("continuous_from_schedule needs a variance-preserving schedule (a_t^2 + s_t^2 = 1).")
    num_t = a.size
    g64 = 2.0 * (np.log(s) - np.log(a))
    if np.any(np.diff(g64) <= 0):
        raise ValueError("the schedule's log SNR must decrease strictly with t.")
    gammas = jnp.asarray(g64, jnp.float32)
    slopes = jnp.asarray(_pchip_slopes(g64), jnp.float32)

    def segment(t):
        # no clip of t itself: d clip / dt is 1/2 at t = 0 and t = 1 (ties), which would halve gamma'
        # at the ends of the path (a first-order error); outside [0, 1] the end cubics extrapolate.
        # one materialised tau for both the knot index and the offset: XLA may otherwise recompute t
        # in several fusions with different roundings (e.g. with and without an FMA), and an index
        # from one with an offset from another is off by a whole segment at a knot.
        tau = jax.lax.optimization_barrier(t * (num_t - 1))
        i0 = jnp.clip(jnp.floor(tau), 0, num_t - 2).astype(jnp.int32)
        return i0, tau - i0

    def gamma_fn(t):
        i0, u = segment(t)
        h00, h10 = (1.0 + 2.0 * u) * (1.0 - u) ** 2, u * (1.0 - u) ** 2
        h01, h11 = u**2 * (3.0 - 2.0 * u), u**2 * (u - 1.0)
        return h00 * gammas[i0] + h10 * slopes[i0] + h01 * gammas[i0 + 1] + h11 * slopes[i0 + 1]

    def eps_fn(z, t):
        i0, u = segment(t)
        w = _bcast(u.astype(z.dtype), z)
        return (1.0 - w) * eps_model_fn(z, i0) + w * eps_model_fn(z, i0 + 1)

    return gamma_fn, eps_fn

"""Float64 references and helpers shared by the tests of ddpm_jax.core.diffusion (test_diffusion,
test_likelihood, test_losses, test_bound).

Conventions: images NHWC in [-1, 1]; integer t in 0..T-1 where index t is the lecture's step
t+1; bits/dim = nats summed over the D = H*W*C dims / (D log 2). The references are written from
the lecture (last third of shared/seeds/000_*.txt) and Ho et al. 2020, never by calling the
library.
"""

import math

import jax.numpy as jnp
import numpy as np
from scipy import stats

from ddpm_jax.core import schedules as S

LOG2 = math.log(2.0)
HALF_BIN = 1.0 / 255.0
BIN_CENTRES = (-1.0 + 2.0 * np.arange(256) / 255.0).astype(np.float32)


class ErrorTable:
    """The largest error of each library function against its float64 reference, for the release
    note: a test module records into its own table and prints it at its end (with `pytest -s`)."""

    def __init__(self, title: str):
        self.title = title
        self.errors: dict = {}

    def record(self, name, actual, ref):
        """Largest abs / rel error of `actual` against the float64 `ref`.

        rel is taken over the entries with |ref| >= 1e-3 max|ref| (near-zero entries of an array whose
        error is set by its large entries would only report cancellation; their abs error is reported)."""
        a = np.asarray(actual, np.float64)
        r = np.asarray(ref, np.float64)
        err = np.abs(a - r)
        nz = np.abs(r) >= 1e-3 * np.abs(r).max()
        rel = float(np.max(err[nz] / np.abs(r[nz]))) if np.abs(r).max() > 0 else 0.0
        old = self.errors.get(name, (0.0, 0.0))
        self.errors[name] = (max(old[0], float(err.max())), max(old[1], rel))

    def print(self):
        print(f"\n[{self.title}] largest error vs float64 reference (abs, rel):")
        for k, (a, r) in sorted(self.errors.items()):
            print(f"  {k:48s} abs={a:.3e} rel={r:.3e}")


def ref_betas(name, T):
    if name == "linear":  # Ho et al. range, rescaled by 1000/T (Nichol & Dhariwal)
        sc = 1000.0 / T
        return np.linspace(1e-4 * sc, 0.02 * sc, T)
    if name == "cosine":  # Nichol & Dhariwal eq. 17, s = 0.008, clip 0.999
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise AssertionError(name)


def vp64(name, T):
    """The lecture's VP quantities in float64, as a dict of [T] arrays (index t = step t+1)."""
    beta = ref_betas(name, T)
    alpha = 1.0 - beta
    abar = np.cumprod(alpha)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = (1.0 - abar_prev) / (1.0 - abar) * beta
    return dict(
        a=np.sqrt(abar),
        s=np.sqrt(1.0 - abar),
        abar=abar,
        abar_prev=abar_prev,
        alpha=alpha,
        beta=beta,
        a_prev=np.sqrt(abar_prev),
        s2_prev=1.0 - abar_prev,
        post_var=post_var,
        coef1=np.sqrt(abar_prev) * beta / (1.0 - abar),  # multiplies x0 in mu~
        coef2=np.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar),  # multiplies x_t in mu~
        plvc=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        prior_var=1.0,
    )


def ve64(T, smin=0.01, smax=50.0):
    """VE: q(x_t|x_0) = N(x_0, sigma_t^2), q(x_t|x_{t-1}) = N(x_{t-1}, sigma_t^2 - sigma_{t-1}^2)."""
    sig = smin * (smax / smin) ** (np.arange(T) / (T - 1))
    s2_prev = np.concatenate([[0.0], sig[:-1] ** 2])
    beta = sig**2 - s2_prev
    post_var = s2_prev * beta / sig**2
    return dict(
        a=np.ones(T),
        s=sig,
        alpha=np.ones(T),
        beta=beta,
        a_prev=np.ones(T),
        s2_prev=s2_prev,
        post_var=post_var,
        coef1=beta / sig**2,
        coef2=s2_prev / sig**2,
        plvc=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        prior_var=1.0 + smax**2,
    )


SCHEDS = {
    "vp_linear": (lambda: S.make_schedule("linear", 100), lambda: vp64("linear", 100)),
    "vp_cosine": (lambda: S.make_schedule("cosine", 40), lambda: vp64("cosine", 40)),
    "ve": (lambda: S.make_schedule("ve", 30, sigma_min=0.01, sigma_max=50.0), lambda: ve64(30)),
}


def b4(v, t):
    """v[t] as [B, 1, 1, 1]."""
    return np.asarray(v)[np.asarray(t)][:, None, None, None]


def f64(x):
    return np.asarray(x, np.float64)


def rand_batch(seed, B=4, H=3, W=3, C=2, T=100, t=None):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
    noise = rng.standard_normal((B, H, W, C)).astype(np.float32)
    if t is None:
        t = rng.integers(0, T, B)
    return x0, noise, np.asarray(t, np.int32)


def linear_model(seed, c_in, c_out, T):
    """An arbitrary affine network: output = x_t W + b + (t/T) u, per pixel. Returns (jax fn, numpy fn)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.7, (c_in, c_out)).astype(np.float32)
    b = rng.normal(0, 0.3, (c_out,)).astype(np.float32)
    u = rng.normal(0, 0.5, (c_out,)).astype(np.float32)

    def fn(xt, t):
        return xt @ W + b + (t.astype(jnp.float32) / T)[:, None, None, None] * u

    def fn64(xt, t):
        return f64(xt) @ f64(W) + f64(b) + (f64(t) / T)[:, None, None, None] * f64(u)

    return fn, fn64


def ref_log_probs(x, mean, log_scale):
    """log P(bin) of N(mean, e^{2 log_scale}) over the 256 bins, float64 SciPy; edge bins open-ended."""
    sd = np.exp(log_scale)
    lo = (x - HALF_BIN - mean) / sd
    hi = (x + HALF_BIN - mean) / sd
    with np.errstate(divide="ignore", invalid="ignore"):
        # Phi(hi) - Phi(lo), taken on the side where both tails are small (no cancellation).
        left = stats.norm.logcdf(hi) + np.log1p(-np.exp(stats.norm.logcdf(lo) - stats.norm.logcdf(hi)))
        right = stats.norm.logsf(lo) + np.log1p(-np.exp(stats.norm.logsf(hi) - stats.norm.logsf(lo)))
    inner = np.where(lo + hi > 0, right, left)
    return np.where(x < -0.999, stats.norm.logcdf(hi), np.where(x > 0.999, stats.norm.logsf(lo), inner))


def var_model(C, T):
    """model_fn(params) with separately named mean and variance weights (output 2C channels)."""

    def make(params):
        def fn(xt, t):
            tt = (t.astype(jnp.float32) / T)[:, None, None, None]
            return jnp.concatenate(
                [xt * params["wm"] + tt * params["bm"], jnp.tanh(xt * params["wv"] + params["bv"])], axis=-1
            )

        return fn

    rng = np.random.default_rng(18)
    params = {k: jnp.asarray(rng.normal(0, 0.5, (C,)), jnp.float32) for k in ("wm", "bm", "wv", "bv")}
    return make, params

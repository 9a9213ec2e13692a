"""ddpm_jax.diffusion against independent float64 NumPy / SciPy references.

Conventions: images NHWC in [-1, 1]; integer t in 0..T-1 where index t is the lecture's step
t+1; bits/dim = nats summed over the D = H*W*C dims / (D log 2). The references below are written
from the lecture (last third of shared/seeds/000_*.txt) and Ho et al. 2020, never by calling the
library; the library runs in float32 and is compared with tolerances that follow from that.
Run with `pytest -s` to print the largest error of each function against its reference.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from ddpm_jax import diffusion as D
from ddpm_jax import schedules as S

LOG2 = math.log(2.0)
HALF_BIN = 1.0 / 255.0
BIN_CENTRES = (-1.0 + 2.0 * np.arange(256) / 255.0).astype(np.float32)

# --- error bookkeeping for the release note (printed with `pytest -s`) -------------------------
ERRORS: dict = {}


def record(name, actual, ref):
    """Largest abs / rel error of `actual` against the float64 `ref`.

    rel is taken over the entries with |ref| >= 1e-3 max|ref| (near-zero entries of an array whose
    error is set by its large entries would only report cancellation; their abs error is reported)."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(ref, np.float64)
    err = np.abs(a - r)
    nz = np.abs(r) >= 1e-3 * np.abs(r).max()
    rel = float(np.max(err[nz] / np.abs(r[nz]))) if np.abs(r).max() > 0 else 0.0
    old = ERRORS.get(name, (0.0, 0.0))
    ERRORS[name] = (max(old[0], float(err.max())), max(old[1], rel))


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    print("\n[diffusion] largest error vs float64 reference (abs, rel):")
    for k, (a, r) in sorted(ERRORS.items()):
        print(f"  {k:48s} abs={a:.3e} rel={r:.3e}")


# --- compiled calls ---------------------------------------------------------------------------
# On CPU, eager dispatch compiles every primitive at every new shape; for a function called once at
# one shape, a single jit compile is cheaper. (Eager == jit == pmap is its own test below.) Tests
# that call the core many times use eager mode at a shared shape [8, 3, 3, 2] instead.
decoder_ll = jax.jit(D.discretized_gaussian_log_likelihood)
vb_terms = jax.jit(D.vb_terms_bpd)


# --- float64 references -----------------------------------------------------------------------

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
        a=np.sqrt(abar), s=np.sqrt(1.0 - abar), abar=abar, abar_prev=abar_prev, alpha=alpha, beta=beta,
        a_prev=np.sqrt(abar_prev), s2_prev=1.0 - abar_prev,
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
        a=np.ones(T), s=sig, alpha=np.ones(T), beta=beta, a_prev=np.ones(T), s2_prev=s2_prev,
        post_var=post_var, coef1=beta / sig**2, coef2=s2_prev / sig**2,
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


# --- forward process --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDS))
def test_q_sample_and_q_mean_variance_match_numpy(kind):
    sched, r = SCHEDS[kind][0](), SCHEDS[kind][1]()
    T = sched.num_timesteps
    x0, noise, t = rand_batch(0, B=6, T=T, t=[0, 1, T // 3, T // 2, T - 2, T - 1])
    got = D.q_sample(sched, x0, t, noise)
    ref = b4(r["a"], t) * f64(x0) + b4(r["s"], t) * f64(noise)
    # a_t, s_t are float32-rounded (rel 6e-8) and two products are summed: scale with |terms|.
    scale = b4(r["a"], t) * np.abs(x0) + b4(r["s"], t) * np.abs(noise)
    np.testing.assert_array_less(np.abs(f64(got) - ref), 3e-7 * scale + 1e-12)
    record("q_sample", got, ref)
    mean, var, logvar = D.q_mean_variance(sched, x0, t)
    np.testing.assert_allclose(f64(mean), b4(r["a"], t) * f64(x0), rtol=3e-7, atol=1e-12)
    np.testing.assert_allclose(f64(var), np.broadcast_to(b4(r["s"], t) ** 2, x0.shape), rtol=5e-7)
    np.testing.assert_allclose(f64(logvar), np.broadcast_to(2 * np.log(b4(r["s"], t)), x0.shape),
                               rtol=1e-6, atol=1e-6)
    record("q_mean_variance.mean", mean, b4(r["a"], t) * f64(x0))
    record("q_mean_variance.variance", var, np.broadcast_to(b4(r["s"], t) ** 2, x0.shape))


def test_q_sample_monte_carlo():
    """Sample mean and variance of x_t ~ q(x_t|x_0) match sqrt(abar_t) x0 and 1 - abar_t within
    5 standard errors: SE(mean) = s_t / sqrt(N), SE(var) = s_t^2 sqrt(2 / (N - 1)) (Gaussian)."""
    sched = S.make_schedule("linear", 1000)
    r = vp64("linear", 1000)
    t = np.array([0, 50, 300, 999], np.int32)
    c = np.array([0.9, -0.5, 0.3, 1.0], np.float32)
    x0 = jnp.broadcast_to(jnp.asarray(c)[:, None, None, None], (4, 128, 128, 1))
    N = 128 * 128
    for seed in range(2):
        noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape)
        xt = f64(D.q_sample(sched, x0, jnp.asarray(t), noise)).reshape(4, -1)
        m, v = xt.mean(1), xt.var(1, ddof=1)
        mref, vref = r["a"][t] * c, 1.0 - r["abar"][t]
        assert np.all(np.abs(m - mref) < 5 * np.sqrt(vref / N)), (m, mref)
        assert np.all(np.abs(v - vref) < 5 * vref * np.sqrt(2.0 / (N - 1))), (v, vref)


# --- posterior --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDS))
def test_q_posterior_matches_lecture_formula(kind):
    sched, r = SCHEDS[kind][0](), SCHEDS[kind][1]()
    T = sched.num_timesteps
    x0, noise, t = rand_batch(1, B=6, T=T, t=[0, 1, 2, T // 2, T - 2, T - 1])
    xt = np.asarray(D.q_sample(sched, x0, t, noise))
    mean, var, logvar = D.q_posterior(sched, x0, xt, t)
    if kind == "ve":
        mref = b4(r["coef1"], t) * f64(x0) + b4(r["coef2"], t) * f64(xt)
    else:  # the lecture: mu~ = sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) x_t + sqrt(abar_{t-1}) beta_t/(1-abar_t) x_0
        mref = (np.sqrt(b4(r["alpha"], t)) * (1 - b4(r["abar_prev"], t)) / (1 - b4(r["abar"], t)) * f64(xt)
                + np.sqrt(b4(r["abar_prev"], t)) * b4(r["beta"], t) / (1 - b4(r["abar"], t)) * f64(x0))
    vref = np.broadcast_to(b4(r["post_var"], t), x0.shape)
    scale = np.abs(b4(r["coef1"], t) * x0) + np.abs(b4(r["coef2"], t) * xt)
    np.testing.assert_array_less(np.abs(f64(mean) - mref), 3e-7 * scale + 1e-12)
    np.testing.assert_allclose(f64(var), vref, rtol=3e-7, atol=0)
    np.testing.assert_allclose(f64(logvar), np.broadcast_to(b4(r["plvc"], t), x0.shape), rtol=1e-6, atol=1e-6)
    record("q_posterior.mean", mean, mref)
    record("q_posterior.variance", var, vref)
    record("q_posterior.log_variance", logvar, np.broadcast_to(b4(r["plvc"], t), x0.shape))


def _bayes_posterior(r, t, x0, xt):
    """q(x_{t-1}|x_t,x_0) = q(x_t|x_{t-1}) q(x_{t-1}|x_0) / q(x_t|x_0), scalar x0, xt, t >= 1.

    Returns (closed-form mean, var) from multiplying the two Gaussians in x_{t-1} (precisions add),
    and (Z, mean, var) from evaluating the unnormalized Bayes ratio on a fine grid (Z must be 1:
    q(x_t|x_0) is the normalizer exactly when the jump is the composition of the steps)."""
    sa, beta = math.sqrt(r["alpha"][t]), r["beta"][t]
    m_prior, v_prior = r["a_prev"][t] * x0, r["s2_prev"][t]
    # Product of N(x_{t-1}; m_prior, v_prior) and N(x_t; sa x_{t-1}, beta) as a Gaussian in x_{t-1}.
    prec = 1.0 / v_prior + sa * sa / beta
    cf_var = 1.0 / prec
    cf_mean = cf_var * (m_prior / v_prior + sa * xt / beta)
    y = np.linspace(cf_mean - 14 * math.sqrt(cf_var), cf_mean + 14 * math.sqrt(cf_var), 20001)
    logp = (stats.norm.logpdf(xt, sa * y, math.sqrt(beta)) + stats.norm.logpdf(y, m_prior, math.sqrt(v_prior))
            - stats.norm.logpdf(xt, r["a"][t] * x0, r["s"][t]))
    p = np.exp(logp)
    Z = integrate.simpson(p, x=y)
    gm = integrate.simpson(y * p, x=y) / Z
    gv = integrate.simpson((y - gm) ** 2 * p, x=y) / Z
    return (cf_mean, cf_var), (Z, gm, gv)


@pytest.mark.parametrize("kind", list(SCHEDS))
def test_posterior_is_bayes_rule(kind):
    sched, r = SCHEDS[kind][0](), SCHEDS[kind][1]()
    T = sched.num_timesteps
    rng = np.random.default_rng(2)
    ts = np.array([1, 2, 5, T // 2, T - 1], np.int32)
    x0 = rng.uniform(-1, 1, len(ts)).astype(np.float32)
    xt = (r["a"][ts] * x0 + r["s"][ts] * rng.standard_normal(len(ts))).astype(np.float32)
    mean, var, _ = D.q_posterior(sched, jnp.asarray(x0)[:, None, None, None], jnp.asarray(xt)[:, None, None, None],
                                 jnp.asarray(ts))
    mean, var = f64(mean).ravel(), f64(var).ravel()
    for i, t in enumerate(ts):
        (cm, cv), (Z, gm, gv) = _bayes_posterior(r, int(t), float(x0[i]), float(xt[i]))
        assert Z == pytest.approx(1.0, abs=1e-8)
        assert gm == pytest.approx(cm, abs=1e-9 * (1 + abs(cm)))
        assert gv == pytest.approx(cv, rel=1e-8)
        scale = float(abs(x0[i]) + abs(xt[i]))
        assert mean[i] == pytest.approx(gm, abs=5e-7 * scale)
        assert var[i] == pytest.approx(gv, rel=5e-7)
        record("q_posterior.mean (Bayes grid)", mean[i], gm)
        record("q_posterior.variance (Bayes grid)", var[i], gv)


@pytest.mark.parametrize("name,T", [("linear", 1000), ("cosine", 40)])
def test_mu_tilde_x0_form_equals_eps_form(name, T):
    """mu~(x_t, x_0) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1-abar_t) eps) (the lecture), with
    eps = (x_t - sqrt(abar_t) x_0)/sqrt(1-abar_t). The two numpy forms agree; q_posterior and
    p_mean_variance(eps, true eps) reproduce them."""
    sched, r = S.make_schedule(name, T), vp64(name, T)
    x0, noise, t = rand_batch(3, B=6, T=T, t=[0, 1, 7, T // 2, T - 2, T - 1])
    xt = b4(r["a"], t) * f64(x0) + b4(r["s"], t) * f64(noise)
    eps = (xt - b4(r["a"], t) * f64(x0)) / b4(r["s"], t)
    mu_x0 = (np.sqrt(b4(r["alpha"], t)) * (1 - b4(r["abar_prev"], t)) / (1 - b4(r["abar"], t)) * xt
             + np.sqrt(b4(r["abar_prev"], t)) * b4(r["beta"], t) / (1 - b4(r["abar"], t)) * f64(x0))
    mu_eps = (xt - b4(r["beta"], t) / np.sqrt(1 - b4(r["abar"], t)) * eps) / np.sqrt(b4(r["alpha"], t))
    np.testing.assert_allclose(mu_x0, mu_eps, rtol=1e-10, atol=1e-12)
    xt32 = xt.astype(np.float32)
    got = D.q_posterior(sched, x0, xt32, t)[0]
    np.testing.assert_allclose(f64(got), mu_eps, atol=1e-6)
    eps32 = ((f64(xt32) - b4(r["a"], t) * f64(x0)) / b4(r["s"], t)).astype(np.float32)
    out = D.p_mean_variance(sched, eps32, xt32, t, parameterization="eps")
    ref = (f64(xt32) - b4(r["beta"], t) / np.sqrt(1 - b4(r["abar"], t)) * f64(eps32)) / np.sqrt(b4(r["alpha"], t))
    # The library goes eps -> x0 -> mean: x0 = (x_t - s eps)/a carries ~1e-7 (|x_t| + s|eps|)/a of float32
    # error (a = sqrt(abar_t) is 1.6e-3 at t = T-1 for cosine T = 40), which coef1 then scales.
    tol = 3e-7 * b4(r["coef1"], t) * (np.abs(f64(xt32)) + b4(r["s"], t) * np.abs(f64(eps32))) / b4(r["a"], t)
    np.testing.assert_array_less(np.abs(f64(out["mean"]) - ref), tol + 1e-6)
    record("p_mean_variance[eps].mean (mu~ eps form)", out["mean"], ref)


# --- conversions ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDS))
def test_conversions_match_numpy_and_round_trip(kind):
    sched, r = SCHEDS[kind][0](), SCHEDS[kind][1]()
    T = sched.num_timesteps
    x0, noise, t = rand_batch(4, B=6, T=T, t=[0, 1, T // 4, T // 2, T - 2, T - 1])
    a, s = b4(r["a"], t), b4(r["s"], t)
    xt = (a * f64(x0) + s * f64(noise)).astype(np.float32)
    X, E, XT = f64(x0), f64(noise), f64(xt)
    # float32 error of each formula: ~1e-7 * (sum of |terms|) / |divisor|.
    checks = {
        "predict_x0_from_eps": (D.predict_x0_from_eps(sched, xt, t, noise), (XT - s * E) / a,
                                (np.abs(XT) + s * np.abs(E)) / a),
        "predict_eps_from_x0": (D.predict_eps_from_x0(sched, xt, t, x0), (XT - a * X) / s,
                                (np.abs(XT) + a * np.abs(X)) / s),
        "v_from_x0_eps": (D.v_from_x0_eps(sched, x0, noise, t), a * E - s * X, a * np.abs(E) + s * np.abs(X)),
    }
    v = f64(checks["v_from_x0_eps"][0]).astype(np.float32)
    V = f64(v)
    det = a * a + s * s
    checks["predict_x0_from_v"] = (D.predict_x0_from_v(sched, xt, t, v), (a * XT - s * V) / det,
                                   (a * np.abs(XT) + s * np.abs(V)) / det)
    checks["predict_eps_from_v"] = (D.predict_eps_from_v(sched, xt, t, v), (s * XT + a * V) / det,
                                    (s * np.abs(XT) + a * np.abs(V)) / det)
    mu = (b4(r["coef1"], t) * X + b4(r["coef2"], t) * XT).astype(np.float32)
    checks["predict_x0_from_mean"] = (D.predict_x0_from_mean(sched, xt, t, mu),
                                      (f64(mu) - b4(r["coef2"], t) * XT) / b4(r["coef1"], t),
                                      (np.abs(mu) + b4(r["coef2"], t) * np.abs(XT)) / b4(r["coef1"], t))
    for name, (got, ref, scale) in checks.items():
        np.testing.assert_array_less(np.abs(f64(got) - ref), 4e-7 * scale + 1e-12, err_msg=name)
        record(name, got, ref)
    # Round trips back to the truth (x_t was built from x0 and noise in float64, then rounded).
    rt = {
        "x0 -> eps -> x0": (D.predict_x0_from_eps(sched, xt, t, D.predict_eps_from_x0(sched, xt, t, x0)), X),
        "eps -> x0 (truth)": (D.predict_x0_from_eps(sched, xt, t, noise), X),
        "v -> x0 (truth)": (D.predict_x0_from_v(sched, xt, t, v), X),
        "v -> eps (truth)": (D.predict_eps_from_v(sched, xt, t, v), E),
    }
    # Recovering x0 divides by a_t, eps by s_t: allow 2e-6 / (that divisor) (x_t's own rounding included).
    for name, (got, ref) in rt.items():
        div = a if "x0" in name.split("->")[-1] else s
        div = np.minimum(div, 1.0) if kind == "ve" else div
        np.testing.assert_array_less(np.abs(f64(got) - ref), 2e-6 * (1 + np.abs(XT)) / div, err_msg=name)


# --- the reverse process ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDS))
@pytest.mark.parametrize("param", ["eps", "x0", "v", "mean"])
def test_p_mean_variance_exact_output_recovers_posterior(kind, param):
    sched, r = SCHEDS[kind][0](), SCHEDS[kind][1]()
    T = sched.num_timesteps
    x0, noise, t = rand_batch(5, B=6, T=T, t=[0, 1, T // 4, T // 2, T - 2, T - 1])
    a, s = b4(r["a"], t), b4(r["s"], t)
    X, E = f64(x0), f64(noise)
    xt = (a * X + s * E).astype(np.float32)
    E = (f64(xt) - a * X) / s  # the eps that x_t (after rounding) actually carries
    mu = b4(r["coef1"], t) * X + b4(r["coef2"], t) * f64(xt)
    exact = {"eps": E, "x0": X, "v": a * E - s * X, "mean": mu}[param].astype(np.float32)
    out = D.p_mean_variance(sched, exact, xt, t, parameterization=param, variance="fixed_small")
    # The mean is coef1 * x0_hat + coef2 * x_t: x0_hat's error is (float32 rel) / a_t (eps / v) or
    # 1 / coef1 (mean), times coef1.
    err_x0 = {"eps": 1e-6 * (1 + np.abs(f64(xt))) / a, "x0": 0.0, "v": 2e-6 * (1 + np.abs(f64(xt))),
              "mean": 1e-6 * (1 + np.abs(f64(xt))) / b4(r["coef1"], t)}[param]
    tol = b4(r["coef1"], t) * err_x0 + 4e-7 * (np.abs(mu) + b4(r["coef2"], t) * np.abs(f64(xt))) + 1e-12
    np.testing.assert_array_less(np.abs(f64(out["mean"]) - mu), tol)
    record(f"p_mean_variance[{param}].mean", out["mean"], mu)
    if param != "mean":
        np.testing.assert_array_less(np.abs(f64(out["pred_x0"]) - X), err_x0 + 1e-6)
    np.testing.assert_allclose(f64(out["log_variance"]), np.broadcast_to(b4(r["plvc"], t), x0.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_p_mean_variance_variances(variance):
    T = 100
    sched, r = S.make_schedule("linear", T), vp64("linear", T)
    x0, noise, t = rand_batch(6, B=5, T=T, t=[0, 1, 2, 50, T - 1])
    rng = np.random.default_rng(7)
    xt = (b4(r["a"], t) * f64(x0) + b4(r["s"], t) * f64(noise)).astype(np.float32)
    eps_hat = rng.standard_normal(x0.shape).astype(np.float32)
    var_out = rng.uniform(-1, 1, x0.shape).astype(np.float32)
    learned = variance.startswith("learned")
    out_arr = np.concatenate([eps_hat, var_out], -1) if learned else eps_hat
    out = D.p_mean_variance(sched, out_arr, xt, t, parameterization="eps", variance=variance)
    if variance == "fixed_small":
        ref = np.broadcast_to(b4(r["plvc"], t), x0.shape)
    elif variance == "fixed_large":
        # improved-diffusion: log(append(posterior_variance[1], betas[1:]))
        large = np.concatenate([[r["post_var"][1]], r["beta"][1:]])
        ref = np.broadcast_to(b4(np.log(large), t), x0.shape)
    elif variance == "learned":
        ref = f64(var_out)
    else:  # Nichol & Dhariwal eq. 15 with v in [-1, 1]: frac = (v+1)/2
        frac = (f64(var_out) + 1) / 2
        ref = frac * b4(np.log(r["beta"]), t) + (1 - frac) * b4(r["plvc"], t)
    np.testing.assert_allclose(f64(out["log_variance"]), ref, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(f64(out["variance"]), np.exp(ref), rtol=3e-6)
    record(f"p_mean_variance[{variance}].log_variance", out["log_variance"], ref)
    record(f"p_mean_variance[{variance}].variance", out["variance"], np.exp(ref))
    # The mean part is untouched by the variance choice.
    x0_hat = (f64(xt) - b4(r["s"], t) * f64(eps_hat)) / b4(r["a"], t)
    mref = b4(r["coef1"], t) * x0_hat + b4(r["coef2"], t) * f64(xt)
    np.testing.assert_allclose(f64(out["mean"]), mref, atol=2e-5)


def test_p_mean_variance_clip_denoised():
    sched, r = S.make_schedule("linear", 100), vp64("linear", 100)
    xt = np.full((2, 2, 2, 1), 0.5, np.float32)
    x0_hat = np.array([3.0, -0.2], np.float32)[:, None, None, None] * np.ones_like(xt)
    t = np.array([10, 10], np.int32)
    out = D.p_mean_variance(sched, x0_hat, xt, t, parameterization="x0", clip_denoised=True)
    clipped = np.clip(f64(x0_hat), -1, 1)
    np.testing.assert_allclose(f64(out["pred_x0"]), clipped)
    np.testing.assert_allclose(f64(out["mean"]), b4(r["coef1"], t) * clipped + b4(r["coef2"], t) * 0.5, atol=1e-6)


# --- KL, decoder, bound terms -----------------------------------------------------------------

def test_normal_kl_equal_variances():
    rng = np.random.default_rng(8)
    mp, mq = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    logvar = rng.uniform(-6, 2, size=(3, 1)) * np.ones((3, 5))
    got = f64(D.normal_kl(jnp.asarray(mp, jnp.float32), jnp.asarray(logvar, jnp.float32),
                          jnp.asarray(mq, jnp.float32), jnp.asarray(logvar, jnp.float32)))
    # the lecture: D_KL = ||mu_q - mu_p||^2 / (2 sigma^2), elementwise here
    ref = (f64(np.float32(mp)) - f64(np.float32(mq))) ** 2 / (2 * np.exp(f64(np.float32(logvar))))
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), ref.sum(1), rtol=2e-6)
    record("normal_kl (equal variances)", got, ref)
    # KL(p || p) = 0 up to the float32 rounding of -1 + lv2 - lv1 + exp(0) (an ulp of 1).
    same = f64(D.normal_kl(mp.astype(np.float32), logvar.astype(np.float32),
                           mp.astype(np.float32), logvar.astype(np.float32)))
    np.testing.assert_array_less(np.abs(same), 1.2e-7)


@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.4, 0.5), (1.5, 1.2, 0.0, -2.0),
                                            (-2.0, -6.0, -1.9, -5.0), (0.1, -9.0, 0.1, -9.3)])
def test_normal_kl_vs_numerical_integral(m1, lv1, m2, lv2):
    sd1 = math.exp(0.5 * lv1)
    p = lambda x: stats.norm.pdf(x, m1, sd1)  # noqa: E731
    sd2 = math.exp(0.5 * lv2)
    integrand = lambda x: p(x) * (stats.norm.logpdf(x, m1, sd1) - stats.norm.logpdf(x, m2, sd2))  # noqa: E731
    ref, _ = integrate.quad(integrand, m1 - 30 * sd1, m1 + 30 * sd1, epsabs=1e-13, epsrel=1e-12, limit=200)
    got = float(D.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    record("normal_kl (general, quad)", got, ref)


def _ref_log_probs(x, mean, log_scale):
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


def test_discretized_decoder_sums_to_one_and_matches_scipy():
    means = np.array([-1.0, -1.0 + 1.0 / 255, -0.999, -0.5, 0.0, 0.3, 0.98, 1.0 - 1.0 / 255, 1.0, 1.3, -1.6],
                     np.float32)
    log_scales = np.log(np.array([1e-4, 1e-3, 1.0 / 255, 0.02, 0.3, 3.0, 30.0])).astype(np.float32)
    M, L = np.meshgrid(means, log_scales, indexing="ij")
    M, L = M.ravel(), L.ravel()
    x = np.broadcast_to(BIN_CENTRES, (M.size, 256))
    Mb, Lb = np.broadcast_to(M[:, None], x.shape), np.broadcast_to(L[:, None], x.shape)
    got = f64(decoder_ll(jnp.asarray(x), jnp.asarray(Mb), jnp.asarray(Lb)))
    assert np.all(np.isfinite(got)) and np.all(got <= 1e-6)
    total = np.exp(got).sum(1)
    np.testing.assert_allclose(total, 1.0, atol=2e-5)
    record("discretized_gaussian (sum of 256 probs)", total, np.ones_like(total))
    ref = _ref_log_probs(f64(x), f64(Mb), f64(Lb))
    # The probabilities themselves, against SciPy's cdf differences: absolute (float32 log_ndtr,
    # exponentiated) ...
    p_ref = np.where(f64(x) < -0.999, stats.norm.cdf((f64(x) + HALF_BIN - f64(Mb)) / np.exp(f64(Lb))),
                     np.where(f64(x) > 0.999, stats.norm.sf((f64(x) - HALF_BIN - f64(Mb)) / np.exp(f64(Lb))),
                              stats.norm.cdf((f64(x) + HALF_BIN - f64(Mb)) / np.exp(f64(Lb)))
                              - stats.norm.cdf((f64(x) - HALF_BIN - f64(Mb)) / np.exp(f64(Lb)))))
    np.testing.assert_allclose(np.exp(got), p_ref, rtol=0, atol=2e-6)
    record("discretized_gaussian (prob)", np.exp(got), p_ref)
    # ... and in the log, relatively, down to the far tails (log P ~ -1e7 for the narrow decoders).
    # A bin of width 2h/sd that is a tiny fraction of the decoder's mass is a difference of two
    # float32 log-cdfs: its relative error grows like 1e-7 / P_bin, so compare logs relatively where
    # the bin is not a cancellation (P_bin > 1e-3 or the bin is out in a tail).
    finite = np.isfinite(ref)
    assert finite.all()
    sd = np.exp(f64(Lb))
    tail = np.minimum(np.abs(f64(x) - HALF_BIN - f64(Mb)), np.abs(f64(x) + HALF_BIN - f64(Mb))) / sd > 3
    ok = tail | (p_ref > 1e-3)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=2e-5, atol=2e-5)
    deep = ok & (ref < -1)
    record("discretized_gaussian (log prob, log P < -1)", got[deep], ref[deep])
    record("discretized_gaussian (log prob, P > 1/e)", got[ref >= -1], ref[ref >= -1])
    # Very narrow decoder centred on a bin: all the mass in that bin; centred on an edge: half/half.
    narrow = got[(M == 0.3) & (L == np.float32(np.log(1e-4)))][0]
    assert np.exp(narrow).max() == pytest.approx(0.5, abs=1e-6) or np.exp(narrow).max() == pytest.approx(1, abs=1e-6)
    on_bin = f64(decoder_ll(jnp.asarray(BIN_CENTRES), jnp.asarray(BIN_CENTRES),
                                                        jnp.full(256, np.log(1e-4), jnp.float32)))
    np.testing.assert_allclose(on_bin, 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["vp_linear", "ve"])
def test_vb_terms_bpd_vs_numpy(kind):
    sched, r = SCHEDS[kind][0](), SCHEDS[kind][1]()
    T = sched.num_timesteps
    rng = np.random.default_rng(9)
    B, H, W, C = 5, 2, 3, 2
    x0 = BIN_CENTRES[rng.integers(0, 256, (B, H, W, C))]
    t = np.array([0, 0, 1, T // 2, T - 1], np.int32)
    xt = (b4(r["a"], t) * f64(x0) + b4(r["s"], t) * rng.standard_normal(x0.shape)).astype(np.float32)
    mm = (f64(x0) + 0.05 * rng.standard_normal(x0.shape)).astype(np.float32)
    mlv = (b4(r["plvc"], t) + rng.uniform(-0.5, 0.5, x0.shape)).astype(np.float32)
    got = f64(vb_terms(sched, x0, xt, t, mm, mlv))
    mu = b4(r["coef1"], t) * f64(x0) + b4(r["coef2"], t) * f64(xt)
    lv = b4(r["plvc"], t)
    kl = 0.5 * (-1 + f64(mlv) - lv + np.exp(lv - f64(mlv)) + (mu - f64(mm)) ** 2 * np.exp(-f64(mlv)))
    nll = -_ref_log_probs(f64(x0), f64(mm), 0.5 * f64(mlv))
    ref = np.where(t == 0, nll.reshape(B, -1).mean(1), kl.reshape(B, -1).mean(1)) / LOG2
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    record("vb_terms_bpd", got, ref)


def test_prior_bpd_closed_form_and_limit():
    rng = np.random.default_rng(10)
    x0 = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    X = f64(x0)

    def ref_prior(abar_T, prior_var=1.0, signal=None):
        a2 = abar_T if signal is None else signal**2
        var = 1 - abar_T if signal is None else abar_T
        kl = 0.5 * (-1 + np.log(prior_var) - np.log(var) + var / prior_var + a2 * X**2 / prior_var)
        return kl.reshape(3, -1).mean(1) / LOG2

    def check(sched, ref, name):
        got = f64(D.prior_bpd(sched, x0))
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-7)  # log(1-abar_T) ~ -abar_T: float32 noise
        record(f"prior_bpd[{name}]", got, ref)
        return got.mean()

    vals = {"linear_fixed_range": [], "cosine": [], "linear": []}
    for T in (100, 400, 1000, 4000):
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[-1]  # Ho et al.'s fixed range, not rescaled
        vals["linear_fixed_range"].append(check(S.make_schedule("linear", T, beta_start=1e-4, beta_end=0.02),
                                                ref_prior(abar), "linear (fixed 1e-4..0.02)"))
        vals["cosine"].append(check(S.make_schedule("cosine", T), ref_prior(np.cumprod(1 - ref_betas("cosine", T))[-1]),
                                    "cosine"))
        vals["linear"].append(check(S.make_schedule("linear", T), ref_prior(np.cumprod(1 - ref_betas("linear", T))[-1]),
                                    "linear (1000/T)"))
    for key in ("linear_fixed_range", "cosine"):
        assert np.all(np.diff(vals[key]) < 0), (key, vals[key])
    assert vals["linear_fixed_range"][-1] < 1e-7 and vals["cosine"][-1] < 1e-8
    # The rescaled linear schedule keeps sum(beta) ~ 10.05, so abar_T -> exp(-10.05) ~ 4.3e-5 and the
    # prior term does NOT go to 0 with T; it stays ~ 0.5 abar_T E[x0^2] / log 2 < 1e-4 bits/dim.
    assert max(vals["linear"]) < 1e-4
    # VE: N(x0, sigma_max^2) against N(0, 1 + sigma_max^2)
    sched = S.make_schedule("ve", 20, sigma_min=0.01, sigma_max=50.0)
    check(sched, ref_prior(2500.0, prior_var=2501.0, signal=1.0), "ve")


# --- losses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("param", ["x0", "eps", "v", "mean"])
def test_weighted_mse_equals_kl_fixed_small(param):
    """For p = N(mu_theta, sigma~_t^2), L_{t-1} = ||mu_theta - mu~||^2 / (2 sigma~^2) = omega_t ||out - target||^2.

    The lecture's weights: omega_t = abar_{t-1} beta_t^2 / (2 sigma~_t^2 (1-abar_t)^2) for an x0 model and
    omega'_t = beta_t^2 / (2 sigma~_t^2 alpha_t (1-abar_t)) for an eps model. (The slide prints
    omega'_t with (1-abar_t)^2 / (abar_t (1-abar_t)); that is a typo: d mu / d eps = beta_t / (sqrt(alpha_t)
    sqrt(1-abar_t)), whose square is beta_t^2 / (alpha_t (1-abar_t)).)"""
    T = 100
    sched, r = S.make_schedule("linear", T), vp64("linear", T)
    rng = np.random.default_rng(11)
    B, C = 8, 2
    x0 = rng.uniform(-1, 1, (B, 3, 3, C)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.concatenate([[1, 2, T - 1], rng.integers(1, T, B - 3)]).astype(np.int32)
    fn, fn64 = linear_model(12, C, C, T)
    w = D.training_losses(sched, fn, x0, t, noise, parameterization=param, loss_type="weighted")
    v = D.training_losses(sched, fn, x0, t, noise, parameterization=param, loss_type="vlb")
    # "vlb" evaluates the full normal_kl, whose variance part -1 + lv2 - lv1 + exp(lv1 - lv2) is 0 only up
    # to float32 rounding (~1e-7 nats per element); the weighted form has no such term. Hence the atol.
    np.testing.assert_allclose(f64(w["vb"]), f64(v["vb"]), rtol=1e-4, atol=3e-7)
    np.testing.assert_allclose(f64(w["loss"]), T * f64(w["vb"]), rtol=1e-6)
    record(f"training_losses weighted vs vlb [{param}]", w["vb"], f64(v["vb"]))
    # numpy: the model's mean and the KL with equal variances
    a, s = b4(r["a"], t), b4(r["s"], t)
    X, E = f64(x0), f64(noise)
    xt = a * X + s * E
    out = fn64(xt, t)
    c1, c2 = b4(r["coef1"], t), b4(r["coef2"], t)
    x0_hat = {"x0": out, "eps": (xt - s * out) / a, "v": a * xt - s * out, "mean": (out - c2 * xt) / c1}[param]
    mu_theta = c1 * x0_hat + c2 * xt
    mu = c1 * X + c2 * xt
    var = b4(r["post_var"], t)
    kl_ref = ((mu_theta - mu) ** 2 / (2 * var)).reshape(B, -1).mean(1) / LOG2
    np.testing.assert_allclose(f64(v["vb"]), kl_ref, rtol=1e-4, atol=3e-7)
    np.testing.assert_allclose(f64(w["vb"]), kl_ref, rtol=1e-4, atol=1e-10)
    record(f"training_losses vlb vs numpy KL [{param}]", v["vb"], kl_ref)
    record(f"training_losses weighted vs numpy KL [{param}]", w["vb"], kl_ref)
    ab, abp, be, al = b4(r["abar"], t), b4(r["abar_prev"], t), b4(r["beta"], t), b4(r["alpha"], t)
    if param == "x0":
        omega = abp * be**2 / (2 * var * (1 - ab) ** 2)
        ref = (omega * (out - X) ** 2).reshape(B, -1).mean(1) / LOG2
    elif param == "eps":
        omega = be**2 / (2 * var * al * (1 - ab))  # the corrected omega'_t (see docstring)
        ref = (omega * (out - E) ** 2).reshape(B, -1).mean(1) / LOG2
        typo = (1 - ab) ** 2 / (ab * (1 - ab)) / (2 * var)
        assert not np.allclose(typo, omega, rtol=1e-2)  # the slide's version would not match
    else:
        ref = kl_ref
    np.testing.assert_allclose(f64(w["vb"]), ref, rtol=1e-4, atol=1e-10)
    record(f"training_losses weighted vs lecture omega [{param}]", w["vb"], ref)


@pytest.mark.parametrize("param", ["x0", "eps", "v", "mean"])
def test_weighted_equals_vlb_fixed_large(param):
    """With Sigma = beta_t (fixed_large) the KL is the weighted MSE (omega with beta_t in place of
    sigma~^2) plus the constant variance mismatch 0.5 (-1 + log beta - log sigma~^2 + sigma~^2 / beta)."""
    T = 100
    sched, r = S.make_schedule("linear", T), vp64("linear", T)
    rng = np.random.default_rng(22)
    B, C = 8, 2
    x0 = rng.uniform(-1, 1, (B, 3, 3, C)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([1, 2, 10, 50, 98, 99, 3, 4], np.int32)
    fn, fn64 = linear_model(23, C, C, T)
    w = D.training_losses(sched, fn, x0, t, noise, parameterization=param, variance="fixed_large", loss_type="weighted")
    v = D.training_losses(sched, fn, x0, t, noise, parameterization=param, variance="fixed_large", loss_type="vlb")
    np.testing.assert_allclose(f64(w["vb"]), f64(v["vb"]), rtol=1e-4, atol=3e-7)
    a, s = b4(r["a"], t), b4(r["s"], t)
    xt = a * f64(x0) + s * f64(noise)
    out = fn64(xt, t)
    c1, c2 = b4(r["coef1"], t), b4(r["coef2"], t)
    x0_hat = {"x0": out, "eps": (xt - s * out) / a, "v": a * xt - s * out, "mean": (out - c2 * xt) / c1}[param]
    beta, pv = b4(r["beta"], t), b4(r["post_var"], t)
    kl = 0.5 * (-1 + np.log(beta / pv) + pv / beta) + (c1 * (x0_hat - f64(x0))) ** 2 / (2 * beta)
    ref = np.broadcast_to(kl, x0.shape).reshape(B, -1).mean(1) / LOG2
    np.testing.assert_allclose(f64(w["vb"]), ref, rtol=1e-4, atol=3e-7)
    record(f"training_losses weighted fixed_large vs numpy KL [{param}]", w["vb"], ref)


def test_weighted_equals_vlb_at_t0_decoder():
    T = 100
    sched = S.make_schedule("linear", T)
    x0 = BIN_CENTRES[np.random.default_rng(13).integers(0, 256, (8, 3, 3, 2))]
    noise = np.random.default_rng(14).standard_normal(x0.shape).astype(np.float32)
    t = np.zeros(8, np.int32)
    fn, _ = linear_model(15, 2, 2, T)
    for param in ("x0", "eps"):
        w = D.training_losses(sched, fn, x0, t, noise, parameterization=param, loss_type="weighted")
        v = D.training_losses(sched, fn, x0, t, noise, parameterization=param, loss_type="vlb")
        np.testing.assert_allclose(f64(w["vb"]), f64(v["vb"]), rtol=1e-6)


@pytest.mark.parametrize("param", ["eps", "x0", "v", "mean"])
def test_simple_loss_targets(param):
    T = 100
    sched, r = S.make_schedule("linear", T), vp64("linear", T)
    x0, noise, t = rand_batch(16, B=8, T=T)
    fn, fn64 = linear_model(17, 2, 2, T)
    got = D.training_losses(sched, fn, x0, t, noise, parameterization=param, loss_type="simple")
    a, s = b4(r["a"], t), b4(r["s"], t)
    X, E = f64(x0), f64(noise)
    xt = a * X + s * E
    target = {"eps": E, "x0": X, "v": a * E - s * X, "mean": b4(r["coef1"], t) * X + b4(r["coef2"], t) * xt}[param]
    ref = ((fn64(xt, t) - target) ** 2).reshape(8, -1).mean(1)
    np.testing.assert_allclose(f64(got["loss"]), ref, rtol=1e-5)
    np.testing.assert_allclose(f64(got["mse"]), ref, rtol=1e-5)
    record(f"training_losses simple [{param}]", got["loss"], ref)


def _var_model(C, T):
    """model_fn(params) with separately named mean and variance weights (output 2C channels)."""
    def make(params):
        def fn(xt, t):
            tt = (t.astype(jnp.float32) / T)[:, None, None, None]
            return jnp.concatenate([xt * params["wm"] + tt * params["bm"], jnp.tanh(xt * params["wv"] + params["bv"])],
                                   axis=-1)
        return fn
    rng = np.random.default_rng(18)
    params = {k: jnp.asarray(rng.normal(0, 0.5, (C,)), jnp.float32) for k in ("wm", "bm", "wv", "bv")}
    return make, params


def test_vlb_is_T_times_vb_and_hybrid_composition():
    T = 50
    sched = S.make_schedule("cosine", T)
    x0, noise, t = rand_batch(19, B=8, T=T, t=[0, 1, 5, 20, 48, 49, 2, 3])
    x0 = BIN_CENTRES[np.round((x0 + 1) * 127.5).astype(int)]
    make, params = _var_model(2, T)
    fn = make(params)
    mean_fn = lambda x, tt: fn(x, tt)[..., :2]  # noqa: E731
    for variance in ("learned_range", "learned", "fixed_large", "fixed_small"):
        f = fn if variance.startswith("learned") else mean_fn
        vlb = D.training_losses(sched, f, x0, t, noise, parameterization="eps", variance=variance, loss_type="vlb")
        np.testing.assert_allclose(f64(vlb["loss"]), T * f64(vlb["vb"]), rtol=1e-6)
        hyb = D.training_losses(sched, f, x0, t, noise, parameterization="eps", variance=variance, loss_type="hybrid")
        np.testing.assert_allclose(f64(hyb["loss"]), f64(hyb["mse"]) + 1e-3 * T * f64(hyb["vb"]), rtol=1e-6)
        np.testing.assert_allclose(f64(hyb["vb"]), f64(vlb["vb"]), rtol=1e-6)  # stop_gradient changes no value
        simple = D.training_losses(sched, mean_fn, x0, t, noise, loss_type="simple")
        np.testing.assert_allclose(f64(hyb["mse"]), f64(simple["mse"]), rtol=1e-6)


def test_hybrid_vb_has_no_gradient_to_the_mean():
    T = 50
    sched = S.make_schedule("cosine", T)
    x0, noise, t = rand_batch(20, B=8, T=T, t=[0, 1, 5, 20, 48, 49, 2, 3])
    make, params = _var_model(2, T)

    def part(p, loss_type, key):
        out = D.training_losses(sched, make(p), x0, t, noise, parameterization="eps", variance="learned_range",
                                loss_type=loss_type)
        return jnp.sum(out[key])

    grad = jax.grad(part)
    g_vb = grad(params, "hybrid", "vb")
    assert float(jnp.abs(g_vb["wm"]).max()) == 0.0 and float(jnp.abs(g_vb["bm"]).max()) == 0.0
    assert float(jnp.abs(g_vb["wv"]).max()) > 0 and float(jnp.abs(g_vb["bv"]).max()) > 0
    # The total hybrid loss trains the mean only through the MSE ...
    g_loss = grad(params, "hybrid", "loss")
    g_mse = grad(params, "hybrid", "mse")
    chex.assert_trees_all_close(g_loss["wm"], g_mse["wm"], rtol=1e-6)
    chex.assert_trees_all_close(g_loss["bm"], g_mse["bm"], rtol=1e-6)
    # ... whereas the plain vlb does reach the mean (so the zero above is the stop-gradient, not a no-op).
    g_vlb = grad(params, "vlb", "vb")
    assert float(jnp.abs(g_vlb["wm"]).max()) > 0


# --- end to end: the bound on data with an analytic optimal denoiser --------------------------

K1, K2 = 40, 200  # two bin indices; x0 per pixel is c1 or c2 with probability 1/2, independently


def _bpsk_mmse_and_info(gamma):
    """For b = +-1 equiprobable and y = sqrt(gamma) b + z: mmse(gamma) = 1 - E tanh(gamma + sqrt(gamma) z) and
    I(gamma) = gamma - E log cosh(gamma + sqrt(gamma) z) (nats), by the trapezoid rule on z in [-40, 40]."""
    z = np.linspace(-40, 40, 8001)
    w = stats.norm.pdf(z) * (z[1] - z[0])
    u = gamma[:, None] + np.sqrt(gamma)[:, None] * z
    mmse = (2 * special.expit(-2 * u)) @ w
    info = gamma - (np.logaddexp(u, -u) - LOG2) @ w
    return mmse, info


def test_bound_on_two_point_data():
    """calc_bpd_loop with the exact E[x0|x_t] on x0 in {c1, c2}^D.

    Expected value of every term (per dim, nats), with d = (c2-c1)/2, snr_t = abar_t/(1-abar_t):
      - t >= 1: the model's mean is mu~(x_t, E[x0|x_t]), so L_{t-1} = coef1_t^2 (x0 - E[x0|x_t])^2 / (2 sigma~_t^2)
        = omega_t * err^2, and E = omega_t * d^2 * mmse_bpsk(snr_t d^2); note omega_t = (snr_{t-1} - snr_t)/2.
      - t = 0: x_t = x0 + 0.01 noise and the points are ~1 apart, so E[x0|x_t] = x0 exactly and the decoder
        mean is x0 (coef1_0 = 1, coef2_0 = 0); the decoder has std sigma_0 = exp(0.5 plvc[0]) = 7.4e-3
        against a half-bin of 1/255 = 3.9e-3, so L_0 = -log(Phi(h/sigma_0) - Phi(-h/sigma_0)) = 0.905 nats
        (1.305 bits) for every pixel: a deterministic cost, the decoder spilling 60% of its mass into the
        neighbouring (empty) bins.
      - prior: KL(N(sqrt(abar_T) x0, 1-abar_T) || N(0, 1)) ~ 1e-5.
    Why bound >= H: with x_{t=0} the first latent, E[L_T + sum_{t>=1} L_{t-1}] = I(x0; x_{t=0}) +
    KL(q(x_{0:T-1}) || p(x_{0:T-1})) >= I(x0; x_{t=0}) = H - H(x0 | x_{t=0}) = H - O(e^-1000) (snr d^2 ~ 4e3);
    and E[L_0] >= 0. Numerically, sum_t omega_t mmse_t is an upper Riemann sum of the I-MMSE integral
    (1/2) int mmse(snr) dsnr = I (mmse falls with snr; each step takes the value at its low-snr end).
    So the excess over H = 1 bit/dim is L_0 (1.305 bits) + the Riemann gap of the chain (~0.0095 bits at
    T = 1000, computed below) + the prior (~1e-5) -- the margin the test allows, plus 4 MC standard errors.
    """
    T = 1000
    sched, r = S.make_schedule("linear", T), vp64("linear", T)
    c1, c2 = float(BIN_CENTRES[K1]), float(BIN_CENTRES[K2])
    m, d = (c1 + c2) / 2, (c2 - c1) / 2

    def model_fn(xt, t):  # E[x0 | x_t] = m + d tanh(a d (x_t - a m) / s^2): half the log-likelihood ratio
        a = sched.sqrt_alphas_cumprod[t][:, None, None, None]
        s2 = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] ** 2
        return m + d * jnp.tanh(a * d * (xt - a * m) / s2)

    B = 192
    bits = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (B, 4, 4, 1))
    x0 = jnp.where(bits, jnp.float32(c2), jnp.float32(c1))
    out = jax.jit(lambda x, k: D.calc_bpd_loop(sched, model_fn, x, k, parameterization="x0"))(x0, jax.random.PRNGKey(1))
    assert out["vb"].shape == (B, T) and out["total_bpd"].shape == (B,) and out["prior_bpd"].shape == (B,)
    assert out["xstart_mse"].shape == (B, T) and out["mse"].shape == (B, T)
    total, vb, prior = f64(out["total_bpd"]), f64(out["vb"]), f64(out["prior_bpd"])
    np.testing.assert_allclose(total, prior + vb.sum(1), rtol=1e-5)
    assert np.all(vb >= -1e-6)

    # Analytic expectation of each term.
    snr = r["abar"] / (1 - r["abar"])
    mmse, info = _bpsk_mmse_and_info(snr * d * d)
    omega = r["coef1"] ** 2 / (2 * r["post_var"][np.arange(T)].clip(1e-300))
    np.testing.assert_allclose(omega[1:], 0.5 * (snr[:-1] - snr[1:]), rtol=1e-9)
    chain = (omega[1:] * d * d * mmse[1:]).sum()
    sd0 = math.exp(0.5 * r["plvc"][0])
    L0 = -math.log(stats.norm.cdf(HALF_BIN / sd0) - stats.norm.cdf(-HALF_BIN / sd0))
    abar_T = r["abar"][-1]
    prior_ref = 0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * (c1 * c1 + c2 * c2) / 2)
    expected = (chain + L0 + prior_ref) / LOG2
    H = 1.0  # entropy of the data in bits/dim: one fair bit per pixel
    riemann_gap = (chain + prior_ref - info[0]) / LOG2
    assert 0 < riemann_gap < 0.02 and info[0] == pytest.approx(LOG2, abs=1e-8)

    # L_0 is deterministic here.
    np.testing.assert_allclose(vb[:, 0], L0 / LOG2, rtol=1e-5)
    record("calc_bpd_loop L_0 (analytic)", vb[:, 0], np.full(B, L0 / LOG2))
    x2 = (f64(x0) ** 2).reshape(B, -1).mean(1)
    prior_ex = 0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * x2) / LOG2  # per example
    # KL of two near-identical Gaussians in float32: its variance part cancels to ~1e-7 nats; allow 2e-7.
    np.testing.assert_allclose(prior, prior_ex, rtol=1e-2, atol=2e-7)
    record("calc_bpd_loop prior_bpd", prior, prior_ex)

    mean, se = total.mean(), total.std(ddof=1) / math.sqrt(B)
    print(f"\n[bound] two-point data, T=1000: {mean:.4f} +- {se:.4f} bits/dim; analytic {expected:.4f}; "
          f"H = {H}; L_0 = {L0 / LOG2:.4f}; chain gap = {riemann_gap:.4f}")
    assert se < 0.02
    assert mean >= H - 4 * se
    assert mean - H <= L0 / LOG2 + riemann_gap + 4 * se + 1e-3
    assert mean == pytest.approx(expected, abs=4 * se + 1e-3)
    # The chain alone (prior + t >= 1) estimates I(x0; x_{t=0}) = 1 bit plus the Riemann gap.
    chain_mc = prior + vb[:, 1:].sum(1)
    se_chain = chain_mc.std(ddof=1) / math.sqrt(B)
    assert chain_mc.mean() == pytest.approx((chain + prior_ref) / LOG2, abs=4 * se_chain + 1e-3)
    record("calc_bpd_loop total (MC mean vs analytic)", mean, expected)


def test_calc_bpd_loop_terms_and_sum():
    """Short chain with a large prior term: total = prior + sum_t vb, each vb[:, t] the term at t with
    the documented noise fold_in(rng, t), prior = prior_bpd, mse = eps MSE, xstart_mse = x0 MSE."""
    T = 5
    sched = S.make_schedule(np.full(T, 0.05))  # abar_T = 0.77: prior_bpd is O(0.1), not negligible
    rng = np.random.default_rng(24)
    x0 = jnp.asarray(BIN_CENTRES[rng.integers(0, 256, (8, 3, 3, 2))])
    fn, _ = linear_model(25, 2, 2, T)
    key = jax.random.PRNGKey(5)
    out = D.calc_bpd_loop(sched, fn, x0, key, parameterization="eps", variance="fixed_large")
    assert out["vb"].shape == (8, T) and out["mse"].shape == (8, T) and out["xstart_mse"].shape == (8, T)
    prior = f64(D.prior_bpd(sched, x0))
    assert prior.min() > 0.05
    np.testing.assert_allclose(f64(out["prior_bpd"]), prior, rtol=1e-6)
    np.testing.assert_allclose(f64(out["total_bpd"]), prior + f64(out["vb"]).sum(1), rtol=1e-6)
    for t in range(T):
        tt = jnp.full((8,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape)
        xt = D.q_sample(sched, x0, tt, noise)
        pm = D.p_mean_variance(sched, fn(xt, tt), xt, tt, "eps", "fixed_large")
        vb = D.vb_terms_bpd(sched, x0, xt, tt, pm["mean"], pm["log_variance"])
        np.testing.assert_allclose(f64(out["vb"][:, t]), f64(vb), rtol=1e-5, atol=1e-7)
        eps_hat = f64(fn(xt, tt))
        np.testing.assert_allclose(f64(out["mse"][:, t]), ((eps_hat - f64(noise)) ** 2).reshape(8, -1).mean(1),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(f64(out["xstart_mse"][:, t]),
                                   ((f64(pm["pred_x0"]) - f64(x0)) ** 2).reshape(8, -1).mean(1), rtol=1e-5)


# --- eager == jit == pmap ---------------------------------------------------------------------

def test_eager_jit_pmap_agree():
    n = jax.local_device_count()
    assert n == 4, "tests/conftest.py should force 4 CPU devices"
    T = 6
    sched = S.make_schedule("cosine", T)
    B, C = 8, 2
    rng = np.random.default_rng(21)
    x0 = jnp.asarray(BIN_CENTRES[rng.integers(0, 256, (B, 3, 3, C))])
    noise = jnp.asarray(rng.standard_normal((B, 3, 3, C)), jnp.float32)
    t = jnp.asarray(np.tile(np.arange(T), 2)[:B], jnp.int32)
    out2c = jnp.asarray(rng.normal(size=(B, 3, 3, 2 * C)), jnp.float32)
    make, params = _var_model(C, T)
    model_fn = make(params)
    mm = jnp.asarray(rng.normal(size=x0.shape) * 0.1, jnp.float32) + x0
    mlv = jnp.asarray(rng.uniform(-8, -2, x0.shape), jnp.float32)

    fns = {
        "q_sample": (lambda s, x, tt, e: D.q_sample(s, x, tt, e), (x0, t, noise)),
        "q_posterior": (lambda s, x, xt, tt: D.q_posterior(s, x, xt, tt), (x0, x0 + noise, t)),
        "p_mean_variance": (lambda s, o, xt, tt: D.p_mean_variance(s, o, xt, tt, "v", "learned_range"),
                            (out2c, x0 + noise, t)),
        "training_losses": (lambda s, x, tt, e: D.training_losses(s, model_fn, x, tt, e, variance="learned_range",
                                                                  loss_type="hybrid"), (x0, t, noise)),
        "vb_terms_bpd": (lambda s, x, xt, tt, a, b: D.vb_terms_bpd(s, x, xt, tt, a, b), (x0, x0 + noise, t, mm, mlv)),
        "prior_bpd": (lambda s, x: D.prior_bpd(s, x), (x0,)),
    }
    shard = lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:])  # noqa: E731
    unshard = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    for name, (f, args) in fns.items():
        eager = f(sched, *args)
        jitted = jax.jit(f)(sched, *args)  # the schedule passed through jit as a pytree argument
        chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6, custom_message=name)
        # pmap: the schedule passed in replicated (in_axes=None) ...
        pm = jax.pmap(f, in_axes=(None,) + (0,) * len(args))(sched, *map(shard, args))
        chex.assert_trees_all_close(jax.tree_util.tree_map(unshard, pm), eager, rtol=1e-5, atol=1e-6,
                                    custom_message=name)
        # ... and closed over (a constant of the compiled function).
        if name in ("q_sample", "training_losses"):
            pm2 = jax.pmap(lambda *a, f=f: f(sched, *a))(*map(shard, args))
            chex.assert_trees_all_close(jax.tree_util.tree_map(unshard, pm2), eager, rtol=1e-5, atol=1e-6,
                                        custom_message=name)

    # calc_bpd_loop draws its noise from (rng, t) with the local batch's shape, so compare per shard.
    # (Eager calc_bpd_loop still compiles its scan; one shard eagerly, all shards through jit.)
    key = jax.random.PRNGKey(3)
    mean_fn = lambda xt, tt: model_fn(xt, tt)[..., :C]  # noqa: E731
    fn = lambda s, x: D.calc_bpd_loop(s, mean_fn, x, key)  # noqa: E731
    pm = jax.pmap(fn, in_axes=(None, 0))(sched, shard(x0))
    jitted = jax.jit(fn)
    eager0 = fn(sched, shard(x0)[0])
    chex.assert_trees_all_close(jitted(sched, shard(x0)[0]), eager0, rtol=1e-5, atol=1e-6)
    for i in range(n):
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], pm), jitted(sched, shard(x0)[i]),
                                    rtol=1e-5, atol=1e-6)
    assert pm["vb"].shape == (n, B // n, T)


# --- validation -------------------------------------------------------------------------------

def test_t_out_of_range_raises():
    sched = S.make_schedule("cosine", 10)
    x = jnp.zeros((2, 2, 2, 1))
    fn = lambda xt, t: xt  # noqa: E731
    for bad in ([0, 10], [-1, 3]):
        t = jnp.asarray(bad, jnp.int32)
        with pytest.raises(ValueError, match="0..9"):
            D.q_sample(sched, x, t, x)
        with pytest.raises(ValueError):
            D.q_posterior(sched, x, x, t)
        with pytest.raises(ValueError):
            D.q_mean_variance(sched, x, t)
        with pytest.raises(ValueError):
            D.p_mean_variance(sched, x, x, t)
        with pytest.raises(ValueError):
            D.training_losses(sched, fn, x, t, x)
    with pytest.raises(ValueError):  # a t whose length is not the batch
        D.q_sample(sched, x, jnp.zeros(3, jnp.int32), x)


def test_unknown_choices_raise_naming_them():
    sched = S.make_schedule("cosine", 10)
    x = jnp.zeros((2, 2, 2, 1))
    t = jnp.zeros(2, jnp.int32)
    fn = lambda xt, tt: xt  # noqa: E731
    with pytest.raises(ValueError, match="epsilon") as e:
        D.p_mean_variance(sched, x, x, t, parameterization="epsilon")
    assert "eps" in str(e.value) and "x0" in str(e.value)
    with pytest.raises(ValueError, match="fixed_medium"):
        D.p_mean_variance(sched, x, x, t, variance="fixed_medium")
    with pytest.raises(ValueError, match="l1"):
        D.training_losses(sched, fn, x, t, x, loss_type="l1")
    with pytest.raises(ValueError, match="score"):
        D.training_losses(sched, fn, x, t, x, parameterization="score")
    with pytest.raises(ValueError, match="huge"):
        D.training_losses(sched, fn, x, t, x, variance="huge")
    with pytest.raises(ValueError, match="xstart"):
        D.calc_bpd_loop(sched, fn, x, jax.random.PRNGKey(0), parameterization="xstart")
    with pytest.raises(ValueError, match="tiny"):
        D.calc_bpd_loop(sched, fn, x, jax.random.PRNGKey(0), variance="tiny")


def test_learned_variance_needs_even_channels():
    sched = S.make_schedule("cosine", 10)
    t = jnp.zeros(2, jnp.int32)
    xt = jnp.zeros((2, 2, 2, 1))
    for variance in ("learned", "learned_range"):
        with pytest.raises(ValueError, match="even"):
            D.p_mean_variance(sched, jnp.zeros((2, 2, 2, 3)), xt, t, variance=variance)
        with pytest.raises(ValueError, match="even"):
            D.training_losses(sched, lambda x, tt: jnp.zeros((2, 2, 2, 3)), xt, t, xt, variance=variance,
                              loss_type="hybrid")
        # learned variances are trained by the bound only
        with pytest.raises(ValueError):
            D.training_losses(sched, lambda x, tt: jnp.zeros((2, 2, 2, 2)), xt, t, xt, variance=variance,
                              loss_type="simple")


# --- bpd_estimate: the stratified estimate of the whole bound ---------------------------------
def _offset_x0_bound(T, c, x0):
    """Closed form of the bound for the x0-model x0 + c (fixed_small): every KL is (coef1_t c)^2 / (2 post_var_t)
    per dim, whatever the noise; L_0 is the decoder NLL of N(x0 + c, exp(plvc_0)); plus the prior."""
    r = vp64("linear", T)
    kl = (r["coef1"][1:] * c) ** 2 / (2.0 * r["post_var"][1:]) / LOG2  # bits/dim, same for every dim
    l0 = -np.mean(_ref_log_probs(x0, x0 + c, 0.5 * r["plvc"][0])) / LOG2
    a_T = r["a"][-1]
    prior = np.mean(0.5 * ((a_T * x0) ** 2 + (1 - a_T**2) - 1 - np.log(1 - a_T**2))) / LOG2
    return prior + l0 + kl.sum(), kl


def test_bpd_estimate_equals_full_loop_with_one_step_strata_and_is_unbiased():
    T, c = 40, 0.05
    sched = S.make_schedule("linear", T)
    x0 = np.asarray(BIN_CENTRES[[10, 100, 200, 250]]).reshape(1, 2, 2, 1)
    model_fn = lambda xt, t: jnp.asarray(x0) + c  # noqa: E731  - an x0-model, off by c everywhere
    exact, kl = _offset_x0_bound(T, c, x0.ravel())
    full = D.calc_bpd_loop(sched, model_fn, x0, jax.random.PRNGKey(0), parameterization="x0")["total_bpd"]
    np.testing.assert_allclose(full, exact, rtol=2e-4)
    estimate = jax.jit(lambda k, n: D.bpd_estimate(sched, model_fn, x0, k, num_strata=n,
                                                   parameterization="x0")["total_bpd"], static_argnums=1)
    np.testing.assert_allclose(estimate(jax.random.PRNGKey(1), T - 1), exact, rtol=2e-4)  # one step per stratum
    parts = D.bpd_estimate(sched, model_fn, x0, jax.random.PRNGKey(1), num_strata=T - 1, parameterization="x0")
    np.testing.assert_allclose(parts["diffusion_bpd"], kl.sum(), rtol=2e-4)
    np.testing.assert_allclose(parts["prior_bpd"] + parts["decoder_bpd"], exact - kl.sum(), rtol=2e-4)
    # 5 strata of ~8 steps: each draw is off, the mean over draws is not (stratified sampling is unbiased).
    draws = np.array([estimate(jax.random.PRNGKey(k), 5)[0] for k in range(300)])
    assert draws.std() > 1e-3 * exact  # really random
    edges = np.unique(np.linspace(1, T, 6).round().astype(int))
    var = sum((e1 - e0) ** 2 * np.var(kl[e0 - 1:e1 - 1]) for e0, e1 in zip(edges[:-1], edges[1:]))
    assert abs(draws.mean() - exact) < 4 * math.sqrt(var / len(draws)) + 1e-4 * exact


# --- a learned (traced) schedule ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vp_schedule_from_log_snr_matches_the_fixed_tables(name):
    T = 200
    r = vp64(name, T)
    log_snr = np.log(r["abar"]) - np.log1p(-r["abar"])
    sched = jax.jit(S.vp_schedule_from_log_snr)(jnp.asarray(log_snr, jnp.float32))
    for key, ref in (("betas", r["beta"]), ("alphas_cumprod", r["abar"]), ("posterior_variance", r["post_var"]),
                     ("posterior_mean_coef1", r["coef1"]), ("posterior_mean_coef2", r["coef2"]),
                     ("posterior_log_variance_clipped", r["plvc"]), ("sqrt_one_minus_alphas_cumprod", r["s"])):
        # float32 log-SNR input: relative errors ~1e-6 * |log SNR| in abar, amplified by 1/beta in the betas.
        np.testing.assert_allclose(getattr(sched, key), ref, rtol=5e-4, err_msg=key)
        record(f"vp_schedule_from_log_snr[{name}].{key}", getattr(sched, key), ref)
    np.testing.assert_allclose(sched.prior_variance, 1.0, rtol=1e-6)

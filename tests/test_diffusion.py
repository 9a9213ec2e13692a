"""ddpm_jax.core.diffusion's process: the forward process, its posterior, the conversions between the
network's outputs, the reverse process p(x_{t-1} | x_t), eager == jit == pmap, and the input checks;
against independent float64 NumPy / SciPy references (tests/helpers/diffusion_refs.py).

The library runs in float32 and is compared with tolerances that follow from that. Run with
`pytest -s` to print the largest error of each function against its reference. The likelihood
terms, the losses and the bound are tested in test_likelihood.py, test_losses.py and test_bound.py.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from ddpm_jax.core import diffusion as D
from ddpm_jax.core import schedules as S

from helpers.diffusion_refs import (
    BIN_CENTRES,
    SCHEDS,
    ErrorTable,
    b4,
    f64,
    rand_batch,
    var_model,
    vp64,
)

ERRORS = ErrorTable("diffusion")
record = ERRORS.record


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    ERRORS.print()


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
    np.testing.assert_allclose(f64(logvar), np.broadcast_to(2 * np.log(b4(r["s"], t)), x0.shape), rtol=1e-6, atol=1e-6)
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
        mref = np.sqrt(b4(r["alpha"], t)) * (1 - b4(r["abar_prev"], t)) / (1 - b4(r["abar"], t)) * f64(xt) + np.sqrt(
            b4(r["abar_prev"], t)
        ) * b4(r["beta"], t) / (1 - b4(r["abar"], t)) * f64(x0)
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
    logp = (
        stats.norm.logpdf(xt, sa * y, math.sqrt(beta))
        + stats.norm.logpdf(y, m_prior, math.sqrt(v_prior))
        - stats.norm.logpdf(xt, r["a"][t] * x0, r["s"][t])
    )
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
    mean, var, _ = D.q_posterior(
        sched, jnp.asarray(x0)[:, None, None, None], jnp.asarray(xt)[:, None, None, None], jnp.asarray(ts)
    )
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
    mu_x0 = np.sqrt(b4(r["alpha"], t)) * (1 - b4(r["abar_prev"], t)) / (1 - b4(r["abar"], t)) * xt + np.sqrt(
        b4(r["abar_prev"], t)
    ) * b4(r["beta"], t) / (1 - b4(r["abar"], t)) * f64(x0)
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
        "predict_x0_from_eps": (
            D.predict_x0_from_eps(sched, xt, t, noise),
            (XT - s * E) / a,
            (np.abs(XT) + s * np.abs(E)) / a,
        ),
        "predict_eps_from_x0": (
            D.predict_eps_from_x0(sched, xt, t, x0),
            (XT - a * X) / s,
            (np.abs(XT) + a * np.abs(X)) / s,
        ),
        "v_from_x0_eps": (D.v_from_x0_eps(sched, x0, noise, t), a * E - s * X, a * np.abs(E) + s * np.abs(X)),
    }
    v = f64(checks["v_from_x0_eps"][0]).astype(np.float32)
    V = f64(v)
    det = a * a + s * s
    checks["predict_x0_from_v"] = (
        D.predict_x0_from_v(sched, xt, t, v),
        (a * XT - s * V) / det,
        (a * np.abs(XT) + s * np.abs(V)) / det,
    )
    checks["predict_eps_from_v"] = (
        D.predict_eps_from_v(sched, xt, t, v),
        (s * XT + a * V) / det,
        (s * np.abs(XT) + a * np.abs(V)) / det,
    )
    mu = (b4(r["coef1"], t) * X + b4(r["coef2"], t) * XT).astype(np.float32)
    checks["predict_x0_from_mean"] = (
        D.predict_x0_from_mean(sched, xt, t, mu),
        (f64(mu) - b4(r["coef2"], t) * XT) / b4(r["coef1"], t),
        (np.abs(mu) + b4(r["coef2"], t) * np.abs(XT)) / b4(r["coef1"], t),
    )
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
    err_x0 = {
        "eps": 1e-6 * (1 + np.abs(f64(xt))) / a,
        "x0": 0.0,
        "v": 2e-6 * (1 + np.abs(f64(xt))),
        "mean": 1e-6 * (1 + np.abs(f64(xt))) / b4(r["coef1"], t),
    }[param]
    tol = b4(r["coef1"], t) * err_x0 + 4e-7 * (np.abs(mu) + b4(r["coef2"], t) * np.abs(f64(xt))) + 1e-12
    np.testing.assert_array_less(np.abs(f64(out["mean"]) - mu), tol)
    record(f"p_mean_variance[{param}].mean", out["mean"], mu)
    if param != "mean":
        np.testing.assert_array_less(np.abs(f64(out["pred_x0"]) - X), err_x0 + 1e-6)
    np.testing.assert_allclose(
        f64(out["log_variance"]), np.broadcast_to(b4(r["plvc"], t), x0.shape), rtol=1e-6, atol=1e-6
    )


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
    make, params = var_model(C, T)
    model_fn = make(params)
    mm = jnp.asarray(rng.normal(size=x0.shape) * 0.1, jnp.float32) + x0
    mlv = jnp.asarray(rng.uniform(-8, -2, x0.shape), jnp.float32)

    fns = {
        "q_sample": (lambda s, x, tt, e: D.q_sample(s, x, tt, e), (x0, t, noise)),
        "q_posterior": (lambda s, x, xt, tt: D.q_posterior(s, x, xt, tt), (x0, x0 + noise, t)),
        "p_mean_variance": (
            lambda s, o, xt, tt: D.p_mean_variance(s, o, xt, tt, "v", "learned_range"),
            (out2c, x0 + noise, t),
        ),
        "training_losses": (
            lambda s, x, tt, e: D.training_losses(s, model_fn, x, tt, e, variance="learned_range", loss_type="hybrid"),
            (x0, t, noise),
        ),
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
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(unshard, pm), eager, rtol=1e-5, atol=1e-6, custom_message=name
        )
        # ... and closed over (a constant of the compiled function).
        if name in ("q_sample", "training_losses"):
            pm2 = jax.pmap(lambda *a, f=f: f(sched, *a))(*map(shard, args))
            chex.assert_trees_all_close(
                jax.tree_util.tree_map(unshard, pm2), eager, rtol=1e-5, atol=1e-6, custom_message=name
            )

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
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda a, i=i: a[i], pm), jitted(sched, shard(x0)[i]), rtol=1e-5, atol=1e-6
        )
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
            D.training_losses(
                sched, lambda x, tt: jnp.zeros((2, 2, 2, 3)), xt, t, xt, variance=variance, loss_type="hybrid"
            )
        # learned variances are trained by the bound only
        with pytest.raises(ValueError):
            D.training_losses(
                sched, lambda x, tt: jnp.zeros((2, 2, 2, 2)), xt, t, xt, variance=variance, loss_type="simple"
            )

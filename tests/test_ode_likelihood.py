"""ddpm_jax.core.likelihood (probability-flow ODE NLL) against closed forms, without a network.

- Gaussian data x ~ N(m, S) in D = 16 dims (S full, so the denoiser's Jacobian is not diagonal and
  Hutchinson's estimate has a spread): the exact eps_hat = E[eps | z_t] is linear in z_t, the flow
  map is known (each eigen-direction of S scales as sqrt(v_i(t)), v_i = alpha^2 lambda_i + sigma^2),
  so log p_ode(z_0) = log N(z_1; 0, I) + 0.5 sum_i log(v_i(1) / v_i(0)) exactly.
- A 1-D histogram with its exact Bayes denoiser (`vdm.bayes_eps_fn_for_histogram`): the ODE transports
  the true marginals q_t, so int div v dt = log q_0(z_0) - log q_1(z_1) along every path, and the
  dequantized NLL differs from -log P(x) by known amounts (decoder: the decoder's slack plus
  KL(q_1 || N(0, 1)); uniform: the KL of the uniform dequantizer to the model's spikes).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from ddpm_jax.core import likelihood, schedules, vdm

G0, G1 = vdm.GAMMA_MIN, vdm.GAMMA_MAX
V = np.arange(256) / 127.5 - 1.0


def linear_gamma(t):
    return G0 + (G1 - G0) * t


def _alpha_sigma(g):
    return np.sqrt(special.expit(-g)), np.sqrt(special.expit(g))


# --- Gaussian data --------------------------------------------------------------------------

SHAPE = (4, 4, 1)
D = 16


@pytest.fixture(scope="module")
def gaussian():
    r = np.random.default_rng(0)
    m = r.uniform(-0.5, 0.5, D)
    q, _ = np.linalg.qr(r.normal(size=(D, D)))
    lam = np.geomspace(1e-3, 0.5, D)  # eigenvalues of S: data std from 0.03 to 0.7
    return dict(m=m, q=q, lam=lam)


def gaussian_eps_fn(g, gamma_fn):
    """E[eps | z_t] = sigma (alpha^2 S + sigma^2 I)^{-1} (z_t - alpha m), S = Q diag(lam) Q^T."""
    m, q, lam = (jnp.asarray(g[k], jnp.float32) for k in ("m", "q", "lam"))

    def eps_fn(z, t):
        gam = gamma_fn(t)[:, None]
        a2, s2 = jax.nn.sigmoid(-gam), jax.nn.sigmoid(gam)
        w = (z.reshape(z.shape[0], -1) - jnp.sqrt(a2) * m) @ q / (a2 * lam + s2)
        return (jnp.sqrt(s2) * (w @ q.T)).reshape(z.shape)

    return eps_fn


def gaussian_logp(g, z0, g_start, g_end=G1):
    """Exact log p_ode(z0) at gamma = g_start (float64): the flow map, then log N(z_1; 0, I)."""
    m, q, lam = g["m"], g["q"], g["lam"]
    (a0, s0), (a1, s1) = _alpha_sigma(g_start), _alpha_sigma(g_end)
    v0, v1 = a0**2 * lam + s0**2, a1**2 * lam + s1**2
    w = (z0.reshape(len(z0), -1) - a0 * m) @ q
    z1 = a1 * m + (w * np.sqrt(v1 / v0)) @ q.T
    return -0.5 * np.sum(z1**2, 1) - 0.5 * D * np.log(2 * np.pi) + 0.5 * np.sum(np.log(v1 / v0))


def gaussian_data(g, batch, seed):
    return g["m"] + (np.random.default_rng(seed).normal(size=(batch, D)) * np.sqrt(g["lam"])) @ g["q"].T


def gaussian_points(g, batch, g_start, seed=1):
    """z ~ q(z_t) at gamma = g_start, as float32 (and the same values in float64)."""
    x = gaussian_data(g, batch, seed)
    a, s = _alpha_sigma(g_start)
    z = (a * x + s * np.random.default_rng(seed + 100).normal(size=(batch, D))).astype(np.float32)
    return jnp.asarray(z.reshape((batch,) + SHAPE)), z.astype(np.float64)


def _log_prob(gamma_fn, eps_fn, z, rng=None, **kw):
    return jax.jit(lambda zz, k: likelihood.ode_log_prob(gamma_fn, eps_fn, zz, k, **kw))(z, rng)


def test_gaussian_log_prob_converges_to_closed_form(gaussian):
    """RK4's error falls ~16x per doubling of num_steps (4th order), Heun's ~4x; at 64 RK4 steps
    the ODE density is within 2e-4 nats (D = 16) of the closed form; also from t_min = 0.3."""
    eps_fn = gaussian_eps_fn(gaussian, linear_gamma)
    z, z64 = gaussian_points(gaussian, 32, G0)
    ref = gaussian_logp(gaussian, z64, G0)
    err = {}
    for method, steps in (("rk4", (16, 32, 64)), ("heun", (32, 64))):
        for n in steps:
            got = np.asarray(_log_prob(linear_gamma, eps_fn, z, num_steps=n, method=method)["log_prob"], np.float64)
            err[method, n] = np.max(np.abs(got - ref))
    print({k: float(f"{v:.3g}") for k, v in err.items()})
    assert err["rk4", 16] / err["rk4", 32] > 8 and err["rk4", 32] / err["rk4", 64] > 8
    assert err["rk4", 64] < 2e-4
    assert 3 < err["heun", 32] / err["heun", 64] < 5.5
    assert err["rk4", 32] < err["heun", 64]  # half the evaluations, 100x smaller error

    t_min = 0.3
    z, z64 = gaussian_points(gaussian, 32, linear_gamma(t_min), seed=2)
    got = _log_prob(linear_gamma, eps_fn, z, num_steps=64, t_min=t_min)
    np.testing.assert_allclose(got["log_prob"], gaussian_logp(gaussian, z64, linear_gamma(t_min)), atol=2e-4)


def test_exact_trace_vs_hutchinson(gaussian):
    """Hutchinson's per-example mean lies within its standard error of the exact trace (z-scores
    ~ N(0, 1)); chunked exact traces (lax.map) agree with the vmapped ones."""
    eps_fn = gaussian_eps_fn(gaussian, linear_gamma)
    z, _ = gaussian_points(gaussian, 32, G0, seed=3)
    exact = _log_prob(linear_gamma, eps_fn, z, num_steps=32)
    hutch = _log_prob(linear_gamma, eps_fn, z, jax.random.PRNGKey(3), num_steps=32, exact_trace=False, num_probes=16)
    se = np.asarray(hutch["delta_logp_se"])
    assert np.all(se > 0) and np.all(np.asarray(exact["delta_logp_se"]) == 0)
    zs = (np.asarray(hutch["delta_logp"]) - np.asarray(exact["delta_logp"])) / se
    print("Hutchinson z-scores: mean z^2", np.mean(zs**2), "max |z|", np.max(np.abs(zs)), "mean se", se.mean())
    assert np.max(np.abs(zs)) < 4.5 and 0.3 < np.mean(zs**2) < 2.5
    np.testing.assert_allclose(hutch["z_1"], exact["z_1"], atol=1e-6)  # the path does not see the probes
    chunked = _log_prob(linear_gamma, eps_fn, z, num_steps=32, trace_chunk=5)
    np.testing.assert_allclose(chunked["log_prob"], exact["log_prob"], rtol=1e-6, atol=1e-4)


def test_nll_bpd_bookkeeping_and_hutchinson(gaussian):
    """ode_nll_bpd's total is the sum of its parts; with the same rng, exact and Hutchinson runs
    draw the same z and differ only by the trace estimate, within its standard error."""
    eps_fn = gaussian_eps_fn(gaussian, linear_gamma)
    x = gaussian_data(gaussian, 16, seed=4)
    x = jnp.asarray(V[np.clip(np.round((x + 1) * 127.5), 0, 255).astype(int)].reshape((16,) + SHAPE), jnp.float32)
    key = jax.random.PRNGKey(5)

    def run(**kw):
        fn = lambda xx, k: likelihood.ode_nll_bpd(linear_gamma, eps_fn, xx, k, num_steps=32, **kw)
        return jax.jit(fn)(x, key)

    for deq in likelihood.DEQUANTIZERS:
        ex, hu = run(dequantize=deq), run(dequantize=deq, exact_trace=False, num_probes=8)
        parts = ex["prior_bpd"] + ex["flow_bpd"] + ex["dequant_bpd"] + ex["recon_bpd"]
        np.testing.assert_allclose(ex["total_bpd"], parts, rtol=1e-6)
        zs = (hu["total_bpd"] - ex["total_bpd"]) / hu["total_se_bpd"]
        assert np.max(np.abs(zs)) < 4.5, zs
        np.testing.assert_allclose(hu["prior_bpd"], ex["prior_bpd"], rtol=1e-6)
    uni = run(dequantize="uniform")
    np.testing.assert_allclose(uni["recon_bpd"], 0.0)
    # -log(alpha_0 DELTA) per dim, in bits
    np.testing.assert_allclose(uni["dequant_bpd"], np.log2(127.5) - np.log2(_alpha_sigma(G0)[0]), rtol=1e-6)


# --- a 1-D histogram with its Bayes denoiser -------------------------------------------------

KS = np.array([60, 127, 128, 140, 200])  # 127 and 128: adjacent bins
P = np.array([0.1, 0.3, 0.15, 0.25, 0.2])
VALS = KS / 127.5 - 1.0


@pytest.fixture(scope="module")
def hist_eps_fn():
    probs = np.zeros((1, 1, 1, 256))
    probs[..., KS] = P
    return vdm.bayes_eps_fn_for_histogram(probs, linear_gamma)


def hist_logq(z, g):
    """log q_t(z) = log sum_k P_k N(z; alpha v_k, sigma^2) (float64)."""
    a, s = _alpha_sigma(g)
    z = np.atleast_1d(z)
    return (
        special.logsumexp(np.log(P) - 0.5 * ((z[:, None] - a * VALS) / s) ** 2, axis=1)
        - np.log(s)
        - 0.5 * np.log(2 * np.pi)
    )


def test_histogram_flow_transports_the_marginals(hist_eps_fn):
    """int div v dt = log q_0(z_0) - log q_1(z_1) on each path (the ODE with the exact denoiser is
    the true probability flow). Typical error 4e-5 nats at 128 or 256 steps (float32: d log q / dz ~
    1/sigma_0); the worst of 2000 paths 2.5e-3 at 128 steps (a path from 3.7 sigma_0 out), 3e-4 at 256."""
    r = np.random.default_rng(1)
    batch = 2000
    a0, s0 = _alpha_sigma(G0)
    z0 = (a0 * VALS[r.choice(5, batch, p=P)] + s0 * r.normal(size=batch)).astype(np.float32)
    out = {
        n: _log_prob(linear_gamma, hist_eps_fn, jnp.asarray(z0.reshape(batch, 1, 1, 1)), num_steps=n)
        for n in (128, 256)
    }
    for n, o in out.items():
        z1 = np.asarray(o["z_1"], np.float64).ravel()
        err = np.asarray(o["delta_logp"], np.float64) - (hist_logq(z0.astype(np.float64), G0) - hist_logq(z1, G1))
        print(f"{n} steps: max |err| {np.max(np.abs(err)):.2e}, std {np.std(err):.2e}, mean {np.mean(err):.2e}")
        assert np.max(np.abs(err)) < {128: 5e-3, 256: 1e-3}[n] and np.std(err) < 2e-4 and abs(np.mean(err)) < 2e-5
    np.testing.assert_allclose(out[128]["log_prob"], out[256]["log_prob"], atol=5e-3)


def _decoder_slack(x):
    """E_{z_0 ~ q(z_0 | x)}[log q(x | z_0) - log p(x | z_0)] (quadrature): the data's bin posterior
    against the 256-way decoder's (uniform prior)."""
    a0, s0 = _alpha_sigma(G0)
    j = int(np.flatnonzero(VALS == x)[0])

    def integrand(e):
        z = a0 * x + s0 * e
        ll = -0.5 * ((z - a0 * VALS) / s0) ** 2
        log_q = np.log(P[j]) + ll[j] - special.logsumexp(np.log(P) + ll)
        log_p = ll[j] - special.logsumexp(-0.5 * ((z - a0 * V) / s0) ** 2)
        return np.exp(-0.5 * e * e) / np.sqrt(2 * np.pi) * (log_q - log_p)

    return integrate.quad(integrand, -9, 9, points=[-3.03, 3.03], limit=200)[0]


def _kl_q1_prior():
    f = lambda z: np.exp(hist_logq(z, G1)[0]) * (hist_logq(z, G1)[0] + 0.5 * z * z + 0.5 * np.log(2 * np.pi))
    return integrate.quad(f, -12, 12, limit=200)[0]


def _uniform_bound(x):
    """E_u[-log q_0(alpha_0 (x + u))] - log(alpha_0 DELTA) (quadrature): the uniform route's value with
    p_ode = q_0 (i.e. without the prior's mismatch)."""
    a0, _ = _alpha_sigma(G0)
    h = likelihood.DELTA / 2
    e = integrate.quad(lambda u: -hist_logq(a0 * (x + u), G0)[0], -h, h, limit=200)[0] / (2 * h)
    return e - np.log(a0 * likelihood.DELTA)


def test_histogram_nll_decoder_and_uniform(hist_eps_fn):
    """The dequantized ODE NLL of a 5-point 1-D histogram against its exact NLL -log P(x).

    decoder: above -log P(x) by the decoder's slack (~4e-3 nats, the adjacent bins 127 / 128 and the
      decoder's mass on empty neighbour bins) plus the prior's mismatch at t = 1, whose mean over the
      data is KL(q_1 || N(0, 1)) ~ 3e-5 nats but which moves single points by up to ~0.02 nats:
      per support point within 0.03 nats, on average within 4 standard errors of the predicted slack.
    uniform: the model's density is spikes of std e^{gamma_0 / 2} = 1.3e-3 (DELTA / 6), so the uniform
      dequantizer pays ~0.65 nats per dim; it matches the quadrature of that value.
    It cannot be exact: a dequantized NLL is a variational bound (Jensen), here with a known slack.
    """
    r = np.random.default_rng(2)
    key = jax.random.PRNGKey(7)
    res = {}
    for deq, batch in (("decoder", 4000), ("uniform", 20000)):
        idx = r.choice(5, batch, p=P)
        x = jnp.asarray(VALS[idx].reshape(batch, 1, 1, 1), jnp.float32)
        fn = functools.partial(likelihood.ode_nll_bpd, linear_gamma, hist_eps_fn, num_steps=128, dequantize=deq)
        out = jax.jit(fn)(x, key)
        gap = np.asarray(out["total_bpd"], np.float64) * np.log(2) + np.log(P[idx])  # nats above -log P(x)
        res[deq] = (idx, gap)

    idx, gap = res["decoder"]
    per_x = np.array([gap[idx == j].mean() for j in range(5)])
    slack = np.array([_decoder_slack(v) for v in VALS])
    predicted = np.sum(P * slack) + _kl_q1_prior()
    se = gap.std() / np.sqrt(len(gap))
    print("decoder: gap per x", per_x.round(4), "mean", gap.mean(), "predicted", predicted, "se", se)
    assert np.max(np.abs(per_x)) < 0.03
    assert abs(gap.mean() - predicted) < 4 * se + 5e-4

    idx, gap = res["uniform"]
    per_x = np.array([gap[idx == j].mean() for j in range(5)])
    expected = np.array([_uniform_bound(v) for v in VALS]) + np.log(P)
    se = np.array([gap[idx == j].std() / np.sqrt(np.sum(idx == j)) for j in range(5)])
    print("uniform: gap per x", per_x.round(3), "quadrature", expected.round(3), "se", se.round(3))
    assert np.all(np.abs(per_x - expected) < 4 * se + 0.03)
    assert np.all((per_x > 0.5) & (per_x < 0.8))


def test_argument_checks(hist_eps_fn):
    x = jnp.zeros((2, 1, 1, 1))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="dequantize"):
        likelihood.ode_nll_bpd(linear_gamma, hist_eps_fn, x, key, dequantize="gaussian")
    with pytest.raises(ValueError, match="num_probes"):
        likelihood.ode_nll_bpd(linear_gamma, hist_eps_fn, x, key, exact_trace=False, num_probes=1)
    with pytest.raises(ValueError, match="method"):
        likelihood.ode_log_prob(linear_gamma, hist_eps_fn, x, num_steps=4, method="euler")
    with pytest.raises(ValueError, match="t_min"):
        likelihood.ode_log_prob(linear_gamma, hist_eps_fn, x, num_steps=4, t_min=1.0)


# --- the discrete DDPM schedule as a continuous-time model -----------------------------------


def test_continuous_from_schedule(gaussian):
    """DDPM's linear T = 1000 schedule: gamma and eps_hat at the knots are the table's and the
    model's. With the exact eps for the interpolated gamma, the flow matches the closed form to
    float32 accuracy at 999 steps (with XLA's optimizations on, this was 5e-3 nats off before the
    stage times were computed once: XLA rounded t + h differently in different fusions, and the knot
    index jumped a segment; conftest turns most optimizations off, so here it guards the rest).
    With the exact per-step denoiser interpolated between knots (what a DDPM network gives), the
    density converges in num_steps to within ~4e-3 nats (D = 16) of the closed form: the
    interpolation of eps_hat between knots, where gamma moves by up to 0.8 per step near t = 0."""
    sched = schedules.make_schedule("linear", 1000)
    a = np.asarray(sched.sqrt_alphas_cumprod, np.float64)
    s = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)
    g_tab = 2 * (np.log(s) - np.log(a))
    g_tab32 = jnp.asarray(g_tab, jnp.float32)
    by_gamma = gaussian_eps_fn(gaussian, lambda g: g)  # takes gamma in place of t

    def model_fn(z, i):
        return by_gamma(z, g_tab32[i])

    gamma_fn, eps_fn = likelihood.continuous_from_schedule(sched, model_fn)
    knots = np.array([0, 1, 500, 998, 999])
    np.testing.assert_allclose(gamma_fn(jnp.asarray(knots / 999, jnp.float32)), g_tab[knots], rtol=1e-5, atol=1e-5)
    z, z64 = gaussian_points(gaussian, 16, g_tab[0], seed=6)
    i = jnp.array([0, 7, 999] + [300] * 13)
    np.testing.assert_allclose(eps_fn(z, i / 999), model_fn(z, i), rtol=1e-5, atol=1e-5)
    ref = gaussian_logp(gaussian, z64, g_tab[0], g_tab[-1])

    exact_eps = gaussian_eps_fn(gaussian, gamma_fn)
    got = np.asarray(_log_prob(gamma_fn, exact_eps, z, num_steps=999)["log_prob"], np.float64)
    print("discrete schedule, exact eps: max |err|", np.max(np.abs(got - ref)))
    assert np.max(np.abs(got - ref)) < 4e-4

    got = {n: np.asarray(_log_prob(gamma_fn, eps_fn, z, num_steps=n)["log_prob"], np.float64) for n in (500, 999)}
    print("discrete schedule, interpolated eps: max |err|", {n: np.max(np.abs(v - ref)) for n, v in got.items()})
    np.testing.assert_allclose(got[500], got[999], atol=3e-3)
    np.testing.assert_allclose(got[999], ref, atol=1e-2)
    with pytest.raises(ValueError, match="variance-preserving"):
        likelihood.continuous_from_schedule(schedules.make_schedule("ve", 10), model_fn)

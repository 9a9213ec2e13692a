"""The whole bound: ddpm_jax.core.diffusion.calc_bpd_loop (all T terms) on data with an analytic optimal
denoiser and term by term, and bpd_estimate (the stratified estimate) against the full loop and
for unbiasedness."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from ddpm_jax.core import diffusion as D
from ddpm_jax.core import schedules as S

from helpers.diffusion_refs import (
    BIN_CENTRES,
    HALF_BIN,
    LOG2,
    ErrorTable,
    f64,
    linear_model,
    ref_log_probs,
    vp64,
)

ERRORS = ErrorTable("bound")
record = ERRORS.record


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    ERRORS.print()


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
    print(
        f"\n[bound] two-point data, T=1000: {mean:.4f} +- {se:.4f} bits/dim; analytic {expected:.4f}; "
        f"H = {H}; L_0 = {L0 / LOG2:.4f}; chain gap = {riemann_gap:.4f}"
    )
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
        np.testing.assert_allclose(
            f64(out["mse"][:, t]), ((eps_hat - f64(noise)) ** 2).reshape(8, -1).mean(1), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            f64(out["xstart_mse"][:, t]), ((f64(pm["pred_x0"]) - f64(x0)) ** 2).reshape(8, -1).mean(1), rtol=1e-5
        )


# --- bpd_estimate: the stratified estimate of the whole bound ---------------------------------
def _offset_x0_bound(T, c, x0):
    """Closed form of the bound for the x0-model x0 + c (fixed_small): every KL is (coef1_t c)^2 / (2 post_var_t)
    per dim, whatever the noise; L_0 is the decoder NLL of N(x0 + c, exp(plvc_0)); plus the prior."""
    r = vp64("linear", T)
    kl = (r["coef1"][1:] * c) ** 2 / (2.0 * r["post_var"][1:]) / LOG2  # bits/dim, same for every dim
    l0 = -np.mean(ref_log_probs(x0, x0 + c, 0.5 * r["plvc"][0])) / LOG2
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
    estimate = jax.jit(
        lambda k, n: D.bpd_estimate(sched, model_fn, x0, k, num_strata=n, parameterization="x0")["total_bpd"],
        static_argnums=1,
    )
    np.testing.assert_allclose(estimate(jax.random.PRNGKey(1), T - 1), exact, rtol=2e-4)  # one step per stratum
    parts = D.bpd_estimate(sched, model_fn, x0, jax.random.PRNGKey(1), num_strata=T - 1, parameterization="x0")
    np.testing.assert_allclose(parts["diffusion_bpd"], kl.sum(), rtol=2e-4)
    np.testing.assert_allclose(parts["prior_bpd"] + parts["decoder_bpd"], exact - kl.sum(), rtol=2e-4)
    # 5 strata of ~8 steps: each draw is off, the mean over draws is not (stratified sampling is unbiased).
    draws = np.array([estimate(jax.random.PRNGKey(k), 5)[0] for k in range(300)])
    assert draws.std() > 1e-3 * exact  # really random
    edges = np.unique(np.linspace(1, T, 6).round().astype(int))
    var = sum((e1 - e0) ** 2 * np.var(kl[e0 - 1 : e1 - 1]) for e0, e1 in zip(edges[:-1], edges[1:]))
    assert abs(draws.mean() - exact) < 4 * math.sqrt(var / len(draws)) + 1e-4 * exact

"""ddpm_jax.core.diffusion's likelihood terms against float64 SciPy: the Gaussian KL, the discretized
decoder p(x_0 | x_1), the per-step terms of the bound in bits/dim and the prior term."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from ddpm_jax.core import diffusion as D
from ddpm_jax.core import schedules as S

from helpers.diffusion_refs import (
    BIN_CENTRES,
    HALF_BIN,
    LOG2,
    SCHEDS,
    ErrorTable,
    b4,
    f64,
    ref_betas,
    ref_log_probs,
)

ERRORS = ErrorTable("likelihood")
record = ERRORS.record


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    ERRORS.print()


# On CPU, eager dispatch compiles every primitive at every new shape; for a function called once at
# one shape, a single jit compile is cheaper.
decoder_ll = jax.jit(D.discretized_gaussian_log_likelihood)
vb_terms = jax.jit(D.vb_terms_bpd)


# --- KL, decoder, bound terms -----------------------------------------------------------------


def test_normal_kl_equal_variances():
    rng = np.random.default_rng(8)
    mp, mq = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    logvar = rng.uniform(-6, 2, size=(3, 1)) * np.ones((3, 5))
    got = f64(
        D.normal_kl(
            jnp.asarray(mp, jnp.float32),
            jnp.asarray(logvar, jnp.float32),
            jnp.asarray(mq, jnp.float32),
            jnp.asarray(logvar, jnp.float32),
        )
    )
    # the lecture: D_KL = ||mu_q - mu_p||^2 / (2 sigma^2), elementwise here
    ref = (f64(np.float32(mp)) - f64(np.float32(mq))) ** 2 / (2 * np.exp(f64(np.float32(logvar))))
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), ref.sum(1), rtol=2e-6)
    record("normal_kl (equal variances)", got, ref)
    # KL(p || p) = 0 up to the float32 rounding of -1 + lv2 - lv1 + exp(0) (an ulp of 1).
    same = f64(
        D.normal_kl(mp.astype(np.float32), logvar.astype(np.float32), mp.astype(np.float32), logvar.astype(np.float32))
    )
    np.testing.assert_array_less(np.abs(same), 1.2e-7)


@pytest.mark.parametrize(
    "m1,lv1,m2,lv2",
    [
        (0.0, 0.0, 0.0, 0.0),
        (0.3, -1.0, -0.4, 0.5),
        (1.5, 1.2, 0.0, -2.0),
        (-2.0, -6.0, -1.9, -5.0),
        (0.1, -9.0, 0.1, -9.3),
    ],
)
def test_normal_kl_vs_numerical_integral(m1, lv1, m2, lv2):
    sd1 = math.exp(0.5 * lv1)
    p = lambda x: stats.norm.pdf(x, m1, sd1)  # noqa: E731
    sd2 = math.exp(0.5 * lv2)
    integrand = lambda x: p(x) * (stats.norm.logpdf(x, m1, sd1) - stats.norm.logpdf(x, m2, sd2))  # noqa: E731
    ref, _ = integrate.quad(integrand, m1 - 30 * sd1, m1 + 30 * sd1, epsabs=1e-13, epsrel=1e-12, limit=200)
    got = float(D.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    record("normal_kl (general, quad)", got, ref)


def test_discretized_decoder_sums_to_one_and_matches_scipy():
    means = np.array(
        [-1.0, -1.0 + 1.0 / 255, -0.999, -0.5, 0.0, 0.3, 0.98, 1.0 - 1.0 / 255, 1.0, 1.3, -1.6], np.float32
    )
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
    ref = ref_log_probs(f64(x), f64(Mb), f64(Lb))
    # The probabilities themselves, against SciPy's cdf differences: absolute (float32 log_ndtr,
    # exponentiated) ...
    p_ref = np.where(
        f64(x) < -0.999,
        stats.norm.cdf((f64(x) + HALF_BIN - f64(Mb)) / np.exp(f64(Lb))),
        np.where(
            f64(x) > 0.999,
            stats.norm.sf((f64(x) - HALF_BIN - f64(Mb)) / np.exp(f64(Lb))),
            stats.norm.cdf((f64(x) + HALF_BIN - f64(Mb)) / np.exp(f64(Lb)))
            - stats.norm.cdf((f64(x) - HALF_BIN - f64(Mb)) / np.exp(f64(Lb))),
        ),
    )
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
    on_bin = f64(
        decoder_ll(jnp.asarray(BIN_CENTRES), jnp.asarray(BIN_CENTRES), jnp.full(256, np.log(1e-4), jnp.float32))
    )
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
    nll = -ref_log_probs(f64(x0), f64(mm), 0.5 * f64(mlv))
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
        vals["linear_fixed_range"].append(
            check(
                S.make_schedule("linear", T, beta_start=1e-4, beta_end=0.02),
                ref_prior(abar),
                "linear (fixed 1e-4..0.02)",
            )
        )
        vals["cosine"].append(
            check(S.make_schedule("cosine", T), ref_prior(np.cumprod(1 - ref_betas("cosine", T))[-1]), "cosine")
        )
        vals["linear"].append(
            check(
                S.make_schedule("linear", T), ref_prior(np.cumprod(1 - ref_betas("linear", T))[-1]), "linear (1000/T)"
            )
        )
    for key in ("linear_fixed_range", "cosine"):
        assert np.all(np.diff(vals[key]) < 0), (key, vals[key])
    assert vals["linear_fixed_range"][-1] < 1e-7 and vals["cosine"][-1] < 1e-8
    # The rescaled linear schedule keeps sum(beta) ~ 10.05, so abar_T -> exp(-10.05) ~ 4.3e-5 and the
    # prior term does NOT go to 0 with T; it stays ~ 0.5 abar_T E[x0^2] / log 2 < 1e-4 bits/dim.
    assert max(vals["linear"]) < 1e-4
    # VE: N(x0, sigma_max^2) against N(0, 1 + sigma_max^2)
    sched = S.make_schedule("ve", 20, sigma_min=0.01, sigma_max=50.0)
    check(sched, ref_prior(2500.0, prior_var=2501.0, signal=1.0), "ve")

"""ddpm_jax.core.vdm (continuous-time VDM) against float64 NumPy / SciPy references and exact bounds.

The key check: for sklearn's digits, the independent-pixel histogram's exact Bayes denoiser plugged
into bound_bpd gives the histogram's own test NLL, up to the bound's known slack (the 256-bin
decoder and the N(0, I) prior; see `_elbo_gap_nats`). Everything runs without a network.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from ddpm_jax.core import vdm
from ddpm_jax.data.digits_builder import digits_split_indices, digits_uint8
from ddpm_jax.models.learned_schedule import MonotoneGamma

G0, G1 = vdm.GAMMA_MIN, vdm.GAMMA_MAX
V = np.arange(256) / 127.5 - 1.0  # float64 bin values
LINEAR = vdm.FixedLinearGamma(G0, G1)


def linear_gamma(t):
    return LINEAR.apply({}, t)


def wavy_np(t):
    """A nonlinear monotone gamma (float64 NumPy); gamma' = (G1 - G0)(1 + 0.5 cos 2 pi t) > 0."""
    return G0 + (G1 - G0) * (t + 0.5 * np.sin(2 * np.pi * t) / (2 * np.pi))


def wavy(t):
    return G0 + (G1 - G0) * (t + 0.5 * jnp.sin(2 * jnp.pi * t) / (2 * jnp.pi))


def np_sigmoid(x):
    return special.expit(x)


# --- closed forms ---------------------------------------------------------------------------


def test_prior_loss_matches_float64():
    rng = np.random.default_rng(0)
    x = V[rng.integers(0, 256, (5, 4, 4, 3))]
    g1 = np.array([-2.0, 0.0, 3.0, 5.0, 12.0])
    a2, s2 = np_sigmoid(-g1)[:, None], np_sigmoid(g1)[:, None]
    xf = x.reshape(5, -1)
    ref = 0.5 * np.sum(s2 + a2 * xf**2 - 1.0 - np.log(s2), axis=1)
    got = vdm.prior_loss(jnp.asarray(g1, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_recon_loss_matches_float64():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (6, 3, 3, 2))
    k[0, 0, 0] = [0, 255]  # both edge bins
    x, eps = V[k], rng.standard_normal(k.shape)
    g0 = np.array([-13.3, -11.0, -9.0, -7.0, -5.0, -2.0])
    a, s = np.sqrt(np_sigmoid(-g0)), np.sqrt(np_sigmoid(g0))
    bc = (slice(None),) + (None,) * 4
    z0 = a[bc] * x[..., None] + s[bc] * eps[..., None]
    logits = -0.5 * (z0 - a[bc] * V) ** 2 / s[bc] ** 2  # log q(z_0 | x = v_k) + const
    log_p = np.take_along_axis(logits, k[..., None], -1)[..., 0] - special.logsumexp(logits, axis=-1)
    ref = -log_p.reshape(6, -1).sum(1)
    got = vdm.recon_loss(jnp.asarray(g0, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-5)


def test_diffusion_loss_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, eps = V[rng.integers(0, 256, (4, 3, 3, 1))], rng.standard_normal((4, 3, 3, 1))
    t = np.array([0.0, 0.13, 0.5, 0.97])
    h = 1e-6
    dg = (wavy_np(t + h) - wavy_np(t - h)) / (2 * h)
    g = wavy_np(t)[:, None, None, None]
    z = np.sqrt(np_sigmoid(-g)) * x + np.sqrt(np_sigmoid(g)) * eps
    eps_hat = 0.5 * z + np.cos(3 * t)[:, None, None, None]
    ref = 0.5 * dg * np.sum((eps - eps_hat) ** 2, axis=(1, 2, 3))

    def eps_fn(z, t):
        return 0.5 * z + jnp.cos(3 * t)[:, None, None, None]

    f = jax.jit(lambda x, t, e: vdm.diffusion_loss(wavy, eps_fn, x, t, e))
    got = f(*(jnp.asarray(a, jnp.float32) for a in (x, t, eps)))
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_low_discrepancy_t_stratified_and_uniform():
    batch = 16
    t = np.asarray(vdm.low_discrepancy_t(jax.random.PRNGKey(0), batch))
    assert t.shape == (batch,) and np.all((t >= 0) & (t < 1))
    np.testing.assert_array_equal(np.sort(np.floor(t * batch)), np.arange(batch))  # one per stratum
    keys = jax.random.split(jax.random.PRNGKey(1), 2000)
    ts = np.asarray(jax.vmap(lambda k: vdm.low_discrepancy_t(k, batch))(keys))
    for i in (0, 5):  # each t_i is marginally U(0, 1)
        assert stats.kstest(ts[:, i], "uniform").pvalue > 1e-3


def test_fourier_features_values():
    z = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 3, 2), minval=-1, maxval=1)
    f = np.asarray(vdm.fourier_features(z, 3, 7))
    assert f.shape == (2, 3, 3, 2 * 2 * 5)
    zn = np.asarray(z, np.float64)
    for c in range(2):
        for j, n in enumerate(range(3, 8)):
            arg = 2 * np.pi * 2.0**n * zn[..., c]
            np.testing.assert_allclose(f[..., c * 5 + j], np.sin(arg), atol=2e-4)
            np.testing.assert_allclose(f[..., 10 + c * 5 + j], np.cos(arg), atol=2e-4)
    # n = 3: period 1/8, the spacing of 17 grey levels on [-1, 1]: all levels get the same features.
    levels = jnp.asarray(np.linspace(-1, 1, 17), jnp.float32)[:, None]
    np.testing.assert_allclose(vdm.fourier_features(levels, 3, 3), np.tile([0.0, 1.0], (17, 1)), atol=1e-5)


# --- the continuous diffusion loss with an exact denoiser --------------------------------------


def _gauss_product_rule(num_t: int, num_eps: int):
    """Nodes and weights of E_{t ~ U(0, 1), eps ~ N(0, 1)}: Gauss-Legendre on [0, 1] x Gauss-Hermite."""
    u, w_t = np.polynomial.legendre.leggauss(num_t)
    e, w_e = np.polynomial.hermite_e.hermegauss(num_eps)
    t, eps = np.meshgrid(0.5 * (u + 1.0), e, indexing="ij")
    return t.ravel(), eps.ravel(), np.outer(0.5 * w_t, w_e / w_e.sum()).ravel()


def test_diffusion_loss_gaussian_data_closed_form_and_schedule_invariance():
    """For Gaussian data N(m, s^2) the Bayes eps_hat is linear in z_t and, per dim,
    E_eps[(eps - eps_hat)^2 | x] = (1 - r)^2 + r^2 SNR (x - m)^2 with r = 1 / (1 + SNR s^2).
    The loss is 0.5 * that integrated over gamma from gamma(0) to gamma(1) whatever the schedule
    in between (VDM's invariance to the schedule): checked with a learned MonotoneGamma and the
    strongly nonlinear `wavy`. No Monte Carlo: the expectation over t and eps is taken by quadrature
    (the loss is quadratic in eps, so 3 Hermite nodes are exact; 64 Legendre nodes in t leave ~1e-6),
    so a 1% error in the loss is 100 times the tolerance."""
    m, s = 0.1, 0.5
    mono = MonotoneGamma(G0, G1, hidden=8)
    params = mono.init(jax.random.PRNGKey(3), jnp.zeros((1,)))

    def learned(t):
        return mono.apply(params, t)

    x = np.array([-1.0, -0.3, 0.1, 0.9])  # one dim per example
    t, eps, w = _gauss_product_rule(64, 3)
    x0 = jnp.asarray(np.repeat(x, t.size), jnp.float32).reshape(-1, 1, 1, 1)
    t_all = jnp.asarray(np.tile(t, len(x)), jnp.float32)
    eps_all = jnp.asarray(np.tile(eps, len(x)), jnp.float32).reshape(x0.shape)
    for gamma_fn in (learned, wavy):

        def eps_fn(z, t, gamma_fn=gamma_fn):
            g = gamma_fn(t)[:, None, None, None]
            a, sig = jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))
            x_mean = m + a * s**2 / (a**2 * s**2 + sig**2) * (z - a * m)
            return (z - a * x_mean) / sig

        loss = jax.jit(lambda t, e, g=gamma_fn, f=eps_fn: vdm.diffusion_loss(g, f, x0, t, e))(t_all, eps_all)
        got = np.asarray(loss, np.float64).reshape(len(x), t.size) @ w
        g_ends = np.asarray(gamma_fn(jnp.array([0.0, 1.0])), np.float64)
        np.testing.assert_allclose(g_ends, [G0, G1], atol=1e-4)

        def integrand(g, xi):
            snr = np.exp(-g)
            r = 1.0 / (1.0 + snr * s**2)
            return 0.5 * ((1 - r) ** 2 + r**2 * snr * (xi - m) ** 2)

        exact = np.array([integrate.quad(integrand, *g_ends, args=(xi,), limit=200)[0] for xi in x])
        np.testing.assert_allclose(got, exact, rtol=1e-4, err_msg=gamma_fn.__name__)


def test_bayes_eps_fn_matches_float64_posterior():
    rng = np.random.default_rng(5)
    probs = np.zeros((2, 2, 1, 256))
    for idx in np.ndindex(2, 2, 1):  # a few random bins per pixel, random weights
        probs[idx][rng.choice(256, 5, replace=False)] = rng.dirichlet(np.ones(5))
    t = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    g = (G0 + (G1 - G0) * t)[:, None, None, None, None]
    a, s = np.sqrt(np_sigmoid(-g)), np.sqrt(np_sigmoid(g))
    z = rng.standard_normal((5, 2, 2, 1))
    eps_k = (z[..., None] - a * V) / s  # [5, 2, 2, 1, 256]
    with np.errstate(divide="ignore"):
        log_post = np.log(probs) - 0.5 * eps_k**2
    post = special.softmax(log_post, axis=-1)
    ref = np.sum(post * eps_k, -1)
    np.testing.assert_allclose(ref, (z - a[..., 0] * np.sum(post * V, -1)) / s[..., 0], atol=1e-8)
    eps_fn = vdm.bayes_eps_fn_for_histogram(probs, linear_gamma)
    got = eps_fn(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


# --- the key check: digits histogram -------------------------------------------------------


def _digits_histogram():
    """Train-split histogram per pixel over 256 values, +0.1 counts on the 17 grey levels."""
    images, _ = digits_uint8()
    split = digits_split_indices()
    train = images[split["train"]].astype(np.int64)
    test = images[split["test"]].astype(np.int64)
    counts = (train[..., None] == np.arange(256)).sum(0).astype(np.float64)  # [8, 8, 1, 256]
    levels = np.unique(images)  # the data's support: round(k * 255 / 16), k = 0..16
    counts[..., levels] += 0.1  # some test values never occur at that pixel in train
    return counts / counts.sum(-1, keepdims=True), test, levels


def _elbo_gap_nats(probs, levels, gamma_0, gamma_1, n=1001):
    """Expected bound - NLL per (pixel, level) [8, 8, 1, L] (nats), float64.

    With the exact score of the data q, the reverse chain matches q's, the chain-rule terms
    telescope and -ELBO(x) = -log q(x) + E_{z_0|x}[log q(x|z_0) - log p(x|z_0)]
    + E_{z_1|x}[log q(z_1) - log N(z_1; 0, 1)]: the decoder's and the prior's mismatch only.
    Both are 1-D per pixel; integrated over eps ~ N(0, 1) on a fine grid.
    """
    eps = np.linspace(-9, 9, n)
    w = stats.norm.pdf(eps) * (eps[1] - eps[0])
    vl = V[levels]
    a0, s0 = math.sqrt(np_sigmoid(-gamma_0)), math.sqrt(np_sigmoid(gamma_0))
    a1, s1 = math.sqrt(np_sigmoid(-gamma_1)), math.sqrt(np_sigmoid(gamma_1))

    # log p(x = v | z_0), the model's decoder: softmax of log q(z_0 | v_k) over all 256 bins.
    z0 = a0 * vl[:, None] + s0 * eps  # [L, n]
    log_q0 = -0.5 * ((z0[..., None] - a0 * V) / s0) ** 2  # [L, n, 256], log q(z_0 | v_k) + const
    diag = np.arange(len(levels))
    log_dec = log_q0[diag, :, levels] - special.logsumexp(log_q0, axis=-1)  # [L, n]
    log_q0 = log_q0[..., levels]  # the data's support only, for the true posterior
    z1 = a1 * vl[:, None] + s1 * eps
    log_q1 = -0.5 * ((z1[..., None] - a1 * vl) / s1) ** 2 - math.log(s1 * math.sqrt(2 * math.pi))

    log_p = np.log(probs[..., levels]).reshape(-1, len(levels))  # [pixels, L], all > 0
    gap = np.empty_like(log_p)
    for j, lp in enumerate(log_p):
        post = lp + log_q0  # log q(x = v_k, z_0) + const, [L, n, L]
        log_post = post[diag, :, diag] - special.logsumexp(post, axis=-1)  # log q(x | z_0)
        prior = special.logsumexp(lp + log_q1, axis=-1) - stats.norm.logpdf(z1)  # log q(z_1)/N(z_1)
        gap[j] = np.sum((log_post - log_dec + prior) * w, axis=-1)
    return gap.reshape(probs.shape[:-1] + (len(levels),))


@pytest.fixture(scope="module")
def digits():
    """Test images [297, 8, 8, 1] (uint8 values), their histogram, direct NLL and predicted slack."""
    probs, test, levels = _digits_histogram()
    n, dims = test.shape[0], 64
    pix = np.indices(test.shape[1:])
    nll_nats = -np.log(probs[pix[0], pix[1], pix[2], test]).reshape(n, -1).sum(1)
    gap_table = _elbo_gap_nats(probs, levels, G0, G1)  # [8, 8, 1, L]
    gap_nats = gap_table[pix[0], pix[1], pix[2], np.searchsorted(levels, test)].reshape(n, -1).sum(1)
    to_bpd = 1.0 / (dims * math.log(2))
    return dict(
        probs=probs, x0=jnp.asarray(test / 127.5 - 1.0, jnp.float32), nll=nll_nats * to_bpd, gap=gap_nats * to_bpd
    )


def test_bound_of_exact_denoiser_equals_histogram_nll(digits):
    nll, gap = digits["nll"], digits["gap"]
    eps_fn = vdm.bayes_eps_fn_for_histogram(digits["probs"], linear_gamma)
    bound = jax.jit(lambda x, r: vdm.bound_bpd(linear_gamma, eps_fn, x, r, num_t=768))(
        digits["x0"], jax.random.PRNGKey(0)
    )
    bound = {k: np.asarray(v, np.float64) for k, v in bound.items()}
    total, n = bound["total_bpd"], len(nll)
    np.testing.assert_allclose(total, bound["recon_bpd"] + bound["diffusion_bpd"] + bound["prior_bpd"], rtol=1e-6)

    # The check: the mean bound equals the mean direct NLL within 3 standard errors.
    se = total.std(ddof=1) / math.sqrt(n)
    print(
        f"\n[vdm digits] direct NLL {nll.mean():.4f} bpd; bound {total.mean():.4f} +- {se:.4f} "
        f"(recon {bound['recon_bpd'].mean():.4f}, diffusion {bound['diffusion_bpd'].mean():.4f}, "
        f"prior {bound['prior_bpd'].mean():.4f})"
    )
    assert 2.40 < nll.mean() < 2.47
    assert abs(total.mean() - nll.mean()) < 3 * se

    # Sharper, paired: bound_i - NLL_i equals the known slack of the exact-score model.
    d = total - nll - gap
    se_d = d.std(ddof=1) / math.sqrt(n)
    print(
        f"[vdm digits] predicted slack {gap.mean():.4f} bpd; bound - NLL - slack {d.mean():+.4f} +- {se_d:.4f} (paired)"
    )
    assert abs(d.mean()) < 3 * se_d + 1e-4
    assert se_d < 0.005


def test_training_loss_is_the_bound_with_one_t_per_example(digits):
    eps_fn = vdm.bayes_eps_fn_for_histogram(digits["probs"], linear_gamma)
    out = jax.jit(lambda x, r: vdm.training_loss(linear_gamma, eps_fn, x, r))(digits["x0"], jax.random.PRNGKey(1))
    out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    assert set(out) == {"total_bpd", "recon_bpd", "diffusion_bpd", "prior_bpd"}
    d = out["total_bpd"] - digits["nll"] - digits["gap"]
    assert abs(d.mean()) < 3 * d.std(ddof=1) / math.sqrt(len(d)) + 1e-4


# --- sampling -------------------------------------------------------------------------------


def test_sample_loop_two_value_histogram_proportions():
    lo, hi, p_hi = 64, 192, 0.75
    probs = np.zeros((4, 4, 1, 256))
    probs[..., lo], probs[..., hi] = 1 - p_hi, p_hi
    eps_fn = vdm.bayes_eps_fn_for_histogram(probs, linear_gamma)
    shape = (256, 4, 4, 1)
    sample = jax.jit(lambda r: vdm.sample_loop(linear_gamma, eps_fn, shape, r, num_steps=200))
    x = np.asarray(sample(jax.random.PRNGKey(0))["samples"], np.float64)
    assert x.shape == shape
    k = np.round((x + 1) * 127.5)
    np.testing.assert_allclose(x, k / 127.5 - 1, atol=1e-6)  # on the grid
    near = np.minimum(abs(k - lo), abs(k - hi))
    assert np.mean(near == 0) > 0.99 and near.max() <= 1  # exact, bar the decoder's rare off-by-one
    frac_hi = np.mean(k > 127.5)
    assert abs(frac_hi - p_hi) < 4 * math.sqrt(p_hi * (1 - p_hi) / k.size), frac_hi
    # Same key, same samples; clipping x_hat changes nothing for data inside [-1, 1].
    x_clip = vdm.sample_loop(linear_gamma, eps_fn, shape, jax.random.PRNGKey(0), num_steps=200, clip_denoised=True)[
        "samples"
    ]
    assert np.mean(np.asarray(x_clip) == x) > 0.99


def test_vdm_score_net_wrapper_feeds_features_and_scaled_t():
    from ddpm_jax.models.vdm_net import VDMScoreNet

    class Probe(nn.Module):  # records its inputs; outputs C channels
        @nn.compact
        def __call__(self, h, t, train):
            self.sow("intermediates", "inputs", (h, t))
            return nn.Conv(1, (1, 1))(h) + t[:, None, None, None]

    net = VDMScoreNet(Probe(), n_min=3, n_max=7)
    z, t = jnp.linspace(-1, 1, 2 * 16).reshape(2, 4, 4, 1), jnp.array([0.25, 0.5])
    params = net.init(jax.random.PRNGKey(0), z, t)
    out, state = net.apply(params, z, t, mutable="intermediates")
    h, t_in = state["intermediates"]["network"]["inputs"][0]
    assert out.shape == z.shape and h.shape == (2, 4, 4, 1 + 10)
    np.testing.assert_allclose(h[..., 1:], vdm.fourier_features(z), atol=1e-6)
    np.testing.assert_allclose(t_in, 1000.0 * t)
    eps_fn = lambda z, t: net.apply(params, z, t)  # noqa: E731  plugs into the bound
    out = vdm.bound_bpd(linear_gamma, eps_fn, jnp.zeros((2, 4, 4, 1)), jax.random.PRNGKey(1), num_t=2)
    assert all(np.all(np.isfinite(v)) for v in out.values())


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_sample_loop_gaussian_data_matches_exact_chain(eta):
    """For data N(m, s^2) the Bayes x_hat is linear in z_t, so each sampler step is
    z_s = P z_t + Q + sqrt(v) noise and z_0 / alpha_0 is Gaussian with moments from an exact float64
    recursion, for any number of steps (here a coarse 8, where errors show). eta = 1 is written as the
    posterior q(z_s | z_t, x_hat) (mean and variance of Ho et al. eq. 7), eta < 1 as DDIM's
    z_s = alpha_s x_hat + sqrt(sigma_s^2 - v) eps_hat + sqrt(v) noise, v = eta^2 sigma_s^2 c."""
    m, s, steps = 0.1, 0.2, 8

    def gamma_np(t):
        return G0 + (G1 - G0) * t

    def eps_fn(z, t):
        g = linear_gamma(t)[:, None, None, None]
        a, sig = jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))
        return (z - a * (m + a * s**2 / (a**2 * s**2 + sig**2) * (z - a * m))) / sig

    def moments(steps, eta, start=(0.0, 1.0)):
        mu, var = start
        for i in range(steps - 1, -1, -1):
            gt, gs = gamma_np((i + 1) / steps), gamma_np(i / steps)
            at, st = math.sqrt(np_sigmoid(-gt)), math.sqrt(np_sigmoid(gt))
            as_, ss = math.sqrt(np_sigmoid(-gs)), math.sqrt(np_sigmoid(gs))
            c = -math.expm1(gs - gt)
            k = at * s**2 / (at**2 * s**2 + st**2)  # x_hat = m + k (z - at m)
            if eta == 1.0:  # the posterior's mean and variance
                p, q, v = as_ / at * (1 - c) + as_ * c * k, as_ * c * (m - k * at * m), ss**2 * c
            else:  # x_hat = k z + (m - k at m); eps_hat = (z - at x_hat) / st
                v = eta**2 * ss**2 * c
                w = math.sqrt(ss**2 - v)
                p = as_ * k + w * (1 - at * k) / st
                q = (as_ - w * at / st) * (m - k * at * m)
            mu, var = p * mu + q, p**2 * var + v
        a0 = math.sqrt(np_sigmoid(-gamma_np(0.0)))
        return mu / a0, var / a0**2

    mu, var = moments(steps, eta)
    a1, s1 = math.sqrt(np_sigmoid(-G1)), math.sqrt(np_sigmoid(G1))
    mu_fine, var_fine = moments(2000, eta, start=(a1 * m, a1**2 * s**2 + s1**2))  # z_1 from q, not N(0, I)
    assert abs(mu_fine - m) < 1e-3 and abs(var_fine / s**2 - 1) < 1e-2  # the chain converges to the data
    x = np.asarray(
        vdm.sample_loop(linear_gamma, eps_fn, (512, 4, 4, 1), jax.random.PRNGKey(2), num_steps=steps, eta=eta)[
            "samples"
        ],
        np.float64,
    ).ravel()
    n = x.size
    assert abs(x.mean() - mu) < 4 * math.sqrt(var / n)
    assert abs(x.var() / var - 1) < 4 * math.sqrt(2 / n)
    if eta != 1.0:  # the coarse chain's moments differ between samplers by more than the test's resolution
        mu_1, var_1 = moments(steps, 1.0)
        assert abs(var_1 / var - 1) > 8 * math.sqrt(2 / n) or abs(mu_1 - mu) > 8 * math.sqrt(var / n)

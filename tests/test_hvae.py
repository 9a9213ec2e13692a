"""The hierarchical VAE (ddpm_jax.core.hvae, ddpm_jax.models.hvae, the "hvae" method) against float64
NumPy / SciPy references and an exactly solvable linear-Gaussian hierarchy.

The references are written from the lecture's Markovian HVAE (shared/seeds/000_*.txt) and the
Gaussian formulas, never by calling the library's maths: the KL of two diagonal Gaussians in its
trace / log-det form, the whole negative ELBO of the network recomputed in float64 from its pieces,
and the exact -log p(x) and KL(q(z|x) || p(z|x)) of a linear-Gaussian chain by Gaussian conditioning.
Tiny MLPs only (no UNet).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special, stats

from ddpm_jax import methods
from ddpm_jax.configs import hvae as hvae_config
from ddpm_jax.core import hvae as H
from ddpm_jax.core import vae as V
from ddpm_jax.errors import ConfigError
from ddpm_jax.models.hvae import create_hvae, hvae_latent_shape_of
from ddpm_jax.models.vae import create_vae
from ddpm_jax.training import distributed, train_lib, validation

LOG2 = math.log(2.0)
HALF_BIN = 1.0 / 255.0


def _model_config(**kw) -> ml_collections.ConfigDict:
    c = dict(num_levels=2, latent_dim=3, hidden=8, num_hidden_layers=1, dtype="float32")
    c.update(kw)
    return ml_collections.ConfigDict(c)


def _bin_centres(rng: np.random.Generator, shape) -> np.ndarray:
    k = rng.integers(0, 256, size=shape)
    k.flat[0], k.flat[1] = 0, 255
    return (-1.0 + 2.0 * k / 255.0).astype(np.float32)


def _scaled(params, factor: float):
    """Every output layer's kernel scaled up: conditionals away from N(0, I), so no check is vacuous."""

    def scale(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        return leaf * factor if names[-1] == "kernel" and names[-2] in ("out", "encoder_out", "decoder_out") else leaf

    return jax.tree_util.tree_map_with_path(scale, params)


# --- float64 references -------------------------------------------------------------------------


def ref_kl(m1, lv1, m2, lv2) -> np.ndarray:
    """KL(N(m1, S1) || N(m2, S2)) = 0.5 (tr S2^-1 S1 + d^T S2^-1 d - k + log det S2 - log det S1), per row."""
    out = []
    for a, la, b, lb in zip(*(np.asarray(v, np.float64) for v in (m1, lv1, m2, lv2))):
        s1, s2 = np.diag(np.exp(la)), np.diag(np.exp(lb))
        s2_inv, d = np.linalg.inv(s2), b - a
        out.append(
            0.5
            * (np.trace(s2_inv @ s1) + d @ s2_inv @ d - a.size + np.linalg.slogdet(s2)[1] - np.linalg.slogdet(s1)[1])
        )
    return np.array(out)


def ref_discretized_log_prob(x, means, log_scales) -> np.ndarray:
    """log P(bin of x) under N(means, exp(log_scales)^2), edge bins open: differences of the normal
    cdf Phi = scipy.special.ndtr, taken in the tail where both terms are small (no cancellation)."""
    x, mu, s = (np.asarray(a, np.float64) for a in (x, means, np.exp(log_scales)))
    upper, lower = (x - mu + HALF_BIN) / s, (x - mu - HALF_BIN) / s
    inner = np.where(
        lower + upper > 0, special.ndtr(-lower) - special.ndtr(-upper), special.ndtr(upper) - special.ndtr(lower)
    )
    p = np.where(x < -0.999, special.ndtr(upper), np.where(x > 0.999, special.ndtr(-lower), inner))
    return np.log(p)


def ref_logpdf(z, mean, logvar) -> np.ndarray:
    z, mean, logvar = (np.asarray(a, np.float64) for a in (z, mean, logvar))
    return stats.norm.logpdf(z, mean, np.exp(0.5 * logvar)).sum(-1)


# The decoder's log-scale floor, log(half bin / 4) (ddpm_jax.models.vae.LOG_SCALE_MIN).
LOG_SCALE_FLOOR = math.log(HALF_BIN / 4.0)


def _dense64(p, h):
    return h @ p["kernel"] + p["bias"]


def _gaussian_mlp64(p, h):
    """A conditional Gaussian's (mean, logvar): swish hidden layers, one output layer split in two."""
    for i in range(sum(name.startswith("hidden_") for name in p)):
        h = _dense64(p[f"hidden_{i}"], h)
        h = h * special.expit(h)  # swish
    return np.split(_dense64(p["out"], h), 2, axis=-1)


def ref_negative_elbo_bpd(params, x, noise) -> dict:
    """The Markovian HVAE's -ELBO per example in bits/dim, float64 NumPy from the parameters alone.

    -log p(x | z_1) + sum_{l<L} [log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})] + KL(q(z_L | z_{L-1}) || N(0, I))
    at z_l = mean + sigma * noise_l (noise [B, L * k], level l in columns [(l-1) k, l k)). A parameter
    may carry extra leading axes [P, 1, ...] (P variants of it): every result then has them too.
    """
    vae = params["vae"]
    num_levels = 1 + sum(name.startswith("posterior_") for name in params)
    k = vae["encoder_out"]["kernel"].shape[-1] // 2
    batch, dims = x.shape[0], x[0].size
    eps = noise.reshape(batch, num_levels, k)

    def net(prefix):  # the VAE's encoder or decoder as a GaussianMLP-like dict
        hidden = {
            f"hidden_{n[len(prefix) + 1 :]}": vae[n] for n in vae if n.startswith(prefix + "_") and "out" not in n
        }
        return {**hidden, "out": vae[prefix + "_out"]}

    q = [_gaussian_mlp64(net("encoder"), x.reshape(batch, -1))]
    zs = [q[0][0] + np.exp(0.5 * q[0][1]) * eps[:, 0]]
    for level in range(2, num_levels + 1):
        q.append(_gaussian_mlp64(params[f"posterior_{level}"], zs[-1]))
        zs.append(q[-1][0] + np.exp(0.5 * q[-1][1]) * eps[:, level - 1])
    decoder = net("decoder")
    h = zs[0]
    for i in range(len(decoder) - 1):
        h = _dense64(decoder[f"hidden_{i}"], h)
        h = h * special.expit(h)
    means = np.tanh(_dense64(decoder["out"], h))
    means = means.reshape(means.shape[:-1] + x.shape[1:])
    log_scales = LOG_SCALE_FLOOR + np.logaddexp(0.0, vae["log_scale"] - LOG_SCALE_FLOOR) + 0.0 * means
    to_bpd = 1.0 / (dims * LOG2)
    out = {"recon_bpd": -ref_discretized_log_prob(x, means, log_scales).sum(axis=(-3, -2, -1)) * to_bpd}
    for level in range(1, num_levels):
        p_mean, p_logvar = _gaussian_mlp64(params[f"prior_{level}"], zs[level])
        (m, lv), z = q[level - 1], zs[level - 1]
        out[f"kl_{level}_bpd"] = (ref_logpdf(z, m, lv) - ref_logpdf(z, p_mean, p_logvar)) * to_bpd
    m, lv = q[-1]
    out[f"kl_{num_levels}_bpd"] = 0.5 * np.sum(m**2 + np.exp(lv) - lv - 1.0, axis=-1) * to_bpd
    out["loss"] = sum(out.values())
    return out


def ref_gradient(fn, params, h: float = 1e-6):
    """Central differences of fn(params) -> [..., B] (float64, averaged over B) in every parameter:
    a tree like params. Each leaf's 2n shifted copies go through fn at once, as a leading axis."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    grads = []
    for j, leaf in enumerate(leaves):
        shifts = h * np.eye(leaf.size).reshape((leaf.size, 1) + leaf.shape)
        stacked = leaves[:j] + [np.concatenate([leaf + shifts, leaf - shifts])] + leaves[j + 1 :]
        f = fn(jax.tree_util.tree_unflatten(tree, stacked)).mean(-1).ravel()
        grads.append(((f[: leaf.size] - f[leaf.size :]) / (2 * h)).reshape(leaf.shape))
    return jax.tree_util.tree_unflatten(tree, grads)


# --- the Gaussian pieces ------------------------------------------------------------------------


def test_gaussian_kl_and_log_prob_match_float64():
    rng = np.random.default_rng(0)
    m1, m2 = (rng.normal(size=(6, 5)).astype(np.float32) * 2.0 for _ in range(2))
    lv1, lv2 = (rng.uniform(-3.0, 2.0, size=(6, 5)).astype(np.float32) for _ in range(2))
    got = np.asarray(jax.jit(H.gaussian_kl)(m1, lv1, m2, lv2))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, ref_kl(m1, lv1, m2, lv2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(H.gaussian_kl(m1, lv1, m1, lv1), 0.0, atol=1e-6)
    # Against N(0, I) it is the VAE's KL.
    np.testing.assert_allclose(H.gaussian_kl(m1, lv1, 0 * m1, 0 * lv1), V.gaussian_kl_standard(m1, lv1), rtol=1e-6)

    z = rng.normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(H.gaussian_log_prob(z, m1, lv1), ref_logpdf(z, m1, lv1), rtol=1e-5)
    eps = rng.normal(size=(6, 5)).astype(np.float32)
    draw = m1 + np.exp(0.5 * lv1) * eps
    np.testing.assert_allclose(H.gaussian_log_prob_of_draw(lv1, eps), ref_logpdf(draw, m1, lv1), rtol=1e-5)


def test_single_sample_kl_estimate_is_unbiased():
    """The lower levels' estimate log q(z) - log p(z), z ~ q: its Monte Carlo mean is the closed form."""
    m1, lv1 = jnp.array([0.7, -1.2, 0.1]), jnp.array([-1.0, 0.5, 0.0])
    m2, lv2 = jnp.array([0.2, -0.4, 1.0]), jnp.array([0.3, -0.5, 0.8])
    eps = jax.random.normal(jax.random.PRNGKey(0), (200_000, 3))
    z = m1 + jnp.exp(0.5 * lv1) * eps
    est = np.asarray(H.gaussian_log_prob_of_draw(lv1, eps) - H.gaussian_log_prob(z, m2, lv2), np.float64)
    mc, se = est.mean(), est.std(ddof=1) / math.sqrt(est.size)
    exact = float(ref_kl(m1[None], lv1[None], m2[None], lv2[None])[0])
    assert exact > 0.3
    assert abs(mc - exact) < 4.0 * se, (mc, exact, se)


# --- an exactly solvable hierarchy: linear-Gaussian chains ---------------------------------------


def _chain_moments(first_mean, first_var, gains, offsets, variances):
    """Mean [L] and covariance [L, L] of w_1 = first, w_j = gains[j] w_{j-1} + offsets[j] + N(0, variances[j])."""
    n = len(gains) + 1
    coef, const = np.zeros((n, n)), np.zeros(n)  # w = coef @ u + const, u ~ N(0, I_n)
    coef[0, 0], const[0] = math.sqrt(first_var), first_mean
    for j in range(1, n):
        coef[j] = gains[j - 1] * coef[j - 1]
        coef[j, j] = math.sqrt(variances[j - 1])
        const[j] = gains[j - 1] * const[j - 1] + offsets[j - 1]
    return const, coef @ coef.T


def _gauss_kl_full(m1, s1, m2, s2):
    s2_inv = np.linalg.inv(s2)
    d = m2 - m1
    return 0.5 * (
        np.trace(s2_inv @ s1) + d @ s2_inv @ d - len(m1) + np.linalg.slogdet(s2)[1] - np.linalg.slogdet(s1)[1]
    )


class LinearChain:
    """One latent dim of p(z_L) = N(0, 1), p(z_l | z_{l+1}) = N(a_l z_{l+1} + b_l, v_l), p(x | z_1) = N(c z_1 + d, v0)."""

    def __init__(self, a, b, v, c, d, v0):
        self.a, self.b, self.v, self.c, self.d, self.v0 = a, b, v, c, d, v0  # a, b, v indexed by l - 1
        self.L = len(a) + 1
        # The generative chain top-down, then x: w = (z_L, ..., z_1, x).
        mean, cov = _chain_moments(0.0, 1.0, list(a[::-1]) + [c], list(b[::-1]) + [d], list(v[::-1]) + [v0])
        order = list(range(self.L - 1, -1, -1)) + [self.L]  # -> (z_1, ..., z_L, x)
        self.mean, self.cov = mean[order], cov[np.ix_(order, order)]

    def nll(self, x) -> float:
        return -stats.norm.logpdf(x, self.mean[-1], math.sqrt(self.cov[-1, -1]))

    def posterior(self, x):
        """p(z_{1:L} | x): mean [L], covariance [L, L]."""
        mz, mx, szz, szx, sxx = self.mean[:-1], self.mean[-1], self.cov[:-1, :-1], self.cov[:-1, -1], self.cov[-1, -1]
        return mz + szx * (x - mx) / sxx, szz - np.outer(szx, szx) / sxx

    def markov_posterior_params(self, x):
        """The exact posterior as the bottom-up chain q(z_1 | x), q(z_l | z_{l-1}) = N(g z_{l-1} + h, t)."""
        m, s = self.posterior(x)
        g = [s[j, j - 1] / s[j - 1, j - 1] for j in range(1, self.L)]
        h = [m[j] - g[j - 1] * m[j - 1] for j in range(1, self.L)]
        t = [s[j, j] - s[j, j - 1] ** 2 / s[j - 1, j - 1] for j in range(1, self.L)]
        return m[0], s[0, 0], g, h, t


def _mc_negative_elbo(chains, x, q, num: int, key):
    """-ELBO draws [num] of the library's level_terms + a continuous Gaussian decoder, summed over dims."""
    num_levels = chains[0].L
    eps = jax.random.normal(key, (num, num_levels, len(chains)), jnp.float32)
    col = lambda vals: jnp.asarray(np.array(vals, np.float32))  # one value per latent dim  # noqa: E731
    q_means, q_logvars, zs = [], [], []
    for j in range(num_levels):
        if j == 0:
            mean = jnp.broadcast_to(col([qi[0] for qi in q]), (num, len(chains)))
            var = col([qi[1] for qi in q])
        else:
            mean = col([qi[2][j - 1] for qi in q]) * zs[-1] + col([qi[3][j - 1] for qi in q])
            var = col([qi[4][j - 1] for qi in q])
        logvar = jnp.broadcast_to(jnp.log(var), mean.shape)
        q_means.append(mean), q_logvars.append(logvar), zs.append(mean + jnp.exp(0.5 * logvar) * eps[:, j])
    p_means = [
        col([ch.a[j] for ch in chains]) * zs[j + 1] + col([ch.b[j] for ch in chains]) for j in range(num_levels - 1)
    ]
    p_logvars = [
        jnp.broadcast_to(jnp.log(col([ch.v[j] for ch in chains])), (num, len(chains))) for j in range(num_levels - 1)
    ]
    stack = lambda a: jnp.stack(a, axis=1)  # noqa: E731
    terms = H.level_terms(stack(q_means), stack(q_logvars), eps, stack(zs), stack(p_means), stack(p_logvars))
    assert terms.shape == (num, num_levels)
    dec_mean = col([ch.c for ch in chains]) * zs[0] + col([ch.d for ch in chains])
    recon = -H.gaussian_log_prob(col(x), dec_mean, jnp.log(col([ch.v0 for ch in chains])))
    return np.asarray(recon + terms.sum(axis=1), np.float64)


@pytest.mark.parametrize("num_levels", [2, 3])
def test_elbo_bounds_the_exact_nll_of_a_linear_gaussian_hierarchy(num_levels):
    """Two independent latent dims. With q the exact posterior, the -ELBO estimate's mean is -log p(x);
    with a perturbed q it is -log p(x) + KL(q(z|x) || p(z|x)) > -log p(x); within 4 standard errors."""
    params = [(0.9, 0.3, 0.4, 1.3, -0.2, 0.2), (-0.7, -0.5, 0.6, 0.8, 0.4, 0.5)]  # a, b, v, c, d, v0 per dim
    chains = [
        LinearChain(
            [a * (0.8 + 0.2 * j) for j in range(num_levels - 1)],
            [b] * (num_levels - 1),
            [v] * (num_levels - 1),
            c,
            d,
            v0,
        )
        for a, b, v, c, d, v0 in params
    ]
    x = [0.9, -1.1]
    nll = sum(ch.nll(xi) for ch, xi in zip(chains, x))

    exact_q = [ch.markov_posterior_params(xi) for ch, xi in zip(chains, x)]
    draws = _mc_negative_elbo(chains, x, exact_q, 200_000, jax.random.PRNGKey(1))
    mc, se = draws.mean(), draws.std(ddof=1) / math.sqrt(draws.size)
    assert abs(mc - nll) < 4.0 * se + 1e-4, (mc, nll, se)

    # A worse q: shifted and widened at every level.
    bad_q = [
        (m + 0.5, s * 1.8, [gi * 0.5 for gi in g], [hi - 0.3 for hi in h], [ti * 0.5 for ti in t])
        for m, s, g, h, t in exact_q
    ]
    gap = 0.0
    for ch, xi, (m, s, g, h, t) in zip(chains, x, bad_q):
        q_mean, q_cov = _chain_moments(m, s, g, h, t)
        gap += _gauss_kl_full(q_mean, q_cov, *ch.posterior(xi))
    draws = _mc_negative_elbo(chains, x, bad_q, 200_000, jax.random.PRNGKey(2))
    mc, se = draws.mean(), draws.std(ddof=1) / math.sqrt(draws.size)
    assert gap > 20.0 * se  # the bound is visibly loose
    assert abs(mc - (nll + gap)) < 4.0 * se + 1e-4, (mc, nll + gap, se)
    assert mc > nll


# --- the network's terms ------------------------------------------------------------------------


def test_one_level_is_the_vae():
    """num_levels = 1 with the VAE's parameters and noise: every term is the VAE's."""
    vae_model = create_vae(_model_config(), image_size=4, channels=2)
    model = create_hvae(_model_config(num_levels=1), image_size=4, channels=2)
    x = jnp.asarray(_bin_centres(np.random.default_rng(1), (5, 4, 4, 2)))
    noise = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
    vae_params = jax.jit(vae_model.init)(jax.random.PRNGKey(3), x, noise)["params"]
    vae_params = _scaled(vae_params, 10.0)
    vae_params["log_scale"] = jnp.asarray(np.random.default_rng(4).uniform(-2.5, 0.0, (4, 4, 2)), jnp.float32)
    params = {"vae": vae_params}
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x, noise)["params"]
    )
    assert hvae_latent_shape_of(params) == (1, 3)

    got = jax.jit(H.hvae_terms_from_noise, static_argnums=0)(model.apply, params, x, noise)
    want = jax.jit(V.vae_terms_from_noise, static_argnums=0)(vae_model.apply, vae_params, x, noise)
    assert float(want["kl_bpd"].min()) > 1e-3
    for k in ("loss", "recon_bpd", "kl_bpd", "mse"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(got["kl_1_bpd"], want["kl_bpd"], rtol=1e-6)


def test_two_level_terms_match_float64_reference():
    model = create_hvae(_model_config(num_levels=2), image_size=4, channels=2)
    x = jnp.asarray(_bin_centres(np.random.default_rng(5), (5, 4, 4, 2)))
    noise = jax.random.normal(jax.random.PRNGKey(6), (5, 6))
    params = _scaled(jax.jit(model.init)(jax.random.PRNGKey(7), x, noise)["params"], 10.0)
    params["vae"]["log_scale"] = jnp.asarray(np.random.default_rng(8).uniform(-2.5, 0.0, (4, 4, 2)), jnp.float32)
    got = jax.jit(H.hvae_terms_from_noise, static_argnums=0)(model.apply, params, x, noise)

    v = {"params": params}
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    e1, e2 = f64(noise[:, :3]), f64(noise[:, 3:])
    m1, lv1 = map(f64, model.apply(v, x, method="encode"))
    z1 = m1 + np.exp(0.5 * lv1) * e1
    m2, lv2 = map(f64, model.apply(v, jnp.asarray(z1, jnp.float32), method=lambda m, z: m.posterior(2, z)))
    z2 = m2 + np.exp(0.5 * lv2) * e2
    pm, plv = map(f64, model.apply(v, jnp.asarray(z2, jnp.float32), method=lambda m, z: m.prior(1, z)))
    means, log_scales = model.apply(v, jnp.asarray(z1, jnp.float32), method="decode")
    dims = 4 * 4 * 2
    recon = -ref_discretized_log_prob(x, means, log_scales).reshape(5, -1).sum(-1) / (dims * LOG2)
    kl2 = ref_kl(m2, lv2, 0 * m2, 0 * lv2) / (dims * LOG2)
    kl1 = (ref_logpdf(z1, m1, lv1) - ref_logpdf(z1, pm, plv)) / (dims * LOG2)

    assert np.abs(kl2).min() > 1e-3 and np.abs(kl1).min() > 1e-3  # off the prior: not vacuous
    np.testing.assert_allclose(got["recon_bpd"], recon, rtol=1e-4)
    np.testing.assert_allclose(got["kl_2_bpd"], kl2, rtol=1e-4)
    np.testing.assert_allclose(got["kl_1_bpd"], kl1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["kl_bpd"], kl1 + kl2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["loss"], recon + kl1 + kl2, rtol=1e-4)


# --- the method: config, training through train_lib, sampling ------------------------------------


def _method_config(**hvae_fields) -> ml_collections.ConfigDict:
    """The runlocal config, its hvae section replaced (a fresh ConfigDict: any type may go in)."""
    config = hvae_config.get_config("runlocal")
    config.hvae = ml_collections.ConfigDict({**config.hvae.to_dict(), **hvae_fields})
    config.training.batch_size = 8
    config.training.num_train_steps = 30
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 2
    return config


def test_config_validation_and_registry():
    config = _method_config()
    validation.validate_config(config, num_devices=1)
    assert methods.method_class(config) is methods.REGISTRY["hvae"]
    assert "hvae" in methods.method_class(config).frozen_fields
    assert config.hvae.num_levels == 2 and hvae_config.get_config().hvae.num_levels == 2
    for field, bad in (("num_levels", 0), ("latent_dim", 2.5), ("hidden", True), ("dtype", "float16")):
        with pytest.raises(ConfigError, match=rf"config\.hvae\.{field}"):
            validation.validate_config(_method_config(**{field: bad}), num_devices=1)
    del config.hvae
    with pytest.raises(ConfigError, match=r"config\.hvae"):
        validation.validate_config(config, num_devices=1)


def _tiny_batch() -> np.ndarray:
    """8 simple 8x8 patterns (stripes, blocks) on the bin centres."""
    rng = np.random.default_rng(9)
    imgs = np.full((8, 8, 8, 1), -1.0, np.float32)
    for i in range(8):
        imgs[i, :, i % 8] = 1.0
        imgs[i, i // 2 : i // 2 + 3, 2:5] = 1.0
    flip = rng.random(imgs.shape) < 0.05
    return np.where(flip, -imgs, imgs).astype(np.float32)


def test_train_step_is_the_float64_elbo_and_its_gradient_and_matches_on_4_devices():
    """The step's loss, its terms and its gradient norm are the float64 -ELBO of the same draws
    (`ref_negative_elbo_bpd`), and the loss's gradient is that reference's, by central differences
    over all ~2800 parameters: a 1% error in the objective or its gradient is 10-100x the tolerance."""
    config = _method_config()
    method = methods.from_config(config)
    state = train_lib.create_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    params = _scaled(state.params, 2.0)  # every conditional away from N(0, I): no term is ~0
    params["vae"]["log_scale"] = jnp.asarray(np.random.default_rng(3).uniform(-1.5, 0.0, (8, 8, 1)), jnp.float32)
    state = state.replace(params=params, ema_params=params)
    batch = jnp.asarray(_tiny_batch())
    step = jax.jit(functools.partial(train_lib.train_step, method=method, config=config, axis_name=None))

    # One step on 4 devices (2 examples each) is the one-device step on the whole batch.
    first, metrics = step(state, batch)
    p_step = jax.pmap(
        functools.partial(train_lib.train_step, method=method, config=config),
        axis_name=train_lib.AXIS,
        devices=jax.devices()[:4],
    )
    first4, metrics4 = p_step(distributed.replicate(state, jax.devices()[:4]), batch.reshape(4, 2, 8, 8, 1))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
        first.params,
        distributed.unreplicate(first4).params,
    )
    np.testing.assert_allclose(metrics4["loss"][0], metrics["loss"], rtol=1e-5)
    assert {"recon_bpd", "kl_bpd", "kl_1_bpd", "kl_2_bpd"} <= set(metrics) and float(metrics["nonfinite"]) == 0.0

    # The step's draws: example i's key is fold_in(fold_in(state.rng, step), i) (train_lib's convention).
    step_rng = jax.random.fold_in(state.rng, state.step)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(jnp.arange(8))
    inputs = method.draw_training_inputs(keys, batch, None)
    p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x64, noise64 = np.asarray(batch, np.float64), np.asarray(inputs["noise"], np.float64)
    ref = ref_negative_elbo_bpd(p64, x64, noise64)
    assert min(abs(ref[k].mean()) for k in ("recon_bpd", "kl_1_bpd", "kl_2_bpd")) > 0.01  # all terms count
    for name in ("loss", "recon_bpd", "kl_1_bpd", "kl_2_bpd"):
        np.testing.assert_allclose(metrics[name], ref[name].mean(), rtol=2e-5, err_msg=name)

    grad_ref = ref_gradient(lambda p: ref_negative_elbo_bpd(p, x64, noise64)["loss"], p64)
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)]).astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(flat(grad_ref)), rtol=1e-4)
    grad = jax.jit(jax.grad(lambda p: jnp.mean(method.loss_terms(p, batch, inputs, train=True)["loss"])))(params)
    # Per network: prior_1 and posterior_2 learn from the KL terms alone, the decoder from recon alone.
    for name in params:
        got, want = flat(grad[name]), flat(grad_ref[name])
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        print(f"\n[hvae] {name}: |grad| {np.linalg.norm(want):.3e}, |grad - float64 fd| / |fd| = {err:.1e}")
        assert err < 1e-3, (name, err)

    # The bound through bpd_step: total = recon + sum of the per-level terms.
    bpd_step = jax.jit(functools.partial(train_lib.bpd_step, method=method, num_strata=0, axis_name=None))
    sums = bpd_step(first.params, batch, jnp.ones(8), jax.random.PRNGKey(4))
    np.testing.assert_allclose(sums["total_bpd"], sums["recon_bpd"] + sums["kl_1_bpd"] + sums["kl_2_bpd"], rtol=1e-5)


def test_sampling_shape_range_determinism_and_ancestral_chain():
    config = _method_config(num_levels=3)
    method = methods.from_config(config)
    params = _scaled(method.init_params(jax.random.PRNGKey(0)), 30.0)
    sample = jax.jit(functools.partial(train_lib.sample_step, method=method, axis_name=None), static_argnums=2)
    a, b, c = (sample(params, jax.random.PRNGKey(k), 6)["samples"] for k in (1, 1, 2))
    assert a.shape == (6, 8, 8, 1) and a.dtype == jnp.float32
    assert float(jnp.min(a)) >= -1.0 and float(jnp.max(a)) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)

    # The chain by hand: z_3 ~ N(0, I), z_2 ~ p(z_2 | z_3), z_1 ~ p(z_1 | z_2), decoder mean.
    k = config.hvae.latent_dim
    noise = jax.random.normal(jax.random.PRNGKey(5), (6, 3 * k))

    def by_hand(module, noise):
        z = noise[:, 2 * k :]
        for level in (2, 1):
            mean, logvar = module.prior(level, z)
            z = mean + jnp.exp(0.5 * logvar) * noise[:, (level - 1) * k : level * k]
        return module.decode(z)[0]

    v = {"params": params}
    want = jax.jit(lambda v, n: method.model.apply(v, n, method=by_hand))(v, noise)
    got = jax.jit(lambda v, n: method.model.apply(v, n, method="generate"))(v, noise)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="sampler"):
        method.check_sampler("ddim", None, 0.0)

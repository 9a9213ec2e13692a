"""The VAE baseline (ddpm_jax.core.vae, ddpm_jax.models.vae) against float64 NumPy / SciPy references.

The references are written from the lecture (shared/seeds/000_*.txt, VAE part) and Kingma &
Welling 2014, never by calling the library's maths: the Gaussian KL in its trace / log-det form and
by Monte Carlo, the discretized decoder from SciPy normal cdf differences with open edge bins.
Run with `pytest -s` to see the bits/dim the short training run reaches.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats

from ddpm_jax.core import pixels
from ddpm_jax.core import vae as V
from ddpm_jax.data.digits_builder import digits_split_indices, digits_uint8
from ddpm_jax.models.vae import LOG_SCALE_MIN, VAE, create_vae

LOG2 = math.log(2.0)
HALF_BIN = 1.0 / 255.0


def _config(**kw) -> ml_collections.ConfigDict:
    c = dict(latent_dim=3, hidden=8, num_hidden_layers=1, dtype="float32")
    c.update(kw)
    return ml_collections.ConfigDict(c)


def _init(model: VAE, batch: int, seed: int = 0):
    x = jnp.zeros((batch, *model.image_shape), jnp.float32)
    z_noise = jnp.zeros((batch, model.latent_dim), jnp.float32)
    return model.init(jax.random.PRNGKey(seed), x, z_noise)["params"]


def _bin_centres(rng: np.random.Generator, shape) -> np.ndarray:
    """Random pixels on the 256 bin centres of [-1, 1], with both edge bins present."""
    k = rng.integers(0, 256, size=shape)
    k.flat[0], k.flat[1] = 0, 255
    return (-1.0 + 2.0 * k / 255.0).astype(np.float32)


# --- float64 references -------------------------------------------------------------------------


def ref_kl(mean, logvar) -> np.ndarray:
    """KL(N(m, S) || N(0, I)) = 0.5 (tr S + m^T m - k - log det S), S = diag exp(logvar), per row."""
    out = []
    for m, lv in zip(np.asarray(mean, np.float64), np.asarray(logvar, np.float64)):
        cov = np.diag(np.exp(lv))
        _, logdet = np.linalg.slogdet(cov)
        out.append(0.5 * (np.trace(cov) + m @ m - m.size - logdet))
    return np.array(out)


def _swish(h):
    return h / (1.0 + np.exp(-h))


def _ref_mlp(p, h, prefix):
    for k in sorted(
        (k for k in p if k.startswith(prefix) and k[len(prefix) :].isdigit()), key=lambda k: int(k[len(prefix) :])
    ):
        h = _swish(h @ p[k]["kernel"] + p[k]["bias"])
    return h


def ref_encode(params, x):
    """q(z|x) of the VAE in float64 NumPy: an MLP of swish layers, then (mean, logvar)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    out = _ref_mlp(p, x.reshape(len(x), -1), "encoder_") @ p["encoder_out"]["kernel"] + p["encoder_out"]["bias"]
    return np.split(out, 2, axis=-1)


def ref_decode(params, z, image_shape):
    """p(x|z) of the VAE in float64 NumPy: tanh means; log-scales LOG_SCALE_MIN + softplus(raw - LOG_SCALE_MIN)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = _ref_mlp(p, np.asarray(z, np.float64), "decoder_")
    means = np.tanh(h @ p["decoder_out"]["kernel"] + p["decoder_out"]["bias"]).reshape(len(h), *image_shape)
    raw = p["log_scale"] - LOG_SCALE_MIN
    log_scales = LOG_SCALE_MIN + np.maximum(raw, 0.0) + np.log1p(np.exp(-np.abs(raw)))  # softplus
    return means, np.broadcast_to(log_scales, means.shape)


def ref_vae_apply(params, x, z_noise):
    """(mean, logvar, means, log_scales) for z = mean + exp(logvar / 2) z_noise (the module's __call__)."""
    mean, logvar = ref_encode(params, x)
    return (mean, logvar, *ref_decode(params, mean + np.exp(0.5 * logvar) * z_noise, np.shape(x)[1:]))


def ref_discretized_log_prob(x, means, log_scales) -> np.ndarray:
    """log P(bin of x) under N(means, exp(log_scales)^2), edge bins open, via scipy cdf differences."""
    x, mu, s = (np.asarray(a, np.float64) for a in (x, means, np.exp(log_scales)))
    upper, lower = (x - mu + HALF_BIN) / s, (x - mu - HALF_BIN) / s
    # Inner bins from the nearer tail (cdf below the mean, survival function above) for precision.
    inner = np.where(
        lower + upper > 0, stats.norm.sf(lower) - stats.norm.sf(upper), stats.norm.cdf(upper) - stats.norm.cdf(lower)
    )
    p = np.where(x < -0.999, stats.norm.cdf(upper), np.where(x > 0.999, stats.norm.sf(lower), inner))
    return np.log(p)


# --- the closed-form KL -------------------------------------------------------------------------


def test_gaussian_kl_standard_matches_trace_logdet_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(6, 5)).astype(np.float32) * 2.0
    logvar = rng.uniform(-4.0, 2.0, size=(6, 5)).astype(np.float32)
    got = np.asarray(jax.jit(V.gaussian_kl_standard)(mean, logvar))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, ref_kl(mean, logvar), rtol=1e-5, atol=1e-6)
    # q = p gives exactly zero.
    np.testing.assert_allclose(V.gaussian_kl_standard(jnp.zeros((2, 4)), jnp.zeros((2, 4))), 0.0, atol=1e-7)


def test_gaussian_kl_standard_matches_monte_carlo():
    """KL = E_q[log q(z) - log p(z)], estimated from 200k draws; within 4 standard errors."""
    rng = np.random.default_rng(1)
    mean = np.array([0.7, -1.2, 0.1], np.float64)
    logvar = np.array([-1.0, 0.5, 0.0], np.float64)
    std = np.exp(0.5 * logvar)
    z = mean + std * rng.standard_normal((200_000, 3))
    log_ratio = (stats.norm.logpdf(z, mean, std) - stats.norm.logpdf(z)).sum(axis=-1)
    mc, se = log_ratio.mean(), log_ratio.std(ddof=1) / math.sqrt(log_ratio.size)
    got = float(V.gaussian_kl_standard(mean[None].astype(np.float32), logvar[None].astype(np.float32))[0])
    assert abs(got - mc) < 4.0 * se, (got, mc, se)


# --- the model ----------------------------------------------------------------------------------


def test_create_vae_shapes_params_and_errors():
    model = create_vae(_config(), image_size=4, channels=2)
    params = _init(model, batch=2)
    d, k, h = 4 * 4 * 2, 3, 8
    expected = (d * h + h) + (h * 2 * k + 2 * k) + (k * h + h) + (h * d + d) + d  # + log_scale
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == expected
    x = jnp.asarray(_bin_centres(np.random.default_rng(2), (2, 4, 4, 2)))
    params["log_scale"] = jnp.linspace(LOG_SCALE_MIN - 3.0, 0.0, 32).reshape(4, 4, 2)  # below and above the floor
    mean, logvar, means, log_scales = model.apply({"params": params}, x, jnp.ones((2, 3)))
    assert mean.shape == logvar.shape == (2, 3)
    assert means.shape == log_scales.shape == (2, 4, 4, 2)
    for got, want in zip((mean, logvar, means, log_scales), ref_vae_apply(params, x, np.ones((2, 3)))):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        create_vae(_config(dtype="float16"), 4, 2)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        create_vae(_config(num_hidden_layers=0), 4, 2)


def test_log_scale_floor_is_smooth():
    """Far below the floor the log-scale sits at LOG_SCALE_MIN but still has a gradient."""
    model = create_vae(_config(), 4, 2)
    params = _init(model, batch=1)
    params["log_scale"] = jnp.full((4, 4, 2), LOG_SCALE_MIN - 5.0)

    def mean_log_scale(p):
        return jnp.mean(model.apply({"params": p}, jnp.zeros((1, 3)), method="decode")[1])

    value, grad = jax.value_and_grad(mean_log_scale)(params)
    assert LOG_SCALE_MIN < float(value) < LOG_SCALE_MIN + 0.01
    assert np.all(np.asarray(grad["log_scale"]) > 0.0)


# --- the training terms against float64 --------------------------------------------------------


def _tiny_model_and_params():
    """A tiny VAE whose encoder is off the prior and whose decoder spreads its means and scales over
    many bins (the init keeps both near zero)."""
    model = create_vae(_config(), image_size=4, channels=2)
    params = _init(model, batch=5, seed=3)
    rng = np.random.default_rng(4)
    params["decoder_out"]["kernel"] = params["decoder_out"]["kernel"] * 10.0
    params["encoder_out"]["kernel"] = params["encoder_out"]["kernel"] * 10.0
    params["log_scale"] = jnp.asarray(rng.uniform(-2.5, 0.0, size=(4, 4, 2)), jnp.float32)
    x = jnp.asarray(_bin_centres(rng, (5, 4, 4, 2)))
    return model, params, x


def test_vae_terms_match_float64_reference():
    model, params, x = _tiny_model_and_params()
    rng = jax.random.PRNGKey(7)
    got = jax.jit(V.vae_terms, static_argnums=0)(model.apply, params, x, rng)

    variables = {"params": params}
    mean, logvar = (np.asarray(a, np.float64) for a in model.apply(variables, x, method="encode"))
    noise = np.asarray(jax.random.normal(rng, mean.shape, jnp.float32), np.float64)  # the documented draw
    z = mean + np.exp(0.5 * logvar) * noise
    means, log_scales = model.apply(variables, jnp.asarray(z, jnp.float32), method="decode")
    d = x[0].size
    recon = -ref_discretized_log_prob(x, means, log_scales).reshape(5, -1).sum(-1) / (d * LOG2)
    kl = ref_kl(mean, logvar) / (d * LOG2)
    mse = ((np.asarray(means, np.float64) - np.asarray(x, np.float64)) ** 2).reshape(5, -1).mean(-1)

    assert kl.min() > 1e-3  # the encoder is not at the prior: the KL check is not vacuous
    np.testing.assert_allclose(got["recon_bpd"], recon, rtol=1e-4)
    np.testing.assert_allclose(got["kl_bpd"], kl, rtol=1e-4)
    np.testing.assert_allclose(got["mse"], mse, rtol=1e-4)
    np.testing.assert_allclose(got["loss"], got["recon_bpd"] + got["kl_bpd"], rtol=1e-6)


def test_vae_bpd_averages_vae_terms_over_split_keys():
    model, params, x = _tiny_model_and_params()
    rng = jax.random.PRNGKey(8)
    got = jax.jit(V.vae_bpd, static_argnums=(0, 4))(model.apply, params, x, rng, 3)
    terms = [V.vae_terms(model.apply, params, x, k) for k in jax.random.split(rng, 3)]
    recon = np.mean([t["recon_bpd"] for t in terms], axis=0)
    np.testing.assert_allclose(got["recon_bpd"], recon, rtol=1e-5)
    np.testing.assert_allclose(got["kl_bpd"], terms[0]["kl_bpd"], rtol=1e-6)
    np.testing.assert_allclose(got["total_bpd"], got["recon_bpd"] + got["kl_bpd"], rtol=1e-6)
    with pytest.raises(ValueError, match="num_samples"):
        V.vae_bpd(model.apply, params, x, rng, 0)


def test_bfloat16_model_gives_close_terms():
    model, params, x = _tiny_model_and_params()
    bf16 = create_vae(_config(dtype="bfloat16"), 4, 2)
    rng = jax.random.PRNGKey(9)
    f32 = V.vae_terms(model.apply, params, x, rng)["loss"]
    b16 = V.vae_terms(bf16.apply, params, x, rng)["loss"]
    assert b16.dtype == jnp.float32 and np.all(np.isfinite(b16))
    np.testing.assert_allclose(b16, f32, rtol=0.05)


# --- training and sampling ---------------------------------------------------------------------

DIGITS_CONFIG = _config(latent_dim=8, hidden=128, num_hidden_layers=2)
NUM_TRAIN_STEPS = 300


@functools.cache
def _digits_model():
    return create_vae(DIGITS_CONFIG, image_size=8, channels=1)


def test_untrained_bpd_is_finite_and_positive():
    model = _digits_model()
    params = _init(model, batch=1)
    x = jnp.asarray(_bin_centres(np.random.default_rng(5), (16, 8, 8, 1)))
    bpd = jax.jit(V.vae_bpd, static_argnums=(0, 4))(model.apply, params, x, jax.random.PRNGKey(0), 2)
    assert bpd["total_bpd"].shape == (16,)
    assert np.all(np.isfinite(bpd["total_bpd"])) and np.all(bpd["total_bpd"] > 0)


@pytest.mark.slow
def test_short_training_lowers_the_negative_elbo():
    images, _ = digits_uint8()
    x = jnp.asarray(pixels.scale_images(images[digits_split_indices()["train"][:64]]))  # [64, 8, 8, 1]
    model = _digits_model()
    params = _init(model, batch=1, seed=1)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, rng):
        loss_fn = lambda p: jnp.mean(V.vae_terms(model.apply, p, x, rng)["loss"])  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def eval_bpd(params):
        bpd = V.vae_bpd(model.apply, params, x, jax.random.PRNGKey(123), num_samples=4)
        return float(jnp.mean(bpd["total_bpd"]))

    initial = eval_bpd(params)
    opt_state, rng = tx.init(params), jax.random.PRNGKey(2)
    for i in range(NUM_TRAIN_STEPS):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, i))
    assert np.isfinite(float(loss))
    trained = eval_bpd(params)
    print(f"\n[vae] digits x64, {NUM_TRAIN_STEPS} Adam steps: negative ELBO {initial:.3f} -> {trained:.3f} bits/dim")
    assert trained < 0.8 * initial, (initial, trained)


def test_vae_sample_values_and_determinism():
    model = _digits_model()
    params = _init(model, batch=1)
    params["decoder_out"]["kernel"] = params["decoder_out"]["kernel"] * 100.0  # saturate some tanh
    sample = jax.jit(V.vae_sample, static_argnums=(0, 3))
    a = sample(model.apply, params, jax.random.PRNGKey(0), 6)
    b = sample(model.apply, params, jax.random.PRNGKey(0), 6)
    c = sample(model.apply, params, jax.random.PRNGKey(1), 6)
    assert a.shape == (6, 8, 8, 1) and a.dtype == jnp.float32
    # The decoder means at z = jax.random.normal(key, [6, latent_dim]) (the documented draw), in float64.
    z = jax.random.normal(jax.random.PRNGKey(0), (6, DIGITS_CONFIG.latent_dim), jnp.float32)
    want, _ = ref_decode(params, z, (8, 8, 1))
    np.testing.assert_allclose(np.asarray(a, np.float64), want, atol=2e-5)
    assert np.mean(np.abs(want) > 0.999) > 0.1  # many saturated pixels: their clip to [-1, 1] is exercised
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)

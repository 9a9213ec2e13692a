"""The learned t = 0 decoder (config.diffusion.decoder = "learned").

Its L_0 against an independent float64 NumPy discretized Gaussian; its gradient against finite
differences; Adam on the scale alone finds the scale of a known mean error; and in the method: the
defaults are today's (parameters bit for bit; the loss is L_simple, recomputed in float64 from the
network's output), the learned decoder's L_0 and its scale's gradient match float64 NumPy (Ho et
al.'s step-1 posterior mean and a discretized Gaussian; central differences), it learns on every
step without touching the network's gradient, and the bound uses it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import ndtr

from ddpm_jax import methods
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.core import diffusion, schedules
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods import ddpm
from ddpm_jax.models import learned_schedule
from ddpm_jax.models.unet import create_model as create_unet
from ddpm_jax.training import validation

HALF_BIN = 1.0 / 255.0
LEVELS = np.round(np.linspace(0, 255, 17)).astype(np.int64)  # the digits' 17 grey levels on the 256 bins


def _grid_images(rng, shape, interior: bool = False):
    levels = LEVELS[1:-1] if interior else LEVELS
    return -1.0 + 2.0 * rng.choice(levels, size=shape) / 255.0


def _numpy_decoder_bpd(x, means, log_scales):
    """-log2 P(x) per example / D, float64: the Gaussian's mass on x's bin, the edge bins open-ended."""
    x, means, sigma = (np.asarray(a, np.float64) for a in (x, means, np.exp(log_scales)))
    upper = np.where(x > 0.999, np.inf, x + HALF_BIN)
    lower = np.where(x < -0.999, -np.inf, x - HALF_BIN)
    p = ndtr((upper - means) / sigma) - ndtr((lower - means) / sigma)
    return (-np.log(p)).reshape(x.shape[0], -1).mean(axis=1) / np.log(2.0)


def _decoder_case(dtype):
    """A batch with two channels, each with its own log-scale; t = 0 for the first two examples."""
    rng = np.random.RandomState(0)
    x0 = _grid_images(rng, (4, 4, 4, 2))
    means = x0 + np.array([0.003, 0.02]) * rng.randn(*x0.shape)
    log_scale = np.log([0.004, 0.03])
    sched = schedules.make_schedule("linear", 10)
    t = jnp.array([0, 0, 3, 9], jnp.int32)
    xt = jnp.asarray(x0, dtype)  # not used by L_0; the KL rows only need a shape-correct input
    log_var = diffusion.model_log_variance(sched, None, xt, t, "fixed_small")
    return sched, jnp.asarray(x0, dtype), xt, t, jnp.asarray(means, dtype), log_var, log_scale


@pytest.mark.parametrize("x64", [False, True])
def test_learned_decoder_l0_matches_numpy(x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        sched, x0, xt, t, means, log_var, log_scale = _decoder_case(dtype)
        log_var = log_var.astype(dtype)
        vb = jax.jit(functools.partial(diffusion.vb_terms_bpd, sched, x0, xt, t, means, log_var))
        got, fixed = vb(jnp.asarray(log_scale, dtype)), vb(None)
        got, fixed = np.asarray(got), np.asarray(fixed)
    want = _numpy_decoder_bpd(x0, means, np.broadcast_to(log_scale, x0.shape))
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-10 if x64 else 2e-5)
    np.testing.assert_array_equal(got[2:], fixed[2:])  # the KL terms (t > 0) do not see the decoder
    assert np.all(got[:2] != fixed[:2])


def test_learned_decoder_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        sched, x0, xt, _, means, log_var, log_scale = _decoder_case(jnp.float64)
        t = jnp.zeros((x0.shape[0],), jnp.int32)
        log_var = jnp.zeros(x0.shape, jnp.float64)

        def l0(scale):
            return jnp.mean(diffusion.vb_terms_bpd(sched, x0, xt, t, means, log_var, scale))

        scale = jnp.asarray(log_scale, jnp.float64)
        grad = np.asarray(jax.grad(l0)(scale))
        h = 1e-6
        fd = np.array([(l0(scale.at[c].add(h)) - l0(scale.at[c].add(-h))) / (2 * h) for c in range(2)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    # Channel 0's scale (0.004) is near its error (0.003) and the bin; channel 1's (0.03) is wider than its
    # error (0.02): the bound wants it narrower, so its gradient is positive.
    assert grad[1] > 0


def test_adam_on_the_scale_finds_the_mean_error():
    """For a Gaussian mean error of std e >> the bin, L_0 is lowest near sigma = e (exactly: the RMS error,
    widened by the bin's 1/12 of its width squared); a few Adam steps from today's scale get there."""
    rng = np.random.RandomState(1)
    e = 0.05
    x0 = jnp.asarray(_grid_images(rng, (32, 8, 8, 1), interior=True), jnp.float32)
    means = x0 + e * jnp.asarray(rng.randn(*x0.shape), jnp.float32)
    target = float(np.sqrt(np.mean((np.asarray(means) - np.asarray(x0)) ** 2) + (2 * HALF_BIN) ** 2 / 12))
    sched = schedules.make_schedule("linear", 1000)
    t = jnp.zeros((x0.shape[0],), jnp.int32)
    log_var = diffusion.model_log_variance(sched, None, x0, t, "fixed_small")

    def l0(scale):
        return jnp.mean(diffusion.vb_terms_bpd(sched, x0, x0, t, means, log_var, scale))

    start = 0.5 * log_var[0, 0, 0, 0]  # today's decoder: sqrt(posterior_variance[1]) = 0.0074
    assert abs(float(jnp.exp(start)) - 0.0074) < 1e-4
    tx = optax.adam(optax.cosine_decay_schedule(0.1, 150), b2=0.9)  # short memory: the gradient shrinks 100x

    @jax.jit
    def train(scale):
        def step(carry, _):
            scale, opt = carry
            updates, opt = tx.update(jax.grad(l0)(scale), opt)
            return (optax.apply_updates(scale, updates), opt), None

        return jax.lax.scan(step, (scale, tx.init(scale)), None, length=150)[0][0]

    learned = train(jnp.reshape(start, (1,)))
    assert abs(float(jnp.exp(learned[0])) / target - 1.0) < 0.02
    # ... and it is a minimum: the bound is higher a little either side, and far higher at today's scale.
    assert float(l0(learned)) < min(float(l0(learned + 0.05)), float(l0(learned - 0.05)))
    assert float(l0(jnp.reshape(start, (1,)))) > float(l0(learned)) + 5.0


# ------------------------------------------------------------------ the method


def _config(**diffusion_fields):
    config = ddpm_config.get_config("runlocal")
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 4
    config.diffusion.decoder_batch = 3
    for k, v in diffusion_fields.items():
        config.diffusion[k] = v
    validation.validate_config(config, num_devices=1)
    return config


@functools.cache
def _method(**diffusion_fields):
    return methods.from_config(_config(**diffusion_fields))


def _batch(size=6):
    rng = np.random.RandomState(2)
    x = jnp.asarray(_grid_images(rng, (size, 8, 8, 1)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(5), size)
    return x, keys


def _betas64(T=4):
    """Ho et al.'s linear betas 1e-4..0.02, rescaled by 1000 / T and clipped at 0.999, float64."""
    return np.minimum(np.linspace(0.1 / T, 20.0 / T, T), 0.999)


def _unet_fn(params):
    """The network alone (what both decoders share): eps_hat(x_t, t) at float32 inputs, as float64."""
    apply = jax.jit(functools.partial(create_unet(_config().model, 8, 1).apply, train=False))
    return lambda xt, t: np.asarray(
        apply({"params": params}, jnp.asarray(xt, jnp.float32), jnp.asarray(t, jnp.int32)), np.float64
    )


def _simple_loss64(net, x, t, noise):
    """L_simple (Ho et al. eq. 14) per example: mean of (eps - eps_hat(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t))^2."""
    x, noise, abar = np.asarray(x, np.float64), np.asarray(noise, np.float64), np.cumprod(1.0 - _betas64())
    a, s = (np.sqrt(v[np.asarray(t)])[:, None, None, None] for v in (abar, 1.0 - abar))
    return ((noise - net(a * x + s * noise, t)) ** 2).reshape(x.shape[0], -1).mean(1)


def _decoder_mean64(net, x, noise):
    """The t = 0 decoder's mean at x_1 = sqrt(alpha_1) x + sqrt(beta_1) eps: the posterior mean of step 1,
    (x_1 - beta_1 / sqrt(1 - abar_1) eps_hat) / sqrt(alpha_1) (Ho et al. eq. 11; abar_1 = alpha_1 = 1 - beta_1)."""
    x, noise, beta = np.asarray(x, np.float64), np.asarray(noise, np.float64), _betas64()[0]
    x1 = math.sqrt(1.0 - beta) * x + math.sqrt(beta) * noise
    return (x1 - math.sqrt(beta) * net(x1, np.zeros(x.shape[0], np.int32))) / math.sqrt(1.0 - beta)


def test_defaults_are_todays_parameters_and_losses():
    """The defaults build the bare UNet with today's initial draws (so the main job's params hash does not
    move), and the method's training loss is L_simple: float64 from the network's output and Ho et al.'s
    formulas (schedule, x_t), so a 1% error in the loss is 1000 times the tolerance."""
    config = _config()
    assert (config.diffusion.decoder, config.diffusion.condition_on, config.diffusion.prior_loss) == (
        "fixed",
        "index",
        False,
    )
    method = _method()
    rng = jax.random.PRNGKey(0)
    params = method.init_params(rng)
    unet = create_unet(config.model, 8, 1)
    x1, t1 = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    today = jax.jit(functools.partial(unet.init, train=False))(rng, x1, t1)["params"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, today)

    x, keys = _batch()
    inputs = method.draw_training_inputs(keys, x, None, position=(jnp.arange(6), 6))
    assert set(inputs) == {"t", "weights", "noise"}
    terms = jax.jit(method.loss_terms)(params, x, inputs)
    assert set(terms) == {"loss", "mse"}
    want = _simple_loss64(_unet_fn(params), x, inputs["t"], inputs["noise"])  # float64, from Ho et al.'s formulas
    np.testing.assert_allclose(terms["mse"], want, rtol=1e-5)
    np.testing.assert_array_equal(terms["loss"], terms["mse"])


def test_learned_decoder_in_the_method():
    fixed, learned = _method(), _method(decoder="learned")
    rng = jax.random.PRNGKey(0)
    p_fixed, p_learned = fixed.init_params(rng), learned.init_params(rng)
    # The same network draws, plus the decoder's log std per channel, started at today's value.
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_learned["network"], p_fixed)
    sched = fixed.schedule(p_fixed)
    np.testing.assert_array_equal(learned.decoder_log_scale(p_learned), 0.5 * sched.posterior_log_variance_clipped[:1])
    assert fixed.decoder_log_scale(p_fixed) is None

    x, keys = _batch()
    inputs = learned.draw_training_inputs(keys, x, None, position=(jnp.arange(6), 6))
    inputs["t"] = jnp.array([1, 2, 3, 1, 2, 3], jnp.int32)  # no example draws t = 0

    def grads(method, params):
        def loss(p):
            terms = method.loss_terms(p, x, inputs)
            return jnp.mean(terms["loss"]), terms

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g_fixed, t_fixed = grads(fixed, p_fixed)
    g_learned, t_learned = grads(learned, p_learned)
    # The loss's value is today's (L_simple, float64 from the network's output); the extra term is L_0 on
    # decoder_batch examples at t = 0 (reported), float64 from the same network output.
    net = _unet_fn(p_fixed)
    np.testing.assert_allclose(t_fixed["loss"], _simple_loss64(net, x, inputs["t"], inputs["noise"]), rtol=1e-5)
    np.testing.assert_array_equal(t_learned["loss"], t_fixed["loss"])
    beta = _betas64()
    log_scale = 0.5 * math.log(beta[1] * beta[0] / (1.0 - (1.0 - beta[0]) * (1.0 - beta[1])))  # step 2's posterior
    mean = _decoder_mean64(net, x[:3], inputs["noise_0"][:3])

    def l0(log_scale):
        return _numpy_decoder_bpd(x[:3], mean, np.full(mean.shape, log_scale)).mean()

    np.testing.assert_allclose(t_learned["decoder_bpd"], np.full(6, l0(log_scale)), rtol=2e-5)
    # Its gradient reaches the scale's parameter only, weighted: d loss / d param = w * rate * d L_0 / d log_scale.
    h = 1e-5
    g_want = (
        ddpm.DECODER_LOSS_WEIGHT * learned_schedule.DECODER_RATE * (l0(log_scale + h) - l0(log_scale - h)) / (2 * h)
    )
    # The scale learns on every step; the network's gradient is the one it has without the decoder.
    g_scale = g_learned[learned_schedule.DECODER_PARAM]
    assert g_scale.shape == (1,) and abs(g_want) > 1e-3
    np.testing.assert_allclose(g_scale[0], g_want, rtol=2e-4)
    jax.tree_util.tree_map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9), g_learned["network"], g_fixed
    )

    # The bound uses the learned scale: at its start it is the fixed decoder's bound; moved, only L_0 changes.
    bound = jax.jit(lambda m, p: m.bound_terms(p, x, keys, jax.random.PRNGKey(9), num_strata=0), static_argnums=0)
    b_fixed, b_learned = bound(fixed, p_fixed), bound(learned, p_learned)
    np.testing.assert_allclose(b_learned["vb"], b_fixed["vb"], rtol=1e-6)
    wider = {**p_learned, learned_schedule.DECODER_PARAM: p_learned[learned_schedule.DECODER_PARAM] + 0.1}
    b_wider = bound(learned, wider)
    np.testing.assert_array_equal(b_wider["vb"][:, 1:], b_learned["vb"][:, 1:])
    assert np.all(np.asarray(b_wider["vb"][:, 0]) != np.asarray(b_learned["vb"][:, 0]))


@pytest.mark.parametrize(
    "field, value", [("decoder", "wide"), ("condition_on", "t"), ("decoder_batch", 0), ("prior_loss", None)]
)
def test_validation_rejects(field, value):
    with pytest.raises(ConfigError, match=f"diffusion.{field}"):
        _config(**{field: value})


def test_learned_schedule_advice():
    config = ddpm_config.get_config("runlocal")
    config.diffusion.schedule, config.diffusion.loss_type = "learned", "vlb"
    advice = ddpm.DDPM.learned_schedule_advice(config)
    assert len(advice) == 3 and "decoder='learned'" in advice[0] and "prior_loss=True" in advice[1]
    config.diffusion.decoder, config.diffusion.prior_loss, config.diffusion.condition_on = "learned", True, "log_snr"
    assert ddpm.DDPM.learned_schedule_advice(config) == []
    # An older run's config (before these fields) still loads, with today's behaviour.
    for field in ddpm.FIELD_DEFAULTS:
        del config.diffusion[field]
    method = methods.from_config(config)
    assert (method.decoder, method.condition_on, method.prior_loss) == ("fixed", "index", False)

"""The learned schedule's gradient checked against finite differences of the bound.

The exact bound (diffusion.calc_bpd_loop: all T terms and the prior) of a short chain (T = 8) with an
analytic network, as a function of the MonotoneGamma parameters, in float64: jax.grad against central
differences of every parameter. With the index-conditioned network the schedule reaches the bound
through the tables only; with condition_on='log_snr' also through what the network sees; and with a
learned decoder its log-scale is checked beside the schedule's parameters. Then the method's options
for a learned schedule: log-SNR conditioning and the prior L_T in the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ddpm_jax import methods
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.core import diffusion, schedules
from ddpm_jax.methods.ddpm import log_snr_condition
from ddpm_jax.models import learned_schedule
from ddpm_jax.training import validation

T = 8
GAMMA_0, GAMMA_1 = learned_schedule.initial_gamma_range(T, "linear")
# Central differences: truncation ~STEP^2, round-off ~1e-16 * |bound| / STEP. At 1e-4 the worst parameter
# (a gradient of ~3e-4 bits) agrees to ~1e-6; at 1e-5 round-off alone is ~4e-5 of it.
STEP = 1e-4


def _images(rng, shape=(4, 4, 4, 1)):
    """Digits-like data: 17 grey levels on the 256-bin grid of [-1, 1], the edges included."""
    levels = np.round(np.linspace(0, 255, 17)).astype(np.int64)
    return jnp.asarray(-1.0 + 2.0 * rng.choice(levels, size=shape) / 255.0, jnp.float64)


def _analytic_eps(x, c):
    """A smooth stand-in for the network: eps_hat(x_t, c) for a conditioning value c per example [B]."""
    c = c[:, None, None, None]
    return (0.4 + 0.3 * jnp.sin(c / T)) * x + 0.1 * jnp.tanh(2.0 * x + 0.05 * c)


def _bound_fn(condition_on: str, learned_decoder: bool, variance: str = "fixed_small"):
    """(flat parameters, unravel, f(flat) -> mean total bits/dim), all in float64."""
    model = learned_schedule.DiffusionModel(None, T, GAMMA_0, GAMMA_1)
    gamma_params = model.init(jax.random.PRNGKey(3), method="log_snr")["params"]
    params = {"schedule": gamma_params}
    if learned_decoder:
        params["decoder"] = jnp.array([-4.2], jnp.float64)
    flat, unravel = ravel_pytree(params)
    x0 = _images(np.random.RandomState(0))
    rng = jax.random.PRNGKey(7)

    def f(flat_params):
        p = unravel(flat_params)
        log_snr = model.apply({"params": p["schedule"]}, method="log_snr")
        sched = schedules.vp_schedule_from_log_snr(log_snr)
        if condition_on == "log_snr":
            cond = log_snr_condition(log_snr, -GAMMA_0, -GAMMA_1)
            model_fn = lambda x, t: _analytic_eps(x, cond[t])
        else:
            model_fn = lambda x, t: _analytic_eps(x, t.astype(x.dtype))
        out = diffusion.calc_bpd_loop(sched, model_fn, x0, rng, variance=variance, decoder_log_scale=p.get("decoder"))
        return jnp.mean(out["total_bpd"])

    return flat, unravel, f


@pytest.mark.parametrize(
    "condition_on, learned_decoder, variance",
    [
        ("index", False, "fixed_small"),
        ("log_snr", False, "fixed_large"),
        ("log_snr", True, "fixed_small"),
    ],
)
def test_bound_gradient_matches_central_differences(condition_on, learned_decoder, variance):
    with jax.enable_x64(True):
        flat, unravel, f = _bound_fn(condition_on, learned_decoder, variance)
        assert flat.dtype == jnp.float64
        value, grad = jax.jit(jax.value_and_grad(f))(flat)
        assert np.isfinite(value)
        basis = STEP * jnp.eye(flat.size, dtype=jnp.float64)
        f_batch = jax.jit(jax.vmap(f))
        fd = (f_batch(flat + basis) - f_batch(flat - basis)) / (2.0 * STEP)
        grad, fd = np.asarray(grad), np.asarray(fd)
    # Every parameter gets a gradient (the bound depends on each), and each agrees with its difference.
    assert np.all(np.abs(grad) > 0)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7 * np.abs(grad).max())


def test_schedule_tables_keep_float64():
    """Under x64 the learned schedule's tables are float64 (the check above relies on it); float32
    otherwise, as before."""
    log_snr = jnp.linspace(6.0, -6.0, T)
    assert schedules.vp_schedule_from_log_snr(log_snr).betas.dtype == jnp.float32
    with jax.enable_x64(True):
        sched = schedules.vp_schedule_from_log_snr(jnp.asarray(log_snr, jnp.float64))
        assert sched.betas.dtype == sched.posterior_log_variance_clipped.dtype == jnp.float64


# ------------------------------------------------------------------ the method's options for a learned schedule


def _method(**diffusion_fields):
    config = ddpm_config.get_config("runlocal")
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    config.diffusion.num_timesteps = 4
    for k, v in diffusion_fields.items():
        config.diffusion[k] = v
    validation.validate_config(config, num_devices=1)
    return methods.from_config(config)


@pytest.mark.parametrize("schedule", ["linear", "learned"])
def test_log_snr_conditioning(schedule):
    """condition_on='log_snr': the network sees log SNR_t mapped onto [0, T - 1] by a fixed affine map (the
    fixed schedule's own end points, the learned one's initial ones), computed here from the tables."""
    method = _method(schedule=schedule, loss_type="vlb", condition_on="log_snr")
    params = method.init_params(jax.random.PRNGKey(0))
    sched = method.schedule(params)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    log_snr = np.log(abar) - np.log1p(-abar)
    if schedule == "linear":
        ends = log_snr[0], log_snr[-1]
    else:
        gamma_0, gamma_1 = learned_schedule.initial_gamma_range(4, "linear")
        ends = -gamma_0, -gamma_1
    cond = 3.0 * (ends[0] - log_snr) / (ends[0] - ends[1])
    assert np.all(np.diff(cond) > 0)
    if schedule == "linear":
        np.testing.assert_allclose(cond[[0, -1]], [0.0, 3.0], atol=1e-6)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, 8, 8, 1), jnp.float32)
    t = jnp.arange(4, dtype=jnp.int32)
    got = jax.jit(lambda p: method.model_fn(p)(x, t))(params)
    want = jax.jit(lambda p, c: method.apply_fn({"params": p}, x, c, train=False))(
        params, jnp.asarray(cond, jnp.float32)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prior_in_the_loss():
    """prior_loss=True: the loss of a learned schedule is T L_t + L_T (an unbiased estimate of the bound), and
    L_T's gradient pushes gamma_1 up (without it, nothing in the loss does)."""
    method = _method(schedule="learned", loss_type="vlb", prior_loss=True)
    params = method.init_params(jax.random.PRNGKey(0))
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.choice([-1.0, 0.0, 1.0], size=(4, 8, 8, 1)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    inputs = method.draw_training_inputs(keys, x, None, position=(jnp.arange(4), 4))
    terms = jax.jit(method.loss_terms)(params, x, inputs)
    prior = diffusion.prior_bpd(method.schedule(params), x)
    np.testing.assert_allclose(terms["prior_bpd"], prior, rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], 4 * terms["vb"] + prior, rtol=1e-6)
    grad = jax.grad(lambda p: jnp.mean(diffusion.prior_bpd(method.schedule(p), x)))(params)
    assert float(grad["gamma"]["gamma_span"]) < 0.0

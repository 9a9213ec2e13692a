"""ddpm_jax.core.diffusion.training_losses against the lecture's weighted MSE and float64 KLs: the
"weighted", "vlb", "simple" and "hybrid" losses of every parameterization and variance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import diffusion as D
from ddpm_jax.core import schedules as S

from helpers.diffusion_refs import BIN_CENTRES, LOG2, ErrorTable, b4, f64, linear_model, rand_batch, var_model, vp64

ERRORS = ErrorTable("losses")
record = ERRORS.record


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    ERRORS.print()


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


def test_vlb_is_T_times_vb_and_hybrid_composition():
    T = 50
    sched = S.make_schedule("cosine", T)
    x0, noise, t = rand_batch(19, B=8, T=T, t=[0, 1, 5, 20, 48, 49, 2, 3])
    x0 = BIN_CENTRES[np.round((x0 + 1) * 127.5).astype(int)]
    make, params = var_model(2, T)
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
    make, params = var_model(2, T)

    def part(p, loss_type, key):
        out = D.training_losses(
            sched, make(p), x0, t, noise, parameterization="eps", variance="learned_range", loss_type=loss_type
        )
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

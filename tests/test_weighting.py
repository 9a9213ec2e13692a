"""The omega_t weightings as one family (ddpm_jax/core/weighting.py, Kingma & Gao 2023) and its discrete
form for the DDPM (diffusion.chain_weights), against independent float64 computations.

Continuous (VP, t ~ U(0, 1), lambda = log SNR = -gamma): L_w = 0.5 E_t[w(lambda) (-d lambda/dt) ||eps - eps_hat||^2],
each w normalised to mean 1 over lambda uniform on the schedule's range (rate = that range's width). Checked here:
- eps / x0 / v: on a fixed linear gamma the weighted loss is 0.5 x that predictor's squared error / M, with x_hat,
  v, v_hat built here in float64 from the network's eps_hat at the same z_t, and M the normaliser by quadrature;
- simple: w(lambda) M = 1 / (-d lambda/dt) of Ho et al.'s linear-beta chain (finite differences of its table);
- edm: against Karras et al.'s loss written in sigma (derivation at `test_edm_is_karras_loss_in_sigma`);
- sigmoid: sigmoid(b - lambda) / M, decreasing; every weighting's mean is 1 by quadrature;
- a Monte Carlo mean of the weighted loss over t against the quadrature of w(lambda) E||eps - eps_hat||^2 for
  Gaussian data and a shrunk linear predictor (closed form);
- the VDM method: the loss is the weighted one, its reported bound terms the ELBO's.
Discrete: T w_t L_{t-1} is exactly c ||eps - eps_hat||^2 ("eps"), c ||x_0 - x0_hat||^2 ("x0"), c ||v - v_hat||^2
("v") per example for fixed_small (the lecture's omega_t), the decoder term unweighted, the bound unchanged.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from ddpm_jax import methods
from ddpm_jax.commands import ablate
from ddpm_jax.configuration import load_config_file
from ddpm_jax.core import diffusion, schedules, timesteps, vdm, weighting
from ddpm_jax.errors import ConfigError
from ddpm_jax.training import validation

from helpers.diffusion_refs import linear_model, vp64

GMIN, GMAX = -13.3, 5.0  # VDM's fixed linear gamma: lambda in [-5, 13.3]
LMIN, LMAX = -GMAX, -GMIN
LOG2 = math.log(2.0)
RTOL = 2e-4  # float32 against float64; a 1% error is 50 times this


# --- the family written independently in float64 ---------------------------------------------------------


@functools.cache
def _ho_chain(T):
    """(lambda_t, -d lambda / d(t/T) by central differences) of Ho et al.'s linear-beta chain, float64."""
    abar = np.cumprod(1.0 - schedules.betas_for("linear", T))
    lam = np.log(abar) - np.log1p(-abar)
    return lam[1:-1], T * (lam[:-2] - lam[2:]) / 2.0


def ho_rate(lam):
    """Ho et al.'s schedule in its continuous limit (T = 100000, betas scaled by 1000 / T): -d lambda/dt at lambda."""
    table_lam, rate = _ho_chain(100_000)
    return np.interp(-np.asarray(lam), -table_lam, rate)


def raw64(name, lam, rate, bias=weighting.SIGMOID_BIAS):
    """w(lambda, -d lambda/dt) before normalisation, from the definitions (Kingma & Gao 2023, Table 1)."""
    lam = np.asarray(lam, np.float64)
    return {
        "elbo": lambda: np.ones_like(lam),
        "eps": lambda: 1.0 / rate + 0 * lam,
        "x0": lambda: np.exp(-lam) / rate,
        "v": lambda: (1.0 + np.exp(-lam)) / rate,
        "simple": lambda: 1.0 / ho_rate(lam),
        "sigmoid": lambda: special.expit(bias - lam),
        "edm": lambda: stats.norm.pdf(lam, 2.4, 2.4) * (np.exp(-lam) + 0.25) / 0.25,
    }[name]()


def quad_mean(f, lo, hi, epsrel=1e-10):
    """(1 / (hi - lo)) int_lo^hi f, adaptive quadrature in float64."""
    value, _ = integrate.quad(lambda u: float(f(u)), lo, hi, limit=400, epsabs=0.0, epsrel=epsrel)
    return value / (hi - lo)


def norm64(name, lo=LMIN, hi=LMAX, bias=weighting.SIGMOID_BIAS):
    """M: the mean of raw64 over lambda uniform on [lo, hi] with the linear schedule's rate hi - lo."""
    return quad_mean(lambda u: raw64(name, u, hi - lo, bias), lo, hi)


@functools.cache
def _weight_fn(name, lo, hi, bias):
    return weighting.weight_fn(name, lo, hi, bias=bias)


def code_w(name, lam, rate, lo=LMIN, hi=LMAX, bias=weighting.SIGMOID_BIAS):
    """The library's normalised weight, as float64."""
    w = _weight_fn(name, lo, hi, bias)
    return np.asarray(w(jnp.asarray(lam, jnp.float32), jnp.asarray(rate, jnp.float32)), np.float64)


# --- continuous time: each weighting against its definition --------------------------------------------

gamma_fn = lambda t: GMIN + (GMAX - GMIN) * t  # noqa: E731
W_NET = np.random.default_rng(7).normal(0.0, 0.6, (2, 2))


def eps_net(z, t):
    """A toy noise predictor (float32, the library's side)."""
    return jnp.tanh(z @ W_NET.astype(np.float32)) + 0.3 * t[:, None, None, None]


def eps_net64(z, t):
    return np.tanh(z @ W_NET) + 0.3 * t[:, None, None, None]


@functools.cache
def _batch():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 2, 2, 2))
    eps = rng.standard_normal(x.shape)
    t = np.concatenate([[0.0, 1.0, 1e-3, 0.999], rng.uniform(0, 1, 60)])
    return x, eps, t


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_eps_x0_v_weightings_are_their_predictors_mse(name):
    """On the fixed linear gamma, 0.5 gamma' w ||eps - eps_hat||^2 = 0.5 ||target - prediction||^2 / M for the eps,
    x0 and v predictors (unit weight, t ~ U(0, 1)), x_hat = (z - sigma eps_hat) / alpha, v = alpha eps - sigma x."""
    x, eps, t = _batch()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    elbo, weighted = vdm.weighted_diffusion_loss(
        gamma_fn, eps_net, f32(x), f32(t), f32(eps), weighting.weight_fn(name, LMIN, LMAX)
    )
    gamma = (GMIN + (GMAX - GMIN) * t)[:, None, None, None]
    alpha, sigma = np.sqrt(special.expit(-gamma)), np.sqrt(special.expit(gamma))
    z = alpha * x + sigma * eps
    eps_hat = eps_net64(z, t)
    x_hat = (z - sigma * eps_hat) / alpha
    target, pred = {
        "eps": (eps, eps_hat),
        "x0": (x, x_hat),
        "v": (alpha * eps - sigma * x, alpha * eps_hat - sigma * x_hat),
    }[name]
    mse = np.sum((target - pred) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(weighted, 0.5 * mse / norm64(name), rtol=RTOL)
    np.testing.assert_allclose(elbo, 0.5 * (GMAX - GMIN) * np.sum((eps - eps_hat) ** 2, axis=(1, 2, 3)), rtol=RTOL)


def test_eps_weighting_is_the_elbo_on_the_linear_schedule():
    """On a linear schedule the eps-MSE's weight is constant: normalised, exactly the ELBO's 1."""
    lam = np.linspace(LMIN, LMAX, 11)
    np.testing.assert_allclose(code_w("eps", lam, LMAX - LMIN), 1.0, rtol=1e-6)


@pytest.mark.parametrize("T, t_min, rtol", [(1000, 20, 0.012), (100_000, 100, 1e-3)])
def test_simple_is_ho_linear_chains_eps_mse(T, t_min, rtol):
    """L_simple: the eps-MSE with t uniform over Ho et al.'s chain, so w(lambda) = 1 / (-d lambda / d(t/T)), taken
    here by central differences of core.schedules' linear table; up to its normaliser M (by quadrature, mean over
    a range inside the chain, where int w d lambda = int dt is the t-span). T = 1000: the chain itself, which
    differs from the continuous limit by ~1% (beta^2/2 in -log(1 - beta) at beta = 0.02; the first steps);
    T = 100000 with betas scaled by 1000/T: the limit."""
    lam, rate = _ho_chain(T)
    keep = (np.arange(1, T - 1) >= t_min * T // 1000) & (lam > -9.5) & (lam < 8.5)
    lam, rate = lam[keep], rate[keep]
    lo, hi = -9.5, 8.5
    # int_lo^hi d lambda / rate(lambda) = t(lo) - t(hi), t = index / T; the mean over [lo, hi] is that / (hi - lo)
    table_lam, _ = _ho_chain(100_000)
    t_of = lambda u: np.interp(-u, -table_lam, np.arange(1, len(table_lam) + 1) / 100_000)  # noqa: E731
    M = (t_of(lo) - t_of(hi)) / (hi - lo)
    np.testing.assert_allclose(code_w("simple", lam, 1.0, lo, hi) * M, 1.0 / rate, rtol=rtol)


def test_edm_is_karras_loss_in_sigma():
    """Karras et al. (2022): E_{ln sigma ~ N(-1.2, 1.2^2)} [lambda(sigma) ||D(x + sigma n) - x||^2] with
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, sigma_d = 0.5. VP z_t / alpha_t = x + sigma eps with
    sigma = e^{-lambda/2} = e^{gamma/2}, so u = ln sigma = gamma / 2 and du = (gamma' / 2) dt; D = x_hat. Per unit u
    the loss is g(u) = N(u; -1.2, 1.2^2) lambda(sigma) ||x_hat - x||^2, and since ||eps - eps_hat||^2 = ||x - x_hat||^2
    / sigma^2 and N(lambda; 2.4, 2.4^2) d lambda = N(u; -1.2, 1.2^2) du, the normalised weighted loss is
    0.5 gamma' w ||eps - eps_hat||^2 = (gamma'/2) g(u) / (2 M), M = (1/18.3) int over u of N(u) (sigma^2 + sigma_d^2)
    / sigma_d^2 du. Checked pointwise in t (so also as the integral over the same sigma range)."""
    x, eps, t = _batch()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    _, weighted = vdm.weighted_diffusion_loss(
        gamma_fn, eps_net, f32(x), f32(t), f32(eps), weighting.weight_fn("edm", LMIN, LMAX)
    )
    gamma = GMIN + (GMAX - GMIN) * t
    g4 = gamma[:, None, None, None]
    alpha, sigma4 = np.sqrt(special.expit(-g4)), np.sqrt(special.expit(g4))
    z = alpha * x + sigma4 * eps
    denoised = (z - sigma4 * eps_net64(z, t)) / alpha  # Karras's D at noise level sigma
    sigma_d, u = 0.5, gamma / 2.0
    sigma = np.exp(u)
    karras = lambda uu, sq: (
        stats.norm.pdf(uu, -1.2, 1.2) * (np.exp(2 * uu) + sigma_d**2) / (np.exp(2 * uu) * sigma_d**2) * sq
    )  # noqa: E731
    g = karras(u, np.sum((denoised - x) ** 2, axis=(1, 2, 3)))
    M = (
        quad_mean(
            lambda uu: stats.norm.pdf(uu, -1.2, 1.2) * (np.exp(2 * uu) + sigma_d**2) / sigma_d**2, GMIN / 2, GMAX / 2
        )
        / 2
    )
    assert np.all(sigma > 0)
    np.testing.assert_allclose(weighted, (GMAX - GMIN) / 2 * g / (2 * M), rtol=RTOL)


@pytest.mark.parametrize("bias", [weighting.SIGMOID_BIAS, 1.5])
def test_sigmoid_is_monotone_and_normalised(bias):
    lam = np.linspace(LMIN, LMAX, 2001)
    w = code_w("sigmoid", lam, LMAX - LMIN, bias=bias)
    assert np.all(np.diff(w) < 0)
    M = quad_mean(lambda u: special.expit(bias - u), LMIN, LMAX)
    np.testing.assert_allclose(w, special.expit(bias - lam) / M, rtol=RTOL)


@pytest.mark.parametrize("lo, hi", [(LMIN, LMAX), (-9.0, 7.0)])
def test_every_weighting_has_mean_one(lo, hi):
    """The library's normalised w integrates to (hi - lo) over [lo, hi] at the linear rate, by quadrature."""
    for name in weighting.WEIGHTINGS:
        mean = quad_mean(lambda u, name=name: code_w(name, u, hi - lo, lo, hi), lo, hi, epsrel=1e-6)  # float32 w
        assert abs(mean - 1.0) < 1e-3, (name, mean)


def test_unknown_weighting_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        weighting.weight_fn("snr", LMIN, LMAX)


# --- Monte Carlo over t against quadrature ------------------------------------------------------------------

MC_G0, MC_G1, MC_SX = -9.0, 5.0, 0.5  # lambda in [-5, 9] (inside Ho's chain for "simple"); x ~ N(0, 0.5^2)
MC_REPS, MC_N, MC_SHAPE = 10, 10_000, (4, 4, 2)


def _shrink(gamma):
    """c(lambda): 0.8 x the Bayes factor of eps given z for Gaussian data, E[eps | z] = sigma z / (alpha^2 s^2 + sigma^2)."""
    a2, s2 = jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma)
    return 0.8 * jnp.sqrt(s2) / (a2 * MC_SX**2 + s2)


def _sq_error64(lam):
    """E ||eps - c z||^2 per dim, closed form: (1 - c sigma)^2 + c^2 alpha^2 s^2."""
    a2, s2 = special.expit(lam), special.expit(-lam)
    c = 0.8 * np.sqrt(s2) / (a2 * MC_SX**2 + s2)
    return (1 - c * np.sqrt(s2)) ** 2 + c**2 * a2 * MC_SX**2


@functools.cache
def _monte_carlo():
    """{name: [MC_REPS] replicate means of the weighted loss}, every weighting on the same draws of t, x, eps."""
    gfn = lambda t: MC_G0 + (MC_G1 - MC_G0) * t  # noqa: E731
    eps_fn = lambda z, t: _shrink(gfn(t))[:, None, None, None] * z  # noqa: E731
    wfns = {name: weighting.weight_fn(name, -MC_G1, -MC_G0) for name in weighting.WEIGHTINGS}

    @jax.jit
    def replicate_means(key):
        kx, ke, kt = jax.random.split(key, 3)
        shape = (MC_REPS * MC_N,) + MC_SHAPE
        x = MC_SX * jax.random.normal(kx, shape)
        eps = jax.random.normal(ke, shape)
        # stratified within each replicate: one t in each [i / N, (i + 1) / N)
        t = (jnp.tile(jnp.arange(MC_N), MC_REPS) + jax.random.uniform(kt, (MC_REPS * MC_N,))) / MC_N
        out = {}
        for name, wfn in wfns.items():
            _, weighted = vdm.weighted_diffusion_loss(gfn, eps_fn, x, t, eps, wfn)
            out[name] = weighted.reshape(MC_REPS, MC_N).mean(axis=1)
        return out

    return {k: np.asarray(v, np.float64) for k, v in replicate_means(jax.random.PRNGKey(3)).items()}


@pytest.mark.parametrize("name", weighting.WEIGHTINGS)
def test_monte_carlo_over_t_is_the_quadrature(name):
    """The weighted loss's mean over stratified t (independent replicates, so the se is honest) equals
    0.5 D int w(lambda) E||eps - eps_hat||^2 d lambda, w normalised by quadrature, within 3.5 se < 1%: a 1% error fails."""
    lo, hi = -MC_G1, -MC_G0
    reps = _monte_carlo()[name]
    est, se = reps.mean(), reps.std(ddof=1) / np.sqrt(MC_REPS)
    M = norm64(name, lo, hi)
    D = np.prod(MC_SHAPE)
    ref = 0.5 * D * integrate.quad(lambda u: raw64(name, u, hi - lo) / M * _sq_error64(u), lo, hi, limit=400)[0]
    print(f"{name}: MC {est:.5f} +- {se:.5f}, quadrature {ref:.5f}, se/ref {se / ref:.2e}")
    assert se < 0.0028 * ref, (name, se / ref)
    assert abs(est - ref) < 3.5 * se, (name, est, ref, se)


# --- the VDM method -------------------------------------------------------------------------------------------


@functools.cache
def _vdm(name):
    config = load_config_file("vdm:runlocal")
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    config.vdm.weighting = name
    validation.validate_config(config, num_devices=1)
    return methods.from_config(config)


@functools.cache
def _vdm_case():
    method = _vdm("elbo")
    params = method.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 256, (6,) + method.image_shape) / 127.5 - 1.0, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(2), x.shape[0])
    inputs = method.draw_training_inputs(keys, x, None, position=(jnp.arange(x.shape[0]), x.shape[0]))
    return params, x, keys, inputs


@pytest.mark.parametrize("name", ["elbo", "x0", "sigmoid", "edm"])
def test_vdm_method_loss_is_weighted_and_its_bound_the_elbo(name):
    params, x, keys, inputs = _vdm_case()
    ref = _vdm("elbo").loss_terms(params, x, inputs)
    got = _vdm(name).loss_terms(params, x, inputs)
    for k in ("recon_bpd", "diffusion_bpd", "prior_bpd", "elbo_bpd"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(ref["elbo_bpd"], ref["recon_bpd"] + ref["diffusion_bpd"] + ref["prior_bpd"], rtol=1e-6)
    lam = -(GMIN + (GMAX - GMIN) * np.asarray(inputs["t"], np.float64))
    w = raw64(name, lam, LMAX - LMIN) / norm64(name)
    diffusion_part = np.asarray(got["loss"] - got["recon_bpd"] - got["prior_bpd"], np.float64)
    np.testing.assert_allclose(diffusion_part, w * np.asarray(ref["diffusion_bpd"]), rtol=RTOL, atol=1e-6)
    if name == "elbo":
        np.testing.assert_array_equal(got["loss"], got["elbo_bpd"])


def test_vdm_eval_bound_is_the_elbo_whatever_the_weighting():
    params, x, keys, _ = _vdm_case()
    rng = jax.random.PRNGKey(5)
    ref = _vdm("elbo").eval_terms(params, x, keys, rng)
    got = _vdm("v").eval_terms(params, x, keys, rng)
    method = _vdm("v")
    direct = vdm.bound_bpd(method.gamma_fn(params), method.model_fn(params), x, rng, num_t=20)["total_bpd"]
    np.testing.assert_allclose(got["bpd_est"], ref["bpd_est"], rtol=1e-6)
    np.testing.assert_allclose(got["bpd_est"], direct, rtol=1e-6)
    assert not np.allclose(got["loss"], ref["loss"], rtol=1e-2)


def test_vdm_weighting_is_validated():
    config = load_config_file("vdm:runlocal")
    config.vdm.weighting = "snr"
    with pytest.raises(ConfigError, match=r"config\.vdm\.weighting: must be one of .*'sigmoid'"):
        validation.validate_config(config, num_devices=1)


# --- the DDPM: the discrete chain ---------------------------------------------------------------------------

T_CHAIN = 1000


@functools.cache
def _chain64(T=T_CHAIN):
    """(float64 reference tables, lambda_t [T], the chain's rate r_t [T] with r_0 = nan)."""
    ref = vp64("linear", T)
    lam = np.log(ref["abar"]) - np.log1p(-ref["abar"])
    rate = np.concatenate([[np.nan], T * np.expm1(lam[:-1] - lam[1:])])
    return ref, lam, rate


def chain_w64(name, T=T_CHAIN):
    """w_t = w(lambda_t, r_t) / its mean over t = 1..T-1; w_0 = 1."""
    _, lam, rate = _chain64(T)
    w = np.ones(T)
    if name != "elbo":
        raw = raw64(name, lam[1:], rate[1:])
        w[1:] = raw / raw.mean()
    return w


def test_chain_rate_is_the_lectures_omega():
    """r_t = T expm1(lambda_{t-1} - lambda_t) is 2 T omega'_t, the lecture's eps weight for fixed_small:
    (1/(2 sigma~_t^2)) (1 - alpha_t)^2 / (alpha_t (1 - abar_t))."""
    ref, _, rate = _chain64()
    omega = (ref["beta"] ** 2 / (ref["alpha"] * (1.0 - ref["abar"])))[1:] / (2.0 * ref["post_var"][1:])
    np.testing.assert_allclose(rate[1:], 2 * T_CHAIN * omega, rtol=1e-9)


@pytest.mark.parametrize("name", ["elbo", "eps", "x0", "v", "sigmoid", "edm"])
def test_chain_weights_match_float64(name):
    w = diffusion.chain_weights(schedules.make_schedule("linear", T_CHAIN), name)
    np.testing.assert_allclose(w, chain_w64(name), rtol=1e-3)
    assert abs(w[1:].mean() - 1.0) < 1e-9 and w[0] == 1.0


@pytest.mark.parametrize("loss_type", ["vlb", "weighted"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_discrete_weightings_are_the_predictor_mses(parameterization, loss_type):
    """fixed_small: T w_t L_{t-1} = ||target - pred||^2 / (2 M D log 2) bits/dim exactly for eps / x0 / v, whatever
    the network predicts (M = mean of the raw weight over t = 1..T-1); the decoder term stays T L_0 and "vb" the bound."""
    sched = schedules.make_schedule("linear", T_CHAIN)
    ref, lam, rate = _chain64()
    fn, fn64 = linear_model(11, 2, 2, T_CHAIN)  # an affine "network"; its output is read as `parameterization`
    rng = np.random.default_rng(4)
    t = np.array([0, 1, 2, 10, 100, 500, 998, 999] + list(rng.integers(1, T_CHAIN, 8)), np.int32)
    x0 = rng.uniform(-1, 1, (len(t), 2, 2, 2))
    noise = rng.standard_normal(x0.shape)
    a, s = ref["a"][t][:, None, None, None], ref["s"][t][:, None, None, None]
    xt = a * x0 + s * noise
    out = fn64(xt, t)
    x_hat = {"eps": (xt - s * out) / a, "x0": out, "v": a * xt - s * out}[parameterization]
    eps_hat = (xt - a * x_hat) / s
    mses = {
        "eps": np.mean((noise - eps_hat) ** 2, axis=(1, 2, 3)),
        "x0": np.mean((x0 - x_hat) ** 2, axis=(1, 2, 3)),
        "v": np.mean(((a * noise - s * x0) - (a * eps_hat - s * x_hat)) ** 2, axis=(1, 2, 3)),
    }
    args = (sched, fn, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    kw = dict(parameterization=parameterization, variance="fixed_small", loss_type=loss_type)
    bound = diffusion.training_losses(*args, **kw)
    kl = t > 0
    for name in ("eps", "x0", "v"):
        w = diffusion.chain_weights(sched, name)
        got = diffusion.training_losses(*args, **kw, weights=w)
        np.testing.assert_array_equal(got["vb"], bound["vb"])
        np.testing.assert_allclose(got["loss"], T_CHAIN * w[t] * bound["vb"], rtol=1e-6)
        if loss_type == "vlb" and parameterization != "eps":
            # vlb's KL subtracts two float32 means that agree to ~coef1 ~ 1e-4 at large t for an x0 / v output:
            # the float64 identity holds there only through "weighted" (the same KL as omega_t times the MSE).
            continue
        M = raw64(name, lam[1:], rate[1:]).mean()
        np.testing.assert_allclose(got["loss"][kl], mses[name][kl] / (2 * M * LOG2), rtol=2e-3, err_msg=name)
        np.testing.assert_allclose(got["loss"][~kl], T_CHAIN * bound["vb"][~kl], rtol=1e-6)
    elbo = diffusion.training_losses(*args, **kw, weights=diffusion.chain_weights(sched, "elbo"))
    np.testing.assert_allclose(elbo["loss"], bound["loss"], rtol=1e-7)
    np.testing.assert_allclose(bound["loss"], T_CHAIN * bound["vb"], rtol=1e-7)


def test_weights_refused_with_simple_and_hybrid():
    sched = schedules.make_schedule("linear", 10)
    x = jnp.zeros((2, 2, 2, 1))
    for loss_type in ("simple", "hybrid"):
        with pytest.raises(ValueError, match="use loss_type 'vlb' or 'weighted'"):
            diffusion.training_losses(
                sched, lambda z, t: z, x, jnp.array([1, 2]), x, loss_type=loss_type, weights=np.ones(10)
            )


def _ddpm_config(**fields):
    config = load_config_file("ddpm:runlocal")
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    config.diffusion.num_timesteps = 50  # runlocal's 20 clips the scaled linear betas at 0.999
    for k, v in fields.items():
        del config.diffusion[k]  # and set again: a field of another type (the validation cases)
        config.diffusion[k] = v
    return config


@functools.cache
def _ddpm(name):
    config = _ddpm_config(weighting=name, loss_type="weighted", parameterization="v")
    validation.validate_config(config, num_devices=1)
    return methods.from_config(config)


def test_ddpm_method_weights_the_loss_and_reports_the_elbo():
    """The method's loss is T w_t L_t (w_t: chain_w64 of its own T); "vb" and the eval bound are the ELBO's."""
    elbo, v = _ddpm("elbo"), _ddpm("v")
    assert elbo._chain_weights is None  # the default's computation is the one before weightings existed
    params = elbo.init_params(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (8,) + elbo.image_shape), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    inputs = {
        "t": jnp.arange(8, dtype=jnp.int32) * 2 + 1,
        "weights": jnp.ones(8),
        "noise": jax.random.normal(keys[0], x.shape),
    }
    inputs["t"] = inputs["t"].at[0].set(0)
    ref, got = elbo.loss_terms(params, x, inputs), v.loss_terms(params, x, inputs)
    T = elbo.num_timesteps
    np.testing.assert_allclose(got["vb"], ref["vb"], rtol=1e-6)
    np.testing.assert_allclose(ref["loss"], T * ref["vb"], rtol=1e-6)
    np.testing.assert_allclose(got["loss"], T * chain_w64("v", T)[np.asarray(inputs["t"])] * ref["vb"], rtol=1e-4)
    rng = jax.random.PRNGKey(3)
    np.testing.assert_allclose(
        v.eval_terms(params, x, keys, rng)["bpd_est"], elbo.eval_terms(params, x, keys, rng)["bpd_est"], rtol=1e-6
    )
    # the importance sampler's history holds the terms of the loss it estimates: w_t L_t
    history = v.update_method_state(timesteps.init_loss_history(T), inputs, got, lambda a: a)
    t = np.asarray(inputs["t"])
    np.testing.assert_allclose(history.losses[t, 0], chain_w64("v", T)[t] * np.asarray(ref["vb"]), rtol=1e-4)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"weighting": "snr"}, r"config\.diffusion\.weighting: unknown 'snr'; valid: elbo, eps, x0, v, simple"),
        ({"weighting": "eps"}, r"config\.diffusion\.weighting: .*loss_type 'simple'.*set diffusion\.loss_type"),
        (
            {"weighting": "x0", "loss_type": "hybrid", "variance": "learned_range"},
            r"config\.diffusion\.weighting: .*'hybrid'.*'vlb' or 'weighted'",
        ),
        ({"weighting": "eps", "loss_type": "vlb", "schedule": "learned"}, r"learned schedule .* keep weighting 'elbo'"),
        ({"weighting": "sigmoid", "loss_type": "vlb", "weighting_bias": "x"}, r"weighting_bias: must be a number"),
    ],
)
def test_ddpm_weighting_is_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        validation.validate_config(_ddpm_config(**fields), num_devices=1)


def test_ddpm_config_without_the_field_is_the_elbo():
    """An older run's config.json lacks diffusion.weighting: it trained the bound."""
    config = _ddpm_config(loss_type="vlb")
    del config.diffusion["weighting"]
    del config.diffusion["weighting_bias"]
    method = methods.from_config(config)
    assert method.weighting == "elbo" and method._chain_weights is None


def test_the_ddpm_weightings_grid_has_every_weighting():
    grid = ablate.load_grid("ddpm_weightings")
    cells = {c: ablate.cell_config(grid, c) for c in grid["cells"]}
    for config in cells.values():
        validation.validate_config(config, num_devices=1)
    assert sorted(c.diffusion.weighting for c in cells.values() if c.diffusion.loss_type == "weighted") == sorted(
        weighting.WEIGHTINGS
    )

"""Samplers on data whose optimal denoiser is analytic: x0 ~ N(m, s^2) per dimension.

For Gaussian data E[x0 | x_t] = m + g_t (x_t - a_t m), g_t = a_t s^2 / (a_t^2 s^2 + sigma_t^2), with
a_t, sigma_t the marginal's signal scale and noise std. Fed to a sampler (as an x0 model, or converted
to eps, v or the posterior mean), every step is affine in x_t plus Gaussian noise of known variance, so
the law of the output is N(mu, var) with (mu, var) from an exact float64 recursion written here
independently of the library (the posterior by Bayes' rule from the marginals, not the library's
coefficient tables). The samplers must match it within N_SE Monte Carlo standard errors. Finite T
shrinks the spread: the output's std is 2-32% below the data's S here, depending on the sampler and
the number of steps (32% for 25 respaced steps; 11% for 50 DDIM steps, where a 12% bound on the
data law's std used to pass by 0.8 standard errors). That deficit is part of the recursion, so no
test compares with the data law itself.
"""

import dataclasses
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import methods
from ddpm_jax.core import sampling
from ddpm_jax.core.schedules import make_schedule
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Sampler

M, S = 0.3, 0.2
T = 200
N = 20_000  # samples, as [N, 1, 1, 1] images: standard errors 0.0013 of the mean, 1% of the variance
N_SE = 4  # tolerance in standard errors
SHAPE = (N, 1, 1, 1)
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.01, 50.0


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", T)


@pytest.fixture(scope="module")
def short_sched():
    # Over 200 steps the variance choices differ little (fixed_large and fixed_small by 22% in the
    # output's variance); over 50 they differ by 39-92 standard errors, as the test below checks.
    return make_schedule("linear", 50)


@pytest.fixture(scope="module")
def ve_sched():
    return make_schedule("ve", T)


# ----------------------------------------------------------------------------- float64 references


def vp_marginals(sched):
    """(a_t, sigma_t), float64, from the schedule's betas: abar_t = prod_{i <= t} (1 - beta_i)."""
    abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def ve_marginals(num_timesteps):
    """(a_t, sigma_t) of the VE process: a_t = 1, sigma_t geometric from sigma_min to sigma_max."""
    sigmas = np.geomspace(VE_SIGMA_MIN, VE_SIGMA_MAX, num_timesteps)
    return np.ones_like(sigmas), sigmas


def kept(num_steps):
    """K evenly spaced steps of 0..T-1, rounded (Nichol & Dhariwal's respacing)."""
    return np.unique(np.linspace(0, T - 1, num_steps).round().astype(int))


def denoiser(a, sig, m=M, sd=S):
    """E[x0 | x_t = x] = shift + slope x for x0 ~ N(m, sd^2), x_t = a x0 + sig eps."""
    slope = a * sd**2 / (a**2 * sd**2 + sig**2)
    return slope, m - slope * a * m


def posterior(a, sig, a_prev, sig_prev):
    """q(x_prev | x_t, x0) = N(c0 x0 + cx x_t, var) by Bayes' rule, and the step variance beta.

    x_prev = a_prev x0 + sig_prev e (prior), x_t = sqrt(alpha) x_prev + sqrt(beta) n (likelihood),
    alpha = (a / a_prev)^2 and beta = sig^2 - alpha sig_prev^2 so that x_t has the right marginal.
    """
    alpha = (a / a_prev) ** 2
    beta = sig**2 - alpha * sig_prev**2
    if sig_prev == 0:  # the last step: x_prev is x0 itself
        return a_prev, 0.0, 0.0, beta
    var = 1.0 / (1.0 / sig_prev**2 + alpha / beta)
    return var * a_prev / sig_prev**2, var * np.sqrt(alpha) / beta, var, beta


def ancestral_law(a, sig, prior=(0.0, 1.0), variance="fixed_small", frac=None, log_var=None, m=M, sd=S):
    """(mean, var) of ancestral sampling over the chain with marginals (a, sig) at its steps.

    The model is the exact denoiser at each step; the step noise variance is the posterior's
    (fixed_small), beta (fixed_large), exp(frac log beta + (1 - frac) log posterior) per step
    (learned_range), or exp(log_var) per step (learned); none at the last step.
    """
    mu, var = prior
    for k in range(len(a) - 1, -1, -1):
        a_prev, sig_prev = (a[k - 1], sig[k - 1]) if k > 0 else (1.0, 0.0)
        c0, cx, post_var, beta = posterior(a[k], sig[k], a_prev, sig_prev)
        g, h = denoiser(a[k], sig[k], m, sd)
        slope, shift = c0 * g + cx, c0 * h
        if k == 0:
            noise = 0.0
        elif variance == "fixed_small":
            noise = post_var
        elif variance == "fixed_large":
            noise = beta
        elif variance == "learned_range":
            noise = np.exp(frac[k] * np.log(beta) + (1 - frac[k]) * np.log(post_var))
        else:
            noise = np.exp(log_var[k])
        mu, var = slope * mu + shift, slope**2 * var + noise
    return mu, var


def ddim_law(a, sig, eta, prior=(0.0, 1.0)):
    """(mean, var) of DDIM (Song et al. eq. 12) over the chain's steps (VP: a^2 + sig^2 = 1)."""
    mu, var = prior
    for k in range(len(a) - 1, -1, -1):
        ab, ab_prev = a[k] ** 2, (a[k - 1] ** 2 if k > 0 else 1.0)
        g, h = denoiser(a[k], sig[k])
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        c_eps = np.sqrt(max(1 - ab_prev - sigma2, 0.0)) / sig[k]
        # x_prev = sqrt(ab_prev) x0 + c_eps (x - a x0) + sigma z, with x0 = h + g x.
        c0 = np.sqrt(ab_prev) - c_eps * a[k]
        mu, var = (c0 * g + c_eps) * mu + c0 * h, (c0 * g + c_eps) ** 2 * var + sigma2
    return mu, var


def check_law(x, law):
    """Sample mean and variance of N draws within N_SE standard errors of N(mu, var)'s."""
    x = np.asarray(x, np.float64).ravel()
    mu, var = law
    assert abs(x.mean() - mu) < N_SE * np.sqrt(var / x.size), (x.mean(), mu, np.sqrt(var / x.size))
    assert abs(x.var() - var) < N_SE * var * np.sqrt(2 / x.size), (x.var(), var, var * np.sqrt(2 / x.size))


# ----------------------------------------------------------------------------- the exact models


def gaussian_model(a, sig, parameterization="x0", var_channel=None, m=M, sd=S):
    """The exact denoiser of N(m, sd^2) data as a `model_fn` of the given parameterization.

    a, sig: the full chain's float64 marginals (the network always sees the original t).
    var_channel: optional [T] values appended as a second channel (a learned variance's output).
    "mean" is the one-step posterior mean of the full chain, c0_t x0 + cx_t x_t.
    """
    post = [posterior(a[t], sig[t], *((a[t - 1], sig[t - 1]) if t else (1.0, 0.0))) for t in range(len(a))]
    c0, cx = (jnp.asarray([p[i] for p in post], jnp.float32) for i in (0, 1))
    a32, sig32 = jnp.asarray(a, jnp.float32), jnp.asarray(sig, jnp.float32)
    extra = None if var_channel is None else jnp.asarray(var_channel, jnp.float32)

    def model_fn(x, t):
        at, st = a32[t][:, None, None, None], sig32[t][:, None, None, None]
        x0 = m + at * sd**2 / (at**2 * sd**2 + st**2) * (x - at * m)
        eps = (x - at * x0) / st
        out = {
            "x0": x0,
            "eps": eps,
            "v": at * eps - st * x0,
            "mean": c0[t][:, None, None, None] * x0 + cx[t][:, None, None, None] * x,
        }[parameterization]
        if extra is not None:
            out = jnp.concatenate([out, jnp.broadcast_to(extra[t][:, None, None, None], x.shape)], axis=-1)
        return out

    return model_fn


def run(loop, sched, model_fn, rng, n=N, **kw):
    return np.asarray(
        jax.jit(lambda r: loop(sched, model_fn, (n, 1, 1, 1), r, clip_denoised=False, **kw)["samples"])(
            jax.random.PRNGKey(rng)
        ),
        np.float64,
    )


def var_channel(variance, sched):
    """(model's variance channel [T], the reference's kwargs as a function of the kept steps)."""
    t = np.arange(sched.num_timesteps)
    if variance == "learned_range":
        v = 0.5 + 0.5 * np.cos(0.37 * t)  # a known v in [0, 1] per original t: frac = (v + 1) / 2
        return v, lambda use: {"frac": (v[use] + 1) / 2}
    if variance == "learned":
        log_var = np.log(0.3) + np.log(np.asarray(sched.betas, np.float64))  # 0.3 beta_t
        return log_var, lambda use: {"log_var": log_var[use]}
    return None, lambda use: {}


# ----------------------------------------------------------------------------- ancestral sampling


@pytest.mark.parametrize("parameterization", ["x0", "eps", "v", "mean"])
def test_ancestral_sampler_has_the_exact_law(sched, parameterization):
    a, sig = vp_marginals(sched)
    x = run(sampling.sample_loop, sched, gaussian_model(a, sig, parameterization), 0, parameterization=parameterization)
    check_law(x, ancestral_law(a, sig))


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range", "learned"])
def test_ancestral_sampler_variances_have_the_exact_law(short_sched, variance):
    a, sig = vp_marginals(short_sched)
    channel, ref_kw = var_channel(variance, short_sched)
    x = run(
        sampling.sample_loop,
        short_sched,
        gaussian_model(a, sig, "eps", channel),
        1,
        parameterization="eps",
        variance=variance,
    )
    law = ancestral_law(a, sig, variance=variance, **ref_kw(np.arange(len(a))))
    check_law(x, law)
    # Each variance choice moves the law by more than twice the tolerance from fixed_small's (42 to 92
    # standard errors), so sampling with the wrong variance fails this test. (learned_range with frac and
    # 1 - frac swapped differs by 39.)
    assert abs(law[1] / ancestral_law(a, sig)[1] - 1) > 2 * N_SE * np.sqrt(2 / N)


@pytest.mark.parametrize("parameterization", ["x0", "eps", "v"])
@pytest.mark.parametrize("num_steps", [T, 25])
def test_ve_sampler_has_the_exact_law(ve_sched, parameterization, num_steps):
    a, sig = ve_marginals(T)
    use = kept(num_steps)
    loop, kw = (
        (sampling.sample_loop, {}) if num_steps == T else (sampling.respaced_sample_loop, {"num_steps": num_steps})
    )
    x = run(loop, ve_sched, gaussian_model(a, sig, parameterization), 2, parameterization=parameterization, **kw)
    # x_T ~ p(x_T) = N(0, 1 + sigma_max^2)
    check_law(x, ancestral_law(a[use], sig[use], prior=(0.0, 1.0 + VE_SIGMA_MAX**2)))


def test_given_x_T_the_law_is_conditional_on_it(sched):
    a, sig = vp_marginals(sched)
    # Every chain starts at x_T = 100: the output is N(slope 100 + shift, the noise's variance). The chain
    # forgets x_T (slope 2.2e-4), so x_T is far out to move the mean by 17-23 standard errors.
    x_T = jnp.full(SHAPE, 100.0)
    for loop, kw, use in [
        (sampling.sample_loop, {}, np.arange(T)),
        (sampling.respaced_sample_loop, {"num_steps": 25}, kept(25)),
    ]:
        x = run(loop, sched, gaussian_model(a, sig), 3, x_T=x_T, parameterization="x0", **kw)
        law = ancestral_law(a[use], sig[use], prior=(100.0, 0.0))
        check_law(x, law)
        assert abs(law[0] - ancestral_law(a[use], sig[use])[0]) > 2 * N_SE * np.sqrt(law[1] / N)
    with pytest.raises(AssertionError):  # chex: x_T must have the samples' shape
        sampling.sample_loop(sched, gaussian_model(a, sig), SHAPE, jax.random.PRNGKey(0), x_T=jnp.zeros((2, 1, 1, 1)))


# ----------------------------------------------------------------------------- DDIM


def test_ddim_eta0_is_a_deterministic_map_of_x_T(sched):
    a, sig = vp_marginals(sched)
    use = kept(50)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(256, 1, 1, 1)), jnp.float32)

    loop = jax.jit(
        lambda r, eta: sampling.ddim_sample_loop(
            sched,
            gaussian_model(a, sig),
            x_T.shape,
            r,
            num_steps=50,
            eta=eta,
            parameterization="x0",
            clip_denoised=False,
            x_T=x_T,
        )["samples"]
    )

    def ddim(rng, eta):
        return np.asarray(loop(jax.random.PRNGKey(rng), eta), np.float64)

    # Different keys, same x_T: eta = 0 uses no noise, so the samples are the same to the bit...
    np.testing.assert_array_equal(ddim(1, 0.0), ddim(2, 0.0))
    # ... and they are the affine map x_0 = slope x_T + shift of the exact recursion.
    shift = ddim_law(a[use], sig[use], 0.0, prior=(0.0, 0.0))[0]
    slope = ddim_law(a[use], sig[use], 0.0, prior=(1.0, 0.0))[0] - shift
    np.testing.assert_allclose(ddim(1, 0.0), slope * np.asarray(x_T, np.float64) + shift, atol=1e-5)
    # With eta = 1 the key matters (so the comparison above can fail).
    assert np.abs(ddim(1, 1.0) - ddim(2, 1.0)).max() > 0.05
    # Without x_T the key draws x_T ~ N(0, 1): the law of the exact recursion at these 50 steps.
    check_law(
        run(sampling.ddim_sample_loop, sched, gaussian_model(a, sig), 4, num_steps=50, eta=0.0, parameterization="x0"),
        ddim_law(a[use], sig[use], 0.0),
    )


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_eta0_parameterizations_have_the_exact_law(sched, parameterization):
    a, sig = vp_marginals(sched)
    x = run(
        sampling.ddim_sample_loop,
        sched,
        gaussian_model(a, sig, parameterization),
        5,
        num_steps=25,
        eta=0.0,
        parameterization=parameterization,
    )
    check_law(x, ddim_law(a[kept(25)], sig[kept(25)], 0.0))


def test_ddim_eta1_full_steps_is_ancestral_sampling_in_law(sched):
    a, sig = vp_marginals(sched)
    # The two recursions agree exactly (DDIM's sigma^2 at eta = 1 is the posterior variance) ...
    np.testing.assert_allclose(ddim_law(a, sig, 1.0), ancestral_law(a, sig), rtol=1e-12)
    # ... and differ from eta = 0's by more than twice the tolerance (9%, 9 standard errors).
    assert abs(ddim_law(a, sig, 0.0)[1] / ancestral_law(a, sig)[1] - 1) > 2 * N_SE * np.sqrt(2 / N)
    x = run(sampling.ddim_sample_loop, sched, gaussian_model(a, sig), 6, num_steps=T, eta=1.0, parameterization="x0")
    check_law(x, ancestral_law(a, sig))


# ----------------------------------------------------------------------------- respacing


@pytest.mark.parametrize(
    "parameterization,variance",
    [
        ("x0", "fixed_small"),
        ("eps", "fixed_small"),
        ("v", "fixed_small"),
        ("mean", "fixed_small"),
        ("x0", "fixed_large"),
        ("mean", "learned_range"),
        ("eps", "learned_range"),
    ],
)
def test_respaced_sampler_has_the_exact_law_of_the_short_chain(sched, parameterization, variance):
    # The respaced chain keeps the marginals at the kept steps and forms its posterior from them
    # (fixed_large: its own beta; learned_range: between its own beta and posterior variance).
    # A "mean" model predicts the full chain's one-step mean: the sampler must read it as such.
    a, sig = vp_marginals(sched)
    use = kept(25)
    channel, ref_kw = var_channel(variance, sched)
    x = run(
        sampling.respaced_sample_loop,
        sched,
        gaussian_model(a, sig, parameterization, channel),
        7,
        num_steps=25,
        parameterization=parameterization,
        variance=variance,
    )
    check_law(x, ancestral_law(a[use], sig[use], variance=variance, **ref_kw(use)))


def test_respaced_mean_model_samples_as_the_x0_model(sched):
    # The exact mean model is the full chain's posterior mean of the exact x0 model: respaced, both must
    # give the same samples from the same key (up to float32). (25 steps: the law test above.)
    a, sig = vp_marginals(sched)
    x0, mean = (
        run(sampling.respaced_sample_loop, sched, gaussian_model(a, sig, p), 8, num_steps=10, parameterization=p)
        for p in ("x0", "mean")
    )
    np.testing.assert_allclose(mean, x0, atol=1e-5)  # 1e-6 seen


def test_respaced_with_all_steps_is_the_ancestral_sampler(sched):
    a, sig = vp_marginals(sched)
    full = sampling.respaced_sample_loop(
        sched,
        gaussian_model(a, sig),
        (64, 1, 1, 1),
        jax.random.PRNGKey(9),
        num_steps=T,
        parameterization="x0",
        num_frames=3,
    )
    anc = sampling.sample_loop(
        sched, gaussian_model(a, sig), (64, 1, 1, 1), jax.random.PRNGKey(9), parameterization="x0", num_frames=3
    )
    # Same keys, the same draws: equal up to the float32 rebuild of the tables.
    np.testing.assert_allclose(full["samples"], anc["samples"], atol=2e-4)
    np.testing.assert_array_equal(full["frame_t"], anc["frame_t"])


def test_kept_timesteps():
    np.testing.assert_array_equal(sampling.kept_timesteps(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sampling.kept_timesteps(T, 25), kept(25))
    np.testing.assert_array_equal(sampling.kept_timesteps(T, 1), [0])
    for bad in (0, T + 1, 2.0, True):
        with pytest.raises(ValueError, match="sampling steps"):
            sampling.kept_timesteps(T, bad)


# ----------------------------------------------------------------------------- frames and clipping


def test_frames_are_the_chain_and_its_denoised_predictions(sched):
    a, sig = vp_marginals(sched)
    x_T = jnp.asarray(np.random.default_rng(1).normal(size=(64, 1, 1, 1)), jnp.float32)
    out = sampling.sample_loop(
        sched,
        gaussian_model(a, sig),
        (64, 1, 1, 1),
        jax.random.PRNGKey(10),
        parameterization="x0",
        clip_denoised=False,
        num_frames=T,
        x_T=x_T,
    )
    assert out["frames"].shape == out["pred_x0"].shape == (T, 64, 1, 1, 1)
    np.testing.assert_array_equal(out["frame_t"], np.arange(T - 1, -1, -1))
    # pred_x0 at step t is the denoiser at the step's input: x_T, then the previous frame.
    inputs = np.concatenate([np.asarray(x_T, np.float64)[None], np.asarray(out["frames"][:-1], np.float64)])
    g, h = denoiser(a[::-1], sig[::-1])
    np.testing.assert_allclose(
        out["pred_x0"], h[:, None, None, None, None] + g[:, None, None, None, None] * inputs, atol=1e-5
    )
    # The last frame is x_0 itself (these data lie well inside [-1, 1], so the clip does not touch them).
    assert np.abs(out["frames"][-1]).max() < 1
    np.testing.assert_array_equal(out["frames"][-1], out["samples"])
    few = sampling.sample_loop(
        sched,
        gaussian_model(a, sig),
        (64, 1, 1, 1),
        jax.random.PRNGKey(10),
        parameterization="x0",
        clip_denoised=False,
        num_frames=5,
        x_T=x_T,
    )
    np.testing.assert_array_equal(few["frame_t"], [199, 149, 99, 50, 0])
    np.testing.assert_array_equal(few["frames"], np.asarray(out["frames"])[[0, 50, 100, 149, 199]])


def test_samples_are_the_chain_clipped_to_the_data_range(sched):
    # Data N(0.8, 0.5^2): a known fraction of the final x_0 lies above 1 and must come out as exactly 1.
    m, sd = 0.8, 0.5
    a, sig = vp_marginals(sched)
    out = jax.jit(
        lambda r: sampling.sample_loop(
            sched,
            gaussian_model(a, sig, m=m, sd=sd),
            SHAPE,
            r,
            parameterization="x0",
            clip_denoised=False,
            num_frames=2,
        )
    )(jax.random.PRNGKey(11))
    final, samples = np.asarray(out["frames"][-1]), np.asarray(out["samples"])
    np.testing.assert_array_equal(samples, np.clip(final, -1, 1))
    mu, var = ancestral_law(a, sig, m=m, sd=sd)
    for frac, p in [
        ((samples == 1).mean(), stats.norm.sf(1, mu, np.sqrt(var))),
        ((samples == -1).mean(), stats.norm.cdf(-1, mu, np.sqrt(var))),
    ]:
        assert abs(frac - p) < N_SE * np.sqrt(p * (1 - p) / N) + 1 / N, (frac, p)
    assert (samples == 1).mean() > 0.3  # p = 0.34 above 1 (and 1e-4 below -1): the clip is exercised


# --- the methods' samplers mappings (ddpm_jax.methods): the one list validation, dispatch and the flags read


def _runlocal_method(name, cls=None):
    config = importlib.import_module(f"configs.{name}").get_config("runlocal")
    return (cls or methods.REGISTRY[name])(config)


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_a_methods_samplers_mapping_is_what_validation_reads(name):
    method = _runlocal_method(name)
    names = list(type(method).samplers)
    assert names and all(isinstance(entry, Sampler) for entry in type(method).samplers.values())
    assert method.default_sampler() == names[0] == "ancestral"
    for sampler in names:  # every entry passes the name check (its own check may still ask for --steps)
        try:
            method.check_sampler(sampler, 5, 0.0)
        except ConfigError as e:
            assert "is not available" not in str(e)
    for sampler in sorted(set(methods.SAMPLERS) - set(names)) + ["plms"]:
        message = f"--sampler={sampler!r} is not available for method {name!r}; use one of {', '.join(names)}."
        with pytest.raises(ConfigError, match=re.escape(message)):
            method.check_sampler(sampler, 5, 0.0)
        with pytest.raises(ConfigError, match=re.escape(message)):
            method.sampler_label(sampler, 5)
        with pytest.raises(ConfigError, match=re.escape(message)):  # dispatch reads the same mapping
            method.sample(None, None, 1, sampler=sampler, num_steps=5, eta=0.0)
    segment = dict(part.split(": ", 1) for part in methods.sampler_help().split("; "))[name]  # the flag's help
    assert re.findall(r"(?:^|\), )([a-z]+) \(", segment) == names


def test_the_sampler_flags_list_is_the_union_of_the_mappings_in_order():
    union = tuple(dict.fromkeys(s for cls in methods.REGISTRY.values() for s in cls.samplers))
    assert methods.SAMPLERS == union == ("ancestral", "respaced", "ddim")
    expected = {"ddpm": ["ancestral", "respaced", "ddim"], "vdm": ["ancestral", "ddim"]}
    for name, cls in methods.REGISTRY.items():
        assert list(cls.samplers) == expected.get(name, ["ancestral"])


def test_a_new_mapping_entry_is_all_a_sampler_needs():
    """One entry added to a method's mapping: validated, dispatched and labelled with no other change."""
    calls = []

    def check(method, sampler, num_steps, eta):
        calls.append((sampler, num_steps, eta))
        if num_steps is None:
            raise ConfigError(f"--sampler={sampler} needs --steps")

    def draw(method, params, rng, num, *, num_steps, eta, num_frames):
        return {"samples": (params, rng, num, num_steps, eta, num_frames)}

    base = methods.REGISTRY["ddpm"]
    probe = Sampler(draw, check=check, label="probe!")
    Probed = type("Probed", (base,), {"samplers": {**base.samplers, "probe": probe}})
    method = _runlocal_method("ddpm", Probed)
    method.check_sampler("probe", 3, 0.5)
    assert calls == [("probe", 3, 0.5)]
    with pytest.raises(ConfigError, match="needs --steps"):
        method.check_sampler("probe", None, 0.5)
    with pytest.raises(ConfigError, match="--eta must lie in"):  # the checks every sampler shares come first
        method.check_sampler("probe", 3, 1.5)
    assert len(calls) == 2
    out = method.sample("p", "k", 2, sampler="probe", num_steps=3, eta=0.5, num_frames=4)
    assert out["samples"] == ("p", "k", 2, 3, 0.5, 4)
    assert method.sampler_label("probe", 3) == "probe!"
    assert method.sampler_label("ddim", 50) == "ddim50" and method.sampler_label("respaced", 100) == "respaced100"
    assert method.sampler_label("ancestral", None) == "ancestral"
    with pytest.raises(dataclasses.FrozenInstanceError):
        probe.label = "other"
    with pytest.raises(ConfigError, match=re.escape("use one of ancestral, respaced, ddim.")):
        _runlocal_method("ddpm").check_sampler("probe", 3, 0.5)  # the method's own mapping is unchanged

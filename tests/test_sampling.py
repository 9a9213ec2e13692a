"""Samplers on data whose optimal denoiser is analytic: x0 ~ N(m, s^2) per dimension.

For Gaussian data E[x0 | x_t] = m + g_t (x_t - a_t m), g_t = a_t s^2 / (a_t^2 s^2 + sigma_t^2), with
a_t, sigma_t the marginal's signal scale and noise std. Fed to a sampler as an "x0" model, every
step is affine in x_t plus Gaussian noise, so the law of the output is N(mu, v) with (mu, v) from
an exact float64 recursion written here independently of the library: the samplers must match it
up to Monte Carlo error. (Fixed-small ancestral sampling and DDIM both shrink the variance a little
at finite T: that deficit is part of the recursion, not an error.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.schedules import make_schedule

M, S = 0.3, 0.2
N = 4000  # samples, as [N, 1, 1, 1] images: standard error of the mean S / sqrt(N) = 0.003


def gaussian_x0_model(sched):
    def model_fn(x, t):
        a = sched.sqrt_alphas_cumprod[t][:, None, None, None]
        sig = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        return M + a * S**2 / (a**2 * S**2 + sig**2) * (x - a * M)

    return model_fn


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", 200)


def _float64_tables(sched):
    betas = np.asarray(sched.betas, np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return betas, abar, abar_prev


def ancestral_law(sched):
    """(mean, var) of fixed-small ancestral sampling with the exact Gaussian x0 model (Ho et al. eq. 7)."""
    betas, abar, abar_prev = _float64_tables(sched)
    mu, var = 0.0, 1.0  # x_T ~ N(0, 1)
    for t in range(len(betas) - 1, -1, -1):
        a, sig2 = np.sqrt(abar[t]), 1 - abar[t]
        g = a * S**2 / (a**2 * S**2 + sig2)
        c1 = np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t])
        c2 = np.sqrt(1 - betas[t]) * (1 - abar_prev[t]) / (1 - abar[t])
        slope, shift = c1 * g + c2, c1 * (M - g * a * M)
        post_var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t]) if t > 0 else 0.0
        mu, var = slope * mu + shift, slope**2 * var + post_var
    return mu, var


def ddim_law(sched, num_steps, eta):
    """(mean, var) of DDIM (Song et al. eq. 12) over the sampler's evenly spaced steps."""
    _, abar, _ = _float64_tables(sched)
    use = np.unique(np.linspace(0, len(abar) - 1, num_steps).round().astype(int))
    mu, var = 0.0, 1.0
    for i in range(len(use) - 1, -1, -1):
        t = use[i]
        ab, ab_prev = abar[t], (abar[use[i - 1]] if i > 0 else 1.0)
        a = np.sqrt(ab)
        g = a * S**2 / (a**2 * S**2 + 1 - ab)
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        c_eps = np.sqrt(max(1 - ab_prev - sigma2, 0.0)) / np.sqrt(1 - ab)
        # x_prev = sqrt(ab_prev) x0 + c_eps (x - a x0) + sigma z, with x0 = M + g (x - a M).
        k = np.sqrt(ab_prev) - c_eps * a
        slope, shift = k * g + c_eps, k * (M - g * a * M)
        mu, var = slope * mu + shift, slope**2 * var + sigma2
    return mu, var


def _check_law(x, law):
    x = np.asarray(x, np.float64).ravel()
    mu, var = law
    # standard errors of the sample mean and variance for N Gaussian draws, 5 sigma
    assert abs(x.mean() - mu) < 5 * np.sqrt(var / N), (x.mean(), mu)
    assert abs(x.var() - var) < 5 * var * np.sqrt(2 / N), (x.var(), var)


def _check_moments(x):
    """Close to the data law itself (the finite-T deficit is a few per cent)."""
    x = np.asarray(x).ravel()
    assert abs(x.mean() - M) < 0.02, x.mean()
    assert abs(x.std() / S - 1) < 0.12, x.std()


def test_ancestral_sampler_reproduces_the_data_distribution(sched):
    out = jax.jit(lambda r: sampling.sample_loop(sched, gaussian_x0_model(sched), (N, 1, 1, 1), r,
                                                 parameterization="x0", clip_denoised=False))(jax.random.PRNGKey(0))
    _check_law(out["samples"], ancestral_law(sched))
    _check_moments(out["samples"])


def test_ddim_eta0_is_deterministic_and_matches_the_data(sched):
    run = jax.jit(lambda r: sampling.ddim_sample_loop(sched, gaussian_x0_model(sched), (N, 1, 1, 1), r,
                                                      num_steps=50, eta=0.0, parameterization="x0",
                                                      clip_denoised=False)["samples"])
    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    _check_law(a, ddim_law(sched, 50, 0.0))
    _check_moments(a)
    # eta = 0 is a deterministic map of x_T: the same x_T (same key) whatever else changes.
    assert not np.allclose(a, run(jax.random.PRNGKey(2)))


def test_ddim_eta1_full_steps_matches_ancestral_in_distribution(sched):
    ddim = sampling.ddim_sample_loop(sched, gaussian_x0_model(sched), (N, 1, 1, 1), jax.random.PRNGKey(3),
                                     num_steps=sched.num_timesteps, eta=1.0, parameterization="x0",
                                     clip_denoised=False)["samples"]
    anc = sampling.sample_loop(sched, gaussian_x0_model(sched), (N, 1, 1, 1), jax.random.PRNGKey(4),
                               parameterization="x0", clip_denoised=False)["samples"]
    _check_law(ddim, ddim_law(sched, sched.num_timesteps, 1.0))
    _check_law(ddim, ancestral_law(sched))  # eta = 1, K = T is the ancestral sampler's law
    assert abs(float(jnp.mean(ddim)) - float(jnp.mean(anc))) < 0.02
    assert abs(float(jnp.std(ddim)) / float(jnp.std(anc)) - 1) < 0.06


def test_respaced_schedule_keeps_alphas_cumprod(sched):
    short, use = sampling.respaced_schedule(sched, 20)
    assert short.num_timesteps == len(use) == 20
    abar = np.cumprod(1 - np.asarray(sched.betas, np.float64))
    np.testing.assert_allclose(np.asarray(short.alphas_cumprod), abar[use], rtol=1e-5)


def test_frames_run_from_noise_to_data(sched):
    out = sampling.sample_loop(sched, gaussian_x0_model(sched), (64, 1, 1, 1), jax.random.PRNGKey(5),
                               parameterization="x0", num_frames=5)
    assert out["frames"].shape == (5, 64, 1, 1, 1)
    assert int(out["frame_t"][0]) == sched.num_timesteps - 1 and int(out["frame_t"][-1]) == 0
    np.testing.assert_array_equal(out["frames"][-1], np.clip(out["samples"], -1, 1))


def test_respaced_sampler_has_the_law_of_ddim_eta1_on_the_kept_steps(sched):
    # Ancestral sampling on the respaced chain (Nichol & Dhariwal) is DDIM with eta = 1 on the same steps:
    # its posterior variance (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev) is DDIM's sigma^2.
    run = jax.jit(lambda r: sampling.respaced_sample_loop(sched, gaussian_x0_model(sched), (N, 1, 1, 1), r,
                                                          num_steps=25, parameterization="x0",
                                                          clip_denoised=False)["samples"])
    _check_law(run(jax.random.PRNGKey(6)), ddim_law(sched, 25, 1.0))
    # K = T is the ancestral sampler itself (same keys: the same draws), up to the float32 table rebuild.
    full = sampling.respaced_sample_loop(sched, gaussian_x0_model(sched), (64, 1, 1, 1), jax.random.PRNGKey(7),
                                         num_steps=sched.num_timesteps, parameterization="x0", num_frames=3)
    anc = sampling.sample_loop(sched, gaussian_x0_model(sched), (64, 1, 1, 1), jax.random.PRNGKey(7),
                               parameterization="x0", num_frames=3)
    np.testing.assert_allclose(full["samples"], anc["samples"], atol=2e-4)
    np.testing.assert_array_equal(full["frame_t"], anc["frame_t"])
    with pytest.raises(ValueError, match="sampling steps"):
        sampling.kept_timesteps(sched.num_timesteps, sched.num_timesteps + 1)

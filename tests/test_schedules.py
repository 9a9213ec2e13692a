"""ddpm_jax.core.schedules against independent float64 NumPy formulas.

Every reference here is written from the papers / the lecture, not taken from the library:
Ho et al. 2020 (linear, quadratic, sigmoid ranges of the original code), Nichol & Dhariwal 2021
(cosine, the 1000/T rescaling of the linear range), Song & Ermon 2019 (geometric VE sigmas).
Index t in 0..T-1 is the lecture's step t+1.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import schedules as S

# --- error bookkeeping for the release note (printed with `pytest -s`) -----------------------
ERRORS: dict = {}


def record(name, actual, ref):
    """Largest abs / rel error of `actual` against the float64 `ref`; rel over nonzero refs."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(ref, np.float64)
    err = np.abs(a - r)
    nz = np.abs(r) > 0
    rel = float(np.max(err[nz] / np.abs(r[nz]))) if nz.any() else 0.0
    old = ERRORS.get(name, (0.0, 0.0))
    ERRORS[name] = (max(old[0], float(err.max())), max(old[1], rel))


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    print("\n[schedules] largest error vs float64 reference (abs, rel):")
    for k, (a, r) in sorted(ERRORS.items()):
        print(f"  {k:45s} abs={a:.3e} rel={r:.3e}")


# --- float64 references ------------------------------------------------------------------------


def ref_betas(name, T):
    scale = 1000.0 / T
    lo, hi = 1e-4 * scale, 0.02 * scale
    if name == "linear":
        return lo + (hi - lo) * np.arange(T) / (T - 1) if T > 1 else np.array([lo])
    if name == "quadratic":
        return (math.sqrt(lo) + (math.sqrt(hi) - math.sqrt(lo)) * np.arange(T) / max(T - 1, 1)) ** 2
    if name == "constant":
        return np.full(T, hi)
    if name == "sigmoid":
        x = -6.0 + 12.0 * np.arange(T) / max(T - 1, 1)
        return lo + (hi - lo) / (1.0 + np.exp(-x))
    if name == "cosine":
        # Nichol & Dhariwal eq. 17: abar(t) = f(t)/f(0), beta_t = 1 - abar(t)/abar(t-1), clipped at 0.999.
        s = 0.008
        f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1.0 - f(i + 1) / f(i), 0.999) for i in range(T)])
    raise AssertionError(name)


def ref_vp_tables(betas):
    """Ho et al. eqs. 4, 6, 7 written out with a python loop over the lecture's steps."""
    T = len(betas)
    abar = np.empty(T)
    acc = 1.0
    for i, b in enumerate(betas):
        acc *= 1.0 - b
        abar[i] = acc
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    alphas = 1.0 - betas
    post_var = (1.0 - abar_prev) / (1.0 - abar) * betas
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        posterior_variance=post_var,
        # improved-diffusion: the t=0 entry (0) is replaced by the t=1 entry before the log.
        posterior_log_variance_clipped=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        posterior_mean_coef1=np.sqrt(abar_prev) * betas / (1.0 - abar),
        posterior_mean_coef2=np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),
    )


# --- betas_for --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "quadratic", "cosine", "constant", "sigmoid"])
@pytest.mark.parametrize("T", [50, 1000])
def test_betas_for_matches_numpy(name, T):
    got = S.betas_for(name, T)
    ref = ref_betas(name, T)
    assert got.dtype == np.float64 and got.shape == (T,)
    # float64 on both sides; 1 - f(t+1)/f(t) cancels, so allow a few ulps of 1 in absolute terms.
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    record(f"betas_for[{name}]", got, ref)
    assert np.all((got > 0) & (got < 1))


def test_betas_for_linear_is_ho_range_at_1000():
    b = S.betas_for("linear", 1000)
    assert b[0] == pytest.approx(1e-4, rel=1e-12) and b[-1] == pytest.approx(0.02, rel=1e-12)
    b = S.betas_for("linear", 200)  # rescaled by 1000 / 200 = 5
    assert b[0] == pytest.approx(5e-4, rel=1e-12) and b[-1] == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "quadratic", "constant", "sigmoid"])
def test_short_chains_clip_at_max_beta(name):
    # T = 10 scales the range by 100: 0.01 .. 2.0, past 1. Every schedule is clipped at max_beta (0.999).
    T = 10
    b = S.betas_for(name, T)
    np.testing.assert_allclose(b, np.minimum(ref_betas(name, T), 0.999), rtol=1e-12)
    assert b.max() == pytest.approx(0.999) and np.all(b < 1)
    assert S.make_schedule(name, T).num_timesteps == T


def test_betas_for_cosine_clip():
    # T = 10: the last cosine step would be 1 - f(T)/f(T-1) = 1 (f(T) = cos(pi/2)^2 = 0): clipped to 0.999.
    b = S.betas_for("cosine", 10)
    assert b[-1] == pytest.approx(0.999)
    assert S.betas_for("cosine", 10, max_beta=0.5).max() == pytest.approx(0.5)


def test_betas_for_unknown_name_lists_valid():
    with pytest.raises(ValueError) as e:
        S.betas_for("cosin", 100)
    msg = str(e.value)
    assert "cosin" in msg
    for n in ("linear", "quadratic", "cosine", "constant", "sigmoid"):
        assert n in msg


@pytest.mark.parametrize("T", [0, -3, 2.5, None])
def test_betas_for_bad_num_timesteps(T):
    with pytest.raises(ValueError):
        S.betas_for("linear", T)
    with pytest.raises(ValueError):
        S.make_schedule("cosine", T)


def test_betas_outside_unit_interval_rejected():
    for bad in ([0.1, 0.0, 0.2], [0.1, 1.0], [0.5, -0.1], [0.1, np.nan], [], [[0.1, 0.2]]):
        with pytest.raises(ValueError):
            S.make_schedule(np.asarray(bad, np.float64))
    with pytest.raises(ValueError):
        S.make_schedule(lambda T: np.full(T, 1.5), 4)


def test_mismatched_length_rejected():
    with pytest.raises(ValueError):
        S.make_schedule(np.full(5, 0.1), 6)
    with pytest.raises(ValueError):
        S.make_schedule(lambda T: np.full(T + 1, 0.1), 6)
    # and the consistent forms are accepted
    assert S.make_schedule(np.full(5, 0.1), 5).num_timesteps == 5
    assert S.make_schedule(lambda T: np.full(T, 0.1), 7).num_timesteps == 7


# --- make_schedule (VP) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,T",
    [
        ("linear", 1000),
        ("linear", 40),
        ("cosine", 1000),
        ("cosine", 20),
        ("quadratic", 100),
        ("sigmoid", 100),
        ("constant", 30),
    ],
)
def test_make_schedule_vp_tables(name, T):
    sched = S.make_schedule(name, T)
    ref = ref_vp_tables(ref_betas(name, T))
    assert sched.num_timesteps == T
    for key, r in ref.items():
        got = np.asarray(getattr(sched, key))
        assert got.dtype == np.float32 and got.shape == (T,), key
        # Each table is computed in float64 and rounded once to float32: half an ulp, 2^-24 ~ 6e-8,
        # plus the float64 noise of (a/a_prev)^2 vs 1-beta, far below it.
        np.testing.assert_allclose(got, r, rtol=2e-7, atol=0, err_msg=key)
        record(f"make_schedule.{key}", got, r)
    assert float(sched.prior_variance) == pytest.approx(1.0, abs=1e-7)


def test_make_schedule_from_array_and_callable_equal_named():
    b = ref_betas("cosine", 64)
    a = S.make_schedule("cosine", 64)
    for other in (S.make_schedule(b), S.make_schedule(b, 64), S.make_schedule(lambda T: ref_betas("cosine", T), 64)):
        for key in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
            np.testing.assert_allclose(np.asarray(getattr(other, key)), np.asarray(getattr(a, key)), rtol=1e-7)


def test_schedule_is_a_pytree():
    sched = S.make_schedule("linear", 40)
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert len(leaves) == 11
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.num_timesteps == 40
    doubled = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: 2 * x, s))(sched)
    np.testing.assert_allclose(np.asarray(doubled.betas), 2 * np.asarray(sched.betas))


# --- VE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,smin,smax", [(10, 0.01, 50.0), (100, 0.002, 80.0)])
def test_ve_schedule(T, smin, smax):
    sched = S.make_schedule("ve", T, sigma_min=smin, sigma_max=smax)
    sig = smin * (smax / smin) ** (np.arange(T) / (T - 1))  # geometric, written independently
    np.testing.assert_allclose(np.asarray(sched.sqrt_alphas_cumprod), 1.0, rtol=0, atol=0)  # signal 1
    np.testing.assert_allclose(np.asarray(sched.sqrt_one_minus_alphas_cumprod), sig, rtol=2e-7)
    np.testing.assert_allclose(np.asarray(sched.noise_std), sig, rtol=2e-7)
    record("make_schedule[ve].noise_std", sched.noise_std, sig)
    sig_prev2 = np.concatenate([[0.0], sig[:-1] ** 2])
    step_var = sig**2 - sig_prev2  # q(x_t|x_{t-1}) = N(x_{t-1}, sigma_t^2 - sigma_{t-1}^2)
    np.testing.assert_allclose(np.asarray(sched.betas), step_var, rtol=3e-7)
    np.testing.assert_allclose(np.asarray(sched.alphas), 1.0, atol=0)
    record("make_schedule[ve].betas", sched.betas, step_var)
    # Posterior by Bayes: precision = 1/sigma_{t-1}^2 + 1/step_var; mean = var * (x0/sigma_{t-1}^2 + xt/step_var).
    with np.errstate(divide="ignore"):
        prec = 1.0 / sig_prev2[1:] + 1.0 / step_var[1:]
    post_var = np.concatenate([[0.0], 1.0 / prec])
    c1 = np.concatenate([[1.0], post_var[1:] / sig_prev2[1:]])  # t = 0: the posterior is x0 itself
    c2 = np.concatenate([[0.0], post_var[1:] / step_var[1:]])
    np.testing.assert_allclose(np.asarray(sched.posterior_variance), post_var, rtol=3e-7, atol=0)
    np.testing.assert_allclose(np.asarray(sched.posterior_mean_coef1), c1, rtol=3e-7)
    np.testing.assert_allclose(np.asarray(sched.posterior_mean_coef2), c2, rtol=3e-7, atol=0)
    np.testing.assert_allclose(
        np.asarray(sched.posterior_log_variance_clipped),
        np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        rtol=1e-6,
    )
    record("make_schedule[ve].posterior_variance", sched.posterior_variance, post_var)
    record("make_schedule[ve].posterior_mean_coef1", sched.posterior_mean_coef1, c1)
    record("make_schedule[ve].posterior_mean_coef2", sched.posterior_mean_coef2, c2)
    assert float(sched.prior_variance) == pytest.approx(1.0 + smax**2, rel=1e-6)


def test_ve_bad_sigmas():
    with pytest.raises(ValueError):
        S.make_schedule("ve", 10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        S.make_schedule("ve", 0)


# --- the forward process composes -------------------------------------------------------------


@pytest.mark.parametrize("name,T", [("linear", 1000), ("cosine", 100), ("sigmoid", 50)])
def test_steps_compose_into_jump_vp(name, T):
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e: composing the one-step Gaussians in float64
    (mean coefficient multiplies, variance v_t = alpha_t v_{t-1} + beta_t) gives the jump
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) stored in the schedule."""
    b = ref_betas(name, T)
    sched = S.make_schedule(name, T)
    coef, var = np.empty(T), np.empty(T)
    c, v = 1.0, 0.0
    for i in range(T):
        c, v = math.sqrt(1.0 - b[i]) * c, (1.0 - b[i]) * v + b[i]
        coef[i], var[i] = c, v
    np.testing.assert_allclose(np.asarray(sched.sqrt_alphas_cumprod), coef, rtol=2e-7)
    np.testing.assert_allclose(np.asarray(sched.sqrt_one_minus_alphas_cumprod), np.sqrt(var), rtol=2e-7)
    record("jump(composed steps).signal", sched.sqrt_alphas_cumprod, coef)
    record("jump(composed steps).noise_std", sched.sqrt_one_minus_alphas_cumprod, np.sqrt(var))
    # Two steps at a time, as on the lecture's slide: x_{t} from x_{t-2}, both from the schedule's
    # own float32 one-step tables (consistency of betas/alphas with the stored marginals).
    al = np.asarray(sched.alphas, np.float64)
    be = np.asarray(sched.betas, np.float64)
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    for t in range(2, T):
        mean2 = math.sqrt(al[t] * al[t - 1])
        var2 = al[t] * be[t - 1] + be[t]  # alpha_t (1 - alpha_{t-1}) + (1 - alpha_t) = 1 - alpha_t alpha_{t-1}
        assert var2 == pytest.approx(1.0 - al[t] * al[t - 1], abs=1e-6)
        # q(x_t | x_0) = compose(q(x_t | x_{t-2}), q(x_{t-2} | x_0))
        assert mean2 * math.sqrt(ab[t - 2]) == pytest.approx(math.sqrt(ab[t]), rel=2e-6)
        assert al[t] * al[t - 1] * (1 - ab[t - 2]) + var2 == pytest.approx(1.0 - ab[t], rel=2e-6, abs=1e-7)


def test_steps_compose_into_jump_ve():
    sched = S.make_schedule("ve", 30, sigma_min=0.01, sigma_max=50.0)
    step = np.asarray(sched.betas, np.float64)
    np.testing.assert_allclose(np.sqrt(np.cumsum(step)), np.asarray(sched.noise_std), rtol=1e-6)
    record("jump(composed steps)[ve].noise_std", np.sqrt(np.cumsum(step)), np.asarray(sched.noise_std, np.float64))


# --- a learned (traced) schedule ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vp_schedule_from_log_snr_matches_the_fixed_tables(name):
    T = 200
    ref = ref_vp_tables(ref_betas(name, T))
    abar = ref["alphas_cumprod"]
    sched = jax.jit(S.vp_schedule_from_log_snr)(jnp.asarray(np.log(abar) - np.log1p(-abar), jnp.float32))
    for key in (
        "betas",
        "alphas_cumprod",
        "posterior_variance",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_log_variance_clipped",
        "sqrt_one_minus_alphas_cumprod",
    ):
        # float32 log-SNR input: relative errors ~1e-6 * |log SNR| in abar, amplified by 1/beta in the betas.
        np.testing.assert_allclose(getattr(sched, key), ref[key], rtol=5e-4, err_msg=key)
        record(f"vp_schedule_from_log_snr[{name}].{key}", getattr(sched, key), ref[key])
    np.testing.assert_allclose(sched.prior_variance, 1.0, rtol=1e-6)

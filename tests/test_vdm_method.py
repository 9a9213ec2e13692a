"""ddpm_jax.methods.vdm (the VDM method's wiring) against float64 NumPy written from the paper.

Kingma et al. (2021): the negative ELBO is the 256-bin decoder's -log p(x | z_0) (a softmax over bins of
-0.5 (z_0 - alpha_0 v_k)^2 / sigma_0^2), the closed-form KL(q(z_1 | x) || N(0, I)) and eq. 17's
0.5 gamma'(t) ||eps - eps_hat(z_t; t)||^2 averaged over t. Here the method's `bound_terms` is checked
against `core.vdm.bound_bpd` and against that float64 reference on the same random draws, the network
being evaluated (in JAX) only at the reference's own z_t and conditioning; then the method's wiring (the
gamma conditioning, the base measure, fixed vs learned gamma) and its training draw of t (marginally
U(0, 1) over random positions, so `loss_terms` is an unbiased estimate of the bound).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from ddpm_jax import methods
from ddpm_jax.configuration import load_config_file
from ddpm_jax.data.digits_builder import digits_split_indices, digits_uint8

V = np.arange(256) / 127.5 - 1.0  # the bins v_k, float64
NUM_IMAGES = 16


def _method(learned_gamma: bool, base_measure: bool = True):
    config = load_config_file("vdm:runlocal")
    config.vdm.learned_gamma = learned_gamma
    config.vdm.base_measure = base_measure
    if "weighting" in config.vdm:  # the training loss is then the bound itself (what these tests compare)
        config.vdm.weighting = "elbo"
    return methods.from_config(config)


def softplus(x):
    return np.logaddexp(0.0, x)


def monotone_gamma_np(p, t, g_0=None, span=None):
    """MonotoneGamma (models/learned_schedule.py's docstring formula) in float64 NumPy:
    gamma_0 + softplus(span) (g(t) - g(0)) / (g(1) - g(0)), g(t) = l1(t) + l3(2 sigmoid(l2(l1(t))) - 1),
    each l a dense layer with softplus weights."""
    w = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in p.items() if isinstance(v, dict)}
    l1, l2, l3 = w["_PositiveDense_0"], w["_PositiveDense_1"], w["_PositiveDense_2"]

    def g(t):
        h = t[:, None] @ softplus(l1["kernel"]) + l1["bias"]
        return (h + (2.0 * special.expit(h @ softplus(l2["kernel"]) + l2["bias"]) - 1.0) @ softplus(l3["kernel"]))[:, 0]

    ends = g(np.array([0.0, 1.0]))
    return float(p["gamma_0"]) + softplus(float(p["gamma_span"])) * (g(t) - ends[0]) / (ends[1] - ends[0])


def gamma_and_slope_np(method, params, t):
    """gamma(t) and gamma'(t) in float64: linear, or the monotone net by central differences."""
    v = method.config.vdm
    if not v.learned_gamma:
        return v.gamma_min + (v.gamma_max - v.gamma_min) * t, np.full_like(t, v.gamma_max - v.gamma_min)
    h = 1e-6
    f = lambda s: monotone_gamma_np(params["gamma_net"], s)  # noqa: E731
    return f(t), (f(t + h) - f(t - h)) / (2 * h)


_SCORE_APPLY = {}


def net_eps_hat(method, params, z, cond):
    """The score network alone at float32 (z, cond), plus z (VDM's base measure), float64 out."""
    apply = _SCORE_APPLY.setdefault(id(method.model.score), jax.jit(method.model.score.apply))
    net = apply({"params": params["score"]}, jnp.asarray(z, jnp.float32), jnp.asarray(cond, jnp.float32))
    return z + np.asarray(net, np.float64)


def terms_reference(method, params, x, t, eps, eps_0):
    """The three terms per example (bits/dim, float64) at one t [B] with noise eps and the decoder's eps_0."""
    v = method.config.vdm
    dims = int(np.prod(x.shape[1:]))
    sig2 = special.expit  # sigma^2 = sigmoid(gamma), alpha^2 = sigmoid(-gamma)
    col = lambda a: a[:, None, None, None]  # noqa: E731
    # decoder: p(x = v_k | z_0) = softmax_k(-0.5 (z_0 - alpha_0 v_k)^2 / sigma_0^2)
    (g0, g1), _ = gamma_and_slope_np(method, params, np.array([0.0, 1.0]))
    a0, s0 = math.sqrt(sig2(-g0)), math.sqrt(sig2(g0))
    z0 = a0 * x + s0 * eps_0
    logits = -0.5 * (z0[..., None] - a0 * V) ** 2 / s0**2
    k = np.round((x + 1) * 127.5).astype(int)
    recon = -(np.take_along_axis(logits, k[..., None], -1)[..., 0] - special.logsumexp(logits, -1))
    # prior: KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) per dim
    prior = 0.5 * (sig2(g1) + sig2(-g1) * x**2 - 1.0 - np.log(sig2(g1)))
    # eq. 17 at t: 0.5 gamma'(t) ||eps - eps_hat(z_t; t)||^2, the network conditioned on the normalised gamma
    g, dg = gamma_and_slope_np(method, params, t)
    z = col(np.sqrt(sig2(-g))) * x + col(np.sqrt(sig2(g))) * eps
    eps_hat = net_eps_hat(method, params, z, (g - v.gamma_min) / (v.gamma_max - v.gamma_min))
    nats = dict(recon_bpd=recon.reshape(len(x), -1).sum(1), prior_bpd=prior.reshape(len(x), -1).sum(1))
    nats["diffusion_bpd"] = 0.5 * dg * np.sum((eps - eps_hat) ** 2, axis=(1, 2, 3))
    return {key: val / (dims * math.log(2)) for key, val in nats.items()}


def bound_reference(method, params, x, rng, num_t):
    """bound_bpd's estimate in float64, given its draws: eps_0, u_b and eps_j from the same keys; the
    diffusion term averaged over the shifted lattice t_j = mod(u_b + j / num_t, 1)."""
    k_rec, k_t, k_diff = jax.random.split(rng, 3)
    normal = lambda key: np.asarray(jax.random.normal(key, x.shape), np.float64)  # noqa: E731
    u = np.asarray(jax.random.uniform(k_t, (x.shape[0],)), np.float64)
    terms = [
        terms_reference(
            method, params, x, np.mod(u + j / num_t, 1.0), normal(jax.random.fold_in(k_diff, j)), normal(k_rec)
        )
        for j in range(num_t)
    ]
    out = dict(terms[0], diffusion_bpd=np.mean([term["diffusion_bpd"] for term in terms], axis=0))
    out["total_bpd"] = out["recon_bpd"] + out["prior_bpd"] + out["diffusion_bpd"]
    return out


def _perturbed(params, seed, scale):
    """params plus Gaussian noise (a trained-ish network and schedule, away from the initial values)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


@pytest.fixture(scope="module")
def images():
    """NUM_IMAGES digits test images in [-1, 1], float64 [N, 8, 8, 1]."""
    all_images, _ = digits_uint8()
    test = all_images[digits_split_indices()["test"][:NUM_IMAGES]]
    return test.astype(np.float64) / 127.5 - 1.0


@pytest.fixture(scope="module")
def learned():
    """A learned-gamma VDM with perturbed params: both the UNet and the monotone gamma moved off their init."""
    method = _method(learned_gamma=True)
    params = method.init_params(jax.random.PRNGKey(0))
    return method, params, _perturbed(params, seed=1, scale=0.3)


@pytest.fixture(scope="module")
def fixed():
    method = _method(learned_gamma=False)
    return method, _perturbed(method.init_params(jax.random.PRNGKey(2)), seed=3, scale=0.1)


# --- the bound -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["learned", "fixed"])
def test_bound_terms_is_bound_bpd_and_the_float64_reference(which, request, images):
    from ddpm_jax.core import vdm

    method, params = request.getfixturevalue(which)[0], request.getfixturevalue(which)[-1]
    num_t, rng = 6, jax.random.PRNGKey(7)
    x = jnp.asarray(images, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(8), NUM_IMAGES)
    got = jax.jit(lambda p, x, k, r: method.bound_terms(p, x, k, r, num_strata=num_t))(params, x, keys, rng)
    ref = bound_reference(method, params, images, rng, num_t)
    assert set(got) == set(ref) == {"recon_bpd", "diffusion_bpd", "prior_bpd", "total_bpd"}
    if which == "fixed":  # the method's bound is core.vdm.bound_bpd of its gamma_fn and model_fn, same keys
        core = jax.jit(lambda p, x, r: vdm.bound_bpd(method.gamma_fn(p), method.model_fn(p), x, r, num_t=num_t))
        for key, value in core(params, x, rng).items():
            np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    print(
        f"\n[{which}] bound {ref['total_bpd'].mean():.4f} bits/dim: "
        + ", ".join(f"{k} {v.mean():.3g}" for k, v in ref.items())
    )
    # float32 against float64: 1e-4 relative (a 1% error in any term fails; recon and prior are small, so absolute)
    np.testing.assert_allclose(got["total_bpd"], ref["total_bpd"], rtol=1e-4)
    np.testing.assert_allclose(got["diffusion_bpd"], ref["diffusion_bpd"], rtol=1e-4)
    np.testing.assert_allclose(got["recon_bpd"], ref["recon_bpd"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["prior_bpd"], ref["prior_bpd"], rtol=1e-3, atol=1e-7)
    assert ref["recon_bpd"].mean() > 1e-4 and ref["prior_bpd"].mean() > 1e-6  # both terms are non-trivial here


def test_loss_terms_at_given_inputs_is_the_float64_reference(learned, images):
    """The training loss at given (t, eps, eps_0): the same three terms, so its mean over the draw is the bound."""
    method, _, params = learned
    rng = np.random.default_rng(3)
    t = rng.uniform(size=NUM_IMAGES)
    t[:2] = [0.0, 1.0]  # the ends too
    eps, eps_0 = rng.standard_normal((2,) + images.shape)
    inputs = {"t": t, "noise": eps, "noise_0": eps_0, "weights": np.ones(NUM_IMAGES)}
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    got = jax.jit(lambda p, x, i: method.loss_terms(p, x, i))(params, jnp.asarray(images, jnp.float32), inputs)
    ref = terms_reference(method, params, images, t, eps, eps_0)
    np.testing.assert_allclose(got["diffusion_bpd"], ref["diffusion_bpd"], rtol=1e-4)
    np.testing.assert_allclose(got["recon_bpd"], ref["recon_bpd"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["prior_bpd"], ref["prior_bpd"], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(got["loss"], sum(ref.values()), rtol=1e-4)


# --- the wiring --------------------------------------------------------------------------------


def _eps_hat(method, params, z, t):
    """The method's eps_hat(z, t) (jitted: eager UNet calls dispatch op by op)."""
    f = jax.jit(lambda p, z, t: method.model_fn(p)(z, t))
    return f(params, jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32))


def test_fixed_gamma_is_linear_and_the_network_sees_t(fixed, images):
    """Fixed gamma: gamma(t) = gamma_min + (gamma_max - gamma_min) t, no schedule parameters, and so the
    conditioning (gamma - gamma_min) / (gamma_max - gamma_min) is t itself; eps_hat = z + network."""
    method, params = fixed
    v = method.config.vdm
    assert set(params) == {"score"}
    t = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(
        method.gamma_fn(params)(jnp.asarray(t, jnp.float32)),
        v.gamma_min + (v.gamma_max - v.gamma_min) * t,
        rtol=1e-6,
        atol=2e-6,
    )
    z = np.random.default_rng(0).standard_normal((len(t), 8, 8, 1))
    got = _eps_hat(method, params, z, t)
    np.testing.assert_allclose(got, net_eps_hat(method, params, z, t), rtol=1e-5, atol=1e-5)
    # the network's output is not negligible beside z: a missing base measure or a wrong t shows
    wrong_t = net_eps_hat(method, params, z, 1.0 - t)
    assert np.abs(np.asarray(got) - wrong_t).max() > 1e-2 and np.abs(np.asarray(got) - z).max() > 1e-2


def test_without_base_measure_eps_hat_is_the_network_alone(fixed):
    method, params = fixed
    bare = _method(learned_gamma=False, base_measure=False)
    z = np.random.default_rng(1).standard_normal((4, 8, 8, 1))
    t = np.array([0.05, 0.3, 0.6, 0.95])
    got = _eps_hat(bare, params, z, t)
    np.testing.assert_allclose(got, net_eps_hat(bare, params, z, t) - z, rtol=1e-5, atol=1e-5)


def test_learned_gamma_starts_at_the_endpoints_is_monotone_and_conditions_the_network(learned):
    method, init, params = learned
    v = method.config.vdm
    t = np.linspace(0.0, 1.0, 1001)
    g_init = np.asarray(method.gamma_fn(init)(jnp.asarray(t, jnp.float32)), np.float64)
    np.testing.assert_allclose(g_init[[0, -1]], [v.gamma_min, v.gamma_max], atol=1e-4)
    np.testing.assert_allclose(g_init, monotone_gamma_np(init["gamma_net"], t), rtol=1e-5, atol=1e-4)
    g = np.asarray(method.gamma_fn(params)(jnp.asarray(t, jnp.float32)), np.float64)
    np.testing.assert_allclose(g, monotone_gamma_np(params["gamma_net"], t), rtol=1e-5, atol=1e-4)
    for curve in (g_init, g):
        assert np.all(np.diff(curve) > 0)
    assert np.abs(g - (g[0] + (g[-1] - g[0]) * t)).max() > 0.5  # the learned curve is not linear here
    assert abs(g[0] - v.gamma_min) > 0.05  # and its endpoints moved: conditioning still uses the config's
    ts = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    z = np.random.default_rng(2).standard_normal((len(ts), 8, 8, 1))
    cond = (monotone_gamma_np(params["gamma_net"], ts) - v.gamma_min) / (v.gamma_max - v.gamma_min)
    got = _eps_hat(method, params, z, ts)
    np.testing.assert_allclose(got, net_eps_hat(method, params, z, cond), rtol=1e-4, atol=1e-4)


# --- the training draw ------------------------------------------------------------------------


def _draw_t(method, keys, batch, index):
    x = jnp.zeros((keys.shape[0], 8, 8, 1))
    return method.draw_training_inputs(keys, x, None, position=(index, batch))


def test_training_t_one_per_stratum_and_uniform_over_random_positions(fixed):
    method = fixed[0]
    batch = 16
    out = _draw_t(method, jax.random.split(jax.random.PRNGKey(0), batch), batch, jnp.arange(batch))
    t = np.asarray(out["t"])
    np.testing.assert_array_equal(np.floor(t * batch), np.arange(batch))  # position i in [i/B, (i+1)/B)
    np.testing.assert_array_equal(out["weights"], np.ones(batch))
    # over random positions (the data are shuffled), each t is U(0, 1)
    n = 20000
    index = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, batch)
    t = np.asarray(_draw_t(method, jax.random.split(jax.random.PRNGKey(2), n), batch, index)["t"], np.float64)
    assert stats.kstest(t, "uniform").pvalue > 1e-3
    counts = np.histogram(t, bins=50, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 1e-3
    # noise and noise_0 are independent standard normals, not the same draw
    nz = out["noise"].reshape(-1), out["noise_0"].reshape(-1)
    assert abs(float(np.corrcoef(*nz)[0, 1])) < 0.1 and abs(float(np.std(nz[0])) - 1) < 0.1


def test_eval_draw_is_uniform_at_every_position(fixed):
    """An eval batch's padding is masked: the real examples of a short last batch (its first positions) must not
    get only the low strata of t, as the training draw would give them."""
    method, n, batch = fixed[0], 4096, 128
    t = np.asarray(method.eval_inputs(jax.random.split(jax.random.PRNGKey(3), n), jnp.zeros((n, 8, 8, 1)))["t"])
    first = t.reshape(-1, batch)[:, :22].reshape(-1)  # positions 0..21 of each batch: 22 real of 128 in a last batch
    assert stats.kstest(first.astype(np.float64), "uniform").pvalue > 1e-3
    assert abs(first.mean() - 0.5) < 4 * np.sqrt(1 / 12 / first.size)  # training draw there: mean 11/128 = 0.086


def test_loss_terms_with_the_training_draw_is_an_unbiased_estimate_of_the_bound(fixed, images):
    """Mean over many training draws (random positions) of loss_terms = bound_terms with many t, per image (paired)."""
    method, params = fixed
    x = jnp.asarray(images, jnp.float32)
    reps, batch = 256, NUM_IMAGES

    @jax.jit
    def mean_loss(key):
        def one(key):
            k_pos, k_ex = jax.random.split(key)
            index = jax.random.permutation(k_pos, batch)
            inputs = method.draw_training_inputs(jax.random.split(k_ex, batch), x, None, position=(index, batch))
            return method.loss_terms(params, x, inputs)["loss"]

        return jnp.mean(jax.lax.map(one, jax.random.split(key, reps)), axis=0)

    est = np.asarray(mean_loss(jax.random.PRNGKey(0)), np.float64)
    keys = jax.random.split(jax.random.PRNGKey(1), batch)
    bound = jax.jit(lambda p, r: method.bound_terms(p, x, keys, r, num_strata=256))(params, jax.random.PRNGKey(2))
    d = est - np.asarray(bound["total_bpd"], np.float64)
    se = d.std(ddof=1) / math.sqrt(batch)
    print(
        f"\n[loss vs bound] loss {est.mean():.4f}, bound {float(bound['total_bpd'].mean()):.4f}, diff {d.mean():+.4f} +- {se:.4f}"
    )
    assert abs(d.mean()) < 4 * se
    # The MC check resolves a ~3% bias (the single-t loss of a random network is noisy); the exact check of
    # the draw (U(0, 1) above) and of loss_terms at given inputs (test_loss_terms_at_given_inputs_...) is the 1% one.
    assert 4 * se < 0.03 * est.mean()

"""The probability-flow ODE NLL (`evaluation.ode_eval`, `evaluate --ode_images`) against the exact Bayes denoiser.

For data with independent per-pixel categoricals P_d over the 256 bins (the digits train split's histogram),
`core.vdm.bayes_eps_fn_for_histogram` is the exact eps_hat = E[eps | z_t]; the probability-flow ODE then
carries q_0 to q_1 exactly, and it acts on each pixel alone, as the monotone 1-D map Phi_d = F1_d^-1 o F0_d
(F_t the CDF of the pixel's q_t: the only monotone map between the two). So the estimate that
`ode_nll_over_images` returns for an image x, with z ~ q(z_0 | x) (VDM's decoder dequantization), has the
expectation (float64 NumPy below, per pixel and grey level)

    -log P(x) + E_z[log P(x | z) - log p_dec(x | z)] + E_z[log q_1(Phi(z)) - log N(Phi(z); 0, 1)]

(likelihood.py's module docstring): the histogram's NLL, plus the dequantization bound's slack (the true
posterior over bins against the decoder's uniform one) and the prior's mismatch at gamma(1) = 5. What is left
is RK4's discretisation (measured by halving the steps) and the one draw of z per image (the standard error).
Then `evaluate --ode_images` on a tiny trained run is checked to be that same function on the same images/key.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial import hermite_e
from scipy import special

from ddpm_jax.core import likelihood, pixels, vdm
from ddpm_jax.data.digits_builder import NUM_LEVELS, digits_split_indices, digits_uint8
from ddpm_jax.evaluation import ode_eval

from helpers.histogram_flow import HistogramFlow

G0, G1 = vdm.GAMMA_MIN, vdm.GAMMA_MAX
V = np.arange(256) / 127.5 - 1.0
LEVELS = np.round(np.arange(NUM_LEVELS) * 255 / (NUM_LEVELS - 1)).astype(int)  # the digits' 17 grey levels
NUM_IMAGES = 48


def _alpha_sigma(gamma):
    return math.sqrt(special.expit(-gamma)), math.sqrt(special.expit(gamma))


def _mixture_cdfs(z, log_p, mean, s):
    """(F(z), 1 - F(z), log density) of sum_k p_k N(mean_k, s^2), each side computed directly (no 1 - F)."""
    arg = (z[..., None] - mean) / s
    p = np.exp(log_p)
    log_pdf = special.logsumexp(log_p - 0.5 * arg**2, axis=-1) - math.log(s * math.sqrt(2 * math.pi))
    return np.sum(p * special.ndtr(arg), -1), np.sum(p * special.ndtr(-arg), -1), log_pdf


def slack_table(probs, num_nodes=40):
    """Expected ODE estimate - NLL per (pixel, level) [H, W, C, L], nats, float64 (module docstring):
    (decoder slack, prior mismatch), each an expectation over eps ~ N(0, 1) by Gauss-Hermite quadrature."""
    eps, w = hermite_e.hermegauss(num_nodes)
    w = w / math.sqrt(2 * math.pi)
    a0, s0 = _alpha_sigma(G0)
    a1, s1 = _alpha_sigma(G1)
    vl = V[LEVELS]
    z0 = a0 * vl[:, None] + s0 * eps  # [L, n]
    log_q0 = -0.5 * ((z0[..., None] - a0 * V) / s0) ** 2  # [L, n, 256] log N(z_0; alpha_0 v_k, sigma_0^2) + const
    diag = np.arange(len(LEVELS))
    log_dec = log_q0[diag, :, LEVELS] - special.logsumexp(log_q0, -1)  # the decoder: all 256 bins, uniform
    log_q0 = log_q0[..., LEVELS]
    flat = np.log(probs[..., LEVELS]).reshape(-1, len(LEVELS))
    dec, prior = np.empty_like(flat), np.empty_like(flat)
    for j, lp in enumerate(flat):
        post = lp + log_q0
        log_post = post[diag, :, diag] - special.logsumexp(post, -1)  # the true posterior P(x | z_0)
        dec[j] = np.sum((log_post - log_dec) * w, -1)
        # Phi(z_0): solve F1(z_1) = F0(z_0) on the smaller tail (Newton from the N(0, 1) quantile)
        f0, s0_tail, _ = _mixture_cdfs(z0, lp, a0 * vl, s0)
        lower = f0 < 0.5
        target = np.where(lower, f0, s0_tail)
        z1 = np.where(lower, special.ndtri(f0), -special.ndtri(s0_tail))
        for _ in range(20):
            f1, s1_tail, log_pdf = _mixture_cdfs(z1, lp, a1 * vl, s1)
            step = (np.where(lower, f1, -s1_tail) - np.where(lower, target, -target)) / np.exp(log_pdf)
            z1 = z1 - step
        assert np.max(np.abs(step) * (w > 1e-12)) < 1e-9  # converged (bar nodes of negligible weight)
        _, _, log_q1 = _mixture_cdfs(z1, lp, a1 * vl, s1)
        prior[j] = np.sum((log_q1 + 0.5 * z1**2 + 0.5 * math.log(2 * math.pi)) * w, -1)
    shape = probs.shape[:-1] + (len(LEVELS),)
    return dec.reshape(shape), prior.reshape(shape)


@pytest.fixture(scope="module")
def digits():
    """The train histogram (+0.1 counts on the 17 levels), NUM_IMAGES test images (uint8), their float64 NLL
    and predicted slack (bits/dim per image)."""
    images, _ = digits_uint8()
    split = digits_split_indices()
    train, test = images[split["train"]], images[split["test"]][:NUM_IMAGES]
    counts = (train.astype(np.int64)[..., None] == np.arange(256)).sum(0).astype(np.float64)
    counts[..., LEVELS] += 0.1
    probs = counts / counts.sum(-1, keepdims=True)
    pix = np.indices(test.shape[1:])
    per_dim = lambda table: table[pix[0], pix[1], pix[2], np.searchsorted(LEVELS, test)]  # noqa: E731
    to_bpd = lambda nats: nats.reshape(len(test), -1).sum(1) / (64 * math.log(2))  # noqa: E731
    dec, prior = slack_table(probs)
    return dict(
        probs=probs,
        images=test,
        nll=to_bpd(-np.log(probs[pix[0], pix[1], pix[2], test])),
        dec=to_bpd(per_dim(dec)),
        prior=to_bpd(per_dim(prior)),
    )


def test_ode_nll_of_the_exact_bayes_denoiser_is_the_histogram_nll(digits):
    """Hutchinson's estimate is exact here: the flow acts on each pixel alone, so d eps_hat / dz is diagonal and
    v^T J v = sum_i J_ii v_i^2 = tr J for a Rademacher v (checked against exact_trace=True on a few images)."""
    method = HistogramFlow(digits["probs"], G0, G1)
    nll, slack = digits["nll"], digits["dec"] + digits["prior"]
    key = jax.random.PRNGKey(0)
    outs = {
        steps: ode_eval.ode_nll_over_images(method, None, digits["images"], key, num_steps=steps) for steps in (32, 64)
    }
    out = outs[64]
    assert out["ode_num_images"] == NUM_IMAGES and out["ode_probes"] == 2 and out["ode_steps"] == 64
    parts = sum(out[f"ode_{k}"] for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd"))
    assert out["ode_bpd"] == pytest.approx(parts, abs=1e-5)
    # RK4's discretisation: the same z (same key), so 32 - 64 steps is 15x the error of 64 (4th order; measured:
    # the differences 16->32->64->128 steps are 1.4e-2, 9.9e-4, 5.7e-5 bits/dim, ratios 14 and 17)
    disc = abs(outs[32]["ode_bpd"] - out["ode_bpd"]) / 15
    # Per image (ode_nll_over_images's one batch: key fold_in(key, 0)), for a paired standard error
    per_image = jax.jit(
        lambda x: likelihood.ode_nll_bpd(
            method.gamma, method.eps_fn, x, jax.random.fold_in(key, 0), num_steps=64, exact_trace=False, num_probes=2
        )
    )(pixels.scale_images(digits["images"]))
    total = np.asarray(per_image["total_bpd"], np.float64)
    assert total.mean() == pytest.approx(out["ode_bpd"], abs=1e-6)
    assert np.max(np.abs(per_image["total_se_bpd"])) < 1e-5  # the two probes agree: the trace is exact
    d = total - nll - slack
    se = d.std(ddof=1) / math.sqrt(len(d))
    print(
        f"\n[ode bayes] histogram NLL {nll.mean():.4f} bits/dim; ODE {out['ode_bpd']:.4f} +- {out['ode_bpd_se']:.4f}"
        f" (64 steps; 32 steps: {outs[32]['ode_bpd']:.4f}, so the 64-step error ~ {disc:.1e}); predicted slack:"
        f" decoder {digits['dec'].mean():.4f}, prior {digits['prior'].mean():+.4f}; paired ODE - NLL - slack"
        f" {d.mean():+.5f} +- {se:.5f}"
    )
    assert 2.3 < nll.mean() < 2.6 and 0.001 < digits["dec"].mean() < 0.02 and abs(digits["prior"].mean()) < 0.01
    assert disc < 3e-4
    # The NLL plus the slack, within the draw of z (the paired se) and the discretisation
    assert abs(d.mean()) < 3 * se + 3 * disc + 1e-4
    assert 3 * se + 3 * disc + 1e-4 < 0.012  # so a 1% error (0.024 bits/dim) in the NLL fails


def test_exact_trace_equals_hutchinson_for_the_per_pixel_flow(digits):
    method = HistogramFlow(digits["probs"], G0, G1)
    images, key = digits["images"][:4], jax.random.PRNGKey(1)
    exact, hutch = (
        ode_eval.ode_nll_over_images(method, None, images, key, num_steps=4, exact_trace=flag) for flag in (True, False)
    )
    assert exact["ode_probes"] == 0 and hutch["ode_probes"] == 2
    for k in ("ode_bpd", "ode_prior_bpd", "ode_flow_bpd", "ode_dequant_bpd", "ode_recon_bpd"):
        assert exact[k] == pytest.approx(hutch[k], abs=2e-5), k


@pytest.mark.slow
def test_evaluate_ode_images_is_ode_nll_over_images_of_the_run(tmp_path, data_dir, steps_for, monkeypatch):
    """evaluate --ode_images=N on a tiny trained VDM run (test_docs.py's runs/default config, so its compiled
    steps are shared) is ode_nll_over_images of the run's EMA params on the first N test images with the
    evaluation's key, fold_in(PRNGKey(seed), 2); and VDM.probability_flow is (gamma_fn, model_fn)."""
    from ddpm_jax.commands import evaluate
    from ddpm_jax.configs import vdm as vdm_config
    from ddpm_jax.data import splits
    from ddpm_jax.run import load_run
    from ddpm_jax.training import loop, train_lib

    config = vdm_config.get_config("runlocal")
    config.data.data_dir = data_dir
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    config.training.bpd_batch_size = 300
    steps = steps_for(config)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir, steps=steps)
    monkeypatch.setattr(train_lib, "compile_steps", lambda *a, **k: steps)
    num, ode_steps, seed = 6, 3, 4
    result = evaluate.evaluate_workdir(
        workdir, bpd=False, quality=False, ode_images=num, ode_steps=ode_steps, seed=seed
    )
    run = load_run(workdir)
    gamma_fn, eps_fn = run.method.probability_flow(run.params)
    t = jnp.array([0.0, 0.3, 1.0])
    z = jax.random.normal(jax.random.PRNGKey(5), (3, 8, 8, 1))
    np.testing.assert_allclose(gamma_fn(t), run.method.gamma_fn(run.params)(t), rtol=1e-6)
    np.testing.assert_allclose(eps_fn(z, t), run.method.model_fn(run.params)(z, t), rtol=1e-6)
    images = splits.load_split(run.config, run.config.data.eval_split)[:num]
    direct = ode_eval.ode_nll_over_images(
        run.method, run.params, images, jax.random.fold_in(jax.random.PRNGKey(seed), 2), num_steps=ode_steps
    )
    assert result["ode_num_images"] == num and result["ode_steps"] == ode_steps
    for key, value in direct.items():
        assert result[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert np.isfinite(result["ode_bpd"]) and result["ode_bpd"] > 0

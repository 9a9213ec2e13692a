"""ddpm_jax.evaluation.ode_eval: a run's probability-flow NLL over images, in batches, with its standard error.

A stand-in method whose flow is the exact Bayes denoiser of an independent-pixel histogram. Along
every path the exact flow carries q_0 to q_1, so each image's dequantized ODE NLL is its histogram
NLL -log P(x) plus two slacks (tests/test_ode_likelihood.py): the decoder's, E[log q(x|z_0) -
log p(x|z_0)], and the prior's, log q_1(z_1) - log N(z_1; 0, 1). On gamma in [-18, 8] (not VDM's
[-13.3, 5]) both are below 1e-4 bits/dim: the bins sit 32 sigma_0 apart and alpha_1^2 = 3e-4.
So the per-image NLL is known exactly in float64 and the comparison is paired (the same images):
what is left is the RK4 error (~1e-4 bits/dim at 128 steps), against a 1% error of 0.023 bits/dim.
Hutchinson's two probes are exact here (the denoiser acts on each pixel alone: a diagonal Jacobian).
The between-image spread then is the histogram NLL's own, so the standard error is checked too.
"""

import numpy as np
import pytest

from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import ode_eval

from helpers.histogram_flow import HistogramFlow

KS = np.array([40, 100, 127, 128, 220])
P = np.array([0.1, 0.3, 0.15, 0.25, 0.2])


GAMMA_0, GAMMA_1 = -18.0, 8.0  # sigma_0 = 1.2e-4 (half a bin is 32 sigma_0), alpha_1^2 = 3.4e-4


class NoFlow:
    name = "vae"

    def probability_flow(self, params):
        return None


def test_ode_nll_over_images_matches_the_histogram_nll():
    shape = (2, 2, 1)
    probs = np.zeros(shape + (256,))
    probs[..., KS] = P
    rng = np.random.default_rng(0)
    idx = rng.choice(len(KS), size=(50,) + shape, p=P)
    images = KS[idx].astype(np.uint8)
    nll_bpd = -np.log(P[idx]).reshape(50, -1).mean(1) / np.log(2)  # float64, per image
    method = HistogramFlow(probs, GAMMA_0, GAMMA_1)
    import jax

    outs = [
        ode_eval.ode_nll_over_images(method, None, images, jax.random.PRNGKey(1), num_steps=128, batch_size=b)
        for b in (50, 7)
    ]
    se_nll = nll_bpd.std(ddof=1) / np.sqrt(50)
    for out in outs:
        assert out["ode_num_images"] == 50 and out["ode_probes"] == 2 and out["ode_steps"] == 128
        parts = sum(out[f"ode_{k}"] for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd"))
        assert out["ode_bpd"] == pytest.approx(parts, abs=1e-5)
        assert out["ode_recon_bpd"] < 1e-6  # no pixel decoded to a neighbouring bin: the slack is gone
        # Paired: the same 50 images' float64 NLL; 2e-3 bits/dim is 0.09% of it (measured: 3e-5).
        assert abs(out["ode_bpd"] - nll_bpd.mean()) < 2e-3, (out, nll_bpd.mean())
        # Each image's ODE NLL is its NLL to ~4e-4 bits/dim, so the spread is the NLL's (0.25 bits/dim).
        assert out["ode_bpd_se"] == pytest.approx(se_nll, rel=5e-3), (out["ode_bpd_se"], se_nll)
    assert outs[0]["ode_bpd"] != outs[1]["ode_bpd"]  # other batches, other draws: not a cached result


def test_method_without_a_flow_is_a_clear_error():
    import jax

    with pytest.raises(ConfigError, match="no probability-flow ODE"):
        ode_eval.ode_nll_over_images(NoFlow(), None, np.zeros((2, 2, 2, 1), np.uint8), jax.random.PRNGKey(0))

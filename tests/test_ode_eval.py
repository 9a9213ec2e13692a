"""ddpm_jax.evaluation.ode_eval: a run's probability-flow NLL over images, in batches, with its standard error.

A stand-in method whose flow is the exact Bayes denoiser of an independent-pixel histogram: its ODE
NLL is that histogram's NLL up to the decoder's small slack (tests/test_ode_likelihood.py bounds it
at ~4e-3 nats per dim), so the mean over images must match the float64 histogram NLL of the same
images, whatever the batch size (the last batch is padded).
"""

import numpy as np
import pytest

from ddpm_jax.core import vdm
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import ode_eval

KS = np.array([40, 100, 127, 128, 220])
P = np.array([0.1, 0.3, 0.15, 0.25, 0.2])


def linear_gamma(t):
    return vdm.GAMMA_MIN + (vdm.GAMMA_MAX - vdm.GAMMA_MIN) * t


class HistogramFlow:
    name = "histogram"

    def __init__(self, probs):
        self.eps_fn = vdm.bayes_eps_fn_for_histogram(probs, linear_gamma)

    def probability_flow(self, params):
        return linear_gamma, self.eps_fn


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
    method = HistogramFlow(probs)
    import jax

    outs = [
        ode_eval.ode_nll_over_images(method, None, images, jax.random.PRNGKey(1), num_steps=64, batch_size=b)
        for b in (50, 7)
    ]
    for out in outs:
        assert out["ode_num_images"] == 50 and out["ode_probes"] == 2
        parts = sum(out[f"ode_{k}"] for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd"))
        assert out["ode_bpd"] == pytest.approx(parts, abs=1e-5)
        assert 0 < out["ode_bpd_se"] < 0.2
        # the decoder's slack (< 0.01 bits/dim here) plus the sampling noise of 50 images
        assert abs(out["ode_bpd"] - nll_bpd.mean()) < 4 * out["ode_bpd_se"] + 0.01, (out, nll_bpd.mean())
    assert outs[0]["ode_bpd"] != outs[1]["ode_bpd"]  # other batches, other draws: not a cached result


def test_method_without_a_flow_is_a_clear_error():
    import jax

    with pytest.raises(ConfigError, match="no probability-flow ODE"):
        ode_eval.ode_nll_over_images(NoFlow(), None, np.zeros((2, 2, 2, 1), np.uint8), jax.random.PRNGKey(0))

"""A Method-like object whose probability flow is a fixed linear gamma and the exact Bayes eps of independent
per-pixel categoricals (core.vdm.bayes_eps_fn_for_histogram): a flow whose NLL is known in closed form."""

from __future__ import annotations

from ddpm_jax.core import vdm


class HistogramFlow:
    """`probability_flow(params)` -> (gamma(t) = gamma_0 + (gamma_1 - gamma_0) t, the histogram's Bayes eps)."""

    name = "histogram"

    def __init__(self, probs, gamma_0: float, gamma_1: float):
        self.gamma_0, self.gamma_1 = gamma_0, gamma_1
        self.eps_fn = vdm.bayes_eps_fn_for_histogram(probs, self.gamma)

    def gamma(self, t):
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * t

    def probability_flow(self, params):
        return self.gamma, self.eps_fn

"""The probability-flow ODE NLL of a trained run over a set of images, beside its bound.

`ode_nll_over_images(method, params, images, rng)` runs `likelihood.ode_nll_bpd` (VDM's decoder
dequantization, RK4, Hutchinson divergence) on the method's flow (`Method.probability_flow`) in
fixed-size jitted batches and returns the mean over images with its standard error. Each image
gets its own z ~ q(z | x) and probes, so the spread over images already holds both the Hutchinson
noise and the dequantization draw: the standard error is that spread / sqrt(n), as for the bound.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from ddpm_jax.core import likelihood, pixels
from ddpm_jax.errors import ConfigError


def ode_nll_over_images(
    method,
    params,
    images: np.ndarray,
    rng: jax.Array,
    *,
    num_steps: int = 64,
    num_probes: int = 2,
    exact_trace: bool = False,
    batch_size: int = 100,
) -> dict:
    """Mean probability-flow NLL (bits/dim) of uint8 `images` [N, H, W, C] under `params`.

    Returns {"ode_bpd", "ode_bpd_se", "ode_prior_bpd", "ode_flow_bpd", "ode_dequant_bpd",
    "ode_recon_bpd", "ode_num_images", "ode_steps", "ode_probes"} (floats and ints).
    """
    flow = method.probability_flow(params)
    if flow is None:
        raise ConfigError(
            f"method {method.name!r} with this config has no probability-flow ODE (a DDPM needs "
            "diffusion.parameterization='eps' with a fixed variance on a VP schedule)."
        )
    gamma_fn, eps_fn = flow
    x = pixels.scale_images(images)
    n = x.shape[0]
    batch_size = min(batch_size, n)

    @jax.jit
    def batch_nll(xb, key):
        return likelihood.ode_nll_bpd(
            gamma_fn, eps_fn, xb, key, num_steps=num_steps, exact_trace=exact_trace, num_probes=num_probes
        )

    parts = []
    for i, start in enumerate(range(0, n, batch_size)):
        xb = x[start : start + batch_size]
        pad = batch_size - xb.shape[0]  # one compiled shape: pad the last batch, drop its padding
        xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)]) if pad else xb
        out = jax.device_get(batch_nll(xb, jax.random.fold_in(rng, i)))
        parts.append({k: np.asarray(v)[: batch_size - pad] for k, v in out.items()})
    terms = {k: np.concatenate([p[k] for p in parts]).astype(np.float64) for k in parts[0]}
    total = terms["total_bpd"]
    return {
        "ode_bpd": float(total.mean()),
        "ode_bpd_se": float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        **{f"ode_{k}": float(terms[k].mean()) for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd")},
        "ode_num_images": int(n),
        "ode_steps": int(num_steps),
        "ode_probes": 0 if exact_trace else int(num_probes),
    }

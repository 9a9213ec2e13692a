"""Weightings of the diffusion loss as one family: a weight w(lambda) of log-SNR lambda = -gamma.

Kingma & Gao (2023, "Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation"),
VP, t in [0, 1], lambda_t = log SNR(t) decreasing in t. Every loss of the family is

    L_w(x) = 0.5 E_{t ~ U(0, 1), eps} [ w(lambda_t) (-d lambda / dt) ||eps - eps_hat(z_t; t)||^2 ]
           = 0.5 int w(lambda) E_eps ||eps - eps_hat(z_lambda; lambda)||^2 d lambda,

and w = 1 is VDM's diffusion term of the negative ELBO (eq. 17; the lecture's omega_t = 1 for the
mean predictor in the continuous limit). A predictor's unit-weight MSE with t ~ U(0, 1) is the same
integral with (||x - x_hat||^2 = e^{-lambda} ||eps - eps_hat||^2, ||v - v_hat||^2 = (1 + e^{-lambda})
||eps - eps_hat||^2, Salimans & Ho 2022 for v):

    eps:  w = 1 / (-d lambda / dt)                 x0:  w = e^{-lambda} / (-d lambda / dt)
    v:    w = (1 + e^{-lambda}) / (-d lambda / dt)

so on VDM's fixed linear gamma (constant d lambda / dt) the eps-MSE *is* the ELBO's weighting.
`simple` is Ho et al.'s L_simple: the eps-MSE with t uniform over their linear beta schedule
(beta_1 = 1e-4 ... beta_T = 0.02, T = 1000, in its continuous limit), written as a function of
lambda alone, so it means the same on any schedule. `sigmoid` is Kingma & Gao's sigmoid(b - lambda)
and `edm` is Karras et al.'s (2022) weighting written in lambda (Kingma & Gao, Table 1):
p(lambda) (e^{-lambda} + sigma_data^2) / sigma_data^2 with lambda ~ N(2.4, 2.4^2), sigma_data = 0.5.
`sigmoid` and `edm` are the monotone ones (sigmoid exactly; edm only below its peak), for which
Kingma & Gao show L_w is an ELBO of noise-augmented data.

Each weighting is normalised to mean 1 over lambda uniform on the schedule's range [lambda_min,
lambda_max] (for eps / x0 / v: on the linear schedule between those endpoints), so that every loss is
on the ELBO's scale and one learning rate serves them all. The bound a run reports stays the
unweighted ELBO (w = 1) whatever the training weight.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Ho et al.'s linear beta schedule (their L_simple's t density), T = 1000 steps.
HO_BETA_1, HO_BETA_T, HO_T = 1e-4, 0.02, 1000
EDM_MEAN, EDM_STD, EDM_SIGMA_DATA = 2.4, 2.4, 0.5  # lambda = -2 log sigma, log sigma ~ N(-1.2, 1.2^2)
SIGMOID_BIAS = -2.0  # Kingma & Gao's b in sigmoid(b - lambda)

WeightFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (lambda, -d lambda/dt) -> w


def _ho_neg_dlogsnr_dt(logsnr):
    """-d lambda / dt of Ho et al.'s linear beta schedule at the t where it reaches lambda.

    Continuous limit: -log alpha_bar(t) = s(t) = T (b1 t + (bT - b1) t^2 / 2); lambda = -log(e^s - 1),
    so s = softplus(-lambda), t solves the quadratic, and -d lambda / dt = (1 + e^lambda) s'(t)."""
    s = jax.nn.softplus(-logsnr)
    slope = HO_BETA_T - HO_BETA_1
    t = (-HO_BETA_1 + jnp.sqrt(HO_BETA_1**2 + 2.0 * slope * s / HO_T)) / slope
    t = jnp.clip(t, 0.0, 1.0)  # beyond Ho's range the schedule's end slope continues
    return (1.0 + jnp.exp(logsnr)) * HO_T * (HO_BETA_1 + slope * t)


def _raw(name: str, bias: float) -> Callable:
    """w(lambda, -d lambda/dt) before normalisation."""
    if name == "elbo":
        return lambda lam, rate: jnp.ones_like(lam)
    if name == "eps":
        return lambda lam, rate: 1.0 / rate
    if name == "x0":
        return lambda lam, rate: jnp.exp(-lam) / rate
    if name == "v":
        return lambda lam, rate: (1.0 + jnp.exp(-lam)) / rate
    if name == "simple":
        return lambda lam, rate: 1.0 / _ho_neg_dlogsnr_dt(lam)
    if name == "sigmoid":
        return lambda lam, rate: jax.nn.sigmoid(bias - lam)
    if name == "edm":

        def edm(lam, rate):
            density = jnp.exp(-0.5 * ((lam - EDM_MEAN) / EDM_STD) ** 2) / (EDM_STD * np.sqrt(2 * np.pi))
            return density * (jnp.exp(-lam) + EDM_SIGMA_DATA**2) / EDM_SIGMA_DATA**2

        return edm
    raise ValueError(f"unknown weighting {name!r}; choose one of {WEIGHTINGS}.")


WEIGHTINGS = ("elbo", "eps", "x0", "v", "simple", "sigmoid", "edm")


def weight_fn(name: str, logsnr_min: float, logsnr_max: float, *, bias: float = SIGMOID_BIAS) -> WeightFn:
    """w(lambda, -d lambda/dt) of weighting `name`, normalised to mean 1 over lambda uniform on
    [logsnr_min, logsnr_max] (the rate there taken as the linear schedule's, logsnr_max - logsnr_min).

    Args:
      name: one of WEIGHTINGS.
      logsnr_min, logsnr_max: the schedule's log-SNR range (VDM: -gamma_max, -gamma_min).
      bias: b of `sigmoid`.
    """
    raw = _raw(name, bias)
    grid = np.linspace(logsnr_min, logsnr_max, 4097)
    rate = np.full_like(grid, logsnr_max - logsnr_min)
    # trapezoid mean over the grid, in float64 on the host: a constant of the loss
    values = np.asarray(raw(jnp.asarray(grid, jnp.float32), jnp.asarray(rate, jnp.float32)), np.float64)
    mean = float(np.sum((values[1:] + values[:-1]) / 2) / (len(grid) - 1))
    return lambda lam, rate: raw(lam, rate) / mean

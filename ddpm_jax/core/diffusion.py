"""The pure diffusion core: forward jump, posterior, predictor conversions and the variational bound.

Every function takes the `Schedule` first, is pure, and works eagerly, under jax.jit and under
jax.pmap. Images are NHWC in [-1, 1]; t is an int array of shape [B] with values in 0..T-1.
Per-example terms are in bits/dim: nats summed over the D = H*W*C dims, divided by D log 2.

References:
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models (2020), eqs. 4-14.
  Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models (2021).
  Salimans, Ho. Progressive Distillation (2022) for the v-parameterization.
  Kingma, Salimans, Poole, Ho. Variational Diffusion Models (2021), eq. 13; Kingma, Gao.
    Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation (2023), for chain_weights.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import weighting
from ddpm_jax.core.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v", "mean")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("simple", "vlb", "weighted", "hybrid")
HYBRID_VLB_WEIGHT = 1e-3  # lambda of Improved DDPM's L_hybrid = L_simple + lambda * L_vlb
NUM_BINS = 256  # the discretized decoder's bins on [-1, 1]

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def check_choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {', '.join(valid)}.")


def _check_t(sched: Schedule, x: jnp.ndarray, t: jnp.ndarray) -> None:
    """Shape/dtype of t; its range too when t is concrete (not traced)."""
    chex.assert_rank(t, 1)
    chex.assert_type(t, int)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries but the batch has {x.shape[0]} examples.")
    if not isinstance(t, jax.core.Tracer):
        t_np = np.asarray(t)
        if t_np.size and (t_np.min() < 0 or t_np.max() >= sched.num_timesteps):
            raise ValueError(
                f"timesteps must lie in 0..{sched.num_timesteps - 1}; got values from {t_np.min()} to {t_np.max()}."
            )


def extract(table: jnp.ndarray, t: jnp.ndarray, shape) -> jnp.ndarray:
    """table[t] shaped [B, 1, ..., 1] to broadcast against an array of `shape`."""
    return table[t].reshape((t.shape[0],) + (1,) * (len(shape) - 1))


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _bpd(nats: jnp.ndarray) -> jnp.ndarray:
    """Per-element nats -> per-example bits/dim."""
    return mean_flat(nats) / np.log(2.0)


# --- forward process ------------------------------------------------------------------------


def q_mean_variance(sched: Schedule, x0, t):
    """Mean, variance and log variance of q(x_t | x_0) = N(a_t x_0, s_t^2 I) (Ho et al. eq. 4)."""
    _check_t(sched, x0, t)
    mean = extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
    var = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) ** 2
    return mean, jnp.broadcast_to(var, x0.shape), jnp.broadcast_to(jnp.log(var), x0.shape)


def q_sample(sched: Schedule, x0, t, noise):
    """Draws x_t ~ q(x_t | x_0) by reparameterization: a_t x_0 + s_t eps."""
    chex.assert_equal_shape([x0, noise])
    _check_t(sched, x0, t)
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_posterior(sched: Schedule, x0, xt, t):
    """Mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
    chex.assert_equal_shape([x0, xt])
    _check_t(sched, xt, t)
    mean = extract(sched.posterior_mean_coef1, t, xt.shape) * x0 + extract(sched.posterior_mean_coef2, t, xt.shape) * xt
    var = jnp.broadcast_to(extract(sched.posterior_variance, t, xt.shape), xt.shape)
    log_var = jnp.broadcast_to(extract(sched.posterior_log_variance_clipped, t, xt.shape), xt.shape)
    return mean, var, log_var


# --- conversions between what a network may predict -----------------------------------------


def predict_x0_from_eps(sched: Schedule, xt, t, eps):
    """x_0 = (x_t - s_t eps) / a_t (inverts q_sample)."""
    a = extract(sched.sqrt_alphas_cumprod, t, xt.shape)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, xt.shape)
    return (xt - s * eps) / a


def predict_eps_from_x0(sched: Schedule, xt, t, x0):
    """eps = (x_t - a_t x_0) / s_t."""
    a = extract(sched.sqrt_alphas_cumprod, t, xt.shape)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, xt.shape)
    return (xt - a * x0) / s


def v_from_x0_eps(sched: Schedule, x0, eps, t):
    """v = a_t eps - s_t x_0 (Salimans & Ho 2022)."""
    a = extract(sched.sqrt_alphas_cumprod, t, x0.shape)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape)
    return a * eps - s * x0


def _v_inverse(sched: Schedule, xt, t, v):
    # [x_t; v] = [[a, s], [-s, a]] [x_0; eps]; the determinant a^2 + s^2 is 1 for VP.
    a = extract(sched.sqrt_alphas_cumprod, t, xt.shape)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, xt.shape)
    det = a**2 + s**2
    return (a * xt - s * v) / det, (s * xt + a * v) / det


def predict_x0_from_v(sched: Schedule, xt, t, v):
    return _v_inverse(sched, xt, t, v)[0]


def predict_eps_from_v(sched: Schedule, xt, t, v):
    return _v_inverse(sched, xt, t, v)[1]


def predict_x0_from_mean(sched: Schedule, xt, t, mean):
    """Inverts the posterior mean: x_0 = (mu - coef2 x_t) / coef1."""
    return (mean - extract(sched.posterior_mean_coef2, t, xt.shape) * xt) / extract(
        sched.posterior_mean_coef1, t, xt.shape
    )


def predict_x0(sched: Schedule, output, xt, t, parameterization: str):
    """x_0 implied by a network output of the given parameterization."""
    if parameterization == "eps":
        return predict_x0_from_eps(sched, xt, t, output)
    if parameterization == "x0":
        return output
    if parameterization == "v":
        return predict_x0_from_v(sched, xt, t, output)
    if parameterization == "mean":
        return predict_x0_from_mean(sched, xt, t, output)
    raise ValueError(f"Unknown parameterization {parameterization!r}; valid values are {', '.join(PARAMETERIZATIONS)}.")


def regression_target(sched: Schedule, x0, xt, t, noise, parameterization: str):
    """What the network should output for L_simple under each parameterization."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(sched, x0, noise, t)
    if parameterization == "mean":
        return q_posterior(sched, x0, xt, t)[0]
    raise ValueError(f"Unknown parameterization {parameterization!r}; valid values are {', '.join(PARAMETERIZATIONS)}.")


def mean_per_output(sched: Schedule, xt, t, parameterization: str):
    """d mu / d output: the model mean is affine in the network output with this slope."""
    coef1 = extract(sched.posterior_mean_coef1, t, xt.shape)
    a = extract(sched.sqrt_alphas_cumprod, t, xt.shape)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, xt.shape)
    return {"eps": -coef1 * s / a, "x0": coef1, "v": -coef1 * s / (a**2 + s**2), "mean": jnp.ones_like(coef1)}[
        parameterization
    ]


# --- reverse process ------------------------------------------------------------------------


def split_variance_output(model_output, variance: str):
    """Splits a learned-variance output [..., 2C] into (mean part, variance part)."""
    if variance in ("learned", "learned_range"):
        if model_output.shape[-1] % 2:
            raise ValueError(
                f"a learned variance needs an even number of output channels (2C); got "
                f"{model_output.shape[-1]}. Set the model's output channels to twice the image channels."
            )
        return jnp.split(model_output, 2, axis=-1)
    return model_output, None


def model_log_variance(sched: Schedule, var_output, xt, t, variance: str):
    """log Sigma_theta(x_t, t) for each variance choice (Ho et al. sec. 3.2; Nichol & Dhariwal eq. 15)."""
    if variance == "fixed_small":
        return jnp.broadcast_to(extract(sched.posterior_log_variance_clipped, t, xt.shape), xt.shape)
    if variance == "fixed_large":
        # beta_t, with t = 0 set to the posterior variance so the decoder is not too broad.
        large = jnp.log(jnp.append(sched.posterior_variance[1:2], sched.betas[1:]))
        if sched.num_timesteps == 1:
            large = jnp.log(sched.betas)
        return jnp.broadcast_to(extract(large, t, xt.shape), xt.shape)
    if variance == "learned":
        return var_output
    if variance == "learned_range":
        min_log = extract(sched.posterior_log_variance_clipped, t, xt.shape)
        max_log = extract(jnp.log(sched.betas), t, xt.shape)
        frac = (var_output + 1.0) / 2.0  # the network outputs v in [-1, 1]
        return frac * max_log + (1.0 - frac) * min_log
    check_choice("variance", variance, VARIANCES)


def p_mean_variance(
    sched: Schedule,
    model_output,
    xt,
    t,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> dict:
    """Mean and variance of p_theta(x_{t-1} | x_t) from a network output.

    Args:
      sched: the schedule.
      model_output: [B, H, W, C] (or [B, H, W, 2C] with a learned variance).
      xt: [B, H, W, C] noisy images.
      t: [B] int timesteps.
      parameterization: "eps" | "x0" | "v" | "mean": what the network predicts.
      variance: "fixed_small" (posterior variance) | "fixed_large" (beta_t) | "learned" (log
        variance) | "learned_range" (interpolation of Nichol & Dhariwal eq. 15).
      clip_denoised: clip the implied x_0 to [-1, 1] and recompute the mean from it (sampling).

    Returns:
      dict with mean, variance, log_variance, pred_x0, each [B, H, W, C].
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    _check_t(sched, xt, t)
    output, var_output = split_variance_output(model_output, variance)
    chex.assert_equal_shape([output, xt])
    log_var = model_log_variance(sched, var_output, xt, t, variance)
    pred_x0 = predict_x0(sched, output, xt, t, parameterization)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    if parameterization == "mean" and not clip_denoised:
        mean = output
    else:
        mean = q_posterior(sched, pred_x0, xt, t)[0]
    return dict(mean=mean, variance=jnp.exp(log_var), log_variance=log_var, pred_x0=pred_x0)


# --- the variational bound ------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_diff_exp(a, b):
    """log(e^a - e^b) for a >= b, stable."""
    return a + jnp.log(-jnp.expm1(jnp.minimum(b - a, -1e-30)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of a Gaussian integrated over the 256 bins of [-1, 1] (Ho et al. eq. 13).

    The edge bins are open-ended (-inf and +inf). Computed with log_ndtr, from the tail nearer
    the bin so that narrow decoders keep precision.

    Args:
      x: images in [-1, 1], on the bin centres -1 + 2k/255.
      means, log_scales: the decoder's mean and log standard deviation, same shape as x.

    Returns:
      Elementwise log-probabilities (nats).
    """
    chex.assert_equal_shape([x, means, log_scales])
    half_bin = 1.0 / (NUM_BINS - 1)
    inv_std = jnp.exp(-log_scales)
    upper = (x - means + half_bin) * inv_std  # standardized bin edges
    lower = (x - means - half_bin) * inv_std
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)
    # Inner bins: P = Phi(upper) - Phi(lower), taken from whichever tail is nearer for precision.
    left_tail = _log_diff_exp(log_cdf_upper, jax.scipy.special.log_ndtr(lower))
    right_tail = _log_diff_exp(log_sf_lower, jax.scipy.special.log_ndtr(-upper))
    inner = jnp.where(lower + upper > 0, right_tail, left_tail)
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, inner))


def prior_bpd(sched: Schedule, x0):
    """L_T = KL(q(x_T | x_0) || N(0, prior_variance I)) per example in bits/dim."""
    t = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = q_mean_variance(sched, x0, t)
    return _bpd(normal_kl(mean, log_var, 0.0, jnp.log(sched.prior_variance)))


def _decoder_log_scales(decoder_log_scale, model_log_variance):
    """The t = 0 decoder's log std, shaped like the images: half the model's log variance (today's
    decoder), or a learned log-scale (a scalar, or one per channel [C]) broadcast over the images."""
    if decoder_log_scale is None:
        return 0.5 * model_log_variance
    return jnp.broadcast_to(decoder_log_scale, model_log_variance.shape)


def vb_terms_bpd(sched: Schedule, x0, xt, t, model_mean, model_log_variance, decoder_log_scale=None):
    """One term of the bound per example, bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0, and the decoder NLL L_0 = -log p(x_0 | x_1) where t == 0 (Ho et al. eq. 5).

    decoder_log_scale: None (default) gives the decoder the model's variance at t = 0 (for
    fixed_small the posterior variance of step 1); or the log std of a learned decoder, a scalar or
    one per channel [C], used at t == 0 instead.
    """
    chex.assert_equal_shape([x0, xt, model_mean, model_log_variance])
    true_mean, _, true_log_var = q_posterior(sched, x0, xt, t)
    kl = _bpd(normal_kl(true_mean, true_log_var, model_mean, model_log_variance))
    log_scales = _decoder_log_scales(decoder_log_scale, model_log_variance)
    nll = -_bpd(discretized_gaussian_log_likelihood(x0, model_mean, log_scales))
    return jnp.where(t == 0, nll, kl)


def decoder_bpd(
    sched: Schedule,
    model_fn: ModelFn,
    x0,
    noise,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    decoder_log_scale=None,
):
    """L_0 = -log p(x_0 | x_1) per example in bits/dim at x_1 = q_sample(x_0, t = 0, noise): one
    network call. What trains a learned decoder scale on every step (the method stops the gradient
    of the mean and the schedule, so only the scale learns from it)."""
    t = jnp.zeros((x0.shape[0],), jnp.int32)
    xt = q_sample(sched, x0, t, noise)
    out = p_mean_variance(sched, model_fn(xt, t), xt, t, parameterization, variance)
    return vb_terms_bpd(sched, x0, xt, t, out["mean"], out["log_variance"], decoder_log_scale)


def chain_weights(sched: Schedule, name: str, *, bias: float = weighting.SIGMOID_BIAS) -> np.ndarray:
    """[T] float64 weights w_t of the bound's terms: the discrete chain's form of core.weighting's family.

    With the posterior variance (fixed_small), L_{t-1} = 0.5 (SNR_{t-1} - SNR_t) ||x_0 - x0_hat||^2
    = 0.5 expm1(lambda_{t-1} - lambda_t) ||eps - eps_hat||^2 (VDM eq. 13; lambda_t = log SNR_t, SNR_t =
    a_t^2 / s_t^2), whatever the network predicts. So with the chain's rate r_t = T expm1(lambda_{t-1} -
    lambda_t) (= 2 T omega'_t, the lecture's eps weight; -> -d lambda / d(t/T) as T grows), T L_{t-1} =
    0.5 r_t ||eps - eps_hat||^2 exactly, the discrete form of 0.5 (-d lambda/dt) ||eps - eps_hat||^2, and
    w_t = w(lambda_t, r_t) makes T w_t L_{t-1} exactly 0.5 ||eps - eps_hat||^2 ("eps", Ho et al.'s
    L_simple), 0.5 ||x_0 - x0_hat||^2 ("x0"), 0.5 ||v - v_hat||^2 ("v", VP), each over the normalising
    mean; "elbo" is 1 (the bound).

    Normalised to mean 1 over the KL terms t = 1..T-1 (so over uniform t in 0..T-1 too); w_0 = 1: the
    decoder's L_0 is a likelihood of the data, not a denoising term, and has no rate (SNR_{-1} is infinite).

    Args:
      sched: a fixed (concrete) schedule.
      name: one of weighting.WEIGHTINGS.
      bias: b of "sigmoid".
    """
    if name not in weighting.WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; valid values are {', '.join(weighting.WEIGHTINGS)}.")
    if isinstance(sched.alphas_cumprod, jax.core.Tracer):
        raise ValueError("chain_weights needs a fixed schedule's concrete tables, not a traced (learned) one.")
    T = sched.num_timesteps
    weights = np.ones(T)
    if name == "elbo" or T == 1:
        return weights
    a = np.asarray(sched.sqrt_alphas_cumprod, np.float64)
    s = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)
    log_snr = 2.0 * (np.log(a) - np.log(s))
    rate = T * np.expm1(log_snr[:-1] - log_snr[1:])  # r_t for t = 1..T-1
    # weight_fn's own normalising constant cancels in the mean below.
    w = weighting.weight_fn(name, float(log_snr[-1]), float(log_snr[0]), bias=bias)
    raw = np.asarray(w(jnp.asarray(log_snr[1:], jnp.float32), jnp.asarray(rate, jnp.float32)), np.float64)
    weights[1:] = raw / np.mean(raw)
    return weights


def training_losses(
    sched: Schedule,
    model_fn: ModelFn,
    x0,
    t,
    noise,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    loss_type: str = "simple",
    decoder_log_scale=None,
    weights=None,
) -> dict:
    """Per-example training loss and its parts.

    Loss types:
      "simple": MSE between the network output and its target (eps, x0, v or the posterior mean);
        Ho et al. eq. 14 for eps.
      "vlb": T * L_t in bits/dim, an unbiased estimate of sum_t L_t under uniform t.
      "weighted": the lecture's omega_t-weighted MSE of the output, which equals the KL
        L_{t-1} for a fixed variance (omega_t = (d mu / d output)^2 / (2 sigma_t^2); plus the KL's
        constant variance-mismatch term for fixed_large), and the decoder NLL at t = 0; scaled by T
        like "vlb".
      "hybrid": simple + 1e-3 * vlb, the vlb term seeing a stop-gradient mean so it trains only
        the variance (Nichol & Dhariwal sec. 3.1).

    Args:
      sched: the schedule.
      model_fn: `model_fn(x_t, t) -> output`.
      x0: [B, H, W, C] data in [-1, 1]; t: [B] int; noise: like x0.
      parameterization, variance, loss_type: see module constants.
      decoder_log_scale: None, or a learned t = 0 decoder's log std (scalar or [C]); see vb_terms_bpd.
      weights: None (the bound's weight 1), or [T] w_t (chain_weights) for "vlb" and "weighted": the loss
        is then T w_t L_t, while "vb" stays the bound's L_t.

    Returns:
      dict of [B] arrays: "loss", "mse", and "vb" (bits/dim of L_t) where the loss uses it.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    learned = variance in ("learned", "learned_range")
    if learned and loss_type in ("simple", "weighted"):
        raise ValueError(
            f"variance={variance!r} is trained only by the bound: use loss_type 'hybrid' or "
            f"'vlb', or a fixed variance with loss_type={loss_type!r}."
        )
    if weights is not None and loss_type not in ("vlb", "weighted"):
        raise ValueError(
            f"weights reweigh the bound's terms: use loss_type 'vlb' or 'weighted', not {loss_type!r} "
            "(L_simple is the 'eps' weighting already)."
        )
    xt = q_sample(sched, x0, t, noise)
    model_output = model_fn(xt, t)
    output, var_output = split_variance_output(model_output, variance)
    chex.assert_equal_shape([output, x0])
    target = regression_target(sched, x0, xt, t, noise, parameterization)
    terms = {"mse": mean_flat((target - output) ** 2)}
    T = sched.num_timesteps
    scale = T if weights is None else T * jnp.asarray(weights, x0.dtype)[t]  # T w_t

    if loss_type == "simple":
        terms["loss"] = terms["mse"]
        return terms
    if loss_type == "weighted":
        log_var = model_log_variance(sched, None, xt, t, variance)
        omega = mean_per_output(sched, xt, t, parameterization) ** 2 / (2.0 * jnp.exp(log_var))
        # The KL's variance part: 0 for fixed_small (same table, exactly 0 in float32), a constant for fixed_large.
        true_log_var = extract(sched.posterior_log_variance_clipped, t, xt.shape)
        var_part = 0.5 * ((log_var - true_log_var) - 1.0 + jnp.exp(true_log_var - log_var))
        weighted = _bpd(omega * (target - output) ** 2 + var_part)
        decoder = vb_terms_bpd(
            sched,
            x0,
            xt,
            t,
            p_mean_variance(sched, model_output, xt, t, parameterization, variance)["mean"],
            log_var,
            decoder_log_scale,
        )
        terms["vb"] = jnp.where(t == 0, decoder, weighted)
        terms["loss"] = scale * terms["vb"]
        return terms
    # vlb / hybrid: the exact Gaussian KL terms.
    if loss_type == "hybrid":
        frozen = jax.lax.stop_gradient(output)
        model_output = frozen if var_output is None else jnp.concatenate([frozen, var_output], axis=-1)
    out = p_mean_variance(sched, model_output, xt, t, parameterization, variance)
    terms["vb"] = vb_terms_bpd(sched, x0, xt, t, out["mean"], out["log_variance"], decoder_log_scale)
    if loss_type == "vlb":
        terms["loss"] = scale * terms["vb"]
    else:
        terms["loss"] = terms["mse"] + HYBRID_VLB_WEIGHT * T * terms["vb"]
    return terms


def calc_bpd_loop(
    sched: Schedule,
    model_fn: ModelFn,
    x0,
    rng: chex.PRNGKey,
    *,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    decoder_log_scale=None,
) -> dict:
    """The whole negative ELBO per example, every one of the T terms, in bits/dim.

    One lax.scan over t = T-1 .. 0 (compiles once for any T): each step draws x_t ~ q(x_t | x_0)
    with a fresh key fold_in(rng, t) and evaluates L_{t-1} (L_0 at t = 0). decoder_log_scale: a
    learned t = 0 decoder's log std (see vb_terms_bpd); None for the model's variance.

    Returns:
      dict of total_bpd [B] = prior_bpd + sum_t vb, prior_bpd [B], vb [B, T], xstart_mse [B, T]
      and mse [B, T] (eps MSE), indexed by t.
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    batch = x0.shape[0]

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
        xt = q_sample(sched, x0, t, noise)
        out = p_mean_variance(sched, model_fn(xt, t), xt, t, parameterization, variance, clip_denoised)
        vb = vb_terms_bpd(sched, x0, xt, t, out["mean"], out["log_variance"], decoder_log_scale)
        eps = predict_eps_from_x0(sched, xt, t, out["pred_x0"])
        return None, (vb, mean_flat((out["pred_x0"] - x0) ** 2), mean_flat((eps - noise) ** 2))

    ts = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, xstart_mse, mse) = jax.lax.scan(term, None, ts)
    # scan ran t = T-1 .. 0: flip to index by t, then [T, B] -> [B, T].
    vb, xstart_mse, mse = (jnp.flip(a, 0).T for a in (vb, xstart_mse, mse))
    prior = prior_bpd(sched, x0)
    return dict(total_bpd=prior + jnp.sum(vb, axis=1), prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=mse)


def bpd_estimate(
    sched: Schedule,
    model_fn: ModelFn,
    x0,
    rng: chex.PRNGKey,
    *,
    num_strata: int = 20,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    decoder_log_scale=None,
) -> dict:
    """An unbiased, stratified estimate of the whole bound per example in bits/dim, at num_strata + 1
    network calls instead of calc_bpd_loop's T (VDM likewise reports a Monte Carlo estimate over t).

    The decoder term L_0 and the prior are exact; t = 1..T-1 is cut into `num_strata` contiguous
    strata, and each contributes (its size) x L_{t-1} at one t drawn uniformly inside it (per
    example). With num_strata >= T - 1 every stratum is one step and this is the full sum.
    decoder_log_scale: a learned t = 0 decoder's log std (see vb_terms_bpd); None for the model's.

    Returns:
      dict of [B] arrays: total_bpd = prior_bpd + decoder_bpd + diffusion_bpd (the last estimated).
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("variance", variance, VARIANCES)
    batch, T = x0.shape[0], sched.num_timesteps

    def term(t, key):
        xt = q_sample(sched, x0, t, jax.random.normal(key, x0.shape, x0.dtype))
        out = p_mean_variance(sched, model_fn(xt, t), xt, t, parameterization, variance)
        return vb_terms_bpd(sched, x0, xt, t, out["mean"], out["log_variance"], decoder_log_scale)

    prior = prior_bpd(sched, x0)
    decoder = term(jnp.zeros((batch,), jnp.int32), jax.random.fold_in(rng, 0))
    diffusion = jnp.zeros_like(decoder)
    if T > 1:
        edges = np.unique(np.linspace(1, T, min(num_strata, T - 1) + 1).round().astype(np.int32))
        starts, sizes = jnp.asarray(edges[:-1]), jnp.asarray(np.diff(edges))

        def stratum(acc, k):
            key = jax.random.fold_in(rng, k + 1)
            offset = jnp.floor(jax.random.uniform(jax.random.fold_in(key, 1), (batch,)) * sizes[k]).astype(jnp.int32)
            t = starts[k] + jnp.minimum(offset, sizes[k] - 1)
            return acc + sizes[k] * term(t, jax.random.fold_in(key, 0)), None

        diffusion, _ = jax.lax.scan(stratum, diffusion, jnp.arange(len(edges) - 1))
    return dict(total_bpd=prior + decoder + diffusion, prior_bpd=prior, decoder_bpd=decoder, diffusion_bpd=diffusion)

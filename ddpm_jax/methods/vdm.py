"""Continuous-time VDM (Kingma et al. 2021) as a method: a learned monotone gamma(t) = -log SNR(t)
with learned endpoints, the UNet predicting eps from z_t, its Fourier features and the normalised
gamma, and the bound of ddpm_jax.core.vdm (256-bin decoder, continuous diffusion loss, exact prior)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import checks
from ddpm_jax.core import vdm, weighting
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Method, NoiseSchedule, Sampler, example_noise
from ddpm_jax.models.learned_schedule import MonotoneGamma
from ddpm_jax.models.unet import create_model as create_unet
from ddpm_jax.models.vdm_net import VDMScoreNet

# config.vdm fields newer than the first runs: an older config.json (load_run, resume) lacks them.
FIELD_DEFAULTS = {"weighting": "elbo", "weighting_bias": weighting.SIGMOID_BIAS}


def _field(vdm_config: ml_collections.ConfigDict, name: str):
    return vdm_config.get(name, FIELD_DEFAULTS[name])


class VDMModel(nn.Module):
    """eps_hat(z_t, t) and gamma(t). The network sees gamma(t) rescaled to [0, 1] over the initial
    endpoints (VDM's conditioning: what a t means follows the schedule as it learns), and its output
    is added to z_t (VDM's base measure: eps_hat = z_t is exact in the all-noise limit)."""

    score: nn.Module
    gamma_min: float
    gamma_max: float
    learned_gamma: bool = True
    base_measure: bool = True

    def setup(self):
        if self.learned_gamma:
            self.gamma_net = MonotoneGamma(self.gamma_min, self.gamma_max)
        else:
            self.gamma_net = vdm.FixedLinearGamma(self.gamma_min, self.gamma_max)

    def gamma(self, t):
        return self.gamma_net(t)

    def __call__(self, z, t, train: bool = False):
        cond = (self.gamma(t) - self.gamma_min) / (self.gamma_max - self.gamma_min)
        eps_hat = self.score(z, cond, train=train)
        return eps_hat + z if self.base_measure else eps_hat


class VDM(Method):
    name = "vdm"  # samplers: ancestral, ddim (the mapping closes the sampling section)
    frozen_fields = ("data.image_size", "data.channels", "model", "vdm")
    section, default_config = "vdm", "vdm"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        v = config.vdm
        unet = create_unet(config.model, config.data.image_size, config.data.channels)
        score = VDMScoreNet(unet, n_min=v.fourier_min, n_max=v.fourier_max)
        self.model = VDMModel(score, v.gamma_min, v.gamma_max, v.learned_gamma, v.base_measure)
        # the training loss's weight of log SNR (core.weighting; "elbo": the bound itself)
        self.weighting = _field(v, "weighting")
        self.weight_fn = weighting.weight_fn(
            self.weighting, -v.gamma_max, -v.gamma_min, bias=_field(v, "weighting_bias")
        )

    @classmethod
    def validate(cls, config):
        if "vdm" not in config:
            raise ConfigError("config.vdm: missing section for method='vdm'; start from configs/vdm.py.")
        v = config.vdm
        for field in ("gamma_min", "gamma_max"):
            checks.require(checks.is_number(v[field]), f"vdm.{field}", f"must be a number, got {v[field]!r}.")
        checks.require(
            v.gamma_min < v.gamma_max,
            "vdm.gamma_max",
            f"must exceed vdm.gamma_min ({v.gamma_min}); VDM starts at -13.3 and 5, got {v.gamma_max!r}.",
        )
        checks.require(
            checks.is_int(v.fourier_min) and checks.is_int(v.fourier_max) and 0 <= v.fourier_min <= v.fourier_max,
            "vdm.fourier_max",
            f"need 0 <= fourier_min <= fourier_max, got {v.fourier_min!r}, {v.fourier_max!r}.",
        )
        for field in ("sample_steps", "bound_num_t"):
            checks.positive_int(v, field, "vdm")
        name, bias = _field(v, "weighting"), _field(v, "weighting_bias")
        checks.require(
            name in weighting.WEIGHTINGS,
            "vdm.weighting",
            f"must be one of {weighting.WEIGHTINGS} (the training loss's weight of log SNR), got {name!r}.",
        )
        checks.require(checks.is_number(bias), "vdm.weighting_bias", f"must be a number, got {bias!r}.")
        try:
            create_unet(config.model, config.data.image_size, config.data.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------ pieces
    def init_params(self, rng):
        z, t = jnp.zeros((1,) + self.image_shape), jnp.zeros((1,), jnp.float32)
        return self._jitted_init(rng, z, t)["params"]

    def gamma_fn(self, params):
        return lambda t: self.apply_fn({"params": params}, t, method="gamma")

    def _eps_fn(self, params, train: bool = False, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if train else None
        return lambda z, t: self.apply_fn({"params": params}, z, t, train=train, rngs=rngs)

    def model_fn(self, params):
        """eps_hat(z_t, t) for continuous t [B] in [0, 1]."""
        return self._eps_fn(params)

    def describe(self):
        return {"parameterization": "eps", "variance": "continuous time (VDM)"}

    def probability_flow(self, params):
        return self.gamma_fn(params), self.model_fn(params)

    def _terms(self, params, x, t, eps, eps_0, eps_fn):
        """The bound's three terms at one t per example (bits/dim) and the training loss: their sum with
        the diffusion term weighted by vdm.weighting (the bound itself for "elbo")."""
        gamma_fn = self.gamma_fn(params)
        ones = jnp.ones((x.shape[0],))
        diffusion, weighted = vdm.weighted_diffusion_loss(gamma_fn, eps_fn, x, t, eps, self.weight_fn)
        nats = {
            "recon_bpd": vdm.recon_loss(gamma_fn(0 * ones), x, eps_0),
            "diffusion_bpd": diffusion,
            "prior_bpd": vdm.prior_loss(gamma_fn(ones), x),
        }
        terms = {k: vdm.nats_to_bpd(v, x) for k, v in nats.items()}
        terms["elbo_bpd"] = terms["recon_bpd"] + terms["diffusion_bpd"] + terms["prior_bpd"]
        if self.weighting == "elbo":
            terms["loss"] = terms["elbo_bpd"]
        else:
            terms["loss"] = terms["recon_bpd"] + vdm.nats_to_bpd(weighted, x) + terms["prior_bpd"]
        return terms

    # ------------------------------------------------------------------ training and evaluation
    def draw_training_inputs(self, keys, x, method_state, *, position):
        """t stratified over the global batch, eps for z_t and eps_0 for the decoder's z_0, all from each
        example's key (fold_in 0, 1, 2).

        Position i of the global batch B gets t = (i + u_i) / B with its own u_i ~ U(0, 1): one t in each
        [i/B, (i+1)/B). At a fixed position t is not U(0, 1); over random positions (the data are shuffled)
        it is, so the loss is an unbiased estimate of the bound (tests/test_vdm_method.py). This is not VDM's
        low-discrepancy draw t_i = mod(u + i/B, 1) with one u shared by the batch (vdm.low_discrepancy_t),
        which per-example keys cannot give. bench/t_draw_variance.py (B = 128, digits, paired draws): the
        shared draw's batch-mean loss variance is 0.84 +- 0.11 of this one's for the 1500-step main job and
        0.955 +- 0.037 for the histogram's exact denoiser, the gradient's variance 1.02x; both 5-6x below
        i.i.d. t. Not a significant difference, so this draw stays."""
        index, global_batch = position
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0)))(keys)
        return {
            "t": (index + u) / global_batch,
            "weights": jnp.ones_like(u),
            "noise": example_noise(keys, x.shape[1:]),
            "noise_0": jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), x.shape[1:]))(keys),
        }

    def loss_terms(self, params, x, inputs, *, train=False, dropout_rng=None):
        return self._terms(
            params, x, inputs["t"], inputs["noise"], inputs["noise_0"], self._eps_fn(params, train, dropout_rng)
        )

    def eval_inputs(self, keys, x):
        """The training draw with t ~ U(0, 1) for every example (one stratum: position (0, 1)). An eval batch
        is padded and its padding masked, so stratifying by position (the training draw) would give the real
        examples of a short last batch only the low strata of t, and bias the loss low."""
        return self.draw_training_inputs(keys, x, None, position=(jnp.zeros((x.shape[0],)), 1))

    def eval_terms(self, params, x, keys, rng):
        terms = self.loss_terms(params, x, self.eval_inputs(keys, x))
        terms["bpd_est"] = self.bound_terms(params, x, keys, rng, num_strata=self.config.training.bpd_estimate_strata)[
            "total_bpd"
        ]
        return terms

    def bound_terms(self, params, x, keys, rng, *, num_strata):
        num_t = num_strata or self.config.vdm.bound_num_t
        return vdm.bound_bpd(self.gamma_fn(params), self.model_fn(params), x, rng, num_t=num_t)

    def bound_description(self, num_strata):
        num_t = num_strata or self.config.vdm.bound_num_t
        return f"unbiased estimate, {num_t} values of t per image (exact prior, one z_0 for the decoder)"

    # ------------------------------------------------------------------ sampling
    # The T-step discretised chain (T = --steps or config.vdm.sample_steps): ancestral, or DDIM with --eta.
    def _draw_chain(self, params, rng, num, *, num_steps, eta, num_frames):
        """vdm.sample_loop with this eta (1: ancestral)."""
        return vdm.sample_loop(
            self.gamma_fn(params),
            self.model_fn(params),
            (num,) + self.image_shape,
            rng,
            num_steps=num_steps or self.config.vdm.sample_steps,
            clip_denoised=self.config.sampling.clip_denoised,
            eta=eta,
            num_frames=num_frames,
        )

    def _draw_ancestral(self, params, rng, num, *, num_steps, eta, num_frames):
        """The chain's ancestral steps: eta = 1 whatever --eta says."""
        return self._draw_chain(params, rng, num, num_steps=num_steps, eta=1.0, num_frames=num_frames)

    def _check_steps(self, sampler, num_steps, eta):
        """--steps, when given, is the chain's length: >= 1."""
        if num_steps is not None and num_steps < 1:
            raise ConfigError(f"--steps must be >= 1 (the discretised chain's length), got {num_steps!r}.")

    samplers = {  # the first is the default
        "ancestral": Sampler(
            _draw_ancestral, check=_check_steps, doc="--steps ancestral steps, default vdm.sample_steps"
        ),
        "ddim": Sampler(_draw_chain, check=_check_steps, frames=False, doc="the same chain with --eta"),
    }

    def schedule(self, params):
        """gamma(t) on a grid of 1001 points of [0, 1] (the continuous schedule has no Schedule table)."""
        t = jnp.linspace(0.0, 1.0, 1001)
        return {"t": t, "gamma": self.gamma_fn(params)(t)}

    def noise_schedule(self, params) -> NoiseSchedule:
        """log SNR(t) = -gamma(t) on `schedule`'s grid of 1001 points of [0, 1]."""
        grid = self.schedule(params)
        name = "learned gamma (VDM)" if self.config.vdm.learned_gamma else "fixed linear gamma (VDM)"
        t, gamma = (np.asarray(grid[k], np.float64) for k in ("t", "gamma"))
        return NoiseSchedule(name, t, -gamma, discrete=False)

"""The hierarchical VAE (the lecture's Markovian HVAE, the bridge from the VAE to the DDPM): L
Gaussian latent levels, bottom-up inference, the DDPM's discretized decoder, so its negative ELBO
sits beside the VAE's and the diffusion bound in bits/dim. Maths in ddpm_jax.core.hvae, network in
ddpm_jax.models.hvae."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ddpm_jax.core import hvae
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Method, Sampler, example_noise
from ddpm_jax.models.hvae import create_hvae


class HVAE(Method):
    name = "hvae"  # samplers: ancestral (the mapping closes the class)
    frozen_fields = ("data.image_size", "data.channels", "hvae")
    shared_sections = ("data", "training", "optim", "sampling")  # its networks are config.hvae's, not the UNet's
    section, default_config = "hvae", "hvae"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = create_hvae(config.hvae, config.data.image_size, config.data.channels)
        self.noise_shape = (self.model.noise_size,)  # num_levels * latent_dim per example

    @classmethod
    def validate(cls, config):
        if "hvae" not in config:
            raise ConfigError("config.hvae: missing section for method='hvae'; start from configs/hvae.py.")
        try:
            create_hvae(config.hvae, config.data.image_size, config.data.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def init_params(self, rng):
        x, z = jnp.zeros((1,) + self.image_shape), jnp.zeros((1,) + self.noise_shape)
        return self._jitted_init(rng, x, z)["params"]

    def model_fn(self, params):
        raise ConfigError("the hierarchical VAE has no denoiser model_fn(x_t, t); draw from it with Run.sample.")

    def describe(self):
        return {
            "num_levels": self.model.num_levels,
            "latent_dim": self.model.latent_dim,
            "inference": "bottom-up Markov chain q(z_1|x) prod q(z_l|z_{l-1})",
        }

    def draw_training_inputs(self, keys, x, method_state, *, position=None):
        return {"weights": jnp.ones((x.shape[0],), jnp.float32), "noise": example_noise(keys, self.noise_shape)}

    def loss_terms(self, params, x, inputs, *, train=False, dropout_rng=None):
        return hvae.hvae_terms_from_noise(self.apply_fn, params, x, inputs["noise"])

    def eval_terms(self, params, x, keys, rng):
        terms = self.loss_terms(params, x, {"noise": example_noise(keys, self.noise_shape)})
        return {**terms, "bpd_est": terms["loss"]}

    def bound_terms(self, params, x, keys, rng, *, num_strata):
        terms = self.loss_terms(params, x, {"noise": example_noise(keys, self.noise_shape)})
        out = {"total_bpd": terms["loss"], "recon_bpd": terms["recon_bpd"], "kl_bpd": terms["kl_bpd"]}
        out.update({k: v for k, v in terms.items() if k.startswith("kl_") and k != "kl_bpd"})
        return out

    def bound_description(self, num_strata):
        return (
            "one draw of z_1..z_L per image; top-level KL exact given z_{L-1}, lower levels single-sample log q - log p"
        )

    # ------------------------------------------------------------------ sampling
    def _draw_ancestral(self, params, rng, num, *, num_steps, eta, num_frames):
        """z_L ~ N(0, I), z_{l-1} ~ p(z_{l-1} | z_l), the decoder's mean (num_steps, eta, num_frames unused)."""
        return {"samples": hvae.hvae_sample(self.apply_fn, params, rng, num)}

    samplers = {"ancestral": Sampler(_draw_ancestral, frames=False, doc="z_L from the prior, down the levels, decoded")}

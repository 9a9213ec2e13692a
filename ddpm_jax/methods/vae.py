"""The VAE baseline (the lecture's starting point; Kingma & Welling 2014): one Gaussian latent, the
DDPM's discretized decoder, so its negative ELBO sits beside the diffusion bound in bits/dim."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ddpm_jax.core import vae
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Method, Sampler, example_noise
from ddpm_jax.models.vae import create_vae


class VAE(Method):
    name = "vae"  # samplers: ancestral (the mapping closes the class)
    frozen_fields = ("data.image_size", "data.channels", "vae")
    shared_sections = ("data", "training", "optim", "sampling")  # its networks are config.vae's, not the UNet's
    section, default_config = "vae", "vae"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = create_vae(config.vae, config.data.image_size, config.data.channels)
        self.latent_shape = (config.vae.latent_dim,)

    @classmethod
    def validate(cls, config):
        if "vae" not in config:
            raise ConfigError("config.vae: missing section for method='vae'; start from configs/vae.py.")
        try:
            create_vae(config.vae, config.data.image_size, config.data.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def init_params(self, rng):
        x, z = jnp.zeros((1,) + self.image_shape), jnp.zeros((1,) + self.latent_shape)
        return self._jitted_init(rng, x, z)["params"]

    def model_fn(self, params):
        raise ConfigError("the VAE has no denoiser model_fn(x_t, t); draw from it with Run.sample.")

    def draw_training_inputs(self, keys, x, method_state, *, position=None):
        return {"weights": jnp.ones((x.shape[0],), jnp.float32), "noise": example_noise(keys, self.latent_shape)}

    def loss_terms(self, params, x, inputs, *, train=False, dropout_rng=None):
        return vae.vae_terms_from_noise(self.apply_fn, params, x, inputs["noise"])

    def eval_terms(self, params, x, keys, rng):
        terms = self.loss_terms(params, x, {"noise": example_noise(keys, self.latent_shape)})
        return {**terms, "bpd_est": terms["loss"]}

    def bound_terms(self, params, x, keys, rng, *, num_strata):
        terms = self.loss_terms(params, x, {"noise": example_noise(keys, self.latent_shape)})
        return {"total_bpd": terms["loss"], "recon_bpd": terms["recon_bpd"], "kl_bpd": terms["kl_bpd"]}

    def bound_description(self, num_strata):
        return "exact KL, one draw of z per image"

    # ------------------------------------------------------------------ sampling
    def _draw_decoder(self, params, rng, num, *, num_steps, eta, num_frames):
        """z ~ N(0, I), decoded in one pass (no chain: num_steps, eta and num_frames are not used)."""
        return {"samples": vae.vae_sample(self.apply_fn, params, rng, num)}

    samplers = {
        "ancestral": Sampler(_draw_decoder, label="decoder", frames=False, doc="z from the prior, decoded in one pass")
    }

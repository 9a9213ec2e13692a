"""The VAE baseline on the digits (the lecture's starting point), trained and scored like the DDPM.

Same data, loop, optimiser, EMA and discretized decoder as configs/ddpm.py, so its test
bits/dim (the negative ELBO) sits beside the DDPM's bound: `python train.py --config=configs/vae.py`.
"""

import ml_collections

from . import ddpm as ddpm_config

VARIANTS = ("runlocal",)  # the args get_config accepts (--config=vae:runlocal)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ddpm_config.get_config(arg)
    config.method = "vae"
    del config.model, config.diffusion  # the UNet's and the DDPM's: the VAE's networks are config.vae's
    config.vae = ml_collections.ConfigDict()
    config.vae.latent_dim = 16
    config.vae.hidden = 256
    config.vae.num_hidden_layers = 2
    config.vae.dtype = "float32"
    if arg == "runlocal":
        config.vae.latent_dim = 4
        config.vae.hidden = 16
        config.vae.num_hidden_layers = 1
    return config

"""The hierarchical VAE on the digits (the lecture's Markovian HVAE, between the VAE and the DDPM),
trained and scored like them.

Same data, loop, optimiser, EMA and discretized decoder as configs/ddpm.py and configs/vae.py
(level 1 is configs/vae.py's VAE), so its test bits/dim (the negative ELBO) sits beside theirs:
`python train.py --config=configs/hvae.py`. num_levels = 1 is the VAE.
"""

import ml_collections

from . import ddpm as ddpm_config

VARIANTS = ("runlocal",)  # the args get_config accepts (--config=hvae:runlocal)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ddpm_config.get_config(arg)
    config.method = "hvae"
    del config.model, config.diffusion  # the UNet's and the DDPM's: the HVAE's networks are config.hvae's
    config.hvae = ml_collections.ConfigDict()
    config.hvae.num_levels = 2  # latent levels z_1..z_L
    config.hvae.latent_dim = 16  # size of each z_l
    config.hvae.hidden = 256  # width of every MLP (encoder, decoder, each level's q and p)
    config.hvae.num_hidden_layers = 2
    config.hvae.dtype = "float32"
    if arg == "runlocal":
        config.hvae.latent_dim = 4
        config.hvae.hidden = 16
        config.hvae.num_hidden_layers = 1
    return config

"""The diffusion model against the VAE baseline (the lecture's starting point): same data, loop and decoder."""

from ._common import DEFAULT_CELL, grid


def get_grid():
    return grid({"default": DEFAULT_CELL, "vae": {"config": "vae"}})

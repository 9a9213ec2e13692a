"""What the network predicts (the lecture's mean / x0 / eps, and v), linear schedule, simple loss on it."""

from ._common import DEFAULT_CELL, grid


def get_grid():
    return grid(
        {
            "default": DEFAULT_CELL,
            "x0": {"diffusion.parameterization": "x0"},
            "mean": {"diffusion.parameterization": "mean"},
            "v": {"diffusion.parameterization": "v"},
        }
    )

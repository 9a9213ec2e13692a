"""Beta schedules (linear = the default, quadratic, cosine, constant), eps / fixed_small / simple loss."""

from ._common import DEFAULT_CELL, grid


def get_grid():
    return grid(
        {
            "default": DEFAULT_CELL,
            "quadratic": {"diffusion.schedule": "quadratic"},
            "cosine": {"diffusion.schedule": "cosine"},
            "constant": {"diffusion.schedule": "constant"},
        }
    )

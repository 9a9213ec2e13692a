"""Variance preserving (linear) vs variance exploding (geometric sigma 0.01..50), eps prediction."""

from ._common import DEFAULT_CELL, grid


def get_grid():
    return grid({"default": DEFAULT_CELL, "ve": {"diffusion.schedule": "ve"}})

"""Losses: simple (Ho et al. eq. 14), the omega_t-weighted MSE, the exact bound (with importance-sampled t),
and hybrid with a learned variance (Improved DDPM)."""

from ._common import DEFAULT_CELL, grid


def get_grid():
    return grid(
        {
            "default": DEFAULT_CELL,
            "weighted": {"diffusion.loss_type": "weighted", "diffusion.timestep_sampler": "importance"},
            "vlb": {"diffusion.loss_type": "vlb", "diffusion.timestep_sampler": "importance"},
            "hybrid_learned_range": {
                "diffusion.loss_type": "hybrid",
                "diffusion.variance": "learned_range",
                "diffusion.schedule": "cosine",
            },
        }
    )

"""The DDPM's loss weightings (diffusion.weighting: the discrete form of core/weighting.py's family) on the
omega_t-weighted bound (loss_type "weighted", importance-sampled t), against L_simple ("default"). "weighting_eps"
is L_simple's eps-MSE on the same terms (up to the decoder's L_0) and "weighting_elbo" the bound itself."""

from ._common import DEFAULT_CELL, grid

WEIGHTINGS = ("elbo", "eps", "x0", "v", "simple", "sigmoid", "edm")  # ddpm_jax.core.weighting.WEIGHTINGS

WEIGHTED = {"diffusion.loss_type": "weighted", "diffusion.timestep_sampler": "importance"}


def get_grid():
    cells = {f"weighting_{name}": {**WEIGHTED, "diffusion.weighting": name} for name in WEIGHTINGS}
    return grid({"default": DEFAULT_CELL, **cells})

"""Fixed vs learned noise schedule: the learned one (VDM's monotone network) is trained through the exact
bound, so its fixed counterpart here trains on the same loss (vlb, importance-sampled t)."""

from ._common import grid


def get_grid():
    vlb = {"diffusion.loss_type": "vlb", "diffusion.timestep_sampler": "importance"}
    return grid({"vlb": vlb, "learned_vlb": {**vlb, "diffusion.schedule": "learned"}}, reference="vlb")

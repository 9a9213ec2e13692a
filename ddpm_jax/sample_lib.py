"""sample.py's library half: restore the latest checkpoint of a run and draw from its EMA params."""

from __future__ import annotations

import os

import jax
import numpy as np

from ddpm_jax import checkpoint, plots, train_lib
from ddpm_jax.loop import draw_samples
from ddpm_jax.validation import ConfigError, validate_config


def restore_run(workdir: str):
    """(config, unreplicated state) of the latest checkpoint in workdir, or a CheckpointError.

    Reads without writing (a read-only manager), so it is safe beside a training that is running.
    """
    config = checkpoint.load_config(workdir)
    try:
        validate_config(config, num_devices=1)  # the batch size does not matter here
    except (ConfigError, AttributeError, KeyError) as e:  # a hand-edited or foreign config.json
        raise checkpoint.CheckpointError(f"{os.path.join(workdir, checkpoint.CONFIG_FILE)} is not a usable "
                                         f"config ({e}); pass the --workdir that train.py wrote to.") from e
    no_checkpoint = checkpoint.CheckpointError(
        f"{checkpoint.checkpoint_dir(workdir)} holds no checkpoint: train first "
        f"(python train.py --workdir={workdir}), or pass the --workdir of a trained run.")
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
        raise no_checkpoint
    state = train_lib.create_train_state(config, jax.random.PRNGKey(config.seed))
    restored = checkpoint.restore_latest(checkpoint.make_manager(workdir, read_only=True), state)
    if restored is None:
        raise no_checkpoint
    return config, restored


SAMPLERS = ("ancestral", "respaced", "ddim")


def check_sampler(config, sampler: str, num_steps: int | None, eta: float) -> None:
    """A ValueError naming the flag when the sampler cannot run on this config."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler={sampler!r} is unknown; use one of {', '.join(SAMPLERS)}.")
    if train_lib.is_vae(config):
        if sampler != "ancestral":
            raise ValueError(f"--sampler={sampler!r} needs a diffusion model; this workdir holds the VAE baseline, "
                             "which decodes z ~ N(0, I) in one step: leave --sampler out.")
        return
    T = config.diffusion.num_timesteps
    if sampler != "ancestral" and (num_steps is None or not 1 <= num_steps <= T):
        raise ValueError(f"--sampler={sampler} needs --steps in [1, {T}] (T of this run), got {num_steps!r}.")
    if sampler == "ddim" and config.diffusion.schedule == "ve":
        raise ValueError("--sampler=ddim is written for variance-preserving schedules; this run uses 've': "
                         "use --sampler=respaced or ancestral.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}.")


def sample_from_workdir(workdir: str, num: int, seed: int = 0, out: str | None = None, strip: bool = False,
                        sampler: str = "ancestral", num_steps: int | None = None, eta: float = 0.0) -> list[str]:
    """Writes a PNG grid and an .npz of `num` samples (and a denoising strip); returns the paths."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"--num must be a whole number >= 1 (how many samples), got {num!r}.")
    config, state = restore_run(workdir)
    check_sampler(config, sampler, num_steps, eta)
    *_, p_sample = train_lib.make_pmapped_steps(config, state.apply_fn, train_lib.make_schedule(config))
    params = train_lib.replicate(state.ema_params)
    num_frames = 10 if strip and sampler != "ddim" else 0
    result = draw_samples(p_sample, params, config, jax.random.PRNGKey(seed), num, num_frames=num_frames,
                          sampler=sampler, num_steps=num_steps, eta=eta)
    out = out or os.path.join(workdir, f"sample_seed{seed}.png")
    paths = [plots.save_grid(result["samples"], out)]
    npz = os.path.splitext(out)[0] + ".npz"
    np.savez(npz, samples=result["samples"])
    paths.append(npz)
    if "frames" in result:
        paths.append(plots.save_strip(result["frames"][:, :8], os.path.splitext(out)[0] + "_strip.png"))
    return paths

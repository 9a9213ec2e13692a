"""sample.py's library half: a trained run's EMA params to an .npz and a PNG grid (and a strip).
Imports neither the training loop nor TensorFlow."""

from __future__ import annotations

import errno
import os

import jax

from ddpm_jax import fileio
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import plots
from ddpm_jax.run import load_run
from ddpm_jax.training import train_lib


def output_paths(out: str | None, workdir: str, seed: int) -> str:
    """The grid's .png path from --out: a .png path, a bare stem (".png" added) or an existing folder.
    Paths are local or URIs (gs://...): the string operations here hold for both."""
    if not out:
        return os.path.join(workdir, f"sample_seed{seed}.png")
    if out.endswith(("/", os.sep)) or fileio.as_path(out).is_dir():
        return os.path.join(out, f"sample_seed{seed}.png")
    stem, ext = os.path.splitext(out)
    if ext.lower() not in ("", ".png"):
        raise ConfigError(
            f"--out={out}: grids are written as PNG; give a .png path, a bare name (.png is added) or a folder."
        )
    return stem + ".png"


def sample_from_workdir(
    workdir: str,
    num: int,
    seed: int = 0,
    out: str | None = None,
    strip: bool = False,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float = 0.0,
) -> list[str]:
    """Writes an .npz and a PNG grid of `num` samples (and a denoising strip); returns the paths.

    Every argument is checked before anything is compiled, and the samples are saved before the
    pictures, so a failing picture loses nothing.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(f"--num must be a whole number >= 1 (how many samples), got {num!r}.")
    png = output_paths(out, workdir, seed)
    if out:  # the default goes into the workdir, which load_run checks
        folder = fileio.as_path(png).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a file is in the way" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror
            raise ConfigError(
                f"--out={out}: its folder {folder} cannot be created ({why}); pass a path you can write to."
            ) from None
        if fileio.is_local(folder) and not os.access(folder, os.W_OK):
            raise ConfigError(f"--out={out}: its folder {folder} is not writable; pass a path you can write to.")
    run = load_run(workdir)
    sampler = sampler or run.method.samplers[0]
    run.method.check_sampler(sampler, num_steps, eta)
    steps = train_lib.compile_steps(run.method, run.config)
    num_frames = 10 if strip and sampler != "ddim" else 0
    result = train_lib.draw_samples(
        steps.sample,
        train_lib.replicate(run.params),
        jax.random.PRNGKey(seed),
        num,
        num_frames=num_frames,
        sampler=sampler,
        num_steps=num_steps,
        eta=eta,
    )
    stem = os.path.splitext(png)[0]
    fileio.save_npz(stem + ".npz", samples=result["samples"])
    paths = [stem + ".npz", plots.save_grid(result["samples"], png)]
    if "frames" in result:
        paths.append(plots.save_strip(result["frames"][:, :8], stem + "_strip.png"))
    return paths

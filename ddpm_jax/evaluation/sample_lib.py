"""Drawing samples on every device (`draw_samples`, for the loop's grids, the end-of-run report and
evaluate), and sample.py's library half: a trained run's EMA params to an .npz and a PNG grid (and
a strip). Imports neither the training loop nor TensorFlow."""

from __future__ import annotations

import errno
import os

import jax
import numpy as np

from ddpm_jax import fileio
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import plots
from ddpm_jax.run import load_run
from ddpm_jax.training import distributed, train_lib


def draw_samples(
    p_sample,
    params,
    rng,
    num: int,
    num_frames: int = 0,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
) -> dict:
    """`num` samples from this process's devices (rounded up to their count), on the host.

    Args:
      p_sample: the pmapped sample step (`train_lib.CompiledSteps.p_sample`).
      params: replicated parameters (`distributed.replicate`).
      rng: the draw's key; each device folds in its index.
      num: how many samples.
      num_frames: also this many denoising frames (0: none).
      sampler, num_steps, eta: one of the method's samplers and its settings.

    Returns:
      {"samples": [num, H, W, C]} and, with num_frames, "frames" / "pred_x0" [F, num, H, W, C] and
      "frame_t" [F].
    """
    devices = jax.local_device_count()
    per_device = -(-num // devices)
    out = distributed.local_values(p_sample(params, rng, per_device, num_frames, sampler, num_steps, float(eta)))
    merge = lambda x: x.reshape((-1,) + x.shape[2:])[:num]  # [D, b, ...] -> [D*b, ...]
    result = {"samples": merge(out["samples"])}
    if num_frames and "frames" in out:  # frames are [D, F, b, ...] -> [F, D*b, ...]
        for k in ("frames", "pred_x0"):
            v = np.moveaxis(out[k], 0, 1)
            result[k] = v.reshape(v.shape[:1] + (-1,) + v.shape[3:])[:, :num]
        result["frame_t"] = out["frame_t"][0]
    return result


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
    sampler = sampler or run.method.default_sampler()
    run.method.check_sampler(sampler, num_steps, eta)
    steps = train_lib.compile_steps(run.method, run.config)
    num_frames = 10 if strip and run.method.samplers[sampler].frames else 0
    result = draw_samples(
        steps.p_sample,
        distributed.replicate(run.params),
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
        paths.append(plots.save_strip(result["frames"][:, :8], stem + "_strip.png", frame_t=result.get("frame_t")))
    return paths

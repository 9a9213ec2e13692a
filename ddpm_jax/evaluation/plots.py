"""Pictures and numbers people look at: image grids, denoising strips, curves, bits/dim plots.

Each picture is rendered to PNG bytes in memory and written in one piece through fileio (any path
that etils.epath knows: a local folder or gs://...)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ddpm_jax import fileio
from ddpm_jax.core.pixels import unscale_images


def image_grid(images, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] mosaic."""
    images = unscale_images(images)
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(array: np.ndarray, path, min_size: int = 512) -> str:
    """Saves a uint8 image, scaled up with nearest-neighbour so that tiny digits stay visible."""
    scale = max(1, min_size // max(array.shape[:2]))
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    img = img.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return fileio.atomic_write(path, buf.getvalue())


def save_grid(images, path, ncol: int | None = None) -> str:
    return save_png(image_grid(images, ncol), path)


def strip_image(frames) -> np.ndarray:
    """Denoising strip: frames [F, B, H, W, C] -> uint8 mosaic, rows are examples, columns go x_T -> x_0."""
    frames = np.asarray(frames)
    f, b = frames.shape[:2]
    return image_grid(frames.transpose(1, 0, 2, 3, 4).reshape((f * b,) + frames.shape[2:]), ncol=f)


def save_strip(frames, path) -> str:
    return save_png(strip_image(frames), path)


def plot_curves(records: list[dict], keys, path, title: str = "") -> str | None:
    """Plots metric curves (log-scale y) against step from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label=key)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_vb_terms(vb_per_t, path, title: str = "") -> str:
    """Per-t terms of the bound (bits/dim, log scale): where the bound's mass lies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(len(vb_per_t)), np.maximum(np.asarray(vb_per_t), 1e-8))
    ax.set_xlabel("t  (0 = decoder L_0)")
    ax.set_ylabel("L_t  [bits/dim]")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path) -> str:
    """Writes a matplotlib figure as a PNG to any path and closes it; returns path."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return fileio.atomic_write(path, buf.getvalue())

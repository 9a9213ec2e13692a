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


def image_grid(images, ncol: int | None = None, pad: int = 1, fill: int = 255) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] (or uint8 pixels) -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C]
    mosaic at pixel size, `fill` between the images (TensorBoard's grids; the PNGs: grid_picture)."""
    images = _pixels(images)
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


PICTURE_WIDTH = 512  # the least width of a saved grid or strip, in pixels: 8x8 digits at 1:1 are too small to see
SEPARATOR = 2  # pixels between the cells of a saved grid or strip
SEPARATOR_VALUE = 255  # white, as TensorBoard's grids: plain against the digits' black background


def _pixels(images) -> np.ndarray:
    """[N, H, W, C] uint8 pixels: uint8 arrays as they are, floats in [-1, 1] unscaled."""
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else unscale_images(images)


def grid_picture(images, ncol: int | None = None, min_width: int = PICTURE_WIDTH) -> np.ndarray:
    """What save_grid writes: [N, H, W, C] (in [-1, 1], or uint8 pixels) as one uint8 mosaic, each
    image scaled up by a whole factor with nearest-neighbour (every pixel a square block) so that the
    mosaic is at least `min_width` pixels wide, the cells SEPARATOR white pixels apart.

    Returns uint8 [rows * (s H + SEPARATOR) + SEPARATOR, cols * (s W + SEPARATOR) + SEPARATOR, C].
    """
    images = _pixels(images)
    n, h, w, _ = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    scale = max(1, int(math.ceil(min_width / (ncol * w))))
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return image_grid(big, ncol, pad=SEPARATOR, fill=SEPARATOR_VALUE)


def save_png(array: np.ndarray, path) -> str:
    """Writes a uint8 [H, W, C] picture as a PNG, pixel for pixel; returns path."""
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return fileio.atomic_write(path, buf.getvalue())


def save_grid(images, path, ncol: int | None = None) -> str:
    """samples.png: `grid_picture` of [N, H, W, C] in [-1, 1] (the arrays themselves go to the .npz)."""
    return save_png(grid_picture(images, ncol), path)


def strip_image(frames) -> np.ndarray:
    """Denoising strip at pixel size (TensorBoard): frames [F, B, H, W, C] -> uint8 mosaic, rows are
    examples, columns go x_T -> x_0."""
    frames = np.asarray(frames)
    f, b = frames.shape[:2]
    return image_grid(frames.transpose(1, 0, 2, 3, 4).reshape((f * b,) + frames.shape[2:]), ncol=f)


def frame_label(t) -> str:
    """A strip column's label: "t=17" for a discrete chain's step, "t=0.996" for continuous time."""
    t = np.asarray(t)
    return f"t={int(t)}" if np.issubdtype(t.dtype, np.integer) else f"t={float(t):.3g}"


STRIP_CAPTION = "each row: noise (left) to a sample (right); t of each column:"


def strip_picture(frames, frame_t=None, min_width: int = PICTURE_WIDTH) -> np.ndarray:
    """What save_strip writes: frames [F, B, H, W, C] as `grid_picture` (one row per example, one
    column per frame), under a white band with STRIP_CAPTION and each column's t (`frame_t` [F],
    from the samplers; without it, only the caption's first half)."""
    from PIL import ImageDraw, ImageFont

    frames = _pixels(frames)
    f, b = frames.shape[:2]
    body = grid_picture(
        frames.transpose(1, 0, 2, 3, 4).reshape((f * b,) + frames.shape[2:]), ncol=f, min_width=min_width
    )
    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError, ImportError):  # no FreeType: PIL's bitmap font
        font = ImageFont.load_default()
    caption = STRIP_CAPTION if frame_t is not None else STRIP_CAPTION.split(";")[0]
    line = font.getbbox("t=0.95 Ag")[3] + 4
    header = Image.new("L", (body.shape[1], 2 * line + 4 if frame_t is not None else line + 4), 255)
    draw = ImageDraw.Draw(header)
    draw.text((SEPARATOR, 2), caption, fill=0, font=font)
    if frame_t is not None:
        cell = (body.shape[1] - SEPARATOR) // f
        for i, t in enumerate(np.asarray(frame_t)):
            label = frame_label(t)
            width = draw.textlength(label, font=font)
            draw.text((SEPARATOR + i * cell + (cell - SEPARATOR - width) / 2, line + 2), label, fill=0, font=font)
    top = np.asarray(header, np.uint8)[..., None].repeat(body.shape[-1], axis=-1)
    return np.concatenate([top, body], axis=0)


def save_strip(frames, path, frame_t=None) -> str:
    """denoising_strip.png: `strip_picture` of frames [F, B, H, W, C], columns labelled with `frame_t`."""
    return save_png(strip_picture(frames, frame_t), path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax, label: str) -> None:
    """A log y axis labelled "<label> (log scale)", its ticks plain numbers (2, 3, 0.5; not 2x10^0)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.set_ylabel(f"{label} (log scale)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    decades = math.log10(high / max(low, 1e-30))

    def minor(v, _):  # the majors (powers of 10) are too few to read values off a short axis
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:g}" if decades <= 1 or (decades <= 6 and mantissa in (2, 5)) else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _step_x(ax) -> None:
    """The x axis: "training step", whole numbers."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))


def plot_curves(records: list[dict], keys, path, title: str = "", ylabel: str = "", labels=None) -> str | None:
    """Metric curves against the training step from metrics.jsonl records, on a log y axis labelled
    `ylabel` (log scale); `labels` names each key in the legend. None when no key has a value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if not _curves(ax, records, keys, labels):
        plt.close(fig)
        return None
    _step_x(ax)
    _log_y(ax, ylabel or "value")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _curves(ax, records, keys, labels=None) -> bool:
    """Plots each key's finite values against "step"; whether any was plotted."""
    plotted = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 4 else None, label=(labels or {}).get(key, key))
            plotted = True
    return plotted


LOSS_LABELS = {
    "loss": "training loss (one batch per point)",
    "val_loss": "validation loss (validation split, EMA params)",
    "val_bpd_est": "validation bound, estimate (EMA params)",
    "test_loss": "test loss (test split, EMA params)",  # runs from before the validation split
    "test_bpd_est": "test bound, estimate (EMA params)",
}
BITS_PER_DIM = "bits/dim"
EVAL_LOSSES = ("val_loss", "test_loss")  # the eval curve: val_ keys, or test_ keys in an older run's records
EVAL_BOUNDS = ("val_bpd_est", "test_bpd_est")


def plot_loss(records: list[dict], path, loss_unit: str = BITS_PER_DIM) -> str | None:
    """loss.png: the training and validation loss against the training step, on a log axis labelled in
    `loss_unit` (the method's `loss_unit()`). A loss in other units (a DDPM's L_simple, an MSE) gets
    a second panel: the validation bound's estimate (`val_bpd_est`) in bits/dim. Records of runs from
    before the validation split, whose evals are test_loss / test_bpd_est, are drawn the same way.
    None without a loss."""
    plt = _pyplot()
    separate = loss_unit != BITS_PER_DIM and any(k in r for r in records for k in EVAL_BOUNDS)
    fig, axes = plt.subplots(1, 2 if separate else 1, figsize=(11 if separate else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if not _curves(ax, records, ["loss", *EVAL_LOSSES], LOSS_LABELS):
        plt.close(fig)
        return None
    _step_x(ax)
    _log_y(ax, loss_unit)
    ax.set_title("training loss")
    ax.legend()
    if separate:
        bound = axes[0, 1]
        _curves(bound, records, list(EVAL_BOUNDS), LOSS_LABELS)
        _step_x(bound)
        _log_y(bound, BITS_PER_DIM)
        split = "validation" if any("val_bpd_est" in r for r in records) else "test"
        bound.set_title(f"negative ELBO on the {split} split")
        bound.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_vb_terms(vb_per_t, path, title: str = "") -> str:
    """Per-t terms of the bound (bits/dim, log scale): where the bound's mass lies."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(vb_per_t)), np.maximum(np.asarray(vb_per_t), 1e-8))
    ax.set_xlabel("t  (0: the decoder's L_0; then the KL term L_t of each step)")
    _log_y(ax, "L_t, bits/dim")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_noise_schedule(schedule, path) -> str:
    """A run's noise schedule (methods.NoiseSchedule, `run.noise_schedule`): log SNR against t."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(schedule.t, schedule.log_snr, marker="." if len(schedule.t) <= 50 else None)
    ax.axhline(0.0, color="grey", linewidth=0.5)  # SNR = 1: as much signal as noise
    ax.set_xlabel("t (the step)" if schedule.discrete else "t (continuous time)")
    ax.set_ylabel("log SNR(t) = log(a_t^2 / s_t^2)")
    ax.set_title(f"noise schedule: {schedule.name}")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path) -> str:
    """Writes a matplotlib figure as a PNG to any path and closes it; returns path."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return fileio.atomic_write(path, buf.getvalue())

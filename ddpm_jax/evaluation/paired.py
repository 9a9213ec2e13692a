"""Paired differences between ablation cells: a 95% interval and a verdict (pure NumPy / SciPy).

A cell is compared with the grid's reference cell metric by metric. Write d[s, i] for the cell's
value minus the reference's with training seed s (the same config.seed in both: the same init key,
data order and noise keys) on test image i (the same image and, within a seed, the same draws of
t and eps for it: the final bound's key is PRNGKey(config.seed + 1) in both cells, so the draws
are common random numbers and their noise largely cancels in d). The estimand is the expected
difference over training seeds and over test images from the same distribution, under the
crossed random-effects model (one observation per seed x image)

    d[s, i] = mu + a_s + b_i + e_si,   a_s ~ (0, sa2), b_i ~ (0, sb2), e_si ~ (0, se2) independent,

a_s what the seed does to the difference, b_i how the image's difference departs from the mean,
e_si the rest (seed x image interaction and the draws of t that do not cancel). The estimate is
the grand mean d.. over the N seeds and M images, whose variance is

    Var(d..) = sa2 / N + sb2 / M + se2 / (N M),

estimated without bias from the two-way ANOVA mean squares (E MS_seed = se2 + M sa2,
E MS_image = se2 + N sb2, E MS_resid = se2; Searle, Casella & McCulloch, "Variance Components",
1992, sec. 4.6 (the two-way crossed classification); Cornfield & Tukey 1956) as

    V = (MS_seed + MS_image - MS_resid) / (N M),

with Satterthwaite's (1946) degrees of freedom df = V^2 / sum_k (c_k MS_k)^2 / df_k, and the
interval d.. +- t(0.975, df) sqrt(V). `crossed_interval`.

Where less is known the method falls back, and says so in `Interval.method`:

- per-seed values only (the Frechet distance, scored on samples drawn per seed): the t interval
  over the N per-seed differences, N - 1 degrees of freedom (`seed_interval`). It treats the
  test set as fixed (what another test set would do is not in it).
- one seed with per-image values: the paired t interval over the M per-image differences, M - 1
  degrees of freedom (`image_interval`). It ignores the seed noise sa2, which for short runs is
  usually the larger part: the method's name says so.
- one seed without per-image values (old cells): the unpaired interval from the two bounds'
  standard errors over images (`unpaired_interval`), also blind to seed noise.

`verdict` reads an interval: "better" / "worse" when it excludes 0 (lower is better for bits/dim
and the Frechet distance), "within noise" when it holds 0. tests/test_paired.py checks the
coverage of every interval on synthetic grids with known seed and image noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from scipy import stats

LEVEL = 0.95
SEEDS_X_IMAGES = "seeds x images"
SEEDS = "seeds"
IMAGES_ONE_SEED = "images (1 seed: ignores seed noise)"
UNPAIRED_ONE_SEED = "unpaired images (1 seed: ignores seed noise)"


@dataclasses.dataclass(frozen=True)
class Interval:
    """A difference (cell - reference) with its `level` interval [lo, hi].

    Attributes:
      diff: the estimate. se: its standard error. df: the t quantile's degrees of freedom (inf: normal).
      lo, hi: the interval. method: how it was made (one of this module's constants).
      n_seeds: seeds paired. n_images: images paired per seed (None without per-image values).
    """

    diff: float
    se: float
    df: float
    lo: float
    hi: float
    method: str
    n_seeds: int
    n_images: int | None = None


def _interval(diff: float, se: float, df: float, method: str, n_seeds: int, n_images=None, level=LEVEL) -> Interval:
    q = float(stats.t.ppf(0.5 + level / 2, df)) if np.isfinite(df) else float(stats.norm.ppf(0.5 + level / 2))
    half = q * se if se > 0 else 0.0
    return Interval(
        float(diff), float(se), float(df), float(diff - half), float(diff + half), method, n_seeds, n_images
    )


def crossed_interval(d, level: float = LEVEL) -> Interval:
    """The interval of the grand mean of d [N seeds, M images], N, M >= 2 (the module's model).

    V = (MS_seed + MS_image - MS_resid) / (N M), never below the larger of MS_seed / (N M) and
    MS_image / (N M) (each alone a lower bound of Var(d..) in expectation: a guard against a
    negative or tiny estimate); Satterthwaite's degrees of freedom.
    """
    d = np.asarray(d, np.float64)
    n, m = d.shape
    if n < 2 or m < 2:
        raise ValueError(f"crossed_interval needs >= 2 seeds and >= 2 images, got {d.shape}")
    grand = d.mean()
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_seed = m * np.sum((rows - grand) ** 2) / (n - 1)
    ms_image = n * np.sum((cols - grand) ** 2) / (m - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    df_resid = (n - 1) * (m - 1)
    ms_resid = np.sum(resid**2) / df_resid
    terms = np.array([ms_seed, ms_image, -ms_resid]) / (n * m)
    dfs = np.array([n - 1, m - 1, df_resid], np.float64)
    var = terms.sum()
    floor = max(terms[0], terms[1])
    if var < floor:  # one mean square alone, with its own degrees of freedom
        var, df = floor, dfs[0] if terms[0] >= terms[1] else dfs[1]
    else:
        df = var**2 / np.sum(terms**2 / dfs) if var > 0 else math.inf
    return _interval(grand, math.sqrt(var), df, SEEDS_X_IMAGES, n, m, level)


def seed_interval(d, level: float = LEVEL) -> Interval:
    """The t interval of the mean of N >= 2 per-seed differences, N - 1 degrees of freedom."""
    d = np.asarray(d, np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"seed_interval needs >= 2 per-seed differences, got shape {d.shape}")
    return _interval(d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1, SEEDS, len(d), None, level)


def image_interval(d, level: float = LEVEL) -> Interval:
    """One seed: the paired t interval of the mean of M >= 2 per-image differences (M - 1 df);
    blind to seed noise."""
    d = np.asarray(d, np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"image_interval needs >= 2 per-image differences, got shape {d.shape}")
    return _interval(d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1, IMAGES_ONE_SEED, 1, len(d), level)


def unpaired_interval(cell: float, cell_se: float, reference: float, reference_se: float, level=LEVEL) -> Interval:
    """One seed, two means with their standard errors over (many) images, not paired: normal interval
    of the difference with se = sqrt(se_cell^2 + se_ref^2); blind to seed noise."""
    se = math.hypot(cell_se, reference_se)
    return _interval(cell - reference, se, math.inf, UNPAIRED_ONE_SEED, 1, None, level)


def unpaired_image_interval(cell, reference, level: float = LEVEL) -> Interval:
    """Welch's interval of mean(cell) - mean(reference) over two sets of per-image values treated as
    independent: what the difference's interval would be without pairing by image (and without common
    random numbers); the yardstick of `image_interval`."""
    c, r = np.asarray(cell, np.float64), np.asarray(reference, np.float64)
    vc, vr = c.var(ddof=1) / len(c), r.var(ddof=1) / len(r)
    var = vc + vr
    df = var**2 / (vc**2 / (len(c) - 1) + vr**2 / (len(r) - 1)) if var > 0 else math.inf
    return _interval(c.mean() - r.mean(), math.sqrt(var), df, "unpaired images (Welch)", 1, None, level)


def verdict(interval: Interval | None, lower_is_better: bool = True) -> str:
    """ "better" / "worse" when the interval excludes 0 (in the metric's good / bad direction),
    "within noise" when it holds 0; "" without an interval."""
    if interval is None:
        return ""
    if interval.lo <= 0.0 <= interval.hi:
        return "within noise"
    below = interval.hi < 0.0
    return "better" if below == lower_is_better else "worse"


def mean_se(values) -> tuple[float, float | None]:
    """(mean, standard error of the mean, ddof 1) of per-seed values; se None for one value."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return math.nan, None
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def paired_difference(
    cell: Mapping[int, float],
    reference: Mapping[int, float],
    *,
    cell_images: Mapping[int, np.ndarray] | None = None,
    reference_images: Mapping[int, np.ndarray] | None = None,
    cell_se: Mapping[int, float] | None = None,
    reference_se: Mapping[int, float] | None = None,
    level: float = LEVEL,
) -> Interval | None:
    """The cell's difference from the reference, paired by seed (the seeds both have) and, where both
    have per-image values of the same length for every such seed, by image; None when no interval
    can be made (no common seed, or one seed with neither per-image values nor standard errors).

    Args:
      cell, reference: seed -> the metric's value (per seed, e.g. the mean bound over test images).
      cell_images, reference_images: seed -> [M] per-image values (optional).
      cell_se, reference_se: seed -> the value's standard error over images (the one-seed,
        unpaired fallback).
    """
    seeds = sorted(set(cell) & set(reference))
    if not seeds:
        return None
    per_image = None
    if cell_images is not None and reference_images is not None:
        pairs = [(cell_images.get(s), reference_images.get(s)) for s in seeds]
        if all(c is not None and r is not None and np.shape(c) == np.shape(r) for c, r in pairs):
            per_image = np.stack([np.asarray(c, np.float64) - np.asarray(r, np.float64) for c, r in pairs])
            if per_image.ndim != 2 or per_image.shape[1] < 2:
                per_image = None
    if per_image is not None:
        return crossed_interval(per_image, level) if len(seeds) > 1 else image_interval(per_image[0], level)
    if len(seeds) > 1:
        return seed_interval([cell[s] - reference[s] for s in seeds], level)
    s = seeds[0]
    if cell_se and reference_se and cell_se.get(s) is not None and reference_se.get(s) is not None:
        return unpaired_interval(cell[s], cell_se[s], reference[s], reference_se[s], level)
    return None

"""The paired intervals of ddpm_jax.evaluation.paired on synthetic grids with known effects and noise
(NumPy only, a few seconds): coverage at the stated 95% within Monte Carlo error, the fallbacks, and
the verdict on clear cases."""

import math

import numpy as np
import pytest

from ddpm_jax.evaluation import paired

REPS = 2000
# Coverage of a 95% interval over REPS independent repetitions: 0.95 +- 3 Monte Carlo standard errors.
TOLERANCE = 3 * math.sqrt(0.95 * 0.05 / REPS)
M = 297  # the digits' test images


def synthetic_grid(rng, *, effects, seeds, images=M, seed_sd, image_sd, draw_sd, shared=0.9):
    """values [cells, seeds, images] of a grid whose cell c's true mean is effects[c]:

    value[c, s, i] = difficulty_i + effects[c] + A[c, s] + B[c, i] + E[c, s, i]

    difficulty_i (sd 1) is the image's, the same in every cell and seed (pairing by image cancels it);
    A the seed noise (sd seed_sd per cell); B how the cell's own error on image i departs
    (sd image_sd); E the draws of t and eps (sd draw_sd), a fraction `shared` of whose variance is
    common to the cells of a seed (common random numbers). The test set is drawn anew per call.
    """
    cells = len(effects)
    difficulty = rng.normal(size=(1, 1, images))
    a = seed_sd * rng.normal(size=(cells, seeds, 1))
    b = image_sd * rng.normal(size=(cells, 1, images))
    common = rng.normal(size=(1, seeds, images))
    e = draw_sd * (math.sqrt(shared) * common + math.sqrt(1 - shared) * rng.normal(size=(cells, seeds, images)))
    return difficulty + np.asarray(effects, float)[:, None, None] + a + b + e


REGIMES = {  # seed noise / image noise / draw noise of one cell; the difference's variance doubles them
    "seed noise dominates (short runs)": dict(seed_sd=0.1, image_sd=0.05, draw_sd=0.3),
    "image noise dominates": dict(seed_sd=0.002, image_sd=0.4, draw_sd=0.2),
    "seed and image noise alike": dict(seed_sd=0.02, image_sd=0.2, draw_sd=0.3),
}
EFFECTS = (0.0, -0.05, 0.02)  # cell 0 is the reference


def _coverage(intervals, truth):
    lo = np.array([iv.lo for iv in intervals])
    hi = np.array([iv.hi for iv in intervals])
    return np.mean((lo <= truth) & (truth <= hi))


@pytest.mark.parametrize("regime", list(REGIMES))
def test_crossed_interval_covers_the_true_difference_at_95_percent(regime):
    rng = np.random.default_rng(list(REGIMES).index(regime))
    seeds = 3
    by_cell = {1: [], 2: []}
    variance = {1: [], 2: []}
    for _ in range(REPS):
        v = synthetic_grid(rng, effects=EFFECTS, seeds=seeds, **REGIMES[regime])
        for c in by_cell:
            iv = paired.crossed_interval(v[c] - v[0])
            assert iv.method == paired.SEEDS_X_IMAGES and iv.n_seeds == seeds and iv.n_images == M
            by_cell[c].append(iv)
            variance[c].append(iv.se**2)
    noise = REGIMES[regime]
    d = 2 * noise["draw_sd"] ** 2 * (1 - 0.9)  # the draws' variance left after common random numbers
    true_var = 2 * noise["seed_sd"] ** 2 / seeds + 2 * noise["image_sd"] ** 2 / M + d / (seeds * M)
    for c, intervals in by_cell.items():
        truth = EFFECTS[c] - EFFECTS[0]
        coverage = _coverage(intervals, truth)
        assert abs(coverage - 0.95) <= TOLERANCE, (regime, c, coverage)
        # The variance estimate is unbiased: its mean over the repetitions is the true Var(d..).
        assert np.mean(variance[c]) == pytest.approx(true_var, rel=0.1), (regime, np.mean(variance[c]), true_var)


def test_seed_interval_covers_per_seed_metrics():
    """Per-seed values only (the Frechet distance): the t interval over seeds, N - 1 df."""
    rng = np.random.default_rng(7)
    for seeds in (2, 3, 5):
        truth = 0.7
        d = truth + 0.4 * rng.normal(size=(REPS, seeds))  # seed noise of the difference, sample noise included
        intervals = [paired.seed_interval(row) for row in d]
        assert intervals[0].method == paired.SEEDS and intervals[0].df == seeds - 1
        assert abs(_coverage(intervals, truth) - 0.95) <= TOLERANCE, seeds


def test_one_seed_interval_covers_without_seed_noise_and_says_it_ignores_it():
    rng = np.random.default_rng(11)
    no_seed_noise = dict(seed_sd=0.0, image_sd=0.2, draw_sd=0.3)
    intervals = [
        paired.image_interval(
            np.diff(synthetic_grid(rng, effects=(0.0, 0.03), seeds=1, **no_seed_noise)[:, 0], axis=0)[0]
        )
        for _ in range(REPS)
    ]
    assert abs(_coverage(intervals, 0.03) - 0.95) <= TOLERANCE
    assert "ignores seed noise" in intervals[0].method
    # With the seed noise of a short run, the one-seed interval is far too narrow: why seeds are needed.
    noisy = dict(seed_sd=0.1, image_sd=0.05, draw_sd=0.3)
    intervals = [
        paired.image_interval(np.diff(synthetic_grid(rng, effects=(0.0, 0.03), seeds=1, **noisy)[:, 0], axis=0)[0])
        for _ in range(REPS)
    ]
    assert _coverage(intervals, 0.03) < 0.6


def test_pairing_narrows_the_interval():
    """Pairing by image and common draws cancel the images' difficulty and most of the t noise:
    the paired interval is several times narrower than the unpaired (Welch) one on the same values."""
    rng = np.random.default_rng(3)
    v = synthetic_grid(rng, effects=(0.0, 0.1), seeds=1, seed_sd=0.0, image_sd=0.1, draw_sd=0.3)[:, 0]
    paired_iv = paired.image_interval(v[1] - v[0])
    unpaired_iv = paired.unpaired_image_interval(v[1], v[0])
    assert paired_iv.diff == pytest.approx(unpaired_iv.diff)
    assert (unpaired_iv.hi - unpaired_iv.lo) > 4 * (paired_iv.hi - paired_iv.lo)


def test_paired_difference_chooses_the_method_from_what_is_there():
    rng = np.random.default_rng(5)
    v = synthetic_grid(rng, effects=(0.0, 0.5), seeds=3, seed_sd=0.05, image_sd=0.1, draw_sd=0.1)
    means = {c: {s: float(v[c, s].mean()) for s in range(3)} for c in range(2)}
    images = {c: {s: v[c, s] for s in range(3)} for c in range(2)}
    both = paired.paired_difference(means[1], means[0], cell_images=images[1], reference_images=images[0])
    assert both.method == paired.SEEDS_X_IMAGES and both.n_seeds == 3
    assert both.diff == pytest.approx(np.mean(v[1] - v[0]))
    assert paired.paired_difference(means[1], means[0]).method == paired.SEEDS
    # Only the seeds both cells have are paired; one of them left: the per-image interval.
    one = paired.paired_difference(
        {0: means[1][0]}, means[0], cell_images={0: images[1][0]}, reference_images=images[0]
    )
    assert one.method == paired.IMAGES_ONE_SEED and one.n_seeds == 1
    # Per-image values of another length (another test set) are not paired by image.
    short = {s: a[:10] for s, a in images[0].items()}
    assert (
        paired.paired_difference(means[1], means[0], cell_images=images[1], reference_images=short).method
        == paired.SEEDS
    )
    unpaired = paired.paired_difference({0: 1.0}, {0: 0.5}, cell_se={0: 0.1}, reference_se={0: 0.1})
    assert unpaired.method == paired.UNPAIRED_ONE_SEED and unpaired.se == pytest.approx(math.sqrt(0.02))
    assert paired.paired_difference({0: 1.0}, {0: 0.5}) is None
    assert paired.paired_difference({1: 1.0}, {0: 0.5}) is None


def test_verdicts_on_clear_cases():
    rng = np.random.default_rng(9)
    v = synthetic_grid(rng, effects=(0.0, -1.0, 1.0, 0.0), seeds=3, seed_sd=0.02, image_sd=0.05, draw_sd=0.05)
    verdicts = [paired.verdict(paired.crossed_interval(v[c] - v[0])) for c in (1, 2)]
    assert verdicts == ["better", "worse"]  # lower is better (bits/dim, fd)
    higher = [paired.verdict(paired.crossed_interval(v[c] - v[0]), lower_is_better=False) for c in (1, 2)]
    assert higher == ["worse", "better"]  # the classifier score
    # No true difference: within noise in about 95% of grids.
    same = [
        paired.verdict(
            paired.crossed_interval(
                np.diff(
                    synthetic_grid(rng, effects=(0.0, 0.0), seeds=3, seed_sd=0.1, image_sd=0.1, draw_sd=0.1)[:, :, :],
                    axis=0,
                )[0]
            )
        )
        for _ in range(400)
    ]
    assert same.count("within noise") >= 0.9 * len(same)
    assert paired.verdict(paired.seed_interval([0.0, 0.0, 0.0])) == "within noise"
    assert paired.verdict(None) == ""
    assert paired.mean_se([1.0]) == (1.0, None)
    assert paired.mean_se([1.0, 3.0]) == pytest.approx((2.0, 1.0))

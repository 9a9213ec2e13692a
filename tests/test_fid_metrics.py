"""FID, Inception Score and KID (ddpm_jax.evaluation.fid_metrics) against torch-fidelity 0.4.0's own
functions on the same features (tests/helpers/torch_fidelity_metrics.py imports them without
torchvision), against closed forms, and the streaming accumulators against the one-shot numbers."""

import numpy as np
import pytest
import torch

from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import fid_metrics as fm

from helpers.torch_fidelity_metrics import metric_modules

RTOL = 1e-6
METRIC_FID, METRIC_ISC, METRIC_KID = metric_modules()


def _features(seed, n, d, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated, non-isotropic features
    return np.abs(rng.normal(size=(n, d)) @ mix * scale + shift)  # >= 0, like post-ReLU pool features


def _torch_stats(x):
    return METRIC_FID.fid_features_to_statistics(torch.from_numpy(x))


@pytest.mark.parametrize("n", [400, 40], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_is_torch_fidelitys(n):
    s1, s2 = _torch_stats(_features(0, n, 64)), _torch_stats(_features(1, n + 7, 64, 1.2, 0.1))
    want = METRIC_FID.fid_statistics_to_metric(s1, s2, verbose=False)[METRIC_FID.KEY_METRIC_FID]
    got = fm.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
    assert got == pytest.approx(want, rel=RTOL)
    assert got > 0


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(2)
    mu, sigma = _torch_stats(_features(3, 200, 16)).values()
    assert abs(fm.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    # Diagonal Gaussians: ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ConfigError, match=r"means \[D\] and covariances \[D, D\]"):
        fm.frechet_distance(mu1, np.diag(a), mu2[:8], np.diag(b))


@pytest.mark.parametrize("n, splits, shuffle", [(103, 10, True), (103, 7, False), (50, 1, True)])
def test_inception_score_is_torch_fidelitys(n, splits, shuffle):
    logits = np.random.default_rng(4).normal(size=(n, 30)) * 3.0
    want = METRIC_ISC.isc_features_to_metric(torch.from_numpy(logits), splits, shuffle)
    got = fm.inception_score(logits, splits, shuffle)
    assert got[0] == pytest.approx(want[METRIC_ISC.KEY_METRIC_ISC_MEAN], rel=RTOL)
    assert got[1] == pytest.approx(want[METRIC_ISC.KEY_METRIC_ISC_STD], rel=RTOL, abs=1e-12)


def test_inception_score_closed_forms():
    assert fm.inception_score(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)  # uniform p(y|x)
    # Confident predictions, every class equally often in each split: IS = the number of classes.
    classes = 8
    logits = 50.0 * np.eye(classes)[np.arange(80) % classes]
    mean, std = fm.inception_score(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(classes, rel=1e-6) and std < 1e-6
    with pytest.raises(ConfigError, match="splits"):
        fm.inception_score(logits[:5], splits=10)


def test_inception_score_streamed_in_batches_equals_one_shot():
    logits = np.random.default_rng(5).normal(size=(97, 20)) * 2.0
    acc = fm.InceptionScoreAccumulator(97, splits=10)
    for chunk in np.array_split(logits, [0, 13, 13, 50, 96]):  # uneven, with empty batches
        acc.update(chunk)
    assert acc.result() == pytest.approx(fm.inception_score(logits, splits=10), rel=1e-12)
    with pytest.raises(ConfigError, match="add up"):
        acc.update(logits[:1])


def test_kernel_inception_distance_is_torch_fidelitys():
    f1, f2 = _features(6, 120, 32), _features(7, 90, 32, 1.1, 0.05)
    kwargs = dict(kid_subsets=6, kid_subset_size=50, verbose=False, rng_seed=123)
    want = METRIC_KID.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), **kwargs)
    got = fm.kernel_inception_distance(f1, f2, subsets=6, subset_size=50, seed=123)  # the same subsets
    assert got[0] == pytest.approx(want[METRIC_KID.KEY_METRIC_KID_MEAN], rel=RTOL)
    assert got[1] == pytest.approx(want[METRIC_KID.KEY_METRIC_KID_STD], rel=RTOL)
    # The kernel and the estimator alone, with their non-default settings.
    k = lambda x, y: fm.polynomial_kernel(x, y, degree=2, gamma=0.3, coef0=0.5)
    ref_k = lambda x, y: METRIC_KID.kernel_poly(
        x, y, kid_kernel_poly_degree=2, kid_kernel_poly_gamma=0.3, kid_kernel_poly_coef0=0.5
    )
    x, y = f1[:40], f2[:40]
    np.testing.assert_allclose(k(x, y), ref_k(x, y), rtol=1e-12)
    want = METRIC_KID.mmd2(ref_k(x, x), ref_k(x, y), ref_k(y, y))
    assert fm.mmd2_unbiased(k(x, x), k(x, y), k(y, y)) == pytest.approx(want, rel=1e-10)


def test_kernel_inception_distance_of_one_distribution_is_zero_within_noise():
    # Identical sets: the unbiased estimate is 2 (S_off / (m (m - 1)) - S / m^2), S the kernel sum and
    # S_off its off-diagonal part: a small positive number, not exactly 0.
    x = _features(8, 60, 16)
    kxx = fm.polynomial_kernel(x, x)
    s, s_off, m = kxx.sum(), kxx.sum() - np.trace(kxx), len(x)
    assert fm.mmd2_unbiased(kxx, kxx, kxx) == pytest.approx(2 * (s_off / (m * (m - 1)) - s / m**2), rel=1e-10)
    # Independent samples of one distribution: the mean over subsets is 0 within its spread, while a
    # shifted distribution is far outside it.
    a, b = np.split(_features(9, 1600, 16), 2)
    same = fm.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted = fm.kernel_inception_distance(a, b + 0.3, subsets=20, subset_size=200)
    assert abs(same[0]) < 3 * same[1]
    assert shifted[0] > 10 * same[1]
    with pytest.raises(ConfigError, match="subset_size=100 must be between 2 and"):
        fm.kernel_inception_distance(x, x, subset_size=50 * 2)


def test_running_moments_equal_np_cov_of_all_features():
    x = _features(11, 257, 24, shift=1e3)  # a large mean: a one-pass sum of squares would lose digits
    acc = fm.RunningMoments(24)
    for chunk in np.array_split(x, [0, 1, 100, 100, 180]):
        acc.update(chunk)
    mu, sigma = acc.statistics()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    # Two accumulators merged (another device's or process's share) give the same.
    a, b = fm.RunningMoments(24), fm.RunningMoments(24)
    a.update(x[:70])
    b.update(x[70:])
    a.merge(b)
    np.testing.assert_allclose(a.covariance(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match=r"\[B, 24\]"):
        acc.update(x[:, :3])


def test_the_public_module_has_designs_names():
    from ddpm_jax import fid

    for name in (
        "load_inception_params",
        "inception_features",
        "frechet_distance",
        "inception_score",
        "kernel_inception_distance",
    ):
        assert callable(getattr(fid, name)), name
    assert fid.frechet_distance is fm.frechet_distance

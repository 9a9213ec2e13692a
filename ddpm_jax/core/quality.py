"""Sample-quality numbers from a feature network: Fréchet distance (FID's formula) and the
classifier score (the Inception Score's formula). Generic: nothing here knows the data set.

  mu_s, sigma_s = feature_stats(sample_features)   # [N, D] features of model samples
  mu_r, sigma_r = feature_stats(real_features)     # [M, D] features of real images
  fd = frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
  score = classifier_score(sample_probs)           # [N, K] class probabilities

With Inception-v3 pool3 features (2048-d) of CIFAR-10 images these are the usual FID and IS;
`ddpm_jax.evaluation.digits_classifier` supplies a small feature network for the 8x8 digits.
Everything is computed in float64 NumPy, on the host.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special

# sqrtm's relative residual ||X X - A||_F / ||A||_F above which the product counts as singular.
_SQRTM_RESIDUAL_TOL = 1e-6
# Largest imaginary part of diag((S1 S2)^{1/2}), relative to its real scale, taken as rounding.
_IMAG_TOL = 1e-3


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
      features: [N, D] array, N >= 2 (one row per image).

    Returns:
      (mu float64 [D], sigma float64 [D, D]); sigma = np.cov(features, rowvar=False)
      (unbiased, N - 1 in the denominator, as pytorch-fid).

    Raises:
      ValueError: not 2-D, fewer than 2 rows, or non-finite values.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs features of shape [N >= 2, D]; got {f.shape}.")
    if not np.isfinite(f).all():
        raise ValueError("feature_stats: the features contain NaN or inf.")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_trace(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr((sigma1 sigma2)^{1/2}), regularised with eps * I where the product is singular."""
    product = sigma1 @ sigma2
    covmean = scipy.linalg.sqrtm(product)
    scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
    if not np.isfinite(covmean).all() or np.linalg.norm(covmean @ covmean - product) / scale > _SQRTM_RESIDUAL_TOL:
        offset = eps * np.eye(sigma1.shape[0])  # pytorch-fid's fix for a singular product
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(
                "frechet_distance: sqrtm(sigma1 @ sigma2) is not finite, even "
                f"with {eps} * I added to both covariances."
            )
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        worst = np.abs(diag.imag).max()
        if worst > _IMAG_TOL * max(1.0, np.abs(diag.real).max()):
            raise ValueError(
                "frechet_distance: sqrtm(sigma1 @ sigma2) has imaginary parts up to "
                f"{worst:.3g} on its diagonal; are both sigmas symmetric positive semi-definite?"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

    This is FID when the statistics are those of Inception-v3 pool3 features: someone with
    Inception features of CIFAR-10 samples and real images passes their feature_stats here.
    Computed in float64 with scipy.linalg.sqrtm, handled as pytorch-fid does: where the
    product is singular (sqrtm not finite, or inaccurate) eps * I is added to both sigmas'
    diagonals; tiny imaginary parts that sqrtm leaves from rounding are dropped.

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] covariances (symmetric positive semi-definite).
      eps: diagonal offset used only where sigma1 @ sigma2 is singular.

    Returns:
      The squared distance d^2 as a Python float (>= 0 up to rounding).

    Raises:
      ValueError: mismatched shapes, non-finite statistics, or a square root with
        non-negligible imaginary parts (sigmas not positive semi-definite).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "frechet_distance needs mu1, mu2 of shape [D] and sigma1, sigma2 of shape [D, D]; "
            f"got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}."
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: the statistics contain NaN or inf.")
    diff = mu1 - mu2
    tr_covmean = _sqrtm_trace(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(features1, features2, eps: float = 1e-6) -> float:
    """frechet_distance between the feature_stats of two [N, D] / [M, D] feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2), eps=eps)


def classifier_score(probs) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x): the Inception Score formula, float64.

    1 when every row is the same distribution; K when the predictions are confident
    (one-hot) and spread evenly over K classes. With Inception-v3's softmax outputs on
    model samples this is the Inception Score (without the usual 10-split averaging).

    Args:
      probs: [N, K] class probabilities, rows non-negative and summing to 1.

    Returns:
      The score, a Python float in [1, K].

    Raises:
      ValueError: not [N >= 1, K], negative or non-finite entries, or rows not summing to 1.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"classifier_score needs probs of shape [N >= 1, K]; got {p.shape}.")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("classifier_score: probs must be finite and non-negative.")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("classifier_score: each row of probs must sum to 1 (softmax outputs).")
    p_y = p.mean(axis=0, keepdims=True)  # [1, K]; p_y > 0 wherever some p > 0
    kl = (scipy.special.xlogy(p, p) - scipy.special.xlogy(p, p_y)).sum(axis=1)  # [N]
    return float(np.exp(kl.mean()))

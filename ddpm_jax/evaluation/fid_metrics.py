"""FID, Inception Score and KID as pure functions of Inception features, with torch-fidelity 0.4.0's
definitions (metric_fid.py, metric_isc.py, metric_kid.py; tests/test_fid_metrics.py compares them),
and the streaming accumulators that let 50,000 samples be scored without holding their features.

Everything is computed in float64 (torch-fidelity computes KID in the features' own dtype, float32
in its pipeline; the definitions are the same, the rounding smaller here).

References:
  Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
    equilibrium" (FID); Salimans et al. 2016, "Improved techniques for training GANs" (IS);
    Binkowski et al. 2018, "Demystifying MMD GANs" (KID).
"""

from __future__ import annotations

import numpy as np

from ddpm_jax.errors import ConfigError

IS_SEED = 2020  # torch-fidelity's default rng_seed: the IS shuffle and the KID subsets
KID_SUBSETS = 100  # torch-fidelity's kid_subsets
KID_SUBSET_SIZE = 1000  # torch-fidelity's kid_subset_size


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"{name}: expected features [N, D] with N >= 1, got shape {x.shape}.")
    return x


# ----------------------------------------------------------------------------- FID


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), torch-fidelity's way.

    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), where the trace of the
    square root is the sum of the square roots of the eigenvalues of sigma1 @ sigma2, taken as
    complex numbers (tiny negative eigenvalues from rounding add only imaginary parts), real part
    kept (torch-fidelity's fid_statistics_to_metric, from TTUR's fid.py). No eps is added.

    Args:
      mu1, mu2: means [D]. sigma1, sigma2: covariances [D, D] (FID: D = 2048 pool features).

    Returns:
      The distance, a Python float (FID when the statistics are Inception pool features').
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, x, want in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if d < 1 or x.shape != want:
            raise ConfigError(
                f"frechet_distance: mu1 {mu1.shape}, {name} {x.shape}: pass means [D] and covariances [D, D] "
                "of the same D (e.g. fid_reference's 'mu' and 'sigma')."
            )
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class RunningMoments:
    """The mean and covariance of features seen batch by batch, in float64, without holding them.

    Each batch's mean and centred scatter are merged into the running ones (Chan, Golub & LeVeque
    1979's pairwise update: M = M_a + M_b + d d^T n_a n_b / n, d = mean_b - mean_a), which keeps the
    precision of a two-pass computation. `covariance()` equals np.cov(all features, rowvar=False).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features) -> None:
        """Adds a batch of features [B, D] (B may be 0)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ConfigError(f"RunningMoments: expected features [B, {self.mean.shape[0]}], got shape {x.shape}.")
        if len(x):
            mean = x.mean(axis=0)
            centred = x - mean
            self._merge(len(x), mean, centred.T @ centred)

    def merge(self, other: RunningMoments) -> None:
        """Adds the features another accumulator has seen (another process's or device's share)."""
        if other.count:
            self._merge(other.count, other.mean, other.scatter)

    def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def covariance(self) -> np.ndarray:
        """The unbiased covariance [D, D] (np.cov's, divided by N - 1)."""
        if self.count < 2:
            raise ConfigError(f"RunningMoments: a covariance needs at least 2 samples, got {self.count}.")
        return self.scatter / (self.count - 1)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]): the statistics frechet_distance takes."""
        return self.mean.copy(), self.covariance()


# ----------------------------------------------------------------------------- Inception Score


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class InceptionScoreAccumulator:
    """The Inception Score of `num` samples whose logits come batch by batch, in order.

    torch-fidelity's split handling: the samples are shuffled (np.random.RandomState(seed).permutation,
    when shuffle) and cut into `splits` consecutive chunks [i N / splits, (i + 1) N / splits); chunk i
    scores exp(mean_x KL(p(y|x) || p_i(y))), p_i the chunk's mean p(y|x). Knowing N up front, each
    sample's chunk is known when it arrives, so only per-chunk sums are kept: sum_x p(y|x) [C] and
    sum_x sum_y p log p, since mean_x KL = (sum p log p - sum_y (sum_x p) log p_i) / n_i.
    """

    def __init__(self, num: int, splits: int = 10, shuffle: bool = True, seed: int = IS_SEED):
        if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1 or num < splits:
            raise ConfigError(
                f"inception_score: {num} sample(s) cannot be cut into splits={splits!r} chunks; "
                "pass a whole number of splits between 1 and the number of samples (torch-fidelity uses 10)."
            )
        order = np.random.RandomState(seed).permutation(num) if shuffle else np.arange(num)
        bounds = np.array([i * num // splits for i in range(splits + 1)])
        self.chunk = np.empty(num, np.int64)  # chunk of sample j
        self.chunk[order] = np.searchsorted(bounds, np.arange(num), side="right") - 1
        self.counts = np.diff(bounds)
        self.num, self.splits, self.seen = num, splits, 0
        self.sum_p = None  # [splits, C]
        self.sum_plogp = np.zeros(splits, np.float64)

    def update(self, logits) -> None:
        """Adds the next batch of logits [B, C] (samples seen, seen + 1, ...)."""
        logits = np.asarray(logits, np.float64)
        if logits.ndim != 2 or self.seen + len(logits) > self.num:
            raise ConfigError(
                f"inception_score: got logits of shape {logits.shape} after {self.seen} of {self.num} samples; "
                "pass [B, C] batches that add up to the number of samples."
            )
        if self.sum_p is None:
            self.sum_p = np.zeros((self.splits, logits.shape[1]), np.float64)
        log_p = _log_softmax(logits)
        p = np.exp(log_p)
        chunk = self.chunk[self.seen : self.seen + len(logits)]
        np.add.at(self.sum_p, chunk, p)
        np.add.at(self.sum_plogp, chunk, (p * log_p).sum(axis=1))
        self.seen += len(logits)

    def result(self) -> tuple[float, float]:
        """(mean, std) of the per-chunk scores (np.std: the population std, as torch-fidelity)."""
        if self.seen != self.num:
            raise ConfigError(f"inception_score: {self.seen} of the {self.num} samples' logits were given.")
        n = self.counts[:, None].astype(np.float64)
        log_q = np.log(self.sum_p / n)
        kl_mean = (self.sum_plogp - (self.sum_p * log_q).sum(axis=1)) / self.counts
        scores = np.exp(kl_mean)
        return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits, splits: int = 10, shuffle: bool = True, seed: int = IS_SEED) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` chunks), torch-fidelity's isc_features_to_metric.

    Args:
      logits: [N, C] class logits of the samples. torch-fidelity scores the "logits_unbiased" layer:
        the pool features times the fc weights, without the fc bias.
      splits: chunks the samples are cut into. shuffle, seed: torch-fidelity's samples_shuffle
        (default True) and rng_seed (2020).
    """
    logits = _features(logits, "inception_score")
    acc = InceptionScoreAccumulator(len(logits), splits, shuffle, seed)
    acc.update(logits)
    return acc.result()


# ----------------------------------------------------------------------------- KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """k(x, y) = (gamma x.y + coef0)^degree, gamma = 1 / D by default: [N, M]."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """The unbiased MMD^2 estimate from kernel matrices of two samples of m each (torch-fidelity's
    mmd2 with mmd_est="unbiased", from Binkowski et al.'s code): the within-sample means without the
    diagonal, minus twice the mean of k_xy with its diagonal."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1,
    features2,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int | np.random.RandomState = IS_SEED,
) -> tuple[float, float]:
    """KID (mean, std over `subsets` subsets), torch-fidelity's kid_features_to_metric.

    Each subset draws subset_size rows of features1, then of features2, without replacement
    (rng.choice, rng = np.random.RandomState(seed)), and scores the unbiased MMD^2 of the polynomial
    kernel; with the same seed the subsets are torch-fidelity's.

    Args:
      features1, features2: [N1, D], [N2, D] pool features (N1, N2 >= subset_size).
      subsets, subset_size, degree, gamma, coef0: torch-fidelity's kid_* defaults.
      seed: an int (torch-fidelity's rng_seed) or a np.random.RandomState to draw from.
    """
    f1, f2 = _features(features1, "kernel_inception_distance"), _features(features2, "kernel_inception_distance")
    if f1.shape[1] != f2.shape[1]:
        raise ConfigError(f"kernel_inception_distance: features of dims {f1.shape[1]} and {f2.shape[1]} differ.")
    if not 2 <= subset_size <= min(len(f1), len(f2)):
        raise ConfigError(
            f"kernel_inception_distance: subset_size={subset_size} must be between 2 and the smaller number of "
            f"samples ({len(f1)}, {len(f2)}); pass a smaller subset_size or more samples."
        )
    rng = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
    kernel = lambda x, y: polynomial_kernel(x, y, degree, gamma, coef0)  # noqa: E731
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), subset_size, replace=False)]
        y = f2[rng.choice(len(f2), subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
    return float(np.mean(mmds)), float(np.std(mmds))

"""Reference likelihoods beside every bits/dim: the independent-pixel histogram model."""

from __future__ import annotations

import numpy as np


def pixel_histogram_bpd(train: np.ndarray, test: np.ndarray, alpha: float = 0.5) -> float:
    """Test bits/dim of a model with each pixel (and channel) its own categorical over the values seen
    in the train split, fitted on train with add-alpha smoothing.

    The support is the set of values the train split takes (17 grey levels for the digits), which
    the model is given for free: a 256-way categorical would pay for the 239 empty levels.

    Args:
      train, test: uint8 [N, H, W, C] images.
      alpha: pseudo-count per support value (0.5: Krichevsky-Trofimov).

    Returns:
      mean over test images of -log2 p(x) / (H * W * C).
    """
    train = np.asarray(train).reshape(len(train), -1).astype(np.int64)
    test = np.asarray(test).reshape(len(test), -1).astype(np.int64)
    support = np.unique(train)
    unseen = np.setdiff1d(np.unique(test), support)
    if unseen.size:
        raise ValueError(f"the test split has values {unseen[:5].tolist()} that the train split never takes.")
    idx_train, idx_test = np.searchsorted(support, train), np.searchsorted(support, test)
    counts = np.zeros((train.shape[1], support.size))
    np.add.at(counts, (np.broadcast_to(np.arange(train.shape[1]), train.shape), idx_train), 1.0)
    log_probs = np.log2(counts + alpha) - np.log2(len(train) + alpha * support.size)
    nll = -log_probs[np.arange(test.shape[1])[None, :], idx_test]
    return float(nll.mean())

"""A small digits classifier as the feature network for sample quality on the 8x8 digits.

Inception-v3 does not fit 8x8 images, so this module trains its own small MLP once,
deterministically (fixed key and data order), on the digits train split (1,500 images, about
98% test accuracy; about a second on a CPU) and caches its params on disk.

  report = digits_sample_quality(samples)  # samples: float [N, 8, 8, 1] in [-1, 1]
  report["fd"], report["fd_floor"], report["classifier_score"], report["classifier_score_test"]

`fd` is the Fréchet distance (ddpm_jax.core.quality, the FID formula) between the samples' features
and the test split's; it is biased upwards at small N, so compare it with `fd_floor`, the value
real train images reach at the same N. The numbers are only comparable between runs that use
the same classifier (same seed, same `_CACHE_VERSION`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import fileio
from ddpm_jax.core import quality
from ddpm_jax.core.pixels import scale_images
from ddpm_jax.data.digits_builder import digits_split_indices, digits_uint8

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64
CACHE_ENV = "DDPM_JAX_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ddpm_jax")
_CACHE_VERSION = 1  # bump when the model or its training changes: old cache files are ignored
_TRAIN_STEPS = 600
_BATCH_SIZE = 128
_LEARNING_RATE = 1e-3
_EVAL_BATCH = 256  # fixed apply batch (the last one padded): one compile for any N

_MEMORY_CACHE: dict[tuple[str, int], Classifier] = {}


class DigitsMLP(nn.Module):
    """8x8x1 in [-1, 1] -> (features [B, 64], logits [B, 10]); 64 -> 512 -> 64 -> 10.

    The features are the penultimate Dense layer before its ReLU: linear, so no dead units
    make their covariance singular. An MLP rather than a CNN: XLA's CPU convolutions made
    training several times slower for no gain in test accuracy on 8x8 images.
    """

    hidden: int = 512

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        features = nn.Dense(FEATURE_DIM)(x)
        logits = nn.Dense(NUM_CLASSES)(nn.relu(features))
        return features, logits


class Classifier(NamedTuple):
    """A trained DigitsMLP: apply_fn(params, images [B, 8, 8, 1]) -> (features, logits)."""

    apply_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    params: Any


_MODEL = DigitsMLP()


@jax.jit
def _apply(params, images):
    return _MODEL.apply({"params": params}, images)


# ----------------------------------------------------------------------------- data


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits split as load_images("digits", split) stores it, scaled, with its labels.

    Read from scikit-learn through digits_builder (the same images and order as the tfds
    dataset, without tf.data).

    Args:
      split: "train" (1,500 images) or "test" (297).

    Returns:
      (images float32 [N, 8, 8, 1] in [-1, 1], labels int64 [N]).
    """
    indices = digits_split_indices()
    if split not in indices:
        raise ValueError(f"Unknown digits split {split!r}; expected one of {list(indices)}.")
    images, labels = digits_uint8()
    idx = indices[split]
    return scale_images(images[idx]), labels[idx]


# ----------------------------------------------------------------------------- training


def _init_params(seed: int):
    dummy = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
    return _MODEL.init(jax.random.PRNGKey(seed), dummy)["params"]


def _batch_indices(seed: int, num_examples: int) -> np.ndarray:
    """int32 [_TRAIN_STEPS, _BATCH_SIZE]: epoch-wise permutations from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    needed = _TRAIN_STEPS * _BATCH_SIZE
    epochs = -(-needed // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[:needed].reshape(_TRAIN_STEPS, _BATCH_SIZE).astype(np.int32)


@jax.jit
def _fit(params, images, labels, batch_indices):
    """Adam over the given minibatch order, all steps in one lax.scan."""
    tx = optax.adam(_LEARNING_RATE)

    def loss_fn(p, x, y):
        _, logits = _MODEL.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, idx):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, images[idx], labels[idx])
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), batch_indices)
    return params, losses


def _train(seed: int):
    """Trains the classifier from scratch; the same seed gives bitwise the same params."""
    start = time.perf_counter()
    images, labels = digits_split("train")
    params, losses = _fit(
        _init_params(seed), jnp.asarray(images), jnp.asarray(labels), jnp.asarray(_batch_indices(seed, len(images)))
    )
    params = jax.device_get(params)
    logging.info(
        "Trained the digits classifier (seed %d) in %.1f s; final loss %.4f.",
        seed,
        time.perf_counter() - start,
        float(losses[-1]),
    )
    return params


# ----------------------------------------------------------------------------- caching


def _resolve_cache_dir(cache_dir: str | None) -> str:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    return os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else ""


def cache_path(cache_dir: str, seed: int) -> str:
    """Where load_or_train keeps the params for this seed under cache_dir."""
    return os.path.join(cache_dir, f"digits_classifier_seed{seed}_v{_CACHE_VERSION}.msgpack")


def _read_params(path: str, seed: int):
    """The cached params, or None where the file is missing or does not hold valid params."""
    if not os.path.exists(path):
        return None
    template = _init_params(seed)
    try:
        with open(path, "rb") as f:
            params = flax.serialization.from_bytes(template, f.read())
        same = jax.tree.map(
            lambda a, b: (
                np.shape(a) == np.shape(b) and np.asarray(b).dtype == np.asarray(a).dtype and bool(np.isfinite(b).all())
            ),
            template,
            params,
        )
        if not all(jax.tree.leaves(same)):
            raise ValueError("shapes, dtypes or values differ from the model's")
    except Exception as e:  # msgpack errors, structure mismatch, ...: retrain over it
        logging.warning("Ignoring the damaged classifier cache %s (%s: %s); retraining.", path, type(e).__name__, e)
        return None
    return jax.tree.map(np.asarray, params)


def _write_params(path: str, params) -> None:
    fileio.atomic_write(path, flax.serialization.to_bytes(params))


def load_or_train(cache_dir: str | None = None, seed: int = 0) -> Classifier:
    """The digits classifier for `seed`: from memory, else from the disk cache, else trained.

    Args:
      cache_dir: folder for the params file (`digits_classifier_seed{seed}_v1.msgpack`).
        None: $DDPM_JAX_CACHE if set, else ~/.cache/ddpm_jax. "" : no disk cache.
        A missing or damaged file is (re)written after training; writing is atomic.
      seed: PRNG seed of the initialisation and the data order.

    Returns:
      A Classifier; also kept in an in-process cache keyed by (cache_dir, seed).
    """
    cache_dir = _resolve_cache_dir(cache_dir)
    key = (cache_dir, seed)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = cache_path(cache_dir, seed) if cache_dir else None
    params = _read_params(path, seed) if path else None
    if params is None:
        params = _train(seed)
        if path:
            try:
                _write_params(path, params)
            except OSError as e:  # read-only home, full disk: the classifier still works
                logging.warning("Could not cache the digits classifier at %s: %s", path, e)
    classifier = Classifier(apply_fn=_apply, params=params)
    _MEMORY_CACHE[key] = classifier
    return classifier


# ----------------------------------------------------------------------------- metrics


def features_and_probs(classifier: Classifier, images) -> tuple[np.ndarray, np.ndarray]:
    """Features and softmax probabilities of images, in fixed-size jitted batches.

    Args:
      classifier: from load_or_train.
      images: float [N, 8, 8, 1] in [-1, 1].

    Returns:
      (features float64 [N, 64], probs float64 [N, 10]).
    """
    images = np.asarray(images, np.float32)
    feats, probs = [], []
    for start in range(0, len(images), _EVAL_BATCH):
        chunk = images[start : start + _EVAL_BATCH]
        padded = np.zeros((_EVAL_BATCH, *images.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        f, logits = classifier.apply_fn(classifier.params, padded)
        feats.append(np.asarray(f, np.float64)[: len(chunk)])
        probs.append(np.asarray(jax.nn.softmax(logits.astype(jnp.float32)), np.float64)[: len(chunk)])
    if not feats:
        return np.zeros((0, FEATURE_DIM)), np.zeros((0, NUM_CLASSES))
    probs = np.concatenate(probs)
    return np.concatenate(feats), probs / probs.sum(axis=1, keepdims=True)


def accuracy(classifier: Classifier, split: str = "test") -> float:
    """The classifier's accuracy on a digits split."""
    images, labels = digits_split(split)
    _, probs = features_and_probs(classifier, images)
    return float((probs.argmax(axis=1) == labels).mean())


def _check_samples(samples) -> np.ndarray:
    x = np.asarray(samples)
    expected = "expected model samples of shape [N, 8, 8, 1] (N >= 2) with values in [-1, 1]"
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or x.shape[0] < 2:
        raise ValueError(f"digits_sample_quality: {expected}; got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"digits_sample_quality: {expected}; got dtype {x.dtype} (uint8 pixels? "
            "map them with ddpm_jax.data.pipeline.scale_images)."
        )
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"digits_sample_quality: {expected}; got NaN or inf.")
    if np.abs(x).max() > 2.0:
        raise ValueError(
            f"digits_sample_quality: {expected}; got values in [{x.min():.3g}, {x.max():.3g}] (0..255 pixels?)."
        )
    return np.clip(x, -1.0, 1.0)  # samplers' slight overshoot, as unscale_images clips


def digits_sample_quality(samples, *, classifier: Classifier | None = None, seed: int = 0) -> dict[str, float | int]:
    """Fréchet distance and classifier score of digit samples, with real-data references.

    Args:
      samples: float [N, 8, 8, 1] in [-1, 1], N >= 2 (values up to 2 in magnitude are
        clipped to [-1, 1]; beyond that a ValueError).
      classifier: the feature network; default load_or_train() (seed 0, disk cache).
      seed: draws the train subset of fd_floor (np.random.default_rng(seed)).

    Returns:
      {"fd": Fréchet distance of the samples' features to the test split's (297 images),
       "fd_floor": the same for min(N, 1500) random train images: what a perfect model gets
         at this N (the distance is biased upwards at small N, so compare fd with this),
       "classifier_score": exp E KL(p(y|x) || p(y)) of the samples (at most 10),
       "classifier_score_test": the same for the test split (the real data's value),
       "num_samples": N}.

    Raises:
      ValueError: wrong shape, N < 2, integer dtype, non-finite values or values far
        outside [-1, 1].
    """
    x = _check_samples(samples)
    classifier = classifier if classifier is not None else load_or_train()
    test_images, _ = digits_split("test")
    train_images, _ = digits_split("train")
    n = len(x)
    subset = np.random.default_rng(seed).choice(len(train_images), min(n, len(train_images)), replace=False)
    f_samples, p_samples = features_and_probs(classifier, x)
    f_test, p_test = features_and_probs(classifier, test_images)
    f_train, _ = features_and_probs(classifier, train_images[np.sort(subset)])
    stats_test = quality.feature_stats(f_test)
    return {
        "fd": quality.frechet_distance(*quality.feature_stats(f_samples), *stats_test),
        "fd_floor": quality.frechet_distance(*quality.feature_stats(f_train), *stats_test),
        "classifier_score": quality.classifier_score(p_samples),
        "classifier_score_test": quality.classifier_score(p_test),
        "num_samples": n,
    }

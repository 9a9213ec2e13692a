"""A config's splits: this process's shard of the train, validation or test split, checked against the config.

What the loop, the evaluate and ablate commands and the tests read their images with. Importing it is
cheap (training.validation checks the fields with it); the functions that read a split import the input
pipeline and tfds.

The validation split (config.data.validation_split) is what every choice is made on: the curves during
training, the best checkpoint (training.keep_best), the ablation runner's best cell, the sampler. The
test split (config.data.eval_split) is read once, by the final report of the chosen parameters.

  - validation_split="holdout" (the default): a fixed subset of the train split is held out, and the
    training set is the rest. With N the number of images of the whole train split (all processes)
    and n = holdout_count(validation_size, N), the held-out images are the global indices
        np.sort(np.random.RandomState(HOLDOUT_SEED).permutation(N)[:n])
    of the split's stored order (folders: sorted by relative path); the training set is the other
    indices, in stored order. The rule depends on N and validation_size only (not on config.seed, the
    process count or in_memory). A process's shard (tfds.even_splits: a contiguous range of the global
    order, pipeline.shard_offsets) keeps exactly the rule's images of its range, so the processes'
    training sets (and validation sets) together are the global ones.
  - validation_split=<a split name> (e.g. "validation" where the dataset has one): that split, and the
    train split is used whole.

validation_size is a fraction in (0, 1) of N (n = round(fraction * N)), or a count of images (a whole
number >= 1; ml_collections stores 150 as 150.0). Either side must keep at least one image.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from ddpm_jax.errors import ConfigError, DataError

HOLDOUT = "holdout"  # config.data.validation_split: hold a fixed subset of the train split out
HOLDOUT_SEED = 20261206  # the holdout's permutation seed; changing it changes every run's training set


def load_split(
    config: ml_collections.ConfigDict, split: str, *, process_index: int | None = None, process_count: int | None = None
):
    """This process's shard of a split, uint8 [N, H, W, C] fitted to the config's image size (or a
    pipeline.StreamedSplit of that shape with config.data.in_memory=False). The whole split: for the
    training set and the validation set use load_train and load_validation.

    Raises:
      DataError: the dataset is not prepared and cannot be downloaded here, or its images do not
        have the config's shape (the message names the fields to set).
    """
    from ddpm_jax.data import pipeline

    try:
        images = pipeline.load_images(
            config.data.dataset,
            split,
            config.data.data_dir,
            process_index=process_index,
            process_count=process_count,
            image_size=config.data.image_size,
            channels=config.data.channels,
            in_memory=config.data.get("in_memory", True),
        )
    except RuntimeError as e:  # not prepared and cannot be downloaded here
        raise DataError(str(e)) from e
    want = (config.data.image_size, config.data.image_size, config.data.channels)
    if images.shape[1:] != want:
        raise DataError(
            f"dataset {config.data.dataset!r} has images of shape {images.shape[1:]} but the config "
            f"says {want}: set config.data.image_size={images.shape[1]} and "
            f"config.data.channels={images.shape[3]}."
        )
    return images


def check_validation_fields(data: ml_collections.ConfigDict) -> None:
    """ConfigError for a validation_split / validation_size that cannot work, before any data is read."""
    name = data.get("validation_split", HOLDOUT)
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"config.data.validation_split={name!r}: set it to {HOLDOUT!r} (hold part of the train split out) "
            "or to the name of one of the dataset's splits."
        )
    if name in (data.eval_split, data.train_split):
        raise ConfigError(
            f"config.data.validation_split={name!r} is also the "
            f"{'test' if name == data.eval_split else 'train'} split: choices made on it would be biased. Set it "
            f"to {HOLDOUT!r} or to another split of the dataset."
        )
    if name == HOLDOUT:
        holdout_count(data.get("validation_size", 0.1), None)


def holdout_count(validation_size, num_images: int | None) -> int:
    """n, the number of held-out images of a train split of num_images (None: check the type only).

    Raises:
      ConfigError: validation_size is not a fraction in (0, 1) or a whole number >= 1, or leaves no image
        on one side.
    """
    fix = "set config.data.validation_size to a fraction in (0, 1), e.g. 0.1, or a number of images, e.g. 150."
    size = validation_size
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)) or not np.isfinite(size):
        raise ConfigError(f"config.data.validation_size={size!r} is not a number: {fix}")
    if size <= 0 or (size >= 1 and float(size) != int(size)):
        raise ConfigError(f"config.data.validation_size={size!r} is neither in (0, 1) nor a whole number >= 1: {fix}")
    if num_images is None:
        return 0
    n = int(round(float(size) * num_images)) if size < 1 else int(size)
    if not 1 <= n <= num_images - 1:
        raise ConfigError(
            f"config.data.validation_size={size!r} holds out {n} of the train split's {num_images} images, leaving "
            f"{'no validation image' if n < 1 else 'no training image'}: {fix}"
        )
    return n


def holdout_indices(num_images: int, validation_size) -> np.ndarray:
    """int64 [n]: the held-out global indices of a train split of num_images, sorted (the module's rule)."""
    n = holdout_count(validation_size, num_images)
    return np.sort(np.random.RandomState(HOLDOUT_SEED).permutation(num_images)[:n]).astype(np.int64)


def _holdout_sides(config, process_index, process_count):
    """(this process's shard of the train split, its local indices kept for training, those held out)."""
    from ddpm_jax.data import pipeline

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    images = load_split(config, config.data.train_split, process_index=process_index, process_count=process_count)
    offsets = pipeline.shard_offsets(config.data.dataset, config.data.train_split, config.data.data_dir, process_count)
    start, stop = int(offsets[process_index]), int(offsets[process_index + 1])
    if stop - start != len(images):  # the shard read is not the range the rule assumed
        raise DataError(
            f"The shard of {config.data.dataset!r}:{config.data.train_split} has {len(images)} images, but the "
            f"split's metadata says {stop - start} (images {start}..{stop - 1}): prepare the dataset again."
        )
    held = holdout_indices(int(offsets[-1]), config.data.get("validation_size", 0.1))
    held_local = held[(held >= start) & (held < stop)] - start
    kept = np.ones(len(images), bool)
    kept[held_local] = False
    return images, np.flatnonzero(kept), held_local


def _take(images, index: np.ndarray):
    """images at index (int [k]): an array's rows, or a StreamedSplit of those images only."""
    return images.subset(index) if hasattr(images, "subset") else images[index]  # a StreamedSplit, or an array


def load_train(
    config: ml_collections.ConfigDict, *, process_index: int | None = None, process_count: int | None = None
):
    """This process's shard of the training set: the train split less the holdout (validation_split="holdout"),
    else the whole train split. Array or StreamedSplit as load_split.

    Raises:
      ConfigError: a validation_split or validation_size that cannot work (check_validation_fields,
        holdout_count).
      DataError: as load_split.
    """
    check_validation_fields(config.data)
    if config.data.get("validation_split", HOLDOUT) != HOLDOUT:
        return load_split(config, config.data.train_split, process_index=process_index, process_count=process_count)
    images, kept, _ = _holdout_sides(config, process_index, process_count)
    return _take(images, kept)


def load_validation(
    config: ml_collections.ConfigDict, *, process_index: int | None = None, process_count: int | None = None
):
    """This process's shard of the validation set: the holdout of the train split (validation_split="holdout"),
    else the named split. Array or StreamedSplit as load_split.

    Raises:
      ConfigError: as load_train, or a validation_split the dataset does not have (the message lists its splits).
      DataError: as load_split.
    """
    check_validation_fields(config.data)
    name = config.data.get("validation_split", HOLDOUT)
    if name == HOLDOUT:
        images, _, held = _holdout_sides(config, process_index, process_count)
        return _take(images, held)
    try:
        return load_split(config, name, process_index=process_index, process_count=process_count)
    except (ValueError, DataError) as e:
        if "Unknown split" not in str(e):
            raise
        raise ConfigError(
            f"config.data.validation_split={name!r}: {e} Or set it to {HOLDOUT!r} to hold part of the train split out."
        ) from None

"""Input pipeline: tfds datasets in memory, a resumable tf.data training stream, eval batches.

Every dataset goes through tfds: real names (mnist, cifar10, celeb_a) where they are prepared
or can be downloaded, and "digits", scikit-learn's 8x8 digits wrapped as a local tfds builder
(`ddpm_jax.digits_builder`, registered by importing this module), which needs no network.

  images = load_images(config.data.dataset, config.data.train_split, config.data.data_dir)
  for batch in train_batches(images, config.training.batch_size, config.seed, start_step=step):
      ...  # batch: float32 [local_devices, per_device_batch, H, W, C] in [-1, 1]

The training order is a pure function of (seed, step), so a restored run continues with exactly
the batches an uninterrupted run would have seen (see `train_batches`).

TF and GPUs: the entry point (train.py) should call `hide_gpus_from_tf()` (that is
`tf.config.set_visible_devices([], 'GPU')`) before anything else touches TF, so that tf.data
stays on the CPU and leaves the accelerators' memory to JAX.
"""

import logging
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm_jax import pixels
from ddpm_jax.digits_builder import Digits  # registers the tfds name "digits"
from ddpm_jax.errors import DataError
from ddpm_jax.pixels import unscale_images  # noqa: F401 - re-exported beside scale_images

# A few names that work with this pipeline (any tfds image dataset with an "image" feature does).
EXAMPLE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "celeb_a")
# tf.random.experimental.index_shuffle pads its [2] seed with this word in front before calling
# the raw op; we call the raw op with one seed per element and the same padding (same results).
_INDEX_SHUFFLE_SEED_PAD = 498247692


def hide_gpus_from_tf() -> None:
    """Keeps TensorFlow (tf.data, tfds) off the GPUs, leaving their memory to JAX.

    Call it at the start of the entry point, before TF has initialised its devices.
    """
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TF's devices were already initialised
        logging.warning("Could not hide GPUs from TensorFlow: %s", e)


# ----------------------------------------------------------------------------- scaling


def scale_images(images):
    """Maps uint8 pixels 0..255 to float32 in [-1, 1] (x / 127.5 - 1), for NumPy or tf.Tensor input
    (pixels.scale_images is the NumPy one; pixels.unscale_images the inverse)."""
    if isinstance(images, tf.Tensor):
        return tf.cast(images, tf.float32) / 127.5 - 1.0
    return pixels.scale_images(images)


# ----------------------------------------------------------------------------- loading


def _builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {dataset!r}: not a tfds builder name. Known names include "
            f"{', '.join(repr(n) for n in EXAMPLE_DATASETS)}; 'digits' is the offline one "
            "(scikit-learn's 8x8 digits)."
        ) from None


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    """Raises ValueError for a split the dataset lacks (no-op while the splits are unknown)."""
    splits = builder.info.splits
    if not splits:  # not prepared and no metadata: checked again after preparation
        return
    try:
        splits[split]  # also parses "train[:10%]", "train+test", ...
    except (KeyError, ValueError):
        raise ValueError(
            f"Unknown split {split!r} for dataset {builder.name!r}; available splits: "
            f"{list(splits.keys())} (slices like 'train[:90%]' work too). Set "
            "config.data.train_split / config.data.eval_split accordingly."
        ) from None


def _prepare(builder: tfds.core.DatasetBuilder, download: bool) -> None:
    """Makes sure the builder's data is in its data_dir; RuntimeError if it cannot be."""
    if builder.is_prepared():
        return
    if isinstance(builder, Digits):  # reads scikit-learn's copy: no network involved
        try:
            builder.download_and_prepare()
        except FileExistsError:
            # Two runs started together on a fresh data_dir: both generate, the first renames its complete copy
            # into place and the second's rename fails. tfds renames whole folders, so what is there is complete.
            if not builder.is_prepared():
                raise
            builder.info.read_from_directory(builder.data_dir)  # the winner's split metadata
        return
    where = f"data_dir={str(builder.data_path)!r}"
    advice = (
        f"Prepare it on a machine with a network (`tfds build {builder.name} --data_dir=DIR`), "
        "copy DIR here and pass it as data_dir (config.data.data_dir), or use dataset 'digits', "
        "which needs no download."
    )
    if not download:
        raise RuntimeError(f"tfds dataset {builder.name!r} is not prepared in {where} and download=False. {advice}")
    try:
        builder.download_and_prepare()
    except Exception as e:  # network, manual-download and missing-package errors alike
        raise RuntimeError(
            f"tfds dataset {builder.name!r} is not prepared in {where} and cannot be downloaded "
            f"on this machine ({type(e).__name__}: {e}). {advice}"
        ) from e


def check_data_dir(data_dir: str | None) -> None:
    """errors.DataError (a RuntimeError) if data_dir is set but is not a folder; train_and_evaluate
    calls it before it touches the workdir or builds anything."""
    if data_dir and not tf.io.gfile.isdir(data_dir):
        raise DataError(
            f"config.data.data_dir={data_dir!r} does not exist: pass the folder that holds the "
            "prepared tfds datasets (or leave it unset for ~/tensorflow_datasets)."
        )


def load_images(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    download: bool = True,
) -> np.ndarray:
    """Reads this process's shard of a tfds split fully into memory.

    "digits" prepares itself into data_dir on first use. Other datasets are downloaded and
    prepared there if they are missing (download=True); where that fails (no network) the
    error says how to prepare them elsewhere.

    Args:
      dataset: tfds name, e.g. "digits", "mnist", "cifar10", "celeb_a/align".
      split: tfds split string, e.g. "train", "test", "train[:90%]".
      data_dir: tfds data_dir; None for tfds's default (~/tensorflow_datasets).
      process_index: this process's shard; default jax.process_index().
      process_count: number of shards (tfds.even_splits); default jax.process_count().
      download: whether to try downloading a dataset that is not prepared yet.

    Returns:
      uint8 [N, H, W, C]: the split's "image" feature, in the stored order.

    Raises:
      ValueError: unknown dataset name, unknown split, or no "image" feature.
      RuntimeError: the dataset is not prepared and cannot be downloaded here.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    check_data_dir(data_dir)
    builder = _builder(dataset, data_dir)
    _check_split(builder, split)  # cheap, before any download, where the metadata is known
    _prepare(builder, download)
    _check_split(builder, split)
    if "image" not in builder.info.features.keys():
        raise ValueError(f"Dataset {dataset!r} has no 'image' feature: {builder.info.features}")
    if process_count > 1:
        split = tfds.even_splits(split, process_count)[process_index]
    ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    return np.asarray(tfds.as_numpy(ds)["image"], np.uint8)


# ----------------------------------------------------------------------------- batching


def _per_device_batch_size(global_batch_size: int, num_local_devices: int, process_count: int):
    num_devices = num_local_devices * process_count
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"config.training.batch_size={global_batch_size} must be a positive multiple of the "
            f"number of devices, {num_devices} ({process_count} process(es) x {num_local_devices} "
            "local devices): every device gets the same per-device batch."
        )
    return global_batch_size // num_devices


def _epoch_permutation(position, seed, epoch, num_examples: int):
    """index_shuffle(position[i], seed=[seed, epoch[i]], max_index=num_examples - 1) for all i.

    tf.random.experimental.index_shuffle takes one seed per call; its raw op takes one seed
    row per element, so a batch that straddles epochs is one op.
    """
    rows = tf.stack(
        [
            tf.fill(tf.shape(position), tf.constant(_INDEX_SHUFFLE_SEED_PAD, tf.int64)),
            tf.fill(tf.shape(position), seed),
            epoch,
        ],
        axis=1,
    )  # [B, 3]
    return tf.raw_ops.RandomIndexShuffle(
        index=position, seed=rows, max_index=tf.constant(num_examples - 1, tf.int64), rounds=4
    )


def _train_dataset(
    images: np.ndarray, batch_size: int, seed: int, start_step: int, random_flip: bool
) -> tf.data.Dataset:
    """tf.data stream of uint8 [batch_size, H, W, C] batches, element k being step start_step+k."""
    num_examples = len(images)
    images_t = tf.convert_to_tensor(images)  # captured by reference, not embedded in the graph
    seed_t = tf.constant(seed, tf.int64)
    width = images.shape[2]

    def batch_for_step(step):
        g = step * batch_size + tf.range(batch_size, dtype=tf.int64)  # global example numbers
        index = _epoch_permutation(g % num_examples, seed_t, g // num_examples, num_examples)
        batch = tf.gather(images_t, index)  # [B, H, W, C] uint8
        if random_flip:  # left-right, per example; philox keyed by (seed, step): fixed per g
            coin = tf.random.stateless_uniform([batch_size], tf.stack([seed_t, step]), alg="philox")
            cols = tf.range(width)[None]  # [1, W]; a column gather is 3x faster than tf.where
            cols = tf.where((coin < 0.5)[:, None], width - 1 - cols, cols)  # [B, W]
            batch = tf.gather(batch, cols, axis=2, batch_dims=1)
        return batch

    ds = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    return ds.map(batch_for_step, num_parallel_calls=tf.data.AUTOTUNE)


def train_batches(
    images: np.ndarray,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    random_flip: bool = False,
    num_local_devices: int | None = None,
    process_count: int | None = None,
) -> Iterator[np.ndarray]:
    """Endless, deterministic, resumable training batches, shaped for jax.pmap.

    With B = global_batch_size // process_count (this process's batch) and N = len(images)
    (this process's shard), sample j of step s is example number g = s * B + j of the stream:
    epoch e = g // N, position p = g % N, image
    index_shuffle(p, seed=[seed, e], max_index=N - 1) (tf.random.experimental.index_shuffle, a
    stateless permutation per epoch). So every epoch visits each image exactly once, batches
    may straddle epochs, and the stream from start_step=k equals the uninterrupted stream from
    step k. The optional left-right flips are drawn from philox keyed by (seed, s), hence fixed
    per (seed, g) for a given batch size.

    Args:
      images: uint8 [N, H, W, C], e.g. from load_images (this process's shard).
      global_batch_size: batch over all devices of all processes (config.training.batch_size).
      seed: the data seed (config.seed).
      start_step: first step to yield (the restored train step).
      random_flip: flip each image left-right with probability 1/2.
      num_local_devices: default jax.local_device_count().
      process_count: default jax.process_count().

    Returns:
      An iterator of float32 [num_local_devices, per_device_batch, H, W, C] in [-1, 1].

    Raises:
      ValueError: global_batch_size not a multiple of the device count, or no images.
    """
    num_local_devices = num_local_devices or jax.local_device_count()
    process_count = process_count or jax.process_count()
    per_device = _per_device_batch_size(global_batch_size, num_local_devices, process_count)
    if len(images) == 0:
        raise ValueError("train_batches needs at least one image.")
    shape = (num_local_devices, per_device, *images.shape[1:])
    ds = _train_dataset(images, per_device * num_local_devices, seed, start_step, random_flip)
    ds = ds.map(lambda b: tf.reshape(scale_images(b), shape), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return (batch._numpy() for batch in ds)  # zero-copy views of the tf tensors


def eval_batches(
    images: np.ndarray,
    batch_size: int,
    num_local_devices: int | None = None,
    process_count: int | None = None,
    num_batches: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole split once, in order, padded to full batches, shaped like train_batches.

    Args:
      images: uint8 [N, H, W, C] (this process's shard).
      batch_size: global batch over all devices of all processes, as in train_batches.
      num_local_devices: default jax.local_device_count().
      process_count: default jax.process_count().
      num_batches: how many batches to yield; default ceil(N / per-process batch). Fewer
        truncates; more pads with fully masked batches. With several processes pass the same
        number everywhere (shards from even_splits can differ by one image), so that every
        process runs the same number of pmapped steps.

    Returns:
      An iterator of (images float32 [devices, per_device, H, W, C] in [-1, 1],
      mask bool [devices, per_device]: True where the entry is a real image, False padding).

    Raises:
      ValueError: batch_size not a multiple of the device count.
    """
    num_local_devices = num_local_devices or jax.local_device_count()
    process_count = process_count or jax.process_count()
    per_device = _per_device_batch_size(batch_size, num_local_devices, process_count)
    local_batch = per_device * num_local_devices
    if num_batches is None:
        num_batches = math.ceil(len(images) / local_batch)

    def batches():
        for k in range(num_batches):
            chunk = images[k * local_batch : (k + 1) * local_batch]  # [<=b, H, W, C]
            padded = np.zeros((local_batch, *images.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            mask = np.arange(local_batch) < len(chunk)
            yield (
                scale_images(padded).reshape(num_local_devices, per_device, *images.shape[1:]),
                mask.reshape(num_local_devices, per_device),
            )

    return batches()

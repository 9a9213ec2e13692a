"""Input pipeline: tfds datasets and image folders, in memory or streamed; a resumable tf.data training
stream; eval batches.

A dataset is a tfds name (mnist, cifar10, celeb_a, ...: prepared in data_dir or downloadable), "digits"
(scikit-learn's 8x8 digits wrapped as a local tfds builder, `ddpm_jax.data.digits_builder`, registered by
importing this module; it needs no network), or "folder:/path/to/images", a folder of PNG/JPEG files
(`ddpm_jax.data.sources` says how its splits are chosen). Images of another size are centre-cropped and
resized to image_size x image_size (`sources.fit_image`); images of the right size pass unchanged.

  images = load_images(config.data.dataset, config.data.train_split, config.data.data_dir,
                       image_size=config.data.image_size, channels=config.data.channels,
                       in_memory=config.data.in_memory)
  for batch in train_batches(images, config.training.batch_size, config.seed, start_step=step):
      ...  # batch: float32 [local_devices, per_device_batch, H, W, C] in [-1, 1]

In memory (the default), a split is read, fitted and held as uint8 [N, H, W, C] (50,000 CIFAR-10 images:
150 MB). With in_memory=False, load_images returns a `sources.StreamedSplit` that reads each batch's
images from disk by index: tfds datasets prepared as ArrayRecord (`tfds build NAME
--file_format=array_record`) and folders. Either way the training order is a pure function of
(seed, step), the same for both (so streaming gives the same batches as in memory), and a restored run
continues with exactly the batches an uninterrupted run would have seen (see `train_batches`). Each
process reads only its own shard (tfds.even_splits; contiguous runs of a folder's sorted files).
tf.data builds the batches on the host's cores; a background thread keeps READ_AHEAD of them ready, so
the training loop's next() does not wait (bench/input_pipeline.py measures both).

TF and GPUs: the entry point (train.py) should call `hide_gpus_from_tf()` (that is
`tf.config.set_visible_devices([], 'GPU')`) before anything else touches TF, so that tf.data
stays on the CPU and leaves the accelerators' memory to JAX.
"""

import logging
import math
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm_jax.core import pixels
from ddpm_jax.core.pixels import unscale_images  # noqa: F401 - re-exported beside scale_images
from ddpm_jax.data import sources
from ddpm_jax.data.digits_builder import Digits  # registers the tfds name "digits"
from ddpm_jax.data.sources import StreamedSplit
from ddpm_jax.errors import DataError

# A few names that work with this pipeline (any tfds image dataset with a uint8 "image" feature does;
# celeb_a's 218x178 faces are centre-cropped and resized to config.data.image_size), and a folder.
EXAMPLE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "celeb_a", "folder:/path/to/images")
READ_AHEAD = 2  # batches train_batches keeps ready in a background thread (_read_ahead)
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
            f"{', '.join(repr(n) for n in EXAMPLE_DATASETS[:-1])}; 'digits' is the offline one "
            f"(scikit-learn's 8x8 digits). For a folder of PNG/JPEG images use {EXAMPLE_DATASETS[-1]!r}."
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
    image_size: int | None = None,
    channels: int | None = None,
    in_memory: bool = True,
) -> np.ndarray | StreamedSplit:
    """This process's shard of a split: read fully into memory, or (in_memory=False) streamed from disk.

    "digits" prepares itself into data_dir on first use. Other tfds datasets are downloaded and
    prepared there if they are missing (download=True); where that fails (no network) the
    error says how to prepare them elsewhere.

    Args:
      dataset: tfds name, e.g. "digits", "mnist", "cifar10", "celeb_a", or "folder:/path/to/images".
      split: tfds split string, e.g. "train", "test", "train[:90%]"; for a folder "train", "test" or
        a subfolder's name (data_sources).
      data_dir: tfds data_dir; None for tfds's default (~/tensorflow_datasets). Unused for folders.
      process_index: this process's shard; default jax.process_index().
      process_count: number of shards (tfds.even_splits); default jax.process_count().
      download: whether to try downloading a dataset that is not prepared yet.
      image_size: fit every image to image_size x image_size (sources.fit_image; images of that
        size pass unchanged). None keeps the stored size (tfds only, all images of one size).
        Required for folders and streaming.
      channels: 1 or 3. A tfds dataset must store that many (DataError otherwise); a folder's files are
        converted to it. None keeps the stored channels (tfds only).
      in_memory: False returns a StreamedSplit that reads images by index as batches need them (tfds
        datasets prepared as ArrayRecord, and folders).

    Returns:
      uint8 [N, H, W, C] in the stored (folders: sorted) order, or a StreamedSplit of that shape.

    Raises:
      ValueError: unknown dataset name, unknown split, or no "image" feature.
      RuntimeError: the dataset is not prepared and cannot be downloaded here.
      errors.DataError (a RuntimeError): a channel count that does not match the config, a missing or
        empty folder, an unreadable image file (named), a tfds dataset that cannot stream.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    folder = sources.folder_path(dataset)
    if folder is not None:
        if image_size is None or channels is None:
            raise ValueError(f"Dataset {dataset!r}: a folder needs image_size and channels (config.data).")
        files = [
            str(f) for f in np.array_split(sources.folder_split_files(folder, split), process_count)[process_index]
        ]
        if in_memory:
            return sources.read_folder(files, channels, image_size)
        return sources.streamed_folder(files, channels, image_size)
    check_data_dir(data_dir)
    builder = _builder(dataset, data_dir)
    _check_split(builder, split)  # cheap, before any download, where the metadata is known
    _prepare(builder, download)
    _check_split(builder, split)
    feature = builder.info.features["image"] if "image" in builder.info.features.keys() else None
    if not isinstance(feature, tfds.features.Image) or feature.np_dtype != np.uint8:
        raise ValueError(f"Dataset {dataset!r} has no uint8 'image' feature: {builder.info.features}")
    height, width, stored_channels = feature.shape
    if channels is not None and stored_channels not in (None, channels):
        raise DataError(
            f"Dataset {dataset!r} has {stored_channels}-channel images but config.data.channels={channels}: "
            f"set config.data.channels={stored_channels}."
        )
    if process_count > 1:
        split = tfds.even_splits(split, process_count)[process_index]
    if not in_memory or builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:  # by index
        if image_size is None and (height is None or height != width):
            raise ValueError(f"Dataset {dataset!r}: streaming, or reading ArrayRecord, needs image_size.")
        streamed = sources.streamed_tfds(builder, split, channels or stored_channels, image_size or height)
        return streamed if not in_memory else streamed[:]
    if image_size is None or height == width == image_size:  # as stored, in one batch
        ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
        return np.asarray(tfds.as_numpy(ds)["image"], np.uint8)
    # Fitted once, here, so that training reads ready images.
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: sources.fit_image(ex["image"], image_size), num_parallel_calls=tf.data.AUTOTUNE)
    batches = [b.numpy() for b in ds.batch(1024)]
    if not batches:
        return np.zeros((0, image_size, image_size, stored_channels), np.uint8)
    return np.concatenate(batches)


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


def _step_indices(step, batch_size: int, seed, num_examples: int):
    """The image indices of a step's batch: int64 [batch_size] (see train_batches)."""
    g = step * batch_size + tf.range(batch_size, dtype=tf.int64)  # global example numbers
    return _epoch_permutation(g % num_examples, seed, g // num_examples, num_examples)


def _flip(batch, seed, step, batch_size: int):
    """Flips each image of a step's uint8 [B, H, W, C] batch left-right with probability 1/2; philox keyed
    by (seed, step), so fixed per (seed, example number) for a given batch size."""
    width = batch.shape[2]
    coin = tf.random.stateless_uniform([batch_size], tf.stack([seed, step]), alg="philox")
    cols = tf.range(width)[None]  # [1, W]; a column gather is 3x faster than tf.where
    cols = tf.where((coin < 0.5)[:, None], width - 1 - cols, cols)  # [B, W]
    return tf.gather(batch, cols, axis=2, batch_dims=1)


def _train_dataset(
    images: np.ndarray | StreamedSplit, batch_size: int, seed: int, start_step: int, random_flip: bool
) -> tf.data.Dataset:
    """tf.data stream of uint8 [batch_size, H, W, C] batches, element k being step start_step+k."""
    num_examples = len(images)
    seed_t = tf.constant(seed, tf.int64)
    steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    if isinstance(images, StreamedSplit):  # read from disk, a step's images in parallel
        index = steps.map(lambda step: _step_indices(step, batch_size, seed_t, num_examples))
        ds = tf.data.Dataset.zip(steps, images.images(index, batch_size))
        if random_flip:
            return ds.map(
                lambda step, batch: _flip(batch, seed_t, step, batch_size), num_parallel_calls=tf.data.AUTOTUNE
            )
        return ds.map(lambda step, batch: batch)
    images_t = tf.convert_to_tensor(images)  # captured by reference, not embedded in the graph

    def batch_for_step(step):
        batch = tf.gather(images_t, _step_indices(step, batch_size, seed_t, num_examples))  # [B, H, W, C] uint8
        return _flip(batch, seed_t, step, batch_size) if random_flip else batch

    return steps.map(batch_for_step, num_parallel_calls=tf.data.AUTOTUNE)


def train_batches(
    images: np.ndarray | StreamedSplit,
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
      images: uint8 [N, H, W, C], e.g. from load_images (this process's shard), or a StreamedSplit
        (load_images with in_memory=False): the same batches, read from disk as they are needed.
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
    if not isinstance(images, StreamedSplit):
        return _read_ahead(batch._numpy() for batch in ds)  # zero-copy views of the tf tensors
    return _read_ahead(_named_errors(ds, images, per_device * num_local_devices, seed, start_step))


def _read_ahead(batches: Iterator[np.ndarray], size: int = READ_AHEAD) -> Iterator[np.ndarray]:
    """Iterates batches in a background thread, up to `size` ahead, so that next() hands over a ready batch.

    tf.data's AUTOTUNE prefetch keeps little ready for a consumer that is slower than the pipeline (a
    training step): there next() waited 2-4 ms per step (bench/RESULTS.md, input pipeline), here ~0.07 ms.
    An error in the pipeline is raised by the next() that reaches it; the thread stops when this iterator
    is closed or garbage-collected.
    """
    ready: queue.Queue = queue.Queue(size)
    stop = threading.Event()

    def put(item) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def fill():
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
        except BaseException as e:  # handed to the consumer
            put((None, e))

    threading.Thread(target=fill, name="train_batches", daemon=True).start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            yield batch
    finally:
        stop.set()


def _named_errors(ds: tf.data.Dataset, images: StreamedSplit, batch_size: int, seed: int, step: int):
    """Yields ds's batches as NumPy; a file that cannot be read fails with a DataError naming it."""
    it = iter(ds)
    while True:
        try:
            batch = next(it)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            index = _step_indices(tf.constant(step, tf.int64), batch_size, tf.constant(seed, tf.int64), len(images))
            raise images.read_error(index.numpy(), e) from None
        yield batch._numpy()
        step += 1


def eval_batches(
    images: np.ndarray | StreamedSplit,
    batch_size: int,
    num_local_devices: int | None = None,
    process_count: int | None = None,
    num_batches: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole split once, in order, padded to full batches, shaped like train_batches.

    Args:
      images: uint8 [N, H, W, C] (this process's shard), or a StreamedSplit (read in order as it goes).
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

    def chunks():  # this process's images, local_batch at a time; empty past the end
        if isinstance(images, StreamedSplit):
            stop = min(len(images), num_batches * local_batch)
            index = tf.data.Dataset.range(stop).batch(local_batch)
            yield from (b.numpy() for b in images.images(index, local_batch).prefetch(2))
        else:
            yield from (images[k * local_batch : (k + 1) * local_batch] for k in range(num_batches))
        while True:
            yield images[:0]

    def batches():
        for _, chunk in zip(range(num_batches), chunks()):  # chunk: [<=b, H, W, C]
            padded = np.zeros((local_batch, *images.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            mask = np.arange(local_batch) < len(chunk)
            yield (
                scale_images(padded).reshape(num_local_devices, per_device, *images.shape[1:]),
                mask.reshape(num_local_devices, per_device),
            )

    return batches()

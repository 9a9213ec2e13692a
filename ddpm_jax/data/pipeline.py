"""Input pipeline: tfds datasets and image folders, in memory or streamed; a resumable NumPy training
stream; eval batches. No TensorFlow: tfds datasets are read from ArrayRecord by index, images decoded with PIL.

A dataset is a tfds name (mnist, cifar10, celeb_a, ...: prepared in data_dir or downloadable), "digits"
(scikit-learn's 8x8 digits wrapped as a local tfds builder, `ddpm_jax.data.digits_builder`, registered by
importing this module; it needs no network), or "folder:/path/to/images", a folder of PNG/JPEG files, local
or any etils.epath URI such as gs:// (`ddpm_jax.data.sources` says how its splits are chosen). Images of
another size are centre-cropped and resized to image_size x image_size (`images.fit_image`); images of the
right size pass unchanged.

  images = load_images(config.data.dataset, config.data.train_split, config.data.data_dir,
                       image_size=config.data.image_size, channels=config.data.channels,
                       in_memory=config.data.in_memory)
  for batch in train_batches(images, config.training.batch_size, config.seed, start_step=step):
      ...  # batch: float32 [local_devices, per_device_batch, H, W, C] in [-1, 1]

In memory (the default), a split is read, fitted and held as uint8 [N, H, W, C] (50,000 CIFAR-10 images:
150 MB). With in_memory=False, load_images returns a `sources.StreamedSplit` that reads each batch's
images from disk by index: tfds datasets prepared as ArrayRecord and folders. Either way the training
order is a pure function of (seed, step), the same for both (so streaming gives the same batches as in
memory), and a restored run continues with exactly the batches an uninterrupted run would have seen (see
`train_batches`; the order and the flips are `ddpm_jax.data.order`, bit-identical to the tf.data pipeline
this replaced). Each process reads only its own shard (tfds.even_splits; contiguous runs of a folder's
sorted files). A background thread keeps READ_AHEAD batches ready, so the training loop's next() does not
wait (bench/input_pipeline.py measures it).

TensorFlow is an extra (`pip install 'ddpm_jax[tf]'`), needed only for a tfds dataset stored as tfrecord
(read in memory through tf.data) or a builder whose preparation needs it; without it those cases raise a
DataError naming the extra. `tfds build NAME --file_format=array_record` prepares a dataset TF-free readers
can use. Digits are prepared as ArrayRecord.
"""

import itertools
import math
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ddpm_jax.core import pixels
from ddpm_jax.core.pixels import unscale_images  # noqa: F401 - re-exported beside scale_images
from ddpm_jax.data import order, sources
from ddpm_jax.data.digits_builder import Digits  # registers the tfds name "digits"
from ddpm_jax.data.images import decode_image
from ddpm_jax.data.sources import StreamedSplit
from ddpm_jax.errors import DataError

# A few names that work with this pipeline (any tfds image dataset with a uint8 "image" feature does;
# celeb_a's 218x178 faces are centre-cropped and resized to config.data.image_size), and a folder.
EXAMPLE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "celeb_a", "folder:/path/to/images")
READ_AHEAD = 2  # batches train_batches keeps ready in a background thread (_read_ahead)
TF_EXTRA = "pip install 'ddpm_jax[tf]'"
# tf.random.experimental.index_shuffle pads its [2] seed with this word in front before calling the raw op;
# the training order keeps that key layout: [pad, seed, epoch] (order.index_shuffle is the raw op).
_INDEX_SHUFFLE_SEED_PAD = 498247692


# ----------------------------------------------------------------------------- scaling


def scale_images(images) -> np.ndarray:
    """Maps uint8 pixels 0..255 to float32 in [-1, 1] (x / 127.5 - 1): pixels.scale_images, re-exported
    (pixels.unscale_images is the inverse)."""
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


def _missing_tensorflow(error: BaseException | None) -> bool:
    """Whether error, or an error it was raised from, is TensorFlow's absence."""
    while error is not None:
        if isinstance(error, ImportError) and (error.name or "").split(".")[0] == "tensorflow":
            return True
        if isinstance(error, ImportError) and "No module named 'tensorflow" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _prepare(builder: tfds.core.DatasetBuilder, download: bool) -> None:
    """Makes sure the builder's data is in its data_dir (as ArrayRecord); RuntimeError if it cannot be."""
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
        f"Prepare it on a machine with a network (`tfds build {builder.name} --file_format=array_record "
        "--data_dir=DIR`), copy DIR here and pass it as data_dir (config.data.data_dir), or use dataset "
        "'digits', which needs no download."
    )
    if not download:
        raise RuntimeError(f"tfds dataset {builder.name!r} is not prepared in {where} and download=False. {advice}")
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # network, manual-download and missing-package errors alike
        if _missing_tensorflow(e):
            raise DataError(
                f"Preparing tfds dataset {builder.name!r} needs TensorFlow: {TF_EXTRA}, or prepare it elsewhere "
                f"(`tfds build {builder.name} --file_format=array_record --data_dir=DIR`) and pass DIR as data_dir."
            ) from e
        raise RuntimeError(
            f"tfds dataset {builder.name!r} is not prepared in {where} and cannot be downloaded "
            f"on this machine ({type(e).__name__}: {e}). {advice}"
        ) from e


def check_data_dir(data_dir: str | None) -> None:
    """errors.DataError (a RuntimeError) if data_dir is set but is not a folder; train_and_evaluate
    calls it before it touches the workdir or builds anything."""
    if data_dir and not epath.Path(data_dir).is_dir():
        raise DataError(
            f"config.data.data_dir={data_dir!r} does not exist: pass the folder that holds the "
            "prepared tfds datasets (or leave it unset for ~/tensorflow_datasets)."
        )


def _tfrecord_images(builder: tfds.core.DatasetBuilder, split: str, channels: int, size: int | None) -> np.ndarray:
    """A split stored as tfrecord, read through tf.data (TensorFlow, the `tf` extra), decoded and fitted
    like every other image (PIL, images.fit_image)."""
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError(
            f"tfds dataset {builder.name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, which only TensorFlow reads: {TF_EXTRA}, or prepare it again as "
            f"ArrayRecord (`tfds build {builder.name} --file_format=array_record --data_dir=DIR`, a new DIR)."
        ) from None
    try:
        tf.config.set_visible_devices([], "GPU")  # tf.data stays on the CPU, the accelerators' memory to JAX
    except RuntimeError:  # TF's devices were already initialised
        pass
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    encoded = [ex["image"] for ex in tfds.as_numpy(ds)]
    return _decode_all(encoded, channels, size, name=f"{builder.name}:{split}")


def _decode_all(encoded: list[bytes], channels: int, size: int | None, name: str) -> np.ndarray:
    """uint8 [N, H, W, channels] from encoded images (fitted to size unless None), decoded on sources.pool()."""

    def one(k: int) -> np.ndarray:
        try:
            image = decode_image(encoded[k], channels)
        except sources.DECODE_ERRORS as e:
            raise DataError(f"Cannot read image {k} of {name}: {e}.") from None
        return image if size is None else sources.fit_image(image, size)

    decoded = list(sources.pool().map(one, range(len(encoded))))
    if not decoded:
        return np.zeros((0, size or 0, size or 0, channels), np.uint8)
    if len({x.shape for x in decoded}) > 1:
        raise DataError(f"{name}: images of several sizes; set config.data.image_size to fit them to one size.")
    return np.stack(decoded)


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
    prepared there (as ArrayRecord) if they are missing (download=True); where that fails (no network)
    the error says how to prepare them elsewhere.

    Args:
      dataset: tfds name, e.g. "digits", "mnist", "cifar10", "celeb_a", or "folder:/path/to/images".
      split: tfds split string, e.g. "train", "test", "train[:90%]"; for a folder "train", "test" or
        a subfolder's name (sources).
      data_dir: tfds data_dir; None for tfds's default (~/tensorflow_datasets). Unused for folders.
      process_index: this process's shard; default jax.process_index().
      process_count: number of shards (tfds.even_splits); default jax.process_count().
      download: whether to try downloading a dataset that is not prepared yet.
      image_size: fit every image to image_size x image_size (images.fit_image; images of that
        size pass unchanged). None keeps the stored size (tfds only, all images of one size, in memory).
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
        empty folder, an unreadable image file (named), a tfds dataset that cannot stream, or one that
        needs TensorFlow where it is not installed (the message names the `tf` extra).
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
    channels = channels or stored_channels or 3
    if process_count > 1:
        split = tfds.even_splits(split, process_count)[process_index]
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        if not in_memory:
            raise DataError(
                f"config.data.in_memory=False streams by index, which tfds offers only for datasets prepared as "
                f"ArrayRecord; {builder.name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}. "
                f"Prepare it once with `tfds build {builder.name} --file_format=array_record --data_dir=DIR` (a "
                "new DIR), or set config.data.in_memory=True if the split fits in memory."
            )
        return _tfrecord_images(builder, split, channels, image_size)
    source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    if image_size is None and in_memory:  # as stored
        records = source.__getitems__(list(range(len(source))))
        return _decode_all([sources.example_image_bytes(r) for r in records], channels, None, f"{dataset}:{split}")
    if image_size is None and (height is None or height != width):
        raise ValueError(f"Dataset {dataset!r}: streaming needs image_size.")
    streamed = sources.streamed_tfds(source, f"{dataset}:{split}", channels, image_size or height)
    return streamed if not in_memory else streamed[:]


def shard_offsets(
    dataset: str, split: str, data_dir: str | None = None, process_count: int | None = None
) -> np.ndarray:
    """int64 [process_count + 1]: process i's shard of a split (load_images) is the split's images
    offsets[i]..offsets[i + 1] - 1 in their stored order; offsets[-1] is the whole split's size.

    tfds: the sizes of tfds.even_splits(split, process_count), read from the builder's split metadata
    (the builder must be prepared: call load_images first); folders: np.array_split of the sorted files.
    """
    process_count = jax.process_count() if process_count is None else process_count
    folder = sources.folder_path(dataset)
    if folder is not None:
        total = len(sources.folder_split_files(folder, split))
        sizes = [len(part) for part in np.array_split(np.arange(total), process_count)]
    else:
        info = _builder(dataset, data_dir).info.splits
        parts = [split] if process_count == 1 else tfds.even_splits(split, process_count)
        sizes = [info[part].num_examples for part in parts]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


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


def step_indices(step: int, batch_size: int, seed: int, num_examples: int) -> np.ndarray:
    """The image indices of a step's batch: int64 [batch_size] (see train_batches)."""
    g = step * batch_size + np.arange(batch_size, dtype=np.int64)  # global example numbers
    epoch, position = g // num_examples, g % num_examples
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):  # one or two epochs (more only for batches larger than the split)
        at = epoch == e
        out[at] = order.epoch_permutation((_INDEX_SHUFFLE_SEED_PAD, seed, int(e)), num_examples)[position[at]]
    return out


def flip_mask(step: int, batch_size: int, seed: int) -> np.ndarray:
    """bool [batch_size]: which images of a step's batch are flipped left-right (philox keyed by (seed, step),
    so fixed per (seed, example number) for a given batch size)."""
    return order.philox_uniform(batch_size, seed, step) < 0.5


_FLIP_CHUNK = 64  # steps whose flips are drawn in one vectorized Philox call


def _train_batch(images: np.ndarray | StreamedSplit, step: int, batch_size: int, seed: int, coin=None):
    """uint8 [batch_size, H, W, C]: step's images, flipped where coin (bool [batch_size]) is True."""
    index = step_indices(step, batch_size, seed, len(images))
    batch = images.read(index) if isinstance(images, StreamedSplit) else images[index]
    if coin is not None:
        batch[coin] = batch[coin, :, ::-1]
    return batch


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
    epoch e = g // N, position p = g % N, image order.index_shuffle(p, key=[pad, seed, e],
    max_index=N - 1) (tf.random.experimental.index_shuffle(p, seed=[seed, e], max_index=N - 1), in
    NumPy: a stateless permutation per epoch). So every epoch visits each image exactly once, batches
    may straddle epochs, and the stream from start_step=k equals the uninterrupted stream from
    step k. The optional left-right flips are drawn from philox keyed by (seed, s) (flip_mask), hence
    fixed per (seed, g) for a given batch size.

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
      errors.DataError: (from next()) a streamed image that cannot be read, named.
    """
    num_local_devices = num_local_devices or jax.local_device_count()
    process_count = process_count or jax.process_count()
    per_device = _per_device_batch_size(global_batch_size, num_local_devices, process_count)
    if len(images) == 0:
        raise ValueError("train_batches needs at least one image.")
    shape = (num_local_devices, per_device, *images.shape[1:])
    batch_size = per_device * num_local_devices

    def batches():
        for first in itertools.count(start_step, _FLIP_CHUNK):
            steps = np.arange(first, first + _FLIP_CHUNK)
            coins = order.philox_uniform(batch_size, seed, steps) < 0.5 if random_flip else [None] * len(steps)
            for step, coin in zip(steps.tolist(), coins):
                yield scale_images(_train_batch(images, step, batch_size, seed, coin)).reshape(shape)

    return _read_ahead(batches())


def _read_ahead(batches: Iterator, size: int = READ_AHEAD, name: str = "train_batches") -> Iterator:
    """Iterates batches in a background thread, up to `size` ahead, so that next() hands over a ready batch.

    The thread builds one batch at a time (a streamed split's images are read and decoded on sources.pool()),
    so a training step overlaps the next batches' preparation; bench/input_pipeline.py measures next()'s wait.
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
            put((None, None))  # the end of a finite stream
        except BaseException as e:  # handed to the consumer
            put((None, e))

    threading.Thread(target=fill, name=name, daemon=True).start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is None:
                return
            yield batch
    finally:
        stop.set()


def eval_batches(
    images: np.ndarray | StreamedSplit,
    batch_size: int,
    num_local_devices: int | None = None,
    process_count: int | None = None,
    num_batches: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole split once, in order, padded to full batches, shaped like train_batches.

    Args:
      images: uint8 [N, H, W, C] (this process's shard), or a StreamedSplit (read in order as it goes,
        a batch ahead in a background thread).
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
            chunk = images[k * local_batch : (k + 1) * local_batch]  # [<=b, H, W, C]; empty past the end
            padded = np.zeros((local_batch, *images.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            mask = np.arange(local_batch) < len(chunk)
            yield (
                scale_images(padded).reshape(num_local_devices, per_device, *images.shape[1:]),
                mask.reshape(num_local_devices, per_device),
            )

    return _read_ahead(batches(), 1, "eval_batches") if isinstance(images, StreamedSplit) else batches()

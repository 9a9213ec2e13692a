"""Where training images come from: tfds splits and folders of PNG/JPEG files, fitted to the config's size.

Every image is fitted the same way (`fit_image`): the largest centred square is cropped, then resized to
image_size x image_size with tf.image.resize(method="bilinear", antialias=True) and rounded to uint8. That is
resizing the shorter side to image_size and centre-cropping, without rounding the longer side on the way.
Images that are already image_size x image_size pass through untouched (the digits and cifar10 stay
bit-identical). data.load_images fits an in-memory split once, at load; a streamed split (`StreamedSplit`)
fits each image as it is read.

A folder dataset is named "folder:/path/to/images" (config.data.dataset). Its PNG and JPEG files
(.png, .jpg, .jpeg, any case) are found recursively and sorted by relative path. Its splits are:
  - the subfolders, when there is a train/ subfolder: split "train" is every image under train/, split
    "test" every image under test/, any other split name the subfolder of that name;
  - otherwise "train" and "test" by a hash of each file's relative path: a file is in "test" when
    sha256(relative path) mod 100 < FOLDER_TEST_PERCENT. Adding or removing files moves no other file
    between the splits.
Every file is converted to config.data.channels (PIL-style: gray to RGB by copying, RGB to gray by
L = 0.299 R + 0.587 G + 0.114 B, an alpha channel dropped), so folders of mixed modes load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm_jax.errors import DataError

FOLDER_PREFIX = "folder:"
FOLDER_TEST_PERCENT = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


# ----------------------------------------------------------------------------- fitting


def fit_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [h, w, c] -> uint8 [size, size, c]: centre square, antialiased bilinear resize, rounded.

    Works in a tf.data map (graph) and eagerly; an image already size x size is returned unchanged.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]

    def resized():
        s = tf.minimum(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = image[top : top + s, left : left + s]
        out = tf.image.resize(square, [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    out = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: image, resized)
    return tf.ensure_shape(out, [size, size, image.shape[-1]])


def decode_image(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded PNG/JPEG (GIF, BMP) bytes -> uint8 [h, w, channels], converted as the module docstring says.
    JPEGs are decoded with the accurate integer DCT, as PIL does (TF's default, a faster one, differs by a few levels)."""
    rgb = tf.cond(  # gray copied to RGB, alpha dropped
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
    )
    if channels == 3:
        return rgb
    luma = tf.tensordot(tf.cast(rgb, tf.float32), tf.constant(_LUMA), axes=[[2], [0]])[..., None]
    return tf.cast(tf.clip_by_value(tf.round(luma), 0.0, 255.0), tf.uint8)


# ----------------------------------------------------------------------------- folders


def folder_path(dataset: str) -> str | None:
    """The folder of a "folder:PATH" dataset name, or None for a tfds name."""
    return dataset[len(FOLDER_PREFIX) :] if dataset.startswith(FOLDER_PREFIX) else None


def _image_files(root: str) -> list[str]:
    """Relative paths of the PNG/JPEG files under root, recursively, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _in_test_split(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < FOLDER_TEST_PERCENT


def folder_split_files(root: str, split: str) -> list[str]:
    """Absolute paths of a folder dataset's split, in sorted order of their relative paths.

    Raises:
      DataError: the folder is missing, the split is unknown, or the split has no images.
    """
    if not os.path.isdir(root):
        raise DataError(
            f"config.data.dataset={FOLDER_PREFIX}{root}: no such folder. Pass a folder of PNG/JPEG images "
            f"as '{FOLDER_PREFIX}/path/to/images'."
        )
    if os.path.isdir(os.path.join(root, "train")):
        subfolders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if split not in subfolders:
            raise DataError(
                f"Unknown split {split!r} for the image folder {root}: it has a train/ subfolder, so its splits "
                f"are its subfolders {subfolders}. Set config.data.train_split / eval_split to one of them."
            )
        base = os.path.join(root, split)
        files = [os.path.join(base, f) for f in _image_files(base)]
    elif split in ("train", "test"):
        want_test = split == "test"
        files = [os.path.join(root, f) for f in _image_files(root) if _in_test_split(f) == want_test]
    else:
        raise DataError(
            f"Unknown split {split!r} for the image folder {root}: without train/ and test/ subfolders its "
            f"splits are 'train' and 'test' ({FOLDER_TEST_PERCENT}% of the files, chosen by a hash of the path)."
        )
    if not files:
        raise DataError(
            f"No {'/'.join(IMAGE_EXTENSIONS)} images in split {split!r} of the image folder {root} (searched "
            "recursively)."
        )
    return files


def _read_file(path: tf.Tensor, channels: int, size: int) -> tf.Tensor:
    return fit_image(decode_image(tf.io.read_file(path), channels), size)


def first_unreadable(paths, channels: int) -> tuple[str, str] | None:
    """(path, reason) of the first file that does not decode, or None; reads them one by one."""
    for path in paths:
        try:
            decode_image(tf.io.read_file(path), channels)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            return path, e.message.splitlines()[0]
    return None


def unreadable_error(paths, channels: int, error: Exception) -> DataError:
    """The DataError for a failed read of some of paths, naming the file."""
    bad = first_unreadable(paths, channels)
    if bad is None:
        return DataError(f"Reading the image folder failed: {error}")
    return DataError(f"Cannot read image {bad[0]}: {bad[1]}. Remove or replace the file.")


def read_folder(paths: list[str], channels: int, size: int) -> np.ndarray:
    """uint8 [len(paths), size, size, channels], in the order of paths (tf.data reads in parallel)."""
    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(lambda p: _read_file(p, channels, size), num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    try:
        return np.concatenate([b.numpy() for b in ds])
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise unreadable_error(paths, channels, e) from None


# ----------------------------------------------------------------------------- streamed splits


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedSplit:
    """A split read from disk by index, image by image, instead of held in memory.

    What data.load_images returns with in_memory=False; data.train_batches and data.eval_batches take it
    in place of the uint8 array and read only the images each batch needs. It looks enough like that
    array for them: len(), .shape, .dtype and slicing (split[a:b] reads images a..b-1).

    records(index int64 [k]) -> tf.string [k] and decode(record) -> uint8 [size, size, channels] are
    graph functions: a file path and reading that file (folders), or a serialized tf.Example read from
    ArrayRecord by tfds' random access and its "image" feature (tfds datasets).
    """

    name: str
    num_images: int
    size: int
    channels: int
    records: Callable[[tf.Tensor], tf.Tensor]
    decode: Callable[[tf.Tensor], tf.Tensor]
    paths: tuple[str, ...] | None = None  # folders: to name an unreadable file

    def __len__(self) -> int:
        return self.num_images

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_images, self.size, self.size, self.channels)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def images(self, index: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        """The images at a dataset of int64 [k] index vectors, in order, rebatched to uint8
        [batch_size, size, size, channels] (the last batch may be smaller); read and decoded in parallel."""
        ds = index.map(self.records, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        ds = ds.map(self.decode, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size)

    def read(self, index) -> np.ndarray:
        """uint8 [len(index), size, size, channels]: the images at these positions, in this order."""
        index = np.asarray(index, np.int64)
        if len(index) == 0:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        try:
            (batch,) = list(self.images(tf.data.Dataset.from_tensors(index), len(index)))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            raise self.read_error(index, e) from None
        return batch.numpy()

    def read_error(self, index, error: Exception) -> Exception:
        """The error to raise for a failed read of the images at index (names the file for folders)."""
        if self.paths is None:
            return error
        return unreadable_error([self.paths[i] for i in np.asarray(index)], self.channels, error)

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError(f"StreamedSplit supports slices (split[a:b]), not {key!r}; use read(index).")
        return self.read(np.arange(self.num_images)[key])


def streamed_folder(paths: list[str], channels: int, size: int) -> StreamedSplit:
    paths_t = tf.constant(paths)
    return StreamedSplit(
        name=os.path.commonpath(paths) if len(paths) > 1 else paths[0],
        num_images=len(paths),
        size=size,
        channels=channels,
        records=lambda index: tf.gather(paths_t, index),
        decode=lambda path: _read_file(path, channels, size),
        paths=tuple(paths),
    )


def streamed_tfds(builder: tfds.core.DatasetBuilder, split: str, channels: int, size: int) -> StreamedSplit:
    """A tfds split prepared as ArrayRecord, read by index (DataError naming the fix for other formats)."""
    try:
        source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError:
        raise DataError(
            f"config.data.in_memory=False streams by index, which tfds offers only for datasets prepared as "
            f"ArrayRecord; {builder.name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}. "
            f"Prepare it once with `tfds build {builder.name} --file_format=array_record --data_dir=DIR` (a "
            "new DIR), or set config.data.in_memory=True if the split fits in memory."
        ) from None

    def fetch(index: np.ndarray) -> np.ndarray:
        return np.array(source.__getitems__(index.tolist()), dtype=object)

    def records(index):
        out = tf.numpy_function(fetch, [index], tf.string, stateful=False)
        return tf.ensure_shape(out, index.shape)

    def decode(record):
        encoded = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]
        return fit_image(tf.io.decode_image(encoded, channels=channels, expand_animations=False), size)

    return StreamedSplit(
        name=f"{builder.name}:{split}",
        num_images=len(source),
        size=size,
        channels=channels,
        records=records,
        decode=decode,
    )

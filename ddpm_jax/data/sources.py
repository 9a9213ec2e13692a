"""Where training images come from: tfds splits and folders of PNG/JPEG files, fitted to the config's size.

Every image is decoded with PIL and fitted the same way (`images.fit_image`): the largest centred square is
cropped, then resized to image_size x image_size with antialiased bilinear resampling (TF's
tf.image.resize(method="bilinear", antialias=True), ported bit-exactly) and rounded to uint8. Images that are
already image_size x image_size pass through untouched (the digits and cifar10 stay bit-identical).
data.load_images fits an in-memory split once, at load; a streamed split (`StreamedSplit`) fits each image
as it is read. Reading and decoding run on a shared thread pool (PIL and NumPy release the GIL).

A folder dataset is named "folder:/path/to/images" (config.data.dataset); the path may be any etils.epath
path, e.g. "folder:gs://bucket/images". Its PNG and JPEG files (.png, .jpg, .jpeg, any case) are found
recursively and sorted by relative path. Its splits are:
  - the subfolders, when there is a train/ subfolder: split "train" is every image under train/, split
    "test" every image under test/, any other split name the subfolder of that name;
  - otherwise "train" and "test" by a hash of each file's relative path: a file is in "test" when
    sha256(relative path) mod 100 < FOLDER_TEST_PERCENT. Adding or removing files moves no other file
    between the splits.
Every file is converted to config.data.channels (`images.decode_image`: grey to RGB by copying, RGB to grey by
L = 0.299 R + 0.587 G + 0.114 B, an alpha channel dropped), so folders of mixed modes load.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import posixpath
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from ddpm_jax.data.images import decode_image, fit_image  # noqa: F401 - fit_image re-exported
from ddpm_jax.errors import DataError

FOLDER_PREFIX = "folder:"
FOLDER_TEST_PERCENT = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# What PIL raises for bytes it cannot decode (SyntaxError for some broken headers), and a missing file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


@functools.cache
def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that read and decode images (Python's default size: min(32, cpus + 4), for remote reads)."""
    return concurrent.futures.ThreadPoolExecutor(thread_name_prefix="ddpm_jax_read")


# ----------------------------------------------------------------------------- folders


def folder_path(dataset: str) -> str | None:
    """The folder of a "folder:PATH" dataset name, or None for a tfds name."""
    return dataset[len(FOLDER_PREFIX) :] if dataset.startswith(FOLDER_PREFIX) else None


def _image_files(root: epath.Path) -> list[str]:
    """Relative paths ("/"-separated) of the PNG/JPEG files under root, recursively, sorted."""
    found = []
    for dirpath, _, filenames in root.walk():
        rel = posixpath.relpath(_bare(dirpath), _bare(root))
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else posixpath.join(rel, name))
    return sorted(found)


def _bare(path) -> str:
    """A path without its scheme (epath's fsspec walk gives folders without gs://), "/"-separated."""
    return str(path).split("://")[-1].replace("\\", "/").rstrip("/")


def _in_test_split(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < FOLDER_TEST_PERCENT


def folder_split_files(root: str, split: str) -> list[str]:
    """Paths of a folder dataset's split (root joined with each relative path), sorted by relative path.

    Raises:
      DataError: the folder is missing, the split is unknown, or the split has no images.
    """
    base = epath.Path(root)
    if not base.is_dir():
        raise DataError(
            f"config.data.dataset={FOLDER_PREFIX}{root}: no such folder. Pass a folder of PNG/JPEG images "
            f"as '{FOLDER_PREFIX}/path/to/images'."
        )
    if (base / "train").is_dir():
        subfolders = sorted(d.name for d in base.iterdir() if d.is_dir())
        if split not in subfolders:
            raise DataError(
                f"Unknown split {split!r} for the image folder {root}: it has a train/ subfolder, so its splits "
                f"are its subfolders {subfolders}. Set config.data.train_split / eval_split to one of them."
            )
        files = [str(base / split / f) for f in _image_files(base / split)]
    elif split in ("train", "test"):
        want_test = split == "test"
        files = [str(base / f) for f in _image_files(base) if _in_test_split(f) == want_test]
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


def read_folder(paths: list[str], channels: int, size: int) -> np.ndarray:
    """uint8 [len(paths), size, size, channels], in the order of paths (read in parallel)."""
    return streamed_folder(paths, channels, size)[:]


# ----------------------------------------------------------------------------- streamed splits


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedSplit:
    """A split read from disk by index, image by image, instead of held in memory.

    What data.load_images returns with in_memory=False; data.train_batches and data.eval_batches take it
    in place of the uint8 array and read only the images each batch needs. It looks enough like that
    array for them: len(), .shape, .dtype and slicing (split[a:b] reads images a..b-1).

    records(index int [k]) -> k records (file paths for folders; encoded image bytes read by index from
    ArrayRecord for tfds datasets); decode(record) -> uint8 [size, size, channels], run on the thread pool.
    describe(position) names an image in errors; fix says what to do about it.
    """

    name: str
    num_images: int
    size: int
    channels: int
    records: Callable[[np.ndarray], Sequence]
    decode: Callable[[object], np.ndarray]
    describe: Callable[[int], str]
    fix: str = "Remove or replace the file."

    def __len__(self) -> int:
        return self.num_images

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_images, self.size, self.size, self.channels)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def read(self, index) -> np.ndarray:
        """uint8 [len(index), size, size, channels]: the images at these positions, in this order.

        Raises:
          DataError: an image cannot be read or decoded (named).
        """
        index = np.asarray(index, np.int64)
        out = np.empty((len(index), *self.shape[1:]), np.uint8)
        if len(index) == 0:
            return out

        records = self.records(index)

        def some(ks) -> None:  # a contiguous run of the batch: fewer, larger tasks for the pool
            for k in ks:
                try:
                    out[k] = self.decode(records[k])
                except DECODE_ERRORS as e:
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise DataError(f"Cannot read image {self.describe(int(index[k]))}: {reason}. {self.fix}") from None

        runs = np.array_split(np.arange(len(index)), min(len(index), pool()._max_workers))
        for f in [pool().submit(some, ks) for ks in runs]:
            f.result()
        return out

    def subset(self, index) -> StreamedSplit:
        """The images at these positions (int [k]), in this order, as a StreamedSplit of k images that reads only
        them (the validation holdout's two sides, data.splits); errors still name the original image."""
        index = np.asarray(index, np.int64)
        return dataclasses.replace(
            self,
            num_images=len(index),
            records=lambda i: self.records(index[i]),
            describe=lambda i: self.describe(int(index[i])),
        )

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError(f"StreamedSplit supports slices (split[a:b]), not {key!r}; use read(index).")
        return self.read(np.arange(self.num_images)[key])


def _read_bytes(path: str) -> bytes:
    """A file's bytes: Python's open for local paths (a third of epath's cost per call), epath for URIs."""
    if "://" in path:
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def streamed_folder(paths: list[str], channels: int, size: int) -> StreamedSplit:
    """A folder's files (full paths, local or any epath URI), read and fitted as they are needed."""
    return StreamedSplit(
        name=posixpath.commonpath([_bare(p) for p in paths]) if len(paths) > 1 else paths[0],
        num_images=len(paths),
        size=size,
        channels=channels,
        records=lambda index: [paths[i] for i in index],
        decode=lambda path: fit_image(decode_image(_read_bytes(path), channels), size),
        describe=lambda i: paths[i],
    )


def example_image_bytes(record: bytes, key: str = "image") -> bytes:
    """The encoded image of a serialized tf.Example (tfds' record format), parsed with tfds' protobuf copy."""
    from tensorflow_datasets.proto import tf_example_pb2  # the proto classes only: no TensorFlow

    feature = tf_example_pb2.Example.FromString(record).features.feature[key]
    return feature.bytes_list.value[0]


def streamed_tfds(source, name: str, channels: int, size: int) -> StreamedSplit:
    """A tfds split prepared as ArrayRecord, read by index: source is builder.as_data_source(split,
    deserialize_method=RAW_BYTES) (serialized tf.Examples), whose "image" is decoded here with PIL."""
    return StreamedSplit(
        name=name,
        num_images=len(source),
        size=size,
        channels=channels,
        records=lambda index: source.__getitems__(index.tolist()),
        decode=lambda record: fit_image(decode_image(example_image_bytes(record), channels), size),
        describe=lambda i: f"{i} of {name}",
        fix="Prepare the dataset again (`tfds build ... --file_format=array_record`) in a new data_dir.",
    )

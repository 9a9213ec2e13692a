"""The offline 8x8 digits as a tfds dataset, so the one tfds path serves every dataset.

scikit-learn ships the UCI optical-recognition digits (`sklearn.datasets.load_digits`): 1,797
images of 8x8 pixels with 17 grey levels 0..16. `Digits` wraps them as the tfds dataset
"digits" (registered when this module is imported): nothing is downloaded, so it prepares
itself on any machine, without TensorFlow: it is stored as ArrayRecord (version 1.1.0; 1.0.0 was
tfrecord, which only TensorFlow reads) and its images are handed to tfds PNG-encoded by PIL
(tfds encodes NumPy images with tf.image.encode_png). PNG is lossless: the pixels are those of 1.0.0.

Split (fixed, the same on every machine and version):
  `np.random.RandomState(0).permutation(1797)` (the legacy generator, whose stream NumPy keeps
  frozen); its first 297 entries are the test split, the other 1,500 the train split. Each
  split is stored in increasing sklearn index order (`digits_split_indices`), unshuffled.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 1797
NUM_TEST = 297
NUM_LEVELS = 17  # grey levels 0..16 in sklearn's data
SPLIT_SEED = 0


def digits_split_indices() -> dict[str, np.ndarray]:
    """The sklearn indices that make up each split, in stored order.

    Returns:
      {"train": int64 [1500], "test": int64 [297]}, each sorted ascending; disjoint, and
      together 0..1796.
    """
    perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
    return {"train": np.sort(perm[NUM_TEST:]), "test": np.sort(perm[:NUM_TEST])}


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All sklearn digits as uint8 images: level v -> round(v * 255 / 16).

    Returns:
      images uint8 [1797, 8, 8, 1] with values in {round(k * 255 / 16): k = 0..16},
      labels int64 [1797].
    """
    from sklearn.datasets import load_digits  # imported here: only preparation needs it

    digits = load_digits()
    levels = np.asarray(digits.images, np.float64)  # [1797, 8, 8], floats 0..16
    images = np.round(levels * 255.0 / (NUM_LEVELS - 1)).astype(np.uint8)
    return images[..., None], np.asarray(digits.target, np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 17 grey levels), no download.

    Splits: train 1,500 / test 297, fixed (see the module docstring).
    """

    name = "digits"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "sklearn load_digits, uint8 round(v*255/16), 1500/297 split.",
        "1.1.0": "The same images, stored as ArrayRecord (readable and prepared without TensorFlow).",
    }
    # tfds 4.9.10 derives `code_path` with `importlib_resources`, which it declares only for
    # Python < 3.9, so preparing fails with ModuleNotFoundError where that package is absent.
    # This file is the code path; it only serves to find a (non-existent) checksums file.
    code_path = epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's 8x8 optical-recognition digits (UCI), 17 grey levels.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            disable_shuffling=True,  # keep the stored order = digits_split_indices()
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        images, labels = digits_uint8()
        return {split: self._generate_examples(images, labels, idx) for split, idx in digits_split_indices().items()}

    def _generate_examples(self, images, labels, indices):
        from PIL import Image

        for i in indices:
            png = io.BytesIO()
            Image.fromarray(images[i, :, :, 0]).save(png, format="PNG")
            yield int(i), {"image": png.getvalue(), "label": int(labels[i])}

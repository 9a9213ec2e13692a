"""A config's splits: this process's shard of the train or test split, checked against the config.

What the loop, the evaluate and ablate commands and the tests read their images with. Importing it
imports the input pipeline and tfds: a caller that need not (loading or sampling a run) imports it
inside the function that reads a split.
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.data import pipeline
from ddpm_jax.errors import DataError


def load_split(config: ml_collections.ConfigDict, split: str):
    """This process's shard of a split, uint8 [N, H, W, C] fitted to the config's image size (or a
    pipeline.StreamedSplit of that shape with config.data.in_memory=False).

    Raises:
      DataError: the dataset is not prepared and cannot be downloaded here, or its images do not
        have the config's shape (the message names the fields to set).
    """
    try:
        images = pipeline.load_images(
            config.data.dataset,
            split,
            config.data.data_dir,
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

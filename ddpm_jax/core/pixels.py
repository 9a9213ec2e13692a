"""uint8 pixels <-> float32 in [-1, 1], in NumPy (no TensorFlow): for pictures, metrics and tests.
data.py applies the same map to tf.Tensors inside the input pipeline."""

from __future__ import annotations

import numpy as np


def scale_images(images) -> np.ndarray:
    """Maps uint8 pixels 0..255 to float32 in [-1, 1] (x / 127.5 - 1); inverse: unscale_images."""
    return np.asarray(images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def unscale_images(x) -> np.ndarray:
    """Maps [-1, 1] back to uint8 pixels: round((x + 1) * 127.5), clipped to 0..255.

    Args:
      x: float array (NumPy or JAX), any shape; values outside [-1, 1] are clipped.

    Returns:
      uint8 NumPy array of the same shape.
    """
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)

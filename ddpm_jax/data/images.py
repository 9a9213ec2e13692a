"""Decoding image files and fitting images to the config's size, in NumPy and PIL (no TensorFlow).

`decode_image`: PNG/JPEG (GIF, BMP, ...) bytes -> uint8 [h, w, channels] with PIL. PIL decodes JPEG with libjpeg's
accurate integer IDCT (JDCT_ISLOW) and fancy upsampling, as tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE") does;
tests/test_data_images.py checks the pixels against tf.io where TF is installed. Every file becomes RGB first (grey
copied, palette expanded, alpha dropped), then, for channels=1, L = round((0.299 R + 0.587 G) + 0.114 B) in float32
(the ITU-R 601 weights of PIL's convert("L"); this is what the TF pipeline computed).

`fit_image`: the largest centred square, resized to size x size by antialiased bilinear (triangle-kernel)
resampling and rounded: a float32 port of TF's ScaleAndTranslate (tensorflow/core/kernels/image/
scale_and_translate_op.cc, what tf.image.resize(method="bilinear", antialias=True) runs), with the same weights,
the same order of float32 operations (rows, then columns) and round-half-to-even. Images already size x size
pass unchanged.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's convert("L")


def decode_image(contents: bytes, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [h, w, channels]. Raises PIL's errors (OSError, ...) for unreadable bytes."""
    with Image.open(io.BytesIO(contents)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNG: keep the high byte, as libpng's strip_16
            rgb = np.repeat((np.asarray(im, np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=-1)
        else:
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    if channels == 3:
        return rgb
    f = rgb.astype(np.float32)  # TF's tensordot summed r, g, b in this order, in float32 (bit-identical)
    luma = f[..., 0] * _LUMA[0] + f[..., 1] * _LUMA[1] + f[..., 2] * _LUMA[2]
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


@functools.lru_cache(maxsize=64)
def _spans(output_size: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TF's ComputeSpansCore for the triangle kernel (radius 1), antialiased, no translation: per output pixel
    the first input pixel (int [out]) and the normalised weights (float32 [out, span]), zero past the span."""
    scale = np.float32(output_size) / np.float32(input_size)
    inv_scale = np.float32(1.0 / float(scale))
    kernel_scale = max(inv_scale, np.float32(1.0))
    span_size = min(2 * math.ceil(float(kernel_scale)) + 1, input_size)
    one_over_kernel_scale = np.float32(1.0) / kernel_scale
    starts = np.zeros(output_size, np.int64)
    weights = np.zeros((output_size, span_size), np.float32)
    half = np.float32(0.5)
    for x in range(output_size):
        sample = (np.float32(x) + half) * inv_scale
        if sample < 0 or sample > input_size:
            continue
        start = min(max(math.ceil(sample - kernel_scale - half), 0), input_size - 1)
        end = min(max(math.floor(sample + kernel_scale - half), 0), input_size - 1) + 1
        w = []
        total = np.float32(0.0)
        for source in range(start, end):
            pos = abs((np.float32(source) + half - sample) * one_over_kernel_scale)
            weight = np.float32(1.0) - pos if pos < 1 else np.float32(0.0)
            total = np.float32(total + weight)
            w.append(weight)
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            weights[x, : len(w)] = np.array(w, np.float32) * (np.float32(1.0) / total)
        starts[x] = start
    return starts, weights


def _gather(image: np.ndarray, starts: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """sum_k weights[:, k] * image[starts + k] along axis, accumulated in float32 in k order (as TF's loop)."""
    n = image.shape[axis]
    image = image.astype(np.float32, copy=False)  # exact for uint8
    shape = [-1 if a == axis else 1 for a in range(image.ndim)]
    out = None
    for k in range(weights.shape[1]):
        term = weights[:, k].reshape(shape) * np.take(image, np.minimum(starts + k, n - 1), axis=axis)
        out = term if out is None else np.add(out, term, out=out)
    return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """float32 [size, size, c]: tf.image.resize(image, [size, size], "bilinear", antialias=True) of uint8 [h, w, c]."""
    rows = _gather(image, *_spans(size, image.shape[0]), axis=0)  # [size, w, c]
    return _gather(rows, *_spans(size, image.shape[1]), axis=1)


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, c] -> uint8 [size, size, c]: centre square, antialiased bilinear resize, rounded.
    An image already size x size is returned unchanged."""
    h, w = image.shape[:2]
    if h == w == size:
        return image
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = resize(image[top : top + s, left : left + s], size)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)

"""The FID Inception-V3 in Flax: the 2015-12-05 TensorFlow graph as torch-fidelity 0.4.0 ports it.

torch-fidelity's `FeatureExtractorInceptionV3` (after pytorch-fid) is torchvision's Inception-V3 with
the graph's quirks: average pools that do not count the padding, a max pool in the last block's
pooling branch, BatchNorm eps 1e-3, a 1008-way classifier, inputs resized to 299 with TensorFlow
1.x's bilinear (`resize_like_tf1`, not PyTorch's) and scaled by (x - 128) / 128. The parameter
names are torch-fidelity's state-dict names (inception_weights.py converts its .pth file).

Outputs (float32): "pool", the 2048-d average pool (torch-fidelity's '2048', used by FID, KID and
PRC); "logits_unbiased", pool @ W without the classifier's bias (torch-fidelity's
'logits_unbiased', what its Inception Score uses, as the original TF IS code did); "logits",
pool @ W + b (torch-fidelity's 'logits').

Every convolution and the classifier run at Precision.HIGHEST, so GPUs do not drop to TF32 and the
features match float32 PyTorch.

References:
  Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision".
  torch_fidelity/feature_extractor_inceptionv3.py and interpolate_compat_tensorflow.py (v0.4.0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax.errors import DataError

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_PER_DEVICE_BATCH = 64
OUTPUT_KEYS = ("pool", "logits_unbiased", "logits")


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU; NHWC."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = [(p, p) for p in self.padding]
        x = nn.Conv(self.features, self.kernel, self.strides, pad, use_bias=False, precision=HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _conv(features, kernel, name, strides=1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv(features, kernel, (strides, strides), padding, name=name)


def _avg_pool_same(x):
    # TF's 3x3/1 SAME average pool divides by the number of real (unpadded) pixels.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    """Mixed_5b..5d (35x35)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv(64, 1, "branch1x1")(x)
        b5 = _conv(64, 5, "branch5x5_2", padding=2)(_conv(48, 1, "branch5x5_1")(x))
        b3 = _conv(64, 1, "branch3x3dbl_1")(x)
        b3 = _conv(96, 3, "branch3x3dbl_3", padding=1)(_conv(96, 3, "branch3x3dbl_2", padding=1)(b3))
        bp = _conv(self.pool_features, 1, "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x):
        b3 = _conv(384, 3, "branch3x3", strides=2)(x)
        bd = _conv(96, 3, "branch3x3dbl_2", padding=1)(_conv(64, 1, "branch3x3dbl_1")(x))
        bd = _conv(96, 3, "branch3x3dbl_3", strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17) with factorized 7x7 convolutions."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row = lambda f, name: _conv(f, (1, 7), name, padding=(0, 3))  # noqa: E731
        col = lambda f, name: _conv(f, (7, 1), name, padding=(3, 0))  # noqa: E731
        b1 = _conv(192, 1, "branch1x1")(x)
        b7 = col(192, "branch7x7_3")(row(c7, "branch7x7_2")(_conv(c7, 1, "branch7x7_1")(x)))
        bd = row(c7, "branch7x7dbl_3")(col(c7, "branch7x7dbl_2")(_conv(c7, 1, "branch7x7dbl_1")(x)))
        bd = row(192, "branch7x7dbl_5")(col(c7, "branch7x7dbl_4")(bd))
        bp = _conv(192, 1, "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x):
        b3 = _conv(320, 3, "branch3x3_2", strides=2)(_conv(192, 1, "branch3x3_1")(x))
        b7 = _conv(192, 1, "branch7x7x3_1")(x)
        b7 = _conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
        b7 = _conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
        b7 = _conv(192, 3, "branch7x7x3_4", strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average-pool branch) and Mixed_7c (max-pool branch: the 2015 graph's quirk), 8x8."""

    pool: str  # "avg" or "max"

    @nn.compact
    def __call__(self, x):
        def split(y, name):  # 1x3 and 3x1 side by side
            a = _conv(384, (1, 3), f"{name}a", padding=(0, 1))(y)
            return jnp.concatenate([a, _conv(384, (3, 1), f"{name}b", padding=(1, 0))(y)], axis=-1)

        b1 = _conv(320, 1, "branch1x1")(x)
        b3 = split(_conv(384, 1, "branch3x3_1")(x), "branch3x3_2")
        bd = _conv(384, 3, "branch3x3dbl_2", padding=1)(_conv(448, 1, "branch3x3dbl_1")(x))
        bd = split(bd, "branch3x3dbl_3")
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        else:  # -inf padding, as PyTorch's max_pool2d(padding=1)
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        bp = _conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 1008-way layer: (pool @ W, pool @ W + b); torch-fidelity's 'logits_unbiased' and 'logits'."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
        bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        unbiased = jnp.dot(x, kernel, precision=HIGHEST)
        return unbiased, unbiased + bias


class InceptionV3(nn.Module):
    """The FID network on normalized [N, 299, 299, 3] inputs -> {"pool", "logits_unbiased", "logits"}."""

    @nn.compact
    def __call__(self, x):
        x = _conv(32, 3, "Conv2d_1a_3x3", strides=2)(x)  # [N, 149, 149, 32]
        x = _conv(32, 3, "Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
        x = _conv(64, 3, "Conv2d_2b_3x3", padding=1)(x)  # [N, 147, 147, 64]
        x = _max_pool_valid(x)  # [N, 73, 73, 64]
        x = _conv(80, 1, "Conv2d_3b_1x1")(x)  # [N, 73, 73, 80]
        x = _conv(192, 3, "Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
        x = _max_pool_valid(x)  # [N, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)  # [N, 35, 35, 256]
        x = InceptionA(64, name="Mixed_5c")(x)  # [N, 35, 35, 288]
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)  # [N, 17, 17, 768]
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)  # [N, 8, 8, 1280]
        x = InceptionE("avg", name="Mixed_7b")(x)  # [N, 8, 8, 2048]
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))  # [N, 2048]
        unbiased, logits = Classifier(name="fc")(pool)  # [N, 1008] each
        return {"pool": pool, "logits_unbiased": unbiased, "logits": logits}


def resize_like_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Bilinear resize of float NHWC images to [size, size] exactly as TensorFlow 1.x (align_corners=False).

    Source pixel of output i is i * (in / out) (no half-pixel shift), computed in float32; the
    neighbours are floor and floor + 1 (clamped to the edge), blended along x first, then along y:
    torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x(method="slow"), which is bit-exact
    with TF on CPU. PyTorch's and jax.image's bilinear (half-pixel centres) give other values.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images  # scale 1: every weight is 0, the result is the input exactly

    def axis_table(in_size):
        pos = np.arange(size, dtype=np.float32) * np.float32(in_size / size)  # float32 product, as the reference
        lo = pos.astype(np.int64)  # truncation == floor (pos >= 0)
        hi = np.minimum(lo + 1, in_size - 1)
        return lo, hi, (pos - lo.astype(np.float32)).astype(np.float32)

    ylo, yhi, dy = axis_table(h)
    xlo, xhi, dx = axis_table(w)
    rows_lo, rows_hi = jnp.take(images, ylo, axis=1), jnp.take(images, yhi, axis=1)
    dx = jnp.asarray(dx)[None, None, :, None]
    top = rows_lo[:, :, xlo] + (rows_lo[:, :, xhi] - rows_lo[:, :, xlo]) * dx
    bottom = rows_hi[:, :, xlo] + (rows_hi[:, :, xhi] - rows_hi[:, :, xlo]) * dx
    return top + (bottom - top) * jnp.asarray(dy)[None, :, None, None]


def _check_images(images) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if dtype != np.uint8 or shape is None or len(shape) != 4 or shape[-1] not in (1, 3):
        raise DataError(
            f"inception_features takes uint8 images [N, H, W, C] with C 1 or 3, got dtype {dtype} shape {shape}; "
            "convert samples in [-1, 1] with ddpm_jax.core.pixels.unscale_images first."
        )


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [N, H, W, 1 or 3] -> float32 [N, 299, 299, 3] in [-1, 1) as the network takes them."""
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grey -> RGB (resizing commutes with it)
    x = resize_like_tf1(x, INPUT_SIZE)
    return (x - 128.0) / 128.0  # the graph's (x - 128) * 0.0078125, bit-exact


_MODEL = InceptionV3()


def apply_network(params, x: jax.Array) -> dict[str, jax.Array]:
    """The network on preprocessed inputs [N, 299, 299, 3]; params as load_inception_params returns them."""
    return _MODEL.apply(params, x)


def init_shapes():
    """The variables' shapes and dtypes ({"params", "batch_stats"}), without computing anything."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(_MODEL.init, jax.random.key(0), x)


@functools.cache
def _compiled(devices: tuple) -> tuple:
    """(replicated sharding, batch sharding, jitted preprocess, jitted network) for these devices."""
    mesh = Mesh(np.array(devices), ("batch",))
    replicated, batch = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
    p_preprocess = jax.jit(preprocess, out_shardings=batch)  # compiled per input shape (cheap)
    p_network = jax.jit(apply_network, out_shardings=batch)  # compiled per batch size only
    return replicated, batch, p_preprocess, p_network


def stream_features(
    params,
    batches: Iterable[np.ndarray],
    per_device_batch: int = DEFAULT_PER_DEVICE_BATCH,
    devices=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Features of a stream of uint8 image batches, on every local device.

    The images are regrouped into fixed global batches of per_device_batch * len(devices) (one
    compile), split over the devices; the last is padded and trimmed. While one batch runs, the
    previous batch's features come back to the host.

    Args:
      params: load_inception_params(...)'s variables (placed on the devices once here).
      batches: uint8 arrays [n_i, H, W, C], C 1 or 3, all of one H, W, C; any n_i.
      per_device_batch: images per device per step.
      devices: default jax.local_devices().

    Yields:
      {"pool": [m, 2048], "logits_unbiased": [m, 1008], "logits": [m, 1008]} float32 numpy, in input
      order; m is the global batch except for the last.
    """
    devices = tuple(jax.local_devices() if devices is None else devices)
    replicated, batch_sharding, p_preprocess, p_network = _compiled(devices)
    params = jax.device_put(params, replicated)
    global_batch = per_device_batch * len(devices)
    pending = None  # (device features, number of real rows)
    for chunk in _regroup(batches, global_batch):
        n = chunk.shape[0]
        if n < global_batch:
            chunk = np.concatenate([chunk, np.zeros((global_batch - n, *chunk.shape[1:]), np.uint8)])
        out = p_network(params, p_preprocess(jax.device_put(chunk, batch_sharding)))
        if pending is not None:
            yield _to_host(*pending)
        pending = (out, n)
    if pending is not None:
        yield _to_host(*pending)


def _regroup(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cuts a stream of arrays into arrays of `size` rows (the last may be shorter)."""
    buffer, held = [], 0
    for b in batches:
        b = np.asarray(b)
        _check_images(b)
        buffer.append(b)
        held += b.shape[0]
        while held >= size:
            joined = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            yield joined[:size]
            buffer, held = [joined[size:]], held - size
    if held:
        yield np.concatenate(buffer) if len(buffer) > 1 else buffer[0]


def _to_host(out: dict, n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(out[k])[:n] for k in OUTPUT_KEYS}


def inception_features(params, images, per_device_batch: int | None = None) -> dict[str, np.ndarray]:
    """FID Inception features of uint8 NHWC images of any size, 1 or 3 channels, on all local devices.

    Args:
      params: load_inception_params(path).
      images: uint8 [N, H, W, C], C 1 (grey, repeated to RGB) or 3.
      per_device_batch: default min(64, ceil(N / devices)).

    Returns:
      float32 numpy {"pool": [N, 2048], "logits": [N, 1008], "logits_unbiased": [N, 1008]}; see the
      module docstring for which metric reads which.
    """
    _check_images(images)
    images = np.asarray(images)
    n_dev = jax.local_device_count()
    if per_device_batch is None:
        per_device_batch = max(1, min(DEFAULT_PER_DEVICE_BATCH, math.ceil(images.shape[0] / n_dev)))
    parts = list(stream_features(params, [images], per_device_batch))
    if not parts:
        return {k: np.zeros((0, POOL_DIM if k == "pool" else NUM_CLASSES), np.float32) for k in OUTPUT_KEYS}
    return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_KEYS}

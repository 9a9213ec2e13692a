"""Building blocks of the DDPM UNet: timestep embedding, ResNet block, self-attention, resampling.

All blocks take NHWC activations. Parameters are float32; the matmuls and convolutions run in
`dtype` (e.g. bfloat16). GroupNorm's statistics and the attention softmax are float32 for
stability; GroupNorm returns `dtype`, so a norm -> swish -> conv chain moves no float32 activations
(improved-diffusion's GroupNorm32 does the same).

References:
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models (2020), appendix B; the layers follow
  the authors' TF code (diffusion_utils/nn.py, models/unet.py) as ported in score_sde models/ddpm.py.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the compute dtypes a config may name

Dtype = Any
GROUPNORM_EPS = 1e-6  # the TF reference's GroupNorm epsilon


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """The reference's initializer: variance scaling, fan_avg, uniform; scale 0 means zeros.

    The TF code uses scale 1e-10 for "zero" layers; exact zeros behave the same and are clearer.
    """
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def get_timestep_embedding(t: chex.Array, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer.

    Args:
      t: [B] int or float timesteps.
      dim: embedding size; odd sizes are zero-padded by one column.
      max_period: the longest wavelength, in timesteps.

    Returns:
      [B, dim] float32 embedding: sin in the first half, cos in the second (the reference's order).
    """
    chex.assert_rank(t, 1)
    half = dim // 2
    if half < 2:
        raise ValueError(f"the timestep embedding needs dim >= 4, got {dim}.")
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm_swish(
    x: chex.Array, scale: chex.Array, bias: chex.Array, num_groups: int, swish: bool, eps: float = GROUPNORM_EPS
) -> jnp.ndarray:
    """GroupNorm (Wu & He 2018) of NHWC `x`, optionally followed by swish, as one affine map per
    (example, channel): y = x * a + b with a = scale / sqrt(var + eps), b = bias - mean * a.

    The statistics (mean and E[x^2] of each example's group, in float32, var = E[x^2] - mean^2 clamped
    at 0, as flax's fast variance) are one reduction over x; the normalisation, affine map and swish are
    one elementwise pass that XLA fuses. Normalising first and then scaling (flax's nn.GroupNorm) costs
    XLA:CPU more passes, above all in the backward: this form ran 1.7-2.6x faster fwd+bwd at the
    cifar10 UNet's shapes (bench/RESULTS.md, "GroupNorm + swish").

    Args:
      x: [B, ..., C] activations, any float dtype.
      scale, bias: [C] float32.
      num_groups: divides C.
      swish: apply x * sigmoid(x) to the normalised output.

    Returns:
      float32, the shape of x.
    """
    b, c = x.shape[0], x.shape[-1]
    groups = x.astype(jnp.float32).reshape(b, -1, num_groups, c // num_groups)  # [B, HW, G, C/G]
    mean = jnp.mean(groups, axis=(1, 3), keepdims=True)  # [B, 1, G, 1]
    var = jnp.maximum(jnp.mean(jnp.square(groups), axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
    a = scale.reshape(1, 1, num_groups, -1) * jax.lax.rsqrt(var + eps)  # [B, 1, G, C/G]
    y = (groups * a + (bias.reshape(1, 1, num_groups, -1) - mean * a)).reshape(x.shape)
    return y * jax.nn.sigmoid(y) if swish else y


class GroupNorm(nn.Module):
    """GroupNorm with float32 statistics, scale and shift, returning `dtype`; `swish=True` at the call
    applies swish in the same fused pass (`group_norm_swish`).

    Its parameters are flax's nn.GroupNorm's ('scale' ones, 'bias' zeros, [C] float32), so checkpoints
    of either read into the other. Only the output is cast to `dtype`, which halves the bytes of every
    norm -> swish -> conv chain in bfloat16.
    """

    num_groups: int
    dtype: Dtype = jnp.float32
    epsilon: float = GROUPNORM_EPS

    @nn.compact
    def __call__(self, x: chex.Array, swish: bool = False) -> jnp.ndarray:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}.")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm_swish(x, scale, bias, self.num_groups, swish, self.epsilon).astype(self.dtype)


def group_norm(num_groups: int, dtype: Dtype, name: str | None = None) -> GroupNorm:
    """GroupNorm with the reference's epsilon, float32 statistics, returning `dtype`."""
    return GroupNorm(num_groups=num_groups, dtype=dtype, name=name)


def conv3x3(features: int, dtype: Dtype, stride: int = 1, init_scale: float = 1.0, name: str | None = None) -> nn.Conv:
    """3x3 'SAME' convolution; stride 2 pads (0, 1) per spatial axis, like TF's SAME."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def dense(features: int, dtype: Dtype, init_scale: float = 1.0, name: str | None = None) -> nn.Dense:
    """Dense over the last axis; on NHWC input this is the reference's 1x1 'NIN' layer."""
    return nn.Dense(
        features,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv, + projected time embedding, GroupNorm-swish-dropout-conv, residual.

    Attributes:
      out_ch: output channels; a 1x1 (NIN) projection maps the skip when they differ from the input.
      dropout: dropout rate before the second conv (uses the 'dropout' rng when train=True).
      num_groups: GroupNorm groups.
      dtype: compute dtype of the convs and dense layers.
    """

    out_ch: int
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: chex.Array, temb: chex.Array, train: bool) -> jnp.ndarray:
        """x [B, H, W, C_in], temb [B, E] -> [B, H, W, out_ch] in `dtype`."""
        h = group_norm(self.num_groups, self.dtype, "norm1")(x, swish=True)
        h = conv3x3(self.out_ch, self.dtype, name="conv1")(h)
        # A per-channel bias from the time embedding; the reference applies swish to temb first.
        h = h + dense(self.out_ch, self.dtype, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = group_norm(self.num_groups, self.dtype, "norm2")(h, swish=True)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        # Zero-init: the block starts as the identity (or the NIN projection).
        h = conv3x3(self.out_ch, self.dtype, init_scale=0.0, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = dense(self.out_ch, self.dtype, name="nin_skip")(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: x + proj(softmax(q k^T / sqrt(C)) v).

    Attributes:
      num_groups: GroupNorm groups.
      dtype: compute dtype of the projections and the einsums (the softmax is float32).
    """

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: chex.Array) -> jnp.ndarray:
        """x [B, H, W, C] -> [B, H, W, C] in `dtype`."""
        b, hgt, wid, c = x.shape
        h = group_norm(self.num_groups, self.dtype, "norm")(x).reshape(b, hgt * wid, c)  # [B, HW, C]
        # One fused 1x1 projection; same parameter count as the reference's three NIN layers.
        q, k, v = jnp.split(dense(3 * c, self.dtype, name="qkv")(h), 3, axis=-1)  # 3 x [B, HW, C]
        logits = jnp.einsum("bqc,bkc->bqk", q * (c**-0.5), k)  # [B, HW, HW]
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v)  # [B, HW, C]
        h = dense(c, self.dtype, init_scale=0.0, name="proj_out")(h)
        return x.astype(self.dtype) + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv (the paper's resamp_with_conv=True)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: chex.Array) -> jnp.ndarray:
        """x [B, H, W, C] -> [B, H/2, W/2, C]."""
        return conv3x3(x.shape[-1], self.dtype, stride=2, name="conv")(x)


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: chex.Array) -> jnp.ndarray:
        """x [B, H, W, C] -> [B, 2H, 2W, C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2, exact and cheap
        return conv3x3(x.shape[-1], self.dtype, name="conv")(x)

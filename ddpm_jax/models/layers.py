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


def group_norm(num_groups: int, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with float32 statistics, scale and shift, returning `dtype`.

    flax reduces in float32 whatever the input (`force_float32_reductions`); only the output is
    cast, which halves the bytes of every norm -> swish in bfloat16. XLA fuses a residual add before
    it, the normalisation, the affine map and a swish after it into one pass that writes the output;
    the group statistics are two small reductions (tests/test_group_norm.py checks the compiled HLO).
    A hand-folded form (y = x * a + b with per-(example, channel) a, b) ran fwd+bwd up to 2.75x
    faster alone at cifar10's shapes but lost 3% in the digits step (bench/RESULTS.md, issue 24).
    """
    return nn.GroupNorm(num_groups=num_groups, epsilon=GROUPNORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


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
        h = nn.swish(group_norm(self.num_groups, self.dtype, "norm1")(x))
        h = conv3x3(self.out_ch, self.dtype, name="conv1")(h)
        # A per-channel bias from the time embedding; the reference applies swish to temb first.
        h = h + dense(self.out_ch, self.dtype, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(group_norm(self.num_groups, self.dtype, "norm2")(h))
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

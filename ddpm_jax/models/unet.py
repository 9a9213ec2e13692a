"""The DDPM UNet (Ho et al. 2020, appendix B) and a config-checked factory.

With the CIFAR-10 config (ch 128, ch_mult (1, 2, 2, 2), two res blocks, attention at 16x16) this is
the paper's 35.7M-parameter model.

References:
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models (2020), appendix B; the authors' TF
  diffusion repo models/unet.py; score_sde models/ddpm.py (Song et al. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ddpm_jax.models.layers import (
    DTYPES,
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    conv3x3,
    dense,
    get_timestep_embedding,
    group_norm,
)


class UNet(nn.Module):
    """Noise-prediction UNet: x_t [B, H, W, C] and t [B] -> [B, H, W, out_ch] (float32).

    Attributes:
      ch: base channel count; level i has ch * ch_mult[i] channels, the time embedding 4 * ch.
      ch_mult: channel multiplier per resolution level; len(ch_mult) - 1 downsamplings.
      num_res_blocks: ResNet blocks per level on the way down (one more per level on the way up).
      attn_resolutions: spatial sizes (e.g. (16,)) at which every ResNet block is followed by
        self-attention.
      dropout: dropout rate inside the ResNet blocks.
      out_ch: output channels (C, or 2C when the variance is learned).
      num_groups: GroupNorm groups; must divide ch.
      dtype: compute dtype (float32 or bfloat16); parameters and the output are always float32.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float
    out_ch: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    def _res(self, out_ch: int, name: str) -> ResnetBlock:
        return ResnetBlock(out_ch, self.dropout, self.num_groups, self.dtype, name=name)

    def _attn(self, name: str) -> AttnBlock:
        return AttnBlock(self.num_groups, self.dtype, name=name)

    @nn.compact
    def __call__(self, x: chex.Array, t: chex.Array, train: bool) -> jnp.ndarray:
        """Predicts from a noisy batch.

        Args:
          x: [B, H, W, C] float images; H and W divisible by 2 ** (len(ch_mult) - 1).
          t: [B] int or float timesteps.
          train: enables dropout (needs the 'dropout' rng when dropout > 0).

        Returns:
          [B, H, W, out_ch] float32.
        """
        chex.assert_rank(x, 4)
        chex.assert_rank(t, 1)
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNet input of size {x.shape[1]}x{x.shape[2]} is not divisible by {factor} = 2 ** (len(ch_mult) - 1)."
            )
        temb = self._time_embedding(t)
        hs = self._down(x, temb, train)
        h = hs[-1]
        h = self._res(h.shape[-1], "mid_block_0")(h, temb, train)
        h = self._attn("mid_attn")(h)
        h = self._res(h.shape[-1], "mid_block_1")(h, temb, train)
        h = self._up(h, hs, temb, train)
        h = nn.swish(group_norm(self.num_groups, jnp.float32, "norm_out")(h))
        # The last conv runs in float32 (it is cheap) and starts at zero, so the initial output is 0.
        return conv3x3(self.out_ch, jnp.float32, init_scale=0.0, name="conv_out")(h)

    def _time_embedding(self, t: chex.Array) -> jnp.ndarray:
        """[B] -> [B, 4ch]: sinusoids (dim ch) -> Dense -> swish -> Dense."""
        temb = get_timestep_embedding(t, self.ch)
        temb = dense(4 * self.ch, self.dtype, name="temb_dense_0")(temb)
        return dense(4 * self.ch, self.dtype, name="temb_dense_1")(nn.swish(temb))

    def _down(self, x: chex.Array, temb: chex.Array, train: bool) -> list[jnp.ndarray]:
        """The contracting path; returns every intermediate activation for the skips."""
        hs = [conv3x3(self.ch, self.dtype, name="conv_in")(x)]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = self._res(self.ch * mult, f"down_{i}_block_{j}")(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(f"down_{i}_attn_{j}")(h)
                hs.append(h)
            if i != len(self.ch_mult) - 1:
                hs.append(Downsample(self.dtype, name=f"down_{i}_downsample")(hs[-1]))
        return hs

    def _up(self, h: chex.Array, hs: list[jnp.ndarray], temb: chex.Array, train: bool) -> jnp.ndarray:
        """The expanding path; consumes `hs` (num_res_blocks + 1 skips per level) from the end."""
        hs = list(hs)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = self._res(self.ch * self.ch_mult[i], f"up_{i}_block_{j}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
        assert not hs, "every skip connection must be used"
        return h


def valid_attn_resolutions(image_size: int, num_levels: int) -> tuple[int, ...]:
    """The spatial sizes the UNet passes through: image_size / 2**i for i < num_levels."""
    return tuple(image_size // 2**i for i in range(num_levels))


def _check_model_config(model_config: ml_collections.ConfigDict, image_size: int) -> None:
    """Raises ValueError, naming the config field and the fix, for a config the UNet cannot build."""
    m = model_config
    num_levels = len(m.ch_mult)
    if num_levels < 1 or m.num_res_blocks < 1:
        raise ValueError(
            "config.model.ch_mult must be non-empty and config.model.num_res_blocks "
            f">= 1; got ch_mult={tuple(m.ch_mult)}, num_res_blocks={m.num_res_blocks}."
        )
    factor = 2 ** (num_levels - 1)
    if image_size % factor:
        raise ValueError(
            f"config.data.image_size={image_size} is not divisible by 2 ** (len(config.model.ch_mult)"
            f" - 1) = {factor} (config.model.ch_mult={tuple(m.ch_mult)} downsamples "
            f"{num_levels - 1} times). Use fewer levels in config.model.ch_mult or an image size "
            f"that is a multiple of {factor}."
        )
    valid = valid_attn_resolutions(image_size, num_levels)
    bad = [r for r in m.attn_resolutions if r not in valid]
    if bad:
        raise ValueError(
            f"config.model.attn_resolutions={tuple(m.attn_resolutions)} has {bad}, which the UNet never "
            f"reaches; with config.data.image_size={image_size} and config.model.ch_mult="
            f"{tuple(m.ch_mult)} the valid resolutions are {valid}."
        )
    if m.num_groups < 1 or m.ch % m.num_groups:
        raise ValueError(
            f"config.model.ch={m.ch} must be divisible by config.model.num_groups={m.num_groups} (GroupNorm groups)."
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"config.model.dropout={m.dropout} must lie in [0, 1).")
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r} must be one of {sorted(DTYPES)}.")


def create_model(model_config: ml_collections.ConfigDict, image_size: int, out_channels: int) -> UNet:
    """Builds the UNet from `config.model`, after checking it against the image size.

    Args:
      model_config: config.model (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
        num_groups, dtype).
      image_size: config.data.image_size (square images).
      out_channels: the caller's choice: C, or 2C for a learned variance.

    Returns:
      An unbound `UNet`.

    Raises:
      ValueError: naming the offending config field and how to fix it.
    """
    _check_model_config(model_config, image_size)
    m = model_config
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=float(m.dropout),
        out_ch=out_channels,
        num_groups=m.num_groups,
        dtype=DTYPES[m.dtype],
    )

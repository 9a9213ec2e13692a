"""Score networks. `create_model(config.model, image_size, out_channels)` builds the DDPM UNet."""

from ddpm_jax.models.unet import DTYPES, UNet, create_model, valid_attn_resolutions

__all__ = ["DTYPES", "UNet", "create_model", "valid_attn_resolutions"]

"""ddpm_jax: Denoising Diffusion Probabilistic Models in JAX/Flax."""

__version__ = "0.1.0"

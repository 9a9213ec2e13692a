"""ddpm_jax: Denoising Diffusion Probabilistic Models in JAX/Flax.

`ddpm_jax.load_run(workdir, which="ema")` restores a trained run (see ddpm_jax.run); it is
imported on first use, so `import ddpm_jax` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("load_run", "Run"):
        from ddpm_jax import run

        return getattr(run, name)
    raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")

"""The method registry: `config.method` names one of these; the run layer sees only `Method`."""

from __future__ import annotations

import ml_collections

from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Method
from ddpm_jax.methods.ddpm import DDPM
from ddpm_jax.methods.hvae import HVAE
from ddpm_jax.methods.vae import VAE
from ddpm_jax.methods.vdm import VDM

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (DDPM, VAE, VDM, HVAE)}
# Every method's sampler names, read off their `samplers` mappings (the methods' order, then each mapping's).
SAMPLERS = tuple(dict.fromkeys(s for cls in REGISTRY.values() for s in cls.samplers))


def sampler_help() -> str:
    """The samplers of each method, for a --sampler flag's help: "ddpm: ancestral (all T steps ...), ..."."""
    describe = lambda name, entry: f"{name} ({entry.doc})" if entry.doc else name
    return "; ".join(
        f"{cls.name}: " + ", ".join(describe(n, e) for n, e in cls.samplers.items()) for cls in REGISTRY.values()
    )


def method_class(config: ml_collections.ConfigDict) -> type[Method]:
    name = config.get("method", "ddpm")
    if name not in REGISTRY:
        raise ConfigError(f"config.method: unknown {name!r}; valid: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def from_config(config: ml_collections.ConfigDict) -> Method:
    """The config's method, built once (its network included); validate the config first."""
    return method_class(config)(config)

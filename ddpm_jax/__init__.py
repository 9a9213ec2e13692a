"""ddpm_jax: Denoising Diffusion Probabilistic Models in JAX/Flax.

The folders are the layers of docs/architecture.md: core/ (pure math), models/, methods/,
training/, evaluation/, data/, commands/. `ddpm_jax.load_run(workdir, which="ema")` restores a
trained run (see ddpm_jax.run); it is imported on first use, so `import ddpm_jax` stays light.

The core's public modules keep their short names wherever they live: `from ddpm_jax import
schedules, diffusion, vdm` and `import ddpm_jax.diffusion` give the module in core/ (the same
module object, not a copy).
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Public short names -> the module that holds them (DESIGN.md's names; docs/architecture.md's layout).
ALIASES = {
    **{
        name: f"ddpm_jax.core.{name}"
        for name in (
            "baselines",
            "diffusion",
            "hvae",
            "likelihood",
            "quality",
            "sampling",
            "schedules",
            "timesteps",
            "vae",
            "vdm",
        )
    },
    "ode_eval": "ddpm_jax.evaluation.ode_eval",
    "fid": "ddpm_jax.evaluation.fid",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import ddpm_jax.<alias>` binds the target module under the alias name too."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        target = importlib.import_module(ALIASES[spec.name.rpartition(".")[2]])
        spec.loader_state = target.__spec__
        return target

    def exec_module(self, module):
        # The target ran when it was imported; the import system has just set the alias's spec on it:
        # give it back its own, so that it keeps its name for reload and pickling.
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())  # before an editable install's finder, which knows the old files


def __getattr__(name):
    if name in ("load_run", "Run"):
        from ddpm_jax import run

        return getattr(run, name)
    if name in ALIASES:
        return importlib.import_module(ALIASES[name])
    raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")

"""`ddpm-sample` (and `python sample.py`): draws samples from a trained run.

    ddpm-sample --workdir=runs/default [--num=64] [--strip] [--sampler=ddim --steps=50 --eta=0]

Samplers: `--sampler=ancestral` (all T steps), `--sampler=respaced --steps=100`, `--sampler=ddim --steps=50 --eta=0`
(each method's are its `samplers` mapping, ddpm_jax.methods; --help lists them).
Writes an .npz and a PNG grid of the samples (EMA params of the latest checkpoint).
"""

from __future__ import annotations

from absl import flags

from ddpm_jax import methods
from ddpm_jax.commands import cli


def define_flags():
    """Defines sample's flags and returns its main."""
    workdir = flags.DEFINE_string("workdir", "runs/default", "A workdir that train.py wrote.")
    num = flags.DEFINE_integer("num", 64, "How many samples, a whole number >= 1.", lower_bound=1)
    seed = flags.DEFINE_integer("seed", 0, "Sampling seed.")
    out = flags.DEFINE_string(
        "out",
        None,
        "Where the grid goes: a .png path, a bare name (.png is added) or a folder; "
        "the .npz goes beside it. Default <workdir>/sample_seed<seed>.png.",
    )
    strip = flags.DEFINE_bool(
        "strip", False, "Also write a denoising strip (x_T to x_0; a chain's samplers only, not ddim)."
    )
    sampler = flags.DEFINE_enum(
        "sampler",
        None,
        list(methods.SAMPLERS),
        f"Default: the method's first. {methods.sampler_help()}.",
    )
    steps = flags.DEFINE_integer("steps", None, "Sampling steps K <= T for respaced and ddim.", lower_bound=1)
    eta = flags.DEFINE_float("eta", 0.0, "DDIM eta in [0, 1]: 0 deterministic, 1 ancestral-like.")

    def main(argv):
        from ddpm_jax.evaluation.sample_lib import sample_from_workdir

        paths = sample_from_workdir(
            workdir.value, num.value, seed.value, out.value, strip.value, sampler.value, steps.value, eta.value
        )
        for path in paths:
            print(f"wrote {path}")

    return main


def cli_main() -> None:
    cli.run(define_flags())


if __name__ == "__main__":
    cli_main()

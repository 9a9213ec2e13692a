"""Draws samples from a trained run: `python sample.py --workdir=runs/default [--num=64] [--strip]`
(installed: `ddpm-sample`).

Samplers: `--sampler=ancestral` (all T steps), `--sampler=respaced --steps=100`, `--sampler=ddim --steps=50 --eta=0`.
Writes an .npz and a PNG grid of the samples (EMA params of the latest checkpoint).
"""

from ddpm_jax.commands import cli, sample

main = sample.define_flags()

if __name__ == "__main__":
    cli.run(main)

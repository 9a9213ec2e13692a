"""Trains a model: `python train.py [--config=vdm] [--workdir=runs/default]` (installed: `ddpm-train`).

--config takes a shipped config by name (`cifar10`, `vdm:runlocal`, `cifar10:h200`) or a .py file
(`configs/vdm.py:runlocal`); any field can be overridden, e.g. `--config.training.num_train_steps=500`.
Re-running the same command resumes from the latest checkpoint in --workdir. Multi-host flags and
the rest: ddpm_jax/commands/train.py.
"""

from ddpm_jax.commands import cli, train

_DEFAULT_CONFIG = train.DEFAULT_CONFIG
main = train.define_flags()

if __name__ == "__main__":
    cli.run(main, config_default=_DEFAULT_CONFIG)

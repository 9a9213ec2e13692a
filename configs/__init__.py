"""The shipped configs, installed as the package ddpm_jax.configs (the repo keeps them here, in
configs/). Choose one by its file name, `--config=cifar10` or `--config=vdm:runlocal`, or by path,
`--config=configs/vdm.py:runlocal`. Each file defines `get_config(arg)` and the `VARIANTS` (args) it
accepts, and imports the others relatively (`from . import ddpm`), so it works in both places."""

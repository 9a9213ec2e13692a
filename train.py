"""Trains a DDPM: `python train.py [--config=configs/default.py] [--workdir=runs/default]`.

Any config field can be overridden, e.g. `--config.training.num_train_steps=500`.
Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
                                          "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and samples go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from ddpm_jax import data, loop
    from ddpm_jax.checkpoint import CheckpointError

    data.hide_gpus_from_tf()
    try:
        results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    app.run(main)

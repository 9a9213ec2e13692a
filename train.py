"""Trains a model: `python train.py [--config=configs/vdm.py] [--workdir=runs/default]`.

Any config field can be overridden, e.g. `--config.training.num_train_steps=500`.
Re-running the same command resumes from the latest checkpoint in --workdir; SIGTERM / Ctrl-C
save a checkpoint first. Several hosts: start one process per host with --coordinator_address,
--num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID environment variables, or --distributed on a cluster JAX detects).
"""

import os
import shlex
import sys

from absl import flags

from ddpm_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "vdm.py")
_CONFIG = cli.define_config_flag(_DEFAULT_CONFIG, "Training config file (configs/*.py), optionally with :runlocal.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and samples go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.", lower_bound=0)
_AUTO = flags.DEFINE_bool("distributed", False, "Start jax.distributed with the cluster JAX detects (SLURM, ...).")


def _is_process_0() -> bool:
    """Whether this process is known, before JAX loads, to be process 0: the one that takes the workdir lock."""
    process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else os.environ.get("JAX_PROCESS_ID", "")
    return str(process_id).strip() == "0" or (process_id == "" and not _AUTO.value)


def main(argv):
    from ddpm_jax import workdir_lock

    if _is_process_0():  # a live run in --workdir: refuse now, not after JAX and TensorFlow have loaded
        workdir_lock.check(_WORKDIR.value)
    from ddpm_jax import distributed

    # before anything touches a device
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_AUTO.value)
    from ddpm_jax import data, loop

    data.hide_gpus_from_tf()
    try:
        results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except KeyboardInterrupt:
        sys.exit(
            f"error: interrupted twice; stopped without saving. The last complete checkpoint in "
            f"{_WORKDIR.value} is kept: run the same command again to resume from it."
        )
    if "stopped_at" in results:
        if distributed.is_main_process():
            print(f"To resume: {shlex.join([sys.executable] + sys.argv)}")
        return
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    cli.run(main, config_default=_DEFAULT_CONFIG)

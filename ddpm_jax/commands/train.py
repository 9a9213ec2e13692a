"""`ddpm-train` (and `python train.py`): trains a model.

    ddpm-train [--config=vdm] [--workdir=runs/default] [--config.training.num_train_steps=500]

--config takes a shipped config by name (`cifar10`, `vdm:runlocal`, `cifar10:h200`) or a .py file.
Re-running the same command resumes from the latest checkpoint in --workdir; SIGTERM / Ctrl-C save a
checkpoint first. Several hosts: one process per host with --coordinator_address, --num_processes and
--process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment
variables), or --distributed on a cluster JAX detects (SLURM, Cloud TPU pods).
"""

from __future__ import annotations

import os
import shlex
import sys
import threading

from absl import flags

from ddpm_jax.commands import cli, logs

DEFAULT_CONFIG = "vdm"


def define_flags():
    """Defines train's flags (--config first, whose overrides are checked now) and returns its main."""
    config_flag = cli.define_config_flag(DEFAULT_CONFIG)
    workdir_flag = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and samples go.")
    coordinator = flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0.")
    num_processes = flags.DEFINE_integer(
        "num_processes", None, "Multi-process runs: how many processes.", lower_bound=1
    )
    process_id = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.", lower_bound=0)
    auto = flags.DEFINE_bool("distributed", False, "Start jax.distributed with the cluster JAX detects (SLURM, ...).")

    def is_process_0() -> bool:
        """Whether this process is known, before JAX loads, to be process 0: the one that takes the workdir lock."""
        pid = process_id.value if process_id.value is not None else os.environ.get("JAX_PROCESS_ID", "")
        return str(pid).strip() == "0" or (pid == "" and not auto.value)

    def main(argv):
        from ddpm_jax.training import workdir_lock

        workdir = workdir_flag.value
        if is_process_0():  # a live run in --workdir: refuse now, not after JAX and TensorFlow have loaded
            workdir_lock.check(workdir)
        from ddpm_jax.training import distributed

        # before anything touches a device
        multi = distributed.initialize(coordinator.value, num_processes.value, process_id.value, auto=auto.value)
        import jax

        from ddpm_jax.training import loop, progress

        if not progress.is_terminal():  # a file: tfds's dataset-preparation bars would write \r frames
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
        process = jax.process_index() if multi else 0  # (single process: no backend started here)
        logs.to_workdir(workdir, process)  # the libraries' log lines, to <workdir>/log.txt once it exists
        # Another process of the job that dies: one line and a prompt exit (_exit_for_lost_peer), whether a
        # collective with it fails here (peer_lost) or hangs (the watch notices that its beats stopped).
        watch = distributed.PeerWatch(lambda who: _exit_for_lost_peer(workdir, who)) if multi else None
        finished = False
        try:
            results = loop.train_and_evaluate(config_flag.value, workdir)
            finished = True
        except KeyboardInterrupt:
            sys.exit(
                f"error: interrupted twice; stopped without saving. The last complete checkpoint in "
                f"{workdir} is kept: run the same command again to resume from it."
            )
        except Exception as e:  # noqa: BLE001 - a collective that lost a peer, or anything else (raised again)
            if distributed.peer_lost(e):
                _exit_for_lost_peer(workdir, distributed.lost_peer_name())
            raise
        finally:
            if watch is not None:
                watch.stop(clean=finished)
        if "stopped_at" in results:
            if distributed.is_main_process():
                print(f"To resume: {shlex.join([sys.executable] + sys.argv)}")
            return
        for key, value in results.items():  # every process: their params_sha256 must agree
            print(f"{key}: {value}")

    return main


_exiting = threading.Lock()


def _exit_for_lost_peer(workdir: str, who: str) -> None:
    """One line for a run whose peer process `who` died, then an immediate exit (status 1): the normal
    exit would wait at jax.distributed's shutdown barrier for the dead process until the coordination
    service's heartbeat timeout (100 s) and then abort with a C++ stack dump. Called from the main
    thread or the PeerWatch's; the second caller waits for the first one's exit."""
    if not _exiting.acquire(blocking=False):
        threading.Event().wait()
    from ddpm_jax.training import checkpoint

    steps = checkpoint.complete_steps(workdir)
    where = checkpoint.checkpoint_dir(workdir)
    kept = f"the last complete checkpoint is step {steps[-1]} in {where}" if steps else f"no checkpoint in {where} yet"
    print(f"error: {who} of this job stopped; {kept}: restart the whole job to resume.", file=sys.stderr)
    logs.stop()  # <workdir>/log.txt closed (a remote one copied)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def cli_main() -> None:
    cli.run(define_flags(), config_default=DEFAULT_CONFIG)


if __name__ == "__main__":
    cli_main()

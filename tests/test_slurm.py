"""The README's SLURM recipe on one machine: two processes that know only what srun would tell them
(SLURM_* variables) start jax.distributed as `train.py --distributed` does, through JAX's own cluster
detection: the coordinator is the first host of SLURM_STEP_NODELIST, on a port derived from
SLURM_JOB_ID; the process count and ids are SLURM_NTASKS and SLURM_PROCID."""

import os
import random
import socket
import subprocess
import sys

import pytest

from helpers import fault_utils as fu

pytestmark = pytest.mark.slow  # two train.py processes

JAX_SLURM_PORT_BASE = 65535 - 2**12 + 1  # jax._src.clusters.slurm_cluster: port = SLURM_JOB_ID % 4096 + this


def _job_id_with_a_free_port() -> int:
    """A SLURM_JOB_ID whose port (as JAX derives it) is free here."""
    for _ in range(50):
        job_id = random.randrange(10_000, 10_000_000)
        with socket.socket() as s:
            try:
                s.bind(("localhost", job_id % 2**12 + JAX_SLURM_PORT_BASE))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in JAX's SLURM range")


# What train.py --distributed does before training (ddpm_jax.commands.train: distributed.initialize with
# auto=True and no address, count or id), then one cross-process sum over every device.
_TASK = """
import logging; logging.basicConfig(level=logging.INFO)  # jax.distributed's lines, as train.py's absl logging shows them
import jax, jax.numpy as jnp
from ddpm_jax.training import distributed
assert distributed.initialize(auto=True)
total = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")(jnp.full((jax.local_device_count(),), jax.process_index() + 1.0))
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count(), "sum", float(total[0]))
"""


def test_two_slurm_tasks_join_through_jax_cluster_detection(tmp_path, tmp_path_factory):
    """Two tasks as srun starts them (SLURM_* only, no JAX_* variables, no flags) join one run: the
    coordinator and the ids come from JAX's SLURM detection. Training itself is the same code as
    tests/test_distributed.py's two-process run (measured here with train.py --distributed and the
    runlocal config, 2 steps: 140 s of CPU, too slow for the suite)."""
    env = dict(os.environ)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT"):
        env.pop(name, None)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    job_id = _job_id_with_a_free_port()
    port = job_id % 2**12 + JAX_SLURM_PORT_BASE
    procs, logs = [], []
    for task in range(2):  # what `srun --ntasks=2` sets for each task (one node, here)
        task_env = dict(env)
        task_env.update(
            {
                "SLURM_JOB_ID": str(job_id),
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(task),
                "SLURM_LOCALID": str(task),
                "SLURM_STEP_NODELIST": "localhost",
                "SLURM_STEP_NUM_NODES": "1",
            }
        )
        logs.append(str(tmp_path / f"task{task}.txt"))
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _TASK], cwd=fu.ROOT, env=task_env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(path).read() for path in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    for task, text in enumerate(texts):
        assert f"process {task} of 2 devices 4 sum 6.0" in text, text[-2000:]  # 2 x (1 + 2): both joined
        assert f"Connecting to JAX distributed service on localhost:{port}" in text
        # JAX's default under SLURM: task i sees only GPU SLURM_LOCALID (one task per GPU); the README's
        # one-task-per-node recipe sets JAX_LOCAL_DEVICE_IDS to keep all of a node's GPUs.
        assert f"JAX distributed initialized with visible devices: {task}" in text
    assert "Starting JAX distributed service" in texts[0] and "Starting JAX distributed service" not in texts[1]

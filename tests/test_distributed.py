"""Many hosts on one machine: 2 train.py processes x 2 forced CPU devices, jax.distributed + gloo.

The run is pre-empted on process 1 only (SIGTERM): both processes must stop at the same step and
save, then both resume. At the end both hold bit-identical parameters (train.py prints a digest
per process), equal to one process with 4 devices fed the same global batches (process 0's shard
then process 1's). Only process 0 writes logs and pictures; the checkpoint is written the Orbax
multi-process way (every process takes part, process 0 writes the replicated arrays).
"""

import json
import os
import re
import signal
import socket

import jax
import numpy as np
import pytest

from ddpm_jax.data import pipeline, splits
from ddpm_jax.evaluation import report
from ddpm_jax.training import checkpoint, distributed, train_lib

from helpers import fault_utils as fu

pytestmark = pytest.mark.slow  # two train.py processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reference_params(config, data_dir, compiled, steps):
    """One process, 4 devices, the global batches of the 2-process run."""
    state = train_lib.create_train_state(
        compiled.method, train_lib.make_optimizer(config), jax.random.PRNGKey(config.seed)
    )
    rstate = distributed.replicate(state)
    streams = [
        pipeline.train_batches(
            splits.load_train(config, process_index=i, process_count=2),  # the training set: train less the holdout
            config.training.batch_size,
            config.seed,
            num_local_devices=2,
            process_count=2,
        )
        for i in range(2)
    ]
    for _ in range(steps):
        rstate, _ = compiled.p_train(rstate, np.concatenate([next(s) for s in streams]))  # [4, B/4, H, W, C]
    return distributed.unreplicate(rstate.params)


def _launch(workdir, env, logs, on_started=None):
    """Starts processes 0 and 1; returns their exit codes and outputs."""
    address = f"localhost:{_free_port()}"
    procs = []
    try:
        for i, log in enumerate(logs):
            procs.append(
                fu.start(
                    "train.py",
                    fu.micro_flags()
                    + [
                        f"--workdir={workdir}",
                        f"--coordinator_address={address}",
                        "--num_processes=2",
                        f"--process_id={i}",
                    ],
                    env,
                    log,
                )
            )
        if on_started:
            on_started(procs)
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(path).read() for path in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    return texts


def test_two_processes_preempted_resume_and_match_one_process(data_dir, steps_for, tmp_path, tmp_path_factory):
    assert jax.local_device_count() == 4
    env = fu.env(str(tmp_path_factory.getbasetemp()), data_dir, devices=2)
    workdir = str(tmp_path / "run")
    config = fu.micro_config(data_dir)
    steps, log_every = config.training.num_train_steps, config.training.log_every

    def preempt_process_1(procs):
        fu.wait_for(lambda: fu.logged_step(workdir) >= 2, procs[0], what="training progress")
        procs[1].send_signal(signal.SIGTERM)

    texts = _launch(workdir, env, [str(tmp_path / f"a{i}.txt") for i in range(2)], preempt_process_1)
    stopped = max(fu.committed_steps(workdir))
    assert 2 <= stopped < steps
    assert f"Got a signal to another process at step {stopped}: saved a checkpoint" in texts[0]
    assert "To resume: " in texts[0] and "To resume: " not in texts[1]

    texts = _launch(workdir, env, [str(tmp_path / f"b{i}.txt") for i in range(2)])
    assert f"Resuming from the checkpoint at step {stopped} " in texts[0]
    digests = [re.search(r"^params_sha256: (\w+)$", t, re.M).group(1) for t in texts]
    assert digests[0] == digests[1]  # both processes hold the same parameters, bit for bit

    mngr = checkpoint.make_manager(workdir, read_only=True)
    assert mngr.latest_step() == steps
    saved = mngr.restore(steps)["params"]
    assert report.params_digest(saved) == digests[0]  # the checkpoint holds what the processes held
    # The same compiled step as test_faults' in-process runs of the micro config.
    reference = _reference_params(config, data_dir, steps_for(config), steps)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), saved, reference)

    # Only process 0 wrote: one record per log step, and the pictures.
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == list(range(log_every, steps + 1, log_every))
    assert sum("val_loss" in r for r in records) == 1
    assert os.path.exists(os.path.join(workdir, "samples.png"))
    assert "samples_png" in texts[0] and "samples_png" not in texts[1]

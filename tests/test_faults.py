"""Nothing lost: kill -9 at any moment, a checkpoint write cut short, SIGTERM / SIGINT, NaN guard.

The kill test drives a real train.py subprocess through a chain of faults on one workdir and
checks, after each, that the next start resumes from the last complete checkpoint, and at the
end that the parameters are bitwise those of an uninterrupted run. A kill in the middle of a
checkpoint write (which only a race could catch in a subprocess) is faked in-process from a real
checkpoint; the other in-process tests share the micro config's compiled steps.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest

from ddpm_jax.data import pipeline
from ddpm_jax.errors import TrainingDiverged
from ddpm_jax.training import checkpoint, loop, train_lib

from helpers import fault_utils as fu

pytestmark = pytest.mark.slow  # every test here trains, in a subprocess or in-process

N = 24  # steps of the subprocess runs: enough for three interruptions with margin
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes <step><suffix>, renamed to <step> when complete


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, data_dir):
    """(the session's base temp dir, for the subprocesses' compilation cache; the tfds data_dir)."""
    return str(tmp_path_factory.getbasetemp()), data_dir


def _load_tree(workdir):
    mngr = checkpoint.make_manager(workdir, read_only=True)
    return mngr.latest_step(), mngr.restore(mngr.latest_step())


def _log(path):
    with open(path) as f:
        return f.read()


def test_kill_anywhere_and_signals_then_resume_exactly(dirs, tmp_path):
    base, data_dir = dirs
    env = fu.env(base, data_dir, devices=2)
    args = fu.micro_flags(
        **{
            "training.num_train_steps": N,
            "training.checkpoint_every": 2,
            "training.keep_checkpoints": 2,
            "training.log_every": 1,
        }
    )
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    # The uninterrupted run (it also fills the compilation cache). Checkpoint frequency changes
    # neither the training nor the compiled step: it saves only at the end.
    reference = fu.start(
        "train.py",
        args + [f"--workdir={straight}", "--config.training.checkpoint_every=1000"],
        env,
        str(tmp_path / "straight.txt"),
    )
    args = args + [f"--workdir={run}"]
    logs = iter(str(tmp_path / f"log{i}.txt") for i in range(20))

    # 1. kill -9 during start-up, before the first step (beside the reference run, which is compiling).
    proc = fu.start("train.py", args, env, log := next(logs))
    fu.wait_for(lambda: os.path.exists(os.path.join(run, "config.json")), proc, what="start-up")
    fu.kill(proc)
    assert fu.committed_steps(run) == []
    assert reference.wait(timeout=600) == 0, _log(str(tmp_path / "straight.txt"))[-3000:]

    # 2. kill -9 between steps, after some checkpoints were committed (the kill may land inside a
    # write; test_half_written_checkpoint_* covers that case deterministically).
    proc = fu.start("train.py", args, env, log := next(logs))
    fu.wait_for(lambda: fu.logged_step(run) >= 3 and fu.committed_steps(run), proc, what="a committed checkpoint")
    fu.kill(proc)
    expected = max(fu.committed_steps(run))

    # 3. SIGTERM (pre-emption): save at the current step, exit 0, say where and how to resume.
    # (SIGINT takes the same path; test_sigint_* below sends it in-process.)
    previous = fu.logged_step(run)
    proc = fu.start("train.py", args, env, log := next(logs))
    fu.wait_for(lambda: fu.logged_step(run) >= previous + 2, proc, what="training progress")
    assert fu.kill(proc, signal.SIGTERM) == 0, _log(log)[-3000:]
    text = _log(log)
    assert f"Resuming from the checkpoint at step {expected} " in text
    stopped = max(fu.committed_steps(run))
    assert f"Got SIGTERM at step {stopped}: saved a checkpoint in {os.path.join(run, 'checkpoints')}" in text
    assert "To resume: " in text and "train.py" in text
    assert stopped > previous
    expected = stopped

    # 4. to the end: the same parameters, bit for bit, as the uninterrupted run.
    done = fu.run("train.py", args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from the checkpoint at step {expected} " in done.stdout + done.stderr
    assert not fu.tmp_checkpoints(run)
    (step_a, a), (step_b, b) = _load_tree(straight), _load_tree(run)
    assert step_a == step_b == N
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    losses = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, N + 1))  # each step logged once, no torn lines


def _cut_short(workdir, step):
    """Turns the complete checkpoint of `step` into what a kill during its write leaves: Orbax's
    temporary folder (renamed to <step> only once complete) holding part of the array data and none
    of the metadata or commit markers, which are written after the pipeline."""
    where = os.path.join(workdir, "checkpoints")
    half = os.path.join(where, f"{step}{ORBAX_TMP_SUFFIX}")
    os.rename(os.path.join(where, str(step)), half)
    for root, _, files in os.walk(half):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith("_") or name in ("commit_success.txt", "manifest.ocdbt"):
                os.remove(path)
            else:
                os.truncate(path, os.path.getsize(path) // 2)
    return os.path.basename(half)


def test_half_written_checkpoint_is_skipped_and_removed(data_dir, steps_for, tmp_path, capsys):
    """A kill inside a checkpoint write: the next start resumes from the last complete checkpoint,
    deletes the half-written folder, and trains on to the parameters of an uninterrupted run."""
    config = fu.micro_config(data_dir)  # checkpoints every 2 steps
    steps = steps_for(config)
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    loop.train_and_evaluate(config, straight, stop_at_step=6, steps=steps)
    loop.train_and_evaluate(config, run, stop_at_step=4, steps=steps)
    assert fu.committed_steps(run) == [2, 4]
    half = _cut_short(run, 4)
    assert fu.committed_steps(run) == [2] and fu.tmp_checkpoints(run) == [half]
    capsys.readouterr()

    out = loop.train_and_evaluate(config, run, stop_at_step=6, steps=steps)
    assert out["stopped_at"] == 6
    assert f"Resuming from the checkpoint at step 2 in {os.path.join(run, 'checkpoints')}" in capsys.readouterr().out
    assert fu.tmp_checkpoints(run) == []  # the training manager deletes it when it starts
    assert fu.committed_steps(run) == [2, 4, 6]
    (step_a, a), (step_b, b) = _load_tree(straight), _load_tree(run)
    assert step_a == step_b == 6
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    losses = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]  # the records after step 2 were written again, once


def test_nonfinite_guard_stops_with_last_good_state(data_dir, steps_for, tmp_path, monkeypatch):
    config = fu.micro_config(data_dir)  # max_nonfinite_steps=3
    steps = steps_for(config)
    good_steps = 2
    real_batches = pipeline.train_batches

    def poisoned(images, *args, start_step=0, **kwargs):  # NaN images from step 3 on ("bad data")
        for step, batch in enumerate(real_batches(images, *args, start_step=start_step, **kwargs), start_step + 1):
            yield batch if step <= good_steps else np.full_like(batch, np.nan)

    monkeypatch.setattr(pipeline, "train_batches", poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(TrainingDiverged) as info:
        loop.train_and_evaluate(config, workdir, steps=steps)
    message = str(info.value)
    assert "training stopped at step 5: 3 steps in a row (steps 3 to 5)" in message
    assert "parameters are still those after step 2" in message
    assert "learning rate is too high (config.optim.lr=0.001" in message and "bad data" in message
    assert "low precision" in message and "max_nonfinite_steps" in message
    assert os.path.join(workdir, "checkpoints") in message

    monkeypatch.setattr(pipeline, "train_batches", real_batches)
    good = str(tmp_path / "good")
    assert loop.train_and_evaluate(config, good, stop_at_step=good_steps, steps=steps)["stopped_at"] == good_steps
    target = train_lib.abstract_train_state(steps.method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    stopped = checkpoint.restore_latest(checkpoint.make_manager(workdir), target)
    last_good = checkpoint.restore_latest(checkpoint.make_manager(good), target)
    assert int(stopped.step) == 5 and int(last_good.step) == good_steps
    # The skipped steps never reached the parameters, the EMA or Adam's moments.
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        (stopped.params, stopped.ema_params, stopped.opt_state),
        (last_good.params, last_good.ema_params, last_good.opt_state),
    )
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(stopped.params))


def _signalling_batches(real, at_step, times=1, sig=signal.SIGINT):
    """train_batches that send `sig` `times` times to this process while fetching step at_step's batch."""

    def batches(images, *args, start_step=0, **kwargs):
        for step, batch in enumerate(real(images, *args, start_step=start_step, **kwargs), start_step + 1):
            for _ in range(times if step == at_step else 0):
                os.kill(os.getpid(), sig)
            yield batch

    return batches


def test_sigint_saves_and_a_second_one_interrupts(data_dir, steps_for, tmp_path, monkeypatch, request):
    # Start from Python's own Ctrl-C handler whatever this process inherited (a job started in the
    # background with `&` ignores SIGINT), and give the inherited one back afterwards.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    config = fu.micro_config(data_dir)
    steps = steps_for(config)  # the compiled steps of the tests above
    real = pipeline.train_batches
    workdir = str(tmp_path / "int")
    monkeypatch.setattr(pipeline, "train_batches", _signalling_batches(real, 3))
    out = loop.train_and_evaluate(config, workdir, steps=steps)
    assert out == {"stopped_at": 3, "signal": "SIGINT", "checkpoint_dir": os.path.join(workdir, "checkpoints")}
    assert fu.committed_steps(workdir) == [2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back

    # Ctrl-C twice: the second one interrupts at once; the checkpoints already written stay.
    monkeypatch.setattr(pipeline, "train_batches", _signalling_batches(real, 6, times=2))
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, workdir, steps=steps)
    assert fu.committed_steps(workdir) == [2, 3, 4]  # none at 6: interrupted before that step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(pipeline, "train_batches", real)
    assert loop.train_and_evaluate(config, workdir, stop_at_step=6, steps=steps) == {
        "stopped_at": 6,
        "signal": "stop_at_step=6",
        "checkpoint_dir": os.path.join(workdir, "checkpoints"),
    }

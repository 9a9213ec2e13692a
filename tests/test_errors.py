"""Every bad input is answered with an error naming the problem and the fix, never a traceback.

One table of in-process cases (config values, data, checkpoints, workdirs, flags of the
multi-process start) and a few real command lines (train.py / sample.py), run concurrently
since each pays the imports.
"""

import glob
import os
import shutil
import subprocess
import sys

import jax
import pytest

import fault_utils as fu
from ddpm_jax import checkpoint, data, distributed, loop, sample_lib, train_lib
from ddpm_jax.validation import ConfigError, UserError, validate_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.getbasetemp() / "tfds_faults")
    data.load_images("digits", "train", path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A workdir with config.json and complete checkpoints at steps 2 and 4 of the micro config."""
    workdir = str(tmp_path_factory.mktemp("errors") / "run")
    config = fu.micro_config(data_dir)
    state = jax.device_get(train_lib.create_train_state(config, jax.random.PRNGKey(0)))
    mngr = checkpoint.make_manager(workdir)
    for step in (2, 4):
        checkpoint.save(mngr, state.replace(step=step))
    mngr.wait_until_finished()
    checkpoint.save_config(workdir, config)
    return workdir, config, state


def _config(data_dir, **overrides):
    return fu.micro_config(data_dir, **overrides)


# (name, overrides of the micro config, expected pieces of the message)
CONFIG_CASES = [
    ("T<1", {"diffusion.num_timesteps": 0}, ["config.diffusion.num_timesteps", "must be an integer >= 1", "got 0"]),
    ("lr=0", {"optim.lr": 0.0}, ["config.optim.lr", "must be > 0, got 0.0"]),
    ("lr<0", {"optim.lr": -1e-4}, ["config.optim.lr", "must be > 0, got -0.0001"]),
    ("ema=1", {"training.ema_decay": 1.0}, ["config.training.ema_decay", "must be in [0, 1), got 1.0"]),
    ("ema<0", {"training.ema_decay": -0.1}, ["config.training.ema_decay", "must be in [0, 1), got -0.1"]),
    ("channels", {"data.channels": 2}, ["config.data.channels", "must be 1 or 3, got 2"]),
    ("dropout=1", {"model.dropout": 1.0}, ["config.model.dropout", "must be in [0, 1), got 1.0"]),
    ("dropout<0", {"model.dropout": -0.5}, ["config.model.dropout", "got -0.5"]),
    ("batch vs devices", {"training.batch_size": 6},
     ["config.training.batch_size", "6 is not divisible by the 4 devices", "use a multiple of 4 (e.g. 4 or 8)"]),
    ("image vs down-sampling", {"data.image_size": 6, "model.ch_mult": (1, 2, 2)},
     ["config.data.image_size=6 is not divisible by 2 ** (len(config.model.ch_mult) - 1) = 4",
      "Use fewer levels in config.model.ch_mult"]),
    ("attention resolution", {"model.attn_resolutions": (16,), "model.ch_mult": (1, 2)},
     ["config.model.attn_resolutions=(16,)", "never reaches", "valid resolutions are (8, 4)"]),
    ("ch_mult type", {"model.ch_mult": ("(1,x)",)}, ["config.model.ch_mult", "tuple of positive integers"]),
    ("NaN limit", {"training.max_nonfinite_steps": 0},
     ["config.training.max_nonfinite_steps", "positive integer"]),
    ("schedule", {"diffusion.schedule": "cosin"}, ["config.diffusion.schedule", "unknown 'cosin'", "cosine"]),
    ("dtype", {"model.dtype": "float16"}, ["config.model.dtype='float16'", "bfloat16", "float32"]),
]


@pytest.mark.parametrize("name,overrides,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(data_dir, name, overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(_config(data_dir, **overrides))
    for piece in expected:
        assert piece in str(info.value), (name, str(info.value))


def _copy(workdir, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(workdir, out)
    return out


def _damage_data(workdir):
    for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "default", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:
            f.write(b"\0garbage" * 4)


def _damage_metadata(workdir):
    os.remove(os.path.join(workdir, "checkpoints", "4", "default", "_METADATA"))


def _empty_step(workdir):
    os.makedirs(os.path.join(workdir, "checkpoints", "6"))


# (name, how to break a copy of the trained workdir, expected pieces)
CHECKPOINT_CASES = [
    ("damaged data", _damage_data,
     ["checkpoints/4 is damaged or incomplete", "resume from the previous checkpoint (step 2)"]),
    ("missing metadata", _damage_metadata, ["checkpoints/4 is damaged or incomplete", "Delete that folder"]),
    ("empty step folder", _empty_step, ["checkpoints/6 is damaged or incomplete", "previous checkpoint (step 4)"]),
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio after a failed read
@pytest.mark.parametrize("name,damage,expected", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_damaged_checkpoints(trained, tmp_path, name, damage, expected):
    workdir, _, state = trained
    workdir = _copy(workdir, tmp_path)
    damage(workdir)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_latest(checkpoint.make_manager(workdir), state)
    for piece in expected:
        assert piece in str(info.value), (name, str(info.value))
    with pytest.raises(checkpoint.CheckpointError):  # sample.py reads through the same check
        sample_lib.restore_run(workdir)


def test_checkpoint_of_another_model_shape(trained, data_dir):
    workdir, _, _ = trained
    wider = train_lib.create_train_state(_config(data_dir, **{"model.ch": 16}), jax.random.PRNGKey(0))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_latest(checkpoint.make_manager(workdir), wider)
    message = str(info.value)
    assert "was made for another model or image size" in message and "checkpoint (8,) vs model (16,)" in message
    assert "new --workdir" in message


def test_workdir_of_another_image_size(trained, data_dir, tmp_path):
    workdir = _copy(trained[0], tmp_path)  # conv weights do not depend on the image size: config.json tells
    with pytest.raises(checkpoint.CheckpointError) as info:
        loop.train_and_evaluate(_config(data_dir, **{"data.image_size": 16}), workdir)
    message = str(info.value)
    assert "config.data.image_size=8 in the checkpoint, 16 now" in message
    assert "new --workdir" in message and "config.json" in message
    assert checkpoint.load_config(workdir).data.image_size == 8  # the run's config.json is left alone


def test_data_errors(data_dir, monkeypatch):
    with pytest.raises(ValueError, match="Unknown dataset 'digitz'.*'digits' is the offline one"):
        data.load_images("digitz", "train", data_dir)
    with pytest.raises(ValueError, match="Unknown split 'validation' for dataset 'digits'.*available splits"):
        data.load_images("digits", "validation", data_dir)
    # A dataset that is not here and cannot be downloaded (the real attempt retries for minutes
    # without a network, so it is cut short with download=False; the message is the same).
    real = data.load_images
    monkeypatch.setattr(data, "load_images", lambda *a, **k: real(*a, **k, download=False))
    with pytest.raises(loop.DataError, match="'mnist' is not prepared.*Prepare it on a machine with a network"):
        loop.load_split(_config(data_dir, **{"data.dataset": "mnist"}), "train")


def test_sample_errors(trained, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"no training run in .*config.json is missing"):
        sample_lib.restore_run(str(tmp_path / "nothing"))
    empty = str(tmp_path / "empty")
    checkpoint.save_config(empty, trained[1])
    os.makedirs(os.path.join(empty, "checkpoints"))
    with pytest.raises(checkpoint.CheckpointError, match=r"holds no checkpoint: train first \(python train.py"):
        sample_lib.restore_run(empty)
    for num in (-3, 0, 2.5, "7"):
        with pytest.raises(ValueError, match=r"--num must be a whole number >= 1"):
            sample_lib.sample_from_workdir(trained[0], num)


@pytest.mark.parametrize("kwargs,expected", [
    ({"coordinator_address": "localhost:1234"}, "--num_processes, --process_id not given"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "must be host:port"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2},
     "--process_id=2 must be in [0, 2)"),
])
def test_bad_multi_process_settings(kwargs, expected):
    with pytest.raises(distributed.DistributedError) as info:
        distributed.initialize(**kwargs)
    assert expected in str(info.value)


def test_command_lines(trained, data_dir, tmp_path, tmp_path_factory):
    """Real train.py / sample.py invocations: `error: ...`, a non-zero exit and no traceback.

    Only cases that fail before TensorFlow is imported (~10 s a process here); the others go
    through the same `error: ...` printing and are checked in-process above (test_train runs
    sample.py on an empty workdir).
    """
    env = fu.env(str(tmp_path_factory.getbasetemp()), data_dir, devices=1)
    workdir = str(tmp_path / "w")
    train = ["train.py", "--config=configs/default.py:runlocal", f"--workdir={workdir}"]
    cases = [
        (train + ["--config.training.batch_sise=8"],
         ["unknown config field config.training.batch_sise", "Did you mean config.training.batch_size?"]),
        (train + ["--config.trainin.lr=1"], ["unknown config field config.trainin", "Did you mean config.training?"]),
        (train + ["--config.training.batch_size=abc"],
         ["--config.training.batch_size=abc", "holds a value of type int (default 8)"]),
        (["train.py", "--config=configs/nope.py"], ["--config=configs/nope.py: no such file", "configs/"]),
        (train + ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=3"],
         ["--process_id=3 must be in [0, 2)"]),
        (["sample.py", "--num=-1", f"--workdir={trained[0]}"],
         ["--num=-1: -1 is not a positive integer", "How many"]),
    ]
    procs = [subprocess.Popen([sys.executable] + args, cwd=fu.ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, expected), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (args, out, err)
        assert "Traceback" not in err, (args, err)
        line = [l for l in err.splitlines() if l.startswith("error: ")]
        assert line, (args, err[-2000:])
        for piece in expected:
            assert piece in line[-1], (args, line[-1])


def test_every_error_is_a_user_error():
    for cls in (ConfigError, checkpoint.CheckpointError, loop.DataError, loop.TrainingDiverged):
        assert issubclass(cls, UserError)
    assert issubclass(distributed.DistributedError, ValueError)  # train.py prints both without a traceback

"""Every bad input is answered with an error naming the problem and the fix, never a traceback.

Tables of in-process cases (config values, data, checkpoints, workdirs, flags of the
multi-process start, train.py / sample.py command lines through cli.run) and one real train.py
process, for the `error: ...` line without a traceback.
"""

import contextlib
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import chex  # noqa: F401 - its absl flags exist before script_flags() takes its snapshot
import jax
import pytest
from absl import app, flags

from ddpm_jax import errors, methods
from ddpm_jax.commands import cli
from ddpm_jax.data import pipeline, splits
from ddpm_jax.errors import CheckpointError, ConfigError, DataError, UserError
from ddpm_jax.evaluation import sample_lib
from ddpm_jax.run import load_run
from ddpm_jax.training import checkpoint, distributed, loop, train_lib
from ddpm_jax.training.validation import validate_config

from helpers import fault_utils as fu


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A workdir with config.json and complete checkpoints at steps 2 and 4 of the micro config."""
    workdir = str(tmp_path_factory.mktemp("errors") / "run")
    config = fu.micro_config(data_dir)
    method = methods.from_config(config)
    state = jax.device_get(
        train_lib.create_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    )
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
    (
        "batch vs devices",
        {"training.batch_size": 6},
        ["config.training.batch_size", "6 is not divisible by the 4 devices", "use a multiple of 4 (e.g. 4 or 8)"],
    ),
    (
        "image vs down-sampling",
        {"data.image_size": 6, "model.ch_mult": (1, 2, 2)},
        [
            "config.data.image_size=6 is not divisible by 2 ** (len(config.model.ch_mult) - 1) = 4",
            "Use fewer levels in config.model.ch_mult",
        ],
    ),
    (
        "attention resolution",
        {"model.attn_resolutions": (16,), "model.ch_mult": (1, 2)},
        ["config.model.attn_resolutions=(16,)", "never reaches", "valid resolutions are (8, 4)"],
    ),
    ("ch_mult type", {"model.ch_mult": ("(1,x)",)}, ["config.model.ch_mult", "tuple of positive integers"]),
    ("NaN limit", {"training.max_nonfinite_steps": 0}, ["config.training.max_nonfinite_steps", "positive integer"]),
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
    (
        "damaged data",
        _damage_data,
        ["checkpoints/4 is damaged or incomplete", "resume from the previous checkpoint (step 2)"],
    ),
    ("missing metadata", _damage_metadata, ["checkpoints/4 is damaged or incomplete", "Delete that folder"]),
    ("empty step folder", _empty_step, ["checkpoints/6 is damaged or incomplete", "previous checkpoint (step 4)"]),
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio after a failed read
@pytest.mark.parametrize("name,damage,expected", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_damaged_checkpoints(trained, tmp_path, name, damage, expected):
    workdir, _, state = trained
    workdir = _copy(workdir, tmp_path)
    damage(workdir)
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore_latest(checkpoint.make_manager(workdir), state)
    for piece in expected:
        assert piece in str(info.value), (name, str(info.value))
    with pytest.raises(CheckpointError):  # sample.py and evaluate read through the same check
        load_run(workdir)


def test_checkpoint_of_another_model_shape(trained, data_dir):
    workdir, _, _ = trained
    config = _config(data_dir, **{"model.ch": 16})
    wider = train_lib.abstract_train_state(
        methods.from_config(config), train_lib.make_optimizer(config), jax.random.PRNGKey(0)
    )
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore_latest(checkpoint.make_manager(workdir), wider)
    message = str(info.value)
    assert "was made for another model or image size" in message and "checkpoint (8,) vs model (16,)" in message
    assert "new --workdir" in message


def test_workdir_of_another_image_size(trained, data_dir, tmp_path):
    workdir = _copy(trained[0], tmp_path)  # conv weights do not depend on the image size: config.json tells
    with pytest.raises(CheckpointError) as info:  # before anything is compiled
        loop.train_and_evaluate(_config(data_dir, **{"data.image_size": 16}), workdir)
    message = str(info.value)
    assert "config.data.image_size=8 in the checkpoint, 16 now" in message
    assert "new --workdir" in message and "config.json" in message
    assert checkpoint.load_config(workdir).data.image_size == 8  # the run's config.json is left alone


def test_data_errors(data_dir, monkeypatch):
    with pytest.raises(ValueError, match="Unknown dataset 'digitz'.*'digits' is the offline one"):
        pipeline.load_images("digitz", "train", data_dir)
    with pytest.raises(ValueError, match="Unknown split 'validation' for dataset 'digits'.*available splits"):
        pipeline.load_images("digits", "validation", data_dir)
    # A dataset that is not here and cannot be downloaded (the real attempt retries for minutes
    # without a network, so it is cut short with download=False; the message is the same).
    real = pipeline.load_images
    monkeypatch.setattr(pipeline, "load_images", lambda *a, **k: real(*a, **k, download=False))
    with pytest.raises(DataError, match="'mnist' is not prepared.*Prepare it on a machine with a network"):
        splits.load_split(_config(data_dir, **{"data.dataset": "mnist"}), "train")


def test_sample_errors(trained, tmp_path):
    with pytest.raises(CheckpointError, match=r"no training run in .*config.json is missing"):
        load_run(str(tmp_path / "nothing"))
    empty = str(tmp_path / "empty")
    checkpoint.save_config(empty, trained[1])
    os.makedirs(os.path.join(empty, "checkpoints"))
    with pytest.raises(CheckpointError, match=r"holds no checkpoint: train first \(python train.py"):
        load_run(empty)
    with pytest.raises(ConfigError, match=r"which='latest': use 'ema', 'raw' or 'best'"):
        load_run(trained[0], which="latest")
    for num in (-3, 0, 2.5, "7"):
        with pytest.raises(ValueError, match=r"--num must be a whole number >= 1"):
            sample_lib.sample_from_workdir(trained[0], num)
    # --out: checked before the run is even looked at (a workdir that does not exist here).
    for out in ("grid.jpg", str(tmp_path / "x.npz"), "a.b.PDF"):
        with pytest.raises(ConfigError, match=r"grids are written as PNG; give a .png path, a bare name"):
            sample_lib.sample_from_workdir(str(tmp_path / "nothing"), 4, out=out)


def test_sample_output_paths(tmp_path):
    folder = str(tmp_path)
    assert sample_lib.output_paths(None, "runs/x", 3) == os.path.join("runs/x", "sample_seed3.png")
    assert sample_lib.output_paths(os.path.join(folder, "g.png"), "w", 0) == os.path.join(folder, "g.png")
    assert sample_lib.output_paths(os.path.join(folder, "g.PNG"), "w", 0) == os.path.join(folder, "g.png")
    assert sample_lib.output_paths(os.path.join(folder, "g"), "w", 0) == os.path.join(folder, "g.png")  # a stem
    assert sample_lib.output_paths(folder, "w", 7) == os.path.join(folder, "sample_seed7.png")  # a folder
    assert sample_lib.output_paths("new/", "w", 7) == os.path.join("new", "sample_seed7.png")
    with pytest.raises(ConfigError, match=r"--out=g.jpeg"):
        sample_lib.output_paths("g.jpeg", "w", 0)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"coordinator_address": "localhost:1234"}, "--num_processes, --process_id not given"),
        ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "must be host:port"),
        (
            {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2},
            "--process_id=2 must be in [0, 2)",
        ),
    ],
)
def test_bad_multi_process_settings(kwargs, expected):
    with pytest.raises(distributed.DistributedError) as info:
        distributed.initialize(**kwargs)
    assert expected in str(info.value)


@contextlib.contextmanager
def script_flags(script):
    """The absl flags `script` (train.py, sample.py) defines, on the global FLAGS, for this block only.

    Yields (its module, its --config default or None). Afterwards every flag defined since (the
    script's own, and the --config.* overrides ml_collections adds while parsing) is deleted.
    """
    app.define_help_flags()  # absl's own, defined by the first app.run: kept out of the snapshot
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(
        f"_script_{os.path.splitext(script)[0]}", os.path.join(fu.ROOT, script)
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module, getattr(module, "_DEFAULT_CONFIG", None)
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


# (argv, expected pieces of the `error: ...` line)
COMMAND_LINE_CASES = [
    (
        ["train.py", "--config=configs/ddpm.py:runlocal", "--config.training.batch_sise=8"],
        ["unknown config field config.training.batch_sise", "Did you mean config.training.batch_size?"],
    ),
    (
        ["train.py", "--config=configs/ddpm.py:runlocal", "--config.trainin.lr=1"],
        ["unknown config field config.trainin", "Did you mean config.training?"],
    ),
    (
        ["train.py", "--config=configs/ddpm.py:runlocal", "--config.training.batch_size=abc"],
        ["--config.training.batch_size=abc", "holds a value of type int (default 8)"],
    ),
    (["train.py", "--config=configs/nope.py"], ["--config=configs/nope.py: no such file", "configs/"]),
    (
        [
            "train.py",
            "--config=configs/ddpm.py:runlocal",
            "--coordinator_address=localhost:1",
            "--num_processes=2",
            "--process_id=3",
        ],
        ["--process_id=3 must be in [0, 2)"],
    ),
    (["sample.py", "--num=-1", "--workdir=runs/nothing"], ["--num=-1: -1 is not a positive integer", "How many"]),
]


@pytest.mark.parametrize("argv,expected", COMMAND_LINE_CASES, ids=[c[0][-1] for c in COMMAND_LINE_CASES])
def test_command_lines(argv, expected, monkeypatch):
    """train.py / sample.py command lines through cli.run (flags_parser, then main), in-process:
    they exit with `error: ...` (sys.exit prints it to stderr, with status 1)."""
    monkeypatch.chdir(fu.ROOT)
    monkeypatch.setattr(sys, "argv", list(argv))  # app.run parses sys.argv; ml_collections reads its overrides
    with pytest.raises(SystemExit) as info:
        with script_flags(argv[0]) as (script, config_default):  # train.py checks its --config.* at import
            cli.run(script.main, config_default=config_default)
    message = str(info.value.code)
    assert message.startswith("error: "), message
    for piece in expected:
        assert piece in message, (argv, message)


@pytest.mark.slow
def test_command_line_prints_one_error_line_without_traceback(data_dir, tmp_path, tmp_path_factory):
    """A real train.py process (a case that fails before TensorFlow is imported): `error: ...`, a
    non-zero exit and no traceback."""
    env = fu.env(str(tmp_path_factory.getbasetemp()), data_dir, devices=1)
    argv, expected = COMMAND_LINE_CASES[4]
    proc = subprocess.run(
        [sys.executable] + argv + [f"--workdir={tmp_path / 'w'}"],
        cwd=fu.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and all(piece in lines[0] for piece in expected), proc.stderr[-2000:]


def test_every_error_is_a_user_error():
    for cls in (ConfigError, CheckpointError, DataError, errors.TrainingDiverged, errors.WorkdirLocked):
        assert issubclass(cls, UserError)
    assert issubclass(ConfigError, ValueError)  # cli.run prints ValueErrors without a traceback too
    assert issubclass(distributed.DistributedError, ValueError)  # train.py prints both without a traceback

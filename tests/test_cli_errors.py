"""Every error an entry point can meet, from the real command line: one `error: ...` line, no traceback.

Each case runs `python train.py ...`, `python sample.py ...` or `python -m ddpm_jax.evaluate ...`
once, from the repo root, and checks: a non-zero exit, no "Traceback" in stderr, exactly one
`error: ` line naming the thing to fix, and that it failed before any model step was compiled
(JAX_LOG_COMPILES is on: no train / eval / bpd / sample step appears) and cheaply: under LIMIT_S
seconds of the child's CPU time (its wall time is printed too; on 2 shared cores the wall time
depends on what else runs). A full disk during a save is faked in-process, through Orbax's real
asynchronous save path.
"""

import errno
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time

import flax.struct
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm_jax import methods
from ddpm_jax.commands import cli
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.errors import CheckpointError, ConfigError, WorkdirLocked
from ddpm_jax.evaluation import sample_lib
from ddpm_jax.training import checkpoint, train_lib, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 15.0  # CPU seconds a failing command may use: no compile of the model fits in that
WALL_GUARD_S = 120.0  # a hang, not a slow machine
STEP_COMPILE = re.compile(r"Compiling .*\b(train_step|eval_step|bpd_step|sample_step)\b")


def _env() -> dict:
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    return env


def run_cli(args: list) -> tuple[subprocess.CompletedProcess, float, float]:
    """Runs `python args...` in the repo root; returns the result, its wall and its CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable] + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=WALL_GUARD_S
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def assert_clean_error(args: list, expected: list) -> str:
    """Runs the command and checks the one-line error; returns that line."""
    proc, wall, cpu = run_cli(args)
    print(f"{' '.join(args)[:120]}: rc {proc.returncode}, wall {wall:.1f} s, cpu {cpu:.1f} s")
    assert proc.returncode != 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert not STEP_COMPILE.search(proc.stderr), "a model step was compiled before the error"
    assert cpu < LIMIT_S, f"{cpu:.1f} CPU seconds (wall {wall:.1f} s): the check comes too late"
    return lines[0]


def _runlocal(**fields):
    config = ddpm_config.get_config("runlocal")
    for key, value in fields.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Workdirs for the cases: a file, a run with no checkpoint, damaged config.json files, and a
    'trained' run (config.json + a checkpoint of an all-zero state: nothing is computed or compiled)."""
    base = tmp_path_factory.mktemp("cli_errors")
    out = {"base": str(base), "nothing": str(base / "nothing")}
    out["file"] = str(base / "a_file")
    open(out["file"], "w").close()

    config = _runlocal()
    out["no_checkpoint"] = str(base / "no_checkpoint")
    checkpoint.save_config(out["no_checkpoint"], config)
    os.makedirs(os.path.join(out["no_checkpoint"], "checkpoints"))

    for name, text in (
        ("torn_config", '{"data": {"dataset": "dig'),
        ("list_config", "[1, 2]"),
        ("foreign_config", json.dumps({"data": {"dataset": "digits"}})),
    ):
        out[name] = str(base / name)
        os.makedirs(out[name])
        with open(os.path.join(out[name], checkpoint.CONFIG_FILE), "w") as f:
            f.write(text)

    out["trained"] = str(base / "trained")
    method = methods.from_config(config)
    abstract = train_lib.abstract_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    mngr = checkpoint.make_manager(out["trained"])
    checkpoint.save(mngr, state.replace(step=np.int32(3)))
    checkpoint.wait_until_finished(mngr)
    checkpoint.save_config(out["trained"], config)
    return out


RUNLOCAL = "--config=configs/ddpm.py:runlocal"

# (id, argv after python, expected pieces of the error line); "{name}" is a path from `dirs`
CASES = [
    # unknown config fields at any depth: caught before ml_collections applies them
    (
        "top-level field",
        ["train.py", "--config.no_such_field_zz=1", "--workdir={base}/w1"],
        ["--config.no_such_field_zz: unknown config field config.no_such_field_zz", "config has: data"],
    ),
    (
        "section field",
        ["train.py", RUNLOCAL, "--config.model.no_such_field_zz=1", "--workdir={base}/w1"],
        ["unknown config field config.model.no_such_field_zz", "config.model has: attn_resolutions"],
    ),
    (
        "deep field",
        ["train.py", RUNLOCAL, "--config.training.nope.deeper=1", "--workdir={base}/w1"],
        ["unknown config field config.training.nope"],
    ),
    (
        "typo",
        ["train.py", RUNLOCAL, "--config.optim.lrr=1e-3", "--workdir={base}/w1"],
        ["unknown config field config.optim.lrr", "Did you mean config.optim.lr?"],
    ),
    (
        "value as section",
        ["train.py", RUNLOCAL, "--config.model.ch.width=3", "--workdir={base}/w1"],
        ["config.model.ch is a value (8), not a section"],
    ),
    (
        "wrong type",
        ["train.py", RUNLOCAL, "--config.training.num_train_steps=many", "--workdir={base}/w1"],
        ["--config.training.num_train_steps=many", "holds a value of type int"],
    ),
    (
        "bad value",
        ["train.py", RUNLOCAL, "--config.optim.lr=-1", "--workdir={base}/w1"],
        ["config.optim.lr", "must be > 0"],
    ),
    # workdirs that cannot hold a run
    ("workdir is a file", ["train.py", RUNLOCAL, "--workdir={file}"], ["--workdir={file} is a file, not a folder"]),
    (
        "workdir under a file",
        ["train.py", RUNLOCAL, "--workdir={file}/run"],
        ["--workdir={file}/run cannot be created (Not a directory)", "a folder you can write to"],
    ),
    (
        "workdir under /proc",
        ["train.py", RUNLOCAL, "--workdir=/proc/ddpm_jax_no_such/run"],
        ["--workdir=/proc/ddpm_jax_no_such/run cannot be created", "a folder you can write to"],
    ),
    # data
    (
        "data_dir missing",
        ["train.py", RUNLOCAL, "--config.data.data_dir={base}/no_tfds", "--workdir={base}/w2"],
        ["config.data.data_dir='{base}/no_tfds' does not exist", "prepared tfds datasets"],
    ),
    # sample.py: --out, the run, its config, the sampler
    (
        "out .jpg",
        ["sample.py", "--workdir={trained}", "--out={base}/grid.jpg"],
        ["--out={base}/grid.jpg: grids are written as PNG", "a .png path, a bare name (.png is added) or a folder"],
    ),
    (
        "out .npz",
        ["sample.py", "--workdir={nothing}", "--out=samples.npz"],
        ["--out=samples.npz: grids are written as PNG"],
    ),
    (
        "out under a file",
        ["sample.py", "--workdir={trained}", "--out={file}/grid.png"],
        ["--out={file}/grid.png: its folder {file} cannot be created (a file is in the way)"],
    ),
    (
        "out under /proc",
        ["sample.py", "--workdir={trained}", "--out=/proc/ddpm_jax_no_such/grid"],
        ["--out=/proc/ddpm_jax_no_such/grid: its folder /proc/ddpm_jax_no_such cannot be created"],
    ),
    ("no run", ["sample.py", "--workdir={nothing}"], ["no training run in", "config.json is missing"]),
    (
        "no checkpoint",
        ["sample.py", "--workdir={no_checkpoint}"],
        ["{no_checkpoint}/checkpoints holds no checkpoint: train first"],
    ),
    (
        "torn config.json",
        ["sample.py", "--workdir={torn_config}"],
        ["{torn_config}/config.json cannot be read (JSONDecodeError", "restore it from a backup"],
    ),
    (
        "config.json not an object",
        ["sample.py", "--workdir={list_config}"],
        ["{list_config}/config.json cannot be read", "not a JSON object of config sections"],
    ),
    (
        "foreign config.json",
        ["sample.py", "--workdir={foreign_config}"],
        ["{foreign_config}/config.json is not a usable config", "missing section"],
    ),
    (
        "ddim without steps",
        ["sample.py", "--workdir={trained}", "--sampler=ddim"],
        ["--sampler=ddim needs --steps in [1, 20] (T of this run), got None"],
    ),
    (
        "steps > T",
        ["sample.py", "--workdir={trained}", "--sampler=respaced", "--steps=5000"],
        ["--sampler=respaced needs --steps in [1, 20]", "got 5000"],
    ),
    (
        "eta > 1",
        ["sample.py", "--workdir={trained}", "--sampler=ddim", "--steps=5", "--eta=1.5"],
        ["--eta must lie in [0, 1]", "got 1.5"],
    ),
    (
        "unknown sampler",
        ["sample.py", "--workdir={trained}", "--sampler=euler"],
        ["flag --sampler=euler: value should be one of <ancestral|respaced|ddim>"],
    ),
    (
        "steps 0",
        ["sample.py", "--workdir={trained}", "--sampler=ddim", "--steps=0"],
        ["flag --steps=0: 0 is not a positive integer"],
    ),
    ("num 0", ["sample.py", "--workdir={trained}", "--num=0"], ["flag --num=0: 0 is not a positive integer"]),
    # evaluate reads through the same checks
    (
        "evaluate: no folder",
        ["-m", "ddpm_jax.commands.evaluate", "--workdir={nothing}"],
        ["--workdir={nothing}: no such folder"],
    ),
    (
        "evaluate: torn config.json",
        ["-m", "ddpm_jax.commands.evaluate", "--workdir={torn_config}"],
        ["{torn_config}/config.json cannot be read"],
    ),
    (
        "evaluate: no checkpoint",
        ["-m", "ddpm_jax.commands.evaluate", "--workdir={no_checkpoint}"],
        ["holds no checkpoint: train first"],
    ),
]


@pytest.mark.slow  # a subprocess each (2-10 s)
@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_command_line_error(dirs, argv, expected):
    argv = [a.format(**dirs) for a in argv]
    assert_clean_error(argv, [piece.format(**dirs) for piece in expected])
    if any("no_tfds" in a for a in argv):  # checked before the workdir is even created
        assert not os.path.exists(os.path.join(dirs["base"], "w2"))


@pytest.mark.slow
def test_second_run_on_a_held_workdir_refuses_at_once(tmp_path):
    """This process holds the lock (a live run); train.py refuses before it loads JAX or TensorFlow."""
    workdir = str(tmp_path / "held")
    with workdir_lock.acquire(workdir, command="the first run"):
        line = assert_clean_error(
            ["train.py", RUNLOCAL, f"--workdir={workdir}"],
            [
                f"workdir {workdir} is in use by another run: pid {os.getpid()}",
                "running `the first run`",
                f"kill {os.getpid()}",
                "another --workdir",
            ],
        )
        assert "sample.py" in line  # says what can still read the run
        proc, wall, cpu = run_cli(["train.py", RUNLOCAL, f"--workdir={workdir}"])
        assert proc.returncode == 1 and cpu < 5.0, (wall, cpu)
        assert not os.path.exists(os.path.join(workdir, "config.json"))  # the held run's files are left alone
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_check_takes_nothing_and_refuses_only_a_live_holder(tmp_path):
    """workdir_lock.check, train.py's early test: another host's lock refuses while its heartbeat is fresh."""
    workdir_lock.check(str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")  # creates nothing
    for name, age in (("live", 10), ("lost", 3600)):
        os.makedirs(tmp_path / name)
        record = dict(host="another-host", pid=12345, heartbeat=time.time() - age, token=name)
        (tmp_path / name / workdir_lock.LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(WorkdirLocked, match=r"is in use by another run: pid 12345 on host another-host.*lost for good"):
        workdir_lock.check(str(tmp_path / "live"))
    workdir_lock.check(str(tmp_path / "lost"))  # silent for an hour: acquire takes it over
    assert os.listdir(tmp_path / "lost") == [workdir_lock.LOCK_NAME]  # and check leaves it as it is


def test_out_takes_a_png_path_a_stem_or_a_folder(tmp_path):
    folder = str(tmp_path)
    assert sample_lib.output_paths(os.path.join(folder, "grid.png"), "w", 0) == os.path.join(folder, "grid.png")
    assert sample_lib.output_paths(os.path.join(folder, "grid"), "w", 0) == os.path.join(folder, "grid.png")
    assert sample_lib.output_paths(folder, "w", 5) == os.path.join(folder, "sample_seed5.png")
    assert sample_lib.output_paths(None, "w", 5) == os.path.join("w", "sample_seed5.png")
    for bad in ("grid.jpg", os.path.join(folder, "grid.npz")):
        with pytest.raises(ConfigError, match="grids are written as PNG"):
            sample_lib.output_paths(bad, "w", 0)


@pytest.mark.slow
def test_out_help_names_the_three_forms():
    proc, _, _ = run_cli(["sample.py", "--helpfull"])
    help_text = " ".join(proc.stdout.split())
    assert "--out: Where the grid goes: a .png path, a bare name (.png is added) or a folder" in help_text, help_text


# ----------------------------------------------------------------------------- a full disk


@flax.struct.dataclass
class _State:
    step: np.ndarray
    w: np.ndarray


def _state(step: int) -> _State:
    return _State(step=np.int32(step), w=np.full(16, float(step), np.float32))


@pytest.fixture
def disk(monkeypatch):
    """disk.fill(): from then on Orbax's asynchronous commit of a save fails with ENOSPC in its background
    thread, after the arrays were handed over, as a full disk does; disk.free() ends it."""
    real = ocp.StandardCheckpointHandler.async_save

    class _Full:
        def __init__(self, futures):
            self.futures = futures or []

        def result(self, timeout=None):
            for f in self.futures:
                f.result()
            raise OSError(errno.ENOSPC, "No space left on device", "ocdbt.process_0/d/0")

    async def full(self, *args, **kwargs):
        return [_Full(await real(self, *args, **kwargs))]

    class Disk:
        fill = staticmethod(lambda: monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full))
        free = staticmethod(lambda: monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", real))

    return Disk


def _saved_two(workdir):
    mngr = checkpoint.make_manager(workdir)
    assert checkpoint.save(mngr, _state(2))
    checkpoint.wait_until_finished(mngr)
    return mngr


def _assert_kept_2(workdir):
    ckpt = checkpoint.checkpoint_dir(workdir)
    assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["2"]
    restored = checkpoint.restore_latest(checkpoint.make_manager(workdir, read_only=True), _state(0))
    assert int(restored.step) == 2 and np.all(restored.w == 2.0)


def test_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, disk, caplog):
    workdir = str(tmp_path / "run")
    mngr = _saved_two(workdir)
    caplog.set_level(logging.INFO)
    disk.fill()
    checkpoint.save(mngr, _state(4))  # asynchronous: the failure comes with the wait
    with pytest.raises(CheckpointError) as info:
        checkpoint.wait_until_finished(mngr)
    message = str(info.value)
    assert f"no space left on the device of {checkpoint.checkpoint_dir(workdir)} while saving step 4" in message
    assert "the last complete checkpoint (step 2) is kept" in message and "run the same command again" in message
    _assert_kept_2(workdir)
    # Orbax logs its background thread's failure; for a full disk without the traceback.
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged and all(r.exc_info is None for r in logged)


def test_full_disk_found_by_the_next_save_names_the_failed_step(tmp_path, disk):
    workdir = str(tmp_path / "run")
    mngr = _saved_two(workdir)
    disk.fill()
    checkpoint.save(mngr, _state(4))
    disk.free()  # space is back for step 6, but step 4's write has failed
    with pytest.raises(CheckpointError, match=r"while saving step 4: the last complete checkpoint \(step 2\) is kept"):
        checkpoint.save(mngr, _state(6))
    _assert_kept_2(workdir)


def test_full_disk_raised_at_once_by_save(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    mngr = _saved_two(workdir)
    monkeypatch.setattr(mngr, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(CheckpointError, match=r"while saving step 4: the last complete checkpoint \(step 2\) is kept"):
        checkpoint.save(mngr, _state(4))
    _assert_kept_2(workdir)


def test_full_disk_outside_a_save_names_the_workdir_and_the_kept_step(tmp_path):
    """What train_and_evaluate raises when metrics.jsonl or a picture meets the full disk first."""
    workdir = str(tmp_path / "run")
    _saved_two(workdir)
    full = OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir, "metrics.jsonl"))
    error = checkpoint.disk_full_error(workdir, full)
    assert isinstance(error, CheckpointError)
    assert str(error).startswith(
        f"no space left on the device of {workdir} while writing {workdir}/metrics.jsonl: "
        "the last complete checkpoint (step 2) is kept."
    )
    assert checkpoint.disk_full_error(workdir, OSError(errno.EACCES, "Permission denied")) is None
    assert checkpoint.disk_full_error(workdir, CheckpointError("no space left ...")) is None  # said already


def test_cli_run_says_a_full_disk_in_one_line(monkeypatch):
    """sample.py / evaluate writing their outputs to a full disk: cli.run's last net."""

    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/grid.png")

    monkeypatch.setattr(sys, "argv", ["sample.py"])
    with pytest.raises(SystemExit) as info:
        cli.run(main)
    assert info.value.code == (
        "error: no space left for /out/grid.png (No space left on device): free space there, or write elsewhere."
    )

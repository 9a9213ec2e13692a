"""The console (issue 25): quiet by default, the libraries' log lines in <workdir>/log.txt,
--log_level=info to bring them back, and progress that reads well in a file (one plain line per log
step, no carriage returns) while a terminal keeps tqdm's bar.

The routing and the two progress modes are checked in-process (fast); the training loop in both modes
in-process with the tty check monkeypatched (one compile, shared with test_train's resume test); the
whole command (absl's app.run, Orbax's lines, TensorFlow's C++ banner) in two train.py processes.
"""

import logging
import os
import re
import subprocess
import sys

import pytest
from absl import logging as absl_logging

from ddpm_jax.commands import logs
from ddpm_jax.configuration import load_config_file
from ddpm_jax.evaluation import report
from ddpm_jax.training import loop, progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)  # absl's (and TF's C++) prefix: I1206 02:46:01...
PROGRESS_LINE = re.compile(r"^train step (\d+)/(\d+)  loss \S+  \S+ steps/s  elapsed \S+  ETA \S+$", re.M)


@pytest.fixture
def routed():
    """logs.start(level) for a test (as cli.run does), undone after it."""
    yield logs.start
    logs.stop()


def _library_logger():
    return logging.getLogger("orbax.checkpoint.checkpoint_manager")  # a library's logger, as Orbax's lines


# ----------------------------------------------------------------------------- the routing


def test_quiet_console_keeps_warnings_and_our_lines_and_the_file_keeps_everything(routed, tmp_path, capsys):
    workdir = tmp_path / "run"
    routed("quiet")  # the root logger at INFO: the file keeps INFO lines
    _library_logger().info("Saving checkpoint at step 2 (before the workdir exists)")
    logs.to_workdir(str(workdir))
    assert not (workdir / "log.txt").exists()  # the workdir is the loop's to make, after its checks
    workdir.mkdir()
    _library_logger().info("Saved checkpoint at step 2")
    _library_logger().warning("Given directory is read only")  # Orbax's note on a read-only folder
    logging.getLogger("jax._src.xla_bridge").warning("a GPU may be present, but no CUDA-enabled jaxlib")
    _library_logger().error("a library error")
    absl_logging.info("absl's info line")  # Orbax and tfds log through absl
    logging.getLogger("ddpm_jax.methods.ddpm").warning("diffusion.schedule='learned': our advice")
    logs.stop()
    out, err = capsys.readouterr()
    assert "Saving checkpoint" not in err + out and "Saved checkpoint" not in err + out
    assert "absl's info line" not in err + out
    assert "warning: diffusion.schedule='learned': our advice" in err  # our own warning, plainly
    assert "read only" not in err + out  # other libraries' warnings: in the file
    assert "warning (jax._src.xla_bridge): a GPU may be present, but no CUDA-enabled jaxlib" in err  # JAX's
    assert "error (orbax.checkpoint.checkpoint_manager): a library error" in err  # anyone's error
    assert f"Library logs: {workdir / 'log.txt'} (--log_level=info shows them here too)." in out
    text = (workdir / "log.txt").read_text()
    assert text.startswith("==== ") and text.count("\n==== ") == 0  # one header per start
    for line in (
        "Saving checkpoint at step 2",
        "Saved checkpoint at step 2",
        "absl's info line",
        "read only",
        "our advice",
    ):
        assert line in text, text
    assert ABSL_LINE.search(text.split("\n", 1)[1])  # the file keeps absl's prefix (time, file:line)


def test_info_level_shows_library_lines_and_appends_to_the_log(routed, tmp_path, capsys):
    (tmp_path / "log.txt").write_text("an earlier run's log\n")
    routed("info")
    logs.to_workdir(str(tmp_path))
    _library_logger().info("Saved checkpoint at step 4")
    logs.stop()
    _, err = capsys.readouterr()
    assert re.search(r"^I\d{4} .*\] Saved checkpoint at step 4$", err, re.M), err  # absl's format, as before
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith("an earlier run's log\n==== ") and "Saved checkpoint at step 4" in text


def test_cpp_lines_go_to_the_log_as_they_were_written(routed, tmp_path, capfd):
    """What TensorFlow's C++ code writes to stderr while it loads (logs._QuietImport runs its import
    inside native_stderr_to_log): in log.txt; on the console only an error."""
    routed("quiet")
    logs.to_workdir(str(tmp_path))
    banner = "I0000 00:00:1796525158.521933   17115 port.cc:153] oneDNN custom operations are on."
    with logs.native_stderr_to_log("tensorflow.cpp"):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, f"{banner}\nE0000 00:00:1796525158.6   17115 cuda_fft.cc:1] Unable to register\n".encode())
    logs.stop()
    out, err = capfd.readouterr()
    assert "oneDNN" not in out + err and "InitializeLog" not in out + err, err
    assert "error (tensorflow.cpp): E0000 00:00:1796525158.6   17115 cuda_fft.cc:1] Unable to register" in err
    assert f"\n{banner}\n" in (tmp_path / "log.txt").read_text()  # as it was written, absl's prefix and all


def test_a_remote_workdir_gets_its_log_whole_at_the_end(routed, tmp_path, monkeypatch, capsys):
    """gs://... cannot be appended to: a local file, then one write of the old log.txt and the new lines."""
    monkeypatch.setattr(logs.fileio, "is_local", lambda path: False)  # tmp_path as if it were a bucket
    (tmp_path / "log.txt").write_text("an earlier run's log\n")
    routed("quiet")
    logs.to_workdir(str(tmp_path))
    _library_logger().info("Saved checkpoint at step 2")
    assert "Saved checkpoint" not in (tmp_path / "log.txt").read_text()  # not yet: when the command ends
    local = logs._setup.file.local
    logs.stop()
    out, _ = capsys.readouterr()
    assert f"Library logs: {local} (copied to {tmp_path / 'log.txt'} when the command ends)" in out
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith("an earlier run's log\n==== ") and "Saved checkpoint at step 2" in text
    assert not os.path.exists(local)


def test_stop_gives_logging_back_its_handlers(routed):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    routed("debug")
    assert root.level == logging.DEBUG
    logs.stop()
    assert (list(root.handlers), root.level) == before


def test_processes_other_than_0_show_only_errors_and_write_their_own_file(routed, tmp_path, capsys):
    routed("quiet")
    logs.to_workdir(str(tmp_path), process_index=1)
    _library_logger().warning("a warning on process 1")
    _library_logger().error("an error on process 1")
    logs.stop()
    out, err = capsys.readouterr()
    assert "a warning on process 1" not in err and "an error on process 1" in err and "Library logs" not in out
    assert "a warning on process 1" in (tmp_path / "log.process1.txt").read_text()
    assert not (tmp_path / "log.txt").exists()


def test_log_level_is_read_before_absl_parses_it_and_quiets_the_cpp_logs():
    assert logs.level_in_argv(["train.py"]) == "quiet"
    assert logs.level_in_argv(["train.py", "--log_level=info", "--workdir=w"]) == "info"
    assert logs.level_in_argv(["train.py", "--log_level", "debug"]) == "debug"
    env = {}
    logs.quiet_native_logs("quiet", env)
    assert env == {logs.NATIVE_ENV: "1"}  # TensorFlow's and XLA's C++ INFO lines (the oneDNN banner)
    env = {logs.NATIVE_ENV: "0"}
    logs.quiet_native_logs("quiet", env)
    assert env == {logs.NATIVE_ENV: "0"}  # the user's own setting wins
    env = {}
    logs.quiet_native_logs("info", env)
    assert env == {}


# ----------------------------------------------------------------------------- progress


def test_progress_in_a_file_is_one_plain_line_per_log_step(capsys):
    bar = progress.Progress(100, 40, desc="train", terminal=False)
    for step in range(41, 61):
        bar.update(1)
        if step % 10 == 0:
            bar.log(step, {"loss": 0.25, "steps_per_sec": 4.0})
    bar.write("a notice")
    bar.close()
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    assert [m.groups() for m in PROGRESS_LINE.finditer(out)] == [("50", "100"), ("60", "100")], out
    assert "train step 60/100  loss 0.2500  4.00 steps/s" in out and "ETA 0:00:10" in out
    assert out.splitlines()[-1] == "a notice"


def test_progress_on_a_terminal_is_the_bar(capsys):
    bar = progress.Progress(10, desc="train", terminal=True)
    bar.update(5)
    bar.log(5, {"loss": 0.5, "steps_per_sec": 2.0})
    bar.close()
    out, err = capsys.readouterr()
    assert "\r" in err and "5/10" in err and "loss=0.5000" in err and not PROGRESS_LINE.search(out)


def test_the_report_progress_in_a_file_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    items = list(progress.iterate(iter(range(3)), desc="test bits/dim", unit="batch"))
    out, err = capsys.readouterr()
    assert items == [0, 1, 2] and out == "test bits/dim: 3 batches\n" and "\r" not in err
    assert report.iterate is progress.iterate  # the report's bar goes through it


# ----------------------------------------------------------------------------- the loop, in-process


def _tiny_config(data_dir):
    """test_train's resume config (its compiled steps are shared through conftest's steps_for)."""
    config = load_config_file("ddpm:runlocal")
    config.data.data_dir = data_dir
    config.training.final_bpd = False
    config.training.num_train_steps = 4
    config.training.checkpoint_every = 2
    config.training.eval_every = 100
    config.training.sample_every = 100
    return config


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [False, True], ids=["file", "terminal"])
def test_the_loop_prints_lines_in_a_file_and_the_bar_on_a_terminal(
    terminal, tmp_path, data_dir, steps_for, monkeypatch, capsys
):
    config = _tiny_config(data_dir)
    monkeypatch.setattr(progress, "is_terminal", lambda: terminal)
    loop.train_and_evaluate(config, str(tmp_path / "run"), steps=steps_for(config))
    out, err = capsys.readouterr()
    lines = [m.groups() for m in PROGRESS_LINE.finditer(out)]
    if terminal:
        assert "\r" in err and "train: 100%" in err and "4/4" in err and lines == [], (out, err[-2000:])
    else:
        assert "\r" not in out + err, (out, err[-2000:])
        assert lines == [("2", "4"), ("4", "4")], out  # log_every=2: one line per log step


# ----------------------------------------------------------------------------- train.py in a file


def _train(workdir, data_dir, log_dir, *extra):
    """train.py on ddpm:runlocal (4 steps, a log and a checkpoint every 2, no test bound at the end),
    stdout and stderr to files as under SLURM; returns (returncode, stdout, stderr)."""
    env = dict(os.environ, XLA_FLAGS="")  # one device, as a user's CPU run
    env.pop(logs.NATIVE_ENV, None)  # quiet mode sets it
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        code = subprocess.run(
            [
                sys.executable,
                "train.py",
                "--config=ddpm:runlocal",
                f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}",
                "--config.training.final_bpd=False",  # the bound's line: tested above
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            timeout=600,
        ).returncode
    return code, out_path.read_text(), err_path.read_text()


@pytest.fixture(scope="module")
def quiet_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console") / "run"
    code, out, err = _train(workdir, data_dir, tmp_path_factory.mktemp("console_logs"))
    return workdir, code, out, err


@pytest.mark.slow
def test_train_in_a_file_prints_lines_and_keeps_library_logs_in_log_txt(quiet_run):
    workdir, code, out, err = quiet_run
    assert code == 0, (out[-2000:], err[-3000:])
    assert "\r" not in out + err
    assert [m.groups() for m in PROGRESS_LINE.finditer(out)] == [("2", "4"), ("4", "4")], out
    assert f"Library logs: {workdir / 'log.txt'}" in out
    assert re.search(r"^params_sha256: \w+\n(.*\n)*wall_time_s: \d", out, re.M), out  # the final summary
    console = out + err
    assert not ABSL_LINE.search(console), console[-3000:]  # no absl line, Python's or C++'s
    assert "checkpoint_manager" not in console and "oneDNN" not in console, console[-3000:]
    assert "All log messages before absl::InitializeLog()" not in console
    text = (workdir / "log.txt").read_text()
    assert re.search(r"^I\d{4} .* checkpoint_manager\.py:\d+\]", text, re.M), text[:3000]  # Orbax's lines


@pytest.mark.slow
def test_log_level_info_brings_the_library_lines_back(quiet_run, data_dir, tmp_path):
    workdir, code, _, _ = quiet_run
    assert code == 0
    code, out, err = _train(workdir, data_dir, tmp_path, "--log_level=info")  # a finished run
    assert code == 0, (out[-2000:], err[-3000:])
    assert re.search(r"^I\d{4} .* checkpoint_manager\.py:\d+\]", err, re.M), err[-3000:]
    assert "Resuming from the checkpoint at step 4" in out
    text = (workdir / "log.txt").read_text()
    assert len(re.findall(r"^==== ", text, re.M)) == 2  # appended: one header per start

"""TensorBoard: sample grids as images, the config as one hparams session, scalars; read back with
TensorBoard's own event reader (the one its server uses), on its TensorFlow stub: nothing here needs
TensorFlow."""

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.util import tensor_util

from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.evaluation import plots
from ddpm_jax.training import distributed, loop
from ddpm_jax.training.metric_writer import MetricWriter, hparams

from helpers import fault_utils as fu
from helpers import tensorboard_reader

SESSION_TAG = tensorboard_reader.SESSION_TAG


def _events(workdir):
    return tensorboard_reader.accumulate(os.path.join(workdir, "tensorboard"))


def _images(acc, tag) -> dict:
    """{step: decoded uint8 [H, W, C]} of an image tag, checked to be in TensorBoard's Images tab."""
    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "images"
    out = {}
    for event in acc.Tensors(tag):
        width, height, png = tensor_util.make_ndarray(event.tensor_proto)
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        assert pixels.shape[:2] == (int(height), int(width))
        out[event.step] = pixels
    return out


def _session(acc) -> dict:
    """The hparams session's values, checked to be the only session in the run."""
    assert len(acc.Tensors(SESSION_TAG)) == 1
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    info = hparams_metadata.parse_session_start_info_plugin_data(acc.SummaryMetadata(SESSION_TAG).plugin_data.content)
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def _saved_png(path) -> np.ndarray:
    """A picture saved by plots.save_png, as uint8 [H, W, C]."""
    pixels = np.asarray(Image.open(path))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _cells(grid, ncol, size=8, pad=1) -> np.ndarray:
    """The images of a pixel-size plots.image_grid (TensorBoard's), row by row: uint8 [N, size, size, C]."""
    nrow = (grid.shape[0] - pad) // (size + pad)
    return np.stack(
        [
            grid[
                pad + r * (size + pad) : pad + r * (size + pad) + size,
                pad + q * (size + pad) : pad + q * (size + pad) + size,
            ]
            for r in range(nrow)
            for q in range(ncol)
        ]
    )


def test_hparams_are_the_flattened_config():
    config = ddpm_config.get_config("runlocal")
    flat = hparams(config)
    assert flat["model.ch"] == 8 and flat["optim.lr"] == 1e-3 and flat["method"] == "ddpm"
    assert flat["model.ch_mult"] == "(1, 2)" and flat["data.data_dir"] == "None"
    assert flat["optim.flatten"] is True  # booleans stay booleans (the digits configs keep their state flat)
    assert len(flat) == sum(len(section) if hasattr(section, "items") else 1 for section in config.values())


def test_writer_round_trip_resume_and_fresh_start(tmp_path):
    workdir = str(tmp_path)
    config = ddpm_config.get_config("runlocal")
    grid = np.random.default_rng(0).integers(0, 256, (19, 28, 1), dtype=np.uint8)
    writer = MetricWriter(workdir)
    writer.write_hparams(config)
    for step in (1, 2, 4):
        writer.write(step, {"loss": 1.0 / step})
    writer.write_images(2, {"samples/ema": grid})
    acc = _events(workdir)
    images = _images(acc, "samples/ema")
    assert list(images) == [2]
    np.testing.assert_array_equal(images[2], grid)  # PNG is lossless: pixel for pixel
    session = _session(acc)
    assert session["model.ch"] == 8 and session["model.ch_mult"] == "(1, 2)" and session["method"] == "ddpm"
    assert [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")] == [1.0, 0.5, 0.25]

    # A resume (from step 2) keeps the session its start wrote, even with a changed config.
    resumed = ddpm_config.get_config("runlocal")
    resumed.training.num_train_steps = 99
    writer = MetricWriter(workdir, resume_step=2)
    writer.write_hparams(resumed)
    assert [r["step"] for r in writer.records()] == [1, 2]  # step 4 will be written again
    assert _session(_events(workdir))["training.num_train_steps"] == config.training.num_train_steps

    # A fresh start drops the earlier attempt's events: one run, one session, the new config.
    writer = MetricWriter(workdir, resume_step=0)
    writer.write_hparams(resumed)
    acc = _events(workdir)
    assert writer.records() == [] and "samples/ema" not in acc.Tags()["tensors"]
    assert _session(acc)["training.num_train_steps"] == 99


def test_resume_mark_shows_each_step_once(tmp_path):
    """A resume from step 2 rewrites steps 3-4: TensorBoard shows the second attempt's values there, once."""
    workdir = str(tmp_path)
    writer = MetricWriter(workdir)
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)})
    writer = MetricWriter(workdir, resume_step=2)
    for step in (3, 4, 5):
        writer.write(step, {"loss": 10.0 * step})
    loss = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in _events(workdir).Tensors("loss")}
    assert loss == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}
    assert len(_events(workdir).Tensors("loss")) == 5
    assert [r["loss"] for r in writer.records()] == [1.0, 2.0, 30.0, 40.0, 50.0]


def test_event_files_are_valid_records(tmp_path):
    """One file per start, each opening with the file version and a start mark, every record's checksums verified by
    TensorBoard's own (independent) CRC-32C; the image record holds the PNG of the pixels."""
    workdir = str(tmp_path)
    grid = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    MetricWriter(workdir).write_images(3, {"g": grid})
    MetricWriter(workdir, resume_step=3).write(4, {"loss": 0.5})
    files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
    assert len(files) == 2
    first, second = (tensorboard_reader.records(f) for f in files)
    assert first[0].file_version == second[0].file_version == "brain.Event:2"
    start = first[1].session_log.START
    assert [(e.session_log.status, e.step) for e in (first[1], second[1])] == [(start, 1), (start, 4)]
    (image,) = first[2].summary.value
    assert (first[2].step, image.tag, image.image.height, image.image.width) == (3, "g", 5, 7)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.image.encoded_image_string))), grid)
    assert (second[2].step, second[2].summary.value[0].simple_value) == (4, 0.5)
    assert len(first) == 3 and len(second) == 3


def test_writer_loads_no_tensorflow_tensorboard_or_torch(tmp_path):
    """tensorboardX alone (it would import torch, installed here for the bench extra)."""
    code = f"""
import sys, numpy as np
from ddpm_jax.configs import ddpm
from ddpm_jax.training.metric_writer import MetricWriter
w = MetricWriter({str(tmp_path)!r})
w.write_hparams(ddpm.get_config("runlocal"))
w.write(1, {{"loss": 1.0}})
w.write_images(1, {{"g": np.zeros((4, 4, 1), np.uint8)}})
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"tensorflow", "tensorboard", "tensorboardX", "torch"}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "['tensorboardX']"


def test_grid_of_runs_in_the_hparams_tab(tmp_path):
    """What TensorBoard's HParams tab builds from two cells of a grid: the ablated field first, each
    scalar (the final bound among them) a metric."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    for schedule, bpd in (("linear", 5.2), ("cosine", 4.9)):
        config = ddpm_config.get_config("runlocal")
        config.diffusion.schedule = schedule
        writer = MetricWriter(str(tmp_path / schedule))
        writer.write_hparams(config)
        writer.write(4, {"loss": 0.1, "test_total_bpd": bpd})
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    tb = backend_context.Context(base_plugin.TBContext(logdir=str(tmp_path), multiplexer=mux, data_provider=provider))
    request = context.RequestContext()
    experiment = tb.experiment_from_metadata(
        request, "", True, tb.hparams_metadata(request, ""), tb.hparams_from_data_provider(request, "", limit=None)
    )
    ablated = experiment.hparam_infos[0]
    assert ablated.name == "diffusion.schedule" and ablated.differs
    assert {v.string_value for v in ablated.domain_discrete.values} == {"linear", "cosine"}
    assert len(experiment.hparam_infos) == len(hparams(config))
    assert sorted(m.name.tag for m in experiment.metric_infos) == ["loss", "test_total_bpd"]


def test_bad_image_names_the_expected_array(tmp_path):
    writer = MetricWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"expected uint8 \[H, W, C\].*float32 \(8, 8, 1\)"):
        writer.write_images(1, {"samples/ema": np.zeros((8, 8, 1), np.float32)})


def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    writer = MetricWriter(str(tmp_path))
    writer.write_hparams(ddpm_config.get_config("runlocal"))
    writer.write(1, {"loss": 1.0})
    writer.write_images(1, {"samples/ema": np.zeros((8, 8, 1), np.uint8)})
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_training_run_writes_grids_and_one_session(tmp_path, data_dir, steps_for):
    """12 micro steps with a grid every 4, stopped at 6 and resumed: grids at 4 and 8, the final grid and
    strip at 12, pixel for pixel the PNGs beside them, and one hparams session from the first start."""
    workdir = str(tmp_path / "run")
    config = fu.micro_config(data_dir, **{"training.sample_every": 4})
    steps = steps_for(fu.micro_config(data_dir))  # sample_every is not compiled in: the shared steps serve
    assert loop.train_and_evaluate(config, workdir, stop_at_step=6, steps=steps)["stopped_at"] == 6
    loop.train_and_evaluate(config, workdir, steps=steps)

    acc = _events(workdir)
    grids = _images(acc, "samples/ema")
    assert sorted(grids) == [4, 8, 12]
    for step in (4, 8):  # the PNG is the same images as TensorBoard's, scaled up (plots.grid_picture)
        png = _saved_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        np.testing.assert_array_equal(png, plots.grid_picture(_cells(grids[step], ncol=3)[:8], ncol=3))
    final = plots.image_grid(np.load(os.path.join(workdir, "samples.npz"))["samples"])
    assert final.shape == (3 * 9 + 1, 3 * 9 + 1, 1)  # 8 digits of 8x8 in a 3x3 grid, 1-pixel gaps
    np.testing.assert_array_equal(grids[12], final)
    strips = _images(acc, "samples/denoising_strip")
    assert list(strips) == [12]
    frames = strips[12].shape[1] // 9  # columns of 8 + 1 pixels
    body = plots.grid_picture(_cells(strips[12], ncol=frames), ncol=frames)  # the PNG: a labelled band above it
    png = _saved_png(os.path.join(workdir, "denoising_strip.png"))
    assert png.shape[0] > body.shape[0]
    np.testing.assert_array_equal(png[-body.shape[0] :], body)

    session = _session(acc)
    assert session["training.sample_every"] == 4 and session["model.ch_mult"] == "(1,)"
    assert session["training.num_train_steps"] == 12 and session["data.data_dir"] == data_dir
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]  # the resume rewrote nothing twice
    assert {e.step for e in acc.Tensors("val_loss")} == {12}

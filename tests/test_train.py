"""End-to-end training: pmapped step on 1 vs 4 devices, loss falls, exact resume, train.py / sample.py.

Compiles dominate on CPU, so the tiny "runlocal" model and its pmapped functions are built once
per module (and per config: conftest's `steps_for`) and shared.
"""

import functools
import json
import os
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from ddpm_jax import methods
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.data import pipeline
from ddpm_jax.evaluation import plots, report, sample_lib
from ddpm_jax.training import checkpoint, distributed, loop, train_lib
from ddpm_jax.training.flat_state import FlatLayout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **training):
    config = ddpm_config.get_config("runlocal")
    config.data.data_dir = data_dir
    config.training.final_bpd = False
    for k, v in training.items():
        config.training[k] = v
    return config


@pytest.fixture(scope="module")
def train_images(data_dir):
    return pipeline.load_images("digits", "train", data_dir)


@pytest.fixture(scope="module")
def setup(data_dir, steps_for):
    config = tiny_config(data_dir, num_train_steps=1000)
    config.optim.lr_schedule = "constant"  # the loss-falls test takes 60 steps at full lr
    steps = steps_for(config)
    state = train_lib.create_train_state(steps.method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    return config, state, steps


@pytest.mark.slow
def test_one_step_same_update_on_1_and_4_devices(setup, train_images):
    config, state, steps = setup
    assert jax.local_device_count() == 4
    batch4 = next(pipeline.train_batches(train_images, 8, seed=0))  # [4, 2, 8, 8, 1]
    new4, m4 = steps.p_train(distributed.replicate(state), jnp.asarray(batch4))
    # The same global batch on one device, through the same pure step.
    p_train1 = jax.pmap(
        functools.partial(train_lib.train_step, method=steps.method, config=config),
        axis_name=train_lib.AXIS,
        devices=jax.local_devices()[:1],
    )
    new1, m1 = p_train1(
        jax.tree_util.tree_map(lambda x: np.asarray(x)[None], state),
        jnp.asarray(batch4.reshape((1, 8) + batch4.shape[2:])),
    )
    p4, p1 = distributed.unreplicate(new4).params, distributed.unreplicate(new1).params
    before = state.params
    moved = jax.tree_util.tree_reduce(max, jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), p4, before))
    assert moved > 1e-6  # the step changed something (warm-up's first lr is lr / warmup_steps)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)
    np.testing.assert_allclose(np.mean(m4["loss"]), np.mean(m1["loss"]), rtol=1e-5)


@pytest.mark.slow
def test_loss_falls_on_digits(setup, train_images):
    config, state, steps = setup
    rstate = distributed.replicate(state)
    batches = pipeline.train_batches(train_images, 8, seed=0)
    losses = []
    for _ in range(60):
        rstate, metrics = steps.p_train(rstate, next(batches))
        losses.append(float(np.mean(metrics["loss"])))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


@pytest.mark.slow
def test_draw_samples_merges_the_devices_draws(setup):
    config, state, steps = setup
    params, rng = distributed.replicate(state.ema_params), jax.random.PRNGKey(3)
    out = sample_lib.draw_samples(steps.p_sample, params, rng, 6, num_frames=4)
    assert out["samples"].shape == (6, 8, 8, 1)
    assert out["frames"].shape == out["pred_x0"].shape == (4, 6, 8, 8, 1)
    assert out["frame_t"][0] == config.diffusion.num_timesteps - 1 and out["frame_t"][-1] == 0
    # The values: each device's 2 draws in device order, the first 6 of the 8 (the same compiled step).
    raw = jax.device_get(steps.p_sample(params, rng, 2, 4, "ancestral", None, 0.0))
    np.testing.assert_array_equal(out["samples"], raw["samples"].reshape(8, 8, 8, 1)[:6])
    np.testing.assert_array_equal(out["frames"], np.moveaxis(raw["frames"], 0, 1).reshape(4, 8, 8, 8, 1)[:, :6])
    # The last frame is x_0 before the final clip to the data range; the samples are that clip.
    np.testing.assert_array_equal(out["samples"], np.clip(out["frames"][-1], -1.0, 1.0))
    assert not np.allclose(out["samples"][:2], out["samples"][2:4])  # each device draws with its own key


def _restore(workdir, config):
    target = train_lib.abstract_train_state(
        methods.from_config(config), train_lib.make_optimizer(config), jax.random.PRNGKey(config.seed)
    )
    return checkpoint.restore_latest(checkpoint.make_manager(workdir, read_only=True), target)


@pytest.mark.slow
def test_resume_is_exact(tmp_path, data_dir, steps_for):
    config = tiny_config(data_dir, num_train_steps=4, checkpoint_every=2, eval_every=100, sample_every=100)
    steps = steps_for(config)  # compiled once for the three runs
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(config, straight, steps=steps)
    out = loop.train_and_evaluate(config, resumed, stop_at_step=2, steps=steps)
    assert out["stopped_at"] == 2
    assert int(_restore(resumed, config).step) == 2
    loop.train_and_evaluate(config, resumed, steps=steps)
    a, b = _restore(straight, config), _restore(resumed, config)
    assert int(a.step) == int(b.step) == 4
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, (a.params, a.ema_params, a.opt_state), (b.params, b.ema_params, b.opt_state)
    )
    assert os.path.exists(os.path.join(straight, "samples.png"))
    records = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert any("val_loss" in r for r in records) and any("steps_per_sec" in r for r in records)


def _grid_cells(png, num, size=8):
    """The images of a saved grid (plots.grid_picture's layout: each image scaled up by a whole
    factor, plots.SEPARATOR pixels apart), at pixel size again, as uint8 [num, size, size]."""
    ncol, sep = int(np.ceil(np.sqrt(num))), plots.SEPARATOR
    pixels = np.asarray(Image.open(png))
    cell = (pixels.shape[1] - sep) // ncol - sep  # a scaled-up image's side
    scale = cell // size
    assert scale > 1 and cell == scale * size, (pixels.shape, cell)
    corners = [(sep + r * (cell + sep), sep + q * (cell + sep)) for r, q in (divmod(i, ncol) for i in range(num))]
    return np.stack([pixels[top : top + cell : scale, left : left + cell : scale] for top, left in corners])


@pytest.mark.slow
def test_train_and_sample_scripts_end_to_end(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS="")  # one device, as a user's CPU run
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/vdm.py:runlocal",  # the main job's method
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.training.num_train_steps=2",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=600,
    )
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert np.isfinite(results["total_bpd"]) and results["total_bpd"] > 0
    for name in ("samples.png", "denoising_strip.png", "loss.png"):  # (VDM's t is continuous: no bpd_terms.png)
        assert os.path.exists(os.path.join(workdir, name)), name
    stem = str(tmp_path / "s")  # a bare name: .png is added, the .npz and the strip go beside it
    done = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={workdir}", "--num=5", f"--out={stem}", "--strip"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
        text=True,
    )
    samples = np.load(stem + ".npz")["samples"]
    assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.float32
    # The grid shows exactly the saved samples; the arrays were written first.
    np.testing.assert_array_equal(_grid_cells(stem + ".png", 5), plots.unscale_images(samples)[..., 0])
    wrote = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [stem + ".npz", stem + ".png", stem + "_strip.png"], done.stdout
    assert os.path.getmtime(stem + ".npz") <= os.path.getmtime(stem + ".png")
    bad = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={tmp_path / 'nothing'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "train.py" in bad.stderr


def test_every_picks_the_periodic_steps():
    assert [s for s in range(1, 8) if loop.every(s, 3, 7)] == [3, 6, 7]  # and the last step
    assert [s for s in range(1, 7) if loop.every(s, 3, 6, at_last=False)] == [3]  # never the last step


@flax.struct.dataclass
class _StateBefore:  # a train state as checkpoints named its fields before a rename
    step: jax.Array
    params: dict
    loss_history: dict


@flax.struct.dataclass
class _StateNow:
    step: jax.Array
    params: dict
    method_state: dict


def test_a_checkpoint_from_before_a_field_rename_restores(tmp_path):
    """checkpoint.RENAMED_FIELDS: runs saved with TrainState.loss_history restore into method_state."""
    before = _StateBefore(
        step=np.int32(3), params={"w": np.arange(4.0, dtype=np.float32)}, loss_history={"counts": np.ones(5, np.int32)}
    )
    mngr = checkpoint.make_manager(str(tmp_path))
    checkpoint.save(mngr, before)
    checkpoint.wait_until_finished(mngr)
    target = _StateNow(
        step=np.int32(0), params={"w": np.zeros(4, np.float32)}, method_state={"counts": np.zeros(5, np.int32)}
    )
    now = checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path), read_only=True), target)
    assert isinstance(now, _StateNow) and int(now.step) == 3
    np.testing.assert_array_equal(now.params["w"], before.params["w"])
    np.testing.assert_array_equal(now.method_state["counts"], before.loss_history["counts"])


def test_final_evaluators_follow_the_config(data_dir):
    config = tiny_config(data_dir)
    assert report.final_evaluators(config) == ["samples", "curves"]  # tiny_config: final_bpd = False
    config.training.final_bpd = True
    assert report.final_evaluators(config) == ["samples", "curves", "val_bound", "bound"]
    assert set(report.final_evaluators(config)) <= set(report.FINAL_EVALUATORS)


def test_ema_decay_warms_up_and_lr_starts_above_zero():
    assert float(train_lib.ema_decay(0.998, 0)) == pytest.approx(0.1)
    assert float(train_lib.ema_decay(0.998, 10**6)) == pytest.approx(0.998)
    config = ddpm_config.get_config()
    lr = train_lib.learning_rate_schedule(config.optim, config.training.num_train_steps)
    assert float(lr(0)) == pytest.approx(config.optim.lr / config.optim.warmup_steps, rel=1e-4)
    assert float(lr(config.optim.warmup_steps - 1)) == pytest.approx(config.optim.lr, rel=1e-4)
    assert float(lr(config.training.num_train_steps - 1)) < 1e-3 * config.optim.lr  # cosine decays to 0


def test_flat_optimizer_gives_the_same_updates():
    """optim.flatten (clip + Adam over one flat vector) against the per-leaf chain, with the clip
    active (grad norm ~18 against 1.0): the same updates and parameters over a few steps."""
    rng = np.random.default_rng(0)
    params = {
        "conv": {
            "kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(8), jnp.float32),
        },
        "dense": {"kernel": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)},
    }
    results = []
    layout = FlatLayout.of(params)  # the flat train state's (TrainState.to_flat)
    for flatten in (False, True):
        config = ddpm_config.get_config()
        config.optim.flatten = flatten
        tx = train_lib.make_optimizer(config)
        form = layout.ravel if flatten else (lambda tree: tree)
        p = form(params)
        opt_state = tx.init(p)
        for step in range(5):
            grads = jax.tree_util.tree_map(
                lambda x, step=step: jnp.asarray(np.random.default_rng(step).standard_normal(x.shape), x.dtype),
                params,
            )
            updates, opt_state = tx.update(form(grads), opt_state, p)
            p = optax.apply_updates(p, updates)
        results.append(layout.unravel(p) if flatten else p)
        # Flat: Adam's moments are one vector of all 336 parameters each; per leaf: one array per leaf.
        sizes = sorted(x.size for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0)
        assert sizes == ([336, 336] if flatten else [8, 8, 40, 40, 288, 288])
    flat_leaves = jax.tree_util.tree_leaves(results[1])
    assert len(flat_leaves) == 3
    for a, b in zip(jax.tree_util.tree_leaves(results[0]), flat_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(params))
    )
    assert moved > 1e-4  # the optimizer did move the parameters

"""Research tooling end to end on tiny configs: the ablation runner (a DDPM and a VAE cell, resume,
conflicting cells), evaluate, the learned schedule through the training loop, the histogram
baseline, and the sampler flags' checks.

Compiles dominate: each distinct tiny config compiles its pmapped steps once (the grid's cells
train with conftest's `steps_for`), so the tests reuse the grid's configs where they can.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import configuration, fileio, methods
from ddpm_jax.commands import ablate, evaluate
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.configs import vae as vae_config
from ddpm_jax.core import baselines
from ddpm_jax.data import pipeline, splits
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import report
from ddpm_jax.models import learned_schedule
from ddpm_jax.run import load_run
from ddpm_jax.training import checkpoint, distributed, loop, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = """
def get_grid():
    return {"base": "configs/ddpm.py:runlocal",
            "overrides": {"training.num_train_steps": 60, "training.eval_every": 30, "training.checkpoint_every": 30,
                          "optim.lr_schedule": "constant"},
            "cells": {"ddpm": {CELL}, "vae": {"config": "configs/vae.py:runlocal"}}}
"""


def _write_grid(path, cell="{}"):
    path.write_text(GRID.replace("{CELL}", cell))
    return str(path)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir, steps_for):
    """The two-cell grid, run once for the module: (grid path, out dir, rows). Its cells train with
    the session's compiled steps of their configs, which the tests below reuse."""
    tmp = tmp_path_factory.mktemp("sweep")
    train = loop.train_and_evaluate
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # grid files name configs relative to the repository
        patch.setattr(
            loop,
            "train_and_evaluate",
            lambda config, workdir, **kw: train(config, workdir, steps=steps_for(config), **kw),
        )
        grid = _write_grid(tmp / "grid.py")
        rows = ablate.run_grid(grid, str(tmp / "out"), num_samples=16)
    return grid, str(tmp / "out"), rows


def test_histogram_baseline_against_a_hand_count(data_dir):
    train = np.array([[0, 16], [0, 16], [16, 16], [0, 0]], np.uint8).reshape(4, 1, 2, 1)
    test = np.array([[0, 16], [16, 0]], np.uint8).reshape(2, 1, 2, 1)
    # pixel 0: P(0) = (3 + .5) / 5, P(16) = 1.5 / 5; pixel 1: P(16) = 3.5 / 5, P(0) = 1.5 / 5.
    want = -np.mean(np.log2([3.5 / 5, 3.5 / 5, 1.5 / 5, 1.5 / 5]))
    assert baselines.pixel_histogram_bpd(train, test) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="never takes"):
        baselines.pixel_histogram_bpd(train, np.full((1, 1, 2, 1), 8, np.uint8))
    digits = baselines.pixel_histogram_bpd(
        pipeline.load_images("digits", "train", data_dir), pipeline.load_images("digits", "test", data_dir)
    )
    assert 2.0 < digits < 2.8, digits  # the "about 2.4"


@pytest.mark.slow
def test_ablation_grid_writes_the_table_and_resumes_without_retraining(sweep, monkeypatch):
    grid, out, rows = sweep
    by_cell = {r["cell"]: r for r in rows}
    assert set(by_cell) == {"ddpm", "vae", "baseline: pixel histogram"}
    ddpm, vae = by_cell["ddpm"], by_cell["vae"]
    for key in ("total_bpd", "decoder_bpd", "diffusion_bpd", "prior_bpd", "fd", "fd_floor", "classifier_score"):
        assert np.isfinite(ddpm[key]), key
    assert ddpm["total_bpd"] == pytest.approx(ddpm["decoder_bpd"] + ddpm["diffusion_bpd"] + ddpm["prior_bpd"], rel=1e-4)
    assert vae["total_bpd"] == pytest.approx(vae["recon_bpd"] + vae["kl_bpd"], rel=1e-4)
    assert ddpm["steps"] == vae["steps"] == 60
    table = open(os.path.join(out, "grid", "results.md")).read()
    assert all(name in table for name in ("ddpm", "vae", "pixel histogram", "fd_floor"))
    assert open(os.path.join(out, "grid", "results.csv")).readline().startswith("cell,total_bpd")
    assert os.path.exists(os.path.join(out, "grid", "bpd_vs_step.png"))
    assert os.path.exists(os.path.join(out, "grid", "loss_vs_step.png"))
    metrics = [json.loads(line) for line in open(os.path.join(out, "cells", "ddpm", "metrics.jsonl"))]
    assert any(np.isfinite(m.get("test_bpd_est", np.nan)) for m in metrics)  # the curve the plot draws

    # Resume: finished cells are read back, nothing trains again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(loop, "train_and_evaluate", no_training)
    monkeypatch.chdir(ROOT)
    again = ablate.run_grid(grid, out, num_samples=16)
    assert [r["cell"] for r in again] == [r["cell"] for r in rows]
    assert again[0]["total_bpd"] == ddpm["total_bpd"]
    # The same cell name with another config is refused, not silently reused.
    other = _write_grid(pathlib.Path(grid).parent / "other.py", cell='{"diffusion.schedule": "cosine"}')
    with pytest.raises(ConfigError, match="another config"):
        ablate.run_grid(other, out, num_samples=16)
    with pytest.raises(ConfigError, match="unknown config field"):
        ablate.cell_config({"base": "configs/ddpm.py:runlocal", "cells": {"x": {"model.chanels": 4}}}, "x")


@pytest.mark.slow
def test_evaluate_scores_a_workdir_and_training_lowers_the_bound(sweep, steps_for):
    _, out, rows = sweep
    workdir = os.path.join(out, "cells", "ddpm")
    result = evaluate.evaluate_workdir(workdir, params="raw", num_samples=16, sampler="ddim", num_steps=5)
    assert os.path.exists(os.path.join(workdir, "eval", "raw.json"))
    assert np.isfinite(result["total_bpd"]) and result["num_examples"] == 297
    assert result["fd"] > 0 and result["fd_floor"] > 0 and result["sampler"] == "ddim5"
    # The bound of an untrained model is finite and far above that of the (briefly) trained cell.
    run = load_run(workdir)
    steps = steps_for(run.config)  # the cell's compiled steps, reused
    test_images = splits.load_split(run.config, "test")[:32]
    bpd = lambda params: report.evaluate_bpd(
        steps.p_bpd, distributed.replicate(params), test_images, run.config, jax.random.PRNGKey(0)
    )["total_bpd"]
    untrained = bpd(
        train_lib.create_train_state(run.method, train_lib.make_optimizer(run.config), jax.random.PRNGKey(1)).params
    )
    trained = bpd(run.state.params)
    assert np.isfinite(untrained) and untrained > 1.5 * trained, (untrained, trained)


@pytest.mark.slow
def test_learned_schedule_trains_through_the_bound_and_is_checkpointed(tmp_path, data_dir):
    config = ddpm_config.get_config("runlocal")
    config.data.data_dir = data_dir
    config.diffusion.schedule = "learned"
    config.diffusion.loss_type = "vlb"
    config.training.final_bpd = False  # the bound with a learned schedule is still estimated at the eval step
    results = loop.train_and_evaluate(config, str(tmp_path))
    assert os.path.exists(results["samples_png"])
    evals = [r for r in fileio.read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl")) if "test_bpd_est" in r]
    assert evals and np.isfinite(evals[-1]["test_bpd_est"])
    run = load_run(str(tmp_path))
    initial = train_lib.create_train_state(
        run.method, train_lib.make_optimizer(run.config), jax.random.PRNGKey(run.config.seed)
    )
    gamma, gamma0 = run.state.params["gamma"], initial.params["gamma"]
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), gamma, gamma0)
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # the bound's gradient reached the schedule
    log_snr = np.asarray(run.method.apply_fn({"params": run.state.ema_params}, method="log_snr"))
    assert log_snr.shape == (config.diffusion.num_timesteps,) and np.all(np.diff(log_snr) < 0)
    # The simple loss would push a learned schedule towards pure noise: refused with the fix.
    config.diffusion.loss_type = "simple"
    with pytest.raises(ConfigError, match="learned schedule"):
        loop.train_and_evaluate(config, str(tmp_path / "other"))


def test_monotone_gamma_is_increasing_for_any_weights():
    net = learned_schedule.MonotoneGamma(gamma_0=-9.0, gamma_1=10.0)
    tau = jnp.linspace(0.0, 1.0, 257)
    params = net.init(jax.random.PRNGKey(0), tau)
    out = net.apply(params, tau)
    assert float(out[0]) == pytest.approx(-9.0, abs=1e-4) and float(out[-1]) == pytest.approx(10.0, abs=1e-4)
    for seed in range(5):  # random (large) weights of every sign stay monotone
        noisy = jax.tree_util.tree_map(
            lambda p, s=seed: p + 3.0 * jax.random.normal(jax.random.PRNGKey(s), p.shape), params
        )
        assert np.all(np.diff(np.asarray(net.apply(noisy, tau))) > 0)


def test_sampler_choices_are_checked_with_the_fix():
    config = ddpm_config.get_config("runlocal")
    cases = [
        (config, "respaced", None, 0.0, "--steps"),
        (config, "ddim", 10_000, 0.0, "--steps"),
        (config, "ddim", 5, 1.5, "--eta"),
        (config, "plms", 5, 0.0, "not available for method 'ddpm'; use one of ancestral, respaced, ddim"),
    ]
    ve = ddpm_config.get_config("runlocal")
    ve.diffusion.schedule = "ve"
    cases.append((ve, "ddim", 5, 0.0, "variance-preserving"))
    cases.append((vae_config.get_config("runlocal"), "ddim", 5, 0.0, "not available for method 'vae'"))
    for cfg, sampler, steps, eta, message in cases:
        with pytest.raises(ConfigError, match=message):
            methods.from_config(cfg).check_sampler(sampler, steps, eta)
    methods.from_config(config).check_sampler("ddim", 5, 0.0)  # fine


@pytest.mark.slow
def test_checkpointed_config_digest_is_stable(sweep):
    _, out, _ = sweep
    workdir = os.path.join(out, "cells", "ddpm")
    row = json.load(open(os.path.join(workdir, ablate.CELL_FILE)))
    assert configuration.digest(checkpoint.load_config(workdir)) == row["config_digest"]

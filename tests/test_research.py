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
    assert any(np.isfinite(m.get("val_bpd_est", np.nan)) for m in metrics)  # the curve the plot draws

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
    evals = [r for r in fileio.read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl")) if "val_bpd_est" in r]
    assert evals and np.isfinite(evals[-1]["val_bpd_est"])
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


class _Draws:
    """A stand-in method: its bound of an image is params x (the image's mean) + its random draws, t
    drawn as diffusion.bpd_estimate draws it (the device's key, one per example) and eps from the
    example's own key (as the discrete chain's terms do)."""

    def bound_terms(self, params, x, keys, rng, *, num_strata):
        t = jax.random.uniform(rng, (x.shape[0],))
        eps = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
        return {"total_bpd": params * x.mean(axis=(1, 2, 3)) + t + eps}


def test_the_bound_per_image_is_in_split_order_with_common_draws_per_seed():
    """evaluate_bpd(per_image=True) on 4 devices with a padded last batch: every test image's bound in
    the split's order; two cells (other params) of one seed draw the same t and eps per image (the final
    bound's key is PRNGKey(config.seed + 1)): common random numbers; another seed draws others."""
    import functools

    p_bpd = jax.pmap(
        functools.partial(train_lib.bpd_step, method=_Draws(), num_strata=1),
        axis_name=distributed.AXIS,
        in_axes=(0, 0, 0, None),
    )
    images = np.random.default_rng(0).integers(0, 256, (21, 8, 8, 1), dtype=np.uint8)

    def bound(params, seed):
        out = report.evaluate_bpd(
            p_bpd,
            distributed.replicate(jnp.float32(params)),
            images,
            None,
            jax.random.PRNGKey(seed + 1),
            batch_size=8,
            per_image=True,
        )
        assert out["num_examples"] == 21 and out["total_bpd"] == pytest.approx(out["total_bpd_per_image"].mean())
        return out["total_bpd_per_image"]

    draws = bound(0.0, seed=0)
    # Every batch is evaluated with its own key (fold_in(rng, batch)): all 21 images draw distinct t and eps.
    assert draws.shape == (21,) and len(np.unique(draws)) == 21
    means = pipeline.scale_images(images).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(bound(1.0, seed=0) - draws, means, atol=1e-5)  # the split's order
    np.testing.assert_allclose(bound(3.0, seed=0) - 3.0 * means, draws, atol=1e-5)  # same draws: another cell
    assert np.all(np.abs(bound(0.0, seed=1) - draws) > 1e-6)  # another seed, other draws
    assert "total_bpd_per_image" not in report.evaluate_bpd(
        p_bpd, distributed.replicate(jnp.float32(0.0)), images, None, jax.random.PRNGKey(1), batch_size=8
    )


@pytest.mark.slow
def test_seeds_get_their_own_workdirs_resume_and_the_table_pairs_them(sweep, tmp_path, steps_for, monkeypatch, capsys):
    """--seeds=2 on the module's grid: seed 0 reads the sweep's runs back (today's folders), seed 1
    trains into <cell>@seed1 with config.seed 1 (stopped halfway once, then resumed from its
    checkpoint); the table gives the mean ± se over seeds and the difference from the reference cell
    (the first, ddpm) paired by seed and test image, with its interval and verdict."""
    import shutil

    grid, sweep_out, _ = sweep
    shutil.copytree(os.path.join(sweep_out, "cells"), tmp_path / "cells")
    out = str(tmp_path)
    train = loop.train_and_evaluate

    def steps_of(config):  # the compiled steps do not depend on the seed: reuse the sweep's
        unseeded = config.copy_and_resolve_references()
        unseeded.seed = 0
        return steps_for(unseeded)

    def stop_halfway(config, workdir, **kw):
        stop = 30 if workdir.endswith(os.path.join("ddpm@seed1")) else None
        return train(config, workdir, steps=steps_of(config), stop_at_step=stop)

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(loop, "train_and_evaluate", stop_halfway)
    assert ablate.run_grid(grid, out, seeds=2, num_samples=16) is None  # pre-empted in ddpm@seed1
    printed = capsys.readouterr().out
    assert "Plan: 2 cell(s) x 2 seed(s) = 4 runs" in printed and "2 finished, 2 to run" in printed
    seed1 = os.path.join(out, "cells", "ddpm@seed1")
    assert not os.path.exists(os.path.join(seed1, ablate.CELL_FILE))
    assert checkpoint.load_config(seed1).seed == 1

    monkeypatch.setattr(loop, "train_and_evaluate", lambda c, w, **kw: train(c, w, steps=steps_of(c), **kw))
    rows = ablate.run_grid(grid, out, seeds=2, num_samples=16)
    printed = capsys.readouterr().out
    assert "Resuming from the checkpoint at step 30" in printed
    assert "for the 1 run(s) left" in printed  # the estimate after the first run it trained
    runs = {}
    for name in ("ddpm", "ddpm@seed1", "vae", "vae@seed1"):
        run = json.load(open(os.path.join(out, "cells", name, ablate.CELL_FILE)))
        per_image = fileio.load_npz(os.path.join(out, "cells", name, report.BOUND_PER_IMAGE))["total_bpd"]
        assert per_image.shape == (297,) and per_image.mean() == pytest.approx(run["total_bpd"], rel=1e-5)
        assert run["steps"] == 60 and run["seed"] == run["seed_index"] == (1 if "@" in name else 0)
        runs[name] = run
    assert runs["ddpm"]["total_bpd"] != runs["ddpm@seed1"]["total_bpd"]  # another init, data order, noise

    by_cell = {r["cell"]: r for r in rows}
    ddpm, vae = by_cell["ddpm"], by_cell["vae"]
    assert ddpm["seeds"] == vae["seeds"] == 2 and ddpm["total_bpd_verdict"] == "reference"
    pair = [runs["vae"]["total_bpd"], runs["vae@seed1"]["total_bpd"]]
    assert vae["total_bpd"] == pytest.approx(np.mean(pair))
    assert vae["total_bpd_se"] == pytest.approx(abs(pair[0] - pair[1]) / 2) and vae["se_over"] == "seeds"
    want = np.mean(pair) - np.mean([runs["ddpm"]["total_bpd"], runs["ddpm@seed1"]["total_bpd"]])
    assert vae["total_bpd_diff"] == pytest.approx(want, rel=1e-5)
    assert vae["total_bpd_diff_lo"] < vae["total_bpd_diff"] < vae["total_bpd_diff_hi"]
    assert vae["total_bpd_interval"].startswith("seeds x images; 2 paired seed(s) x 297 images")
    assert vae["total_bpd_verdict"] in ("better", "worse", "within noise")
    assert vae["fd_interval"].startswith("seeds; 2 paired") and "fd_diff" in vae
    table = open(os.path.join(out, "grid", "results.md")).read()
    assert (
        "2 seed(s) per cell, chosen on the validation split (150 images), measured on the test split (297 images)"
        in table
    )
    assert all(
        h in table for h in ("Δ total_bpd [95%]", "bpd verdict", "Δ fd [95%]", "fd verdict", vae["total_bpd_verdict"])
    )
    header = open(os.path.join(out, "grid", "results.csv")).readline().strip().split(",")
    for col in (
        "total_bpd_diff",
        "total_bpd_diff_lo",
        "total_bpd_diff_hi",
        "total_bpd_verdict",
        "fd_verdict",
        "seeds",
        "split",
    ):
        assert col in header, col
    by_seed = open(os.path.join(out, "grid", "results_by_seed.csv")).read().strip().splitlines()
    assert len(by_seed) == 5 and by_seed[0].startswith("cell,seed_index,seed,run")
    assert os.path.exists(os.path.join(out, "grid", "bpd_vs_step.png"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "train_and_evaluate", no_training)
    again = ablate.run_grid(grid, out, seeds=2, num_samples=16)
    assert [(r["cell"], r.get("total_bpd_diff")) for r in again] == [(r["cell"], r.get("total_bpd_diff")) for r in rows]
    assert "4 finished, 0 to run" in capsys.readouterr().out
    # --notrain: the tables of what has finished (2 of 3 seeds), nothing trained.
    partial = ablate.run_grid(grid, out, seeds=3, train=False, num_samples=16)
    assert "4 finished, 2 to run (not now: --notrain)" in capsys.readouterr().out
    assert [(r["cell"], r.get("seeds"), r.get("total_bpd_diff")) for r in partial] == [
        (r["cell"], r.get("seeds"), r.get("total_bpd_diff")) for r in rows
    ]

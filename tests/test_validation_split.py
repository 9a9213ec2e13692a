"""The validation split (issue 23): the holdout rule, its shards, streaming and folders; training on the
training set, choosing on the validation split (training.keep_best) and reading the test split once; each
eval batch with its own key."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import ddpm as ddpm_config
from ddpm_jax.data import pipeline, splits
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import plots, report
from ddpm_jax.training import checkpoint, loop
from ddpm_jax.training.validation import validate_config

from helpers import fault_utils as fu


def _config(data_dir, **data):
    config = ddpm_config.get_config("runlocal")
    config.data.data_dir = data_dir
    for k, v in data.items():
        config.data[k] = v
    return config


def _reference_holdout(num_images: int, n: int) -> np.ndarray:
    """The documented rule, written independently: shuffle 0..N-1 with RandomState(20261206), take the first n."""
    order = np.arange(num_images)
    np.random.RandomState(20261206).shuffle(order)  # the same stream as permutation(N)
    return np.array(sorted(order[:n].tolist()), np.int64)


@pytest.mark.parametrize("num_images,size,n", [(1500, 0.1, 150), (1500, 150, 150), (1500, 150.0, 150), (7, 0.5, 4)])
def test_the_rule_against_an_independent_computation(num_images, size, n):
    assert splits.HOLDOUT_SEED == 20261206
    assert splits.holdout_count(size, num_images) == n
    np.testing.assert_array_equal(splits.holdout_indices(num_images, size), _reference_holdout(num_images, n))


def test_digits_train_and_validation_are_the_rule_s_two_sides(data_dir):
    everything = pipeline.load_images("digits", "train", data_dir)  # the whole train split, stored order
    held = _reference_holdout(1500, 150)
    kept = np.setdiff1d(np.arange(1500), held)
    assert len(kept) == 1350 and len(np.intersect1d(kept, held)) == 0 and len(np.union1d(kept, held)) == 1500
    config = _config(data_dir)
    train, val = splits.load_train(config), splits.load_validation(config)
    np.testing.assert_array_equal(train, everything[kept])
    np.testing.assert_array_equal(val, everything[held])
    assert len(train) == 1350 and len(val) == 150
    config.seed = 7  # the rule does not depend on the run's seed
    np.testing.assert_array_equal(splits.load_validation(config), val)
    # Streamed: the same images, read by index through StreamedSplit.subset.
    streamed = _config(data_dir, in_memory=False)
    s_train, s_val = splits.load_train(streamed), splits.load_validation(streamed)
    assert isinstance(s_train, pipeline.StreamedSplit) and len(s_val) == 150
    np.testing.assert_array_equal(s_train[:], train)
    np.testing.assert_array_equal(s_val.read(np.arange(149, -1, -1)), val[::-1])


@pytest.mark.parametrize("count", [3, 7])
def test_process_shards_hold_exactly_the_global_rule_s_images(data_dir, count):
    config = _config(data_dir)
    train, val = splits.load_train(config), splits.load_validation(config)
    shards = [
        (splits.load_train(config, process_index=k, process_count=count),
         splits.load_validation(config, process_index=k, process_count=count))
        for k in range(count)
    ]  # fmt: skip
    # tfds.even_splits shards the stored order into contiguous ranges: concatenated, they are the global sets.
    np.testing.assert_array_equal(np.concatenate([t for t, _ in shards]), train)
    np.testing.assert_array_equal(np.concatenate([v for _, v in shards]), val)
    streamed = _config(data_dir, in_memory=False)
    np.testing.assert_array_equal(
        splits.load_validation(streamed, process_index=1, process_count=count)[:], shards[1][1]
    )


def test_a_folder_dataset_holds_out_by_the_same_rule(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 8, 8), dtype=np.uint8)
    for split, names in (("train", range(20)), ("test", range(20, 23))):
        os.makedirs(tmp_path / split)
        for i in names:
            Image.fromarray(pixels[i]).save(tmp_path / split / f"img{i:02d}.png")
    config = _config(None, dataset=f"folder:{tmp_path}", validation_size=5)
    held = _reference_holdout(20, 5)
    np.testing.assert_array_equal(splits.load_validation(config)[..., 0], pixels[held])
    np.testing.assert_array_equal(splits.load_train(config)[..., 0], pixels[np.setdiff1d(np.arange(20), held)])
    shards = [splits.load_validation(config, process_index=k, process_count=3) for k in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards)[..., 0], pixels[held])
    config.data.in_memory = False
    np.testing.assert_array_equal(splits.load_train(config, process_index=2, process_count=3)[:][..., 0],
                                  pixels[[i for i in range(14, 20) if i not in held]])  # fmt: skip


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("validation_size", 0.0, "neither in"),
        ("validation_size", 1.5, "neither in"),
        ("validation_size", "a tenth", "not a number"),
        ("validation_split", "test", "also the test split"),
        ("validation_split", "", "validation_split"),
    ],
)
def test_bad_fields_are_refused_before_anything_is_built(field, value, match):
    config = ddpm_config.get_config("runlocal")
    if isinstance(value, str) and field == "validation_size":
        del config.data[field]  # ConfigDict would refuse the type change itself
    config.data[field] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=1)


@pytest.mark.parametrize("size,side", [(0.0001, "no validation image"), (1500, "no training image")])
def test_a_holdout_that_empties_a_side_is_refused(data_dir, size, side):
    with pytest.raises(ConfigError, match=f"validation_size.*{side}"):
        splits.load_train(_config(data_dir, validation_size=size))


def test_an_unknown_validation_split_names_the_dataset_s_splits(data_dir):
    with pytest.raises(ConfigError, match=r"validation_split='validation'.*available splits: .*'test'"):
        splits.load_validation(_config(data_dir, validation_split="validation"))
    named = _config(data_dir, validation_split="train[:10]", train_split="train[10:]")  # a named split: used whole
    assert len(splits.load_train(named)) == 1490 and len(splits.load_validation(named)) == 10


# ----------------------------------------------------------------------------- each eval batch its own key


@jax.jit
def _fake_bpd_step(batch, mask, rng):
    """bpd_step's outputs, as the first device of a pmap returns them, for per-example values ~ N(0, 1) drawn
    from the batch's key (what a bound estimate's t and eps draws make random)."""
    x = jax.random.normal(rng, mask.shape)
    m = mask.astype(jnp.float32)
    sums = {"total_bpd": jnp.sum(x * m), "total_bpd_sq": jnp.sum(x**2 * m), "count": jnp.sum(m)}
    sums["per_example"] = {"total_bpd": x.reshape(-1), "mask": m.reshape(-1)}
    return jax.tree_util.tree_map(lambda v: v[None], sums)


def test_each_eval_batch_draws_its_own_noise_and_the_se_is_honest():
    config = ddpm_config.get_config("runlocal")  # batch 8: 6 batches of the 48 images
    images = np.zeros((48, 8, 8, 1), np.uint8)
    step = lambda params, batch, mask, rng: _fake_bpd_step(batch, mask, rng)
    first = report.evaluate_bpd(step, None, images, config, jax.random.PRNGKey(0), per_image=True)
    each = first["total_bpd_per_image"].reshape(6, 8)
    assert all(not np.allclose(each[0], each[i]) for i in range(1, 6))  # batches differ
    # Over R repetitions the means' spread must match the reported se (a shared key: K = 6 times too small).
    reps = [report.evaluate_bpd(step, None, images, config, jax.random.PRNGKey(r)) for r in range(1, 161)]
    means = np.array([r["total_bpd"] for r in reps], np.float64)
    se2 = np.mean([r["total_bpd_se"] ** 2 for r in reps])
    assert se2 == pytest.approx(1 / 48, rel=0.08)  # the per-example variance is 1
    ratio = means.var(ddof=1) / se2  # ~ chi2(159) / 159: sd 0.11; 6 with one key for all batches
    assert 0.65 < ratio < 1.45, ratio
    assert abs(means.mean()) < 4 * np.sqrt(1 / (48 * 160))


# ----------------------------------------------------------------------------- the loop: keep_best, the test split


def test_loss_png_draws_the_validation_curves(monkeypatch):
    drawn = []
    real = plots._curves
    monkeypatch.setattr(
        plots, "_curves", lambda ax, records, keys, labels=None: drawn.append(keys) or real(ax, records, keys, labels)
    )
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: path)
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 10)] + [{"step": 9, "val_loss": 0.3, "val_bpd_est": 4.0}]
    assert plots.plot_loss(records, "loss.png", loss_unit="MSE") == "loss.png"
    assert "val_loss" in drawn[0] and "val_bpd_est" in drawn[1]
    assert plots.LOSS_LABELS["val_bpd_est"].startswith("validation")


def _run_config(data_dir, **overrides):
    """test_faults' micro config (its compiled steps are shared: `_steps`), 6 steps with evals at 2, 4, 6."""
    return fu.micro_config(data_dir, **{"training.num_train_steps": 6, "training.eval_every": 2, **overrides})


def _steps(steps_for, data_dir):
    """The micro config's compiled steps (its lr schedule spans 12 steps, not 6: nothing here depends on it)."""
    return steps_for(fu.micro_config(data_dir))


@pytest.fixture(scope="module")
def keep_best_runs(tmp_path_factory, data_dir, steps_for):
    """Two runs of 6 steps with evals at 2, 4, 6 whose val_bpd_est is forced to 3, 1, 2: one straight, one
    stopped at step 5 and resumed. Records every split read and how many steps had trained by then."""
    config = _run_config(data_dir, **{"training.final_bpd": True})
    steps = _steps(steps_for, data_dir)
    trained = [0]

    def p_train(rstate, batch):
        trained[0] += 1
        return steps.p_train(rstate, batch)

    counted = dataclasses.replace(steps, p_train=p_train)
    forced = iter([3.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    real_eval, real_load = report.evaluate_loss, splits.load_split
    reads = []

    def fake_eval(*args, **kwargs):
        return {**real_eval(*args, **kwargs), "val_bpd_est": next(forced)}

    def load_split(cfg, split, **shard):
        reads.append((split, trained[0]))
        return real_load(cfg, split, **shard)

    root = tmp_path_factory.mktemp("keep_best")
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "evaluate_loss", fake_eval)
    mp.setattr(splits, "load_split", load_split)
    try:
        straight = loop.train_and_evaluate(config, str(root / "straight"), steps=counted)
        straight_reads, trained[0] = list(reads), 0
        config.training.final_bpd = False  # the resumed run's selection only
        assert loop.train_and_evaluate(config, str(root / "resumed"), stop_at_step=5, steps=counted)["stopped_at"] == 5
        resumed = loop.train_and_evaluate(config, str(root / "resumed"), steps=counted)
        config.training.final_bpd = True
    finally:
        mp.undo()
    return config, steps, root, straight, resumed, straight_reads


def test_keep_best_reports_the_lowest_validation_step(keep_best_runs):
    config, steps, root, straight, resumed, _ = keep_best_runs
    for results in (straight, resumed):
        assert results["step"] == 6
        assert (results["selected_step"], results["selected_by"], results["selected_value"]) == (4, "val_bpd_est", 1.0)
    assert straight["val_num_examples"] == 150 and straight["num_examples"] == 297
    saved = json.loads((root / "straight" / "results.json").read_text())
    assert saved["selected_step"] == 4
    # The kept params are step 4's EMA params (the checkpoint at 4), and the final test bound is theirs.
    mngr = checkpoint.make_manager(str(root / "straight"), read_only=True)
    at_4 = mngr.restore(4)["ema_params"]
    best = checkpoint.make_best_manager(str(root / "straight"), read_only=True)
    assert checkpoint.read_best(best) == checkpoint.Best(4, "val_bpd_est", 1.0)
    kept = checkpoint.restore_best_params(best, 4, at_4)
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, at_4)
    from ddpm_jax.training import distributed

    test_images = splits.load_split(config, "test")
    bound = lambda params: report.evaluate_bpd(
        steps.p_bpd,
        distributed.replicate(params),
        test_images,
        config,
        jax.random.PRNGKey(config.seed + 1),
        num_batches=report.num_eval_batches(test_images, config.training.batch_size),
    )["total_bpd"]
    assert straight["total_bpd"] == pytest.approx(bound(at_4), rel=1e-6)
    assert straight["total_bpd"] != pytest.approx(bound(mngr.restore(6)["ema_params"]), rel=1e-6)


def test_the_test_split_is_read_once_after_training(keep_best_runs):
    *_, reads = keep_best_runs
    assert [r for r in reads if r[0] == "test"] == [("test", 6)]  # after the 6th step, once
    assert all(split == "train" and done == 0 for split, done in reads if split != "test")


def test_keep_best_off_reports_the_last_step(tmp_path, data_dir, steps_for):
    config = _run_config(data_dir, **{"training.keep_best": False})
    results = loop.train_and_evaluate(config, str(tmp_path), steps=_steps(steps_for, data_dir))
    assert (results["selected_step"], results["selected_by"]) == (6, "last step")
    assert not (tmp_path / checkpoint.BEST_DIR).exists()
    # Each part of the final report is timed, and together they fit inside the run's wall time.
    seconds = results["final_report_s"]
    assert list(seconds) == report.final_evaluators(config) and all(s >= 0 for s in seconds.values())
    assert sum(seconds.values()) <= results["wall_time_s"]


def test_evaluate_scores_the_best_params_on_either_split(keep_best_runs):
    from ddpm_jax import load_run
    from ddpm_jax.commands import evaluate

    _, _, root, straight, *_ = keep_best_runs
    workdir = str(root / "straight")
    assert load_run(workdir, which="best").step == 4
    out = evaluate.evaluate_workdir(workdir, params="best", quality=False, strata=2, split="validation")
    assert out["num_examples"] == 150 and out["split"] == "validation" and out["step"] == 4
    assert os.path.exists(os.path.join(workdir, "eval", "best_validation.json"))

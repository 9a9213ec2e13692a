"""FID reference statistics (specs, the standard .npz format, the cache) and `ddpm-evaluate --fid` end to
end on a tiny trained digits run with random Inception weights in the real file format, checked against
torch-fidelity's extractor and metric functions on the same samples.

The Inception network costs about half a second per image on this CPU (its input is 299x299 whatever
the image size), so the end-to-end test scores NUM samples against a folder of NUM images; the
statistics tests use a cheap stand-in for the features (a fixed random projection of the pixels).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_jax import fileio
from ddpm_jax.commands import ablate, evaluate
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.data import pipeline
from ddpm_jax.errors import ConfigError, DataError
from ddpm_jax.evaluation import fid, fid_metrics, fid_reference
from ddpm_jax.run import load_run
from ddpm_jax.training import loop, train_lib, validation

from helpers.torch_fidelity_metrics import metric_modules
from helpers.torch_fidelity_ref import reference_extractor, reference_features, write_random_inception_pth

NUM = 4  # samples and reference images of the end-to-end test (one per device)


def _projection_features(dim=6, seed=0):
    """A stand-in for the Inception: features_of(batches) -> {"pool": pixels @ W}, counting the images seen."""
    weights = {}

    def features_of(batches):
        for batch in batches:
            flat = batch.reshape(len(batch), -1).astype(np.float64) / 255.0
            if flat.shape[1] not in weights:
                weights[flat.shape[1]] = np.random.default_rng(seed).normal(size=(flat.shape[1], dim))
            features_of.seen += len(batch)
            yield {"pool": flat @ weights[flat.shape[1]]}

    features_of.seen = 0
    return features_of


def _write_folder(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def test_reference_specs_and_their_errors(tmp_path):
    assert fid_reference.parse_spec("cifar10:train") == fid_reference.Spec("dataset", "cifar10", "train")
    assert fid_reference.parse_spec("mnist:train[:10%]").split == "train[:10%]"
    assert fid_reference.parse_spec("folder:/data/x:y") == fid_reference.Spec("folder", path="/data/x:y")
    assert fid_reference.parse_spec("stats/cifar10.NPZ") == fid_reference.Spec("npz", path="stats/cifar10.NPZ")
    for bad in ("cifar10", "", "folder:", ":train", "cifar 10:train"):
        with pytest.raises(ConfigError, match=r"'<dataset>:<split>'.*'folder:PATH'.*\.npz"):
            fid_reference.parse_spec(bad)
    with pytest.raises(DataError, match="no such file"):
        fid_reference.reference_statistics(str(tmp_path / "missing.npz"), _projection_features(), "w")
    with pytest.raises(DataError, match="no such folder"):
        fid_reference.reference_statistics(f"folder:{tmp_path / 'nothing'}", _projection_features(), "w")


def test_statistics_npz_is_the_standard_format(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=5), rng.normal(size=(5, 5))
    sigma = a @ a.T
    # A file as pytorch-fid / TTUR write it: only mu and sigma (float32 here).
    np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    theirs = fid_reference.load_statistics(str(tmp_path / "theirs.npz"))
    assert theirs.kid_features is None and theirs.mu.dtype == np.float64
    np.testing.assert_array_equal(theirs.sigma, sigma.astype(np.float32))
    # Ours: mu and sigma under the standard keys, plus the KID features and the count.
    stats = fid_reference.Statistics(mu, sigma, rng.normal(size=(3, 5)), 3)
    path = fid_reference.save_statistics(str(tmp_path / "ours.npz"), stats)
    with np.load(path) as raw:
        np.testing.assert_array_equal(raw["mu"], mu)
        np.testing.assert_array_equal(raw["sigma"], sigma)
    back = fid_reference.load_statistics(path)
    assert back.num_images == 3 and back.kid_features.shape == (3, 5)
    np.testing.assert_array_equal(back.mu, mu)
    np.savez(tmp_path / "bad.npz", mean=mu, cov=sigma)
    with pytest.raises(DataError, match=r"expected 'mu' \[D\] and 'sigma' \[D, D\]"):
        fid_reference.load_statistics(str(tmp_path / "bad.npz"))


def test_folder_reference_is_computed_once_then_read_from_the_cache(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (13, 5, 5, 3), np.uint8)
    folder = _write_folder(tmp_path / "imgs", images)
    spec, cache = f"folder:{folder}", str(tmp_path / "cache")
    features_of = _projection_features()
    stats = fid_reference.reference_statistics(spec, features_of, "w1", cache_root=cache, batch_size=4)
    want = next(_projection_features()([images]))["pool"]  # the same stand-in on all images at once
    np.testing.assert_allclose(stats.mu, want.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(want, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(np.sort(stats.kid_features, axis=0), np.sort(want, axis=0).astype(np.float32))
    assert stats.num_images == 13 and features_of.seen == 13
    (cached,) = os.listdir(os.path.join(cache, fid_reference.CACHE_SUBDIR))
    again = fid_reference.reference_statistics(spec, features_of, "w1", cache_root=cache)
    assert features_of.seen == 13 and "cached in" in again.source  # read back, not recomputed
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    # Other Inception weights, or a changed folder, are another key.
    fid_reference.reference_statistics(spec, features_of, "w2", cache_root=cache)
    assert features_of.seen == 26
    Image.fromarray(images[0]).save(os.path.join(folder, "extra.png"))
    fid_reference.reference_statistics(spec, features_of, "w1", cache_root=cache)
    assert features_of.seen == 40 and len(os.listdir(os.path.join(cache, fid_reference.CACHE_SUBDIR))) == 3
    Image.fromarray(images[0, :4]).save(os.path.join(folder, "odd.png"))  # last in sorted order: a later batch
    with pytest.raises(DataError, match=r"several sizes \(.*odd.png is \(4, 5, 3\)"):
        fid_reference.reference_statistics(spec, features_of, "w1", cache_root="", batch_size=4)


def test_dataset_reference_reads_the_split_with_the_data_pipeline(data_dir, tmp_path):
    features_of = _projection_features()
    stats = fid_reference.reference_statistics(
        "digits:test", features_of, "w", data_dir=data_dir, image_size=8, channels=1, cache_root=str(tmp_path)
    )
    images = pipeline.load_images("digits", "test", data_dir)
    want = next(_projection_features()([images]))["pool"]
    assert stats.num_images == len(images) == 297
    np.testing.assert_allclose(stats.sigma, np.cov(want, rowvar=False), rtol=1e-10)
    config = ddpm_config.get_config()
    assert fid.default_reference(config) == fid_reference.Spec("dataset", "digits", "train")


def test_fid_config_fields_are_checked_and_off_by_default(monkeypatch, tmp_path):
    config = ddpm_config.get_config("runlocal")
    assert config.training.fid_every == 0 and fid.training_evaluator(config) is None
    config.training.fid_every = -1
    with pytest.raises(ConfigError, match="config.training.fid_every: must be 0"):
        validation.validate_config(config, num_devices=4)
    config.training.fid_every = 10
    monkeypatch.delenv("DDPM_JAX_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="fid_every=10 needs the FID Inception weights.*DDPM_JAX_INCEPTION_WEIGHTS"):
        fid.training_evaluator(config)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir, steps_for):
    """A 4-step digits run (test_train's test_resume_is_exact config: its compiled steps are shared),
    random Inception weights in the real .pth format, and a folder of NUM test digits."""
    tmp = tmp_path_factory.mktemp("fid")
    config = ddpm_config.get_config("runlocal")
    config.data.data_dir = data_dir
    config.training.final_bpd = False
    for k, v in dict(num_train_steps=4, checkpoint_every=2, eval_every=100, sample_every=100).items():
        config.training[k] = v
    steps = steps_for(config)
    workdir = str(tmp / "run")
    loop.train_and_evaluate(config, workdir, steps=steps)
    weights = write_random_inception_pth(tmp / "inception.pth", seed=0)
    folder = _write_folder(tmp / "reference", pipeline.load_images("digits", "test", data_dir)[:NUM])
    return workdir, steps, weights, folder


@pytest.mark.slow
def test_evaluate_fid_writes_fid_is_and_kid_equal_to_torch_fidelitys(tiny_run, monkeypatch):
    workdir, steps, weights, folder = tiny_run
    monkeypatch.setattr(train_lib, "compile_steps", lambda *a, **k: steps)  # the run's compiled steps
    drawn = []
    sample_batches = fid.sample_batches

    def recording(*args, **kwargs):
        for batch in sample_batches(*args, **kwargs):
            drawn.append(batch.copy())
            yield batch

    monkeypatch.setattr(fid, "sample_batches", recording)
    before = fileio.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    result = evaluate.evaluate_workdir(
        workdir,
        bpd=False,
        quality=False,
        num_samples=NUM,
        fid=True,
        fid_reference=f"folder:{folder}",
        inception_weights=weights,
    )
    samples = np.concatenate(drawn)
    assert samples.shape == (NUM, 8, 8, 1) and samples.dtype == np.uint8
    assert result["fid_sampler"] == "ancestral" and result["fid_num_samples"] == NUM
    # The same numbers from torch-fidelity's Inception on the same images: IS and KID by its metric
    # functions; FID by the low-rank closed form (its eigvals of a 2048^2 product takes ~25 s here): with
    # centred features X [n, D], Y [m, D], sigma1 sigma2 has the nonzero eigenvalues of B B^T,
    # B = X Y^T / sqrt((n - 1)(m - 1)), so tr sqrt(sigma1 sigma2) is B's nuclear norm.
    _, metric_isc, metric_kid = metric_modules()
    extractor = reference_extractor(weights)
    ours = reference_features(extractor, samples)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    ref = reference_features(extractor, np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    t = lambda x: torch.from_numpy(np.asarray(x, np.float64))
    x, y = np.float64(ours["pool"]), np.float64(ref["pool"])
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T / np.sqrt((len(x) - 1) * (len(y) - 1)), compute_uv=False).sum()
    traces = (xc**2).sum() / (len(x) - 1) + (yc**2).sum() / (len(y) - 1)
    want_fid = np.sum((x.mean(0) - y.mean(0)) ** 2) + traces - 2 * nuclear
    want_is = metric_isc.isc_features_to_metric(t(ours["logits_unbiased"]), splits=NUM)
    want_kid = metric_kid.kid_features_to_metric(t(ours["pool"]), t(ref["pool"]), kid_subset_size=NUM, verbose=False)
    assert result["fid"] == pytest.approx(want_fid, rel=1e-4)  # float32 features: 1.4e-6 apart when written
    assert result["inception_score"] == pytest.approx(want_is[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-4)
    assert result["kid"] == pytest.approx(want_kid[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-4)
    assert result["kid_subset_size"] == NUM
    # Written to eval/ema.json, results.json and the run's metrics.
    for path in ("eval/ema.json", "results.json"):
        written = json.loads(open(os.path.join(workdir, path)).read())
        assert all(written[k] == result[k] for k in ("fid", "inception_score", "inception_score_std", "kid", "kid_std"))
    records = fileio.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert records[:-1] == before  # appended, nothing trimmed
    assert records[-1]["fid"] == result["fid"] and records[-1]["step"] == 4
    # The training loop's action finds the weights through the environment, without a download.
    config = load_run(workdir).config
    config.training.fid_every, config.training.fid_num_samples = 2, NUM
    monkeypatch.setenv("DDPM_JAX_INCEPTION_WEIGHTS", weights)
    evaluator = fid.training_evaluator(config)
    assert evaluator.weights_path == weights and evaluator.num_samples == NUM
    assert evaluator.spec == fid_reference.Spec("dataset", "digits", "train")


def test_streamed_sample_metrics_equal_the_one_shot_functions():
    rng = np.random.default_rng(3)
    pool, logits = rng.normal(size=(30, 6)) ** 2, rng.normal(size=(30, 12))
    ref_pool = rng.normal(size=(20, 6)) ** 2 + 0.1
    reference = fid_reference.Statistics(ref_pool.mean(0), np.cov(ref_pool, rowvar=False), ref_pool)
    acc = fid.SampleAccumulator(30, kid_pool=25)
    for a, b in ((0, 7), (7, 7), (7, 30)):
        acc.update({"pool": pool[a:b], "logits_unbiased": logits[a:b]})
    out = acc.metrics(reference, kid_subset_size=15)
    want_fid = fid_metrics.frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), reference.mu, reference.sigma)
    assert out["fid"] == pytest.approx(want_fid, rel=1e-10)
    assert (out["inception_score"], out["inception_score_std"]) == pytest.approx(fid_metrics.inception_score(logits))
    kept = pool[:25].astype(np.float32)  # the first 25, kept as the network gives them (float32)
    want_kid = fid_metrics.kernel_inception_distance(kept, ref_pool, subset_size=15)
    assert (out["kid"], out["kid_std"]) == pytest.approx(want_kid, rel=1e-10)
    no_kid = acc.metrics(fid_reference.Statistics(reference.mu, reference.sigma))  # a bare mu/sigma file
    assert "kid" not in no_kid and no_kid["fid"] == out["fid"]


def test_ablation_table_has_fid_columns_only_where_runs_have_fid(tmp_path):
    with_fid = {s: {"total_bpd": 1.0 + s, "fid": 10.0 + s, "inception_score": 2.0, "kid": 0.1} for s in (0, 1)}
    shifted = {s: {**r, "fid": r["fid"] + 5.0 + 0.1 * s} for s, r in with_fid.items()}
    rows = ablate.summarize(["a", "b"], "a", {"a": with_fid, "b": shifted})
    assert rows[1]["fid"] == pytest.approx(15.55) and rows[1]["fid_diff"] == pytest.approx(5.05)
    ablate.write_tables(rows, str(tmp_path / "with"))
    header = open(tmp_path / "with" / "results.md").readline()
    assert "| FID | Δ FID [95%] | FID verdict | IS | KID |" in header
    without = {s: {"total_bpd": 1.0 + s} for s in (0, 1)}
    ablate.write_tables(ablate.summarize(["a"], "a", {"a": without}), str(tmp_path / "without"))
    assert "FID" not in open(tmp_path / "without" / "results.md").readline()


def test_ablation_says_once_that_it_has_no_fid_weights(tmp_path, data_dir, monkeypatch, capsys):
    grid = tmp_path / "grid.py"
    grid.write_text('def get_grid():\n    return {"base": "ddpm:runlocal", "cells": {"a": {}, "b": {}}}\n')
    monkeypatch.setattr(fid, "find_inception_weights", lambda path=None: None)
    ablate.run_grid(str(grid), str(tmp_path / "out"), train=False)
    assert capsys.readouterr().out.count("No FID Inception weights found") == 1
    monkeypatch.setattr(fid, "find_inception_weights", lambda path=None: "/weights.pth")
    ablate.run_grid(str(grid), str(tmp_path / "out"), train=False)
    assert "No FID Inception weights" not in capsys.readouterr().out

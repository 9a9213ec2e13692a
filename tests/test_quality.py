"""Tests for ddpm_jax.core.quality (Fréchet distance, classifier score) and the digits classifier."""

import numpy as np
import pytest

from ddpm_jax.core import quality
from ddpm_jax.evaluation import digits_classifier as dc

# ----------------------------------------------------------------------------- Fréchet distance


def _features(n=400, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated features


def _random_spd(d, rng):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def test_feature_stats_float64():
    mu, sigma = quality.feature_stats(_features().astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    with pytest.raises(ValueError, match="N >= 2"):
        quality.feature_stats(np.zeros((1, 8)))


def test_fd_of_a_set_with_itself_is_zero():
    f = _features()
    assert abs(quality.frechet_distance_from_features(f, f)) < 1e-6


def test_fd_grows_with_mean_shift_and_equals_its_square_norm():
    f = _features()
    direction = np.linspace(-1.0, 1.0, f.shape[1])
    fds = [quality.frechet_distance_from_features(f, f + s * direction) for s in (0, 0.5, 1, 2)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    for s, fd in zip((0.5, 1, 2), fds[1:]):
        expected = np.sum((s * direction) ** 2)
        assert fd == pytest.approx(expected, rel=1e-6)


def test_fd_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = quality.frechet_distance(m1, np.diag(a), m2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fd_full_covariances_against_eigendecomposition():
    rng = np.random.default_rng(2)
    d = 12
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    r1 = _sqrt_psd(s1)  # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), the latter symmetric
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1))
    got = quality.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_singular_covariances_against_eigendecomposition():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))  # rank-4 covariances
    fd = quality.frechet_distance_from_features(f1, f2)
    m1, s1, m2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    r1 = _sqrt_psd(s1)  # exact for singular PSD matrices, where sqrtm(S1 S2) may need the eps * I offset
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1))  # 63.1
    # The offset eps = 1e-6, if used, moves the value by about 4e-6 relative.
    assert fd == pytest.approx(expected, rel=1e-5)


def test_fd_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[D, D\]"):
        quality.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):  # not positive semi-definite
        quality.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- classifier score


def test_classifier_score_uniform_is_one():
    assert quality.classifier_score(np.full((50, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 10])
def test_classifier_score_confident_and_even_is_k(k):
    probs = np.eye(10)[np.arange(10 * k) % k]  # one-hot, evenly over the first k classes
    assert quality.classifier_score(probs) == pytest.approx(k, rel=1e-12)


def test_classifier_score_rejects_unnormalised():
    with pytest.raises(ValueError, match="sum to 1"):
        quality.classifier_score(np.ones((4, 10)))


# ----------------------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classifier_cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return dc.load_or_train(cache_dir, seed=0)


def test_digits_split_matches_tfds():
    from ddpm_jax.data import pipeline

    images, labels = dc.digits_split("test")
    assert images.shape == (297, 8, 8, 1) and labels.shape == (297,)
    np.testing.assert_array_equal(images, pipeline.scale_images(pipeline.load_images("digits", "test")))
    assert set(np.unique(labels)) == set(range(10))


def test_classifier_accuracy(classifier):
    assert dc.accuracy(classifier, "test") >= 0.95


def test_training_is_deterministic(classifier):
    again = dc._train(seed=0)
    for a, b in zip(dc.jax.tree.leaves(classifier.params), dc.jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_features_and_probs_shapes(classifier):
    images, _ = dc.digits_split("test")
    feats, probs = dc.features_and_probs(classifier, images[:300])  # 297: one padded batch
    assert feats.shape == (297, dc.FEATURE_DIM) and probs.shape == (297, 10)
    assert feats.dtype == probs.dtype == np.float64
    # The values: the network's features, and the softmax of its logits (float64 here, float32 there);
    # a sum-to-1 check could not fail, as the function renormalises.
    ref_feats, logits = (np.asarray(a, np.float64) for a in classifier.apply_fn(classifier.params, images))
    ref_probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    ref_probs /= ref_probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)
    single, _ = dc.features_and_probs(classifier, images[5:6])  # batching does not matter
    np.testing.assert_allclose(single[0], feats[5], rtol=1e-5, atol=1e-5)


def test_cache_round_trip(classifier, cache_dir):
    path = dc.cache_path(cache_dir, 0)
    assert [p for p in dc.os.listdir(cache_dir)] == [dc.os.path.basename(path)]  # no tmp left
    dc._MEMORY_CACHE.pop((cache_dir, 0))
    loaded = dc.load_or_train(cache_dir, seed=0)
    assert loaded is not classifier
    images, _ = dc.digits_split("test")
    np.testing.assert_array_equal(
        dc.features_and_probs(loaded, images)[0], dc.features_and_probs(classifier, images)[0]
    )
    assert dc.load_or_train(cache_dir, seed=0) is loaded  # in-process cache


@pytest.mark.parametrize(
    "content",
    [
        b"\x00garbage\xff" * 7,  # not msgpack
        dc.flax.serialization.to_bytes({"Dense_0": {"kernel": np.zeros((3, 3), np.float32)}}),
    ],
)
def test_damaged_cache_is_retrained(classifier, tmp_path, monkeypatch, content):
    path = dc.cache_path(str(tmp_path), 0)
    with open(path, "wb") as f:
        f.write(content)
    calls = []
    monkeypatch.setattr(dc, "_train", lambda seed: calls.append(seed) or classifier.params)
    loaded = dc.load_or_train(str(tmp_path), seed=0)
    assert calls == [0]
    for a, b in zip(dc.jax.tree.leaves(classifier.params), dc.jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert dc._read_params(path, 0) is not None  # the file was rewritten with good params
    dc._MEMORY_CACHE.pop((str(tmp_path), 0))


def test_cache_dir_env_override(classifier, tmp_path, monkeypatch):
    monkeypatch.setenv(dc.CACHE_ENV, str(tmp_path))
    assert dc._resolve_cache_dir(None) == str(tmp_path)
    assert dc._resolve_cache_dir("") == ""


# ----------------------------------------------------------------------------- sample quality


def test_digits_sample_quality_real_vs_noise(classifier):
    test_images, _ = dc.digits_split("test")
    real = dc.digits_sample_quality(test_images, classifier=classifier)
    noise = np.random.default_rng(0).uniform(-1, 1, size=test_images.shape).astype(np.float32)
    fake = dc.digits_sample_quality(noise, classifier=classifier)
    assert real["num_samples"] == fake["num_samples"] == 297
    assert abs(real["fd"]) < 1e-6  # the test split against itself
    assert fake["fd"] > 40 * real["fd_floor"]  # 581 against 9.1
    assert real["classifier_score"] == pytest.approx(real["classifier_score_test"])
    assert real["classifier_score_test"] > 9 and fake["classifier_score"] < 3  # 9.5 (of 10) and 2.7


def test_digits_sample_quality_clips_a_slight_overshoot(classifier):
    # Values up to 2 in magnitude are clipped to [-1, 1]: the report is that of the clipped samples.
    test_images, _ = dc.digits_split("test")
    over = test_images * 1.5
    assert np.abs(over).max() == 1.5
    got = dc.digits_sample_quality(over, classifier=classifier)
    want = dc.digits_sample_quality(np.clip(over, -1, 1), classifier=classifier)
    assert got == want
    assert got["fd"] > 1  # 4.4: not the test split itself (0), whose mid-grey pixels were not scaled


def test_digits_sample_quality_floor_is_below_noise(classifier):
    train_images, _ = dc.digits_split("train")
    half = dc.digits_sample_quality(train_images[::2], classifier=classifier, seed=1)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(750, 8, 8, 1)).astype(np.float32)
    fake = dc.digits_sample_quality(noise, classifier=classifier, seed=1)
    assert half["num_samples"] == fake["num_samples"] == 750
    assert half["fd_floor"] == fake["fd_floor"]  # the floor depends on N and the seed only
    # The floor (5.6 at N = 750) is far below pure noise's distance (578): two orders of magnitude.
    assert fake["fd"] > 50 * half["fd_floor"], (fake["fd"], half["fd_floor"])
    # Real images (every other train image) sit at the floor, as a perfect model's samples would (4.6).
    assert half["fd"] < 2 * half["fd_floor"], (half["fd"], half["fd_floor"])


@pytest.mark.parametrize("shape", [(10, 8, 8), (10, 8, 8, 3), (10, 28, 28, 1), (1, 8, 8, 1)])
def test_digits_sample_quality_rejects_bad_shapes(classifier, shape):
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\].*\[-1, 1\]"):
        dc.digits_sample_quality(np.zeros(shape, np.float32), classifier=classifier)


def test_digits_sample_quality_rejects_pixels(classifier):
    with pytest.raises(ValueError, match="scale_images"):
        dc.digits_sample_quality(np.zeros((4, 8, 8, 1), np.uint8), classifier=classifier)
    with pytest.raises(ValueError, match="0..255"):
        dc.digits_sample_quality(np.full((4, 8, 8, 1), 200.0), classifier=classifier)

"""Tests for ddpm_jax.data.pipeline: the digits builder, loading errors, the train and eval streams."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm_jax.core import pixels
from ddpm_jax.data import pipeline
from ddpm_jax.data.digits_builder import digits_split_indices

DEVICES = 4  # tests/conftest.py forces 4 CPU devices; passed explicitly where it matters
LEVELS = {round(k * 255 / 16) for k in range(17)}


@pytest.fixture(scope="module")
def digits_dir(data_dir):
    """The session's tfds data_dir, where "digits" was prepared (conftest)."""
    return data_dir


@pytest.fixture(scope="module")
def digits(digits_dir):
    load = lambda split: pipeline.load_images("digits", split, digits_dir, 0, 1)  # noqa: E731
    return {"train": load("train"), "test": load("test")}


def _synthetic(n=40, h=4, w=4):
    """uint8 [n, h, w, 1]: left half = i, right half = i + 100, so index and flip are readable."""
    images = np.zeros((n, h, w, 1), np.uint8)
    images[:, :, : w // 2] = np.arange(n)[:, None, None, None]
    images[:, :, w // 2 :] = 100 + np.arange(n)[:, None, None, None]
    return images


def _decode(batch):
    """(indices, flipped) of a [D, P, H, W, 1] batch of _synthetic images, flattened."""
    u = pixels.unscale_images(batch).reshape(-1, *batch.shape[2:])
    left, right = u[:, 0, 0, 0].astype(int), u[:, 0, -1, 0].astype(int)
    return np.minimum(left, right), left >= 100


def _take(it, n):
    return [np.array(b) for b in itertools.islice(it, n)]


# ----------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_disjoint(digits, digits_dir):
    assert digits["train"].shape == (1500, 8, 8, 1) and digits["train"].dtype == np.uint8
    assert digits["test"].shape == (297, 8, 8, 1) and digits["test"].dtype == np.uint8
    splits = tfds.builder("digits", data_dir=digits_dir).info.splits
    assert splits["train"].num_examples + splits["test"].num_examples == 1797
    idx = digits_split_indices()
    assert len(np.intersect1d(idx["train"], idx["test"])) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(1797))


def test_digits_values_are_17_levels(digits):
    values = set(np.unique(np.concatenate([digits["train"], digits["test"]])).tolist())
    assert values <= LEVELS and {0, 255} <= values


def test_digits_match_sklearn(digits, digits_dir):
    from sklearn.datasets import load_digits

    sk = load_digits()
    labels = tfds.as_numpy(tfds.builder("digits", data_dir=digits_dir).as_dataset(split="test", batch_size=-1))["label"]
    for split in ("train", "test"):
        for k in (0, 1, 123, len(digits[split]) - 1):
            i = digits_split_indices()[split][k]
            expected = np.round(sk.images[i] * 255 / 16).astype(np.uint8)[..., None]
            np.testing.assert_array_equal(digits[split][k], expected)
    np.testing.assert_array_equal(labels, sk.target[digits_split_indices()["test"]])


def test_process_shards_partition_the_split(digits, digits_dir):
    shards = [pipeline.load_images("digits", "train", digits_dir, i, 2) for i in range(2)]
    assert [len(s) for s in shards] == [750, 750]
    np.testing.assert_array_equal(np.concatenate(shards), digits["train"])


# ----------------------------------------------------------------------------- errors


def test_unknown_split_lists_available(digits_dir):
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        pipeline.load_images("digits", "validation", digits_dir, 0, 1)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"'no_such_dataset_xyz'.*'digits'"):
        pipeline.load_images("no_such_dataset_xyz", "train", str(tmp_path), 0, 1)


def test_unprepared_dataset_without_download(tmp_path):
    with pytest.raises(RuntimeError, match=r"'mnist' is not prepared.*'digits'"):
        pipeline.load_images("mnist", "train", str(tmp_path), 0, 1, download=False)


def test_failed_download_is_a_clear_runtime_error(tmp_path, monkeypatch):
    def no_network(self, *args, **kwargs):  # stands in for the download: no attempt is made
        raise ConnectionError("Could not resolve host")

    monkeypatch.setattr(tfds.builder_cls("mnist"), "download_and_prepare", no_network)
    with pytest.raises(RuntimeError, match=r"cannot be downloaded on this machine.*'digits'") as e:
        pipeline.load_images("mnist", "train", str(tmp_path), 0, 1)
    assert isinstance(e.value.__cause__, ConnectionError)
    assert not list(tmp_path.glob("mnist/*/*.tfrecord*"))


def test_digits_prepared_by_a_concurrent_run_is_used(tmp_path, monkeypatch, digits):
    """Two runs on a fresh data_dir: the other process renames its copy into place first, so this one's final
    rename raises FileExistsError (as tfds does); the copy that is there is used."""
    from ddpm_jax.data.digits_builder import Digits

    real_prepare = Digits.download_and_prepare

    def other_process_wins(self, *args, **kwargs):
        real_prepare(Digits(data_dir=str(tmp_path)))  # the other run's complete copy
        raise FileExistsError(f"Cannot rename ... Destination {self.data_path} already exists.")

    monkeypatch.setattr(Digits, "download_and_prepare", other_process_wins)
    images = pipeline.load_images("digits", "test", str(tmp_path), 0, 1)
    np.testing.assert_array_equal(images, digits["test"])


# ----------------------------------------------------------------------------- scaling


def test_scale_unscale_roundtrip():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    x = pixels.scale_images(levels)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    # x / 127.5 - 1 in float32: within an ulp of the float64 value.
    np.testing.assert_allclose(x.ravel(), np.arange(256) / 127.5 - 1.0, rtol=0, atol=6e-8)
    np.testing.assert_array_equal(pipeline.scale_images(levels), x)  # the pipeline's map: NumPy ...
    np.testing.assert_array_equal(pipeline.scale_images(tf.constant(levels)).numpy(), x)  # ... and tf
    np.testing.assert_array_equal(pixels.unscale_images(x), levels)
    np.testing.assert_array_equal(pixels.unscale_images(np.array([-3.0, -1.001, 1.001, 3.0])), [0, 0, 255, 255])


# ----------------------------------------------------------------------------- train stream


def test_train_batch_shape_dtype_values(digits):
    (batch,) = _take(pipeline.train_batches(digits["train"], 32, seed=0, num_local_devices=DEVICES), 1)
    assert batch.shape == (DEVICES, 8, 8, 8, 1) and batch.dtype == np.float32
    # The first 32 images of epoch 0's documented order, scaled, split over the devices in order.
    order = tf.random.experimental.index_shuffle(tf.range(32, dtype=tf.int64), seed=[0, 0], max_index=1499).numpy()
    expected = pixels.scale_images(digits["train"][order]).reshape(batch.shape)
    np.testing.assert_array_equal(batch, expected)
    # Defaults come from jax.
    (batch,) = _take(pipeline.train_batches(digits["train"], 8 * jax.local_device_count(), 0), 1)
    assert batch.shape == (jax.local_device_count(), 8, 8, 8, 1)


def test_same_seed_same_stream_other_seed_differs(digits):
    stream = lambda seed: _take(  # noqa: E731
        pipeline.train_batches(digits["train"], 16, seed, num_local_devices=DEVICES), 3
    )
    a, b, c = stream(1), stream(1), stream(2)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("random_flip", [False, True])
def test_resume_equals_uninterrupted(random_flip):
    images = _synthetic()
    full = _take(pipeline.train_batches(images, 12, 3, 0, random_flip, DEVICES, 1), 12)
    resumed = _take(pipeline.train_batches(images, 12, 3, 7, random_flip, DEVICES, 1), 5)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(full[7:]))


@pytest.mark.parametrize("batch_size", [8, 12])  # divides N = 40, and does not
def test_each_example_once_per_epoch(batch_size):
    images, epochs, seed = _synthetic(), 3, 5
    steps = -(-epochs * 40 // batch_size)
    batches = _take(pipeline.train_batches(images, batch_size, seed, num_local_devices=DEVICES), steps)
    order = np.concatenate([_decode(b)[0] for b in batches])[: epochs * 40].reshape(epochs, 40)
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(order[e]), np.arange(40))
        expected = tf.random.experimental.index_shuffle(tf.range(40, dtype=tf.int64), seed=[seed, e], max_index=39)
        np.testing.assert_array_equal(order[e], expected.numpy())  # the documented order
    assert not np.array_equal(order[0], order[1])


def test_flip_only_when_asked():
    images = _synthetic()
    plain = _take(pipeline.train_batches(images, 8, 0, 0, False, DEVICES, 1), 10)
    flipped = _take(pipeline.train_batches(images, 8, 0, 0, True, DEVICES, 1), 10)
    assert not np.concatenate([_decode(b)[1] for b in plain]).any()
    flips = np.concatenate([_decode(b)[1] for b in flipped])
    assert 0.2 < flips.mean() < 0.8
    for p, f in zip(plain, flipped):  # same images, same order; flipped ones mirrored exactly
        np.testing.assert_array_equal(_decode(p)[0], _decode(f)[0])
        mirrored = np.where(
            _decode(f)[1][:, None, None, None], p.reshape(-1, 4, 4, 1)[:, :, ::-1], p.reshape(-1, 4, 4, 1)
        )
        np.testing.assert_array_equal(f.reshape(-1, 4, 4, 1), mirrored)


def test_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match="config.training.batch_size"):
        pipeline.train_batches(_synthetic(), 10, 0, num_local_devices=DEVICES, process_count=1)
    with pytest.raises(ValueError, match="config.training.batch_size"):
        pipeline.train_batches(_synthetic(), 12, 0, num_local_devices=DEVICES, process_count=2)
    with pytest.raises(ValueError, match="config.training.batch_size"):
        pipeline.eval_batches(_synthetic(), 6, num_local_devices=DEVICES, process_count=1)


# ----------------------------------------------------------------------------- eval batches


def test_eval_batches_cover_split_once(digits):
    test = digits["test"]
    batches = list(pipeline.eval_batches(test, 32, num_local_devices=DEVICES, process_count=1))
    assert len(batches) == 10  # ceil(297 / 32)
    for images, mask in batches:
        assert images.shape == (DEVICES, 8, 8, 8, 1) and images.dtype == np.float32
        assert mask.shape == (DEVICES, 8) and mask.dtype == bool
    real = np.concatenate([x.reshape(-1, 8, 8, 1)[m.reshape(-1)] for x, m in batches])
    np.testing.assert_array_equal(real, pixels.scale_images(test))
    assert sum(m.sum() for _, m in batches) == 297
    assert not batches[-1][1].all()


def test_eval_batches_num_batches():
    images = _synthetic(n=10)
    padded = list(pipeline.eval_batches(images, 8, DEVICES, 1, num_batches=3))
    assert [int(m.sum()) for _, m in padded] == [8, 2, 0]
    cut = list(pipeline.eval_batches(images, 8, DEVICES, 1, num_batches=1))
    assert len(cut) == 1 and cut[0][1].all()


def test_hide_gpus_from_tf_is_safe():
    pipeline.hide_gpus_from_tf()
    assert not tf.config.get_visible_devices("GPU")

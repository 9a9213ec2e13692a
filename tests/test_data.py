"""Tests for ddpm_jax.data.pipeline and data.order: the digits builder, loading errors, the train and eval
streams, and the NumPy training order and flips against TensorFlow's ops (live where TF is installed, and
recorded known answers everywhere)."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddpm_jax.core import pixels
from ddpm_jax.data import order, pipeline
from ddpm_jax.data.digits_builder import digits_split_indices

try:
    import tensorflow as tf
except ImportError:  # the default install: the recorded vectors below still check the order
    tf = None

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
    source = tfds.builder("digits", data_dir=digits_dir).as_data_source("test")
    labels = [source[k]["label"] for k in range(len(source))]
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
    assert not list(tmp_path.glob("mnist/*/*.tfrecord*")) and not list(tmp_path.glob("mnist/*/*.array_record*"))


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
    np.testing.assert_array_equal(pipeline.scale_images(levels), x)  # the pipeline's map
    np.testing.assert_array_equal(pixels.unscale_images(x), levels)
    np.testing.assert_array_equal(pixels.unscale_images(np.array([-3.0, -1.001, 1.001, 3.0])), [0, 0, 255, 255])


# ----------------------------------------------------------------------------- train stream


def test_train_batch_shape_dtype_values(digits):
    (batch,) = _take(pipeline.train_batches(digits["train"], 32, seed=0, num_local_devices=DEVICES), 1)
    assert batch.shape == (DEVICES, 8, 8, 8, 1) and batch.dtype == np.float32
    # The first 32 images of epoch 0's documented order, scaled, split over the devices in order.
    first = [742] + [int(i) for i in order.index_shuffle(np.arange(1, 32), [INDEX_SHUFFLE_PAD, 0, 0], 1499)]
    expected = pixels.scale_images(digits["train"][first]).reshape(batch.shape)  # 742: INDEX_SHUFFLE_TF below
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
    seen = np.concatenate([_decode(b)[0] for b in batches])[: epochs * 40].reshape(epochs, 40)
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(seen[e]), np.arange(40))
        expected = order.index_shuffle(np.arange(40), [INDEX_SHUFFLE_PAD, seed, e], 39)
        np.testing.assert_array_equal(seen[e], expected)  # the documented order (tested against TF below)
    assert not np.array_equal(seen[0], seen[1])


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


# ----------------------------------------------------------------------------- the order and the flips vs TF

INDEX_SHUFFLE_PAD = 498247692  # tf.random.experimental.index_shuffle's first seed word
# Generated with TensorFlow 2.21.0 by (for each row):
#   idx = [0, m // 7, m // 3, m // 2, m] (sorted, unique); key = [[498247692, seed, epoch]] * len(idx)
#   tf.raw_ops.RandomIndexShuffle(index=idx, seed=key, max_index=m, rounds=4).numpy()
# The rows with m = 2**16 and 2**40 show TF's collision (index 0 and m map to one value): data.order
# deliberately differs there (a block one bit wider: another permutation, a true one).
INDEX_SHUFFLE_TF = [  # (m, seed, epoch, index, TF's output)
    (0, 1, 2, [0], [0]),
    (1, 0, 0, [0, 1], [0, 1]),
    (39, 5, 1, [0, 5, 13, 19, 39], [3, 25, 33, 11, 27]),
    (1499, 0, 0, [0, 214, 499, 749, 1499], [742, 128, 1365, 1098, 1269]),
    (65535, 3, 7, [0, 9362, 21845, 32767, 65535], [54668, 5225, 65032, 15340, 14155]),
    (65536, -2, 9, [0, 9362, 21845, 32768, 65536], [39676, 64750, 18674, 5848, 39676]),
    (1000000, 8589934597, 4, [0, 142857, 333333, 500000, 1000000], [218036, 695266, 184932, 705515, 705725]),
    (
        1099511627776,
        11,
        4294967297,
        [0, 157073089682, 366503875925, 549755813888, 1099511627776],
        [560729429446, 501094639408, 558172849528, 10982004070, 560729429446],
    ),
]
# Generated with TensorFlow 2.21.0 by
#   tf.random.stateless_uniform([6], tf.constant([seed, step], tf.int64), alg="philox").numpy().view(np.uint32)
PHILOX_UNIFORM_TF = [  # (seed, step, the six float32 samples' bits)
    (0, 0, [1045959792, 1060420882, 1061998836, 1061507748, 1053226264, 1063178208]),
    (0, 1, [1034438320, 1053920552, 1053380480, 1050799092, 1051836744, 1060856846]),
    (3, 12345, [1034202048, 1061777016, 1054603836, 1043130264, 1041969320, 1016624128]),
    (-1, 8589934592, [1054362248, 1060153266, 1058939478, 1063452328, 1063716724, 1062106268]),
    (1099511627783, -5, [1038030896, 1055036932, 1065268064, 1060218842, 1053477180, 1062262010]),
]


def _power_of_two(m: int) -> bool:
    return m >= 2**16 and m & (m - 1) == 0


def test_index_shuffle_recorded_tf_answers():
    for m, seed, epoch, index, expected in INDEX_SHUFFLE_TF:
        got = order.index_shuffle(index, [INDEX_SHUFFLE_PAD, seed, epoch], m)
        if _power_of_two(m):  # TF collides at 0 and m; data.order does not
            assert expected[0] == expected[-1] and got[0] != got[-1]
        else:
            np.testing.assert_array_equal(got, expected)


def test_index_shuffle_is_tf_on_random_inputs():
    if tf is None:  # no TensorFlow: the recorded answers above are the check
        return
    rng = np.random.default_rng(0)
    for m in [2, 7, 100, 1499, 49_999, 65_535, 70_000, 2**20 + 5, 10**9, 3 * 2**33]:
        idx = rng.integers(0, m + 1, 64)
        key = np.stack([np.full(64, INDEX_SHUFFLE_PAD), rng.integers(-(2**40), 2**40, 64), rng.integers(0, 99, 64)], 1)
        want = tf.raw_ops.RandomIndexShuffle(index=idx, seed=key, max_index=np.int64(m), rounds=4).numpy()
        np.testing.assert_array_equal(order.index_shuffle(idx, key, m), want)


@pytest.mark.parametrize("n", [1, 2, 40, 1500, 65_537])  # 65,537 = 2**16 + 1: where TF's op collides
def test_epoch_permutation_is_index_shuffle_and_a_permutation(n):
    for epoch in (0, 1):
        perm = order.epoch_permutation((INDEX_SHUFFLE_PAD, 3, epoch), n)  # tabulated, pointer jumping
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))
        if n > 2:
            assert not np.array_equal(perm, np.arange(n))
        if n < 40:  # the elementwise walk takes ~2**16 / n encryptions per index
            continue
        some = np.unique(np.r_[0, n - 1, np.arange(0, n, 97)])
        rows = np.tile([INDEX_SHUFFLE_PAD, 3, epoch], (len(some), 1))  # one key per element: the cycle walk
        np.testing.assert_array_equal(order.index_shuffle(some, rows, n - 1), perm[some])


def test_philox_uniform_recorded_and_live_tf_answers():
    for seed, step, bits in PHILOX_UNIFORM_TF:
        got = order.philox_uniform(6, seed, step)
        assert got.dtype == np.float32 and ((0 <= got) & (got < 1)).all()
        np.testing.assert_array_equal(got.view(np.uint32), bits)
        np.testing.assert_array_equal(order.philox_uniform(3, seed, step), got[:3])  # a prefix of the stream
    if tf is not None:
        for seed, step, n in [(0, 7, 1), (5, 2**31 + 3, 33), (-9, 123456789, 128)]:
            want = tf.random.stateless_uniform([n], tf.constant([seed, step], tf.int64), alg="philox").numpy()
            np.testing.assert_array_equal(order.philox_uniform(n, seed, step).view(np.uint32), want.view(np.uint32))
    u = order.philox_uniform(100_000, 1, 2)  # and uniform: mean 1/2, variance 1/12 within ~5 standard errors
    assert abs(u.mean() - 0.5) < 5 * (1 / 12 / 1e5) ** 0.5 and abs(u.var() - 1 / 12) < 5 * 0.0011 / 1e5**0.5 * 10


def test_flip_mask_is_the_philox_coin():
    np.testing.assert_array_equal(pipeline.flip_mask(5, 32, 3), order.philox_uniform(32, 3, 5) < 0.5)

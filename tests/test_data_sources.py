"""Tests for image folders, tfds datasets of other sizes and streamed splits (ddpm_jax.data.sources, data), and
decoding and fitting images (data.images) against TensorFlow's ops where TF is installed."""

import hashlib
import io
import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax.data import images as images_lib
from ddpm_jax.data import pipeline, sources
from ddpm_jax.errors import ConfigError, DataError
from ddpm_jax.training import validation

try:
    import tensorflow as tf
except ImportError:  # the default install: the independent float64 and PIL references still check
    tf = None

SIZE = 8
SHAPES = [(21, 13), (13, 21), (30, 30), (6, 5), (8, 8), (17, 26), (9, 12), (26, 17)]  # (h, w), mixed


def _pixels(seed: int, h: int, w: int) -> np.ndarray:
    """Smooth RGB uint8 [h, w, 3] (survives JPEG) that differs between seeds."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    r = np.random.default_rng(seed).uniform(0.2, 1.0, 6)
    chans = [np.sin(6 * r[k] * x + 5 * r[k + 3] * y + seed) for k in range(3)]
    return np.round(127.5 + 120 * np.stack(chans, -1)).astype(np.uint8)


def _expected(path: str, channels: int) -> np.ndarray:
    """The fitted image by an independent route: PIL's convert, crop and bilinear (antialiased) resize."""
    im = Image.open(path).convert("RGB" if channels == 3 else "L")
    w, h = im.size
    s = min(h, w)
    left, top = (w - s) // 2, (h - s) // 2
    out = np.asarray(im.crop((left, top, left + s, top + s)).resize((SIZE, SIZE), Image.BILINEAR))
    return out.reshape(SIZE, SIZE, channels).astype(int)


def _write_folder(root) -> list[str]:
    """24 PNG/JPEG files of mixed sizes and modes under root (some in a subfolder); sorted relative paths."""
    paths = []
    for i in range(24):
        h, w = SHAPES[i % len(SHAPES)]
        jpeg = i % 4 == 3
        mode = ("RGB", "L")[i % 2] if jpeg else ("RGB", "L", "RGBA")[i % 3]
        rel = os.path.join("sub" if i % 5 == 0 else "", f"img{i:02d}.{'JPG' if jpeg else 'png'}")
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(_pixels(i, h, w)).convert(mode).save(os.path.join(root, rel), quality=95)
        paths.append(rel)
    (root / "notes.txt").write_text("not an image")
    return sorted(paths)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    return str(root), _write_folder(root)


def _load(dataset, split, **kw):
    kw = {"image_size": SIZE, "channels": 3, **kw}
    return pipeline.load_images(
        dataset, split, process_index=kw.pop("process_index", 0), process_count=kw.pop("process_count", 1), **kw
    )


def _take(it, n):
    return [np.array(b) for b in itertools.islice(it, n)]


def _batches(images, n, start_step=0, seed=3):
    return _take(pipeline.train_batches(images, 4, seed, start_step, True, num_local_devices=2, process_count=1), n)


# ----------------------------------------------------------------------------- folders


def test_folder_split_is_the_path_hash_and_order_is_sorted(folder):
    root, rel = folder
    in_test = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % 100 < 10 for p in rel]
    want = {"train": [p for p, t in zip(rel, in_test) if not t], "test": [p for p, t in zip(rel, in_test) if t]}
    assert want["test"] and want["train"]  # this fixture's names put files in both
    for split, files in want.items():
        images = _load(f"folder:{root}", split)
        assert images.shape == (len(files), SIZE, SIZE, 3) and images.dtype == np.uint8
        for k, f in enumerate(files):  # each image against PIL on its file: the order is sorted by path
            assert np.abs(images[k].astype(int) - _expected(os.path.join(root, f), 3)).max() <= 1, f


def test_folder_channels_and_right_sized_images(folder):
    root, _ = folder
    files = sources.folder_split_files(root, "train")  # absolute paths, in the order loaded
    gray, rgb = _load(f"folder:{root}", "train", channels=1), _load(f"folder:{root}", "train")
    for k, f in enumerate(files):
        assert np.abs(gray[k].astype(int) - _expected(f, 1)).max() <= 1, f  # RGB(A) to L as PIL does
        im = Image.open(f)
        if im.size == (SIZE, SIZE) and f.endswith("png"):  # an 8x8 PNG: bit-exact, no resampling
            np.testing.assert_array_equal(rgb[k], np.asarray(im.convert("RGB")))
        if im.mode == "L":  # gray copied to RGB
            assert (rgb[k] == rgb[k][..., :1]).all()
    assert any(Image.open(f).size == (SIZE, SIZE) for f in files)


def test_folder_subfolders_are_the_splits(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        os.makedirs(tmp_path / split / "deeper")
        for i in range(n):
            Image.fromarray(_pixels(i, 12, 9)).save(tmp_path / split / "deeper" / f"{i}.png")
    assert _load(f"folder:{tmp_path}", "train").shape == (3, SIZE, SIZE, 3)
    assert _load(f"folder:{tmp_path}", "test").shape == (2, SIZE, SIZE, 3)
    with pytest.raises(DataError, match=r"Unknown split 'validation'.*subfolders \['test', 'train'\]"):
        _load(f"folder:{tmp_path}", "validation")


def test_folder_shards_partition_the_split(folder):
    root, _ = folder
    whole = _load(f"folder:{root}", "train")
    shards = [_load(f"folder:{root}", "train", process_index=i, process_count=3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), whole)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"no such folder.*folder:/path/to/images"):
        _load(f"folder:{tmp_path}/missing", "train")
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(DataError, match=r"No .png/.jpg/.jpeg images in split 'train' of the image folder"):
        _load(f"folder:{tmp_path}", "train")
    with pytest.raises(DataError, match=r"Unknown split 'validation'.*'train' and 'test'"):
        _load(f"folder:{tmp_path}", "validation")


def test_unreadable_image_is_named(tmp_path):
    for i in range(12):
        Image.fromarray(_pixels(i, 10, 10)).save(tmp_path / f"ok{i:02d}.png")
    (tmp_path / "ok05.png").write_bytes(b"\x89PNG but truncated")
    with pytest.raises(DataError, match=r"Cannot read image .*ok05\.png"):
        _load(f"folder:{tmp_path}", "train")
    streamed = _load(f"folder:{tmp_path}", "train", in_memory=False)  # lazily: fails when a batch needs it
    with pytest.raises(DataError, match=r"Cannot read image .*ok05\.png"):
        _batches(streamed, 10)


def test_validation_of_the_data_fields():
    from ddpm_jax.configs import ddpm

    config = ddpm.get_config("runlocal")
    config.data.dataset = "folder:/some/pictures"
    validation.validate_config(config, num_devices=1)
    for field, value, message in (
        ("dataset", "folder:", "or 'folder:/path/to/images', got 'folder:'"),
        ("in_memory", "no", r"must be True .* or False .*, got 'no'"),
    ):
        bad = ddpm.get_config("runlocal")
        del bad.data[field]  # ConfigDict keeps a field's type; a config.json or a new file need not
        bad.data[field] = value
        with pytest.raises(ConfigError, match=rf"config\.data\.{field}: .*{message}"):
            validation.validate_config(bad, num_devices=1)


# ----------------------------------------------------------------------------- streaming


def test_streamed_folder_gives_the_in_memory_batches_and_resumes(folder):
    root, _ = folder
    memory = _load(f"folder:{root}", "train")
    streamed = _load(f"folder:{root}", "train", in_memory=False)
    assert streamed.shape == memory.shape and len(streamed) == len(memory)
    np.testing.assert_array_equal(streamed[3:9], memory[3:9])
    whole = _batches(streamed, 12)  # 12 steps of 4: two epochs of 21 images and a bit
    for a, b in zip(whole, _batches(memory, 12)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(whole[7:], _batches(streamed, 5, start_step=7)):  # resume: the same batches
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], _batches(streamed, 1, seed=4)[0])
    evals = [list(pipeline.eval_batches(x, 4, 2, 1, num_batches=7)) for x in (memory, streamed)]
    for (a, ma), (b, mb) in zip(*evals):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
    assert evals[1][-1][1].sum() == 0 and evals[1][5][1].sum() == len(memory) - 20


# ----------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Two tfds datasets of the same 12 RGB images of 13x21 (non-square): as tfrecord and as ArrayRecord."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    images = [_pixels(i, 13, 21) for i in range(12)]
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(13, 21, 3))})
    for fmt in ("tfrecord", "array_record"):
        tfds.dataset_builders.store_as_tfds_dataset(
            name=f"test_pictures_{fmt}",
            version="1.0.0",
            features=features,
            split_datasets={
                "train": [(i, {"image": x}) for i, x in enumerate(images[:9])],
                "test": [(i, {"image": x}) for i, x in enumerate(images[9:])],
            },
            data_dir=data_dir,
            file_format=fmt,
            disable_shuffling=True,  # the stored order is the order above
        )
    return data_dir, images


def test_tfds_images_are_fitted(tfds_dir, tmp_path):
    data_dir, images = tfds_dir
    loaded = _load("test_pictures_tfrecord", "train", data_dir=data_dir)
    assert loaded.shape == (9, SIZE, SIZE, 3)
    for k in range(9):
        Image.fromarray(images[k]).save(tmp_path / "x.png")
        assert np.abs(loaded[k].astype(int) - _expected(str(tmp_path / "x.png"), 3)).max() <= 1
    stored = pipeline.load_images("test_pictures_tfrecord", "train", data_dir, 0, 1)  # no size asked: as stored
    np.testing.assert_array_equal(stored, np.stack(images[:9]))
    with pytest.raises(DataError, match=r"has 3-channel images but config.data.channels=1: set config.data.channels=3"):
        _load("test_pictures_tfrecord", "train", data_dir=data_dir, channels=1)


def test_tfds_streaming_needs_array_record(tfds_dir):
    with pytest.raises(DataError, match=r"stored as tfrecord.*--file_format=array_record.*in_memory=True"):
        _load("test_pictures_tfrecord", "train", data_dir=tfds_dir[0], in_memory=False)


def test_tfds_streamed_gives_the_in_memory_batches_and_resumes(tfds_dir):
    data_dir = tfds_dir[0]
    memory = _load("test_pictures_array_record", "train", data_dir=data_dir)
    np.testing.assert_array_equal(memory, _load("test_pictures_tfrecord", "train", data_dir=data_dir))
    streamed = _load("test_pictures_array_record", "train", data_dir=data_dir, in_memory=False)
    assert streamed.shape == memory.shape
    whole = _batches(streamed, 8)
    for a, b in zip(whole, _batches(memory, 8)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(whole[5:], _batches(streamed, 3, start_step=5)):
        np.testing.assert_array_equal(a, b)
    shards = [
        _load(
            "test_pictures_array_record", "train", data_dir=data_dir, in_memory=False, process_index=i, process_count=2
        )
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([s[:] for s in shards]), memory)


def test_read_ahead_thread_stops_when_the_stream_is_closed(folder):
    import threading
    import time

    def readers():
        return [t for t in threading.enumerate() if t.name == "train_batches"]

    before = len(readers())
    batches = pipeline.train_batches(_load(f"folder:{folder[0]}", "train"), 4, 0, num_local_devices=2, process_count=1)
    next(batches)
    assert len(readers()) == before + 1
    batches.close()
    deadline = time.time() + 5
    while len(readers()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(readers()) == before


# ----------------------------------------------------------------------------- decoding and fitting


def _encoded(x: np.ndarray, mode: str, fmt: str, **kw) -> bytes:
    im = Image.fromarray(x).quantize(37) if mode == "P" else Image.fromarray(x).convert(mode)
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


ENCODINGS = [  # (PIL mode, format, save options): grey, palette, alpha, bilevel; JPEG subsamplings, progressive
    ("RGB", "PNG", {}),
    ("L", "PNG", {}),
    ("P", "PNG", {}),
    ("RGBA", "PNG", {}),
    ("LA", "PNG", {}),
    ("1", "PNG", {}),
    ("RGB", "JPEG", {"quality": 90}),
    ("L", "JPEG", {"quality": 75}),
    ("RGB", "JPEG", {"quality": 50, "subsampling": 2}),
    ("RGB", "JPEG", {"quality": 95, "subsampling": 1, "progressive": True}),
]


def test_decode_is_tf_decode_and_pil_convert():
    """Same pixels as the TF pipeline decoded (tf.io: decode_jpeg INTEGER_ACCURATE / decode_image, channels=3,
    then the float32 luma), and as PIL's own convert("RGB")."""
    rng = np.random.default_rng(0)
    for trial in range(2):
        h, w = rng.integers(9, 40, 2)
        x = np.clip(_pixels(trial, h, w) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        for mode, fmt, kw in ENCODINGS:
            data = _encoded(x if mode != "RGBA" else np.dstack([x, x[..., :1]]), mode, fmt, **kw)
            rgb, grey = images_lib.decode_image(data, 3), images_lib.decode_image(data, 1)
            np.testing.assert_array_equal(rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
            assert grey.shape == (h, w, 1) and np.abs(grey[..., 0] - luma).max() <= 0.5 + 1e-4
            if tf is not None:
                t = tf.constant(data)
                want = tf.cond(  # what sources.decode_image computed before TF left the pipeline
                    tf.io.is_jpeg(t),
                    lambda t=t: tf.io.decode_jpeg(t, channels=3, dct_method="INTEGER_ACCURATE"),
                    lambda t=t: tf.io.decode_image(t, channels=3, expand_animations=False),
                ).numpy()
                want_grey = tf.tensordot(tf.cast(want, tf.float32), tf.constant([0.299, 0.587, 0.114]), [[2], [0]])
                np.testing.assert_array_equal(rgb, want, err_msg=f"{mode} {fmt} {kw}")
                np.testing.assert_array_equal(grey[..., 0], np.clip(np.round(want_grey.numpy()), 0, 255))
    deep = rng.integers(0, 2**16, (9, 7), dtype=np.uint16)  # a 16-bit grey PNG: its high bytes, as tf.io's
    out = io.BytesIO()
    Image.fromarray(deep).save(out, format="PNG")
    np.testing.assert_array_equal(images_lib.decode_image(out.getvalue(), 3), np.repeat((deep >> 8)[..., None], 3, -1))
    if tf is not None:
        want = tf.io.decode_image(out.getvalue(), channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(images_lib.decode_image(out.getvalue(), 3), want)


def _resize_float64(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize in float64, independently: output pixel x samples at s = (x + 0.5) h / size
    with the triangle kernel widened to max(h / size, 1) (box-filter width when downsampling), normalised."""

    def weights(n: int) -> np.ndarray:
        scale = max(n / size, 1.0)
        centre = (np.arange(size) + 0.5) * n / size
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(n)[None] + 0.5 - centre[:, None]) / scale))
        return w / w.sum(axis=1, keepdims=True)

    return np.einsum("yi,xj,ijc->yxc", weights(image.shape[0]), weights(image.shape[1]), image.astype(np.float64))


@pytest.mark.parametrize("size", [8, 32])
def test_fit_is_tf_resize(size):
    """fit_image against TF's tf.image.resize(bilinear, antialias=True) + round (bit-exact: the same float32
    operations in the same order) and against an independent float64 resize (within 0.5 + rounding)."""
    rng = np.random.default_rng(size)
    for h, w in [(21, 13), (13, 21), (30, 30), (6, 5), (64, 64), (218, 178), (100, 37), (size, size)]:
        for c in (1, 3):
            x = rng.integers(0, 256, (h, w, c), dtype=np.uint8) if c == 3 else _pixels(h + w, h, w)[..., :1]
            fitted = images_lib.fit_image(x, size)
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            square = x[top : top + s, left : left + s]
            assert fitted.shape == (size, size, c) and fitted.dtype == np.uint8
            if (h, w) == (size, size):
                assert fitted is x  # unchanged
                continue
            reference = _resize_float64(square, size)
            assert np.abs(images_lib.resize(square, size) - reference).max() < 1e-3
            assert np.abs(fitted - reference).max() <= 0.5 + 1e-3
            if tf is not None:
                want = tf.image.resize(square[None], [size, size], method="bilinear", antialias=True)[0].numpy()
                np.testing.assert_array_equal(images_lib.resize(square, size).view(np.uint32), want.view(np.uint32))
                np.testing.assert_array_equal(fitted, np.clip(np.round(want), 0, 255).astype(np.uint8))

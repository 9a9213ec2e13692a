"""The FID Inception-V3 (ddpm_jax.evaluation.inception) against torch-fidelity 0.4.0's
FeatureExtractorInceptionV3, on random weights written in the real file's format (keys, shapes,
torch.save) and read back by our torch-free loader; and the loader's errors.

Error measure: max |ours - reference| / max |reference| over all elements, float32 on both sides.
"""

import os
import pickle
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax.errors import DataError, FidWeightsError
from ddpm_jax.evaluation import inception, inception_weights

from helpers import torch_fidelity_ref as ref

TOL = 1e-4  # the bound; measured ~1e-6
N = 3  # images per set: per-device batch 1 on the suite's 4 CPU devices, one compile for every set
SHAPES = {"8x8_grey": (8, 8, 1), "32x32_rgb": (32, 32, 3), "299x299_rgb": (299, 299, 3)}


def rel_err(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    # torch.save's legacy (pre-1.6) format, as the real file (uploaded in 2019) has; zip: test_reader_equals_torch_load
    return ref.write_random_inception_pth(tmp_path_factory.mktemp("inception") / "random.pth", seed=0, legacy=True)


@pytest.fixture(scope="module")
def params(weights_path):
    return inception_weights.load_inception_params(weights_path)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {name: rng.integers(0, 256, (N, *shape), dtype=np.uint8) for name, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def reference(weights_path, images):
    """torch-fidelity's features of every image set, from the same file."""
    extractor = ref.reference_extractor(weights_path)
    return {name: ref.reference_features(extractor, x) for name, x in images.items()}


@pytest.fixture(scope="module")
def ours(params, images):
    return {name: inception.inception_features(params, x) for name, x in images.items()}


@pytest.mark.parametrize("name", list(SHAPES))
def test_features_equal_torch_fidelity(name, ours, reference):
    for key in ("pool", "logits_unbiased", "logits"):
        assert ours[name][key].dtype == np.float32
        assert ours[name][key].shape == reference[name][key].shape
        assert rel_err(ours[name][key], reference[name][key]) <= TOL, key
    # the two logits differ by the classifier's bias (torch-fidelity's IS reads the unbiased ones)
    assert rel_err(ours[name]["logits"], reference[name]["logits_unbiased"]) > 1e-2


@pytest.mark.parametrize("shape", [(8, 8), (32, 32), (37, 50), (400, 300), (299, 299)])
def test_resize_equals_reference(shape):
    x = np.random.default_rng(1).uniform(0, 255, (2, *shape, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(inception.resize_like_tf1)(x))
    assert ours.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(ours, ref.reference_resize(x), rtol=0, atol=1e-4)  # pixel values 0..255


def test_swapped_blocks_fail(params, images, reference):
    """Mixed_6c and Mixed_6d have the same shapes (6b's are narrower): swapping them must show."""
    swapped = {c: dict(v) for c, v in params.items()}
    for collection in swapped.values():
        collection["Mixed_6c"], collection["Mixed_6d"] = collection["Mixed_6d"], collection["Mixed_6c"]
    out = inception.inception_features(swapped, images["32x32_rgb"])
    assert rel_err(out["pool"], reference["32x32_rgb"]["pool"]) > 1e-2


def test_pytorch_style_bilinear_fails(params, images, reference):
    """Half-pixel bilinear (jax.image.resize; PyTorch's align_corners=False) instead of TF1's."""
    x = images["32x32_rgb"].astype(np.float32)
    resized = jax.image.resize(x, (N, 299, 299, 3), "bilinear")
    out = jax.jit(inception.apply_network)(params, (resized - 128.0) / 128.0)
    assert rel_err(out["pool"], reference["32x32_rgb"]["pool"]) > 10 * TOL  # measured 2e-2 on these weights
    torch_style = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
    )
    assert np.max(np.abs(torch_style.permute(0, 2, 3, 1).numpy() - ref.reference_resize(x))) > 1.0


def test_stream_pads_and_regroups(params, images, ours):
    """Uneven input batches over 2 devices with 1 image each: 2 steps, the last padded."""
    x = images["8x8_grey"]
    parts = list(inception.stream_features(params, [x[:1], x[1:]], per_device_batch=1, devices=jax.local_devices()[:2]))
    assert [p["pool"].shape[0] for p in parts] == [2, 1]
    for key in ("pool", "logits"):
        assert rel_err(np.concatenate([p[key] for p in parts]), ours["8x8_grey"][key]) <= 1e-5


def test_bad_images():
    with pytest.raises(DataError, match="uint8"):
        inception.inception_features({}, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="C 1 or 3"):
        inception.inception_features({}, np.zeros((1, 8, 8, 2), np.uint8))


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_equals_torch_load(tmp_path, legacy):
    """Both torch.save formats: strided and offset views, shared storages, other dtypes."""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "transposed": base.t(),  # strides (1, 10)
        "offset": base[2:4, 3:7],  # storage offset 23
        "same_storage": base,
        "double": torch.linspace(-1, 1, 7, dtype=torch.float64),
        "long": torch.tensor([3, -5], dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "small.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    ours = inception_weights.read_state_dict(str(path))
    loaded = torch.load(path)
    assert list(ours) == list(loaded)
    for key, value in loaded.items():
        assert ours[key].dtype == value.numpy().dtype and ours[key].shape == tuple(value.shape), key
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_reader_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path, _use_new_zipfile_serialization=True, pickle_module=pickle)
    with pytest.raises(FidWeightsError, match="holds a pickled .*system"):
        inception_weights.read_state_dict(str(path))


@pytest.mark.parametrize("legacy", [False, True])
def test_damaged_file(tmp_path, legacy):
    path = tmp_path / "small.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], data[:200], b"plain text"):
        path.write_bytes(damaged)
        with pytest.raises(FidWeightsError, match="truncated|cannot be read|not a torch.save"):
            inception_weights.read_state_dict(str(path))


def _save_modified(weights_path, path, change):
    state = torch.load(weights_path)
    change(state)
    torch.save(state, path)
    return str(path)


def test_missing_key(weights_path, tmp_path):
    path = _save_modified(
        weights_path, tmp_path / "missing.pth", lambda s: s.pop("Mixed_7b.branch_pool.bn.running_var")
    )
    with pytest.raises(FidWeightsError, match=r"lacks Mixed_7b\.branch_pool\.bn\.running_var"):
        inception_weights.load_inception_params(path)


def test_wrong_shape(weights_path, tmp_path):
    def change(state):
        state["Mixed_6e.branch7x7_2.conv.weight"] = state["Mixed_6e.branch7x7_2.conv.weight"].transpose(2, 3)

    path = _save_modified(weights_path, tmp_path / "shape.pth", change)
    with pytest.raises(FidWeightsError, match=r"Mixed_6e\.branch7x7_2\.conv\.weight is \(192, 192, 7, 1\), expected"):
        inception_weights.load_inception_params(path)


@pytest.mark.parametrize("name", inception_weights.STANDARD_NAMES)
def test_hash_mismatch_under_standard_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not the weights")
    with pytest.raises(FidWeightsError, match="sha256 .* does not start with 6726825d"):
        inception_weights.load_inception_params(str(path))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty caches, no env var, and a network that fails."""
    monkeypatch.delenv(inception_weights.ENV, raising=False)
    monkeypatch.setenv(inception_weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def urlopen(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tmp_path, calls


def test_offline_without_file(offline):
    tmp_path, calls = offline
    with pytest.raises(FidWeightsError) as e:
        inception_weights.load_inception_params()
    message = str(e.value)
    target = str(tmp_path / "cache" / inception_weights.FILE_NAME)
    assert "\n" not in message and calls == [inception_weights.URL]
    for part in (target, inception_weights.URL, "--inception_weights", "DDPM_JAX_INCEPTION_WEIGHTS", "no network"):
        assert part in message
    assert os.listdir(tmp_path / "cache") == []  # no partial download left behind


def test_resolve_order(offline, weights_path, monkeypatch):
    tmp_path, calls = offline
    with pytest.raises(FidWeightsError, match="--inception_weights .*nope.pth: no such file"):
        inception_weights.resolve_inception_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv(inception_weights.ENV, weights_path)
    assert inception_weights.resolve_inception_weights() == weights_path
    monkeypatch.delenv(inception_weights.ENV)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")
    assert inception_weights.resolve_inception_weights() == str(hub / "pt_inception-2015-12-05-6726825d.pth")
    assert calls == []


def test_converted_layout(params):
    """Flax layouts: conv kernels HWIO, BN statistics in batch_stats, fc kernel [2048, 1008]."""
    p, stats = params["params"], params["batch_stats"]
    assert p["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
    assert stats["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)
    assert p["fc"]["kernel"].shape == (2048, 1008)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == sum(v.numel() for k, v in ref.random_state_dict(0).items() if not k.endswith("num_batches_tracked"))
    assert jnp.asarray(p["fc"]["kernel"]).dtype == jnp.float32

"""torch-fidelity 0.4.0's Inception-V3 as the reference, and weights files in its format.

torch_fidelity/__init__.py imports every module, and utils.py imports torchvision, whose wheels
here are CUDA builds that do not load beside the CPU torch. The Inception extractor needs only
helpers, defaults, deprecations, feature_extractor_base and interpolate_compat_tensorflow, so
`reference_modules()` puts a bare package object named torch_fidelity (its __path__ the installed
folder, its __init__ not run) in sys.modules and imports those modules through it. Where the real
package already imported (torchvision working), it is used as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from unittest import mock

import numpy as np
import torch

PACKAGE = "torch_fidelity"


def reference_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(torch_fidelity.feature_extractor_inceptionv3, torch_fidelity.interpolate_compat_tensorflow)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)  # finds the folder without running __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("torch-fidelity is not installed: pip install --no-deps torch-fidelity==0.4.0")
        package = types.ModuleType(PACKAGE, "torch-fidelity without its __init__ (tests/helpers/torch_fidelity_ref)")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[PACKAGE] = package
    return (
        importlib.import_module(f"{PACKAGE}.feature_extractor_inceptionv3"),
        importlib.import_module(f"{PACKAGE}.interpolate_compat_tensorflow"),
    )


FEATURES = ("2048", "logits_unbiased", "logits")


def reference_extractor(path: str, features=FEATURES):
    """torch-fidelity's FeatureExtractorInceptionV3 loaded from the weights file at `path` (float32, eval)."""
    module, _ = reference_modules()
    return module.FeatureExtractorInceptionV3(
        "inception-v3-compat", list(features), feature_extractor_weights_path=path
    )


def reference_features(extractor, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's features of uint8 NHWC images (grey repeated to RGB), keyed as ddpm_jax names them."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        out = extractor.convert_features_tuple_to_dict(extractor(x.contiguous()))
    names = {"2048": "pool", "logits_unbiased": "logits_unbiased", "logits": "logits"}
    return {names[k]: v.numpy() for k, v in out.items()}


def reference_resize(images_nhwc: np.ndarray, size: int = 299) -> np.ndarray:
    """interpolate_bilinear_2d_like_tensorflow1x on float32 NHWC images (as the extractor calls it)."""
    _, interp = reference_modules()
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
    out = interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


@contextlib.contextmanager
def _no_weights(module):
    """Builds the extractor without its weights: the download is replaced by an empty state dict, and
    load_state_dict of that empty dict is skipped."""
    empty = object()
    with (
        mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: empty),
        mock.patch.object(
            module.FeatureExtractorInceptionV3,
            "load_state_dict",
            lambda self, state_dict, *a, **k: (
                None if state_dict is empty else torch.nn.Module.load_state_dict(self, state_dict, *a, **k)
            ),
        ),
    ):
        yield


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The reference network's state dict (its keys, shapes, dtypes) with seeded random values at
    scales that keep activations O(1) through 299x299: He-scaled conv weights, BatchNorm running
    mean ~ N(0, 0.1^2), running var and weight in [0.8, 1.2], bias ~ N(0, 0.1^2); fc ~ N(0, 1/2048)."""
    module, _ = reference_modules()
    with _no_weights(module):
        net = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        shape = value.shape
        if key.endswith("num_batches_tracked"):
            new = value.clone()
        elif key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            new = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            new = 0.8 + 0.4 * torch.rand(shape, generator=gen)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            new = 0.1 * torch.randn(shape, generator=gen)
        elif key == "fc.weight":
            new = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        elif key == "fc.bias":
            new = 0.1 * torch.randn(shape, generator=gen)
        else:
            raise KeyError(f"unexpected key in the reference's state dict: {key}")
        state[key] = new.to(value.dtype)
    return state


def write_random_inception_pth(path, seed: int = 0, legacy: bool = False) -> str:
    """Writes random weights in the real file's format (torch.save of the reference's state dict)
    to `path` and returns it. legacy=True writes torch's pre-1.6 (non-zip) format."""
    torch.save(random_state_dict(seed), str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)

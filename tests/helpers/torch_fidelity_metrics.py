"""torch-fidelity 0.4.0's metric modules (metric_fid, metric_isc, metric_kid) as the reference for
ddpm_jax.evaluation.fid_metrics.

The package is imported without its __init__ (torch_fidelity_ref.reference_modules: torchvision does
not load here). The metric modules also import torch_fidelity.utils at their top, which imports
torchvision, for the names that read inputs and extract features (create_feature_extractor,
extract_featuresdict_from_input_id_cached, ...); the functions compared here (fid_statistics_to_metric,
isc_features_to_metric, kid_features_to_metric, mmd2, kernel_poly) never call them. So unless the real
package (and its utils) is already imported, a stand-in module holding those names (each raising if
called) is put in sys.modules as torch_fidelity.utils first. (With the package's __init__ bypassed the
real utils could not load anyway: it imports names from that __init__.)
"""

from __future__ import annotations

import importlib
import sys
import types

from helpers.torch_fidelity_ref import PACKAGE, reference_modules

# The names metric_fid, metric_isc and metric_kid import from torch_fidelity.utils (v0.4.0).
UTILS_NAMES = (
    "get_cacheable_input_name",
    "cache_lookup_one_recompute_on_miss",
    "extract_featuresdict_from_input_id_cached",
    "create_feature_extractor",
    "resolve_feature_extractor",
    "resolve_feature_layer_for_metric",
)


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"torch_fidelity.utils.{name} is a stand-in (torchvision is not importable here).")

    return call


def _utils_stand_in() -> None:
    name = f"{PACKAGE}.utils"
    if name in sys.modules:  # the real one (torchvision working), or the stand-in already
        return
    utils = types.ModuleType(name, "stand-in for torch_fidelity.utils (tests/helpers/torch_fidelity_metrics)")
    for attr in UTILS_NAMES:
        setattr(utils, attr, _unavailable(attr))
    sys.modules[name] = utils


def metric_modules() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """(torch_fidelity.metric_fid, metric_isc, metric_kid)."""
    reference_modules()  # the bare package object
    _utils_stand_in()
    return tuple(importlib.import_module(f"{PACKAGE}.metric_{m}") for m in ("fid", "isc", "kid"))

"""Config files and dotted field access: loading `path[:arg]`, reading and setting
`section.field`, and flattening a config for comparisons and digests."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os

import ml_collections

from ddpm_jax.errors import ConfigError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path[:arg]` the way --config does (get_config(arg)), with a clear error."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(
            f"--config={spec}: no such file {path!r}. Use a file in configs/ (vdm.py, ddpm.py, vae.py, hvae.py, mnist.py, "
            "cifar10.py), optionally with ':runlocal' for the tiny test config."
        )
    module_spec = importlib.util.spec_from_file_location("_ddpm_jax_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - the user's config file
        raise ConfigError(f"--config={spec}: loading it failed ({type(e).__name__}: {e}).") from e


def lookup_field(config: ml_collections.ConfigDict, dotted: str):
    """The value at config.<dotted>, or ConfigError naming the first unknown part and close names."""
    node = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        parent = ".".join(["config"] + parts[:i])
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{dotted}: {parent} is a value ({node!r}), not a section.")
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" Did you mean {parent}.{close[0]}?" if close else ""
            raise ConfigError(
                f"--config.{dotted}: unknown config field {parent}.{part}.{hint} "
                f"{parent} has: {', '.join(sorted(node.keys()))}."
            )
        node = node[part]
    return node


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """config.<dotted> = value, for a field that exists (lists become tuples, as in the config files)."""
    lookup_field(config, dotted)
    parent, _, leaf = dotted.rpartition(".")
    node = lookup_field(config, parent) if parent else config
    node[leaf] = tuple(value) if isinstance(value, list) else value


def flatten(tree, prefix: str = "config") -> dict:
    """{"config.section.field": value} for every leaf (lists as tuples, as JSON round trips give them)."""
    if isinstance(tree, (dict, ml_collections.ConfigDict)):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: tuple(tree) if isinstance(tree, list) else tree}


def digest(config: ml_collections.ConfigDict) -> str:
    """A short hash of every field: equal configs, equal digests."""
    return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]

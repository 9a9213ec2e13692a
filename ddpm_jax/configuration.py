"""Config files and dotted field access: loading `name_or_path[:variant]` (the shipped configs by
name, any .py file by path), reading and setting `section.field`, and flattening a config for
comparisons and digests."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import types

import ml_collections

from ddpm_jax.errors import ConfigError

CONFIGS_PACKAGE = "ddpm_jax.configs"  # the repo's configs/ folder, shipped in the wheel under this name


def configs_package() -> types.ModuleType:
    """The shipped configs as the package ddpm_jax.configs: installed (the wheel maps configs/ there), or,
    in a source checkout whose install does not map it, the configs/ folder beside ddpm_jax/."""
    try:
        return importlib.import_module(CONFIGS_PACKAGE)
    except ModuleNotFoundError as e:
        if e.name != CONFIGS_PACKAGE:
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise ConfigError(f"this install of ddpm_jax has no configs ({CONFIGS_PACKAGE}): reinstall it with pip.")
    spec = importlib.util.spec_from_file_location(CONFIGS_PACKAGE, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CONFIGS_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def configs_dir() -> str:
    return os.path.realpath(configs_package().__path__[0])


def names(subfolder: str = "") -> list[str]:
    """The shipped configs (or, with subfolder="ablations", the ablation grids) by name."""
    folder = os.path.join(configs_dir(), subfolder)
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def resolve(spec_path: str, flag: str = "--config", subfolder: str = "") -> str:
    """The file a --config (or --grid) value names: a shipped name (`cifar10`) or a path to a .py file."""
    if os.sep in spec_path or "/" in spec_path or spec_path.endswith(".py"):
        if os.path.isfile(spec_path):
            return spec_path
        problem = f"no such file {spec_path!r}"
    else:
        path = os.path.join(configs_dir(), subfolder, spec_path + ".py")
        if spec_path in names(subfolder):
            return path
        close = difflib.get_close_matches(spec_path, names(subfolder), n=1)
        noun = "grid" if subfolder == "ablations" else "config"
        problem = f"no {noun} named {spec_path!r}" + (f" (did you mean {close[0]}?)" if close else "")
    where = f"configs/{subfolder + '/' if subfolder else ''}"
    raise ConfigError(
        f"{flag}={spec_path}: {problem}. Pass a name of {where} ({', '.join(names(subfolder))}) or a path to "
        f"a .py file{', optionally with :runlocal for the tiny test config' if not subfolder else ''}."
    )


def import_file(path: str) -> types.ModuleType:
    """The module of a config or grid file, imported as a module of its folder so that relative imports
    (`from . import ddpm`) work: a shipped file as ddpm_jax.configs.<name>, installed or not; a file in
    another folder with an __init__.py as a module of that folder; any other file by its path alone."""
    real = os.path.realpath(path)
    package_dir = configs_dir()
    if real.startswith(package_dir + os.sep):
        relative = os.path.splitext(os.path.relpath(real, package_dir))[0]
        return importlib.import_module(f"{CONFIGS_PACKAGE}.{relative.replace(os.sep, '.')}")
    folder, stem = os.path.dirname(real), os.path.splitext(os.path.basename(real))[0]
    if os.path.isfile(os.path.join(folder, "__init__.py")):  # a config folder of the user's own
        package = f"_ddpm_jax_configs_{hashlib.sha256(folder.encode()).hexdigest()[:12]}"
        if package not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                package, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
            )
            sys.modules[package] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[package])
        return importlib.import_module(f"{package}.{stem}")
    module_spec = importlib.util.spec_from_file_location("_ddpm_jax_user_config", real)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `name_or_path[:variant]` the way --config does (get_config(variant)), with a clear error.

    A name is a file of the shipped configs (`cifar10`, `vdm:runlocal`); anything with a slash or a .py
    ending is a path (`configs/vdm.py:runlocal`, `my_config.py`). A config file that lists its
    VARIANTS gets an unknown variant refused with that list.
    """
    name, _, arg = spec.partition(":")
    path = resolve(name)
    try:
        module = import_file(path)
        known = getattr(module, "VARIANTS", None)
        if arg and known is not None and arg not in known:
            raise ConfigError(
                f"--config={spec}: unknown variant {arg!r} of {name}; its variants are {', '.join(known)} "
                f"(or none: --config={name})."
            )
        return module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
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

"""Checks a run's config and command line before anything is built, with errors that name the fix.

`validate_config` raises ConfigError for the first value that cannot work; `flags_parser` is the
absl flags parser of train.py / sample.py: it answers unknown config fields, values of the wrong
type and out-of-range flags with one `error: ...` line instead of a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import numbers
import os
import re
import sys

import jax
import ml_collections
from absl import flags

from ddpm_jax import diffusion, schedules, timesteps
from ddpm_jax.models.learned_schedule import LEARNED

METHODS = ("ddpm", "vae")  # config.method: the diffusion model, or the VAE baseline (configs/vae.py)


class UserError(Exception):
    """An input the user can fix (config, flags, workdir, data); entry points print it without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field."""


def _require(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(section, field: str, prefix: str, hint: str = "") -> None:
    value = section[field]
    _require(_is_int(value) and value >= 1, f"{prefix}.{field}", f"must be a positive integer, got {value!r}{hint}.")


def _check_model(config: ml_collections.ConfigDict) -> None:
    m = config.model
    for field in ("ch", "num_res_blocks", "num_groups"):
        _positive_int(m, field, "model")
    ch_mult_ok = isinstance(m.ch_mult, (tuple, list)) and len(m.ch_mult) >= 1
    _require(ch_mult_ok and all(_is_int(c) and c >= 1 for c in m.ch_mult), "model.ch_mult",
             f"must be a non-empty tuple of positive integers, e.g. (1, 2), got {m.ch_mult!r}.")
    _require(isinstance(m.attn_resolutions, (tuple, list)) and all(_is_int(r) for r in m.attn_resolutions),
             "model.attn_resolutions",
             f"must be a tuple of integers (resolutions, e.g. (16,)), got {m.attn_resolutions!r}.")
    _require(_is_number(m.dropout) and 0.0 <= m.dropout < 1.0, "model.dropout",
             f"must be in [0, 1), got {m.dropout!r} (the paper uses 0.1 on CIFAR-10).")
    from ddpm_jax.models.unet import create_model  # its own checks: down-sampling, attention, groups, dtype
    from ddpm_jax.train_lib import model_out_channels

    try:
        create_model(m, config.data.image_size, model_out_channels(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_vae(config: ml_collections.ConfigDict) -> None:
    _require("vae" in config, "vae", "missing section for method='vae'; start from configs/vae.py.")
    for field in ("latent_dim", "hidden", "num_hidden_layers"):
        _positive_int(config.vae, field, "vae")
    from ddpm_jax.models.unet import DTYPES

    _require(config.vae.dtype in DTYPES, "vae.dtype", f"must be one of {sorted(DTYPES)}, got {config.vae.dtype!r}.")


def _check_training(tr: ml_collections.ConfigDict, num_devices: int | None) -> None:
    _positive_int(tr, "batch_size", "training")
    devices = jax.device_count() if num_devices is None else num_devices
    _require(tr.batch_size % devices == 0, "training.batch_size",
             f"{tr.batch_size} is not divisible by the {devices} devices; use a multiple of {devices} "
             f"(e.g. {max(devices, tr.batch_size // devices * devices)} or "
             f"{max(devices, tr.batch_size // devices * devices) + devices}).")
    bpd_batch = tr.get("bpd_batch_size", 0)
    _require(_is_int(bpd_batch) and bpd_batch >= 0 and bpd_batch % devices == 0, "training.bpd_batch_size",
             f"must be 0 (use batch_size) or a positive multiple of the {devices} devices, got {bpd_batch!r}.")
    strata = tr.get("final_bpd_strata", 0)
    _require(_is_int(strata) and strata >= 0, "training.final_bpd_strata",
             f"must be 0 (all T terms) or a positive number of strata, got {strata!r}.")
    _positive_int(tr, "num_train_steps", "training")
    _require(_is_number(tr.ema_decay) and 0.0 <= tr.ema_decay < 1.0, "training.ema_decay",
             f"must be in [0, 1), got {tr.ema_decay!r} (e.g. 0.9999; 0 means no averaging).")
    for field in ("log_every", "eval_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(tr, field, "training")
    if "max_nonfinite_steps" in tr:
        _positive_int(tr, "max_nonfinite_steps", "training", " (how many NaN/Inf steps in a row stop the run)")


def _check_optim(opt: ml_collections.ConfigDict) -> None:
    _require(_is_number(opt.lr) and opt.lr > 0, "optim.lr", f"must be > 0, got {opt.lr!r} (the paper uses 2e-4).")
    _require(_is_number(opt.warmup_steps) and opt.warmup_steps >= 0, "optim.warmup_steps",
             f"must be >= 0, got {opt.warmup_steps!r}.")
    _require(_is_number(opt.grad_clip) and opt.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {opt.grad_clip!r}.")
    _require(opt.lr_schedule in ("constant", "cosine"), "optim.lr_schedule",
             f"use 'constant' or 'cosine', got {opt.lr_schedule!r}.")
    for field in ("beta1", "beta2"):
        _require(_is_number(opt[field]) and 0.0 <= opt[field] < 1.0, f"optim.{field}",
                 f"must be in [0, 1), got {opt[field]!r}.")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first value that cannot work.

    Args:
      config: a run's config (configs/default.py's layout).
      num_devices: the global device count the batch is split over; default jax.device_count().
    """
    for section in ("data", "model", "diffusion", "training", "optim", "sampling"):
        _require(section in config, section, "missing section; start from configs/default.py.")
    d, diff = config.data, config.diffusion

    _require(isinstance(d.dataset, str) and d.dataset != "", "data.dataset",
             f"must be a tfds name such as 'digits' or 'cifar10', got {d.dataset!r}.")
    _positive_int(d, "image_size", "data")
    _require(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels!r}.")

    method = config.get("method", "ddpm")
    _require(method in METHODS, "method", f"unknown {method!r}; valid: {', '.join(METHODS)}.")
    valid_schedules = schedules.SCHEDULE_NAMES + (LEARNED,)
    _require(diff.schedule in valid_schedules, "diffusion.schedule",
             f"unknown {diff.schedule!r}; valid: {', '.join(valid_schedules)}.")
    _require(diff.schedule != LEARNED or diff.loss_type in ("vlb", "weighted"), "diffusion.loss_type",
             f"a learned schedule is trained by the bound: use 'vlb' or 'weighted', not {diff.loss_type!r} (the "
             "unweighted MSE would drive it towards all noise).")
    _require(_is_int(diff.num_timesteps) and diff.num_timesteps >= 1, "diffusion.num_timesteps",
             f"must be an integer >= 1 (the number of diffusion steps T; the paper uses 1000), "
             f"got {diff.num_timesteps!r}.")
    for field, valid in (("parameterization", diffusion.PARAMETERIZATIONS), ("variance", diffusion.VARIANCES),
                         ("loss_type", diffusion.LOSS_TYPES), ("timestep_sampler", timesteps.TIMESTEP_SAMPLERS)):
        _require(diff[field] in valid, f"diffusion.{field}", f"unknown {diff[field]!r}; valid: {', '.join(valid)}.")
    learned = diff.variance in ("learned", "learned_range")
    _require(not (learned and diff.loss_type in ("simple", "weighted")), "diffusion.loss_type",
             f"{diff.loss_type!r} cannot train variance={diff.variance!r}; use 'hybrid' or 'vlb'.")
    _require(not (diff.timestep_sampler == "importance" and diff.loss_type == "simple"), "diffusion.timestep_sampler",
             "'importance' weighs t by the bound's terms: use it with loss_type 'vlb', 'hybrid' or 'weighted'.")
    _require(not (diff.schedule == "ve" and diff.parameterization == "v"), "diffusion.parameterization",
             "'v' is defined for variance-preserving schedules; use 'eps' or 'x0' with 've'.")

    _check_training(config.training, num_devices)
    _check_optim(config.optim)
    if method == "vae":
        _check_vae(config)
    else:
        _check_model(config)
    _positive_int(config.sampling, "num_samples", "sampling")


# ----------------------------------------------------------------------------- command line

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([\w.]+)(?:=.*)?$", re.S)
_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$", re.S)
_FLAG_IN_MESSAGE = re.compile(r"flag --(?:no)?config\.([\w.]+)=")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path[:arg]` the way --config does (get_config(arg)), with a clear error."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no such file {path!r}. Use a file in configs/ (default.py, mnist.py, "
                          "cifar10.py), optionally with ':runlocal' for the tiny test config.")
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
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            parent = ".".join(["config"] + parts[:i])
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{dotted}: {parent} is a value ({node!r}), not a section.")
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" Did you mean {parent}.{close[0]}?" if close else ""
            raise ConfigError(f"--config.{dotted}: unknown config field {parent}.{part}.{hint} "
                              f"{parent} has: {', '.join(sorted(node.keys()))}.")
        node = node[part]
    return node


def check_config_flags(argv: list[str], default_spec: str) -> ml_collections.ConfigDict:
    """Loads the --config file named in argv and checks that every --config.* override exists."""
    spec, args = default_spec, argv[1:]
    for i, arg in enumerate(args):
        m = _CONFIG_FLAG.match(arg)
        if m:
            spec = m.group(1) if m.group(1) is not None else (args[i + 1] if i + 1 < len(args) else default_spec)
    config = load_config_file(spec)
    for arg in args:
        m = _OVERRIDE.match(arg)
        if m:
            lookup_field(config, m.group(1))
    return config


def _explain_flag_error(message: str, config: ml_collections.ConfigDict | None) -> str:
    """absl's message, plus the type a --config.* field expects or the help of a plain flag."""
    m = _FLAG_IN_MESSAGE.search(message)
    if m and config is not None:
        try:
            value = lookup_field(config, m.group(1))
        except ConfigError:
            return message
        return (f"{message}. config.{m.group(1)} holds a value of type {type(value).__name__} (default {value!r}); "
                "pass one of that type.")
    m = re.search(r"of field config\.([\w.]+) is not supported for overriding", message)
    if m:
        tfds_hint = (" (for data_dir, the TFDS_DATA_DIR environment variable works too)"
                     if m.group(1) == "data.data_dir" else "")
        return (f"--config.{m.group(1)} cannot be set from the command line: its default is None, whose type "
                "ml_collections cannot override. Give it a typed default in the config file, e.g. "
                f"ml_collections.config_dict.placeholder(str){tfds_hint}.")
    m = re.search(r"flag --(\w+)=", message)
    if m and m.group(1) in flags.FLAGS:
        flag = flags.FLAGS[m.group(1)]
        return f"{message}. --{flag.name}: {flag.help.rstrip('.')} (default {flag.default!r})."
    return message


def flags_parser(config_default: str | None = None):
    """An absl `flags_parser` for app.run that prints `error: ...` (no traceback) for bad flags.

    Args:
      config_default: the --config default (`path[:arg]`), for entry points with a --config flag;
        its overrides are checked against the loaded config before absl parses them.
    """

    def parse(argv):
        config = None
        try:
            if config_default is not None:
                config = check_config_flags(argv, config_default)
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(f"error: {_explain_flag_error(str(e), config)}")
        except UserError as e:
            sys.exit(f"error: {e}")
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # ml_collections' own, last resort
            sys.exit(f"error: bad command line {' '.join(argv[1:])!r} ({type(e).__name__}: {e}). "
                     "Check the --config.* names against the config file.")

    return parse

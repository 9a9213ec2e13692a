"""Checks a run's config before anything is built, with errors that name the fix.

`validate_config` raises errors.ConfigError for the first value that cannot work: a section or
field the method does not read (`unread_field_error`), the sections every run has here, the
method's own fields in its `validate` (ddpm_jax.methods).

A method reads the shared sections it names (`Method.shared_sections`: data, model, training,
optim, sampling, or fewer) and its own (`Method.section`), with the fields of its shipped config
(`Method.default_config`). Anything else would be silently ignored, so that a grid over it trains
identical cells; it is refused instead, with the method that does read it.
"""

from __future__ import annotations

import difflib
import functools

import jax
import ml_collections

from ddpm_jax import configuration, methods
from ddpm_jax.checks import is_int, is_number, one_of, positive_int, require
from ddpm_jax.errors import ConfigError, UserError  # noqa: F401 - re-exported for callers of this module
from ddpm_jax.training.train_lib import LR_SCHEDULES


def _check_training(tr: ml_collections.ConfigDict, num_devices: int | None) -> None:
    positive_int(tr, "batch_size", "training")
    devices = jax.device_count() if num_devices is None else num_devices
    require(
        tr.batch_size % devices == 0,
        "training.batch_size",
        f"{tr.batch_size} is not divisible by the {devices} devices; use a multiple of {devices} "
        f"(e.g. {max(devices, tr.batch_size // devices * devices)} or "
        f"{max(devices, tr.batch_size // devices * devices) + devices}).",
    )
    bpd_batch = tr.bpd_batch_size
    require(
        is_int(bpd_batch) and bpd_batch >= 0 and bpd_batch % devices == 0,
        "training.bpd_batch_size",
        f"must be 0 (use batch_size) or a positive multiple of the {devices} devices, got {bpd_batch!r}.",
    )
    for field, what in (("final_bpd_strata", "0 (the most exact bound)"), ("bpd_estimate_strata", "0")):
        strata = tr[field]
        require(
            is_int(strata) and strata >= 0,
            f"training.{field}",
            f"must be {what} or a positive number of strata, got {strata!r}.",
        )
    positive_int(tr, "num_train_steps", "training")
    require(
        is_number(tr.ema_decay) and 0.0 <= tr.ema_decay < 1.0,
        "training.ema_decay",
        f"must be in [0, 1), got {tr.ema_decay!r} (e.g. 0.9999; 0 means no averaging).",
    )
    for field in ("log_every", "eval_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
        positive_int(tr, field, "training")
    positive_int(tr, "max_nonfinite_steps", "training", " (how many NaN/Inf steps in a row stop the run)")
    keep_best = tr.get("keep_best", False)
    require(
        isinstance(keep_best, bool),
        "training.keep_best",
        f"must be True (report the EMA params of the best validation eval) or False (the last step's), got "
        f"{keep_best!r}.",
    )
    fid_every, fid_num = tr.get("fid_every", 0), tr.get("fid_num_samples", 10_000)
    require(
        is_int(fid_every) and fid_every >= 0,
        "training.fid_every",
        f"must be 0 (no FID during training) or a positive number of steps, got {fid_every!r}.",
    )
    require(
        is_int(fid_num) and fid_num >= 2,
        "training.fid_num_samples",
        f"must be a whole number >= 2 of samples per FID, got {fid_num!r} (the paper's FID uses 50000).",
    )


def _check_optim(opt: ml_collections.ConfigDict) -> None:
    require(is_number(opt.lr) and opt.lr > 0, "optim.lr", f"must be > 0, got {opt.lr!r} (the paper uses 2e-4).")
    require(
        is_number(opt.warmup_steps) and opt.warmup_steps >= 0,
        "optim.warmup_steps",
        f"must be >= 0, got {opt.warmup_steps!r}.",
    )
    require(is_number(opt.grad_clip) and opt.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {opt.grad_clip!r}.")
    one_of(opt.lr_schedule, LR_SCHEDULES, "optim.lr_schedule")
    for field in ("beta1", "beta2"):
        require(
            is_number(opt[field]) and 0.0 <= opt[field] < 1.0,
            f"optim.{field}",
            f"must be in [0, 1), got {opt[field]!r}.",
        )


TOP_LEVEL_FIELDS = ("seed", "method")


def read_sections(method: type[methods.Method]) -> tuple[str, ...]:
    """The config sections `method` reads: the shared ones it uses, then its own."""
    return method.shared_sections + (method.section,)


@functools.cache
def _reference_fields(config_name: str) -> dict[str, tuple[str, ...]]:
    """{section: its fields} of a shipped config (a method's `default_config`): the fields it reads."""
    config = configuration.load_config_file(config_name)
    return {k: tuple(v.keys()) for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)}


def unread_field_error(config: ml_collections.ConfigDict, dotted: str, fields: bool = True) -> ConfigError | None:
    """The error for config.<dotted> (a section or a field) when config.method does not read it, else None.

    fields=False checks the section only (a command-line override: configuration.lookup_field then
    names an unknown field with its close matches)."""
    method = methods.method_class(config)
    section, _, field = dotted.partition(".")
    if section in TOP_LEVEL_FIELDS:
        return None
    own = f"its own section is config.{method.section} (configs/{method.default_config}.py)"
    if section not in read_sections(method):
        readers = [m for m in methods.REGISTRY.values() if section in read_sections(m)]
        if not readers:  # no method's section: a typo, which lookup names with its close match
            if not fields:
                return None
            close = difflib.get_close_matches(section, read_sections(method), n=1)
            hint = f" Did you mean config.{close[0]}?" if close else ""
            return ConfigError(f"config.{dotted}: no method reads config.{section}.{hint} {own}.")
        configs = ", ".join(f"--config={m.default_config}" for m in readers)
        return ConfigError(
            f"config.{dotted}: method {method.name!r} does not read config.{section} (the section of "
            f"{', '.join(repr(m.name) for m in readers)}); {own}: remove it, or train a method that reads it "
            f"({configs})."
        )
    name = field.partition(".")[0]
    if not fields:
        return None
    reference = _reference_fields(method.default_config).get(section, ())
    if name and name not in reference:
        close = difflib.get_close_matches(name, reference, n=1)
        hint = f" Did you mean config.{section}.{close[0]}?" if close else ""
        return ConfigError(
            f"config.{section}.{name}: method {method.name!r} does not read this field.{hint} config.{section} has "
            f"{', '.join(sorted(reference))} (configs/{method.default_config}.py)."
        )
    return None


def check_fields_are_read(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first section or field of `config` that its method does not read."""
    for section in config.keys():
        fields = config[section].keys() if isinstance(config[section], ml_collections.ConfigDict) else [None]
        for field in fields:
            error = unread_field_error(config, section if field is None else f"{section}.{field}")
            if error is not None:
                raise error


def without_unread_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` without the sections and fields its method does not read: a run's saved
    config.json from before configs held only their method's sections (a VDM run's `diffusion`)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for section in list(config.keys()):
        if unread_field_error(config, section) is not None:
            del config[section]
        elif isinstance(config[section], ml_collections.ConfigDict):
            for field in list(config[section].keys()):
                if unread_field_error(config, f"{section}.{field}") is not None:
                    del config[section][field]
    return config


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first value that cannot work.

    Args:
      config: a run's config (configs/ddpm.py's layout).
      num_devices: the global device count the batch is split over; default jax.device_count().
    """
    method = methods.method_class(config)
    check_fields_are_read(config)
    for section in ("data", "training", "optim", "sampling"):
        require(section in config, section, "missing section; start from configs/ddpm.py.")
    d = config.data
    require(
        isinstance(d.dataset, str) and d.dataset not in ("", "folder:"),
        "data.dataset",
        f"must be a tfds name such as 'digits' or 'cifar10', or 'folder:/path/to/images', got {d.dataset!r}.",
    )
    positive_int(d, "image_size", "data")
    require(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels!r}.")
    in_memory = d.get("in_memory", True)
    require(
        isinstance(in_memory, bool),
        "data.in_memory",
        f"must be True (read the splits into memory) or False (stream them from disk), got {in_memory!r}.",
    )
    from ddpm_jax.data import splits  # light (no pipeline): the holdout's rule and its field checks

    splits.check_validation_fields(d)  # validation_split / validation_size (the holdout's size: when it is read)
    _check_training(config.training, num_devices)
    _check_optim(config.optim)
    method.validate(config)
    positive_int(config.sampling, "num_samples", "sampling")

"""Checks a run's config before anything is built, with errors that name the fix.

`validate_config` raises errors.ConfigError for the first value that cannot work: the sections
every run has here, the method's own fields in its `validate` (ddpm_jax.methods).
"""

from __future__ import annotations

import jax
import ml_collections

from ddpm_jax import methods
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


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first value that cannot work.

    Args:
      config: a run's config (configs/ddpm.py's layout).
      num_devices: the global device count the batch is split over; default jax.device_count().
    """
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
    method = methods.method_class(config)
    _check_training(config.training, num_devices)
    _check_optim(config.optim)
    method.validate(config)
    positive_int(config.sampling, "num_samples", "sampling")

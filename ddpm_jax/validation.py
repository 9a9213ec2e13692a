"""Checks a run's config before anything is built, with errors that name the field and the fix."""

from __future__ import annotations

import jax
import ml_collections

from ddpm_jax import diffusion, schedules, timesteps


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _require(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first value that cannot work."""
    for section in ("data", "model", "diffusion", "training", "optim", "sampling"):
        _require(section in config, section, "missing section; start from configs/default.py.")
    d, m, diff, tr, opt = config.data, config.model, config.diffusion, config.training, config.optim

    _require(_is_int(d.image_size) and d.image_size >= 1, "data.image_size", f"must be a positive integer, got {d.image_size!r}.")
    _require(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels!r}.")

    _require(diff.schedule in schedules.SCHEDULE_NAMES, "diffusion.schedule",
             f"unknown {diff.schedule!r}; valid: {', '.join(schedules.SCHEDULE_NAMES)}.")
    _require(_is_int(diff.num_timesteps) and diff.num_timesteps >= 1, "diffusion.num_timesteps",
             f"must be an integer >= 1, got {diff.num_timesteps!r}.")
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

    _require(_is_int(tr.batch_size) and tr.batch_size >= 1, "training.batch_size", f"must be a positive integer, got {tr.batch_size!r}.")
    devices = jax.device_count() if num_devices is None else num_devices
    _require(tr.batch_size % devices == 0, "training.batch_size",
             f"{tr.batch_size} is not divisible by the {devices} devices; use a multiple of {devices}.")
    _require(_is_int(tr.num_train_steps) and tr.num_train_steps >= 1, "training.num_train_steps",
             f"must be an integer >= 1, got {tr.num_train_steps!r}.")
    _require(0.0 <= tr.ema_decay < 1.0, "training.ema_decay", f"must be in [0, 1), got {tr.ema_decay!r}.")
    for field in ("log_every", "eval_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
        _require(_is_int(tr[field]) and tr[field] >= 1, f"training.{field}", f"must be an integer >= 1, got {tr[field]!r}.")

    _require(opt.lr > 0, "optim.lr", f"must be > 0, got {opt.lr!r}.")
    _require(opt.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {opt.warmup_steps!r}.")
    _require(opt.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {opt.grad_clip!r}.")
    _require(opt.lr_schedule in ("constant", "cosine"), "optim.lr_schedule", f"use 'constant' or 'cosine', got {opt.lr_schedule!r}.")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout!r}.")
    _require(_is_int(config.sampling.num_samples) and config.sampling.num_samples >= 1, "sampling.num_samples",
             f"must be a positive integer, got {config.sampling.num_samples!r}.")

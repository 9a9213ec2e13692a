"""Small checks of config values that raise errors.ConfigError naming the field (shared by every
validator: the run's sections in validation.py, each method's own in methods/)."""

from __future__ import annotations

import numbers

from ddpm_jax.errors import ConfigError


def require(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def positive_int(section, field: str, prefix: str, hint: str = "") -> None:
    value = section[field]
    require(is_int(value) and value >= 1, f"{prefix}.{field}", f"must be a positive integer, got {value!r}{hint}.")


def one_of(value, valid, field: str) -> None:
    require(value in valid, field, f"unknown {value!r}; valid: {', '.join(valid)}.")

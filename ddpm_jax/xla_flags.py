"""XLA flags that ddpm_jax's entry points set before JAX creates its backends.

XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK by default. ddpm_jax
keeps YNNPACK for dots only:
- Convolutions: YNNPACK's weight-gradient convolutions (the window spans the whole image) run at
  22-37 GFLOP/s on the cifar10 UNet's shapes on a 2-core x86 VM, XLA's Eigen ones at 80-90; forward
  and input-gradient convolutions are about equal.
- Elementwise ops and reductions: the UNet's GroupNorm, swish and optimizer ops run faster as XLA's
  own fused loops than as YNNPACK calls. Both train steps ran 10% faster without them (pair ratios,
  steps alternating in one process: digits batch 128 153.5 vs 166.2 ms, cifar10 batch 8 2139 vs
  2366 ms; bench/step_variants.py).
The numbers are in bench/RESULTS.md. The flag only affects XLA:CPU: GPU compiles ignore it.

XLA reads XLA_FLAGS once, when the first backend is created, so `configure()` must run before
anything touches a device (importing jax is fine). A user's own choice for the same flag wins.

`configure()` also turns on JAX's persistent compilation cache, so a second start (a resume,
sample.py, evaluate, the tests) loads compiled steps instead of compiling them again: under
$DDPM_JAX_CACHE_DIR, else $XDG_CACHE_HOME/ddpm_jax/xla (~/.cache/ddpm_jax/xla).
DDPM_JAX_COMPILATION_CACHE=0 turns it off; a JAX_COMPILATION_CACHE_DIR of the user's own wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# YNNPACK for matrix multiplications only (fused with their neighbours or alone).
YNN_DOTS_ONLY = f"{YNN_FLAG}=dot,individual_dot"


def with_cpu_defaults(xla_flags: str) -> str:
    """`xla_flags` plus ddpm_jax's XLA:CPU defaults, unless it already sets the same flag."""
    if YNN_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {YNN_DOTS_ONLY}".strip()


def compilation_cache_dir(environ: MutableMapping[str, str]) -> str | None:
    """Where compiled programs are kept between runs; None when the cache is turned off."""
    if environ.get("DDPM_JAX_COMPILATION_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    if environ.get("DDPM_JAX_CACHE_DIR"):
        return environ["DDPM_JAX_CACHE_DIR"]
    cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "ddpm_jax", "xla")


def configure(environ: MutableMapping[str, str] | None = None) -> None:
    """Adds the defaults to environ["XLA_FLAGS"] and the compilation cache's variables (os.environ by
    default; read when jax is imported); idempotent."""
    environ = os.environ if environ is None else environ
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
    cache = compilation_cache_dir(environ)
    if cache is not None:
        environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)  # jax keeps compiles of >= 1 s there

"""Test-session setup: 4 forced host (CPU) devices, so pmap tests see several devices.

This must run before anything imports jax; conftest.py is imported by pytest before the test
modules, so setting the flag here covers the whole suite.
"""

import os

from ddpm_jax import xla_flags

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
xla_flags.configure()  # the XLA:CPU flags train.py and sample.py run with

# XLA compiles dominate this suite on CPU; skipping most optimisations cuts them several-fold
# (the flax examples' tests do the same). Numerics are unchanged up to float rounding.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

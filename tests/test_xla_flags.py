"""ddpm_jax.xla_flags: the XLA:CPU defaults the entry points set, and that XLA accepts them."""

import os
import subprocess
import sys
import textwrap

import pytest

from ddpm_jax import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_added_once_and_a_users_choice_wins():
    added = xla_flags.with_cpu_defaults("--xla_force_host_platform_device_count=2")
    assert added == "--xla_force_host_platform_device_count=2 " + xla_flags.YNN_DOTS_ONLY
    assert xla_flags.with_cpu_defaults(added) == added
    assert xla_flags.with_cpu_defaults("") == xla_flags.YNN_DOTS_ONLY
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert xla_flags.with_cpu_defaults(mine) == mine
    env = {"DDPM_JAX_CACHE_DIR": "/cache"}
    xla_flags.configure(env)
    xla_flags.configure(env)
    assert env == {
        "DDPM_JAX_CACHE_DIR": "/cache",
        "XLA_FLAGS": xla_flags.YNN_DOTS_ONLY,
        "JAX_COMPILATION_CACHE_DIR": "/cache",
    }


def test_compilation_cache_dir_defaults_and_switches():
    where = xla_flags.compilation_cache_dir
    assert where({}) == os.path.join(os.path.expanduser("~"), ".cache", "ddpm_jax", "xla")
    assert where({"XDG_CACHE_HOME": "/xdg"}) == "/xdg/ddpm_jax/xla"
    assert where({"XDG_CACHE_HOME": "/xdg", "DDPM_JAX_CACHE_DIR": "/mine"}) == "/mine"
    for off in ("0", "false", "No", "OFF"):
        assert where({"DDPM_JAX_COMPILATION_CACHE": off, "DDPM_JAX_CACHE_DIR": "/mine"}) is None
        env = {"DDPM_JAX_COMPILATION_CACHE": off}
        xla_flags.configure(env)
        assert "JAX_COMPILATION_CACHE_DIR" not in env
    env = {"JAX_COMPILATION_CACHE_DIR": "/users", "DDPM_JAX_CACHE_DIR": "/mine"}  # JAX's own variable wins
    xla_flags.configure(env)
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/users"


@pytest.mark.slow
def test_a_fresh_process_with_the_defaults_computes_conv_gradients_right():
    """A new process, as train.py starts: XLA accepts the flag (an unknown one aborts) and the
    convolution and its two gradients match float64 NumPy."""
    code = textwrap.dedent("""
        import numpy as np
        from ddpm_jax import xla_flags
        xla_flags.configure()
        import jax, jax.numpy as jnp
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
        w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
        g = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
        conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y, vjp = jax.vjp(conv, x, w)
        dx, dw = vjp(g)
        xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        taps = [(i, j, xp[:, i:i + 5, j:j + 5, :]) for i in range(3) for j in range(3)]
        y_ref = sum(np.einsum("bhwc,co->bhwo", s, w[i, j]) for i, j, s in taps)
        dw_ref = np.stack([np.einsum("bhwc,bhwo->co", s, g) for _, _, s in taps]).reshape(w.shape)
        dxp = np.zeros_like(xp)
        for i, j, _ in taps:
            dxp[:, i:i + 5, j:j + 5, :] += np.einsum("bhwo,co->bhwc", g, w[i, j])
        for got, ref in ((y, y_ref), (dw, dw_ref), (dx, dxp[:, 1:-1, 1:-1, :])):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
        print("ok", jax.default_backend())
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok cpu" in proc.stdout

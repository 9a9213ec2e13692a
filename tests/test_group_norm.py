"""The UNet's GroupNorm + swish (ddpm_jax.models.layers.group_norm): values against float64 NumPy,
gradients against central differences of that NumPy forward, and the fusion in the compiled HLO."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.layers import GROUPNORM_EPS, group_norm

SHAPE, GROUPS = (3, 4, 5, 12), 4  # non-square, 3 channels per group


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (2.0 + 3.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    scale = rng.standard_normal(SHAPE[-1]).astype(np.float32)
    bias = rng.standard_normal(SHAPE[-1]).astype(np.float32)
    return x, scale, bias


def _norm_swish(scale, bias, x, swish=True):
    """group_norm (float32) with these parameters, then swish: the blocks' norm -> swish."""
    y = group_norm(GROUPS, jnp.float32).apply({"params": {"scale": scale, "bias": bias}}, x)
    return nn.swish(y) if swish else y


def _numpy_group_norm(x, scale, bias, groups, swish):
    b, h, w, c = x.shape
    g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + GROUPNORM_EPS)
    y = g.reshape(x.shape) * scale + bias
    return y / (1.0 + np.exp(-y)) if swish else y


@pytest.mark.parametrize("swish", [False, True])
def test_matches_float64_numpy(swish):
    x, scale, bias = _inputs()
    out = jax.jit(_norm_swish, static_argnums=3)(scale, bias, x, swish)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _numpy_group_norm(x, scale, bias, GROUPS, swish), rtol=1e-5, atol=1e-5)


def test_gradients_match_central_differences_of_float64_numpy():
    x, scale, bias = _inputs(1)
    weight = np.random.default_rng(2).standard_normal(SHAPE)
    loss = lambda scale, bias, x: jnp.sum(weight.astype(np.float32) * _norm_swish(scale, bias, x))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(scale, bias, x)
    f64 = lambda s, b, x: np.sum(weight * _numpy_group_norm(x, s, b, GROUPS, True))
    rng, step = np.random.default_rng(3), 1e-4
    for i, arg in enumerate((scale, bias, x)):
        direction = rng.standard_normal(arg.shape)
        args = [np.asarray(a, np.float64) for a in (scale, bias, x)]
        up, down = list(args), list(args)
        up[i], down[i] = args[i] + step * direction, args[i] - step * direction
        numeric = (f64(*up) - f64(*down)) / (2 * step)
        assert float(np.sum(np.asarray(grads[i], np.float64) * direction)) == pytest.approx(numeric, rel=1e-3)


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> the op kinds of its instructions."""
    comps, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name and (op := re.search(r"= \S+ ([\w\-]+)\(", line)):
            comps[name].append(op.group(1))
    return comps


def test_residual_norm_swish_is_one_fused_pass_in_the_hlo():
    """residual add -> normalise -> affine -> swish: XLA writes the output in one fusion that reads the
    two raw inputs (the add is recomputed there, not stored and read back); only the group statistics
    take other kernels, and they write [B, groups]-sized arrays."""
    x, scale, bias = _inputs()
    fn = jax.jit(lambda x, r, s, b: _norm_swish(s, b, x + r))
    hlo = fn.lower(x, x, scale, bias).compile().as_text()
    entry = hlo[hlo.index("\nENTRY ") :]
    root = re.search(r"ROOT %?[\w.\-]+ = f32\[3,4,5,12\]\S* fusion\((.*?)\), kind=\w+, calls=%?([\w.\-]+)", entry)
    assert root, "the output is not written by a fusion"
    operands, called = root.groups()
    assert "%x" in operands and "%r" in operands, f"the output fusion does not read the raw inputs: {operands}"
    ops = set(_computations(hlo)[called])
    assert {"add", "multiply"} <= ops and ops & {"logistic", "exponential"}, ops  # swish: x * sigmoid(x)
    others = [line for line in entry.splitlines() if re.search(r"= \S+ (fusion|reduce|add|multiply)\(", line)]
    others = [line for line in others if "ROOT" not in line]
    assert others and all(re.search(r"= f32\[3,4\]", line) for line in others), others

"""The fused GroupNorm (+ swish) of ddpm_jax.models.layers: values against float64 NumPy, gradients
against flax's nn.GroupNorm (separate code) and central differences, the parameter tree against
flax's, and the fusion in the compiled HLO."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.layers import GROUPNORM_EPS, group_norm, group_norm_swish

SHAPE, GROUPS = (3, 4, 5, 12), 4  # non-square, 3 channels per group


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (2.0 + 3.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    scale = rng.standard_normal(SHAPE[-1]).astype(np.float32)
    bias = rng.standard_normal(SHAPE[-1]).astype(np.float32)
    return x, scale, bias


def _numpy_group_norm(x, scale, bias, groups, swish):
    b, h, w, c = x.shape
    g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + GROUPNORM_EPS)
    y = g.reshape(x.shape) * scale + bias
    return y / (1.0 + np.exp(-y)) if swish else y


@pytest.mark.parametrize("swish", [False, True])
def test_matches_float64_numpy(swish):
    x, scale, bias = _inputs()
    out = jax.jit(group_norm_swish, static_argnums=(3, 4))(x, scale, bias, GROUPS, swish)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _numpy_group_norm(x, scale, bias, GROUPS, swish), rtol=1e-5, atol=1e-5)


def _flax_reference(params, x):
    norm = nn.GroupNorm(num_groups=GROUPS, epsilon=GROUPNORM_EPS)
    return nn.swish(norm.apply({"params": params}, x))


def test_gradients_match_flax_group_norm_and_finite_differences():
    x, scale, bias = _inputs(1)
    weight = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    module = group_norm(GROUPS, jnp.float32)

    def loss(apply, p, x):
        return jnp.sum(weight * apply(p, x))

    ours = lambda p, x: module.apply({"params": p}, x, swish=True)
    grads = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
    ref = jax.jit(jax.grad(lambda p, x: loss(_flax_reference, p, x), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()))

    # Central differences of the float64 NumPy forward along a random direction of x.
    direction = np.random.default_rng(3).standard_normal(SHAPE)
    step = 1e-4
    f64 = lambda x: np.sum(weight * _numpy_group_norm(x, scale, bias, GROUPS, True))
    numeric = (f64(x + step * direction) - f64(x - step * direction)) / (2 * step)
    analytic = float(np.sum(np.asarray(grads[1], np.float64) * direction))
    assert analytic == pytest.approx(numeric, rel=1e-3)


def test_parameters_are_flax_group_norms():
    """Same names, shapes, dtypes and initial values as nn.GroupNorm: old checkpoints restore."""
    x = jnp.zeros(SHAPE)
    ours = group_norm(GROUPS, jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    theirs = nn.GroupNorm(num_groups=GROUPS).init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)


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
    two raw inputs (the add is recomputed there, not stored and read back); only the statistics take
    other kernels."""
    x, scale, bias = _inputs()
    fn = jax.jit(lambda x, r, s, b: group_norm_swish(x + r, s, b, GROUPS, True))
    hlo = fn.lower(x, x, scale, bias).compile().as_text()
    entry = hlo[hlo.index("\nENTRY ") :]
    root = re.search(r"ROOT %?[\w.\-]+ = f32\[3,4,5,12\]\S* fusion\((.*?)\), kind=\w+, calls=%?([\w.\-]+)", entry)
    assert root, "the output is not written by a fusion"
    operands, called = root.groups()
    assert "%x" in operands and "%r" in operands, f"the output fusion does not read the raw inputs: {operands}"
    ops = set(_computations(hlo)[called])
    assert {"add", "multiply"} <= ops and ops & {"logistic", "exponential"}, ops  # swish: x * sigmoid(x)

"""Tests for the DDPM UNet: parameter counts, shapes, dtypes, dropout, time conditioning, config checks.

XLA compiles dominate the runtime, so one tiny model is compiled once per mode (module fixtures) and
the large CIFAR-10 model is only traced with jax.eval_shape.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax.configs import cifar10
from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.models import UNet, create_model
from ddpm_jax.models.layers import AttnBlock, group_norm

CIFAR10_PARAMS = 35_746_307  # the paper's "35.7M" (Ho et al. 2020, appendix B)
TINY_PARAMS = 44_969
TINY_SHAPE = (2, 8, 8, 1)  # [B, H, W, C]


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(
        dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, num_groups=4, dtype="float32")
    )
    m.update(overrides)
    return m


def _count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _abstract_params(model: UNet, shape) -> dict:
    """Parameter shapes without running the init (no compile, no memory)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False), x, t)["params"]


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """XLA's optimisation passes cost more than these tiny programs run (flax's tests do the same)."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def tiny():
    return create_model(_tiny_config(), image_size=8, out_channels=1)


@pytest.fixture(scope="module")
def tiny_params(tiny):
    x = jnp.zeros(TINY_SHAPE)
    t = jnp.zeros(TINY_SHAPE[:1], jnp.int32)
    return jax.jit(lambda rng: tiny.init(rng, x, t, train=False))(jax.random.PRNGKey(0))["params"]


@pytest.fixture(scope="module")
def perturbed_params(tiny_params):
    """Every parameter nudged, so the zero-initialised layers no longer hide the network's inputs.

    NumPy noise on the host: a jitted jax.random over ~60 leaves costs seconds of compile on CPU.
    """
    np_rng = np.random.default_rng(1)
    return jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + 0.1 * np_rng.standard_normal(p.shape, np.float32)), tiny_params
    )


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.PRNGKey(2), TINY_SHAPE)
    t = jnp.array([3, 700], jnp.int32)
    return x, t


def _make_apply(model: UNet):
    """One jitted apply per (model, train); params, inputs and rng are traced arguments."""

    def apply(params, x, t, rng, train):
        return model.apply({"params": params}, x, t, train=train, rngs={"dropout": rng})

    return jax.jit(apply, static_argnames="train")


@pytest.fixture(scope="module")
def tiny_apply(tiny):
    return _make_apply(tiny)


def test_cifar10_param_count():
    config = cifar10.get_config()
    model = create_model(config.model, config.data.image_size, config.data.channels)
    n = _count(_abstract_params(model, (1, 32, 32, 3)))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == CIFAR10_PARAMS


def test_tiny_param_count_and_float32_params(tiny_params):
    assert _count(tiny_params) == TINY_PARAMS
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(tiny_params))


def test_tiny_module_layout(tiny_params):
    # Names are the checkpoint layout; attention sits after every res block at 4x4 and in the middle.
    assert sorted(tiny_params) == sorted(
        [
            "temb_dense_0",
            "temb_dense_1",
            "conv_in",
            "down_0_block_0",
            "down_0_downsample",
            "down_1_block_0",
            "down_1_attn_0",
            "mid_block_0",
            "mid_attn",
            "mid_block_1",
            "up_1_block_0",
            "up_1_attn_0",
            "up_1_block_1",
            "up_1_attn_1",
            "up_1_upsample",
            "up_0_block_0",
            "up_0_block_1",
            "norm_out",
            "conv_out",
        ]
    )
    assert "nin_skip" in tiny_params["down_1_block_0"]  # 8 -> 16 channels
    assert "nin_skip" not in tiny_params["mid_block_0"]


def test_attention_matches_numpy_reference():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 3, 4))  # [B, H, W, C]
    # Random parameters straight from NumPy (no init compile; proj_out must not be its zero init).
    np_rng = np.random.default_rng(4)
    shapes = {
        "norm": {"scale": (4,), "bias": (4,)},
        "qkv": {"kernel": (4, 12), "bias": (12,)},
        "proj_out": {"kernel": (4, 4), "bias": (4,)},
    }
    p = jax.tree.map(
        lambda s: np_rng.standard_normal(s).astype(np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    out = np.asarray(jax.jit(AttnBlock(num_groups=2).apply)({"params": p}, x))

    xn = np.asarray(x, np.float64)
    g = xn.reshape(2, 6, 2, 2)  # [B, HW, groups, C/groups]
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-6)
    h = g.reshape(2, 6, 4) * p["norm"]["scale"] + p["norm"]["bias"]
    q, k, v = np.split(h @ p["qkv"]["kernel"] + p["qkv"]["bias"], 3, axis=-1)
    w = np.exp(q @ k.transpose(0, 2, 1) / 2.0)  # sqrt(C) = 2
    w /= w.sum(-1, keepdims=True)
    ref = xn + ((w @ v) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]).reshape(2, 2, 3, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_output_shape_dtype_and_zero_init(tiny_apply, tiny_params, inputs):
    x, t = inputs
    out = tiny_apply(tiny_params, x, t, jax.random.PRNGKey(0), train=False)
    chex.assert_shape(out, TINY_SHAPE)
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    # The last conv starts at zero (paper code), so the untrained network predicts zero.
    np.testing.assert_array_equal(out, 0.0)


def test_learned_variance_doubles_output_channels(tiny_params, inputs):
    model = create_model(_tiny_config(), image_size=8, out_channels=2)
    x, t = inputs
    out = jax.eval_shape(lambda x, t: model.apply({"params": _widen_out(tiny_params)}, x, t, train=False), x, t)
    assert out.shape == TINY_SHAPE[:3] + (2,)
    assert out.dtype == jnp.float32
    # Only conv_out depends on out_ch.
    assert _count(_abstract_params(model, TINY_SHAPE)) == TINY_PARAMS + 8 * 9 + 1


def _widen_out(params):
    params = dict(params)
    conv = params["conv_out"]
    params["conv_out"] = {
        "kernel": jnp.concatenate([conv["kernel"]] * 2, axis=-1),
        "bias": jnp.concatenate([conv["bias"]] * 2, axis=-1),
    }
    return params


def test_output_finite_after_perturbation(tiny_apply, perturbed_params, inputs):
    x, t = inputs
    out = tiny_apply(perturbed_params, x, t, jax.random.PRNGKey(0), train=False)
    chex.assert_tree_all_finite(out)
    assert float(jnp.abs(out).max()) > 0


def test_dropout_only_in_train_mode(tiny_apply, perturbed_params, inputs):
    x, t = inputs
    rng_a, rng_b = jax.random.PRNGKey(10), jax.random.PRNGKey(11)
    eval_a = tiny_apply(perturbed_params, x, t, rng_a, train=False)
    eval_b = tiny_apply(perturbed_params, x, t, rng_b, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)  # train=False ignores the dropout rng
    train_a = tiny_apply(perturbed_params, x, t, rng_a, train=True)
    train_a2 = tiny_apply(perturbed_params, x, t, rng_a, train=True)
    train_b = tiny_apply(perturbed_params, x, t, rng_b, train=True)
    np.testing.assert_array_equal(train_a, train_a2)  # deterministic given the rng
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)


def test_time_conditioning_changes_output(tiny_apply, perturbed_params, inputs):
    x, t = inputs
    rng = jax.random.PRNGKey(0)
    out = tiny_apply(perturbed_params, x, t, rng, train=False)
    out_other_t = tiny_apply(perturbed_params, x, t + 50, rng, train=False)
    assert float(jnp.abs(out - out_other_t).max()) > 1e-2 * float(jnp.abs(out).max())


def test_float_timesteps_trace(tiny, tiny_params, inputs):
    x, _ = inputs
    t = jnp.array([3.5, 700.25], jnp.float32)
    out = jax.eval_shape(lambda p, x, t: tiny.apply({"params": p}, x, t, train=False), tiny_params, x, t)
    assert out.shape == TINY_SHAPE and out.dtype == jnp.float32


def test_bfloat16_compute_close_to_float32(tiny_apply, perturbed_params, inputs):
    model = create_model(_tiny_config(dtype="bfloat16"), image_size=8, out_channels=1)
    x, t = inputs
    rng = jax.random.PRNGKey(0)
    # The bf16 model has the same float32 parameters as the float32 one.
    assert jax.tree.structure(_abstract_params(model, TINY_SHAPE)) == jax.tree.structure(perturbed_params)
    out_bf16 = _make_apply(model)(perturbed_params, x, t, rng, train=False)
    out_f32 = tiny_apply(perturbed_params, x, t, rng, train=False)
    chex.assert_type(out_bf16, jnp.float32)
    chex.assert_tree_all_finite(out_bf16)
    scale = float(jnp.abs(out_f32).max())
    np.testing.assert_allclose(out_bf16, out_f32, atol=0.05 * scale)


def test_group_norm_returns_compute_dtype_with_float32_statistics():
    """bf16 mode: GroupNorm's output is bf16 (half the bytes into swish and the conv) but its mean and
    variance are float32: the result matches a float64 NumPy GroupNorm of the same bf16 input to
    bf16 output rounding, even with a large common offset (bf16 statistics would be off by ~0.1)."""
    rng = np.random.default_rng(0)
    x = (40.0 + rng.standard_normal((2, 4, 4, 8))).astype(np.float32)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    norm = group_norm(num_groups=2, dtype=jnp.bfloat16)
    params = norm.init(jax.random.PRNGKey(0), x_bf16)
    out = norm.apply(params, x_bf16)
    assert out.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    xg = np.asarray(x_bf16.astype(jnp.float32), np.float64).reshape(2, 4, 4, 2, 4)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    expected = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, atol=2e-2)
    # Float32 in, float32 out: the float32 model is unchanged.
    assert group_norm(2, jnp.float32).apply(params, jnp.asarray(x)).dtype == jnp.float32


def test_default_config_builds():
    config = ddpm_config.get_config()
    model = create_model(config.model, config.data.image_size, config.data.channels)
    assert _count(_abstract_params(model, (1, 8, 8, 1))) > 0


def test_image_size_not_divisible_raises():
    with pytest.raises(ValueError, match=r"config\.data\.image_size.*config\.model\.ch_mult"):
        create_model(_tiny_config(ch_mult=(1, 2, 2)), image_size=6, out_channels=1)


def test_unknown_attention_resolution_lists_valid_ones():
    with pytest.raises(ValueError, match=r"config\.model\.attn_resolutions.*valid resolutions are \(8, 4\)"):
        create_model(_tiny_config(attn_resolutions=(3,)), image_size=8, out_channels=1)


@pytest.mark.parametrize("field, value", [("num_groups", 3), ("dropout", 1.0), ("dropout", -0.1), ("dtype", "float16")])
def test_other_config_checks(field, value):
    with pytest.raises(ValueError, match=rf"config\.model\.{field}"):
        create_model(_tiny_config(**{field: value}), image_size=8, out_channels=1)

"""The flat train state (optim.flatten, issue 24): the layout, the step against the per-leaf one, the
NaN guard, and checkpoints that hold the tree form whichever form saved them.

A small MLP method (four parameter leaves, one a scalar) stands in for the UNet: train_step only calls
the method's interface, and its compile takes a second, not a minute.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from ddpm_jax.configs import ddpm as ddpm_config
from ddpm_jax.errors import ConfigError
from ddpm_jax.training import checkpoint, distributed, loop, train_lib
from ddpm_jax.training.flat_state import FlatLayout

STEPS = 6


class _Mlp:
    """The methods' training interface over a two-layer MLP regression: loss = (f(x) - mean(x))^2."""

    name = "mlp"
    apply_fn = None
    frozen_fields = ("model",)

    def init_params(self, rng):
        k1, k2 = jax.random.split(rng)
        return {
            "hidden": {"kernel": jax.random.normal(k1, (12, 16)), "bias": jnp.zeros(16)},
            "out": {"kernel": jax.random.normal(k2, (16, 1)) * 0.3},
            "scale": jnp.asarray(1.5),
        }

    def init_method_state(self):  # a method's own state beside the params (as DDPM's importance sampler's)
        return {"seen": jnp.zeros((), jnp.int32), "loss_sum": jnp.zeros(())}

    def update_method_state(self, method_state, inputs, terms, gather):
        loss = gather(terms["loss"])
        return {"seen": method_state["seen"] + loss.shape[0], "loss_sum": method_state["loss_sum"] + jnp.sum(loss)}

    def draw_training_inputs(self, keys, batch, method_state, position):
        noise = jax.vmap(lambda k: jax.random.normal(k, batch.shape[1:]))(keys)
        return {"noise": noise, "weights": jnp.ones(batch.shape[0])}

    def loss_terms(self, params, batch, inputs, *, train, dropout_rng):
        x = (batch + 0.1 * inputs["noise"]).reshape(batch.shape[0], -1)
        h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
        y = params["scale"] * (h @ params["out"]["kernel"])[:, 0]
        loss = (y - jnp.mean(x, axis=1)) ** 2
        return {"loss": loss, "abs_err": jnp.sqrt(loss)}


@pytest.fixture(scope="module")
def setup():
    config = ddpm_config.get_config()
    config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 0.05, 1, 0.5  # the clip is active
    config.training.num_train_steps = 100
    method = _Mlp()
    tree = train_lib.create_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_lib.train_step, method=method, config=config, axis_name=None))
    batches = np.random.default_rng(1).uniform(-1, 1, (STEPS, 8, 2, 2, 3)).astype(np.float32)
    return config, method, tree, step, batches


def _run(step, state, batches):
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


def _rel(a, b) -> float:
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def test_layout_ravels_in_tree_leaves_order_and_back():
    params = _Mlp().init_params(jax.random.PRNGKey(3))
    layout = FlatLayout.of(params)
    flat = layout.ravel(params)
    np.testing.assert_array_equal(flat, ravel_pytree(params)[0])  # jax's own raveling, the reference
    assert layout.size == 12 * 16 + 16 + 16 + 1 and layout.dtype == "float32"
    jax.tree_util.tree_map(np.testing.assert_array_equal, layout.unravel(flat), params)
    # Leading axes (a replicated state's device axis) are kept; NumPy in, NumPy views out.
    host = np.stack([np.asarray(flat), np.asarray(flat) * 2])
    back = layout.unravel(host)
    assert back["hidden"]["kernel"].shape == (2, 12, 16) and np.shares_memory(back["out"]["kernel"], host)
    np.testing.assert_array_equal(back["hidden"]["kernel"][1], 2 * np.asarray(params["hidden"]["kernel"]))
    np.testing.assert_array_equal(layout.ravel(back), host)
    with pytest.raises(ConfigError, match="optim.flatten=False"):
        FlatLayout.of({"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.int32)})


def test_state_forms_convert_both_ways_exactly(setup):
    _, _, tree, step, batches = setup
    tree, _ = _run(step, tree, batches[:2])  # moments that are not zero
    flat = tree.to_flat()
    assert flat.layout is not None and flat.params.shape == (flat.layout.size,)
    mu = flat.opt_state[1][0].mu
    np.testing.assert_array_equal(mu, ravel_pytree(tree.opt_state[1][0].mu)[0])  # Adam's moments, one vector
    back = flat.to_tree()
    assert back.layout is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)
    np.testing.assert_array_equal(flat.params_tree()["hidden"]["kernel"], tree.params["hidden"]["kernel"])
    np.testing.assert_array_equal(flat.ema_params_tree()["scale"], tree.ema_params["scale"])


def test_flat_step_matches_the_per_leaf_step_in_a_few_vector_ops(setup):
    _, _, tree, step, batches = setup
    tree_end, m_tree = _run(step, tree, batches)
    flat_end, m_flat = _run(step, tree.to_flat(), batches)
    assert float(m_tree["grad_norm"]) > 0.5  # the clip at 0.5 was active
    back = flat_end.to_tree()
    # Adam, the clip and the EMA are elementwise; only the global norm's summation order differs.
    for part in ("params", "ema_params", "opt_state"):
        assert _rel(getattr(tree_end, part), getattr(back, part)) < 2e-6, part
    assert _rel(tree_end.params, tree.params) > 1e-2  # the parameters did move
    assert int(flat_end.method_state["seen"]) == int(tree_end.method_state["seen"]) == 8 * STEPS
    np.testing.assert_allclose(flat_end.method_state["loss_sum"], tree_end.method_state["loss_sum"], rtol=1e-6)
    for name in ("loss", "grad_norm", "abs_err"):
        np.testing.assert_allclose(m_flat[name], m_tree[name], rtol=2e-6)
    # The guard's select runs once per state vector in the flat form, once per leaf in the tree form
    # (other selects, in the clip and the loss's gradient, are the same in both).
    batch = batches[0]
    selects = {
        form: len(re.findall(r"= \S+ select\(", step.lower(state, batch).compile().as_text()))
        for form, state in (("tree", tree), ("flat", tree.to_flat()))
    }
    leaves = lambda s: len(jax.tree_util.tree_leaves(s))
    assert selects["tree"] - selects["flat"] >= leaves(tree) - leaves(tree.to_flat()) > 0, selects


@pytest.mark.parametrize("form", ["tree", "flat"])
def test_nan_guard_skips_the_whole_update(setup, form):
    _, _, tree, step, batches = setup
    state, _ = _run(step, tree if form == "tree" else tree.to_flat(), batches[:2])
    bad = batches[2].copy()
    bad[3, 1, 0, 2] = np.nan
    new, metrics = step(state, bad)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new.step) == int(state.step) + 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, new.replace(step=state.step), state)


def test_checkpoints_hold_the_tree_and_resume_exactly_across_forms(setup, tmp_path):
    config, method, tree, step, batches = setup
    half = STEPS // 2
    target = train_lib.abstract_train_state(method, tree.tx, jax.random.PRNGKey(0))  # the compiled step's tx

    def save_and_restore(state, name):
        mngr = checkpoint.make_manager(str(tmp_path / name))
        assert checkpoint.save(mngr, state)
        checkpoint.wait_until_finished(mngr)
        return checkpoint.restore_latest(mngr, target)

    # The per-leaf path's checkpoint (what the previous code wrote) restores exactly, and resumes flat.
    tree_half, _ = _run(step, tree, batches[:half])
    restored = save_and_restore(tree_half, "tree")
    assert restored.layout is None and sorted(restored.params) == ["hidden", "out", "scale"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, tree_half)
    flat_straight, _ = _run(step, tree_half.to_flat(), batches[half:])
    flat_resumed, _ = _run(step, restored.to_flat(), batches[half:])
    jax.tree_util.tree_map(np.testing.assert_array_equal, flat_resumed, flat_straight)

    # A flat state is saved in the tree form, by name: N straight = N/2 + save + restore + N/2, bit for bit,
    # resumed flat; resumed per leaf it is the tree run from the same state.
    flat_half, _ = _run(step, tree.to_flat(), batches[:half])
    restored = save_and_restore(flat_half, "flat")
    assert restored.layout is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, flat_half.to_tree())
    straight, _ = _run(step, tree.to_flat(), batches)
    resumed, _ = _run(step, restored.to_flat(), batches[half:])
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    as_tree, _ = _run(step, restored, batches[half:])
    assert _rel(as_tree.params, straight.to_tree().params) < 2e-6


def test_checkpoint_of_the_optax_flatten_optimizer_still_restores(setup, tmp_path):
    """optim.flatten before the flat state was optax.flatten(tx): its checkpoints hold the parameter trees
    but Adam's moments as flat vectors (cifar10's configs wrote them). They restore into the tree state."""
    config, method, tree, step, batches = setup
    state, _ = _run(step, tree, batches[:2])
    old_opt_state = state.to_flat().opt_state
    expected = jax.eval_shape(optax.flatten(tree.tx).init, tree.params)  # what the old optimizer kept
    assert jax.tree_util.tree_structure(old_opt_state) == jax.tree_util.tree_structure(expected)
    assert [x.shape for x in jax.tree_util.tree_leaves(old_opt_state)] == [
        x.shape for x in jax.tree_util.tree_leaves(expected)
    ]
    mngr = checkpoint.make_manager(str(tmp_path / "old"))
    assert checkpoint.save(mngr, state.replace(opt_state=old_opt_state))
    checkpoint.wait_until_finished(mngr)
    target = train_lib.abstract_train_state(method, tree.tx, jax.random.PRNGKey(0))
    restored = checkpoint.restore_latest(mngr, target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)


def test_replicated_flat_state_reads_as_trees(setup):
    """What the loop does with the replicated state: tree views for eval and sampling, the tree form at the end."""
    _, _, tree, step, batches = setup
    flat, _ = _run(step, tree.to_flat(), batches[:2])
    rstate = distributed.replicate(flat)
    ema = rstate.ema_params_tree()
    assert ema["hidden"]["kernel"].shape == (jax.local_device_count(), 12, 16)
    np.testing.assert_array_equal(distributed.unreplicate(ema)["scale"], flat.ema_params_tree()["scale"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, distributed.unreplicate(rstate.to_tree()), flat.to_tree())


def test_the_loop_restores_in_the_form_the_config_asks(setup, tmp_path):
    config, method, tree, step, batches = setup
    workdir = str(tmp_path)
    mngr = checkpoint.make_manager(workdir)
    config = config.copy_and_resolve_references()
    config.optim.flatten = True
    fresh = loop._restore_or_init(config, workdir, mngr, method, tree.tx)
    assert fresh.layout is not None
    jax.tree_util.tree_map(np.testing.assert_array_equal, fresh, tree.to_flat())
    state, _ = _run(step, fresh, batches[:2])
    checkpoint.save(mngr, state)
    checkpoint.wait_until_finished(mngr)
    config.optim.flatten = False  # resumed per leaf: the same state in the tree form
    resumed = loop._restore_or_init(config, workdir, mngr, method, tree.tx)
    assert resumed.layout is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, state.to_tree())

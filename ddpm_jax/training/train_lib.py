"""TrainState, the pure train / eval / bound / sample steps of any method, and their pmapped forms.

`train_step(state, batch, *, method, ...)` is a pure function of its arguments: every random
draw of an example is keyed by fold_in(state.rng, step) and the example's global index, so the
same global batch gives the same update on 1 or N devices. The device axis name is an argument,
so the step is independent of how it is mapped. What the model is, and how its loss, bound and
samples are computed, is the method's (`ddpm_jax.methods`): nothing here asks which one it is.
`compile_steps` returns the pmapped steps as a `CompiledSteps`; the host side of the devices
(replicate / unreplicate) is `distributed`'s, drawing sample grids `evaluation.sample_lib`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training import train_state

from ddpm_jax.training import flat_state
from ddpm_jax.training.distributed import AXIS

if TYPE_CHECKING:  # the steps only call the interface; the registry is the caller's
    from ddpm_jax.methods import Method


class TrainState(train_state.TrainState):
    """step, params, opt_state (+ static apply_fn, tx), EMA params, the run's key, and the method's own
    training state beside the params (`Method.init_method_state`; None for most methods).

    Two forms, the same state: the tree form (params and EMA params as parameter trees, `layout` None),
    which checkpoints hold, and the flat form of `optim.flatten` (`to_flat`: params, EMA params and
    Adam's moments as one vector each, `layout` their static `flat_state.FlatLayout`). Read the
    parameters as trees, in either form, through `params_tree()` and `ema_params_tree()`.
    """

    ema_params: Any
    rng: jax.Array
    method_state: Any = None
    layout: flat_state.FlatLayout | None = struct.field(pytree_node=False, default=None)

    def apply_gradients(self, *, grads, **kwargs) -> TrainState:
        """flax's update; in the flat form, Adam (and the clip) over the flat vectors (flax's version asks
        `in grads`, which an array does not answer)."""
        if self.layout is None:
            return super().apply_gradients(grads=grads, **kwargs)
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

    def params_tree(self):
        """The parameters as a tree (a view of the flat vector in the flat form; leading axes kept)."""
        return self.params if self.layout is None else self.layout.unravel(self.params)

    def ema_params_tree(self):
        """The EMA parameters as a tree (see `params_tree`)."""
        return self.ema_params if self.layout is None else self.layout.unravel(self.ema_params)

    def to_flat(self) -> TrainState:
        """The flat form of an unreplicated state (itself if flat already)."""
        return flat_state.to_flat(self)

    def to_tree(self) -> TrainState:
        """The tree form, unreplicated or replicated: what checkpoints hold (itself if a tree already)."""
        return flat_state.to_tree(self)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    """Linear warm-up to optim.lr, then constant (Ho et al.) or cosine decay to 0 at the last step.

    Evaluated at count + 1, so the first step already moves (lr / warmup_steps), not lr = 0.
    optim.lr_schedule is one of LR_SCHEDULES (validation.validate_config checks it).
    """
    warmup = max(int(optim.warmup_steps), 1)
    if optim.lr_schedule == "constant":
        base = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup]
        )
    else:
        base = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(num_train_steps, warmup + 1))
    return lambda count: base(count + 1)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam. The same transformation in both forms of the state: over the
    parameter tree, or, with optim.flatten (`TrainState.to_flat`), over one flat vector of all of them."""
    optim = config.optim
    lr = learning_rate_schedule(optim, config.training.num_train_steps)
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip), optax.adam(lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
    )


def create_train_state(
    method: Method, tx: optax.GradientTransformation, rng: jax.Array, *, flat: bool = False
) -> TrainState:
    """Fresh parameters, Adam state, EMA copy and the method's own state (if any); the flat form
    (config.optim.flatten) when `flat`."""
    init_rng, state_rng = jax.random.split(rng)
    params = method.init_params(init_rng)
    state = TrainState.create(
        apply_fn=method.apply_fn,
        params=params,
        tx=tx,
        ema_params=params,
        rng=state_rng,
        method_state=method.init_method_state(),
    )
    return state.to_flat() if flat else state


def abstract_train_state(method: Method, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """The tree state's structure, shapes and dtypes (jax.eval_shape: nothing is computed or allocated):
    the target a checkpoint is restored into (then `to_flat()` for optim.flatten)."""
    return jax.eval_shape(lambda key: create_train_state(method, tx, key), rng)


def ema_decay(decay: float, step) -> jnp.ndarray:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)) (tf.train.ExponentialMovingAverage's
    num_updates): short runs would otherwise keep much of the random init (0.998^1000 = 14%)."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _global_index(batch_size: int, axis_name: str | None) -> jnp.ndarray:
    """[B] the examples' indices in the global batch (devices in axis order)."""
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
    return offset + jnp.arange(batch_size)


def _example_keys(rng, batch_size: int, axis_name: str | None):
    """One key per example, from its global index: independent of how the batch is split."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(_global_index(batch_size, axis_name))


def _device_rng(rng, axis_name: str | None, offset: int = 0):
    """A key of this device's own (draws that are not tied to one example)."""
    return jax.random.fold_in(rng, offset + (0 if axis_name is None else jax.lax.axis_index(axis_name)))


def _tree_all_finite(tree) -> jnp.ndarray:
    """One isfinite-reduction per leaf: a single one over a flat state's gradient."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _psum(tree, axis_name: str | None):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def train_step(
    state: TrainState,
    batch: jnp.ndarray,
    *,
    method: Method,
    config: ml_collections.ConfigDict,
    axis_name: str | None = AXIS,
):
    """One optimisation step on this device's share of the global batch.

    Args:
      state: the (replicated) train state, tree or flat form (the same update).
      batch: [per-device B, H, W, C] images in [-1, 1].
      method: the run's method (closed over): its loss terms and random inputs.
      config: the run's config (closed over; read at trace time only).
      axis_name: the device axis to average grads and metrics over; None when not mapped.

    Returns:
      (new state, metrics dict of scalars, averaged over devices).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    keys = _example_keys(step_rng, batch.shape[0], axis_name)
    global_batch = batch.shape[0] * (1 if axis_name is None else jax.lax.psum(1, axis_name))
    inputs = method.draw_training_inputs(
        keys, batch, state.method_state, position=(_global_index(batch.shape[0], axis_name), global_batch)
    )
    dropout_rng = _device_rng(jax.random.fold_in(step_rng, 2**30), axis_name)

    def loss_fn(params):
        # In the flat form the loss sees the tree through static slices; the gradient comes out flat,
        # so clip, Adam, the EMA and the guard below are a few ops over whole vectors, not a few per leaf.
        tree = params if state.layout is None else state.layout.unravel(params)
        terms = method.loss_terms(tree, batch, inputs, train=True, dropout_rng=dropout_rng)
        return jnp.mean(inputs["weights"] * terms["loss"]), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pmean = (lambda x: x) if axis_name is None else functools.partial(jax.lax.pmean, axis_name=axis_name)
    grads, loss = pmean(grads), pmean(loss)

    # NaN/Inf guard: a non-finite loss or gradient never reaches the parameters.
    finite = jnp.isfinite(loss) & _tree_all_finite(grads)
    updated = state.apply_gradients(grads=grads)
    updated = updated.replace(
        ema_params=optax.incremental_update(
            updated.params, state.ema_params, step_size=1.0 - ema_decay(config.training.ema_decay, state.step)
        )
    )
    if state.method_state is not None:  # gather: the whole global batch's values, in global order
        gather = (
            (lambda x: x)
            if axis_name is None
            else functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
        )
        updated = updated.replace(method_state=method.update_method_state(state.method_state, inputs, terms, gather))
    # One select per state leaf: per parameter leaf in the tree form, per whole vector in the flat one
    # (a lax.cond instead was no faster on XLA:CPU: bench/flat_step.py's update-only timings).
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1)

    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate_schedule(config.optim, config.training.num_train_steps)(state.step),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    metrics.update({name: pmean(jnp.mean(value)) for name, value in terms.items() if name != "loss"})
    return new_state, metrics


def eval_step(
    params, batch: jnp.ndarray, mask: jnp.ndarray, rng: jax.Array, *, method: Method, axis_name: str | None = AXIS
):
    """Sums over the real examples of an eval batch: the training loss and its parts at random inputs,
    and `bpd_est`, an unbiased estimate of the whole bound in bits/dim."""
    keys = _example_keys(rng, batch.shape[0], axis_name)
    terms = method.eval_terms(params, batch, keys, _device_rng(rng, axis_name, offset=2**30))
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums["count"] = jnp.sum(mask.astype(jnp.float32))
    return _psum(sums, axis_name)


def bpd_step(params, batch, mask, rng, *, method: Method, num_strata: int, axis_name: str | None = AXIS):
    """Sums over real examples of the bound (total, its parts, squares of the total) for one batch,
    and under "per_example" every example's total_bpd with the mask (the global batch, not summed).

    num_strata = 0: the method's most exact bound (all T terms of a discrete chain, with their per-t
    sums "vb"); > 0: its unbiased estimate with that many strata.
    """
    m = mask.astype(jnp.float32)
    keys = _example_keys(rng, batch.shape[0], axis_name)
    out = method.bound_terms(params, batch, keys, _device_rng(rng, axis_name), num_strata=num_strata)
    sums = {k: jnp.sum(v * (m[:, None] if v.ndim == 2 else m), axis=0) for k, v in out.items()}
    sums.update(total_bpd_sq=jnp.sum(out["total_bpd"] ** 2 * m), count=jnp.sum(m))
    sums = _psum(sums, axis_name)
    # Every example's total (the global batch, devices in axis order) and its mask: the per-image bound.
    gather = (
        (lambda x: x) if axis_name is None else functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
    )
    sums["per_example"] = {"total_bpd": gather(out["total_bpd"]), "mask": gather(m)}
    return sums


def sample_step(
    params,
    rng,
    per_device: int,
    num_frames: int = 0,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    *,
    method: Method,
    axis_name: str | None = AXIS,
) -> dict:
    """This device's `per_device` samples (and denoising frames) with one of the method's samplers."""
    return method.sample(
        params,
        _device_rng(rng, axis_name),
        per_device,
        sampler=sampler,
        num_steps=num_steps,
        eta=eta,
        num_frames=num_frames,
    )


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """A run's pmapped steps, with its method and config closed over (`compile_steps`).

    Attributes:
      method: the run's method.
      tx: its optimizer (a static field of the state: a new one recompiles p_train).
      p_train: (replicated state, batch [devices, B/devices, H, W, C]) -> (state, metrics).
      p_eval: (params, batch, mask, rng) -> sums of the loss terms and `bpd_est` (`eval_step`).
      p_bpd: (params, batch, mask, rng) -> sums of the bound's terms (`bpd_step`).
      p_sample: (params, rng, per_device, num_frames, sampler, num_steps, eta) -> samples (`sample_step`);
        draw through `evaluation.sample_lib.draw_samples`.
    """

    method: Method
    tx: optax.GradientTransformation
    p_train: Callable
    p_eval: Callable
    p_bpd: Callable
    p_sample: Callable


def compile_steps(method: Method, config: ml_collections.ConfigDict, bpd_strata: int | None = None) -> CompiledSteps:
    """The pmapped steps of a method and config (see `CompiledSteps`).

    p_bpd evaluates the method's most exact bound when bpd_strata is 0, or its estimate with that
    many strata; default config.training.final_bpd_strata. Build once per run and pass it on:
    each call of a new set compiles again.
    """
    # Donating the state saves a copy on accelerators; on XLA:CPU (jax 0.10) it made each step ~30x slower.
    donate = () if jax.default_backend() == "cpu" else (0,)
    bpd_strata = config.training.final_bpd_strata if bpd_strata is None else bpd_strata
    return CompiledSteps(
        method=method,
        tx=make_optimizer(config),  # one optimizer: a static field of the state, so a new one recompiles the step
        p_train=jax.pmap(
            functools.partial(train_step, method=method, config=config), axis_name=AXIS, donate_argnums=donate
        ),
        p_eval=jax.pmap(functools.partial(eval_step, method=method), axis_name=AXIS, in_axes=(0, 0, 0, None)),
        p_bpd=jax.pmap(
            functools.partial(bpd_step, method=method, num_strata=bpd_strata), axis_name=AXIS, in_axes=(0, 0, 0, None)
        ),
        p_sample=jax.pmap(
            functools.partial(sample_step, method=method),
            axis_name=AXIS,
            in_axes=(0, None),
            static_broadcasted_argnums=(2, 3, 4, 5, 6),
        ),
    )

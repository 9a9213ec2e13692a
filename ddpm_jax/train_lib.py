"""TrainState, the pure train / eval steps, and their pmapped forms.

`train_step(state, batch, *, axis_name, ...)` is a pure function of its arguments: every random
draw of an example (its t and its noise) is keyed by fold_in(state.rng, step) and the example's
global index, so the same global batch gives the same update on 1 or N devices. The device
axis name is an argument, so the step is independent of how it is mapped.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from ddpm_jax import diffusion, schedules, timesteps
from ddpm_jax.models.unet import create_model

AXIS = "batch"


class TrainState(train_state.TrainState):
    """step, params, opt_state (+ static apply_fn, tx), EMA params, the run's key, loss history."""

    ema_params: Any
    rng: jax.Array
    loss_history: timesteps.LossHistory | None = None


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def model_out_channels(config: ml_collections.ConfigDict) -> int:
    learned = config.diffusion.variance in ("learned", "learned_range")
    return config.data.channels * (2 if learned else 1)


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    """Linear warm-up to optim.lr, then constant (Ho et al.) or cosine decay to 0 at the last step.

    Evaluated at count + 1, so the first step already moves (lr / warmup_steps), not lr = 0.
    """
    warmup = max(int(optim.warmup_steps), 1)
    if optim.lr_schedule == "constant":
        base = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup])
    elif optim.lr_schedule == "cosine":
        base = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(num_train_steps, warmup + 1))
    else:
        raise ValueError(f"config.optim.lr_schedule={optim.lr_schedule!r}; use 'constant' or 'cosine'.")
    return lambda count: base(count + 1)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    optim = config.optim
    lr = learning_rate_schedule(optim, config.training.num_train_steps)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                       optax.adam(lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    """Initialises the UNet, Adam state, EMA copy and (for importance sampling) the loss history."""
    model = create_model(config.model, config.data.image_size, model_out_channels(config))
    init_rng, state_rng = jax.random.split(rng)
    size, ch = config.data.image_size, config.data.channels
    init = jax.jit(functools.partial(model.init, train=False))  # jitted: eager init dispatches op by op
    params = init(init_rng, jnp.zeros((1, size, size, ch)), jnp.zeros((1,), jnp.int32))["params"]
    history = None
    if config.diffusion.timestep_sampler == "importance":
        history = timesteps.init_loss_history(config.diffusion.num_timesteps)
    return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config),
                             ema_params=params, rng=state_rng, loss_history=history)


def model_fn_for(apply_fn, params, *, train: bool = False, dropout_rng=None):
    """`model_fn(x_t, t)` of the core, with the params (and dropout key) closed over."""
    rngs = {"dropout": dropout_rng} if train else None

    def model_fn(x, t):
        return apply_fn({"params": params}, x, t, train=train, rngs=rngs)

    return model_fn


def ema_decay(decay: float, step) -> jnp.ndarray:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)) (tf.train.ExponentialMovingAverage's
    num_updates): short runs would otherwise keep much of the random init (0.998^1000 = 14%)."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _example_keys(rng, batch_size: int, axis_name: str | None):
    """One key per example, from its global index: independent of how the batch is split."""
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(batch_size))


def _tree_all_finite(tree) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def train_step(state: TrainState, batch: jnp.ndarray, *, sched: schedules.Schedule,
               config: ml_collections.ConfigDict, axis_name: str | None = AXIS):
    """One optimisation step on this device's share of the global batch.

    Args:
      state: the (replicated) train state.
      batch: [per-device B, H, W, C] images in [-1, 1].
      sched: the schedule (closed over).
      config: the run's config (closed over; read at trace time only).
      axis_name: the device axis to average grads and metrics over; None when not mapped.

    Returns:
      (new state, metrics dict of scalars, averaged over devices).
    """
    dcfg = config.diffusion
    step_rng = jax.random.fold_in(state.rng, state.step)
    keys = _example_keys(step_rng, batch.shape[0], axis_name)
    t, weights = timesteps.sample_timesteps(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
                                            sched.num_timesteps, state.loss_history)
    noise = jax.vmap(lambda k, x: jax.random.normal(jax.random.fold_in(k, 1), x.shape))(keys, batch)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(step_rng, 2**30),
                                     0 if axis_name is None else jax.lax.axis_index(axis_name))

    def loss_fn(params):
        model_fn = model_fn_for(state.apply_fn, params, train=True, dropout_rng=dropout_rng)
        terms = diffusion.training_losses(sched, model_fn, batch, t, noise, parameterization=dcfg.parameterization,
                                          variance=dcfg.variance, loss_type=dcfg.loss_type)
        return jnp.mean(weights * terms["loss"]), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pmean = (lambda x: x) if axis_name is None else functools.partial(jax.lax.pmean, axis_name=axis_name)
    grads, loss = pmean(grads), pmean(loss)

    # NaN/Inf guard: a non-finite loss or gradient never reaches the parameters.
    finite = jnp.isfinite(loss) & _tree_all_finite(grads)
    updated = state.apply_gradients(grads=grads)
    updated = updated.replace(ema_params=optax.incremental_update(
        updated.params, state.ema_params, step_size=1.0 - ema_decay(config.training.ema_decay, state.step)))
    if state.loss_history is not None:
        gather = (lambda x: x) if axis_name is None else functools.partial(jax.lax.all_gather, axis_name=axis_name,
                                                                          tiled=True)
        updated = updated.replace(loss_history=timesteps.update_loss_history(
            state.loss_history, gather(t), gather(jax.lax.stop_gradient(terms["vb"]))))
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1)

    metrics = {"loss": loss, "mse": pmean(jnp.mean(terms["mse"])), "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(config.optim, config.training.num_train_steps)(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if "vb" in terms:
        metrics["vb"] = pmean(jnp.mean(terms["vb"]))
    return new_state, metrics


def eval_step(params, batch: jnp.ndarray, mask: jnp.ndarray, rng: jax.Array, *, apply_fn, sched, config,
              axis_name: str | None = AXIS):
    """Sums of the training loss (eps MSE etc.) over the real examples of an eval batch, at random t."""
    dcfg = config.diffusion
    keys = _example_keys(rng, batch.shape[0], axis_name)
    t, _ = timesteps.sample_timesteps(keys, sched.num_timesteps)
    noise = jax.vmap(lambda k, x: jax.random.normal(jax.random.fold_in(k, 1), x.shape))(keys, batch)
    terms = diffusion.training_losses(sched, model_fn_for(apply_fn, params), batch, t, noise,
                                      parameterization=dcfg.parameterization, variance=dcfg.variance,
                                      loss_type=dcfg.loss_type)
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums["count"] = jnp.sum(mask.astype(jnp.float32))
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def bpd_step(params, batch, mask, rng, *, apply_fn, sched, config, axis_name: str | None = AXIS):
    """Sums over real examples of the full bound (total, prior, and each per-t term) for one batch."""
    dcfg = config.diffusion
    out = diffusion.calc_bpd_loop(sched, model_fn_for(apply_fn, params), batch, rng,
                                  parameterization=dcfg.parameterization, variance=dcfg.variance)
    m = mask.astype(jnp.float32)
    sums = {"total_bpd": jnp.sum(out["total_bpd"] * m), "prior_bpd": jnp.sum(out["prior_bpd"] * m),
            "vb": jnp.sum(out["vb"] * m[:, None], axis=0), "count": jnp.sum(m)}
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def make_pmapped_steps(config: ml_collections.ConfigDict, apply_fn, sched: schedules.Schedule):
    """pmapped train / eval / bpd / sample functions with the schedule and config closed over."""
    from ddpm_jax import sampling  # local: sampling is only needed once the steps are built

    # Donating the state saves a copy on accelerators; on XLA:CPU (jax 0.10) it made each step ~30x slower.
    donate = () if jax.default_backend() == "cpu" else (0,)
    p_train = jax.pmap(functools.partial(train_step, sched=sched, config=config), axis_name=AXIS,
                       donate_argnums=donate)
    p_eval = jax.pmap(functools.partial(eval_step, apply_fn=apply_fn, sched=sched, config=config),
                      axis_name=AXIS, in_axes=(0, 0, 0, None))
    p_bpd = jax.pmap(functools.partial(bpd_step, apply_fn=apply_fn, sched=sched, config=config),
                     axis_name=AXIS, in_axes=(0, 0, 0, None))

    def sample(params, rng, per_device: int, num_frames: int = 0):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
        shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
        return sampling.sample_loop(sched, model_fn_for(apply_fn, params), shape, rng,
                                    parameterization=config.diffusion.parameterization,
                                    variance=config.diffusion.variance,
                                    clip_denoised=config.sampling.clip_denoised, num_frames=num_frames)

    p_sample = jax.pmap(sample, axis_name=AXIS, in_axes=(0, None), static_broadcasted_argnums=(2, 3))
    return p_train, p_eval, p_bpd, p_sample


def replicate(tree, devices=None):
    """Copies a pytree onto every local device, laid out exactly as the pmapped steps return it.

    flax.jax_utils.replicate uses another mesh axis name, which made the second call of every
    pmapped function compile again (a minute for the UNet on CPU).
    """
    devices = jax.local_devices() if devices is None else devices
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (len(devices),) + np.shape(x))
    return jax.device_put(jax.tree_util.tree_map(stack, tree), sharding)


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as host (NumPy) arrays."""
    def first(x):
        if isinstance(x, jax.Array) and len(x.addressable_shards) > 0:
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x)[0]
    return jax.tree_util.tree_map(first, tree)

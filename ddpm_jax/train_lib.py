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

from ddpm_jax import diffusion, schedules, timesteps, vae
from ddpm_jax.models import learned_schedule
from ddpm_jax.models.unet import create_model as create_unet
from ddpm_jax.models.vae import create_vae

AXIS = "batch"


class TrainState(train_state.TrainState):
    """step, params, opt_state (+ static apply_fn, tx), EMA params, the run's key, loss history."""

    ema_params: Any
    rng: jax.Array
    loss_history: timesteps.LossHistory | None = None


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule | None:
    """The fixed schedule of the config; None for a learned one (it lives in the params)."""
    if is_learned_schedule(config):
        return None
    return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def is_learned_schedule(config: ml_collections.ConfigDict) -> bool:
    return config.diffusion.schedule == learned_schedule.LEARNED


def is_vae(config: ml_collections.ConfigDict) -> bool:
    return config.get("method", "ddpm") == "vae"


def schedule_for(sched: schedules.Schedule | None, apply_fn, params) -> schedules.Schedule:
    """The fixed schedule, or the learned one that `params` define (traced: gradients reach it)."""
    return learned_schedule.schedule_from_params(apply_fn, params) if sched is None else sched


def create_model(config: ml_collections.ConfigDict):
    """The config's network: the UNet, the UNet with a learned schedule, or the VAE baseline."""
    size, ch = config.data.image_size, config.data.channels
    if is_vae(config):
        return create_vae(config.vae, size, ch)
    unet = create_unet(config.model, size, model_out_channels(config))
    if not is_learned_schedule(config):
        return unet
    T = config.diffusion.num_timesteps
    gamma_0, gamma_1 = learned_schedule.initial_gamma_range(T, config.diffusion.get("learned_init", "linear"))
    return learned_schedule.LearnedScheduleModel(unet, T, gamma_0, gamma_1)


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
    """Global-norm clipping, then Adam. With optim.flatten, both run on one flat vector of all the
    parameters (optax.flatten): the same update, in a few large kernels instead of a few per leaf."""
    optim = config.optim
    lr = learning_rate_schedule(optim, config.training.num_train_steps)
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                     optax.adam(lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps))
    return optax.flatten(tx) if optim.get("flatten", False) else tx


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    """Initialises the UNet, Adam state, EMA copy and (for importance sampling) the loss history."""
    model = create_model(config)
    init_rng, state_rng = jax.random.split(rng)
    size, ch = config.data.image_size, config.data.channels
    x, t = jnp.zeros((1, size, size, ch)), jnp.zeros((1,), jnp.int32)
    if is_vae(config):
        init = functools.partial(model.init, z_noise=jnp.zeros((1, config.vae.latent_dim)))
        args = (x,)
    elif is_learned_schedule(config):
        init, args = functools.partial(model.init, method="init_all"), (x, t)
    else:
        init, args = functools.partial(model.init, train=False), (x, t)
    params = jax.jit(init)(init_rng, *args)["params"]  # jitted: eager init dispatches op by op
    history = None
    if not is_vae(config) and config.diffusion.timestep_sampler == "importance":
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


def _example_noise(keys, batch: jnp.ndarray, config: ml_collections.ConfigDict) -> jnp.ndarray:
    """Each example's noise from its own key: eps ~ N(0, I) like the image, or the VAE's latent draw."""
    shape = (config.vae.latent_dim,) if is_vae(config) else batch.shape[1:]
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(keys)


def per_example_losses(apply_fn, params, batch, t, noise, *, sched, config, train: bool = False,
                       dropout_rng=None) -> dict:
    """The config's per-example training loss and its parts: the diffusion core's training_losses
    (on the fixed or the learned schedule), or the VAE's negative ELBO (t is then unused)."""
    if is_vae(config):
        return vae.vae_terms_from_noise(apply_fn, params, batch, noise)
    dcfg = config.diffusion
    model_fn = model_fn_for(apply_fn, params, train=train, dropout_rng=dropout_rng)
    return diffusion.training_losses(schedule_for(sched, apply_fn, params), model_fn, batch, t, noise,
                                     parameterization=dcfg.parameterization, variance=dcfg.variance,
                                     loss_type=dcfg.loss_type)


def train_step(state: TrainState, batch: jnp.ndarray, *, sched: schedules.Schedule | None,
               config: ml_collections.ConfigDict, axis_name: str | None = AXIS):
    """One optimisation step on this device's share of the global batch.

    Args:
      state: the (replicated) train state.
      batch: [per-device B, H, W, C] images in [-1, 1].
      sched: the fixed schedule (closed over); None when it is learned (then it comes from the params).
      config: the run's config (closed over; read at trace time only).
      axis_name: the device axis to average grads and metrics over; None when not mapped.

    Returns:
      (new state, metrics dict of scalars, averaged over devices).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    keys = _example_keys(step_rng, batch.shape[0], axis_name)
    t, weights = timesteps.sample_timesteps(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
                                            config.diffusion.num_timesteps, state.loss_history)
    noise = _example_noise(keys, batch, config)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(step_rng, 2**30),
                                     0 if axis_name is None else jax.lax.axis_index(axis_name))

    def loss_fn(params):
        terms = per_example_losses(state.apply_fn, params, batch, t, noise, sched=sched, config=config,
                                   train=True, dropout_rng=dropout_rng)
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

    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(config.optim, config.training.num_train_steps)(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    for name in ("mse", "vb", "recon_bpd", "kl_bpd"):
        if name in terms:
            metrics[name] = pmean(jnp.mean(terms[name]))
    return new_state, metrics


def eval_step(params, batch: jnp.ndarray, mask: jnp.ndarray, rng: jax.Array, *, apply_fn, sched, config,
              axis_name: str | None = AXIS):
    """Sums over the real examples of an eval batch: the training loss and its parts at random t, and
    `bpd_est`, an unbiased estimate of the whole bound in bits/dim."""
    keys = _example_keys(rng, batch.shape[0], axis_name)
    t, _ = timesteps.sample_timesteps(keys, config.diffusion.num_timesteps)
    noise = _example_noise(keys, batch, config)
    terms = per_example_losses(apply_fn, params, batch, t, noise, sched=sched, config=config)
    if is_vae(config):
        terms["bpd_est"] = terms["loss"]
    else:  # the whole bound, estimated from a few strata of t (diffusion.bpd_estimate)
        device_rng = jax.random.fold_in(rng, 2**30 + (0 if axis_name is None else jax.lax.axis_index(axis_name)))
        terms["bpd_est"] = diffusion.bpd_estimate(
            schedule_for(sched, apply_fn, params), model_fn_for(apply_fn, params), batch, device_rng,
            num_strata=config.training.get("bpd_estimate_strata", 20),
            parameterization=config.diffusion.parameterization, variance=config.diffusion.variance)["total_bpd"]
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums["count"] = jnp.sum(mask.astype(jnp.float32))
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def bpd_step(params, batch, mask, rng, *, apply_fn, sched, config, num_strata: int = 0,
             axis_name: str | None = AXIS):
    """Sums over real examples of the bound (total, its parts, squares of the total) for one batch.

    num_strata = 0: every one of the T terms (calc_bpd_loop; also their per-t sums "vb"); > 0: the
    stratified unbiased estimate (diffusion.bpd_estimate), ~T / num_strata times cheaper. For the
    VAE: its negative ELBO (reconstruction + KL) with one z per example.
    """
    m = mask.astype(jnp.float32)
    if is_vae(config):
        noise = _example_noise(_example_keys(rng, batch.shape[0], axis_name), batch, config)
        out = vae.vae_terms_from_noise(apply_fn, params, batch, noise)
        out = {"total_bpd": out["loss"], "recon_bpd": out["recon_bpd"], "kl_bpd": out["kl_bpd"]}
    else:
        dcfg = config.diffusion
        kw = dict(parameterization=dcfg.parameterization, variance=dcfg.variance)
        sched, model_fn = schedule_for(sched, apply_fn, params), model_fn_for(apply_fn, params)
        if num_strata:
            if axis_name is not None:  # every device its own draws of t and noise
                rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
            out = diffusion.bpd_estimate(sched, model_fn, batch, rng, num_strata=num_strata, **kw)
        else:
            full = diffusion.calc_bpd_loop(sched, model_fn, batch, rng, **kw)
            out = {"total_bpd": full["total_bpd"], "prior_bpd": full["prior_bpd"]}
            out["vb"] = full["vb"]
    sums = {k: jnp.sum(v * (m[:, None] if v.ndim == 2 else m), axis=0) for k, v in out.items()}
    sums.update(total_bpd_sq=jnp.sum(out["total_bpd"] ** 2 * m), count=jnp.sum(m))
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def sample_fn(params, rng, per_device: int, num_frames: int = 0, *, apply_fn, sched, config,
              sampler: str = "ancestral", num_steps: int | None = None, eta: float = 0.0,
              axis_name: str | None = AXIS) -> dict:
    """This device's `per_device` samples (and denoising frames) with the chosen sampler.

    sampler: "ancestral" (all T steps, Ho et al. Algorithm 2), "respaced" (ancestral over num_steps
    steps with Improved DDPM's recomputed betas) or "ddim" (num_steps steps, eta; Song et al.).
    The VAE decodes z ~ N(0, I).
    """
    from ddpm_jax import sampling  # local: sampling is only needed once the steps are built

    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
    if is_vae(config):
        return {"samples": vae.vae_sample(apply_fn, params, rng, per_device)}
    dcfg = config.diffusion
    sched = schedule_for(sched, apply_fn, params)
    model_fn = model_fn_for(apply_fn, params)
    kw = dict(parameterization=dcfg.parameterization, clip_denoised=config.sampling.clip_denoised)
    if sampler == "ddim":
        return sampling.ddim_sample_loop(sched, model_fn, shape, rng, num_steps=num_steps, eta=eta, **kw)
    if sampler == "respaced":
        return sampling.respaced_sample_loop(sched, model_fn, shape, rng, num_steps=num_steps,
                                             variance=dcfg.variance, num_frames=num_frames, **kw)
    return sampling.sample_loop(sched, model_fn, shape, rng, variance=dcfg.variance, num_frames=num_frames, **kw)


def make_pmapped_steps(config: ml_collections.ConfigDict, apply_fn, sched: schedules.Schedule | None,
                       bpd_strata: int | None = None):
    """pmapped train / eval / bpd / sample functions with the schedule and config closed over.

    p_bpd evaluates all T terms when bpd_strata is 0, or the stratified estimate with that many
    strata; default config.training.final_bpd_strata.
    p_sample(params, rng, per_device, num_frames=0, sampler="ancestral", num_steps=None, eta=0.0).
    """
    # Donating the state saves a copy on accelerators; on XLA:CPU (jax 0.10) it made each step ~30x slower.
    donate = () if jax.default_backend() == "cpu" else (0,)
    p_train = jax.pmap(functools.partial(train_step, sched=sched, config=config), axis_name=AXIS,
                       donate_argnums=donate)
    steps = dict(apply_fn=apply_fn, sched=sched, config=config)
    p_eval = jax.pmap(functools.partial(eval_step, **steps), axis_name=AXIS, in_axes=(0, 0, 0, None))
    if bpd_strata is None:
        bpd_strata = config.training.get("final_bpd_strata", 0)
    p_bpd = jax.pmap(functools.partial(bpd_step, num_strata=bpd_strata, **steps), axis_name=AXIS,
                     in_axes=(0, 0, 0, None))

    def sample(params, rng, per_device, num_frames=0, sampler="ancestral", num_steps=None, eta=0.0):
        return sample_fn(params, rng, per_device, num_frames, sampler=sampler, num_steps=num_steps, eta=eta, **steps)

    p_sample = jax.pmap(sample, axis_name=AXIS, in_axes=(0, None), static_broadcasted_argnums=(2, 3, 4, 5, 6))
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

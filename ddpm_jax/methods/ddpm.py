"""The discrete DDPM (Ho et al. 2020; Improved DDPM's variances and losses), on a fixed schedule or
on a learned one (VDM's monotone network, whose parameters live beside the UNet's)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import checks, diffusion, sampling, schedules, timesteps
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Method, example_noise
from ddpm_jax.models import learned_schedule
from ddpm_jax.models.unet import create_model as create_unet

LEARNED_VARIANCES = ("learned", "learned_range")


class DDPM(Method):
    name = "ddpm"
    samplers = ("ancestral", "respaced", "ddim")
    frozen_fields = ("data.image_size", "data.channels", "model", "diffusion")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d = config.diffusion
        self.num_timesteps = d.num_timesteps
        self.parameterization, self.variance, self.loss_type = d.parameterization, d.variance, d.loss_type
        self.learned_schedule = d.schedule == learned_schedule.LEARNED
        out_channels = config.data.channels * (2 if d.variance in LEARNED_VARIANCES else 1)
        unet = create_unet(config.model, config.data.image_size, out_channels)
        if self.learned_schedule:
            gamma_0, gamma_1 = learned_schedule.initial_gamma_range(d.num_timesteps, d.learned_init)
            self.model, self._fixed_schedule = learned_schedule.LearnedScheduleModel(
                unet, d.num_timesteps, gamma_0, gamma_1), None
        else:
            self.model, self._fixed_schedule = unet, schedules.make_schedule(d.schedule, d.num_timesteps)

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        for section in ("model", "diffusion"):
            checks.require(section in config, section, "missing section; start from configs/default.py.")
        diff, m = config.diffusion, config.model
        checks.one_of(diff.schedule, schedules.SCHEDULE_NAMES + (learned_schedule.LEARNED,), "diffusion.schedule")
        checks.require(checks.is_int(diff.num_timesteps) and diff.num_timesteps >= 1, "diffusion.num_timesteps",
                       f"must be an integer >= 1 (the number of diffusion steps T; the paper uses 1000), "
                       f"got {diff.num_timesteps!r}.")
        for field, valid in (("parameterization", diffusion.PARAMETERIZATIONS), ("variance", diffusion.VARIANCES),
                             ("loss_type", diffusion.LOSS_TYPES), ("timestep_sampler", timesteps.TIMESTEP_SAMPLERS)):
            checks.one_of(diff[field], valid, f"diffusion.{field}")
        checks.require(diff.schedule != learned_schedule.LEARNED or diff.loss_type in ("vlb", "weighted"),
                       "diffusion.loss_type",
                       f"a learned schedule is trained by the bound: use 'vlb' or 'weighted', not {diff.loss_type!r} "
                       "(the unweighted MSE would drive it towards all noise).")
        checks.require(not (diff.variance in LEARNED_VARIANCES and diff.loss_type in ("simple", "weighted")),
                       "diffusion.loss_type",
                       f"{diff.loss_type!r} cannot train variance={diff.variance!r}; use 'hybrid' or 'vlb'.")
        checks.require(not (diff.timestep_sampler == "importance" and diff.loss_type == "simple"),
                       "diffusion.timestep_sampler",
                       "'importance' weighs t by the bound's terms: use it with loss_type 'vlb', 'hybrid' or 'weighted'.")
        checks.require(not (diff.schedule == "ve" and diff.parameterization == "v"), "diffusion.parameterization",
                       "'v' is defined for variance-preserving schedules; use 'eps' or 'x0' with 've'.")
        for field in ("ch", "num_res_blocks", "num_groups"):
            checks.positive_int(m, field, "model")
        ch_mult_ok = isinstance(m.ch_mult, (tuple, list)) and len(m.ch_mult) >= 1
        checks.require(ch_mult_ok and all(checks.is_int(c) and c >= 1 for c in m.ch_mult), "model.ch_mult",
                       f"must be a non-empty tuple of positive integers, e.g. (1, 2), got {m.ch_mult!r}.")
        checks.require(isinstance(m.attn_resolutions, (tuple, list))
                       and all(checks.is_int(r) for r in m.attn_resolutions), "model.attn_resolutions",
                       f"must be a tuple of integers (resolutions, e.g. (16,)), got {m.attn_resolutions!r}.")
        checks.require(checks.is_number(m.dropout) and 0.0 <= m.dropout < 1.0, "model.dropout",
                       f"must be in [0, 1), got {m.dropout!r} (the paper uses 0.1 on CIFAR-10).")
        try:  # the UNet's own checks: down-sampling, attention resolutions, groups, dtype
            create_unet(m, config.data.image_size, config.data.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------ parameters
    def init_params(self, rng):
        x, t = jnp.zeros((1,) + self.image_shape), jnp.zeros((1,), jnp.int32)
        if self.learned_schedule:
            init = functools.partial(self.model.init, method="init_all")
        else:
            init = functools.partial(self.model.init, train=False)
        return jax.jit(init)(rng, x, t)["params"]  # jitted: eager init dispatches op by op

    def init_loss_history(self):
        if self.config.diffusion.timestep_sampler == "importance":
            return timesteps.init_loss_history(self.num_timesteps)
        return None

    def schedule(self, params) -> schedules.Schedule:
        """The fixed schedule, or the learned one `params` define (traced: gradients reach it)."""
        if self._fixed_schedule is not None:
            return self._fixed_schedule
        return learned_schedule.schedule_from_params(self.apply_fn, params)

    def describe(self) -> dict:
        return {"parameterization": self.parameterization, "variance": self.variance}

    def _model_fn(self, params, train: bool = False, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if train else None
        return lambda x, t: self.apply_fn({"params": params}, x, t, train=train, rngs=rngs)

    def model_fn(self, params):
        return self._model_fn(params)

    # ------------------------------------------------------------------ training
    def draw_training_inputs(self, keys, x, loss_history, *, position=None):
        t, weights = timesteps.sample_timesteps(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
                                                self.num_timesteps, loss_history)
        return {"t": t, "weights": weights, "noise": example_noise(keys, x.shape[1:])}

    def loss_terms(self, params, x, inputs, *, train=False, dropout_rng=None):
        return diffusion.training_losses(self.schedule(params), self._model_fn(params, train, dropout_rng), x,
                                         inputs["t"], inputs["noise"], parameterization=self.parameterization,
                                         variance=self.variance, loss_type=self.loss_type)

    def update_loss_history(self, history, inputs, terms, gather):
        return timesteps.update_loss_history(history, gather(inputs["t"]), gather(jax.lax.stop_gradient(terms["vb"])))

    # ------------------------------------------------------------------ evaluation
    def eval_terms(self, params, x, keys, rng):
        t, _ = timesteps.sample_timesteps(keys, self.num_timesteps)
        terms = self.loss_terms(params, x, {"t": t, "noise": example_noise(keys, x.shape[1:])})
        terms["bpd_est"] = self.bound_terms(params, x, keys, rng,
                                            num_strata=self.config.training.bpd_estimate_strata)["total_bpd"]
        return terms

    def bound_terms(self, params, x, keys, rng, *, num_strata):
        kw = dict(parameterization=self.parameterization, variance=self.variance)
        sched, model_fn = self.schedule(params), self.model_fn(params)
        if num_strata:
            return diffusion.bpd_estimate(sched, model_fn, x, rng, num_strata=num_strata, **kw)
        full = diffusion.calc_bpd_loop(sched, model_fn, x, rng, **kw)
        return {"total_bpd": full["total_bpd"], "prior_bpd": full["prior_bpd"], "vb": full["vb"]}

    def bound_description(self, num_strata: int) -> str:
        if num_strata:
            return (f"unbiased stratified estimate over t ({num_strata} strata; all T terms: "
                    "python -m ddpm_jax.evaluate)")
        return "all T terms"

    # ------------------------------------------------------------------ sampling
    def check_sampler(self, sampler, num_steps, eta):
        super().check_sampler(sampler, num_steps, eta)
        T = self.num_timesteps
        if sampler != "ancestral" and (num_steps is None or not 1 <= num_steps <= T):
            raise ConfigError(f"--sampler={sampler} needs --steps in [1, {T}] (T of this run), got {num_steps!r}.")
        if sampler == "ddim" and self.config.diffusion.schedule == "ve":
            raise ConfigError("--sampler=ddim is written for variance-preserving schedules; this run uses 've': "
                              "use --sampler=respaced or ancestral.")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}.")

    def sample(self, params, rng, num, *, sampler, num_steps, eta, num_frames=0):
        shape = (num,) + self.image_shape
        sched, model_fn = self.schedule(params), self.model_fn(params)
        kw = dict(parameterization=self.parameterization, clip_denoised=self.config.sampling.clip_denoised)
        if sampler == "ddim":
            return sampling.ddim_sample_loop(sched, model_fn, shape, rng, num_steps=num_steps, eta=eta, **kw)
        kw.update(variance=self.variance, num_frames=num_frames)
        if sampler == "respaced":
            return sampling.respaced_sample_loop(sched, model_fn, shape, rng, num_steps=num_steps, **kw)
        return sampling.sample_loop(sched, model_fn, shape, rng, **kw)

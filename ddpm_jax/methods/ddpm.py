"""The discrete DDPM (Ho et al. 2020; Improved DDPM's variances and losses), on a fixed schedule or
on a learned one (VDM's monotone network, whose parameters live beside the UNet's).

Options beside the paper's (config.diffusion; each default is the paper's setting):
  decoder = "learned": the t = 0 decoder's log std is a parameter per channel, started at the fixed
    decoder's value and trained on every step by L_0 on a small sub-batch at t = 0, with the mean and
    the schedule stop-gradiented (one extra forward on decoder_batch examples, no backward through
    the network); the bound uses it.
  prior_loss = True: the prior L_T joins the training loss (for a learned schedule: the loss is then
    the bound, and L_T keeps gamma_1 up).
  condition_on = "log_snr": the network sees log SNR_t mapped onto [0, T - 1] instead of t.
  weighting (loss_type "vlb" or "weighted", a fixed schedule): each term L_{t-1}, t >= 1, of the loss
    weighted by w_t, the discrete form of core.weighting's family (diffusion.chain_weights; "eps" makes it
    L_simple's eps-MSE, "x0" / "v" those predictors' MSE); "elbo" (w_t = 1) is the bound. The reported
    bound (bound_terms, bpd_est, "vb") is the ELBO whatever the weighting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checks
from ddpm_jax.core import diffusion, likelihood, sampling, schedules, timesteps, weighting
from ddpm_jax.errors import ConfigError
from ddpm_jax.methods.base import Method, NoiseSchedule, Sampler, example_noise
from ddpm_jax.models import learned_schedule
from ddpm_jax.models.unet import create_model as create_unet

LEARNED_VARIANCES = ("learned", "learned_range")
DECODERS = ("fixed", "learned")
CONDITIONINGS = ("index", "log_snr")
# The learned decoder's L_0 enters the loss with this weight and zero value (w * (L - stop_gradient(L))):
# its gradient reaches only the decoder scale, and Adam's step for that one parameter does not depend on
# the weight, while a small weight keeps it out of the global-norm clip that scales the network's step.
DECODER_LOSS_WEIGHT = 1e-3
# config.diffusion fields newer than the first runs: an older config.json (load_run, resume) lacks them.
FIELD_DEFAULTS = {
    "decoder": "fixed",
    "decoder_batch": 16,
    "condition_on": "index",
    "prior_loss": False,
    "weighting": "elbo",
    "weighting_bias": weighting.SIGMOID_BIAS,
}


def _field(diffusion_config: ml_collections.ConfigDict, name: str):
    return diffusion_config.get(name, FIELD_DEFAULTS[name])


def log_snr_condition(log_snr, log_snr_first, log_snr_last):
    """What the network sees with condition_on='log_snr': log SNR_t mapped affinely onto the index range,
    log_snr_first -> 0 and log_snr_last -> T - 1, so the sinusoidal embedding keeps its frequencies.

    The map is fixed (a fixed schedule's own end points; a learned schedule's initial ones), so when a
    learned schedule moves, the network sees each step at its noise level, not at its index.
    """
    num_timesteps = log_snr.shape[-1]
    if num_timesteps == 1 or log_snr_first == log_snr_last:
        return 0.0 * log_snr
    return (num_timesteps - 1) * (log_snr_first - log_snr) / (log_snr_first - log_snr_last)


def decoder_noise(keys, shape) -> jax.Array:
    """Each example's draw of x_1's noise for the learned decoder's L_0, from fold_in(its key, 2)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), shape))(keys)


class DDPM(Method):
    name = "ddpm"  # samplers: ancestral, respaced, ddim (the mapping closes the sampling section)
    frozen_fields = ("data.image_size", "data.channels", "model", "diffusion")
    section, default_config = "diffusion", "ddpm"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d = config.diffusion
        self.num_timesteps = d.num_timesteps
        self.parameterization, self.variance, self.loss_type = d.parameterization, d.variance, d.loss_type
        self.learned_schedule = d.schedule == learned_schedule.LEARNED
        self.decoder, self.decoder_batch = _field(d, "decoder"), _field(d, "decoder_batch")
        self.condition_on, self.prior_loss = _field(d, "condition_on"), bool(_field(d, "prior_loss"))
        self.weighting = _field(d, "weighting")
        decoder_channels = config.data.channels if self.decoder == "learned" else 0
        out_channels = config.data.channels * (2 if d.variance in LEARNED_VARIANCES else 1)
        unet = create_unet(config.model, config.data.image_size, out_channels)
        # _init_model makes the parameters of the paper's setting (the same draws whatever the options);
        # self.model adds the learned decoder's parameter to them.
        if self.learned_schedule:
            gamma_0, gamma_1 = learned_schedule.initial_gamma_range(d.num_timesteps, d.learned_init)
            self._init_model = learned_schedule.DiffusionModel(unet, d.num_timesteps, gamma_0, gamma_1)
            self.model = learned_schedule.DiffusionModel(unet, d.num_timesteps, gamma_0, gamma_1, decoder_channels)
            self._fixed_schedule, self._log_snr_ends = None, (-gamma_0, -gamma_1)
        else:
            self._fixed_schedule = schedules.make_schedule(d.schedule, d.num_timesteps)
            self._init_model = unet
            self.model = (
                learned_schedule.DiffusionModel(unet, d.num_timesteps, decoder_channels=decoder_channels)
                if decoder_channels
                else unet
            )
        self._fixed_condition = None
        if self.condition_on == "log_snr" and self._fixed_schedule is not None:
            a = np.asarray(self._fixed_schedule.sqrt_alphas_cumprod, np.float64)
            s = np.asarray(self._fixed_schedule.sqrt_one_minus_alphas_cumprod, np.float64)
            log_snr = 2.0 * (np.log(a) - np.log(s))
            self._fixed_condition = jnp.asarray(log_snr_condition(log_snr, log_snr[0], log_snr[-1]), jnp.float32)
        # [T] w_t of the loss's terms (None: the bound's own, and the unchanged computation)
        self._chain_weights = None
        if self.weighting != "elbo":
            w = diffusion.chain_weights(self._fixed_schedule, self.weighting, bias=_field(d, "weighting_bias"))
            self._chain_weights = jnp.asarray(w, jnp.float32)

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        for section in ("model", "diffusion"):
            checks.require(section in config, section, "missing section; start from configs/ddpm.py.")
        diff, m = config.diffusion, config.model
        checks.one_of(diff.schedule, schedules.SCHEDULE_NAMES + (learned_schedule.LEARNED,), "diffusion.schedule")
        checks.require(
            checks.is_int(diff.num_timesteps) and diff.num_timesteps >= 1,
            "diffusion.num_timesteps",
            f"must be an integer >= 1 (the number of diffusion steps T; the paper uses 1000), "
            f"got {diff.num_timesteps!r}.",
        )
        for field, valid in (
            ("parameterization", diffusion.PARAMETERIZATIONS),
            ("variance", diffusion.VARIANCES),
            ("loss_type", diffusion.LOSS_TYPES),
            ("timestep_sampler", timesteps.TIMESTEP_SAMPLERS),
        ):
            checks.one_of(diff[field], valid, f"diffusion.{field}")
        checks.require(
            diff.schedule != learned_schedule.LEARNED or diff.loss_type in ("vlb", "weighted"),
            "diffusion.loss_type",
            f"a learned schedule is trained by the bound: use 'vlb' or 'weighted', not {diff.loss_type!r} "
            "(the unweighted MSE would drive it towards all noise).",
        )
        checks.require(
            not (diff.variance in LEARNED_VARIANCES and diff.loss_type in ("simple", "weighted")),
            "diffusion.loss_type",
            f"{diff.loss_type!r} cannot train variance={diff.variance!r}; use 'hybrid' or 'vlb'.",
        )
        checks.require(
            not (diff.timestep_sampler == "importance" and diff.loss_type == "simple"),
            "diffusion.timestep_sampler",
            "'importance' weighs t by the bound's terms: use it with loss_type 'vlb', 'hybrid' or 'weighted'.",
        )
        checks.require(
            not (diff.schedule == "ve" and diff.parameterization == "v"),
            "diffusion.parameterization",
            "'v' is defined for variance-preserving schedules; use 'eps' or 'x0' with 've'.",
        )
        checks.one_of(_field(diff, "decoder"), DECODERS, "diffusion.decoder")
        checks.one_of(_field(diff, "condition_on"), CONDITIONINGS, "diffusion.condition_on")
        name, bias = _field(diff, "weighting"), _field(diff, "weighting_bias")
        checks.one_of(name, weighting.WEIGHTINGS, "diffusion.weighting")
        checks.require(checks.is_number(bias), "diffusion.weighting_bias", f"must be a number, got {bias!r}.")
        checks.require(
            name == "elbo" or diff.loss_type in ("vlb", "weighted"),
            "diffusion.weighting",
            f"{name!r} weighs the bound's terms, which loss_type {diff.loss_type!r} does not use: set "
            "diffusion.loss_type to 'vlb' or 'weighted', or keep weighting 'elbo' ('simple' already is 'eps').",
        )
        checks.require(
            name == "elbo" or diff.schedule != learned_schedule.LEARNED,
            "diffusion.weighting",
            f"a learned schedule is trained by the bound, and {name!r} is not the bound: keep weighting 'elbo' "
            "or use a fixed schedule.",
        )
        prior_loss, decoder_batch = _field(diff, "prior_loss"), _field(diff, "decoder_batch")
        checks.require(
            isinstance(prior_loss, bool), "diffusion.prior_loss", f"must be True or False, got {prior_loss!r}."
        )
        checks.require(
            checks.is_int(decoder_batch) and decoder_batch >= 1,
            "diffusion.decoder_batch",
            f"must be a positive integer (the examples per device whose L_0 at t = 0 trains the learned "
            f"decoder's scale on every step), got {decoder_batch!r}.",
        )
        if diff.schedule == learned_schedule.LEARNED:
            advice = cls.learned_schedule_advice(config)
            if advice:
                logging.warning("diffusion.schedule='learned': %s", " ".join(advice))
        for field in ("ch", "num_res_blocks", "num_groups"):
            checks.positive_int(m, field, "model")
        ch_mult_ok = isinstance(m.ch_mult, (tuple, list)) and len(m.ch_mult) >= 1
        checks.require(
            ch_mult_ok and all(checks.is_int(c) and c >= 1 for c in m.ch_mult),
            "model.ch_mult",
            f"must be a non-empty tuple of positive integers, e.g. (1, 2), got {m.ch_mult!r}.",
        )
        checks.require(
            isinstance(m.attn_resolutions, (tuple, list)) and all(checks.is_int(r) for r in m.attn_resolutions),
            "model.attn_resolutions",
            f"must be a tuple of integers (resolutions, e.g. (16,)), got {m.attn_resolutions!r}.",
        )
        checks.require(
            checks.is_number(m.dropout) and 0.0 <= m.dropout < 1.0,
            "model.dropout",
            f"must be in [0, 1), got {m.dropout!r} (the paper uses 0.1 on CIFAR-10).",
        )
        try:  # the UNet's own checks: down-sampling, attention resolutions, groups, dtype
            create_unet(m, config.data.image_size, config.data.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @staticmethod
    def learned_schedule_advice(config: ml_collections.ConfigDict) -> list[str]:
        """What a learned schedule needs that the config leaves out (validate logs it)."""
        diff, advice = config.diffusion, []
        if _field(diff, "decoder") != "learned":
            advice.append(
                "Its fixed t = 0 decoder has the variance of step 1's posterior, which the schedule sets "
                "through beta_1 (a learned one starts with it far narrower than the noise x_1 carries), "
                "and L_0 then grows with the square of the network's error: set diffusion.decoder='learned'."
            )
        if not _field(diff, "prior_loss"):
            advice.append(
                "Without the prior L_T the training loss is not a bound, and nothing keeps gamma_1 up: "
                "set diffusion.prior_loss=True."
            )
        if _field(diff, "condition_on") != "log_snr":
            advice.append(
                "The network sees the step index, whose noise level moves as the schedule learns: "
                "set diffusion.condition_on='log_snr'."
            )
        return advice

    # ------------------------------------------------------------------ parameters
    @functools.cached_property
    def _jitted_init(self):
        """The network's init, jitted once per method (eager init dispatches op by op)."""
        if self.learned_schedule:
            return jax.jit(functools.partial(self._init_model.init, method="init_all"))
        return jax.jit(functools.partial(self._init_model.init, train=False))

    def init_params(self, rng):
        x, t = jnp.zeros((1,) + self.image_shape), jnp.zeros((1,), jnp.int32)
        params = self._jitted_init(rng, x, t)["params"]
        if self.decoder != "learned":
            return params
        params = dict(params) if self.learned_schedule else {"network": params}
        log_scale = self._initial_decoder_log_scale(params)
        return {**params, learned_schedule.DECODER_PARAM: learned_schedule.decoder_param_value(log_scale)}

    def _initial_decoder_log_scale(self, params) -> jnp.ndarray:
        """[C] the fixed decoder's log std at t = 0 (for a learned variance, fixed_small's) on the
        schedule `params` (without the decoder's) start with: where the learned decoder starts."""
        if self._fixed_schedule is not None:
            sched = self._fixed_schedule
        else:
            sched = learned_schedule.schedule_from_params(self._init_model.apply, params)
        variance = "fixed_small" if self.variance in LEARNED_VARIANCES else self.variance
        channels = self.image_shape[-1]
        log_var = diffusion.model_log_variance(
            sched, None, jnp.zeros((1, channels)), jnp.zeros((1,), jnp.int32), variance
        )
        return 0.5 * log_var[0]

    def init_method_state(self):
        """The importance sampler's loss history (timesteps.LossHistory); None for the uniform t."""
        if self.config.diffusion.timestep_sampler == "importance":
            return timesteps.init_loss_history(self.num_timesteps)
        return None

    def schedule(self, params) -> schedules.Schedule:
        """The fixed schedule, or the learned one `params` define (traced: gradients reach it)."""
        if self._fixed_schedule is not None:
            return self._fixed_schedule
        return learned_schedule.schedule_from_params(self.apply_fn, params)

    def noise_schedule(self, params) -> NoiseSchedule:
        """log SNR of each step t = 0..T-1 (of the learned schedule these params define, where learned)."""
        sched = self.schedule(params)
        a = np.asarray(sched.sqrt_alphas_cumprod, np.float64)
        s = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)
        t = np.arange(len(a), dtype=np.float64)
        return NoiseSchedule(self.config.diffusion.schedule, t, 2.0 * (np.log(a) - np.log(s)), discrete=True)

    def loss_unit(self) -> str:
        """bits/dim for the bound's losses (vlb, weighted); L_simple and hybrid are the MSE of the
        network's target (hybrid plus 1e-3 T L_t), and prior_loss adds L_T."""
        if self.loss_type in ("vlb", "weighted"):
            return "bits/dim" + (f", terms weighted by w_t ({self.weighting!r})" if self.weighting != "elbo" else "")
        unit = f"MSE of the {self.parameterization} target" + (" + 1e-3 T L_t" if self.loss_type == "hybrid" else "")
        return unit + (" + L_T" if self.prior_loss else "")

    def decoder_log_scale(self, params):
        """[C] the learned t = 0 decoder's log std (pass it to the core's bound functions as
        decoder_log_scale); None for the fixed decoder (the model's variance at t = 0)."""
        if self.decoder != "learned":
            return None
        return self.apply_fn({"params": params}, method="decoder_log_scale")

    def describe(self) -> dict:
        return {
            "parameterization": self.parameterization,
            "variance": self.variance,
            "decoder": self.decoder,
            "condition_on": self.condition_on,
        }

    def _condition(self, params):
        """[T] what the network sees for each t with condition_on='log_snr'; None: t itself."""
        if self.condition_on != "log_snr":
            return None
        if self._fixed_schedule is not None:
            return self._fixed_condition
        return log_snr_condition(self.apply_fn({"params": params}, method="log_snr"), *self._log_snr_ends)

    def _model_fn(self, params, train: bool = False, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if train else None
        apply = lambda x, t: self.apply_fn({"params": params}, x, t, train=train, rngs=rngs)
        condition = self._condition(params)
        if condition is None:
            return apply
        return lambda x, t: apply(x, condition[t])

    def model_fn(self, params):
        return self._model_fn(params)

    def probability_flow(self, params):
        """The discrete VP chain as a continuous flow (likelihood.continuous_from_schedule): eps-predicting
        networks with a fixed variance only (a learned variance's extra channels are not part of the flow)."""
        if self.parameterization != "eps" or self.variance not in ("fixed_small", "fixed_large"):
            return None
        if self.config.diffusion.schedule == "ve":
            return None
        return likelihood.continuous_from_schedule(self.schedule(params), self.model_fn(params))

    # ------------------------------------------------------------------ training
    def draw_training_inputs(self, keys, x, method_state, *, position=None):
        loss_history = method_state  # the importance sampler's (init_method_state), or None
        t, weights = timesteps.sample_timesteps(
            jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), self.num_timesteps, loss_history
        )
        inputs = {"t": t, "weights": weights, "noise": example_noise(keys, x.shape[1:])}
        if self.decoder == "learned":
            inputs["noise_0"] = decoder_noise(keys, x.shape[1:])
        return inputs

    def loss_terms(self, params, x, inputs, *, train=False, dropout_rng=None):
        sched, scale = self.schedule(params), self.decoder_log_scale(params)
        # The learned decoder scale learns only from the dense term below, not from the few draws of t = 0.
        terms = diffusion.training_losses(
            sched,
            self._model_fn(params, train, dropout_rng),
            x,
            inputs["t"],
            inputs["noise"],
            parameterization=self.parameterization,
            variance=self.variance,
            loss_type=self.loss_type,
            decoder_log_scale=None if scale is None else jax.lax.stop_gradient(scale),
            weights=self._chain_weights,
        )
        if scale is not None:
            decoder = jnp.mean(self._decoder_bpd(params, sched, scale, x, inputs["noise_0"]))
            terms["decoder_bpd"] = jnp.broadcast_to(jax.lax.stop_gradient(decoder), x.shape[:1])
            terms["loss"] = terms["loss"] + DECODER_LOSS_WEIGHT * (decoder - jax.lax.stop_gradient(decoder))
        if self.prior_loss:
            terms["prior_bpd"] = diffusion.prior_bpd(sched, x)
            terms["loss"] = terms["loss"] + terms["prior_bpd"]
        return terms

    def _decoder_bpd(self, params, sched, scale, x, noise_0):
        """L_0 [k] on the first decoder_batch examples at t = 0: the mean and the schedule stop-gradiented
        (the network runs forward only, in eval mode), so its gradient reaches only the decoder scale."""
        k = min(self.decoder_batch, x.shape[0])
        frozen = jax.lax.stop_gradient(params)
        return diffusion.decoder_bpd(
            jax.lax.stop_gradient(sched),
            self._model_fn(frozen),
            x[:k],
            noise_0[:k],
            parameterization=self.parameterization,
            variance=self.variance,
            decoder_log_scale=scale,
        )

    def update_method_state(self, state, inputs, terms, gather):
        """The loss history with the global batch's per-t terms of the loss: the bound's, times w_t when weighted
        (the importance sampler then draws t by the weighted loss it estimates)."""
        vb = terms["vb"] if self._chain_weights is None else self._chain_weights[inputs["t"]] * terms["vb"]
        return timesteps.update_loss_history(state, gather(inputs["t"]), gather(jax.lax.stop_gradient(vb)))

    # ------------------------------------------------------------------ evaluation
    def eval_terms(self, params, x, keys, rng):
        t, _ = timesteps.sample_timesteps(keys, self.num_timesteps)
        inputs = {"t": t, "noise": example_noise(keys, x.shape[1:])}
        if self.decoder == "learned":
            inputs["noise_0"] = decoder_noise(keys, x.shape[1:])
        terms = self.loss_terms(params, x, inputs)
        terms["bpd_est"] = self.bound_terms(params, x, keys, rng, num_strata=self.config.training.bpd_estimate_strata)[
            "total_bpd"
        ]
        return terms

    def bound_terms(self, params, x, keys, rng, *, num_strata):
        kw = dict(
            parameterization=self.parameterization,
            variance=self.variance,
            decoder_log_scale=self.decoder_log_scale(params),
        )
        sched, model_fn = self.schedule(params), self.model_fn(params)
        if num_strata:
            return diffusion.bpd_estimate(sched, model_fn, x, rng, num_strata=num_strata, **kw)
        full = diffusion.calc_bpd_loop(sched, model_fn, x, rng, **kw)
        return {"total_bpd": full["total_bpd"], "prior_bpd": full["prior_bpd"], "vb": full["vb"]}

    def bound_description(self, num_strata: int) -> str:
        if num_strata:
            return (
                f"unbiased stratified estimate over t ({num_strata} strata; all T terms: python -m ddpm_jax.evaluate)"
            )
        return "all T terms"

    # ------------------------------------------------------------------ sampling
    def _chain_inputs(self, params, num):
        """(schedule, model_fn, shape, keyword arguments) every sampler of the chain starts from."""
        kw = dict(parameterization=self.parameterization, clip_denoised=self.config.sampling.clip_denoised)
        return self.schedule(params), self.model_fn(params), (num,) + self.image_shape, kw

    def _draw_ancestral(self, params, rng, num, *, num_steps, eta, num_frames):
        """All T steps of the reverse chain (Ho et al.); num_steps and eta are not used."""
        sched, model_fn, shape, kw = self._chain_inputs(params, num)
        return sampling.sample_loop(sched, model_fn, shape, rng, variance=self.variance, num_frames=num_frames, **kw)

    def _draw_respaced(self, params, rng, num, *, num_steps, eta, num_frames):
        """num_steps steps with recomputed betas (Improved DDPM); eta is not used."""
        sched, model_fn, shape, kw = self._chain_inputs(params, num)
        return sampling.respaced_sample_loop(
            sched, model_fn, shape, rng, num_steps=num_steps, variance=self.variance, num_frames=num_frames, **kw
        )

    def _draw_ddim(self, params, rng, num, *, num_steps, eta, num_frames):
        """num_steps DDIM steps with eta (Song et al.); no frames."""
        sched, model_fn, shape, kw = self._chain_inputs(params, num)
        return sampling.ddim_sample_loop(sched, model_fn, shape, rng, num_steps=num_steps, eta=eta, **kw)

    def _check_steps(self, sampler, num_steps, eta):
        """A sub-sequence of the chain: --steps K in [1, T]."""
        T = self.num_timesteps
        if num_steps is None or not 1 <= num_steps <= T:
            raise ConfigError(f"--sampler={sampler} needs --steps in [1, {T}] (T of this run), got {num_steps!r}.")

    def _check_ddim(self, sampler, num_steps, eta):
        """--steps in [1, T], on a variance-preserving schedule."""
        self._check_steps(sampler, num_steps, eta)
        if self.config.diffusion.schedule == "ve":
            raise ConfigError(
                "--sampler=ddim is written for variance-preserving schedules; this run uses 've': "
                "use --sampler=respaced or ancestral."
            )

    samplers = {  # the first is the default
        "ancestral": Sampler(_draw_ancestral, doc="all T steps, Ho et al."),
        "respaced": Sampler(
            _draw_respaced, check=_check_steps, doc="--steps steps with recomputed betas, Improved DDPM"
        ),
        "ddim": Sampler(_draw_ddim, check=_check_ddim, frames=False, doc="--steps steps with --eta, Song et al."),
    }

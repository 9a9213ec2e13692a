"""The interface every method implements: what the run layer trains, evaluates and samples.

A method is chosen once from `config.method` (`ddpm_jax.methods.from_config`). The training and
evaluation steps, the loop, the evaluation and `load_run` see only this interface, so a new method
(its own file plus one registry line in methods/__init__.py) needs no change anywhere else.

Randomness: the steps hand a method one key per example, derived from the example's global index
(the same on 1 or N devices), and one key per device where an example-level key is not needed.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import chex
import jax
import ml_collections
import numpy as np

Params = Any


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One entry of a method's `samplers` mapping: everything the run layer knows about a sampler.

    draw(method, params, rng, num, *, num_steps, eta, num_frames) -> dict: what `Method.sample`
      returns (`samples`, and with num_frames > 0 the chain's `frames`, `pred_x0`, `frame_t` where
      it has them); `sampler`, `num_steps` and `eta` are static (Python values) under jit.
    check(method, name, num_steps, eta): raises errors.ConfigError for --steps / --eta values this
      sampler cannot take on this method and config (run after the checks every sampler shares).
    label: how tables name its runs; None: the name, followed by --steps when given ("respaced100").
    frames: whether sample.py --strip asks it for the chain's frames.
    doc: a short description for the --sampler flag's help.
    """

    draw: Callable[..., dict]
    check: Callable[..., None] | None = None
    label: str | None = None
    frames: bool = True
    doc: str = ""


@dataclasses.dataclass(frozen=True, repr=False)
class NoiseSchedule:
    """A run's noise schedule, the same for every method: log SNR(t) = log(a_t^2 / s_t^2) against t.

    t: [N] float64, the discrete chain's steps 0..T-1 (`discrete`), or a grid of continuous t in
      [0, 1] (VDM); log_snr: [N] float64, falling with t. `str()` says it in one line; `plot(path)`
      draws it as a PNG.
    """

    name: str  # what the schedule is: "linear", "learned", "fixed linear gamma (VDM)", ...
    t: np.ndarray
    log_snr: np.ndarray
    discrete: bool

    def __str__(self) -> str:
        t, snr = self.t, self.log_snr
        where = f"{len(t)} steps, t = 0..{len(t) - 1}" if self.discrete else f"continuous t in [0, 1], {len(t)} points"
        return (
            f"{self.name} schedule ({where}): log SNR {snr[0]:.2f} at t = {t[0]:g}, {snr[len(t) // 2]:.2f} at "
            f"t = {t[len(t) // 2]:g}, {snr[-1]:.2f} at t = {t[-1]:g}"
        )

    def __repr__(self) -> str:
        return f"NoiseSchedule({self})"

    def plot(self, path) -> str:
        """Writes log SNR against t as a PNG (local or gs://); returns path."""
        from ddpm_jax.evaluation import plots

        return plots.plot_noise_schedule(self, path)


class Method(abc.ABC):
    """A trainable generative model with a bound in bits/dim.

    Subclasses set `name`, `samplers` (sampler name -> `Sampler`: the one place a method's samplers
    are listed; validation, dispatch, table labels and the --sampler flag all read it, and its first
    entry is the default) and `frozen_fields` (config fields a resume must not change), and build
    `self.model` (a Flax module) in `__init__`.
    """

    name: str = ""
    samplers: ClassVar[Mapping[str, Sampler]] = {}
    frozen_fields: tuple[str, ...] = ("data.image_size", "data.channels")
    # The config sections the method reads: the shared ones it uses and its own (`section`). Any other
    # section, and any field its shipped config (`default_config`, a name in configs/) lacks, is refused
    # by training.validation before anything is built, so an ablation over it cannot give identical cells.
    shared_sections: tuple[str, ...] = ("data", "model", "training", "optim", "sampling")
    section: str = ""
    default_config: str = ""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

    @property
    def apply_fn(self):
        return self.model.apply

    # ------------------------------------------------------------------ config
    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """Raises errors.ConfigError for a method-specific config value that cannot work."""
        return None

    # ------------------------------------------------------------------ parameters
    @abc.abstractmethod
    def init_params(self, rng: chex.PRNGKey) -> Params:
        """Fresh parameters (the "params" collection)."""

    @functools.cached_property
    def _jitted_init(self):
        """`self.model.init`, jitted once per method: eager init dispatches op by op, a new jit compiles again."""
        return jax.jit(self.model.init)

    def init_method_state(self):
        """The method's own training state, kept in the train state beside the params and
        checkpointed with it (e.g. the DDPM importance sampler's loss history); None: none."""
        return None

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def draw_training_inputs(self, keys: chex.PRNGKey, x: chex.Array, method_state, *, position) -> dict:
        """The per-example random inputs of the loss, from one key per example, outside the gradient.

        method_state: the method's own training state (`init_method_state`), or None.

        position = (index [B], global batch size): each example's place in the global batch, for
        draws stratified over the batch (low-discrepancy t).
        Returns a dict with at least `weights` [B] (importance weights of the loss terms).
        """

    @abc.abstractmethod
    def loss_terms(
        self,
        params: Params,
        x: chex.Array,
        inputs: dict,
        *,
        train: bool = False,
        dropout_rng: chex.PRNGKey | None = None,
    ) -> dict:
        """Per-example training loss `loss` [B] and its parts (logged as their batch means)."""

    def update_method_state(self, state, inputs: dict, terms: dict, gather):
        """The method's own state after a step, from this step's inputs and loss terms (called only
        when `init_method_state` is not None); `gather(x)` collects an array over the whole global
        batch, in global order. A non-finite step keeps the old state."""
        return state

    # ------------------------------------------------------------------ evaluation
    @abc.abstractmethod
    def eval_terms(self, params: Params, x: chex.Array, keys: chex.PRNGKey, rng: chex.PRNGKey) -> dict:
        """The training loss and its parts at random inputs, plus `bpd_est`: a cheap unbiased
        estimate of the whole bound in bits/dim; per example."""

    @abc.abstractmethod
    def bound_terms(
        self, params: Params, x: chex.Array, keys: chex.PRNGKey, rng: chex.PRNGKey, *, num_strata: int
    ) -> dict:
        """The negative ELBO per example in bits/dim (`total_bpd` [B]) and its parts.

        num_strata = 0 asks for the most exact bound the method has (all T terms of a discrete
        chain); > 0 for a cheaper unbiased estimate. Optional `vb` [B, T]: the bound per step.
        """

    def bound_description(self, num_strata: int) -> str:
        return "exact"

    def probability_flow(self, params: Params):
        """(gamma_fn, eps_fn) on t in [0, 1] for `ddpm_jax.core.likelihood`'s probability-flow ODE, or None
        where the method has no such flow (a VAE; a DDPM whose network does not predict eps alone)."""
        return None

    # ------------------------------------------------------------------ sampling
    @classmethod
    def default_sampler(cls) -> str:
        """The first entry of `samplers`: what sample.py and `Run.sample` use without --sampler."""
        return next(iter(cls.samplers))

    def _sampler(self, sampler: str) -> Sampler:
        """The `samplers` entry named `sampler`; errors.ConfigError listing the names when there is none."""
        from ddpm_jax.errors import ConfigError

        if sampler not in self.samplers:
            raise ConfigError(
                f"--sampler={sampler!r} is not available for method {self.name!r}; use one of "
                f"{', '.join(self.samplers)}."
            )
        return self.samplers[sampler]

    def sample(
        self,
        params: Params,
        rng: chex.PRNGKey,
        num: int,
        *,
        sampler: str,
        num_steps: int | None,
        eta: float,
        num_frames: int = 0,
    ) -> dict:
        """`num` samples [num, H, W, C] in [-1, 1] (`samples`), and with num_frames > 0 the chain's
        frames (`frames`, `pred_x0` [F, num, H, W, C], `frame_t` [F]) where the sampler has a chain:
        the `draw` of `samplers[sampler]` (check_sampler validates its arguments beforehand)."""
        draw = self._sampler(sampler).draw
        return draw(self, params, rng, num, num_steps=num_steps, eta=eta, num_frames=num_frames)

    def check_sampler(self, sampler: str, num_steps: int | None, eta: float) -> None:
        """Raises errors.ConfigError when `sampler` cannot run on this method and config: a name
        missing from `samplers`, an eta outside [0, 1], then the entry's own `check`."""
        from ddpm_jax.errors import ConfigError

        entry = self._sampler(sampler)
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}.")
        if entry.check is not None:
            entry.check(self, sampler, num_steps, eta)

    def sampler_label(self, sampler: str, num_steps: int | None) -> str:
        """How tables name a sampler run: the entry's `label`, else "respaced100", "ddim50", "ancestral"."""
        label = self._sampler(sampler).label
        if label is not None:
            return label
        return sampler if num_steps is None else f"{sampler}{num_steps}"

    # ------------------------------------------------------------------ loading a trained run
    def model_fn(self, params: Params):
        """`model_fn(x_t, t)`: the network with `params` closed over (the core's contract)."""

        def model_fn(x, t):
            return self.apply_fn({"params": params}, x, t, train=False)

        return model_fn

    def schedule(self, params: Params):
        """The noise schedule these params use, in the method's own form (a DDPM's core `Schedule`;
        None for a method without one); `noise_schedule` is the same for every method."""
        return None

    def noise_schedule(self, params: Params) -> NoiseSchedule | None:
        """The noise schedule as log SNR against t (`NoiseSchedule`); None for a method without one."""
        return None

    def describe(self) -> dict:
        """What `load_run` reports beside the schedule: parameterization, variance, ..."""
        return {}

    def loss_unit(self) -> str:
        """What the training loss ("loss") measures, for loss.png's axis: "bits/dim" where it is the
        negative ELBO (or an estimate of it), else what it is (a DDPM's L_simple: an MSE)."""
        return "bits/dim"


def example_noise(keys: chex.PRNGKey, shape: tuple[int, ...]) -> jax.Array:
    """Each example's standard normal draw of `shape` from fold_in(its key, 1)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(keys)

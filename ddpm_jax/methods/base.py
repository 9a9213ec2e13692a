"""The interface every method implements: what the run layer trains, evaluates and samples.

A method is chosen once from `config.method` (`ddpm_jax.methods.from_config`). The training and
evaluation steps, the loop, the evaluation and `load_run` see only this interface, so a new method
(its own file plus one registry line in methods/__init__.py) needs no change anywhere else.

Randomness: the steps hand a method one key per example, derived from the example's global index
(the same on 1 or N devices), and one key per device where an example-level key is not needed.
"""

from __future__ import annotations

import abc
import functools
from typing import Any

import chex
import jax
import ml_collections

Params = Any


class Method(abc.ABC):
    """A trainable generative model with a bound in bits/dim.

    Subclasses set `name`, `samplers` (the sampler names `sample` accepts; the first is the
    default) and `frozen_fields` (config fields a resume must not change), and build `self.model`
    (a Flax module) in `__init__`.
    """

    name: str = ""
    samplers: tuple[str, ...] = ("ancestral",)
    frozen_fields: tuple[str, ...] = ("data.image_size", "data.channels")

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

    def init_loss_history(self):
        """Per-method training state beside the params (e.g. the importance sampler's history)."""
        return None

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def draw_training_inputs(self, keys: chex.PRNGKey, x: chex.Array, loss_history, *, position) -> dict:
        """The per-example random inputs of the loss, from one key per example, outside the gradient.

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

    def update_loss_history(self, history, inputs: dict, terms: dict, gather):
        """The loss history after a step; `gather(x)` collects an array over the whole global batch."""
        return history

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
    @abc.abstractmethod
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
        frames (`frames`, `pred_x0` [F, num, H, W, C], `frame_t` [F]) where the method has a chain."""

    def check_sampler(self, sampler: str, num_steps: int | None, eta: float) -> None:
        """Raises errors.ConfigError when `sampler` cannot run on this method and config."""
        from ddpm_jax.errors import ConfigError

        if sampler not in self.samplers:
            raise ConfigError(
                f"--sampler={sampler!r} is not available for method {self.name!r}; use one of "
                f"{', '.join(self.samplers)}."
            )
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}.")

    def sampler_label(self, sampler: str, num_steps: int | None) -> str:
        """How tables name a sampler run: "respaced100", "ddim50", "ancestral"."""
        return sampler if num_steps is None else f"{sampler}{num_steps}"

    # ------------------------------------------------------------------ loading a trained run
    def model_fn(self, params: Params):
        """`model_fn(x_t, t)`: the network with `params` closed over (the core's contract)."""

        def model_fn(x, t):
            return self.apply_fn({"params": params}, x, t, train=False)

        return model_fn

    def schedule(self, params: Params):
        """The noise schedule these params use (None for a method without one)."""
        return None

    def describe(self) -> dict:
        """What `load_run` reports beside the schedule: parameterization, variance, ..."""
        return {}


def example_noise(keys: chex.PRNGKey, shape: tuple[int, ...]) -> jax.Array:
    """Each example's standard normal draw of `shape` from fold_in(its key, 1)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(keys)

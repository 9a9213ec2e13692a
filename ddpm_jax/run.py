"""Loading a trained run (public: `ddpm_jax.load_run`), for notebooks, sample.py and evaluate.

    run = ddpm_jax.load_run("runs/default")            # the newest checkpoint, EMA params
    print(run)                                         # method, step, parameterization, noise schedule
    run.noise_schedule.plot("log_snr.png")             # log SNR against t, for every method with one
    eps_hat = run.model_fn(x_t, t)                     # the network, params closed over
    images = run.sample(16, seed=0)                    # [16, H, W, C] in [-1, 1]

Reads without writing (a read-only checkpoint manager), so it is safe beside a running training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import fileio, methods
from ddpm_jax.errors import CheckpointError, ConfigError
from ddpm_jax.methods import Method
from ddpm_jax.methods.base import NoiseSchedule
from ddpm_jax.training import checkpoint, train_lib
from ddpm_jax.training.validation import validate_config, without_unread_fields

WHICH = ("ema", "raw", "best")  # "best": the EMA params kept for the best validation value (training.keep_best)


@dataclasses.dataclass(frozen=True, repr=False)
class Run:
    """A trained run: its config, method, restored state and the chosen params ("ema", "raw" or "best": the EMA
    params of <workdir>/best, whose step is the run's step here).

    What any run answers, whatever its method: `method_name`, `step`, `parameterization` and
    `variance` (None where the method has none), `noise_schedule` (log SNR against t, printable and
    plottable; None for the VAEs), `model_fn`, `sample`. `print(run)` says them in a few lines.
    """

    workdir: str
    config: ml_collections.ConfigDict
    method: Method
    state: train_lib.TrainState
    which: str

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self) -> Any:
        return self.state.params if self.which == "raw" else self.state.ema_params

    @property
    def method_name(self) -> str:
        """config.method: "vdm", "ddpm", "vae" or "hvae"."""
        return self.method.name

    @property
    def schedule(self):
        """The method's own schedule: a DDPM's core Schedule (for a learned schedule, the one its
        params define), VDM's {"t", "gamma"} on a grid, None for the VAEs. `noise_schedule` is the
        same for every method."""
        return self.method.schedule(self.params)

    @property
    def noise_schedule(self) -> NoiseSchedule | None:
        """log SNR against t (per step for a DDPM, on a grid of [0, 1] for VDM); None for the VAEs.
        `print` it, `.plot(path)` it, or plot its `t` and `log_snr` arrays yourself."""
        return self.method.noise_schedule(self.params)

    @property
    def parameterization(self) -> str | None:
        return self.method.describe().get("parameterization")

    @property
    def variance(self) -> str | None:
        return self.method.describe().get("variance")

    @property
    def model_fn(self):
        """`model_fn(x_t, t)`: the network with the chosen params closed over (the core's contract)."""
        return self.method.model_fn(self.params)

    def sample(
        self, num: int, seed: int = 0, sampler: str | None = None, num_steps: int | None = None, eta: float = 0.0
    ) -> np.ndarray:
        """`num` samples [num, H, W, C] in [-1, 1] on the default device (sample.py uses every device)."""
        sampler = sampler or self.method.default_sampler()
        self.method.check_sampler(sampler, num_steps, eta)
        fn = jax.jit(lambda p, key: self.method.sample(p, key, num, sampler=sampler, num_steps=num_steps, eta=eta))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)  # sample.py's first device: the same images
        # Clipped to the documented range whatever the sampler (VDM's top bin once came out at 1.0000001).
        return np.clip(np.asarray(fn(self.params, key)["samples"]), -1.0, 1.0)

    def __str__(self) -> str:
        return (
            f"{self.method_name} run at step {self.step} ({self.which} params) in {self.workdir}: "
            f"parameterization {self.parameterization}, variance {self.variance}\n"
            f"noise schedule: {self.noise_schedule}"
        )

    def __repr__(self) -> str:
        return f"<Run {self.method_name} at step {self.step} ({self.which} params) in {self.workdir}>"


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in workdir was trained with, checked, or CheckpointError."""
    config = checkpoint.load_config(workdir)
    try:
        # A run saved before configs held only their method's sections (a VDM run's `diffusion`) loads too.
        config = without_unread_fields(config)
        validate_config(config, num_devices=1)  # the batch size does not matter here
    except (ConfigError, AttributeError, KeyError) as e:  # a hand-edited or foreign config.json
        raise CheckpointError(
            f"{fileio.as_path(workdir) / checkpoint.CONFIG_FILE} is not a usable config ({e}); "
            "pass the --workdir that train.py wrote to."
        ) from e
    return config


def load_run(workdir: str, which: str = "ema") -> Run:
    """Restores the newest checkpoint of a workdir that train.py wrote.

    Args:
      workdir: the run's --workdir.
      which: "ema" (the averaged params, what samples and bounds use), "raw", or "best": the EMA params the
        run kept for its lowest validation value (training.keep_best; what its final report used), with
        that step as the Run's step.

    Raises:
      CheckpointError: no run, no checkpoint, or a damaged one, or which="best" without a kept best; the
        message says what to do.
      ConfigError: `which` is not one of WHICH.
    """
    if which not in WHICH:
        raise ConfigError(f"which={which!r}: use 'ema', 'raw' or 'best'.")
    config = load_config(workdir)
    method = methods.from_config(config)
    no_checkpoint = CheckpointError(
        f"{checkpoint.checkpoint_dir(workdir)} holds no checkpoint: train first "
        f"(python train.py --workdir={workdir}), or pass the --workdir of a trained run."
    )
    if not checkpoint.checkpoint_path(workdir).is_dir():
        raise no_checkpoint
    target = train_lib.abstract_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(config.seed))
    state = checkpoint.restore_latest(checkpoint.make_manager(workdir, read_only=True), target)
    if state is None:
        raise no_checkpoint
    if which == "best":
        state = _with_best_params(workdir, state)
    return Run(workdir=workdir, config=config, method=method, state=state, which=which)


def _with_best_params(workdir: str, state: train_lib.TrainState) -> train_lib.TrainState:
    """state with the EMA params and the step of the run's kept best (checkpoint.BEST_DIR)."""
    best = None
    if checkpoint.best_path(workdir).is_dir():
        mngr = checkpoint.make_best_manager(workdir, read_only=True)
        best = checkpoint.read_best(mngr)
    if best is None:
        raise CheckpointError(
            f"{checkpoint.best_path(workdir)} holds no best checkpoint: the run was trained with "
            "training.keep_best=False or before it existed. Use which='ema' (--params=ema) for the last step's."
        )
    params = checkpoint.restore_best_params(mngr, best.step, state.ema_params)
    return state.replace(step=np.asarray(best.step, np.asarray(state.step).dtype), ema_params=params)

"""The training loop: restore, train with a progress bar, log, evaluate, sample, checkpoint.

Each step is followed by the periodic actions, one line each, at the steps `every` picks (as clu's
periodic actions and big_vision's `u.itstime`): the log (`_Logger`, which also refreshes the workdir
lock), the validation loss and bound estimate (val_*, with the best EMA params kept: `_KeepBest`), a sample
grid (`_sample_grid`), a checkpoint, and the stop check (`_StopCheck`).
Nothing is lost on the way: a kill at any moment leaves the last complete checkpoint (Orbax's
atomic saves, see checkpoint.py); SIGTERM / SIGINT save a checkpoint at the current step and
return; a run of non-finite steps longer than config.training.max_nonfinite_steps stops with a
checkpoint of the last good parameters. With several processes (distributed.py) every process
runs this same loop on its shard of the data, and only process 0 writes logs and pictures.
What is trained is the config's method (ddpm_jax.methods); the end-of-run evaluation is
ddpm_jax.evaluation.report's `final_report`.

The splits (data.splits): the loop trains on `splits.load_train`, evaluates on `splits.load_validation`
and reads the test split (config.data.eval_split) once, after training, for the final report of the
selected EMA params: with config.training.keep_best those of the eval step with the lowest validation
value (the first of SELECT_BY the eval metrics have), kept in <workdir>/best; else the last step's.
"""

from __future__ import annotations

import functools
import time

import jax
import ml_collections
import numpy as np

from ddpm_jax import fileio, methods
from ddpm_jax.data import pipeline, splits
from ddpm_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from ddpm_jax.evaluation import fid, plots, report, sample_lib
from ddpm_jax.training import checkpoint, distributed, progress, train_lib, workdir_lock
from ddpm_jax.training.guards import NonfiniteGuard, StopFlag
from ddpm_jax.training.metric_writer import MetricWriter
from ddpm_jax.training.validation import validate_config

# Processes agree on a pre-emption at log steps and every this many steps (a small collective),
# so that all of them stop, and save, at the same step; one process alone checks every step.
STOP_SYNC_EVERY = 10
# The validation metric keep_best minimises: the first of these the eval step reports (every method reports
# val_bpd_est, the unbiased bound estimate of config.training.bpd_estimate_strata strata).
SELECT_BY = ("val_bpd_est", "val_loss")


def _say(*args) -> None:
    if distributed.is_main_process():
        print(*args, flush=True)


def _mean_metrics(metrics) -> dict:
    return {k: float(np.mean(v)) for k, v in distributed.local_values(metrics).items()}


def every(step: int, interval: int, last_step: int, *, at_last: bool = True) -> bool:
    """Whether a periodic action runs after `step`: every `interval` steps, and at the last step
    exactly when `at_last` (big_vision's `u.itstime`)."""
    if step == last_step:
        return at_last
    return step % interval == 0


class _Logger:
    """The log action: the train metrics' device means, steps/s and the steps skipped (non-finite)
    since the last log, to the metric writer and the progress (a bar or a line, progress.Progress); refreshes
    the workdir lock."""

    def __init__(self, writer: MetricWriter, lock, bar, guard: NonfiniteGuard, step: int):
        self.writer, self.lock, self.bar, self.guard = writer, lock, bar, guard
        self.last_time, self.last_step, self.skipped = time.time(), step, 0

    def __call__(self, step: int, metrics) -> None:
        scalars = _mean_metrics(metrics)
        now = time.time()
        scalars["steps_per_sec"] = (step - self.last_step) / max(now - self.last_time, 1e-9)
        scalars["nonfinite_steps"] = self.guard.skipped - self.skipped  # skipped since the last log
        if scalars["nonfinite_steps"]:
            self.bar.write(
                f"step {step}: {int(scalars['nonfinite_steps'])} step(s) since the last log had a "
                "non-finite loss or gradient; their updates were skipped."
            )
        self.last_time, self.last_step, self.skipped = now, step, self.guard.skipped
        self.writer.write(step, scalars)
        self.lock.refresh()  # WorkdirLocked if another run has taken the workdir over
        self.bar.log(step, scalars)  # the bar's postfix, or a line: step/total, loss, steps/s, ETA


def _sample_grid(steps: train_lib.CompiledSteps, rstate, rng, step: int, config, workdir: str, writer) -> None:
    """The sample action: a grid of the EMA params' samples, keyed fold_in(rng, step). Every process
    samples (SPMD); process 0 writes samples/step_<step>.png and the TensorBoard image."""
    grid = sample_lib.draw_samples(
        steps.p_sample, rstate.ema_params_tree(), jax.random.fold_in(rng, step), config.sampling.num_samples
    )
    if distributed.is_main_process():
        plots.save_grid(grid["samples"], fileio.as_path(workdir) / "samples" / f"step_{step:07d}.png")
        writer.write_images(step, {"samples/ema": plots.image_grid(grid["samples"])})


class _StopCheck:
    """The stop action: whether the run stops here (and saves) before its last step, for a
    pre-emption signal on any process or at stop_at_step.

    One process looks at its flag after every step. Several agree on a signal (a collective) at log
    steps and every STOP_SYNC_EVERY steps, so that all of them stop, and save, at the same step.
    """

    def __init__(self, flag: StopFlag, stop_at_step: int | None, last_step: int):
        self.flag, self.stop_at_step, self.last_step = flag, stop_at_step, last_step
        self.multi = jax.process_count() > 1

    def any_signal(self) -> bool:
        """True if any process got a signal (a collective: every process must call it)."""
        return distributed.any_process(self.flag.signal is not None)

    def due(self, step: int, is_log: bool) -> bool:
        if step == self.last_step:  # the run ends here anyway, with its final report
            return False
        at_stop_step = self.stop_at_step is not None and step >= self.stop_at_step
        return at_stop_step or not self.multi or is_log or step % STOP_SYNC_EVERY == 0

    def __call__(self, step: int) -> bool:
        if self.stop_at_step is not None and step >= self.stop_at_step:
            self.flag.signal = self.flag.signal or f"stop_at_step={self.stop_at_step}"
            return True
        return self.any_signal()


def selection_metric(scalars: dict) -> str:
    """The key of SELECT_BY that keep_best compares in an eval step's scalars."""
    for key in SELECT_BY:
        if key in scalars:
            return key
    raise KeyError(f"the eval metrics have none of {SELECT_BY}: {sorted(scalars)}")


class _KeepBest:
    """The best-checkpoint action (config.training.keep_best): after each validation eval, the EMA params
    are saved to <workdir>/best when their validation value is the lowest so far (strictly). The best so far
    is read back from there on resume, so a killed run keeps it. A fresh start (step 0) drops an older
    run's best. With keep_best False it does nothing and the last step is selected."""

    def __init__(self, config, workdir: str, initial_step: int):
        self.enabled = bool(config.training.get("keep_best", False))
        self.mngr = checkpoint.make_best_manager(workdir) if self.enabled else None
        self.best = checkpoint.read_best(self.mngr) if self.enabled else None
        if self.enabled and initial_step == 0 and self.mngr.all_steps():  # left by an earlier run in workdir
            _say(f"Dropping the best checkpoint(s) {self.mngr.all_steps()} of an earlier run in this workdir.")
            for old in self.mngr.all_steps():
                self.mngr.delete(old)
            self.best = None

    def __call__(self, step: int, scalars: dict, rstate) -> None:
        if not self.enabled:
            return
        metric = selection_metric(scalars)
        value = float(scalars[metric])
        if np.isfinite(value) and (self.best is None or value < self.best.value):
            best = checkpoint.Best(step, metric, value)
            checkpoint.save_best(self.mngr, best, distributed.unreplicate(rstate.ema_params_tree()))
            self.best = best

    def select(self, rstate, step: int):
        """(the replicated state whose EMA params the final report uses, the selection for results.json)."""
        if not self.enabled or self.best is None:
            why = "last step" if not self.enabled else "last step (no validation eval was kept)"
            return rstate, {"selected_step": step, "selected_by": why}
        params = checkpoint.restore_best_params(self.mngr, self.best.step, distributed.unreplicate(rstate.ema_params))
        selection = {
            "selected_step": self.best.step,
            "selected_by": self.best.metric,
            "selected_value": self.best.value,
        }
        _say(
            f"The final report uses the EMA params of step {self.best.step} ({self.best.metric}={self.best.value:.4f})."
        )
        return rstate.replace(ema_params=distributed.replicate(params)), selection


def _restore_or_init(config, workdir: str, mngr, method, tx):
    """The latest checkpoint of workdir (checked against config), or a fresh state, in the form
    config.optim.flatten asks (checkpoints hold the tree form); writes config.json."""
    rng = jax.random.PRNGKey(config.seed)
    try:
        saved = checkpoint.load_config(workdir, required=False)
    except CheckpointError as e:
        saved = None
        _say(f"warning: {e} Continuing with the config given.")
    mngr.reload()
    if mngr.latest_step() is not None:
        if saved is not None:
            checkpoint.check_compatible(saved, config, workdir, method.frozen_fields)
            if "validation_split" not in saved.get("data", {}):
                _say(
                    "warning: this run started before the validation split existed: it trained on the whole train "
                    "split until now, so its validation numbers (val_*) include images it has seen."
                )
        state = checkpoint.restore_latest(mngr, train_lib.abstract_train_state(method, tx, rng))
    else:
        state = None
    if distributed.is_main_process():
        checkpoint.save_config(workdir, config)  # only once the checkpoint is known to fit
    state = train_lib.create_train_state(method, tx, rng) if state is None else state
    return state.to_flat() if config.optim.flatten else state


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None, steps=None
) -> dict:
    """Trains (resuming from the latest checkpoint in workdir) and writes samples, curves, bits/dim.

    Args:
      config: the run's config (validated first).
      workdir: checkpoints, metrics and pictures go here.
      stop_at_step: stop early at this step as if pre-empted (checkpoint, no final evaluation);
        running again resumes exactly where it stopped.
      steps: `train_lib.compile_steps(method, config)` (a CompiledSteps) of this config, to reuse compiled steps
        across calls in one process (a notebook, the tests); built here when None.

    Returns:
      dict of the final numbers (also written to <workdir>/results.json), or, when stopped early by
      a signal or stop_at_step, {"stopped_at", "signal", "checkpoint_dir"}.

    Raises:
      ConfigError, CheckpointError, DataError: bad input, before any training (a data_dir that does not
        exist, before the workdir is touched).
      WorkdirLocked: another live run trains in workdir (workdir_lock).
      TrainingDiverged: config.training.max_nonfinite_steps non-finite steps in a row (a checkpoint
        of the last good state is saved first).
    """
    validate_config(config)
    pipeline.check_data_dir(config.data.data_dir)  # DataError before the workdir, the lock or the model is touched
    check_workdir(workdir)
    with workdir_lock.acquire(workdir, process_index=jax.process_index(), say=_say) as lock:
        try:
            return _train_and_evaluate(config, workdir, stop_at_step, steps, lock)
        except Exception as e:  # a full disk met by metrics.jsonl or a picture, not by a save
            full = checkpoint.disk_full_error(workdir, e)
            if full is None:
                raise
            raise full from e


def check_workdir(workdir: str) -> None:
    """ConfigError for a --workdir that cannot hold a run (a file, or a folder that cannot be made).
    A remote workdir (gs://...) is a prefix in a bucket: making it checks that the bucket can be reached."""
    path = fileio.as_path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file, not a folder: pass a new or existing folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir} cannot be created ({e.strerror or e}): pass a folder you can write to."
        ) from None


def _load_data(config, initial_step: int):
    """The train batches from initial_step on, the validation split, and the eval batches that cover it
    (the test split is not read here: `_load_test`, after training)."""
    train_images = splits.load_train(config)
    val_images = splits.load_validation(config)
    num_eval_batches = report.num_eval_batches(val_images, config.training.batch_size)
    batches = pipeline.train_batches(
        train_images,
        config.training.batch_size,
        config.seed,
        start_step=initial_step,
        random_flip=config.data.random_flip,
    )
    return batches, val_images, num_eval_batches


def _load_test(config):
    """The test split, for the final report only (None when no final evaluator reads it)."""
    if "bound" not in report.final_evaluators(config):
        return None
    return splits.load_split(config, config.data.eval_split)


def _train_and_evaluate(config, workdir: str, stop_at_step: int | None, steps, lock) -> dict:
    start_time = time.time()
    stop = StopFlag()  # from here on a pre-emption saves (after the step in flight)
    mngr = checkpoint.make_manager(workdir, config.training.keep_checkpoints)
    try:
        if steps is None:
            steps = train_lib.compile_steps(methods.from_config(config), config)
        state = _restore_or_init(config, workdir, mngr, steps.method, steps.tx)
        initial_step = int(state.step)
        if initial_step:
            _say(f"Resuming from the checkpoint at step {initial_step} in {checkpoint.checkpoint_dir(workdir)}.")
        batches, val_images, num_eval_batches = _load_data(config, initial_step)
        keep_best = _KeepBest(config, workdir, initial_step)
        rstate = distributed.replicate(state)
        del state
        writer = MetricWriter(workdir, initial_step)
        writer.write_hparams(config)  # a fresh start only
        eval_rng = jax.random.PRNGKey(config.seed + 1)
        tr = config.training
        num_steps = tr.num_train_steps
        guard = NonfiniteGuard(tr.max_nonfinite_steps)
        # tqdm's bar on a terminal, one line per log step in a file (progress.is_terminal)
        bar = progress.Progress(num_steps, initial_step, desc="train", enabled=distributed.is_main_process())
        # The periodic actions.
        log = _Logger(writer, lock, bar, guard, initial_step)
        val_loss = functools.partial(
            report.evaluate_loss,
            steps.p_eval,
            images=val_images,
            config=config,
            rng=eval_rng,
            num_batches=num_eval_batches,
        )
        stop_check = _StopCheck(stop, stop_at_step, num_steps)
        fid_eval = fid.training_evaluator(config)  # FID every tr.fid_every steps; None when 0 (the default)
        # A signal during start-up stops before the first step; all processes must agree on it.
        step, stopping, diverged = initial_step, stop_check.any_signal(), False
        while step < num_steps and not stopping:
            rstate, metrics = steps.p_train(rstate, next(batches))
            step += 1
            bar.update(1)
            guard.add(step, metrics["nonfinite"])
            is_log = every(step, tr.log_every, num_steps)
            if (is_log or guard.due()) and guard.check():
                diverged = True
                break
            if is_log:
                log(step, metrics)
            if every(step, tr.eval_every, num_steps):
                scalars = val_loss(rstate.ema_params_tree())
                writer.write(step, scalars)
                keep_best(step, scalars, rstate)
            if every(step, tr.sample_every, num_steps, at_last=False):  # the final report samples the last step
                _sample_grid(steps, rstate, eval_rng, step, config, workdir, writer)
            if fid_eval is not None and every(step, tr.fid_every, num_steps):
                writer.write(
                    step, fid.fid_scalars(fid_eval, steps, rstate.ema_params_tree(), jax.random.fold_in(eval_rng, step))
                )
            if every(step, tr.checkpoint_every, num_steps):
                writer.flush()  # the records up to a checkpoint are stored before it (object stores buffer them)
                checkpoint.save(mngr, distributed.unreplicate(rstate))
            if stop_check.due(step, is_log):
                stopping = stop_check(step)
        bar.close()
        where = checkpoint.checkpoint_dir(workdir)
        if diverged or stopping:
            writer.flush()
            checkpoint.save(mngr, distributed.unreplicate(rstate), force=True)
            checkpoint.wait_until_finished(mngr)
        if diverged:
            raise TrainingDiverged(guard.message(config, step, where))
        if stopping:
            reason = stop.signal or "a signal to another process"
            _say(
                f"\nGot {reason} at step {step}: saved a checkpoint in {where}. Run the same command again "
                "to resume from it."
            )
            return {"stopped_at": step, "signal": reason, "checkpoint_dir": where}
    finally:
        stop.restore()
        checkpoint.wait_until_finished(mngr)
    rstate, selection = keep_best.select(rstate.to_tree(), step)  # the report reads parameter trees
    return report.final_report(
        config=config,
        workdir=workdir,
        steps=steps,
        rstate=rstate,
        test_images=_load_test(config),
        selection=selection,
        val_images=val_images,
        eval_rng=eval_rng,
        writer=writer,
        start_time=start_time,
    )

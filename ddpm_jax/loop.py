"""The training loop: restore, train with a progress bar, log, evaluate, sample, checkpoint.

Nothing is lost on the way: a kill at any moment leaves the last complete checkpoint (Orbax's
atomic saves, see checkpoint.py); SIGTERM / SIGINT save a checkpoint at the current step and
return; a run of non-finite steps longer than config.training.max_nonfinite_steps stops with a
checkpoint of the last good parameters. With several processes (distributed.py) every process
runs this same loop on its shard of the data, and only process 0 writes logs and pictures.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import time
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ddpm_jax import checkpoint, data, distributed, plots, train_lib
from ddpm_jax.validation import UserError, validate_config

# Processes agree on a pre-emption at log steps and every this many steps (a small collective),
# so that all of them stop, and save, at the same step; one process alone checks every step.
STOP_SYNC_EVERY = 10
DEFAULT_MAX_NONFINITE_STEPS = 10


class DataError(UserError, RuntimeError):
    """A dataset that cannot be read or downloaded here."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good state was saved."""


def _say(*args) -> None:
    if distributed.is_main_process():
        print(*args, flush=True)


class MetricWriter:
    """Scalars to <workdir>/metrics.jsonl and TensorBoard; only process 0 writes.

    On resume the records after the restored step are dropped (they will be written again), and
    a last line cut short by a kill is removed, so metrics.jsonl always reads as one clean run.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = distributed.is_main_process()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            import tensorflow as tf

            self._trim(resume_step)
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def _trim(self, resume_step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if record.get("step", 0) <= resume_step:
                    keep.append(json.dumps(record) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf

        with self._tb.as_default():
            for k, v in scalars.items():
                tf.summary.scalar(k, float(v), step=int(step))
        self._tb.flush()


class _StopFlag:
    """Set by SIGTERM / SIGINT so the loop can save and exit cleanly (pre-emption).

    A second signal restores the previous handlers and re-raises, so a stuck run can still be
    interrupted (the last complete checkpoint stays).
    """

    def __init__(self):
        self.signal: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, _frame):
        if self.signal is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class _NonfiniteGuard:
    """Counts skipped (non-finite) steps in a row from metrics['nonfinite'] without a device sync
    every step.

    The flags are fetched only when the run could have reached the limit since the last look
    (`limit - streak` steps later: every `limit` steps in a healthy run) and at log steps, which
    still stops at exactly the step where the limit is reached.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.pending: list = []  # (step, device flags) not yet looked at
        self.streak, self.first_bad, self.skipped = 0, None, 0

    def add(self, step: int, flags) -> None:
        self.pending.append((step, flags))

    def due(self) -> bool:
        return len(self.pending) >= self.limit - self.streak

    def check(self) -> bool:
        """Looks at the pending flags; True once `limit` steps in a row were skipped."""
        flags = distributed.local_values([f for _, f in self.pending])
        for (step, _), f in zip(self.pending, flags):
            if np.max(f) > 0:
                self.streak, self.skipped = self.streak + 1, self.skipped + 1
                self.first_bad = step if self.streak == 1 else self.first_bad
            else:
                self.streak = 0
        self.pending = []
        return self.streak >= self.limit

    def message(self, config, step: int, where: str) -> str:
        lr, dtype = config.optim.lr, config.model.dtype
        causes = [f"the learning rate is too high (config.optim.lr={lr:g}; try {lr / 10:g} or a longer "
                  "config.optim.warmup_steps)",
                  f"overflow in low precision (config.model.dtype={dtype!r}; 'float32' is the safe choice)",
                  f"bad data (NaN/Inf or wrongly scaled images in dataset {config.data.dataset!r})"]
        if dtype != "float32":
            causes.insert(0, causes.pop(1))
        return (f"training stopped at step {step}: {self.streak} steps in a row (steps {self.first_bad} to {step}) had "
                f"a non-finite loss or gradient and were skipped, so the parameters are still those after step "
                f"{self.first_bad - 1}; saved them in {where} (checkpoint step {step}). Likely causes: "
                f"{'; '.join(causes)}. Fix the cause and run the same command again to resume, or raise "
                "config.training.max_nonfinite_steps to tolerate longer runs of bad steps.")


def _check_image_shape(images: np.ndarray, config) -> None:
    want = (config.data.image_size, config.data.image_size, config.data.channels)
    if images.shape[1:] != want:
        raise DataError(f"dataset {config.data.dataset!r} has images of shape {images.shape[1:]} but the config "
                        f"says {want}: set config.data.image_size={images.shape[1]} and "
                        f"config.data.channels={images.shape[3]}.")


def load_split(config, split: str) -> np.ndarray:
    try:
        images = data.load_images(config.data.dataset, split, config.data.data_dir)
    except RuntimeError as e:  # not prepared and cannot be downloaded here
        raise DataError(str(e)) from e
    _check_image_shape(images, config)
    return images


def _num_eval_batches(test_images: np.ndarray, global_batch: int) -> int:
    """Batches that cover this process's shard; every process must run the same number of eval
    steps, though their shards can differ by one image."""
    return distributed.max_over_processes(-(-len(test_images) // (global_batch // jax.process_count())))


def _mean_metrics(metrics) -> dict:
    return {k: float(np.mean(v)) for k, v in distributed.local_values(metrics).items()}


# Compiled steps per config: train_and_evaluate called again with the same config (a resume in a
# notebook or a test) reuses them instead of compiling for minutes again. The state's static
# parts (apply_fn, tx) are shared too, since the pmapped step's cache is keyed on them.
_BUILT: collections.OrderedDict = collections.OrderedDict()
_BUILT_MAX = 4


def _build(config: ml_collections.ConfigDict) -> SimpleNamespace:
    """(apply_fn, tx, p_train, p_eval, p_bpd, p_sample) for this config and these devices."""
    key = (config.to_json_best_effort(sort_keys=True), tuple(str(d) for d in jax.devices()))
    if key in _BUILT:
        _BUILT.move_to_end(key)
        return _BUILT[key]
    model = train_lib.create_model(config)
    sched = train_lib.make_schedule(config)
    fns = train_lib.make_pmapped_steps(config, model.apply, sched)
    built = SimpleNamespace(apply_fn=model.apply, tx=train_lib.make_optimizer(config), fns=fns)
    _BUILT[key] = built
    while len(_BUILT) > _BUILT_MAX:
        _BUILT.popitem(last=False)
    return built


def evaluate_loss(p_eval, params, test_images, config, rng, num_batches: int | None = None) -> dict:
    """The training loss (and its parts) over the whole test split, per example."""
    sums = None
    for batch, mask in data.eval_batches(test_images, config.training.batch_size, num_batches=num_batches):
        out = train_lib.unreplicate(p_eval(params, batch, mask, rng))
        sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
    count = sums.pop("count")
    return {f"test_{k}": float(v / count) for k, v in sums.items()}


def evaluate_bpd(p_bpd, params, test_images, config, rng, batch_size: int | None = None,
                 num_batches: int | None = None) -> dict:
    """Negative ELBO over the whole test split in bits/dim, with its parts (and the per-t terms)."""
    sums = None
    batches = list(data.eval_batches(test_images, batch_size or config.training.batch_size, num_batches=num_batches))
    for batch, mask in tqdm(batches, desc="test bits/dim", unit="batch", disable=not distributed.is_main_process()):
        out = train_lib.unreplicate(p_bpd(params, batch, mask, rng))
        sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
    count = sums.pop("count")
    mean_sq = sums.pop("total_bpd_sq") / count
    result = {k: float(v / count) for k, v in sums.items() if k != "vb"}
    # Standard error of the mean over test images (with an estimate, its draws of t are part of the spread).
    result["total_bpd_se"] = float(np.sqrt(max(mean_sq - result["total_bpd"] ** 2, 0.0) / max(count - 1, 1)))
    if "vb" in sums:  # all T terms: L_0, the sum of L_{t-1}, and every term
        vb = sums["vb"] / count
        result.update(decoder_bpd=float(vb[0]), diffusion_bpd=float(vb[1:].sum()), vb_per_t=vb.tolist())
    result["num_examples"] = int(count)
    return result


def draw_samples(p_sample, params, config, rng, num: int, num_frames: int = 0, sampler: str = "ancestral",
                 num_steps: int | None = None, eta: float = 0.0) -> dict:
    """`num` samples from this process's devices (rounded up to their count), on the host."""
    devices = jax.local_device_count()
    per_device = -(-num // devices)
    out = distributed.local_values(p_sample(params, rng, per_device, num_frames, sampler, num_steps, float(eta)))
    merge = lambda x: x.reshape((-1,) + x.shape[2:])[:num]  # [D, b, ...] -> [D*b, ...]
    result = {"samples": merge(out["samples"])}
    if num_frames and "frames" in out:  # frames are [D, F, b, ...] -> [F, D*b, ...]
        for k in ("frames", "pred_x0"):
            v = np.moveaxis(out[k], 0, 1)
            result[k] = v.reshape(v.shape[:1] + (-1,) + v.shape[3:])[:, :num]
        result["frame_t"] = out["frame_t"][0]
    return result


def params_digest(params) -> str:
    """sha256 of the parameters' bytes: equal on every process of a healthy multi-process run."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _restore_or_init(config, workdir: str, mngr, built):
    """The latest checkpoint of workdir (checked against config), or a fresh state; writes config.json."""
    state = train_lib.create_train_state(config, jax.random.PRNGKey(config.seed))
    state = state.replace(apply_fn=built.apply_fn, tx=built.tx)
    try:
        saved = checkpoint.load_config(workdir, required=False)
    except checkpoint.CheckpointError as e:
        saved = None
        _say(f"warning: {e} Continuing with the config given.")
    if saved is not None and mngr.latest_step() is not None:
        checkpoint.check_compatible(saved, config, workdir)
    restored = checkpoint.restore_latest(mngr, state)
    if distributed.is_main_process():
        checkpoint.save_config(workdir, config)  # only once the checkpoint is known to fit
    return state if restored is None else restored


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None) -> dict:
    """Trains (resuming from the latest checkpoint in workdir) and writes samples, curves, bits/dim.

    Args:
      config: the run's config (validated first).
      workdir: checkpoints, metrics and pictures go here.
      stop_at_step: stop early at this step as if pre-empted (checkpoint, no final evaluation);
        running again resumes exactly where it stopped.

    Returns:
      dict of the final numbers (also written to <workdir>/results.json), or, when stopped early by
      a signal or stop_at_step, {"stopped_at", "signal", "checkpoint_dir"}.

    Raises:
      ConfigError, CheckpointError, DataError: bad input, before any training.
      TrainingDiverged: config.training.max_nonfinite_steps non-finite steps in a row (a checkpoint
        of the last good state is saved first).
    """
    validate_config(config)
    start_time = time.time()
    is_main, multi = distributed.is_main_process(), jax.process_count() > 1
    stop = _StopFlag()  # from here on a pre-emption saves (after the step in flight)
    mngr = checkpoint.make_manager(workdir, config.training.keep_checkpoints)
    try:
        built = _build(config)
        p_train, p_eval, p_bpd, p_sample = built.fns
        state = _restore_or_init(config, workdir, mngr, built)
        initial_step = int(state.step)
        if initial_step:
            _say(f"Resuming from the checkpoint at step {initial_step} in {checkpoint.checkpoint_dir(workdir)}.")
        train_images, test_images = load_split(config, config.data.train_split), load_split(config, config.data.eval_split)
        num_eval_batches = _num_eval_batches(test_images, config.training.batch_size)
        batches = data.train_batches(train_images, config.training.batch_size, config.seed,
                                     start_step=initial_step, random_flip=config.data.random_flip)
        rstate = train_lib.replicate(state)
        del state
        writer = MetricWriter(workdir, initial_step)
        eval_rng = jax.random.PRNGKey(config.seed + 1)
        tr = config.training
        num_steps = tr.num_train_steps
        limit = tr.get("max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS)
        guard = _NonfiniteGuard(limit)
        bar = tqdm(total=num_steps, initial=initial_step, desc="train", unit="step", disable=not is_main,
                   dynamic_ncols=True)
        last_log_time, last_log_step, skipped_at_log = time.time(), initial_step, 0
        # A signal during start-up stops before the first step; all processes must agree on it.
        step, stopping, diverged = initial_step, distributed.any_process(stop.signal is not None), False
        while step < num_steps and not stopping:
            rstate, metrics = p_train(rstate, next(batches))
            step += 1
            bar.update(1)
            last = step == num_steps
            guard.add(step, metrics["nonfinite"])
            is_log = step % tr.log_every == 0 or last
            if (is_log or guard.due()) and guard.check():
                diverged = True
                break
            if is_log:
                scalars = _mean_metrics(metrics)
                now = time.time()
                scalars["steps_per_sec"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
                scalars["nonfinite_steps"] = guard.skipped - skipped_at_log  # skipped since the last log
                if scalars["nonfinite_steps"]:
                    bar.write(f"step {step}: {int(scalars['nonfinite_steps'])} step(s) since the last log had a "
                              "non-finite loss or gradient; their updates were skipped.")
                last_log_time, last_log_step, skipped_at_log = now, step, guard.skipped
                writer.write(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", steps_s=f"{scalars['steps_per_sec']:.2f}")
            if step % tr.eval_every == 0 or last:
                writer.write(step, evaluate_loss(p_eval, rstate.ema_params, test_images, config, eval_rng,
                                                 num_eval_batches))
            if step % tr.sample_every == 0 and not last:  # every process samples (SPMD); process 0 writes
                grid = draw_samples(p_sample, rstate.ema_params, config, jax.random.fold_in(eval_rng, step),
                                    config.sampling.num_samples)
                if is_main:
                    plots.save_grid(grid["samples"], os.path.join(workdir, "samples", f"step_{step:07d}.png"))
            if step % tr.checkpoint_every == 0 or last:
                checkpoint.save(mngr, train_lib.unreplicate(rstate))
            if stop_at_step is not None and step >= stop_at_step and not last:
                stop.signal = stop.signal or f"stop_at_step={stop_at_step}"
                stopping = True
            elif not last and (not multi or is_log or step % STOP_SYNC_EVERY == 0):
                stopping = distributed.any_process(stop.signal is not None)
        bar.close()
        where = checkpoint.checkpoint_dir(workdir)
        if diverged or stopping:
            checkpoint.save(mngr, train_lib.unreplicate(rstate), force=True)
            mngr.wait_until_finished()
        if diverged:
            raise TrainingDiverged(guard.message(config, step, where))
        if stopping:
            reason = stop.signal or "a signal to another process"
            _say(f"\nGot {reason} at step {step}: saved a checkpoint in {where}. Run the same command again "
                 "to resume from it.")
            return {"stopped_at": step, "signal": reason, "checkpoint_dir": where}
    finally:
        stop.restore()
        mngr.wait_until_finished()
    return _finish(config, workdir, rstate, p_sample, p_bpd, test_images, eval_rng, writer, start_time)


def _finish(config, workdir, rstate, p_sample, p_bpd, test_images, eval_rng, writer, start_time) -> dict:
    """Final sample grid, denoising strip, curves and the test bits/dim (EMA params).

    Every process computes (the bound is a collective); process 0 writes the files.
    """
    is_main = distributed.is_main_process()
    results = {"step": int(train_lib.unreplicate(rstate.step)),
               "params_sha256": params_digest(train_lib.unreplicate(rstate.params))}
    out = draw_samples(p_sample, rstate.ema_params, config, jax.random.fold_in(eval_rng, -1 % 2**31),
                       config.sampling.num_samples, num_frames=10)
    if is_main:
        results["samples_png"] = plots.save_grid(out["samples"], os.path.join(workdir, "samples.png"))
        if "frames" in out:  # the VAE has no chain to show
            results["strip_png"] = plots.save_strip(out["frames"][:, :8],
                                                       os.path.join(workdir, "denoising_strip.png"))
        np.savez(os.path.join(workdir, "samples.npz"), samples=out["samples"])
        records = plots.read_jsonl(writer.path)
        plots.plot_curves(records, ["loss", "test_loss"], os.path.join(workdir, "loss.png"), "training loss")
    if config.training.final_bpd:
        # The bound costs T network calls per image: one large batch wastes the least on padding.
        bpd_batch = config.training.get("bpd_batch_size", None) or config.training.batch_size
        bpd = evaluate_bpd(p_bpd, rstate.ema_params, test_images, config, eval_rng, batch_size=bpd_batch,
                           num_batches=_num_eval_batches(test_images, bpd_batch))
        if is_main and "vb_per_t" in bpd:
            plots.plot_vb_terms(bpd["vb_per_t"], os.path.join(workdir, "bpd_terms.png"),
                                   f"test bound: {bpd['total_bpd']:.3f} bits/dim")
        writer.write(results["step"], {f"test_{k}": v for k, v in bpd.items() if k != "vb_per_t"})
        results.update({k: v for k, v in bpd.items() if k != "vb_per_t"})
        strata = config.training.get("final_bpd_strata", 0)
        results["bpd_method"] = (f"unbiased stratified estimate over t ({strata} strata; all T terms: "
                                 "python -m ddpm_jax.evaluate)" if strata and not train_lib.is_vae(config)
                                 else "exact" if train_lib.is_vae(config) else "all T terms")
    results["wall_time_s"] = time.time() - start_time
    if is_main:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results

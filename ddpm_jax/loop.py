"""The training loop: restore, train with a progress bar, log, evaluate, sample, checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ddpm_jax import checkpoint, data, evaluate, train_lib
from ddpm_jax.validation import validate_config


class MetricWriter:
    """Scalars to <workdir>/metrics.jsonl and TensorBoard; only process 0 writes."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

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
    """Set by SIGTERM / SIGINT so the loop can save and exit cleanly (pre-emption)."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_image_shape(images: np.ndarray, config) -> None:
    want = (config.data.image_size, config.data.image_size, config.data.channels)
    if images.shape[1:] != want:
        raise ValueError(f"dataset {config.data.dataset!r} has images of shape {images.shape[1:]} but the config "
                         f"says {want}: set config.data.image_size={images.shape[1]} and "
                         f"config.data.channels={images.shape[3]}.")


def _mean_metrics(metrics) -> dict:
    return {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}


def evaluate_loss(p_eval, params, test_images, config, rng) -> dict:
    """The training loss (and its parts) over the whole test split, per example."""
    sums = None
    for batch, mask in data.eval_batches(test_images, config.training.batch_size):
        out = jax.device_get(train_lib.unreplicate(p_eval(params, batch, mask, rng)))
        sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
    count = sums.pop("count")
    return {f"test_{k}": float(v / count) for k, v in sums.items()}


def evaluate_bpd(p_bpd, params, test_images, config, rng, batch_size: int | None = None) -> dict:
    """Negative ELBO over the whole test split in bits/dim, with its parts and per-t terms."""
    sums = None
    for batch, mask in data.eval_batches(test_images, batch_size or config.training.batch_size):
        out = jax.device_get(train_lib.unreplicate(p_bpd(params, batch, mask, rng)))
        sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
    count = sums.pop("count")
    vb = sums["vb"] / count
    return {"total_bpd": float(sums["total_bpd"] / count), "prior_bpd": float(sums["prior_bpd"] / count),
            "decoder_bpd": float(vb[0]), "diffusion_bpd": float(vb[1:].sum()), "vb_per_t": vb.tolist(),
            "num_examples": int(count)}


def draw_samples(p_sample, params, config, rng, num: int, num_frames: int = 0) -> dict:
    """`num` samples (rounded up to the device count), gathered to the host."""
    devices = jax.local_device_count()
    per_device = -(-num // devices)
    out = jax.device_get(p_sample(params, rng, per_device, num_frames))
    merge = lambda x: x.reshape((-1,) + x.shape[2:])[:num]  # [D, b, ...] -> [D*b, ...]
    result = {"samples": merge(out["samples"])}
    if num_frames:  # frames are [D, F, b, ...] -> [F, D*b, ...]
        for k in ("frames", "pred_x0"):
            v = np.moveaxis(out[k], 0, 1)
            result[k] = v.reshape(v.shape[:1] + (-1,) + v.shape[3:])[:, :num]
        result["frame_t"] = out["frame_t"][0]
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None) -> dict:
    """Trains (resuming from the latest checkpoint in workdir) and writes samples, curves, bits/dim.

    Args:
      config: the run's config (validated first).
      workdir: checkpoints, metrics and pictures go here.
      stop_at_step: stop early at this step as if pre-empted (checkpoint, no final evaluation);
        running again resumes exactly where it stopped.

    Returns:
      dict of the final numbers (also written to <workdir>/results.json).
    """
    validate_config(config)
    start_time = time.time()
    is_main = jax.process_index() == 0
    if is_main:
        checkpoint.save_config(workdir, config)
    sched = train_lib.make_schedule(config)
    state = train_lib.create_train_state(config, jax.random.PRNGKey(config.seed))
    mngr = checkpoint.make_manager(workdir, config.training.keep_checkpoints)
    state = checkpoint.restore_latest(mngr, state) or state
    initial_step = int(state.step)
    if initial_step:
        print(f"Resuming from the checkpoint at step {initial_step} in {checkpoint.checkpoint_dir(workdir)}.")

    train_images = data.load_images(config.data.dataset, config.data.train_split, config.data.data_dir)
    test_images = data.load_images(config.data.dataset, config.data.eval_split, config.data.data_dir)
    _check_image_shape(train_images, config)
    batches = data.train_batches(train_images, config.training.batch_size, config.seed,
                                 start_step=initial_step, random_flip=config.data.random_flip)
    p_train, p_eval, p_bpd, p_sample = train_lib.make_pmapped_steps(config, state.apply_fn, sched)
    rstate = train_lib.replicate(state)
    del state
    writer = MetricWriter(workdir)
    eval_rng = jax.random.PRNGKey(config.seed + 1)
    tr = config.training
    num_steps = tr.num_train_steps
    stop = _StopFlag()
    bar = tqdm(total=num_steps, initial=initial_step, desc="train", unit="step", disable=not is_main,
               dynamic_ncols=True)
    last_log_time, last_log_step = time.time(), initial_step
    step = initial_step
    try:
        while step < num_steps and stop.signal is None:
            rstate, metrics = p_train(rstate, next(batches))
            step += 1
            bar.update(1)
            last = step == num_steps
            if step % tr.log_every == 0 or last:
                scalars = _mean_metrics(metrics)
                now = time.time()
                scalars["steps_per_sec"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                writer.write(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", steps_s=f"{scalars['steps_per_sec']:.2f}")
                if not np.isfinite(scalars["loss"]):
                    print(f"\nstep {step}: non-finite loss; the update was skipped (see metrics 'nonfinite').")
            if step % tr.eval_every == 0 or last:
                writer.write(step, evaluate_loss(p_eval, rstate.ema_params, test_images, config, eval_rng))
            if (step % tr.sample_every == 0 and not last) and is_main:
                grid = draw_samples(p_sample, rstate.ema_params, config, jax.random.fold_in(eval_rng, step),
                                    config.sampling.num_samples)
                evaluate.save_grid(grid["samples"], os.path.join(workdir, "samples", f"step_{step:07d}.png"))
            if step % tr.checkpoint_every == 0 or last:
                checkpoint.save(mngr, train_lib.unreplicate(rstate))
            if stop_at_step is not None and step >= stop_at_step and not last:
                stop.signal = f"stop_at_step={stop_at_step}"
        bar.close()
        if stop.signal is not None:
            checkpoint.save(mngr, train_lib.unreplicate(rstate), force=True)
            mngr.wait_until_finished()
            print(f"\nGot {stop.signal} at step {step}: saved a checkpoint in {checkpoint.checkpoint_dir(workdir)}. "
                  f"Run the same command again to resume.")
            return {"stopped_at": step, "signal": stop.signal}
    finally:
        stop.restore()
        mngr.wait_until_finished()
    return _finish(config, workdir, rstate, p_sample, p_bpd, test_images, eval_rng, writer, start_time)


def _finish(config, workdir, rstate, p_sample, p_bpd, test_images, eval_rng, writer, start_time) -> dict:
    """Final sample grid, denoising strip, curves and the test bits/dim (EMA params)."""
    results = {"step": int(jax.device_get(rstate.step[0]))}
    if jax.process_index() != 0:
        return results
    out = draw_samples(p_sample, rstate.ema_params, config, jax.random.fold_in(eval_rng, -1 % 2**31),
                       config.sampling.num_samples, num_frames=10)
    results["samples_png"] = evaluate.save_grid(out["samples"], os.path.join(workdir, "samples.png"))
    results["strip_png"] = evaluate.save_strip(out["frames"][:, :8], os.path.join(workdir, "denoising_strip.png"))
    np.savez(os.path.join(workdir, "samples.npz"), samples=out["samples"])
    records = evaluate.read_jsonl(writer.path)
    evaluate.plot_curves(records, ["loss", "test_loss"], os.path.join(workdir, "loss.png"), "training loss")
    if config.training.final_bpd:
        bpd = evaluate_bpd(p_bpd, rstate.ema_params, test_images, config, eval_rng)
        evaluate.plot_vb_terms(bpd["vb_per_t"], os.path.join(workdir, "bpd_terms.png"),
                               f"test bound: {bpd['total_bpd']:.3f} bits/dim")
        writer.write(results["step"], {f"test_{k}": v for k, v in bpd.items() if k != "vb_per_t"})
        results.update({k: v for k, v in bpd.items() if k != "vb_per_t"})
    results["wall_time_s"] = time.time() - start_time
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
